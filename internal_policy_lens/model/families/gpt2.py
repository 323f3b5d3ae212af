"""GPT-2: LayerNorm with biases, learned positions, unembedding tied to the embedding."""

from __future__ import annotations

from .base import Family, TinySize


def tiny(size: TinySize):
    """A tiny GPT-2 config (its own argument names), without dropout."""
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=size.vocab_size,
        n_embd=size.d_model,
        n_layer=size.n_layers,
        n_head=size.n_heads,
        n_inner=size.d_mlp,
        n_positions=2048,
        tie_word_embeddings=size.tie_embeddings,
        initializer_range=size.init_scale,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        pad_token_id=size.pad_id,
        eos_token_id=size.eos_id,
        bos_token_id=size.eos_id,
    )


FAMILY = Family(
    "GPT-2",
    "GPT2LMHeadModel",
    "gpt2",
    tiny,
    attn_out="attn output (after c_proj)",
    mlp_out="MLP output (after c_proj)",
    lens="raw: x W_U^T (tied to the embedding); norm: final LayerNorm (with bias) first",
    layers_attr="h",
    norm_attr="ln_f",
)
