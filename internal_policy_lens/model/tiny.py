"""Tiny models built from real architecture configs, with a character-level tokenizer.

They load through exactly the same path as a real checkpoint (a folder saved by transformers), so
the test suite and the quick demo need no download.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch

from .families import TinySize, family_of_arch

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ("<|pad|>", "<|unk|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>")


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


def tiny_config(arch: str, *, vocab_size: int, **sizes):
    """A transformers config of ``arch`` (an ``ipl make-tiny --arch`` name) at a tiny size.

    ``sizes`` overrides :class:`~internal_policy_lens.model.families.TinySize`'s. Each family's
    distinctive features are switched on (its module in :mod:`internal_policy_lens.model.families`
    says which): sliding windows shorter than a prompt, mixtures of experts, soft-capping,
    multipliers, parallel blocks, latent attention, attention sinks.

    Raises:
        ValueError: for an unknown ``arch``.
    """
    family = family_of_arch(arch)
    eos = SPECIAL_TOKENS.index("<|im_end|>")
    return family.tiny(TinySize(vocab_size=vocab_size, pad_id=0, eos_id=eos, **sizes))


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
        if family_of_arch(arch).tiny_random_norms:
            _perturb_norms(model, init_scale=cfg.initializer_range)
    folder = Path(folder)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _perturb_norms(model, *, init_scale: float) -> None:
    """Add noise to every norm's weight (and bias): the initial ones hide (1 + w) vs w."""
    for name, param in model.named_parameters():
        module = name.rsplit(".", 1)[0]
        if "norm" in module or module.rsplit(".", 1)[-1].startswith(("ln", "ln_")):
            param.add_(torch.randn_like(param) * 3 * init_scale)
