"""What the toolkit knows about each supported model family: one small entry per architecture.

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
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

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


@dataclass(frozen=True)
class Family:
    """One supported architecture.

    Attributes:
        name: the family as researchers call it.
        hf_class: the transformers class (``config.architectures[0]``).
        sites: where a site is read when not from :data:`BRIDGE_HOOKS` (hook name or :class:`Tap`).
        attn_out, mlp_out, lens: what the sites and the lenses are, for the README and ``ipl
            models``.
        parallel_attr: config attribute that switches the block to parallel (GPT-NeoX).
        layers_attr, norm_attr: the decoder's layer list and final norm (``get_decoder()``'s
            attributes), which the TRL integration trims for pi^k.
    """

    name: str
    hf_class: str
    attn_out: str = "self_attn output (after o_proj)"
    mlp_out: str = "MLP output (after down_proj)"
    lens: str = "raw: x W_U^T; norm: final RMSNorm first"
    sites: dict[str, str | Tap] = field(default_factory=dict)
    parallel_attr: str | None = None
    layers_attr: str = "layers"
    norm_attr: str = "norm"

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


def _taps(prefix: str, **sites: tuple) -> dict[str, Tap]:
    return {site: Tap(f"{prefix}.{{layer}}.{spec[0]}", *spec[1:]) for site, spec in sites.items()}


_NORMS_AFTER = _taps(  # OLMo 2/3: norms after each branch only; the branches read the residual
    "model.layers",
    attn_in=("self_attn", "in"),
    attn_out=("post_attention_layernorm", "out"),
    resid_mid=("mlp", "in"),
    mlp_in=("mlp", "in"),
    mlp_out=("post_feedforward_layernorm", "out"),
)
_GEMMA_LENS = (
    "raw: softcap(x W_U^T); norm: final (1 + w) RMSNorm first. softcap(z) = c tanh(z / c), "
    "c = final_logit_softcapping"
)
_MOE = "the whole sparse MoE block: router-weighted experts"

FAMILIES: tuple[Family, ...] = (
    Family("Qwen2 / Qwen2.5", "Qwen2ForCausalLM"),
    Family("Qwen3", "Qwen3ForCausalLM"),
    Family("Llama 2 / 3", "LlamaForCausalLM"),
    Family("Mistral", "MistralForCausalLM"),
    Family("Mixtral", "MixtralForCausalLM", mlp_out=_MOE),
    Family("Qwen2-MoE", "Qwen2MoeForCausalLM", mlp_out=_MOE + " + gated shared expert"),
    Family("Qwen3-MoE", "Qwen3MoeForCausalLM", mlp_out=_MOE),
    Family(
        "Gemma 2",
        "Gemma2ForCausalLM",
        attn_out="post_attention_layernorm output",
        mlp_out="post_feedforward_layernorm output",
        lens=_GEMMA_LENS,
    ),
    Family(
        "Gemma 3 (text)",
        "Gemma3ForCausalLM",
        attn_out="post_attention_layernorm output",
        mlp_out="post_feedforward_layernorm output",
        lens=_GEMMA_LENS,
    ),
    Family(
        "OLMo 2",
        "Olmo2ForCausalLM",
        attn_out="post_attention_layernorm output",
        mlp_out="post_feedforward_layernorm output",
        sites=_NORMS_AFTER,
    ),
    Family(
        "OLMo 3",
        "Olmo3ForCausalLM",
        attn_out="post_attention_layernorm output",
        mlp_out="post_feedforward_layernorm output",
        sites=_NORMS_AFTER,
    ),
    Family("SmolLM3", "SmolLM3ForCausalLM"),
    Family(
        "DeepSeek-V3",
        "DeepseekV3ForCausalLM",
        attn_out="multi-head latent attention output (o_proj)",
        mlp_out=_MOE + " + shared experts (dense MLP in the first_k_dense_replace layers)",
    ),
    Family(
        "GPT-OSS",
        "GptOssForCausalLM",
        attn_out="self_attn output (o_proj; attention sinks)",
        mlp_out=_MOE + " (experts with biases)",
    ),
    Family("Phi-3", "Phi3ForCausalLM", mlp_out="MLP output (fused gate_up_proj, down_proj)"),
    Family(
        "Granite",
        "GraniteForCausalLM",
        attn_out="self_attn output x residual_multiplier",
        mlp_out="MLP output x residual_multiplier",
        lens="raw: x W_U^T / logits_scaling; norm: final RMSNorm first",
        sites=_taps(
            "model.layers",
            attn_out=("self_attn", "out", "residual_multiplier"),
            resid_mid=("post_attention_layernorm", "in"),
            mlp_out=("mlp", "out", "residual_multiplier"),
        ),
    ),
    Family(
        "GPT-2",
        "GPT2LMHeadModel",
        attn_out="attn output (after c_proj)",
        mlp_out="MLP output (after c_proj)",
        lens="raw: x W_U^T (tied to the embedding); norm: final LayerNorm (with bias) first",
        layers_attr="h",
        norm_attr="ln_f",
    ),
    Family(
        "GPT-NeoX / Pythia",
        "GPTNeoXForCausalLM",
        attn_out="attention output (after dense)",
        mlp_out="MLP output (after dense_4h_to_h); parallel: no resid_mid",
        lens="raw: x W_U^T (embed_out); norm: final LayerNorm (with bias) first",
        parallel_attr="use_parallel_residual",
        norm_attr="final_layer_norm",
    ),
)
"""Every supported family, in the order ``ipl models`` lists them."""

SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(f.hf_class for f in FAMILIES)
_BY_CLASS = {f.hf_class: f for f in FAMILIES}


def family_of(architecture: str) -> Family:
    """The :class:`Family` of a transformers class name.

    Raises:
        KeyError: for an unsupported class.
    """
    return _BY_CLASS[architecture]


def head_transform(config, logits: torch.Tensor, *, inplace: bool = False) -> torch.Tensor:
    """The model's own output head transformation of its logits ``[..., vocab]``.

    Granite divides by ``logits_scaling``; Gemma 2/3 soft-cap with ``final_logit_softcapping``
    (``c * tanh(z / c)``); every other family leaves the logits as they are. ``inplace``
    overwrites ``logits`` (for a buffer without gradients).
    """
    scale = getattr(config, "logits_scaling", None)
    cap = getattr(config, "final_logit_softcapping", None)
    if scale not in (None, 1, 1.0):
        logits = logits.div_(scale) if inplace else logits / scale
    if cap is not None:
        logits = logits.div_(cap).tanh_().mul_(cap) if inplace else torch.tanh(logits / cap) * cap
    return logits


def has_head_transform(config) -> bool:
    """Whether :func:`head_transform` changes the logits of this model."""
    scale = getattr(config, "logits_scaling", None)
    return (
        scale not in (None, 1, 1.0) or getattr(config, "final_logit_softcapping", None) is not None
    )


def prepare(hf_model: nn.Module) -> None:
    """Make the bridged model compute what plain transformers computes.

    - Gemma 3 in transformers stores ``attn_logit_softcapping`` on each attention module but
      never applies it; the bridge's attention reads the attribute and soft-caps the scores, so a
      config that sets it gave different logits (0.49 apart on a 4-token prompt of a tiny model).
      The attribute is cleared, as transformers effectively has it.
    - Mixture-of-experts layers run their experts with ``grouped_mm``, which has no float64
      kernel: a float64 model uses the eager experts loop.
    """
    if type(hf_model).__name__ == "Gemma3ForCausalLM":
        for module in hf_model.modules():
            if hasattr(module, "attn_logit_softcapping"):
                module.attn_logit_softcapping = None
    dtype = next(hf_model.parameters()).dtype
    if dtype == torch.float64 and hf_model._can_set_experts_implementation():
        hf_model.set_experts_implementation("eager")
