"""Logits -> entropy and the other per-token statistics, chunked, stacked and fused (paper Eq. 7).

The analysis costs one vocabulary-sized product per (site, layer, token), then passes over each
product's logits. The engine keeps both small:

- **Stacked products.** For a chunk of token rows, the rows of every site and layer are stacked
  into one product ``[sites * rows, d_model] @ W_U^T`` of at most ``chunk_tokens`` rows.
- **Fused reductions.** Each logits row is reduced in two passes: its max ``m``, then
  ``S = sum exp(z - m)`` together with the other sums. Entropy is
  ``H = log S - sum exp(z - m) (z - m) / S``; the next token's log-probability is
  ``z_t - m - log S`` and its rank ``1 + #{j: z_j > z_t}``; with ``log q`` the final policy,
  ``KL(p || q) = sum exp(z - m) (z - m - log q) / S - log S``. The same function runs eagerly
  (in row slices that bound its temporaries) or compiled by ``torch.compile``, which fuses it
  into two loops over the logits with no temporaries; compiling is never required.
- **Vocabulary tiles (without extras).** Entropy and top-k need no whole logits row: the
  product of a chunk's stacked rows (up to ``chunk_tokens`` whatever the call's size) is formed
  one tile of vocabulary columns at a time (:func:`tile_columns`, about :data:`TILE_ELEMENTS`
  logits, which stay in the cache), each tile reduced to its max, ``log S_t``, entropy and
  top-k, and the tiles combined exactly (:func:`tiled_stats`). Neither the logits nor the
  reductions' temporaries are vocabulary-sized, and the reductions read cached data instead of
  streaming each chunk's logits through memory twice. The extras (next token, KL to the final
  policy) and a top-k above :data:`TILED_MAX_TOPK` take whole logits rows, as below.
- **Top-k.** With ``topk`` K, the same pass keeps each row's K largest logits and their ids,
  as probabilities ``exp(z - m - log S)``: ``[rows, K]`` per chunk, never a ``[rows, vocab]``
  array beyond the chunk's logits, no second product.
- **Shared final policy.** With extras, the final policy's log-probabilities for a chunk's rows
  are formed once and shared by every site.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from functools import partial

import numpy as np
import torch

from .sites import SiteKey
from .unembed import EXTRA_COLUMNS, Lens

Stats = dict[str, torch.Tensor]

# Work (logits elements) from which compiling pays for itself in one call: torch.compile takes
# seconds once per process, the eager reductions of whole logits rows (the path with extras)
# about 6 ns per element on 2 CPU cores.
COMPILE_MIN_ELEMENTS = 1 << 30
# The same for the tiled reductions (no extras): compiling them takes about 5 s per process and
# saves about 0.9 ns per element next to the eager tiles with bf16 products (nothing measurable
# with float32 products), so it pays from about 6e9 elements.
TILED_COMPILE_MIN_ELEMENTS = 1 << 33
# Elements of a row slice reduced at once on the eager path (its temporaries are a few of these).
_EAGER_ELEMENTS = 1 << 22
# Logits per vocabulary tile of the tiled path: a float32 tile and its softmax (4 MB) fit two
# cores' L2 caches; tiles narrower than MIN_TILE_COLUMNS make the per-call overhead show.
TILE_ELEMENTS = 1 << 19
MIN_TILE_COLUMNS = 256
# The largest top-k taken tile by tile: torch.topk on a tile's few hundred columns costs far more
# per element than on whole rows (bench model, bf16 products: tiles with K = 5 took 1.27x the
# time without top-k, with K = 20 2.33x; whole rows had taken 1.33x for both); a larger K
# reduces whole rows.
TILED_MAX_TOPK = 5
_log = logging.getLogger(__name__)


@torch.no_grad()
def site_stats(
    lens: Lens,
    acts: dict[SiteKey, torch.Tensor],
    keys: Sequence[SiteKey],
    index: tuple[torch.Tensor, torch.Tensor],
    *,
    next_ids: torch.Tensor | None = None,
    topk: int = 0,
    chunk_tokens: int = 1024,
    compiled: bool | None = None,
) -> dict[SiteKey, dict[str, np.ndarray]]:
    """Per-row statistics (nats) of the policies of ``keys``, for the rows picked by ``index``.

    Args:
        lens: how site vectors become logits, and in which precision.
        acts: ``(site, layer) -> [batch, pos, d_model]`` captured vectors.
        keys: the distinct sites to reduce; each vector is projected once.
        index: ``(batch_rows, positions)``, the rows to keep, ``[n]`` each.
        next_ids: ``[n]`` the actual next token (-1 where there is none). Given, adds the extras
            (:data:`~internal_policy_lens.lens.unembed.EXTRA_COLUMNS`); then ``keys`` must hold the
            ``final`` site, against which ``kl_to_final`` and ``top1_agrees`` are taken.
        topk: K > 0 adds ``topk_id`` and ``topk_prob``, ``[n, K]`` each: the policy's K most
            probable token ids, most probable first, and their probabilities.
        chunk_tokens: logits rows formed at once (the final policy's rows included), at most
            the ``n`` rows picked by ``index``.
        compiled: use the ``torch.compile``d reductions; ``None`` decides from the environment
            variable ``IPL_COMPILE`` (``0`` or ``1``), else from the amount of work. A compile
            failure falls back to the eager reductions (same numbers up to float rounding).

    Returns:
        ``key -> column -> [n]`` arrays: ``entropy`` (+ extras); ``[n, K]`` for the top-k.
    """
    final = _final_key(keys) if next_ids is not None else None
    sites = [key for key in keys if key != final]
    n = len(index[0])
    topk = min(topk, lens.vocab_size)
    work = n * len(keys) * lens.vocab_size
    if final is None and topk <= TILED_MAX_TOPK:
        compiled = _use_compiled(compiled, work, TILED_COMPILE_MIN_ELEMENTS)
        return _tiled_site_stats(lens, acts, sites, index, topk, chunk_tokens, compiled)
    # A small call forms at most n logits rows at once: its memory follows its work.
    rows, group = chunk_plan(n, len(sites), min(chunk_tokens, max(n, 1)), final is not None)
    reduce = _reducer(compiled, work)
    reduce = partial(reduce, topk=topk)
    out = {key: _allocate(lens, n, final is not None, topk) for key in keys}
    with lens.reused_output(rows * group):  # each chunk's logits are reduced before the next
        for part in _chunks(n, rows):
            nxt = None if next_ids is None else next_ids[part].to(lens.weight.device)
            shared = ()
            if final is not None:
                shared = _final_block(lens, acts, final, index, part, reduce, nxt, out)
            for start in range(0, len(sites), group):
                block = sites[start : start + group]
                stats = _block(lens, acts, block, index, part, reduce, nxt, *shared)
                _store(out, block, part, stats)
    return {key: {name: v.cpu().numpy() for name, v in cols.items()} for key, cols in out.items()}


def chunk_plan(n_rows: int, n_sites: int, chunk_tokens: int, extras: bool) -> tuple[int, int]:
    """Token rows per chunk and sites per product, so that a chunk forms ``chunk_tokens`` rows.

    With extras the final policy's rows count too. At least one row of one site is formed.
    """
    per_row = n_sites + int(extras)
    rows = max(1, min(n_rows, chunk_tokens // max(per_row, 1)))
    sites = max(1, min(n_sites, (chunk_tokens - int(extras) * rows) // rows))
    return rows, sites


def final_policy(logits: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities ``[rows, vocab]`` (in ``dtype``) and argmax ``[rows]`` of ``logits``."""
    return torch.log_softmax(logits.to(dtype), dim=-1), logits.argmax(-1)


def reduce_logits(
    logits: torch.Tensor,
    dtype: torch.dtype,
    next_ids: torch.Tensor | None = None,
    final_logp: torch.Tensor | None = None,
    final_top: torch.Tensor | None = None,
    topk: int = 0,
) -> Stats:
    """Statistics of the policies ``softmax(logits)``, reduced in ``dtype`` (the eager path).

    Args:
        logits: ``[sites, rows, vocab]``.
        dtype: dtype of the reductions (float32 or float64).
        next_ids: ``[rows]`` the actual next token (-1 where there is none); adds
            ``next_token_logprob`` and ``next_token_rank`` (1 = the policy's top token).
        final_logp: ``[rows, vocab]`` log-probabilities of the model's output policy; adds
            ``kl_to_final`` = KL(internal || final).
        final_top: ``[rows]`` argmax of the output policy; adds ``top1_agrees``.
        topk: K > 0 adds ``topk_id`` and ``topk_prob``, ``[sites, rows, K]``, most probable first.

    Returns:
        ``column -> [sites, rows]`` (``[sites, rows, K]`` for the top-k).
    """
    sites, rows, vocab = logits.shape
    site_step = max(1, _EAGER_ELEMENTS // (rows * vocab))
    row_step = rows if site_step > 1 else max(1, _EAGER_ELEMENTS // vocab)
    blocks = []
    for site_part in _chunks(sites, site_step):
        parts = [
            _fused(
                logits[site_part, part],
                dtype,
                None if next_ids is None else next_ids[part],
                None if final_logp is None else final_logp[part],
                None if final_top is None else final_top[part],
                topk,
            )
            for part in _chunks(rows, row_step)
        ]
        blocks.append({name: torch.cat([p[name] for p in parts], dim=1) for name in parts[0]})
    return {name: torch.cat([b[name] for b in blocks]) for name in blocks[0]}


def _fused(logits, dtype, next_ids, final_logp, final_top, topk=0) -> Stats:
    # The reductions as one expression graph; torch.compile fuses them into two loops per row.
    z = logits.to(dtype)  # [sites, rows, vocab]
    top = z.amax(-1, keepdim=True)
    shifted = z - top
    weights = shifted.exp()
    total = weights.sum(-1)
    log_total = total.log()
    out = {"entropy": log_total - (weights * shifted).sum(-1) / total}
    if next_ids is not None:
        has_next = next_ids >= 0
        idx = next_ids.clamp(min=0).expand(z.shape[:2]).unsqueeze(-1)  # [sites, rows, 1]
        target = z.gather(-1, idx)
        logprob = (target - top).squeeze(-1) - log_total
        rank = (z > target).sum(-1) + 1
        out["next_token_logprob"] = torch.where(has_next, logprob, torch.nan)
        out["next_token_rank"] = torch.where(has_next, rank, -1)
    if final_logp is not None:
        out["kl_to_final"] = (weights * (shifted - final_logp)).sum(-1) / total - log_total
    if final_top is not None:
        out["top1_agrees"] = z.argmax(-1) == final_top
    if topk:
        # On the logits as formed (upcasting is exact, so the same order): selecting from
        # ``z`` would make the compiled graph materialise it, [sites, rows, vocab] in ``dtype``.
        best, ids = logits.topk(topk, dim=-1, sorted=True)  # [sites, rows, K]
        out["topk_id"] = ids
        out["topk_prob"] = (best.to(dtype) - top - log_total.unsqueeze(-1)).exp()
    return out


# The compiled reductions: None until first needed, False once compiling failed (stay eager).
_compiled_fused = None


def _use_compiled(compiled: bool | None, work: int, threshold: int = COMPILE_MIN_ELEMENTS) -> bool:
    if compiled is None:
        setting = os.environ.get("IPL_COMPILE", "")
        compiled = setting == "1" if setting in ("0", "1") else work >= threshold
    return compiled


def _reducer(compiled: bool | None, work: int):
    return _compiled_reduce if _use_compiled(compiled, work) else reduce_logits


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
    ``torch.compile``d code (one fused loop) instead of eager ops.

    Returns:
        ``entropy`` ``[rows]``; with ``topk``, ``topk_id`` and ``topk_prob`` ``[rows, K]``.
    """
    rows, vocab, dtype = len(x), lens.vocab_size, lens.reduce_dtype
    columns = columns or tile_columns(rows, vocab)
    starts = range(0, vocab, columns)
    tiles, k, device = len(starts), min(topk, columns), x.device
    top, log_total, mean = (torch.empty(tiles, rows, dtype=dtype, device=device) for _ in range(3))
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
        if compiled and _tile_sums(z, dtype, (top[i], log_total[i], mean[i])):
            continue
        zf = z if work is None else work[: z.numel()].view(shape).copy_(z)
        torch.amax(zf, -1, out=top[i])
        zf.sub_(top[i, :, None])  # <= 0, 0 at the tile's max
        p = torch.softmax(zf, -1, out=probs[: z.numel()].view(shape))
        torch.amax(p, -1, out=log_total[i])  # 1 / S_t: the max's probability in its tile
        log_total[i].log_().neg_()
        torch.linalg.vecdot(p, zf, out=mean[i])  # sum p (z - m_t) <= 0
    lse_t = top + log_total  # [tiles, rows]
    lse = torch.logsumexp(lse_t, 0)
    mass = (lse_t - lse).exp_()
    out = {"entropy": (mass * (log_total - mean + (lse - lse_t))).sum(0)}
    if k:
        offsets = torch.tensor(list(starts), device=device)[:, None, None]
        merged = best.to(dtype).permute(1, 0, 2).reshape(rows, tiles * k)
        value, where = merged.topk(min(topk, tiles * k), dim=-1, sorted=True)
        pool = (ids + offsets).permute(1, 0, 2).reshape(rows, tiles * k)
        out["topk_id"] = pool.gather(-1, where)
        out["topk_prob"] = (value - lse[:, None]).exp()
    return out


def _tile_math(z: torch.Tensor, dtype: torch.dtype):
    # One tile's max, log S_t and sum p (z - m_t), as one expression graph for torch.compile.
    zf = z.to(dtype)
    top = zf.amax(-1, keepdim=True)
    shifted = zf - top
    weights = shifted.exp()
    total = weights.sum(-1)
    return top.squeeze(-1), total.log(), (weights * shifted).sum(-1) / total


# The compiled tile reductions: None until first needed, False once compiling failed or
# computed other numbers than the eager code; the tile shapes and dtypes already checked.
_compiled_tile = None
_checked_tiles: set[tuple] = set()


def _tile_sums(z: torch.Tensor, dtype: torch.dtype, out: tuple[torch.Tensor, ...]) -> bool:
    """Write :func:`_tile_math` of ``z`` into ``out`` through torch.compile; False if it fails.

    The compiled code's first result for each tile shape and dtype is checked against the eager
    code's: with ``ATEN_CPU_CAPABILITY=avx2`` on an AVX-512 CPU, torch 2.13's compiled tile
    gave wrong numbers (found by the benchmark); any mismatch means: run eagerly from then on.
    """
    global _compiled_tile
    if _compiled_tile is None:
        _compiled_tile = torch.compile(_tile_math, dynamic=True)
    if _compiled_tile is False:
        return False
    try:
        values = _compiled_tile(z, dtype)
        shape = (*z.shape, z.dtype, dtype)
        if shape not in _checked_tiles:
            for got, want in zip(values, _tile_math(z, dtype), strict=True):
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, equal_nan=True)
            _checked_tiles.add(shape)
        for target, value in zip(out, values, strict=True):
            target.copy_(value)
    except Exception as err:  # noqa: BLE001 - a compiler failure or wrong code: run eagerly
        _log.warning("compiled tile reductions unusable (%s); using the eager ones", err)
        _compiled_tile = False
        return False
    return True


def _tiled_site_stats(lens, acts, sites, index, topk, chunk_tokens, compiled):
    # Without extras: up to chunk_tokens stacked rows per product, reduced tile by tile, so
    # that neither the logits nor the reductions' temporaries are vocabulary-sized; memory
    # follows the tile, not the rows.
    n = len(index[0])
    rows, group = chunk_plan(n, len(sites), chunk_tokens, False)
    columns = tile_columns(rows * group, lens.vocab_size)
    out = {key: _allocate(lens, n, False, topk) for key in sites}
    with lens.reused_output(rows * group, columns):
        for part in _chunks(n, rows):
            for start in range(0, len(sites), group):
                block = sites[start : start + group]
                stacked = torch.stack(
                    [lens.inputs(_rows(acts, k, index, part, lens), *k) for k in block]
                )
                stats = tiled_stats(lens, stacked.flatten(0, 1), topk, columns, compiled)
                size = part.stop - part.start
                stats = {name: v.unflatten(0, (len(block), size)) for name, v in stats.items()}
                _store(out, block, part, stats)
    return {key: {name: v.cpu().numpy() for name, v in cols.items()} for key, cols in out.items()}


def _compiled_reduce(
    logits, dtype, next_ids=None, final_logp=None, final_top=None, topk=0
) -> Stats:
    """:func:`reduce_logits` through ``torch.compile``; the eager path if compiling fails."""
    global _compiled_fused
    if _compiled_fused is None:
        _compiled_fused = torch.compile(_fused, dynamic=True)
    if _compiled_fused is not False:
        try:
            return _compiled_fused(logits, dtype, next_ids, final_logp, final_top, topk)
        except Exception as err:  # noqa: BLE001 - any compiler failure means: run eagerly
            _log.info("torch.compile failed (%s); using the eager reductions", err)
            _compiled_fused = False
    return reduce_logits(logits, dtype, next_ids, final_logp, final_top, topk)


def _final_key(keys: Iterable[SiteKey]) -> SiteKey:
    found = [key for key in keys if key[0] == "final"]
    if not found:
        raise ValueError("the extras need the 'final' site among the keys")
    return found[0]


def _block(lens, acts, block, index, part, reduce, *extras) -> Stats:
    stacked = torch.stack([lens.inputs(_rows(acts, k, index, part, lens), *k) for k in block])
    logits = lens.logits(stacked.flatten(0, 1), None)  # [sites * rows, vocab]
    logits = logits.view(len(block), -1, logits.shape[-1])  # [sites, rows, vocab]
    return reduce(logits, lens.reduce_dtype, *extras)


def _final_block(lens, acts, final, index, part, reduce, next_ids, out):
    # The final policy of a chunk's rows: its own statistics, and what every site shares.
    logits = lens.logits(_rows(acts, final, index, part, lens), "final")  # [rows, vocab]
    shared = final_policy(logits, lens.reduce_dtype)
    _store(out, [final], part, reduce(logits[None], lens.reduce_dtype, next_ids, *shared))
    return shared


def _allocate(lens: Lens, n: int, extras: bool, topk: int) -> Stats:
    device = lens.weight.device
    out = {"entropy": torch.empty(n, dtype=lens.out_dtype, device=device)}
    if extras:
        out[EXTRA_COLUMNS[0]] = torch.empty(n, dtype=lens.out_dtype, device=device)
        out[EXTRA_COLUMNS[1]] = torch.empty(n, dtype=torch.long, device=device)
        out[EXTRA_COLUMNS[2]] = torch.empty(n, dtype=lens.out_dtype, device=device)
        out[EXTRA_COLUMNS[3]] = torch.empty(n, dtype=torch.bool, device=device)
    if topk:
        out["topk_id"] = torch.empty(n, topk, dtype=torch.long, device=device)
        out["topk_prob"] = torch.empty(n, topk, dtype=lens.out_dtype, device=device)
    return out


def _store(out: dict[SiteKey, Stats], keys: Sequence[SiteKey], part: slice, stats: Stats) -> None:
    for name, value in stats.items():  # [sites, rows] (or [sites, rows, K])
        for i, key in enumerate(keys):
            out[key][name][part] = value[i]


def _chunks(n: int, size: int) -> Iterable[slice]:
    return (slice(i, min(i + size, n)) for i in range(0, n, max(size, 1)))


def _rows(acts, key: SiteKey, index, part: slice, lens: Lens) -> torch.Tensor:
    x = acts[key]  # [batch, pos, d_model], on its layer's device (device_map may split layers)
    rows_b, rows_t = index
    rows = x[rows_b[part].to(x.device), rows_t[part].to(x.device)]  # [rows, d_model]
    return rows.to(lens.weight.device)


COSINE_COLUMNS: tuple[str, ...] = ("cos_attn", "cos_ffn")
"""Per token and layer: how each module's write lines up with the stream it is added to."""


def cosine_keys(layers: Iterable[int], parallel: bool) -> list[SiteKey]:
    """The vectors :func:`residual_cosines` reads for ``layers``, all keyed by their own layer.

    ``resid_pre`` is captured at the layer's input (not as ``resid_post[l-1]``), so that every
    vector of a layer falls in the same layer group of the memory-bounded forward.
    """
    sites = (
        ("resid_pre", "attn_out", "mlp_out")
        if parallel
        else (
            "resid_pre",
            "attn_out",
            "resid_mid",
            "mlp_out",
        )
    )
    return [(site, layer) for layer in layers for site in sites]


@torch.no_grad()
def residual_cosines(
    acts: dict[SiteKey, torch.Tensor],
    layer: int,
    index: tuple[torch.Tensor, torch.Tensor],
    parallel: bool,
) -> dict[str, np.ndarray]:
    """``cos_attn`` and ``cos_ffn`` (float64, ``[n]``) of ``layer`` at the rows of ``index``.

    ``cos_attn = cos(attn_out, resid_pre)``; ``cos_ffn = cos(mlp_out, resid_mid)``, the stream
    the FFN's write is added to. In a parallel block (GPT-NeoX) both modules read and write
    ``resid_pre`` and there is no ``resid_mid``: there ``cos_ffn = cos(mlp_out, resid_pre)``.
    Negative: the module suppresses the stream's direction; near 0: it writes new, orthogonal
    features; positive: it amplifies. NaN where a vector is zero.
    """

    def rows(site: str) -> torch.Tensor:
        x = acts[site, layer]  # [batch, pos, d_model]
        return x[index[0].to(x.device), index[1].to(x.device)].double()  # [n, d_model]

    def cosine(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
        return ((a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))).cpu().numpy()

    stream = rows("resid_pre")
    mid = stream if parallel else rows("resid_mid")
    return {"cos_attn": cosine(rows("attn_out"), stream), "cos_ffn": cosine(rows("mlp_out"), mid)}
