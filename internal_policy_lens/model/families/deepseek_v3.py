"""DeepSeek-V3: multi-head latent attention, grouped routing, shared experts, dense first layers."""

from __future__ import annotations

from .base import MOE, Family, TinySize


def tiny(size: TinySize):
    """A tiny DeepSeek-V3 config: latent attention, grouped routing, a dense layer 0."""
    from transformers import DeepseekV3Config

    common = size.common()
    common["num_key_value_heads"] = size.n_heads  # latent attention: a key and value per head
    return DeepseekV3Config(
        **common,
        n_routed_experts=4,
        n_shared_experts=1,
        moe_intermediate_size=size.d_mlp // 2,
        first_k_dense_replace=1,
        n_group=2,
        topk_group=1,
        num_experts_per_tok=2,
        kv_lora_rank=16,
        q_lora_rank=24,
        qk_rope_head_dim=4,
        qk_nope_head_dim=8,
        v_head_dim=size.head_dim,
        head_dim=4,
    )


FAMILY = Family(
    "DeepSeek-V3",
    "DeepseekV3ForCausalLM",
    "deepseek_v3",
    tiny,
    attn_out="multi-head latent attention output (o_proj)",
    mlp_out=MOE + " + shared experts (dense MLP in the first_k_dense_replace layers)",
)
