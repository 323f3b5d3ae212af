"""GPT-OSS: attention sinks, sliding-window layers, experts with biases."""

from __future__ import annotations

from .base import MOE, Family, TinySize


def tiny(size: TinySize):
    """A tiny GPT-OSS config: four experts, attention sinks, alternating windows."""
    from transformers import GptOssConfig

    return GptOssConfig(
        **size.common(),
        num_local_experts=4,
        num_experts_per_tok=2,
        head_dim=size.head_dim,
        sliding_window=4,
        layer_types=size.windows,
    )


FAMILY = Family(
    "GPT-OSS",
    "GptOssForCausalLM",
    "gpt_oss",
    tiny,
    attn_out="self_attn output (o_proj; attention sinks)",
    mlp_out=MOE + " (experts with biases)",
    eager_attention=(
        "attention sinks (a learned logit per head that joins each softmax's denominator), "
        "which sdpa cannot add"
    ),
)
