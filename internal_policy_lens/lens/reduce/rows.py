"""Whole logits rows reduced in one fused pass: every statistic, any top-k, any reference.

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

from ...statistics import STATISTICS, Request
from ..sites import SiteKey
from ..unembed import Lens
from .common import (
    Capability,
    Stats,
    allocate,
    chunk_plan,
    chunks,
    rows_of,
    stacked_inputs,
    store,
    to_numpy,
)

# Elements of a row slice reduced at once on the eager path (its temporaries are a few of these).
_EAGER_ELEMENTS = 1 << 22

Reducer = Callable[..., Stats]


CAPABILITY = Capability(
    frozenset(
        {
            "entropy",
            "next_token_logprob",
            "next_token_rank",
            "kl_internal_final",
            "top1_agrees",
            "kl_final_internal",
            "varentropy",
            "nucleus_size",
        }
    ),
    other_reference=True,
    temperature=True,
)
"""Every statistic: whole rows are the reference implementation of each."""


def rows_site_stats(
    lens: Lens,
    acts: dict[SiteKey, torch.Tensor],
    sites: Sequence[SiteKey],
    final: SiteKey | None,
    index: tuple[torch.Tensor, torch.Tensor],
    next_ids: torch.Tensor | None,
    request: Request,
    chunk_tokens: int,
    reduce: Reducer,
) -> dict[SiteKey, dict[str, np.ndarray]]:
    """:func:`~.dispatch.site_stats` on whole logits rows, reduced by ``reduce``.

    ``final`` is the reference policy of the statistics that need one (any site); the
    next-token statistics read ``next_ids``.
    """
    n = len(index[0])
    # A small call forms at most n logits rows at once: its memory follows its work.
    rows, group = chunk_plan(n, len(sites), min(chunk_tokens, max(n, 1)), final is not None)
    reduce = partial(reduce, topk=request.topk, wanted=_wanted(request))
    keys = [*sites, *([final] if final is not None else [])]
    out = {key: allocate(lens, n, request) for key in keys}
    with lens.reused_output(rows * group):  # each chunk's logits are reduced before the next
        for part in chunks(n, rows):
            nxt = None if next_ids is None else next_ids[part].to(lens.weight.device)
            reference = ()
            if final is not None:
                reference = _reference_rows(lens, acts, final, index, part, reduce, nxt, out)
            for start in range(0, len(sites), group):
                group_keys = sites[start : start + group]
                x = stacked_inputs(lens, acts, group_keys, index, part)
                logits = lens.logits(x, None).view(len(group_keys), -1, lens.vocab_size)
                store(out, group_keys, part, reduce(logits, lens.reduce_dtype, nxt, *reference))
    return to_numpy(out)


def _wanted(request: Request) -> tuple:
    # The statistics beyond the entropy, and their parameters, as the reductions take them.
    names = tuple(name for name in request.statistics if name != "entropy")
    params = tuple((p, request.parameter(p)) for n in names for p in STATISTICS[n].parameters)
    return names, params


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
    wanted: tuple = ((), ()),
) -> Stats:
    """Statistics of the policies ``softmax(logits)``, reduced in ``dtype`` (the eager path).

    Args:
        logits: ``[sites, rows, vocab]``.
        dtype: dtype of the reductions (float32 or float64).
        next_ids: ``[rows]`` the actual next token (-1 where there is none), for
            ``next_token_logprob`` and ``next_token_rank`` (1 = the policy's top token).
        final_logp: ``[rows, vocab]`` log-probabilities of the reference policy, for
            ``kl_internal_final`` = KL(internal ‖ final) and ``kl_final_internal``.
        final_top: ``[rows]`` argmax of the reference policy, for ``top1_agrees``.
        topk: K > 0 adds ``topk_id`` and ``topk_prob``, ``[sites, rows, K]``, most probable first.
        wanted: the statistics besides the entropy (names, see
            :data:`~internal_policy_lens.statistics.STATISTICS`) and their parameters'
            ``(name, value)`` pairs.

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
                wanted,
            )
            for part in chunks(rows, row_step)
        ]
        blocks.append({name: torch.cat([p[name] for p in parts], dim=1) for name in parts[0]})
    return {name: torch.cat([b[name] for b in blocks]) for name in blocks[0]}


def fused_stats(logits, dtype, next_ids, final_logp, final_top, topk=0, wanted=((), ())) -> Stats:
    """The reductions as one expression graph; torch.compile fuses them into two loops per row.

    ``wanted``: see :func:`reduce_logits`.
    """
    names, params = wanted
    z = logits.to(dtype)  # [sites, rows, vocab]
    top = z.amax(-1, keepdim=True)
    shifted = z - top
    weights = shifted.exp()
    total = weights.sum(-1)
    log_total = total.log()
    mean = (weights * shifted).sum(-1) / total  # E_p[z - m]
    out = {"entropy": log_total - mean}
    if "varentropy" in names:  # Var_p[z]: around the mean, a sum of nonnegative terms
        out["varentropy"] = (weights * (shifted - mean.unsqueeze(-1)).square()).sum(-1) / total
    if "next_token_logprob" in names or "next_token_rank" in names:
        has_next = next_ids >= 0
        idx = next_ids.clamp(min=0).expand(z.shape[:2]).unsqueeze(-1)  # [sites, rows, 1]
        target = z.gather(-1, idx)
        if "next_token_logprob" in names:
            logprob = (target - top).squeeze(-1) - log_total
            out["next_token_logprob"] = torch.where(has_next, logprob, torch.nan)
        if "next_token_rank" in names:
            rank = (z > target).sum(-1) + 1
            out["next_token_rank"] = torch.where(has_next, rank, -1)
    if "nucleus_size" in names:  # the sorted row: no accumulator over tiles gives it
        p = (weights / total.unsqueeze(-1)).sort(-1, descending=True).values
        short = (p.cumsum(-1) < dict(params)["nucleus_p"]).sum(-1)
        out["nucleus_size"] = (short + 1).clamp(max=z.shape[-1])
    if "kl_internal_final" in names:
        out["kl_internal_final"] = (weights * (shifted - final_logp)).sum(-1) / total - log_total
    if "top1_agrees" in names:
        out["top1_agrees"] = z.argmax(-1) == final_top
    if "kl_final_internal" in names:
        out["kl_final_internal"] = (final_logp.exp() * (final_logp - shifted)).sum(-1) + log_total
    if topk:
        # On the logits as formed (upcasting is exact, so the same order): selecting from
        # ``z`` would make the compiled graph materialise it, [sites, rows, vocab] in ``dtype``.
        best, ids = logits.topk(topk, dim=-1, sorted=True)  # [sites, rows, K]
        out["topk_id"] = ids
        out["topk_prob"] = (best.to(dtype) - top - log_total.unsqueeze(-1)).exp()
    return out


def _reference_rows(lens, acts, final, index, part, reduce, next_ids, out):
    # The reference policy of a chunk's rows: its own statistics, and its log-probabilities and
    # argmax, which every site's reduction reads.
    x = lens.inputs(rows_of(acts, final, index, part, lens), *final)
    logits = lens.logits(x, None)  # [rows, vocab]
    shared = final_policy(logits, lens.reduce_dtype)
    store(out, [final], part, reduce(logits[None], lens.reduce_dtype, next_ids, *shared))
    return shared
