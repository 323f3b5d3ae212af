"""The Triton kernel: one pass over float32 logits rows to entropy, top-k and the extras.

Each program reads one logits row once, tile by tile (``BLOCK`` columns), applies the lens's
bias and the model's head transformation (Granite's scaling, Gemma's soft-capping) on the fly,
and keeps on chip the running max ``m``, ``S = sum exp(z - m)`` and ``T = sum (z - m) exp(z - m)``.
A new tile with a larger max ``m'`` rescales them exactly: with ``a = exp(m - m')``,
``S' = a S + ...`` and ``T' = a (T + (m - m') S) + ...``; entropy is ``log S - T / S`` (small
terms, no large-minus-large cancellation). The top-k is kept as K (value, id) pairs: a tile
whose max is above the current K-th value hands over its candidates one at a time (repeated
max-and-mask), which after the first tiles is rarely more than a few. The extras read the final
policy's log-probabilities ``log q`` of the same token row and add
``U = sum (z - m - log q) exp(z - m)`` (rescaled as ``T``): ``KL(p || q) = U / S - log S``;
the next token's logit (loaded first) gives its log-probability and, counted on the way, its
rank; the running argmax gives the top-1 agreement. The varentropy keeps
``V = sum exp(z - m) (z - mu)^2`` around the running mean ``mu = T / S`` and merges each tile's
own ``V_t`` (around the tile's mean) exactly: ``V' = a V + V_t + d^2 a S W_t / (a S + W_t)``,
``d`` the difference of the two means, ``W_t`` the tile's weight (nonnegative terms only).

Importing this module imports Triton; under ``TRITON_INTERPRET=1`` (set before the import) the
kernel runs on CPU tensors through Triton's interpreter, which is how it is tested without a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import KERNEL_MAX_TOPK, Capability, Stats

_EXTRAS = ("next_token_logprob", "next_token_rank", "kl_internal_final", "top1_agrees")
CAPABILITY = Capability(
    frozenset({"entropy", "varentropy", *_EXTRAS}),
    max_topk=KERNEL_MAX_TOPK,
    together=frozenset(_EXTRAS),
)
"""Entropy, and the extras against the final policy with next tokens, all four at once."""

# Columns per tile on a GPU (a tile of float32 logits per program); tests pass narrower tiles.
BLOCK = 2048


@triton.jit
def _head(z, scale, cap, SCALED: tl.constexpr, CAPPED: tl.constexpr):
    # The model's head transformation: z / scale, then cap * tanh(z / cap).
    if SCALED:
        z = z / scale
    if CAPPED:
        z = cap * (1.0 - 2.0 / (tl.exp(2.0 * (z / cap)) + 1.0))
    return z


@triton.jit
def _row_stats(
    Z, stride_z, vocab, BIAS, scale, cap,
    NEXT, LOGQ, stride_q, final_rows, FINAL_TOP,
    ENT, LOGPROB, RANK, KL, AGREE, TOP_V, TOP_I, VARENT,
    HAS_BIAS: tl.constexpr, SCALED: tl.constexpr, CAPPED: tl.constexpr,
    EXTRAS: tl.constexpr, K: tl.constexpr, KP: tl.constexpr, BLOCK: tl.constexpr,
    SPREAD: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    z_row = Z + row.to(tl.int64) * stride_z
    cols = tl.arange(0, BLOCK)
    slots = tl.arange(0, KP)
    # The running max starts below every logit yet finite: exp(m0 - m) is 0, and (m0 - m) * S
    # with S = 0 is 0 (with -inf it would be NaN). A literal: kernels read no Python globals.
    m = tl.full((), -1.0e30, tl.float32)
    s = tl.zeros((), tl.float32)
    t = tl.zeros((), tl.float32)
    u = tl.zeros((), tl.float32)
    v = tl.zeros((), tl.float32)
    top_v = tl.where(slots < K, float("-inf"), float("inf"))  # padding slots never replaced
    top_i = tl.zeros([KP], tl.int64)
    above = tl.zeros((), tl.int32)
    best_v = tl.full((), float("-inf"), tl.float32)
    best_i = tl.zeros((), tl.int64)
    if EXTRAS:
        frow = row % final_rows  # rows are stacked [sites, rows]: row r is token row r % rows
        nxt = tl.load(NEXT + frow)
        at = tl.maximum(nxt, 0)
        target = tl.load(z_row + at).to(tl.float32)
        if HAS_BIAS:
            target += tl.load(BIAS + at).to(tl.float32)
        target = _head(target, scale, cap, SCALED, CAPPED)
        q_row = LOGQ + frow.to(tl.int64) * stride_q
    for start in range(0, vocab, BLOCK):
        offs = start + cols
        mask = offs < vocab
        z = tl.load(z_row + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            z += tl.load(BIAS + offs, mask=mask, other=0.0).to(tl.float32)
        z = tl.where(mask, _head(z, scale, cap, SCALED, CAPPED), float("-inf"))
        tile_max = tl.max(z, 0)
        new_m = tl.maximum(m, tile_max)
        shift = m - new_m  # <= 0
        alpha = tl.exp(shift)
        zs = tl.where(mask, z - new_m, 0.0)  # [BLOCK] <= 0
        e = tl.where(mask, tl.exp(zs), 0.0)
        if SPREAD:  # sum e (z - mu)^2 around the mean mu, merged with the tile's (Chan et al.)
            w_t = tl.sum(e, 0)
            mu_t = tl.where(w_t > 0, tl.sum(zs * e, 0) / tl.where(w_t > 0, w_t, 1.0), 0.0)
            dev = tl.where(mask, zs - mu_t, 0.0)
            v_t = tl.sum(dev * dev * e, 0)
            s_old = alpha * s
            mu_old = tl.where(s > 0, t / tl.where(s > 0, s, 1.0) + shift, 0.0)  # to the new max
            step = mu_t - mu_old
            both = (s_old > 0) & (w_t > 0)
            v = alpha * v + v_t + tl.where(both, step * step * (s_old * w_t / (s_old + w_t)), 0.0)
        t = alpha * (t + shift * s) + tl.sum(zs * e, 0)
        if EXTRAS:
            logq = tl.load(q_row + offs, mask=mask, other=0.0)
            u = alpha * (u + shift * s) + tl.sum((zs - logq) * e, 0)
            above += tl.sum((z > target).to(tl.int32), 0)
            where = start + tl.argmax(z, 0)
            best_i = tl.where(tile_max > best_v, where.to(tl.int64), best_i)
            best_v = tl.maximum(best_v, tile_max)
        s = alpha * s + tl.sum(e, 0)
        m = new_m
        if K > 0:
            kth = tl.min(top_v, 0)
            if tile_max > kth:  # after the first tiles, rarely: most tiles end here
                cand = tl.where(z > kth, z, float("-inf"))
                best = tl.max(cand, 0)
                while best > kth:  # hand over the tile's candidates, largest first
                    j = tl.argmax(cand, 0)
                    slot = tl.argmin(top_v, 0)
                    top_v = tl.where(slots == slot, best, top_v)
                    top_i = tl.where(slots == slot, (start + j).to(tl.int64), top_i)
                    cand = tl.where(cols == j, float("-inf"), cand)
                    kth = tl.min(top_v, 0)
                    best = tl.max(cand, 0)
    log_s = tl.log(s)
    tl.store(ENT + row, log_s - t / s)
    if SPREAD:
        tl.store(VARENT + row, v / s)
    if EXTRAS:
        tl.store(LOGPROB + row, target - m - log_s)
        tl.store(RANK + row, above.to(tl.int64) + 1)
        tl.store(KL + row, u / s - log_s)
        tl.store(AGREE + row, (best_i == tl.load(FINAL_TOP + frow)).to(tl.int8))
    if K > 0:
        top_v = tl.where(slots < K, top_v, float("-inf"))
        for r in tl.static_range(K):  # most probable first
            value = tl.max(top_v, 0)
            slot = tl.argmax(top_v, 0)
            tl.store(TOP_V + row * K + r, tl.exp(value - m - log_s))
            tl.store(TOP_I + row * K + r, tl.sum(tl.where(slots == slot, top_i, 0), 0))
            top_v = tl.where(slots == slot, float("-inf"), top_v)


def row_stats(
    logits: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    scale: float | None = None,
    cap: float | None = None,
    topk: int = 0,
    next_ids: torch.Tensor | None = None,
    final_logp: torch.Tensor | None = None,
    final_top: torch.Tensor | None = None,
    block: int | None = None,
    wanted: tuple[str, ...] | None = None,
) -> Stats:
    """Statistics of ``softmax(head((logits + bias)))`` per row, in one pass of the kernel.

    Args:
        logits: ``[rows, vocab]`` float32, rows contiguous.
        bias: ``[vocab]`` the lens's bias, added before the head transformation.
        scale: divides the logits (Granite's ``logits_scaling``).
        cap: soft-caps them, ``cap * tanh(z / cap)`` (Gemma's ``final_logit_softcapping``).
        topk: K > 0 adds ``topk_id`` and ``topk_prob`` ``[rows, K]``, most probable first.
        next_ids: ``[final_rows]`` the next token (-1: none); given with the two below, adds
            the extras. Row r is token row ``r % final_rows`` (rows of several sites stacked,
            ``[sites * final_rows]``).
        final_logp: ``[final_rows, vocab]`` float32 log-probabilities of the output policy.
        final_top: ``[final_rows]`` its argmax.
        block: columns per tile (a power of two; default :data:`BLOCK`, at most the vocabulary's
            next power of two).
        wanted: the statistics returned (default: every one the call computes but the
            varentropy, which is computed only when named here).

    Returns:
        ``entropy`` ``[rows]`` (+ ``next_token_logprob``, ``next_token_rank``,
        ``kl_internal_final``, ``top1_agrees``; + the top-k).
    """
    rows, vocab = logits.shape
    device = logits.device
    extras = next_ids is not None
    block = block or min(BLOCK, triton.next_power_of_2(vocab))
    f32 = dict(dtype=torch.float32, device=device)
    out = {"entropy": torch.empty(rows, **f32)}
    empty = out["entropy"]
    spread = wanted is not None and "varentropy" in wanted
    if spread:
        out["varentropy"] = torch.empty(rows, **f32)
    if extras:
        out["next_token_logprob"] = torch.empty(rows, **f32)
        out["next_token_rank"] = torch.empty(rows, dtype=torch.long, device=device)
        out["kl_internal_final"] = torch.empty(rows, **f32)
        out["top1_agrees"] = torch.empty(rows, dtype=torch.int8, device=device)
    if topk:
        out["topk_id"] = torch.empty(rows, topk, dtype=torch.long, device=device)
        out["topk_prob"] = torch.empty(rows, topk, **f32)
    if rows == 0:
        return _finish(out, next_ids, rows, wanted)
    get = out.get
    _row_stats[(rows,)](
        logits, logits.stride(0), vocab, empty if bias is None else bias,
        float(scale or 1.0), float(cap or 1.0),
        next_ids if extras else empty,
        final_logp if extras else empty,
        final_logp.stride(0) if extras else 0,
        len(next_ids) if extras else 1,
        final_top if extras else empty,
        out["entropy"], get("next_token_logprob", empty), get("next_token_rank", empty),
        get("kl_internal_final", empty), get("top1_agrees", empty),
        get("topk_prob", empty), get("topk_id", empty), get("varentropy", empty),
        HAS_BIAS=bias is not None, SCALED=scale is not None, CAPPED=cap is not None,
        EXTRAS=extras, K=topk, KP=max(2, triton.next_power_of_2(topk)), BLOCK=block,
        SPREAD=spread,
    )  # fmt: skip
    return _finish(out, next_ids, rows, wanted)


def _finish(out: Stats, next_ids: torch.Tensor | None, rows: int, wanted) -> Stats:
    # The columns as the other backends give them: NaN and -1 where there is no next token;
    # only those asked for.
    if wanted is not None:
        out = {k: v for k, v in out.items() if k in wanted or k.startswith("topk_")}
    if next_ids is None:
        return out
    has = next_ids[torch.arange(rows, device=next_ids.device) % len(next_ids)] >= 0  # [rows]
    if "next_token_logprob" in out:
        out["next_token_logprob"] = torch.where(has, out["next_token_logprob"], torch.nan)
    if "next_token_rank" in out:
        out["next_token_rank"] = torch.where(has, out["next_token_rank"], -1)
    if "top1_agrees" in out:
        out["top1_agrees"] = out["top1_agrees"].bool()
    return out
