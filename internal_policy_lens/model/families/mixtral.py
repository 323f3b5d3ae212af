"""Mixtral: a sparse mixture of experts in place of the MLP."""

from __future__ import annotations

from .base import MOE, TINY_EXPERTS, Family, TinySize


def tiny(size: TinySize):
    """A tiny Mixtral config: four experts, two per token, no window."""
    from transformers import MixtralConfig

    return MixtralConfig(**size.common(), num_local_experts=4, sliding_window=None, **TINY_EXPERTS)


FAMILY = Family("Mixtral", "MixtralForCausalLM", "mixtral", tiny, mlp_out=MOE)
