"""Site vector -> logits under a lens kind (``raw``, ``norm``, ``tuned``...), ``exact`` or ``fast``.

What each kind reads for a site vector is :mod:`internal_policy_lens.lens_kinds`'s. The
reductions of the logits to entropies and the other per-token statistics live in
:mod:`internal_policy_lens.lens.reduce`.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import PRECISIONS
from ..lens_kinds import LensKind, folder_lenses, lens_kind
from ..model.families import has_head_transform, head_transform
from ..model.hardware import half_support
from ..model.load import PolicyModel
from .sites import SiteKey, source_key

_HALF = (torch.bfloat16, torch.float16)
_log = logging.getLogger(__name__)


def resolve_precision(precision: str, dtype: torch.dtype) -> str:
    """Return ``exact`` or ``fast``; ``auto`` is ``fast`` for a bf16/fp16 model, else ``exact``.

    Which dtypes a mode's products and reductions use on a device is :func:`choose_precision`'s.

    Raises:
        ValueError: naming the unknown precision and listing the valid ones.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision '{precision}'; use one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "fast" if dtype in _HALF else "exact"
    return precision


@dataclass(frozen=True)
class Precision:
    """What a precision mode runs on a device: the products' and the reductions' dtypes, and why."""

    mode: str
    products: torch.dtype
    reductions: torch.dtype
    reason: str

    def record(self) -> dict[str, str]:
        """The JSON form written to ``run.json``."""
        return {
            "mode": self.mode,
            "products": _name(self.products),
            "reductions": _name(self.reductions),
            "reason": self.reason,
        }


def choose_precision(
    precision: str, dtype: torch.dtype, device: torch.device | str = "cpu", d_model: int = 1024
) -> Precision:
    """The dtypes that ``precision`` runs for a model of ``dtype`` on ``device``.

    ``exact``: float32 products and float32 reductions (float64 both for a float64 model); a
    float32 fused reduction of float32 logits is within ~1e-5 nats of float64, the products'
    own rounding. ``fast``: products in the model's bf16/fp16 (bf16 for other models) where the
    device runs them natively (see :func:`half_support`), else in float32, since an emulated
    half product is slower than a float32 one; reductions in float32.

    Raises:
        ValueError: naming the unknown precision and listing the valid ones.
    """
    mode = resolve_precision(precision, dtype)
    wide = torch.promote_types(dtype, torch.float32)
    if mode == "exact":
        return Precision(mode, wide, wide, f"exact: {_name(wide)} products and reductions")
    half = dtype if dtype in _HALF else torch.bfloat16
    native, why = half_support(torch.device(device), half, d_model)
    if native:
        return Precision(mode, half, torch.float32, f"{why}: {_name(half)} products")
    if precision == "fast":  # asked for explicitly: say that it runs float32 products instead
        _warn_once(f"precision fast: {why}; running float32 products (faster here, and exact)")
    return Precision(mode, torch.float32, torch.float32, f"{why}: float32 products are faster")


