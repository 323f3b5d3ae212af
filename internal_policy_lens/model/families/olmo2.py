"""OLMo 2: norms after each branch only, so the branches read the residual itself."""

from __future__ import annotations

from .base import Family, TinySize, taps

POST_NORM_SITES = taps(  # the bridge has no hook point past these norms
    "model.layers",
    attn_in=("self_attn", "in"),
    attn_out=("post_attention_layernorm", "out"),
    resid_mid=("mlp", "in"),
    mlp_in=("mlp", "in"),
    mlp_out=("post_feedforward_layernorm", "out"),
)


def tiny(size: TinySize):
    """A tiny OLMo 2 config: the shared arguments only."""
    from transformers import Olmo2Config

    return Olmo2Config(**size.common())


FAMILY = Family(
    "OLMo 2",
    "Olmo2ForCausalLM",
    "olmo2",
    tiny,
    attn_out="post_attention_layernorm output",
    mlp_out="post_feedforward_layernorm output",
    sites=POST_NORM_SITES,
)
