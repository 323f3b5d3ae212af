"""What a family entry is: where each site is read, what the head does, how its tiny model looks.

Every entry says where each site of :data:`~internal_policy_lens.lens.sites.SITES` is read, what
the output head does to the logits, and what was found about the family in transformers and in
transformer-lens's TransformerBridge. The definitions are the same for every family (SPEC §2b):

- ``resid_pre`` / ``resid_post``: the decoder layer's input / output;
- ``attn_out`` / ``mlp_out``: exactly what each branch *adds* to the residual stream, after any
  post-branch norm (Gemma 2/3, OLMo 2/3) or multiplier (Granite), so ``resid_post = resid_pre +
  attn_out + mlp_out``; for a mixture of experts ``mlp_out`` is the whole block's output;
- ``attn_in`` / ``mlp_in``: what each branch reads (the input its attention / MLP module receives);
- ``resid_mid = resid_pre + attn_out`` in a sequential block; a parallel block (GPT-NeoX with
  ``use_parallel_residual``) has none and its rows are absent.

A site is read from a TransformerBridge hook point (:data:`BRIDGE_HOOKS`; for Gemma 2/3 the bridge
points ``hook_attn_out`` / ``hook_mlp_out`` / ``hook_resid_mid`` past the post-norms itself) or,
where the bridge has no hook point carrying that vector (OLMo 2/3, Granite), from a forward hook
on the module of the wrapped Hugging Face model (a :class:`Tap`).
:func:`~internal_policy_lens.lens.capture.capture` registers both kinds.

Nothing here imports torch or transformers: the command line lists the families at start-up.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

BRIDGE_HOOKS: dict[str, str] = {
    "resid_pre": "blocks.{layer}.hook_resid_pre",
    "attn_in": "blocks.{layer}.ln1.hook_out",
    "attn_out": "blocks.{layer}.hook_attn_out",
    "resid_mid": "blocks.{layer}.hook_resid_mid",
    "mlp_in": "blocks.{layer}.ln2.hook_out",
    "mlp_out": "blocks.{layer}.hook_mlp_out",
    "resid_post": "blocks.{layer}.hook_resid_post",
    "final": "ln_final.hook_out",
}
"""The TransformerBridge hook point of each site in a pre-norm sequential block (Llama layout)."""

MOE = "the whole sparse MoE block: router-weighted experts"
"""What ``mlp_out`` is in a mixture-of-experts family (each adds its shared experts)."""
TINY_EXPERTS = dict(num_experts_per_tok=2, router_jitter_noise=0.0)
"""Routing of the tiny mixture-of-experts models: two experts per token, no noise."""


@dataclass(frozen=True)
class Tap:
    """A site read by a forward hook on a module of the wrapped Hugging Face model.

    Attributes:
        module: the module's path in the HF model, with ``{layer}`` for the layer index.
        where: ``"in"`` (the module's first input) or ``"out"`` (its first output).
        scale: a config attribute the vector is multiplied by (Granite's
            ``residual_multiplier``: the branch output is scaled before the residual add).
    """

    module: str
    where: str = "out"
    scale: str | None = None


def taps(prefix: str, **sites: tuple) -> dict[str, Tap]:
    """``site=(module, where[, scale])`` as :class:`Tap` s on ``{prefix}.{layer}.{module}``."""
    return {site: Tap(f"{prefix}.{{layer}}.{spec[0]}", *spec[1:]) for site, spec in sites.items()}


@dataclass(frozen=True)
class TinySize:
    """The sizes of a tiny random model (``ipl make-tiny``, the tests, the bundled models).

    Hidden and vocabulary sizes need not be powers of two; ``pad_id`` / ``eos_id`` are the
    character tokenizer's (:mod:`internal_policy_lens.model.tiny`).
    """

    vocab_size: int
    pad_id: int
    eos_id: int
    n_layers: int = 4
    d_model: int = 72
    n_heads: int = 6
    n_kv_heads: int = 2
    d_mlp: int = 120
    tie_embeddings: bool = False
    init_scale: float = 0.1

    @property
    def head_dim(self) -> int:
        """Each attention head's size."""
        return self.d_model // self.n_heads

    @property
    def windows(self) -> list[str]:
        """Layer types alternating sliding and full attention, sliding first."""
        return [("sliding_attention", "full_attention")[i % 2] for i in range(self.n_layers)]

    def common(self) -> dict[str, Any]:
        """The config arguments a Llama-shaped family shares (the family adds its features)."""
        return dict(
            vocab_size=self.vocab_size,
            hidden_size=self.d_model,
            intermediate_size=self.d_mlp,
            num_hidden_layers=self.n_layers,
            num_attention_heads=self.n_heads,
            num_key_value_heads=self.n_kv_heads,
            max_position_embeddings=2048,
            tie_word_embeddings=self.tie_embeddings,
            initializer_range=self.init_scale,
            rms_norm_eps=1e-6,
            pad_token_id=self.pad_id,
            eos_token_id=self.eos_id,
            bos_token_id=None,
        )


@dataclass(frozen=True)
class Family:
    """One supported architecture.

    Attributes:
        name: the family as researchers call it.
        hf_class: the transformers class (``config.architectures[0]``).
        arch: its ``ipl make-tiny --arch`` name (also the name of its module in this package).
        tiny: a transformers config of a tiny model of the family, each distinctive feature
            switched on, from a :class:`TinySize`.
        sites: where a site is read when not from :data:`BRIDGE_HOOKS` (hook name or :class:`Tap`).
        attn_out, mlp_out, lens: what the sites and the lenses are, for the README and ``ipl
            models``.
        parallel_attr: config attribute that switches the block to parallel (GPT-NeoX).
        layers_attr, norm_attr: the decoder's layer list and final norm (``get_decoder()``'s
            attributes), which the TRL integration trims for pi^k.
        tiny_random_norms: whether a tiny model gets random norm weights (and biases), so that a
            (1 + w) RMSNorm or a LayerNorm bias is exercised; Qwen2, Qwen3 and Llama keep the
            initial ones (the bundled models and the first tests were built that way).
        prepare: what the bridged HF model needs to compute what plain transformers computes.
        eager_attention: why the family's attention runs eager (what torch's
            ``scaled_dot_product_attention`` cannot compute); ``None`` where sdpa computes the
            same, and the decoder runs it (:mod:`~internal_policy_lens.model.attention`).
    """

    name: str
    hf_class: str
    arch: str
    tiny: Callable[[TinySize], Any]
    attn_out: str = "self_attn output (after o_proj)"
    mlp_out: str = "MLP output (after down_proj)"
    lens: str = "raw: x W_U^T; norm: final RMSNorm first"
    sites: dict[str, str | Tap] = field(default_factory=dict)
    parallel_attr: str | None = None
    layers_attr: str = "layers"
    norm_attr: str = "norm"
    tiny_random_norms: bool = True
    prepare: Callable[[Any], None] | None = None
    eager_attention: str | None = None

    def source(self, site: str, layer: int, config) -> str | Tap | None:
        """Where ``site`` of ``layer`` is read; ``None`` where the block has no such vector."""
        if site == "resid_mid" and self.is_parallel(config):
            return None
        where = self.sites.get(site, BRIDGE_HOOKS[site])
        if isinstance(where, Tap):
            return Tap(where.module.format(layer=layer), where.where, where.scale)
        return where.format(layer=layer)

    def is_parallel(self, config) -> bool:
        """Whether attention and MLP both read the layer input in this model."""
        return bool(self.parallel_attr and getattr(config, self.parallel_attr, False))
