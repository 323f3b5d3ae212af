"""Vocabulary tiles: entropy and a top-k of K <= 5 without a whole logits row (CPU caches).

The product of a chunk's stacked rows (up to ``chunk_tokens`` whatever the call's size) is
formed one tile of vocabulary columns at a time (:func:`tile_columns`, about
:data:`TILE_ELEMENTS` logits, which stay in the cache), each tile reduced to its max, ``log S_t``,
entropy and top-k, and the tiles combined exactly (:func:`tiled_stats`). Neither the logits nor
the reductions' temporaries are vocabulary-sized, and the reductions read cached data instead of
streaming each chunk's logits through memory twice. The statistics without such a merge (the
next token's, those against a reference policy) and a top-k above :data:`TILED_MAX_TOPK` take
whole logits rows (:mod:`.rows`).
"""

from __future__ import annotations

import numpy as np
import torch

from ...statistics import Request
from ..sites import SiteKey
from ..unembed import Lens
from .common import Capability, Stats, allocate, chunk_plan, chunks, stacked_inputs, store, to_numpy
from .compiled import tile_sums

# Logits per vocabulary tile of the tiled path: a float32 tile and its softmax (4 MB) fit two
# cores' L2 caches; tiles narrower than MIN_TILE_COLUMNS make the per-call overhead show.
TILE_ELEMENTS = 1 << 19
MIN_TILE_COLUMNS = 256
# The largest top-k taken tile by tile: torch.topk on a tile's few hundred columns costs far more
# per element than on whole rows (bench model, bf16 products: tiles with K = 5 took 1.27x the
# time without top-k, with K = 20 2.33x; whole rows had taken 1.33x for both); a larger K
# reduces whole rows.
TILED_MAX_TOPK = 5

CAPABILITY = Capability(frozenset({"entropy", "varentropy"}), max_topk=TILED_MAX_TOPK)
"""The statistics with an exact merge across vocabulary tiles."""


