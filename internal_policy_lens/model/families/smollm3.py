"""SmolLM3: the Llama layout with some layers without rotary embeddings."""

from __future__ import annotations

from .base import Family, TinySize


def tiny(size: TinySize):
    """A tiny SmolLM3 config: every other layer without rotary."""
    from transformers import SmolLM3Config

    return SmolLM3Config(**size.common(), no_rope_layer_interval=2)


FAMILY = Family("SmolLM3", "SmolLM3ForCausalLM", "smollm3", tiny)
