"""The lens kinds, one class each, and their registry: how a site vector is read as a policy.

A kind says what the unembedding reads for a site vector (:meth:`LensKind.inputs`), whether it
is made of the model's own weights only (BuPO can train through it) or reads translators from a
lens folder, which sites it can read (:meth:`LensKind.check`), what ``run.json`` records of it,
and, where BuPO trains through it, its form as a torch module (:meth:`LensKind.module`, what the
TRL trainer puts between layer k and the LM head). What follows is the same for every kind and
is :class:`~internal_policy_lens.lens.unembed.Lens`'s: the cast to the products' dtype, the
unembedding, the model's own head transformation and the temperature. The ``final`` site is the
final norm's output already: every kind reads it as it is.

A new lens is one subclass of :class:`LensKind` decorated with :func:`register`; the configs,
the command line, ``Lens``, the tables, the plots, the report and the TRL trainer then know it.
Nothing here imports torch at import time (the configs and the command line read the names and
descriptions); the methods that compute receive tensors and modules.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, ClassVar, Protocol

if TYPE_CHECKING:
    from torch import Tensor, nn


class Lens(Protocol):
    """What a kind reads of the :class:`~internal_policy_lens.lens.unembed.Lens` it serves."""

    norm: Callable[[Tensor], Tensor]
    """The model's final norm."""
    translators: dict[tuple[str, int], tuple[Tensor, Tensor]]
    """The translators ``(A, b)`` by (site, layer), for a kind that reads a lens folder."""

    def translator(self, site: str, layer: int | None) -> tuple[Tensor, Tensor] | None:
        """The translator reading ``site`` at ``layer`` (None where there is none)."""

LENSES: dict[str, type[LensKind]] = {}
"""The registered lens kinds by name, in registration order (raw, norm, tuned, then any other)."""


class LensKind:
    """One way of reading a site vector as a policy; subclass it and :func:`register` the class."""

    name: ClassVar[str]
    """What ``--lens``, the tables and ``run.json`` call it."""
    description: ClassVar[str]
    """One line for ``--help`` and the README."""
    model_only: ClassVar[bool] = True
    """Made of the model's own weights only: BuPO can train the internal policy through it."""
    needs_folder: ClassVar[bool] = False
    """Reads translators from a lens folder (``--lens-path``; a bundled model ships one)."""
    note: ClassVar[str | None] = None
    """What the run report says beside the extras' charts of a run under this lens."""

    def inputs(self, lens: Lens, x: Tensor, site: str, layer: int | None) -> Tensor:
        """What the unembedding reads for ``x`` ``[..., d_model]`` of ``site`` (never ``final``).

        ``lens`` gives the model's final norm (``lens.norm``) and translators
        (``lens.translator``); the result may be in any dtype, ``Lens`` casts it.
        """
        raise NotImplementedError

    def check(self, lens: Lens, keys: Iterable[tuple[str, int]]) -> None:
        """Raise ValueError naming the first (site, layer) of ``keys`` this lens cannot read."""

    def record(self, lens: Lens) -> dict:
        """What ``run.json`` records of the lens (its folder and the folder's hash are added)."""
        return {"name": self.name}

    def module(self, norm: nn.Module) -> nn.Module:
        """What replaces the final norm ``norm`` in a forward pass that computes :meth:`inputs`.

        The TRL trainer's pi^k: the decoder stops after layer k and this module feeds the LM
        head. Only a kind made of the model's own weights has one (see :func:`model_lens`).
        """
        raise NotImplementedError(f"lens '{self.name}' has no module form")

    def __str__(self) -> str:
        return self.name


def register(kind: type[LensKind]) -> type[LensKind]:
    """Add ``kind`` to :data:`LENSES` under its name (a class decorator); return it.

    Raises:
        ValueError: where another class holds the name already.
    """
    held = LENSES.get(kind.name)
    if held is not None and held is not kind:
        raise ValueError(f"the lens name '{kind.name}' is taken by {held.__qualname__}")
    LENSES[kind.name] = kind
    return kind


def lens_kind(lens: str | LensKind | type[LensKind]) -> LensKind:
    """The kind of ``lens``: a registered name, a :class:`LensKind` subclass or an instance.

    Raises:
        ValueError: naming the unknown lens and listing the registered ones.
    """
    if isinstance(lens, LensKind):
        return lens
    if isinstance(lens, type) and issubclass(lens, LensKind):
        return lens()
    if lens not in LENSES:
        raise ValueError(f"unknown lens '{lens}'; use one of {', '.join(LENSES)}")
    return LENSES[lens]()


