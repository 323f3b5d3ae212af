"""Llama 2 / 3: the pre-norm sequential block every bridge hook point is named after."""

from __future__ import annotations

from .base import Family, TinySize


def tiny(size: TinySize):
    """A tiny Llama config: the shared arguments only."""
    from transformers import LlamaConfig

    return LlamaConfig(**size.common())


FAMILY = Family("Llama 2 / 3", "LlamaForCausalLM", "llama", tiny, tiny_random_norms=False)
