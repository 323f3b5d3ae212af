"""Granite: embedding, residual, attention and logit multipliers."""

from __future__ import annotations

from .base import Family, TinySize, taps


def tiny(size: TinySize):
    """A tiny Granite config with every multiplier away from 1."""
    from transformers import GraniteConfig

    return GraniteConfig(
        **size.common(),
        embedding_multiplier=3.0,
        residual_multiplier=0.5,
        logits_scaling=2.0,
        attention_multiplier=1.0 / size.head_dim,
    )


FAMILY = Family(
    "Granite",
    "GraniteForCausalLM",
    "granite",
    tiny,
    attn_out="self_attn output x residual_multiplier",
    mlp_out="MLP output x residual_multiplier",
    lens="raw: x W_U^T / logits_scaling; norm: final RMSNorm first",
    sites=taps(  # each branch is scaled before the residual add, past the bridge's hook points
        "model.layers",
        attn_out=("self_attn", "out", "residual_multiplier"),
        resid_mid=("post_attention_layernorm", "in"),
        mlp_out=("mlp", "out", "residual_multiplier"),
    ),
)
