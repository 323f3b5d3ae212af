"""Phi-3: the Llama layout with fused projections."""

from __future__ import annotations

from .base import Family, TinySize


def tiny(size: TinySize):
    """A tiny Phi-3 config: the shared arguments only."""
    from transformers import Phi3Config

    return Phi3Config(**size.common())


FAMILY = Family(
    "Phi-3", "Phi3ForCausalLM", "phi3", tiny, mlp_out="MLP output (fused gate_up_proj, down_proj)"
)
