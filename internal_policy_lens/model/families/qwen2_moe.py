"""Qwen2-MoE: routed experts plus a gated shared expert, dense MLPs in some layers."""

from __future__ import annotations

from .base import MOE, TINY_EXPERTS, Family, TinySize


def tiny(size: TinySize):
    """A tiny Qwen2-MoE config: four experts, a shared expert, a dense layer 1."""
    from transformers import Qwen2MoeConfig

    return Qwen2MoeConfig(
        **size.common(),
        num_experts=4,
        moe_intermediate_size=size.d_mlp // 2,
        shared_expert_intermediate_size=size.d_mlp,
        mlp_only_layers=[1],
        **TINY_EXPERTS,
    )


FAMILY = Family(
    "Qwen2-MoE", "Qwen2MoeForCausalLM", "qwen2_moe", tiny, mlp_out=MOE + " + gated shared expert"
)
