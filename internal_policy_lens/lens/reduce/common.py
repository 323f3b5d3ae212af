"""What every backend shares: its capability, the chunk plan, the output columns, the rows."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ...statistics import STATISTICS, Request
from ..sites import SiteKey
from ..unembed import Lens

Stats = dict[str, torch.Tensor]


def chunk_plan(n_rows: int, n_sites: int, chunk_tokens: int, extras: bool) -> tuple[int, int]:
    """Token rows per chunk and sites per product, so that a chunk forms ``chunk_tokens`` rows.

    All of a call's rows and sites in one product when they fit; else as many token rows per
    product as fit (each product, and each site of it, costs a fixed overhead: a chunk of a few
    rows of many sites would pay it per row), then as many sites as fit beside them. With
    extras the final policy's rows count too (formed once per chunk of rows, shared by every
    site). At least one row of one site is formed.
    """
    if n_rows * (n_sites + int(extras)) <= chunk_tokens:
        return max(n_rows, 1), max(n_sites, 1)
    rows = max(1, min(n_rows, chunk_tokens // (1 + int(extras))))
    sites = max(1, min(n_sites, (chunk_tokens - int(extras) * rows) // rows))
    return rows, sites


def final_key(keys: Iterable[SiteKey]) -> SiteKey:
    """The ``final`` site among ``keys``, against which the extras are taken."""
    found = [key for key in keys if key[0] == "final"]
    if not found:
        raise ValueError("the extras need the 'final' site among the keys")
    return found[0]


@dataclass(frozen=True)
class Capability:
    """What a backend computes: declared in its module, read by the dispatcher.

    Attributes:
        computes: the statistics (names in :data:`~internal_policy_lens.statistics.STATISTICS`).
        max_topk: the widest top-k (None: any).
        other_reference: takes a reference policy other than the final site, or one without
            next tokens.
        temperature: takes a lens with a temperature.
        together: statistics it computes only all together (none of them, or all).
    """

    computes: frozenset[str]
    max_topk: int | None = None
    other_reference: bool = False
    temperature: bool = False
    together: frozenset[str] = frozenset()

    def missing(
        self, request: Request, *, other_reference: bool = False, temperature: bool = False
    ) -> str | None:
        """Why this backend cannot run ``request`` (None: it can)."""
        lacking = [name for name in request.statistics if name not in self.computes]
        if lacking:
            return f"does not compute {', '.join(lacking)}"
        asked = self.together & set(request.statistics)
        if asked and asked != self.together:
            return f"computes {', '.join(sorted(self.together))} only together"
        if self.max_topk is not None and request.topk > self.max_topk:
            return f"takes a top-k up to {self.max_topk}"
        if other_reference and not self.other_reference:
            return "takes no reference policy other than the final one with next tokens"
        if temperature and not self.temperature:
            return "takes no lens temperature"
        return None


# The widest top-k of the Triton kernel (its per-row candidates live in registers).
KERNEL_MAX_TOPK = 64

_TORCH_DTYPES = {"int64": torch.long, "bool": torch.bool}


def allocate(lens: Lens, n: int, request: Request) -> Stats:
    """The output columns of one site for ``n`` rows: ``request``'s statistics and top-k."""
    device = lens.weight.device
    out = {
        name: torch.empty(
            n, dtype=_TORCH_DTYPES.get(STATISTICS[name].dtype, lens.out_dtype), device=device
        )
        for name in request.statistics
    }
    if request.topk:
        out["topk_id"] = torch.empty(n, request.topk, dtype=torch.long, device=device)
        out["topk_prob"] = torch.empty(n, request.topk, dtype=lens.out_dtype, device=device)
    return out


def store(out: dict[SiteKey, Stats], keys: Sequence[SiteKey], part: slice, stats: Stats) -> None:
    """Write ``stats`` ``[sites, rows]`` (or ``[sites, rows, K]``) of ``keys`` into ``out``."""
    for name, value in stats.items():
        for i, key in enumerate(keys):
            out[key][name][part] = value[i]


def to_numpy(out: dict[SiteKey, Stats]) -> dict[SiteKey, dict[str, np.ndarray]]:
    """The columns as numpy arrays on the host."""
    return {key: {name: v.cpu().numpy() for name, v in cols.items()} for key, cols in out.items()}


def chunks(n: int, size: int) -> Iterable[slice]:
    """Consecutive slices of at most ``size`` of ``range(n)``."""
    return (slice(i, min(i + size, n)) for i in range(0, n, max(size, 1)))


def rows_of(acts, key: SiteKey, index, part: slice, lens: Lens) -> torch.Tensor:
    """The rows ``[rows, d_model]`` of ``key`` picked by ``index[part]``, on the lens's device."""
    x = acts[key]  # [batch, pos, d_model], on its layer's device (device_map may split layers)
    rows_b, rows_t = index
    rows = x[rows_b[part].to(x.device), rows_t[part].to(x.device)]  # [rows, d_model]
    return rows.to(lens.weight.device)


def stacked_inputs(lens: Lens, acts, keys: Sequence[SiteKey], index, part: slice) -> torch.Tensor:
    """The unembedding's inputs of the rows of ``keys``, ``[sites * rows, d_model]``."""
    stacked = torch.stack([lens.inputs(rows_of(acts, k, index, part, lens), *k) for k in keys])
    return stacked.flatten(0, 1)
