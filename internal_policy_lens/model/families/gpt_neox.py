"""GPT-NeoX / Pythia: parallel attention and MLP (no ``resid_mid``), partial rotary."""

from __future__ import annotations

from .base import Family, TinySize


def tiny(size: TinySize):
    """A tiny GPT-NeoX config: parallel block, a quarter of each head rotated."""
    from transformers import GPTNeoXConfig

    common = size.common()
    del common["num_key_value_heads"], common["rms_norm_eps"]  # LayerNorm, one key per head
    return GPTNeoXConfig(**common, use_parallel_residual=True, rotary_pct=0.25)


FAMILY = Family(
    "GPT-NeoX / Pythia",
    "GPTNeoXForCausalLM",
    "gpt_neox",
    tiny,
    attn_out="attention output (after dense)",
    mlp_out="MLP output (after dense_4h_to_h); parallel: no resid_mid",
    lens="raw: x W_U^T (embed_out); norm: final LayerNorm (with bias) first",
    parallel_attr="use_parallel_residual",
    norm_attr="final_layer_norm",
)
