"""Every supported model family, one module each, assembled into the registry.

A family's module (named after its ``ipl make-tiny --arch`` name) holds its :class:`Family`
entry: where each site is read, what its output head does, its decoder's attribute names for the
TRL integration and its tiny config. Adding a family is one module here and its name in
:data:`_MODULES`; the command line (``ipl models``, ``ipl make-tiny``) and the tests read the
registry. Nothing here imports torch at import time (the command line lists the families).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import (
    deepseek_v3,
    gemma2,
    gemma3,
    gpt2,
    gpt_neox,
    gpt_oss,
    granite,
    llama,
    mistral,
    mixtral,
    olmo2,
    olmo3,
    phi3,
    qwen2,
    qwen2_moe,
    qwen3,
    qwen3_moe,
    smollm3,
)
from .base import BRIDGE_HOOKS, Family, Tap, TinySize

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = [
    "BRIDGE_HOOKS",
    "FAMILIES",
    "SUPPORTED_ARCHITECTURES",
    "TINY_ARCHITECTURES",
    "Family",
    "Tap",
    "TinySize",
    "family_of",
    "family_of_arch",
    "has_head_transform",
    "head_transform",
    "prepare",
]

_MODULES = (
    qwen2,
    qwen3,
    llama,
    mistral,
    mixtral,
    qwen2_moe,
    qwen3_moe,
    gemma2,
    gemma3,
    olmo2,
    olmo3,
    smollm3,
    deepseek_v3,
    gpt_oss,
    phi3,
    granite,
    gpt2,
    gpt_neox,
)

FAMILIES: tuple[Family, ...] = tuple(module.FAMILY for module in _MODULES)
"""Every supported family, in the order ``ipl models`` lists them."""
SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(f.hf_class for f in FAMILIES)
TINY_ARCHITECTURES: tuple[str, ...] = tuple(f.arch for f in FAMILIES)
"""``ipl make-tiny --arch`` names: one per family, in the order of :data:`FAMILIES`."""
_BY_CLASS = {f.hf_class: f for f in FAMILIES}
_BY_ARCH = {f.arch: f for f in FAMILIES}


def family_of(architecture: str) -> Family:
    """The :class:`Family` of a transformers class name.

    Raises:
        KeyError: for an unsupported class.
    """
    return _BY_CLASS[architecture]


def family_of_arch(arch: str) -> Family:
    """The :class:`Family` of an ``ipl make-tiny --arch`` name.

    Raises:
        ValueError: for an unknown name, listing the known ones.
    """
    if arch not in _BY_ARCH:
        raise ValueError(
            f"unknown architecture '{arch}'; choose one of {', '.join(TINY_ARCHITECTURES)}"
        )
    return _BY_ARCH[arch]


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
        logits = logits.div_(cap).tanh_().mul_(cap) if inplace else (logits / cap).tanh() * cap
    return logits


def has_head_transform(config) -> bool:
    """Whether :func:`head_transform` changes the logits of this model."""
    scale = getattr(config, "logits_scaling", None)
    return (
        scale not in (None, 1, 1.0) or getattr(config, "final_logit_softcapping", None) is not None
    )


def prepare(hf_model: nn.Module) -> None:
    """Make the bridged model compute what plain transformers computes.

    Runs the family's own :attr:`Family.prepare` (Gemma 3), and gives a float64 mixture of
    experts the eager experts loop: ``grouped_mm`` has no float64 kernel.
    """
    import torch  # here, not at the top: the registry is read without torch

    family = _BY_CLASS.get(type(hf_model).__name__)
    if family is not None and family.prepare is not None:
        family.prepare(hf_model)
    dtype = next(hf_model.parameters()).dtype
    if dtype == torch.float64 and hf_model._can_set_experts_implementation():
        hf_model.set_experts_implementation("eager")