def tile_columns(rows: int, vocab: int, elements: int | None = None) -> int:
    """Vocabulary columns per tile of :func:`tiled_stats` for a product of ``rows`` rows.

    About ``elements`` (default :data:`TILE_ELEMENTS`) logits per tile, at least
    :data:`MIN_TILE_COLUMNS` columns (fewer tiles: less per-call overhead), at most ``vocab``.
    """
    elements = TILE_ELEMENTS if elements is None else elements
    return max(1, min(vocab, max(MIN_TILE_COLUMNS, elements // max(rows, 1))))


@torch.no_grad()
def tiled_stats(
    lens: Lens,
    x: torch.Tensor,
    topk: int = 0,
    columns: int | None = None,
    compiled: bool = False,
    wanted: tuple[str, ...] = ("entropy",),
) -> Stats:
    """Entropy (and top-k) of the policies of ``x`` ``[rows, d_model]``, tile by tile.

    The path without extras. ``x`` is already :meth:`Lens.inputs`' output. Each tile
    ``[rows, columns]`` of logits is formed (into :meth:`Lens.reused_output`'s buffer, when
    inside it) and reduced while it is in the cache: its max ``m_t``, ``log S_t``
    (``S_t = sum exp(z - m_t)`` over the tile), its own entropy ``H_t`` and, with ``topk``, its
    K largest logits. The tiles then combine exactly: with ``lse_t = m_t + log S_t``,
    ``lse = logsumexp_t lse_t`` and ``c_t = exp(lse_t - lse)`` (the tile's probability mass),
    ``H = sum_t c_t (H_t + lse - lse_t)``, every term nonnegative (no cancellation); the top-k
    is the K largest of the tiles' top-k. ``compiled`` reduces each tile with
    ``torch.compile``d code (one fused loop) instead of eager ops. With ``varentropy`` in
    ``wanted``, each tile also gives ``V_t = sum p (z - mu_t)^2`` around its mean ``mu_t``, and
    ``Var = sum_t c_t (V_t + (mu_t - mu)^2)`` (nonnegative terms again).

    Returns:
        ``entropy`` (+ ``varentropy``) ``[rows]``; with ``topk``, ``topk_id`` and ``topk_prob``
        ``[rows, K]``.
    """
    spread = "varentropy" in wanted
    rows, vocab, dtype = len(x), lens.vocab_size, lens.reduce_dtype
    columns = columns or tile_columns(rows, vocab)
    starts = range(0, vocab, columns)
    tiles, k, device = len(starts), min(topk, columns), x.device
    top, log_total, mean, var = (
        torch.empty(tiles, rows, dtype=dtype, device=device) for _ in range(4)
    )
    best = torch.empty(tiles, rows, k, dtype=lens.dtype, device=device)
    ids = torch.empty(tiles, rows, k, dtype=torch.long, device=device)
    work = probs = None  # float32 copies of a tile (half products) and its softmax, reused
    for i, start in enumerate(starts):
        z = lens.logits(x, None, slice(start, start + columns))  # [rows, tile]
        shape = z.shape
        if k and shape[1] >= k:
            torch.topk(z, k, dim=-1, sorted=False, out=(best[i], ids[i]))
        elif k:  # a last tile narrower than K: all of it, and -inf for the rest
            best[i].fill_(-torch.inf)
            best[i, :, : shape[1]], ids[i, :, : shape[1]] = z, torch.arange(shape[1], device=device)
        if work is None:
            size = rows * columns
            work = z.new_empty(size, dtype=dtype) if z.dtype != dtype else None
            probs = z.new_empty(size, dtype=dtype)
        sums = (top[i], log_total[i], mean[i], *((var[i],) if spread else ()))
        if compiled and tile_sums(tile_spread if spread else tile_math, z, dtype, sums):
            continue
        zf = z if work is None else work[: z.numel()].view(shape).copy_(z)
        torch.amax(zf, -1, out=top[i])
        zf.sub_(top[i, :, None])  # <= 0, 0 at the tile's max
        p = torch.softmax(zf, -1, out=probs[: z.numel()].view(shape))
        torch.amax(p, -1, out=log_total[i])  # 1 / S_t: the max's probability in its tile
        log_total[i].log_().neg_()
        torch.linalg.vecdot(p, zf, out=mean[i])  # sum p (z - m_t) <= 0
        if spread:  # sum p (z - mu_t)^2, around the tile's mean
            torch.linalg.vecdot(p, zf.sub_(mean[i, :, None]).square_(), out=var[i])
    lse_t = top + log_total  # [tiles, rows]
    lse = torch.logsumexp(lse_t, 0)
    mass = (lse_t - lse).exp_()
    out = {"entropy": (mass * (log_total - mean + (lse - lse_t))).sum(0)}
    if spread:  # the tiles' means relative to the largest max, then the spread between them
        centre = top - top.amax(0) + mean  # [tiles, rows]
        overall = (mass * centre).sum(0)
        out["varentropy"] = (mass * (var + (centre - overall).square())).sum(0)
    if k:
        offsets = torch.tensor(list(starts), device=device)[:, None, None]
        merged = best.to(dtype).permute(1, 0, 2).reshape(rows, tiles * k)
        value, where = merged.topk(min(topk, tiles * k), dim=-1, sorted=True)
        pool = (ids + offsets).permute(1, 0, 2).reshape(rows, tiles * k)
        out["topk_id"] = pool.gather(-1, where)
        out["topk_prob"] = (value - lse[:, None]).exp()
    return out


def _weighted(z: torch.Tensor, dtype: torch.dtype):
    # A tile's max [rows, 1], z - max, exp(z - max) and their sum S_t [rows].
    zf = z.to(dtype)
    top = zf.amax(-1, keepdim=True)
    shifted = zf - top
    weights = shifted.exp()
    return top, shifted, weights, weights.sum(-1)


def tile_math(z: torch.Tensor, dtype: torch.dtype):
    """One tile's max, ``log S_t`` and ``sum p (z - m_t)``, as one graph for torch.compile."""
    top, shifted, weights, total = _weighted(z, dtype)
    return top.squeeze(-1), total.log(), (weights * shifted).sum(-1) / total


def tile_spread(z: torch.Tensor, dtype: torch.dtype):
    """:func:`tile_math`, and ``sum p (z - mu_t)^2`` around the tile's mean ``mu_t``."""
    top, shifted, weights, total = _weighted(z, dtype)
    mean = (weights * shifted).sum(-1) / total
    var = (weights * (shifted - mean.unsqueeze(-1)).square()).sum(-1) / total
    return top.squeeze(-1), total.log(), mean, var


def tiles_site_stats(
    lens: Lens,
    acts: dict[SiteKey, torch.Tensor],
    sites: list[SiteKey],
    index: tuple[torch.Tensor, torch.Tensor],
    request: Request,
    chunk_tokens: int,
    compiled: bool,
) -> dict[SiteKey, dict[str, np.ndarray]]:
    """:func:`~.dispatch.site_stats` tile by tile (:func:`tiled_stats`), no reference policy."""
    # Up to chunk_tokens stacked rows per product, reduced tile by tile, so that neither the
    # logits nor the reductions' temporaries are vocabulary-sized; memory follows the tile,
    # not the rows.
    n, topk = len(index[0]), request.topk
    rows, group = chunk_plan(n, len(sites), chunk_tokens, False)
    columns = tile_columns(rows * group, lens.vocab_size)
    out = {key: allocate(lens, n, request) for key in sites}
    with lens.reused_output(rows * group, columns):
        for part in chunks(n, rows):
            for start in range(0, len(sites), group):
                group_keys = sites[start : start + group]
                stacked = stacked_inputs(lens, acts, group_keys, index, part)
                stats = tiled_stats(lens, stacked, topk, columns, compiled, request.statistics)
                size = part.stop - part.start
                stats = {name: v.unflatten(0, (len(group_keys), size)) for name, v in stats.items()}
                store(out, group_keys, part, stats)
    return to_numpy(out)
