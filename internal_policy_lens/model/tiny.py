"""Tiny models built from real architecture configs, with a character-level tokenizer.

They load through exactly the same path as a real checkpoint (a folder saved by transformers), so
the test suite and the quick demo need no download.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch

from ..bundled import TINY_ARCHITECTURES

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Families whose tiny models keep the norms at their initial weights (the bundled models and the
# original tests were built that way); every other family gets random norm weights, so that a
# (1 + w) RMSNorm or a LayerNorm bias is exercised.
_PLAIN_NORMS = ("qwen2", "qwen3", "llama")
SPECIAL_TOKENS = ("<|pad|>", "<|unk|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>")
ARCHITECTURES = TINY_ARCHITECTURES


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
    """A transformers config of ``arch`` (one of :data:`ARCHITECTURES`) at a tiny size.

    Each family's distinctive features are switched on: sliding windows shorter than a prompt
    (Mistral, Gemma), mixtures of experts with a dense layer and a shared expert (Qwen2-MoE),
    attention and final logit soft-capping (Gemma), embedding, residual and logit multipliers
    (Granite), parallel attention and MLP with partial rotary (GPT-NeoX), layers without rotary
    (SmolLM3), latent attention with grouped routing and a dense first layer (DeepSeek-V3),
    attention sinks and experts with biases (GPT-OSS).
    """
    import transformers

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
    if arch == "deepseek_v3":  # latent attention: every head has its own key and value
        common["num_key_value_heads"] = n_heads
    head_dim = d_model // n_heads
    experts = dict(num_experts_per_tok=2, router_jitter_noise=0.0)
    windows = [("sliding_attention", "full_attention")[i % 2] for i in range(n_layers)]
    gemma = dict(
        head_dim=head_dim,
        query_pre_attn_scalar=head_dim,
        sliding_window=4,
        final_logit_softcapping=5.0,
        layer_types=windows,
    )
    extras = {
        "qwen2": ("Qwen2Config", {}),
        "qwen3": ("Qwen3Config", dict(head_dim=head_dim)),
        "llama": ("LlamaConfig", {}),
        "mistral": ("MistralConfig", dict(sliding_window=4)),
        "mixtral": ("MixtralConfig", dict(num_local_experts=4, sliding_window=None, **experts)),
        "qwen2_moe": (
            "Qwen2MoeConfig",
            dict(
                num_experts=4,
                moe_intermediate_size=d_mlp // 2,
                shared_expert_intermediate_size=d_mlp,
                mlp_only_layers=[1],
                **experts,
            ),
        ),
        "qwen3_moe": (
            "Qwen3MoeConfig",
            dict(num_experts=4, moe_intermediate_size=d_mlp // 2, head_dim=head_dim, **experts),
        ),
        "gemma2": ("Gemma2Config", dict(attn_logit_softcapping=3.0, **gemma)),
        "gemma3": ("Gemma3TextConfig", dict(attn_logit_softcapping=3.0, **gemma)),
        "olmo2": ("Olmo2Config", {}),
        "phi3": ("Phi3Config", {}),
        "granite": (
            "GraniteConfig",
            dict(
                embedding_multiplier=3.0,
                residual_multiplier=0.5,
                logits_scaling=2.0,
                attention_multiplier=1.0 / head_dim,
            ),
        ),
        "olmo3": ("Olmo3Config", dict(sliding_window=4, layer_types=windows)),
        "smollm3": ("SmolLM3Config", dict(no_rope_layer_interval=2)),
        "deepseek_v3": (
            "DeepseekV3Config",
            dict(
                n_routed_experts=4,
                n_shared_experts=1,
                moe_intermediate_size=d_mlp // 2,
                first_k_dense_replace=1,
                n_group=2,
                topk_group=1,
                num_experts_per_tok=2,
                kv_lora_rank=16,
                q_lora_rank=24,
                qk_rope_head_dim=4,
                qk_nope_head_dim=8,
                v_head_dim=head_dim,
                head_dim=4,
            ),
        ),
        "gpt_oss": (
            "GptOssConfig",
            dict(
                num_local_experts=4,
                num_experts_per_tok=2,
                head_dim=head_dim,
                sliding_window=4,
                layer_types=windows,
            ),
        ),
    }
    if arch == "gpt2":
        return transformers.GPT2Config(
            vocab_size=vocab_size,
            n_embd=d_model,
            n_layer=n_layers,
            n_head=n_heads,
            n_inner=d_mlp,
            n_positions=2048,
            tie_word_embeddings=tie_embeddings,
            initializer_range=init_scale,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            pad_token_id=common["pad_token_id"],
            eos_token_id=common["eos_token_id"],
            bos_token_id=common["eos_token_id"],
        )
    if arch == "gpt_neox":
        neox = {k: v for k, v in common.items() if k not in ("num_key_value_heads", "rms_norm_eps")}
        return transformers.GPTNeoXConfig(use_parallel_residual=True, rotary_pct=0.25, **neox)
    if arch not in extras:
        raise ValueError(f"unknown architecture '{arch}'; choose one of {', '.join(ARCHITECTURES)}")
    name, extra = extras[arch]
    return getattr(transformers, name)(**common, **extra)


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
        if arch not in _PLAIN_NORMS:
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


def tiny_class(arch: str) -> str:
    """The transformers class of ``arch``'s tiny model (its family's ``hf_class``)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[tiny_config(arch, vocab_size=64).model_type]
