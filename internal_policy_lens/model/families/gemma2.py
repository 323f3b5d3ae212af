"""Gemma 2: norms before and after each branch, (1 + w) RMSNorm, soft-capped logits."""

from __future__ import annotations

from .base import Family, TinySize

POST_NORM_ATTN = "post_attention_layernorm output"
POST_NORM_MLP = "post_feedforward_layernorm output"
GEMMA_LENS = (
    "raw: softcap(x W_U^T); norm: final (1 + w) RMSNorm first. softcap(z) = c tanh(z / c), "
    "c = final_logit_softcapping"
)


def tiny_features(size: TinySize) -> dict:
    """Gemma 2/3's tiny features: soft-capping, windows shorter than a prompt, explicit heads."""
    return dict(
        head_dim=size.head_dim,
        query_pre_attn_scalar=size.head_dim,
        sliding_window=4,
        attn_logit_softcapping=3.0,
        final_logit_softcapping=5.0,
        layer_types=size.windows,
    )


def tiny(size: TinySize):
    """A tiny Gemma 2 config with soft-capping and short windows on."""
    from transformers import Gemma2Config

    return Gemma2Config(**size.common(), **tiny_features(size))


FAMILY = Family(
    "Gemma 2",
    "Gemma2ForCausalLM",
    "gemma2",
    tiny,
    attn_out=POST_NORM_ATTN,
    mlp_out=POST_NORM_MLP,
    lens=GEMMA_LENS,
    eager_attention=(
        "attention logit soft-capping (c tanh(scores / c) before the softmax, "
        "c = attn_logit_softcapping), which sdpa cannot apply"
    ),
)
