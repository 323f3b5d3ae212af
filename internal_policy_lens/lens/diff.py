"""Two models on the same token ids: their internal policies compared at every site (torch).

For each kept position and (site, layer) key, both models' site vectors go through their own
lens (the same kind for both) and give log-policies ``log p_a`` and ``log p_b`` over the shared
vocabulary. Columns per row: ``entropy_a``, ``entropy_b``, ``kl_a_b`` = KL(a || b) = ``sum_v
p_a(v) (log p_a(v) - log p_b(v))`` and ``kl_b_a`` = KL(b || a), in nats, and ``rank_a`` /
``rank_b``, the rank of the actual next token (1 = top; -1 where there is no next token).

The keys are taken in groups whose captured vectors (both models') fit ``settings.capture_mb``,
one forward pass of each model per group; the logits are formed ``settings.chunk_tokens`` rows at
a time. Statistics are computed in float32, float64 for float64 models.
"""

from __future__ import annotations

import numpy as np
import torch

from ..config import LensSettings
from ..data.encode import Encoded
from ..model.batch import pad
from ..model.load import PolicyModel
from .sites import SiteKey
from .stats import gathered_rows, kept_positions, next_tokens
from .unembed import Lens

DIFF_STATS: tuple[str, ...] = ("entropy_a", "entropy_b", "kl_a_b", "kl_b_a", "rank_a", "rank_b")


@torch.no_grad()
def diff_batch(
    models: tuple[PolicyModel, PolicyModel],
    lenses: tuple[Lens, Lens],
    batch: list[Encoded],
    keys: list[SiteKey],
    settings: LensSettings,
    response_only: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[SiteKey, dict[str, np.ndarray]]]:
    """The kept rows of ``batch`` (batch row, position, token id) and :data:`DIFF_STATS` per key."""
    first = models[0]
    ids, mask = pad(
        [e.input_ids for e in batch], first.tokenizer.pad_token_id, first.device, side="right"
    )
    keep = kept_positions(batch, mask, response_only)  # [batch, pos]
    rows_b, rows_t = keep.nonzero(as_tuple=True)
    nxt = next_tokens(ids, mask)[rows_b, rows_t]  # [n]
    token_ids = ids[rows_b, rows_t].cpu().numpy().astype(np.int64)
    out: dict[SiteKey, dict[str, np.ndarray]] = {}
    n = len(rows_b)
    if n == 0:
        return rows_b.numpy(), rows_t.numpy(), token_ids, out
    per_key = 2 * n * first.d_model * torch.finfo(first.dtype).bits // 8
    size = max(1, int(settings.capture_mb * 2**20 // per_key))
    for start in range(0, len(keys), size):
        group = keys[start : start + size]
        a, b = (
            gathered_rows(m, ids.to(m.device), mask.to(m.device), group, (rows_b, rows_t), settings)
            for m in models
        )
        for key in group:
            out[key] = _compare(lenses, key[0], a[key], b[key], nxt, settings.chunk_tokens)
    return rows_b.numpy(), rows_t.numpy(), token_ids, out


def _compare(lenses, site, xa, xb, nxt, chunk: int) -> dict[str, np.ndarray]:
    """:data:`DIFF_STATS` of one key, ``chunk`` rows of logits at a time."""
    wide = torch.promote_types(lenses[0].out_dtype, lenses[1].out_dtype)
    parts = {name: [] for name in DIFF_STATS}
    for lo in range(0, len(xa), chunk):
        part = slice(lo, lo + chunk)
        la = torch.log_softmax(lenses[0].logits(xa[part], site).to(wide), -1)  # [rows, vocab]
        lb = torch.log_softmax(lenses[1].logits(xb[part], site).to(wide), -1)
        pa, pb = la.exp(), lb.exp()
        parts["entropy_a"].append(-(pa * la).sum(-1))
        parts["entropy_b"].append(-(pb * lb).sum(-1))
        parts["kl_a_b"].append((pa * (la - lb)).sum(-1))
        parts["kl_b_a"].append((pb * (lb - la)).sum(-1))
        target = nxt[part].to(la.device)
        for name, logp in (("rank_a", la), ("rank_b", lb)):
            at = logp.gather(1, target.clamp(min=0)[:, None])  # [rows, 1]
            rank = (logp > at).sum(-1) + 1
            parts[name].append(torch.where(target >= 0, rank, -1))
    return {name: torch.cat(values).cpu().numpy() for name, values in parts.items()}
