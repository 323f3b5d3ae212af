"""OLMo 3: OLMo 2's block with sliding-window layers."""

from __future__ import annotations

from .base import Family, TinySize
from .olmo2 import POST_NORM_SITES


def tiny(size: TinySize):
    """A tiny OLMo 3 config with alternating short windows."""
    from transformers import Olmo3Config

    return Olmo3Config(**size.common(), sliding_window=4, layer_types=size.windows)


FAMILY = Family(
    "OLMo 3",
    "Olmo3ForCausalLM",
    "olmo3",
    tiny,
    attn_out="post_attention_layernorm output",
    mlp_out="post_feedforward_layernorm output",
    sites=POST_NORM_SITES,
)
