"""Mistral: the Llama layout with sliding-window attention."""

from __future__ import annotations

from .base import Family, TinySize


def tiny(size: TinySize):
    """A tiny Mistral config whose window is shorter than a test prompt."""
    from transformers import MistralConfig

    return MistralConfig(**size.common(), sliding_window=4)  # shorter than a test prompt


FAMILY = Family("Mistral", "MistralForCausalLM", "mistral", tiny)
