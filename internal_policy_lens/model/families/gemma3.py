"""Gemma 3 (text): Gemma 2's block; the bridge soft-caps attention where transformers does not."""

from __future__ import annotations

from .base import Family, TinySize
from .gemma2 import GEMMA_LENS, POST_NORM_ATTN, POST_NORM_MLP, tiny_features


def tiny(size: TinySize):
    """A tiny Gemma 3 (text) config with Gemma 2's tiny features."""
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(**size.common(), **tiny_features(size))


def clear_attention_softcap(hf_model) -> None:
    """Clear ``attn_logit_softcapping``, which transformers stores but never applies.

    Gemma 3 in transformers keeps the attribute on each attention module without using it; the
    bridge's attention reads it and soft-caps the scores, so a config that sets it gave
    different logits (0.49 apart on a 4-token prompt of a tiny model). Under sdpa the bridge's
    attention does not run; this matters where eager attention is asked for.
    """
    for module in hf_model.modules():
        if hasattr(module, "attn_logit_softcapping"):
            module.attn_logit_softcapping = None


FAMILY = Family(
    "Gemma 3 (text)",
    "Gemma3ForCausalLM",
    "gemma3",
    tiny,
    attn_out=POST_NORM_ATTN,
    mlp_out=POST_NORM_MLP,
    lens=GEMMA_LENS,
    prepare=clear_attention_softcap,
)