@functools.cache
def _warn_once(message: str) -> None:
    _log.warning(message)


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class Lens:
    """Turns site vectors into logits under a lens kind (``raw``, ``norm``, ``tuned``, ...).

    The kind (:mod:`~internal_policy_lens.lens_kinds`) says what the unembedding reads for a site
    vector: ``raw`` (the paper's definition) the vector itself, ``norm`` (the logit lens) its
    final norm, ``tuned`` (Belrose et al. 2023) the final norm of ``x + x A^T + b``, with one
    translator ``(A, b)`` per (site, layer) (see :mod:`~internal_policy_lens.lens.tuned`; with
    zero translators it is the norm lens). Then ``x @ W_U^T (+ b_U)``, and the model's own output
    head transformation where it has one (Granite's logit scaling, Gemma's final soft-capping).
    The ``final`` site is the final norm's output already, so it is projected as it is under
    every lens and gives the model's own logits.

    Precision (see :func:`choose_precision`): ``exact`` runs float32 products and reductions
    (float64 for a float64 model); ``fast`` runs bf16 (or the model's fp16) products where the
    device multiplies them natively (faster there: see the README's Performance of the
    reductions for what was measured), float32 products elsewhere, and float32 reductions.
    ``precision`` is a mode name or an already chosen :class:`Precision`.

    Attributes:
        kind: the :class:`~internal_policy_lens.lens_kinds.LensKind`; ``name`` is its name.
        chosen: the :class:`Precision` it runs.
        dtype: dtype of the products and of the logits.
        reduce_dtype: dtype in which logits are reduced to statistics.
        out_dtype: dtype of the statistics (float64 for a float64 model, else float32).
        temperature: the logits are divided by it after the head transformation (the policy
            sampled at that temperature).
        source: the folder the translators were read from (None otherwise).
    """

    def __init__(
        self,
        model: PolicyModel,
        lens: str | LensKind | type[LensKind] = "raw",
        precision: str | Precision = "exact",
        translators: dict[SiteKey, tuple[torch.Tensor, torch.Tensor]] | None = None,
        temperature: float = 1.0,
        *,
        source: str | os.PathLike | None = None,
    ) -> None:
        self.kind = lens_kind(lens)
        self.name = self.kind.name
        if self.kind.needs_folder != (translators is not None):
            raise ValueError(f"translators go with the {', '.join(folder_lenses())} lens only")
        self.source = source
        self.norm = model.final_norm
        unembed = model.unembed
        model_dtype = unembed.weight.dtype
        if not isinstance(precision, Precision):
            device = unembed.weight.device
            precision = choose_precision(precision, model_dtype, device, unembed.weight.shape[1])
        self.chosen = precision
        self.precision = precision.mode
        self.dtype, self.reduce_dtype = precision.products, precision.reductions
        self.out_dtype = torch.promote_types(model_dtype, torch.float32)
        # The translators run in the wide dtype (a d x d product: cheap next to the unembedding),
        # beside the unembedding (a lens read from a file arrives on the CPU).
        place = {"dtype": self.out_dtype, "device": unembed.weight.device}
        self.translators = {
            key: (a.to(**place), b.to(**place))
            for key, (a, b) in (translators or {}).items()
        }
        self.weight = unembed.weight.to(self.dtype)  # [vocab, d_model]
        bias = getattr(unembed, "bias", None)
        # The bridge gives lm_head an all-zero bias; adding it costs ~9% of a bf16 product.
        self.bias = None if bias is None or not bias.any() else bias.to(self.dtype)
        self.config = model.config if has_head_transform(model.config) else None
        self.temperature = temperature
        self._out: torch.Tensor | None = None  # see reused_output

    @property
    def vocab_size(self) -> int:
        """Size of every policy (rows of the unembedding)."""
        return self.weight.shape[0]

    def check(self, keys: Iterable[SiteKey]) -> None:
        """Raise ValueError naming the first (site, layer) of ``keys`` the lens cannot read."""
        self.kind.check(self, keys)

    def translator(self, site: str, layer: int | None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The translator ``(A, b)`` reading ``site`` at ``layer``; None where there is none.

        ``resid_pre`` of layer ``l > 0`` is ``resid_post`` of layer ``l - 1``: one translator.
        """
        return self.translators.get(source_key(site, layer))

    def inputs(self, x: torch.Tensor, site: str, layer: int | None = None) -> torch.Tensor:
        """What the unembedding reads for ``x`` ``[..., d_model]`` of ``site``, in :attr:`dtype`.

        The tuned lens needs the ``layer`` (its translator depends on it).
        """
        if site != "final":
            x = self.kind.inputs(self, x, site, layer)
        return x.to(self.dtype)

    def logits(self, x: torch.Tensor, site: str | None, vocab: slice | None = None) -> torch.Tensor:
        """Project ``x`` ``[rows, d_model]`` of ``site`` to logits ``[rows, vocab]``.

        ``site=None`` means that ``x`` is already :meth:`inputs`' output (rows of several sites
        stacked into one product). ``vocab`` (a slice of token ids) forms only those columns,
        ``[rows, len(vocab)]``. Inside :meth:`reused_output`, without gradients, the logits are
        written into the block's buffer and overwritten by the next call.
        """
        if site is not None:
            x = self.inputs(x, site)
        weight, bias = self.weight, self.bias
        if vocab is not None:
            weight, bias = weight[vocab], None if bias is None else bias[vocab]
        out, shape = self._out, (len(x), len(weight))
        if out is None or shape[0] * shape[1] > len(out) or torch.is_grad_enabled():
            logits = F.linear(x, weight, bias)
        elif bias is None:
            logits = torch.mm(x, weight.t(), out=out[: shape[0] * shape[1]].view(shape))
        else:
            logits = torch.addmm(bias, x, weight.t(), out=out[: shape[0] * shape[1]].view(shape))
        inplace = not torch.is_grad_enabled()
        if self.config is not None:
            logits = head_transform(self.config, logits, inplace=inplace)
        if self.temperature == 1.0:
            return logits
        return logits.div_(self.temperature) if inplace else logits / self.temperature

    @contextmanager
    def reused_output(self, rows: int, columns: int | None = None) -> Iterator[None]:
        """Write the logits of up to ``rows`` rows into one buffer, allocated once.

        ``columns`` (default: the vocabulary) is the width of the widest product; a product of
        fewer rows may be wider, up to the buffer's ``rows * columns`` elements. A fresh
        vocabulary-sized output costs its page faults on every product (about a fifth of a bf16
        product's time on a CPU); reusing one buffer avoids them.
        """
        size = rows * (columns or self.vocab_size)
        self._out = torch.empty(size, dtype=self.dtype, device=self.weight.device)
        try:
            yield
        finally:
            self._out = None
