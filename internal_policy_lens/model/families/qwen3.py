"""Qwen3: RMSNorm on the queries and keys (the Llama layout)."""

from __future__ import annotations

from .base import Family, TinySize


def tiny(size: TinySize):
    """A tiny Qwen3 config with an explicit head size."""
    from transformers import Qwen3Config

    return Qwen3Config(**size.common(), head_dim=size.head_dim)


FAMILY = Family("Qwen3", "Qwen3ForCausalLM", "qwen3", tiny, tiny_random_norms=False)