def model_lens(lens: str | LensKind | type[LensKind]) -> LensKind:
    """The kind of ``lens``, where it is made of the model's weights only (BuPO's pi^k).

    Raises:
        ValueError: naming the lens and those BuPO can train through.
    """
    kind = lens_kind(lens)
    if not kind.model_only:
        raise ValueError(
            f"lens '{kind.name}' cannot train pi^k (it is not made of the model's weights only); "
            f"use {' or '.join(model_lenses())}"
        )
    return kind


def model_lenses() -> list[str]:
    """The registered lenses made of the model's own weights only (those BuPO trains through)."""
    return list(model_lens_descriptions())


def folder_lenses() -> list[str]:
    """The registered lenses that read translators from a lens folder."""
    return [name for name, kind in LENSES.items() if kind.needs_folder]


def lens_descriptions() -> dict[str, str]:
    """Each registered lens's one-line description, by name (the ``--lens`` help)."""
    return {name: kind.description for name, kind in LENSES.items()}


def model_lens_descriptions() -> dict[str, str]:
    """:func:`lens_descriptions` of the lenses BuPO trains through."""
    return {name: kind.description for name, kind in LENSES.items() if kind.model_only}


_RAW_NOTE = (
    "Raw lens (the paper's definition): each site vector is unembedded as it is, without the "
    "final norm, so a policy's sharpness follows the vector's norm as much as its direction: a "
    "short vector gives a near-uniform policy, a long one a sharp policy. Layer 0's input is the "
    "token embedding; where its norm is small its policy is near uniform (high entropy, the next "
    "token ranked far down, large KL to the final policy), and these curves drop where the "
    "stream's norm grows (often as soon as layer 0 writes to it), whether or not the top token "
    "is the final one. The top-1 agreement and the rank say how close the policies are."
)


@register
class Raw(LensKind):
    """``x @ W_U^T (+ b_U)``: the site vector as it is (paper Eqs. 5-6)."""

    name = "raw"
    description = "the site vector as it is, no final norm (the paper's definition)"
    note = _RAW_NOTE

    def inputs(self, lens: Lens, x: Tensor, site: str, layer: int | None) -> Tensor:
        """``x`` itself."""
        return x

    def module(self, norm: nn.Module) -> nn.Module:
        """Nothing: the LM head reads the last kept layer's output."""
        from torch import nn

        return nn.Identity()


@register
class Norm(LensKind):
    """``final_norm(x) @ W_U^T (+ b_U)``: the classic logit lens."""

    name = "norm"
    description = "the model's final norm, then the unembedding (the logit lens)"

    def inputs(self, lens: Lens, x: Tensor, site: str, layer: int | None) -> Tensor:
        """The model's final norm of ``x``."""
        return lens.norm(x)

    def module(self, norm: nn.Module) -> nn.Module:
        """The final norm itself."""
        return norm


@register
class Tuned(LensKind):
    """The norm lens applied to ``x + x A^T + b``, one translator ``(A, b)`` per (site, layer).

    Belrose et al. 2023 (arXiv 2303.08112); the translators are fitted to a frozen model
    (:mod:`~internal_policy_lens.lens.tuned`), so BuPO cannot train through them.
    """

    name = "tuned"
    description = "a fitted affine translator per site and layer, then the final norm (--lens-path)"
    model_only = False
    needs_folder = True

    def inputs(self, lens: Lens, x: Tensor, site: str, layer: int | None) -> Tensor:
        """The final norm of ``x + x A^T + b``, the translator run in its own (wide) dtype."""
        import torch.nn.functional as F

        weight, bias = lens.translator(site, layer)
        x = x.to(weight.dtype)
        return lens.norm(x + F.linear(x, weight, bias))

    def check(self, lens: Lens, keys: Iterable[tuple[str, int]]) -> None:
        """Every site but ``final`` needs a translator at its layer."""
        have = sorted({s for s, _ in lens.translators})
        for site, layer in keys:
            if site != "final" and lens.translator(site, layer) is None:
                raise ValueError(
                    f"the tuned lens has no translator for {site} at layer {layer} (it has "
                    f"{', '.join(have)}); choose --sites among those, or fit the lens with "
                    f"`ipl fit-lens --sites {site}`"
                )


PAPER_LENS: str = Raw.name
"""The lens of the paper's definitions and of its layer rule."""
