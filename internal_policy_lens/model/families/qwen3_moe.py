"""Qwen3-MoE: Qwen3's attention with a sparse mixture of experts."""

from __future__ import annotations

from .base import MOE, TINY_EXPERTS, Family, TinySize


def tiny(size: TinySize):
    """A tiny Qwen3-MoE config: four experts, two per token."""
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        **size.common(),
        num_experts=4,
        moe_intermediate_size=size.d_mlp // 2,
        head_dim=size.head_dim,
        **TINY_EXPERTS,
    )


FAMILY = Family("Qwen3-MoE", "Qwen3MoeForCausalLM", "qwen3_moe", tiny, mlp_out=MOE)
