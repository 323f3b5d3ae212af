"""The attention the bridged decoder runs: torch's sdpa wherever the family allows it, else eager.

TransformerBridge boots every model with eager attention and puts in place of each attention
module a component that recomputes attention in plain matrix products, so that its score and
pattern hooks fire. Every site of this package is on the residual stream and needs no pattern,
while eager attention holds [batch, heads, pos, pos] scores per layer and runs several times
slower than ``torch.nn.functional.scaled_dot_product_attention`` at thousands of tokens. With
``sdpa`` each attention component runs the wrapped transformers module instead, which calls sdpa
(flash / memory-efficient kernels on CUDA, a fused kernel on the CPU), between the component's
own ``hook_in`` and ``hook_out``: ``hook_attn_out`` and the forward hooks on the HF modules fire
as before, with the same vectors up to float rounding; ``hook_pattern`` and ``hook_attn_scores``
do not fire.

transformer-lens 4.3 has no supported switch for this: its ``attn_implementation`` setting only
chooses how transformers loads the model (the components compute eager whatever the config
says), and ``maintain_native_attention`` is stored but never read. Its generic
``AttentionBridge.forward`` (hook_in, the wrapped module, hook_out) is the delegation needed, so
each attention component gets that forward on the instance. Transformers'
``set_attn_implementation`` then switches the model's mask creation and attention function (all
its modules read one config object) and refuses an architecture whose attention sdpa cannot
compute; :attr:`~internal_policy_lens.model.families.Family.eager_attention` says which and why.
"""

from __future__ import annotations

from types import MethodType

from torch import nn

from .families import Family

ATTENTIONS = ("auto", "eager", "sdpa")
"""What a caller may ask for; ``auto``: sdpa unless the family needs eager."""


def resolve_attention(requested: str, family: Family) -> str:
    """``eager`` or ``sdpa``: what ``requested`` means for a model of ``family``.

    Raises:
        ValueError: for a name not in :data:`ATTENTIONS`, or ``sdpa`` for a family whose
            attention sdpa cannot compute (the message says why).
    """
    if requested not in ATTENTIONS:
        raise ValueError(f"unknown attention '{requested}'; use {', '.join(ATTENTIONS)}")
    if family.eager_attention is None:
        return "eager" if requested == "eager" else "sdpa"
    if requested == "sdpa":
        raise ValueError(
            f"{family.name} runs eager attention only: {family.eager_attention}. "
            "Use attention='auto' or 'eager'."
        )
    return "eager"


def set_attention(bridge: nn.Module, implementation: str) -> None:
    """Run the attention of ``bridge`` as ``eager`` (the bridge's own) or ``sdpa`` (transformers').

    Raises:
        ValueError: where transformers refuses ``implementation`` for the architecture.
    """
    from transformer_lens.model_bridge.generalized_components.attention import AttentionBridge

    hf_model = bridge.original_model
    if implementation == "sdpa":
        # The bridge loads the config with output_attentions=True; sdpa returns no weights, and
        # transformers refuses to save such a config.
        hf_model.config.output_attentions = False
    hf_model.set_attn_implementation(implementation)
    if hf_model.config._attn_implementation != implementation:  # transformers only warned
        raise ValueError(f"{type(hf_model).__name__} cannot switch to {implementation} attention")
    for module in bridge.modules():
        if not isinstance(module, AttentionBridge):
            continue
        # Through vars(): a bridge component's __setattr__ passes ``forward`` on to the HF module.
        if implementation == "sdpa":
            vars(module)["forward"] = MethodType(AttentionBridge.forward, module)
        else:
            vars(module).pop("forward", None)


def attention_of(bridge: nn.Module) -> str:
    """The attention ``bridge`` runs (``eager`` or ``sdpa``), as :func:`set_attention` set it."""
    return bridge.original_model.config._attn_implementation
