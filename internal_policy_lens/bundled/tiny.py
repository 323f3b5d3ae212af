"""Tiny models built from real architecture configs, with a character-level tokenizer.

They load through exactly the same path as a real checkpoint (a folder saved by transformers), so
the test suite and the quick demo need no download.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ("<|pad|>", "<|unk|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>")
ARCHITECTURES = ("qwen2", "qwen3", "llama")


def char_tokenizer():
    """A character-level tokenizer over printable ASCII, with a ChatML template.

    Unknown characters map to ``<|unk|>``; ``<|im_end|>`` ends a turn (the EOS token).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for char in string.printable:
        vocab.setdefault(char, len(vocab))
    core = Tokenizer(models.WordLevel(vocab, unk_token="<|unk|>"))
    core.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<|pad|>",
        unk_token="<|unk|>",
        eos_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>", "<|endoftext|>"],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_config(
    arch: str,
    *,
    vocab_size: int,
    n_layers: int = 4,
    d_model: int = 72,
    n_heads: int = 6,
    n_kv_heads: int = 2,
    d_mlp: int = 120,
    tie_embeddings: bool = False,
    init_scale: float = 0.1,
):
    """A transformers config of the given architecture (``qwen2``, ``qwen3`` or ``llama``)."""
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    common = dict(
        vocab_size=vocab_size,
        hidden_size=d_model,
        intermediate_size=d_mlp,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv_heads,
        max_position_embeddings=2048,
        tie_word_embeddings=tie_embeddings,
        initializer_range=init_scale,
        rms_norm_eps=1e-6,
        pad_token_id=0,
        eos_token_id=SPECIAL_TOKENS.index("<|im_end|>"),
        bos_token_id=None,
    )
    if arch == "qwen2":
        return Qwen2Config(**common)
    if arch == "qwen3":
        return Qwen3Config(head_dim=d_model // n_heads, **common)
    if arch == "llama":
        return LlamaConfig(**common)
    raise ValueError(f"unknown architecture '{arch}'; choose one of {', '.join(ARCHITECTURES)}")


def make_tiny_model(
    arch: str, folder: str | Path, *, seed: int = 0, unembed_scale: float = 3.0, **config
) -> Path:
    """Build a randomly initialised model of ``arch`` and save it with its tokenizer to ``folder``.

    ``config`` overrides :func:`tiny_config`'s sizes. The vocabulary gets a few unused rows so that
    its size (the policy's support) is not a power of two and differs from the tokenizer's. The
    unembedding is scaled by ``unembed_scale`` so that the internal policies' entropies spread well
    below log |V| under both lenses (at the default init they sit near uniform).
    """
    from transformers import AutoModelForCausalLM

    tokenizer = char_tokenizer()
    config.setdefault("vocab_size", len(tokenizer) + 7)
    cfg = tiny_config(arch, **config)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(unembed_scale)
    folder = Path(folder)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
