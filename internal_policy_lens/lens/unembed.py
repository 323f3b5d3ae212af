"""Site vector -> logits: the ``raw``, ``norm`` and ``tuned`` lenses, ``exact`` or ``fast``.

The reductions of the logits to entropies and the other per-token statistics live in
:mod:`internal_policy_lens.lens.reduce`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from ..config import LENSES, PRECISIONS
from ..model.families import has_head_transform, head_transform
from ..model.load import PolicyModel
from .sites import SiteKey, source_key

EXTRA_COLUMNS: tuple[str, ...] = (
    "next_token_logprob",
    "next_token_rank",
    "kl_to_final",
    "top1_agrees",
)
_HALF = (torch.bfloat16, torch.float16)


def resolve_precision(precision: str, dtype: torch.dtype) -> str:
    """Return ``exact`` or ``fast``; ``auto`` is ``fast`` for a bf16/fp16 model, else ``exact``.

    Raises:
        ValueError: naming the unknown precision and listing the valid ones.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision '{precision}'; use one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "fast" if dtype in _HALF else "exact"
    return precision


class Lens:
    """Turns site vectors into logits with the ``raw``, ``norm`` or ``tuned`` lens.

    ``raw`` (the paper's definition): ``x @ W_U^T (+ b_U)``. ``norm`` (the logit lens):
    ``final_norm(x) @ W_U^T (+ b_U)``. ``tuned`` (Belrose et al. 2023): the norm lens applied to
    ``x + x A^T + b``, with one translator ``(A, b)`` per (site, layer) (see
    :mod:`~internal_policy_lens.lens.tuned`); with zero translators it is the norm lens. Every
    lens then applies the model's own output head transformation where it has one (Granite's
    logit scaling, Gemma's final soft-capping). The ``final`` site is the final norm's output
    already, so it is projected as it is under every lens and gives the model's own logits.

    Precision ``exact``: products in float32 (float64 for a float64 model) and reductions in
    float64. ``fast``: products in the model's dtype if it is bf16/fp16, else in bfloat16 (4-10x
    faster than float32 on CPUs with bf16 instructions), reductions in float32.

    Attributes:
        dtype: dtype of the products and of the logits.
        reduce_dtype: dtype in which logits are reduced to statistics.
        out_dtype: dtype of the statistics (float64 for a float64 model, else float32).
    """

    def __init__(
        self,
        model: PolicyModel,
        lens: str = "raw",
        precision: str = "exact",
        translators: dict[SiteKey, tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> None:
        if lens not in LENSES:
            raise ValueError(f"unknown lens '{lens}'; use one of {', '.join(LENSES)}")
        if (lens == "tuned") != (translators is not None):
            raise ValueError("translators go with the tuned lens, and only with it")
        self.kind = lens
        self.norm = model.final_norm
        unembed = model.unembed
        model_dtype = unembed.weight.dtype
        self.precision = resolve_precision(precision, model_dtype)
        wide = torch.promote_types(model_dtype, torch.float32)
        if self.precision == "exact":
            self.dtype, self.reduce_dtype = wide, torch.float64
        else:
            self.dtype = model_dtype if model_dtype in _HALF else torch.bfloat16
            self.reduce_dtype = torch.float32
        self.out_dtype = wide
        # The translators run in the wide dtype (a d x d product: cheap next to the unembedding).
        self.translators = {
            key: (a.to(wide), b.to(wide)) for key, (a, b) in (translators or {}).items()
        }
        self.weight = unembed.weight.to(self.dtype)  # [vocab, d_model]
        bias = getattr(unembed, "bias", None)
        # The bridge gives lm_head an all-zero bias; adding it costs ~9% of a bf16 product.
        self.bias = None if bias is None or not bias.any() else bias.to(self.dtype)
        self.config = model.config if has_head_transform(model.config) else None
        self._out: torch.Tensor | None = None  # see reused_output

    @property
    def vocab_size(self) -> int:
        """Size of every policy (rows of the unembedding)."""
        return self.weight.shape[0]

    def check(self, keys: Iterable[SiteKey]) -> None:
        """Raise ValueError naming the first (site, layer) of ``keys`` without a translator."""
        if self.kind != "tuned":
            return
        have = sorted({s for s, _ in self.translators})
        for site, layer in keys:
            if site != "final" and source_key(site, layer) not in self.translators:
                raise ValueError(
                    f"the tuned lens has no translator for {site} at layer {layer} (it has "
                    f"{', '.join(have)}); choose --sites among those, or fit the lens with "
                    f"`ipl fit-lens --sites {site}`"
                )

    def inputs(self, x: torch.Tensor, site: str, layer: int | None = None) -> torch.Tensor:
        """What the unembedding reads for ``x`` ``[..., d_model]`` of ``site``, in :attr:`dtype`.

        The tuned lens needs the ``layer`` (its translator depends on it).
        """
        if self.kind == "tuned" and site != "final":
            weight, bias = self.translators[source_key(site, layer)]
            x = x.to(weight.dtype)
            x = x + F.linear(x, weight, bias)
        if self.kind != "raw" and site != "final":
            x = self.norm(x)
        return x.to(self.dtype)

    def logits(self, x: torch.Tensor, site: str | None) -> torch.Tensor:
        """Project ``x`` ``[rows, d_model]`` of ``site`` to logits ``[rows, vocab]``.

        ``site=None`` means that ``x`` is already :meth:`inputs`' output (rows of several sites
        stacked into one product). Inside :meth:`reused_output`, without gradients, the logits
        are written into the block's buffer and overwritten by the next call.
        """
        if site is not None:
            x = self.inputs(x, site)
        out = self._out
        if out is None or len(x) > len(out) or torch.is_grad_enabled():
            logits = F.linear(x, self.weight, self.bias)
        elif self.bias is None:
            logits = torch.mm(x, self.weight.t(), out=out[: len(x)])
        else:
            logits = torch.addmm(self.bias, x, self.weight.t(), out=out[: len(x)])
        if self.config is None:
            return logits
        return head_transform(self.config, logits, inplace=not torch.is_grad_enabled())

    @contextmanager
    def reused_output(self, rows: int) -> Iterator[None]:
        """Write the logits of up to ``rows`` rows into one buffer, allocated once.

        A fresh vocabulary-sized output costs its page faults on every product (about a fifth of
        a bf16 product's time on a CPU); reusing one buffer avoids them.
        """
        self._out = torch.empty(rows, self.vocab_size, dtype=self.dtype, device=self.weight.device)
        try:
            yield
        finally:
            self._out = None
