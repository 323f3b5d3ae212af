"""Qwen2 / Qwen2.5: q/k/v biases, RMSNorm, SwiGLU (the Llama layout)."""

from __future__ import annotations

from .base import Family, TinySize


def tiny(size: TinySize):
    """A tiny Qwen2 config: the shared arguments only."""
    from transformers import Qwen2Config

    return Qwen2Config(**size.common())


FAMILY = Family("Qwen2 / Qwen2.5", "Qwen2ForCausalLM", "qwen2", tiny, tiny_random_norms=False)
