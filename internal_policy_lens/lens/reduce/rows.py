"""Whole logits rows reduced in one fused pass: the path with extras, and a top-k above 5.

Each logits row is reduced in two passes: its max ``m``, then ``S = sum exp(z - m)`` together
with the other sums. Entropy is ``H = log S - sum exp(z - m) (z - m) / S``; the next token's
log-probability is ``z_t - m - log S`` and its rank ``1 + #{j: z_j > z_t}``; with ``log q`` the
final policy (or another reference policy), ``KL(p || q) = sum exp(z - m) (z - m - log q) / S -
log S`` and, the other way round, ``KL(q || p) = sum q (log q - z + m) + log S``. The same function
runs eagerly (in row slices that bound its temporaries) or compiled (:mod:`.compiled`).

With extras, the final policy's log-probabilities for a chunk's rows are formed once and shared
by every site. With ``topk`` K, the same pass keeps each row's K largest logits and their ids,
as probabilities ``exp(z - m - log S)``: ``[rows, K]`` per chunk, no second product.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import numpy as np
import torch

from ..sites import SiteKey
from ..unembed import Lens
from .common import (
    Stats,
    allocate,
    chunk_plan,
    chunks,
    rows_of,
    stacked_inputs,
    stat_columns,
    store,
    to_numpy,
)

# Elements of a row slice reduced at once on the eager path (its temporaries are a few of these).
_EAGER_ELEMENTS = 1 << 22

Reducer = Callable[..., Stats]


def rows_site_stats(
    lens: Lens,
    acts: dict[SiteKey, torch.Tensor],
    sites: Sequence[SiteKey],
    final: SiteKey | None,
    index: tuple[torch.Tensor, torch.Tensor],
    next_ids: torch.Tensor | None,
    topk: int,
    chunk_tokens: int,
    reduce: Reducer,
    kl_from: bool = False,
) -> dict[SiteKey, dict[str, np.ndarray]]:
    """:func:`~.dispatch.site_stats` on whole logits rows, reduced by ``reduce``.

    ``final`` is the reference policy of the KL columns and ``top1_agrees`` (any site); the
    next-token columns come with ``next_ids``; ``kl_from`` adds ``kl_from_final``.
    """
    n = len(index[0])
    # A small call forms at most n logits rows at once: its memory follows its work.
    rows, group = chunk_plan(n, len(sites), min(chunk_tokens, max(n, 1)), final is not None)
    reduce = partial(reduce, topk=topk, kl_from=kl_from)
    keys = [*sites, *([final] if final is not None else [])]
    columns = stat_columns(next_ids is not None, final is not None, kl_from)
    out = {key: allocate(lens, n, columns, topk) for key in keys}
    with lens.reused_output(rows * group):  # each chunk's logits are reduced before the next
        for part in chunks(n, rows):
            nxt = None if next_ids is None else next_ids[part].to(lens.weight.device)
            shared = ()
            if final is not None:
                shared = _final_block(lens, acts, final, index, part, reduce, nxt, out)
            for start in range(0, len(sites), group):
                block = sites[start : start + group]
                logits = lens.logits(stacked_inputs(lens, acts, block, index, part), None)
                logits = logits.view(len(block), -1, logits.shape[-1])  # [sites, rows, vocab]
                store(out, block, part, reduce(logits, lens.reduce_dtype, nxt, *shared))
    return to_numpy(out)


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
    kl_from: bool = False,
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
        kl_from: with ``final_logp``, adds ``kl_from_final`` = KL(final || internal).

    Returns:
        ``column -> [sites, rows]`` (``[sites, rows, K]`` for the top-k).
    """
    sites, rows, vocab = logits.shape
    site_step = max(1, _EAGER_ELEMENTS // (rows * vocab))
    row_step = rows if site_step > 1 else max(1, _EAGER_ELEMENTS // vocab)
    blocks = []
    for site_part in chunks(sites, site_step):
        parts = [
            fused_stats(
                logits[site_part, part],
                dtype,
                None if next_ids is None else next_ids[part],
                None if final_logp is None else final_logp[part],
                None if final_top is None else final_top[part],
                topk,
                kl_from,
            )
            for part in chunks(rows, row_step)
        ]
        blocks.append({name: torch.cat([p[name] for p in parts], dim=1) for name in parts[0]})
    return {name: torch.cat([b[name] for b in blocks]) for name in blocks[0]}


def fused_stats(logits, dtype, next_ids, final_logp, final_top, topk=0, kl_from=False) -> Stats:
    """The reductions as one expression graph; torch.compile fuses them into two loops per row."""
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
        if kl_from:
            out["kl_from_final"] = (final_logp.exp() * (final_logp - shifted)).sum(-1) + log_total
    if final_top is not None:
        out["top1_agrees"] = z.argmax(-1) == final_top
    if topk:
        # On the logits as formed (upcasting is exact, so the same order): selecting from
        # ``z`` would make the compiled graph materialise it, [sites, rows, vocab] in ``dtype``.
        best, ids = logits.topk(topk, dim=-1, sorted=True)  # [sites, rows, K]
        out["topk_id"] = ids
        out["topk_prob"] = (best.to(dtype) - top - log_total.unsqueeze(-1)).exp()
    return out


def _final_block(lens, acts, final, index, part, reduce, next_ids, out):
    # The reference policy of a chunk's rows: its own statistics, and what every site shares.
    x = lens.inputs(rows_of(acts, final, index, part, lens), *final)
    logits = lens.logits(x, None)  # [rows, vocab]
    shared = final_policy(logits, lens.reduce_dtype)
    store(out, [final], part, reduce(logits[None], lens.reduce_dtype, next_ids, *shared))
    return shared
