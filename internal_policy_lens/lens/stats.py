"""A batch of encoded inputs -> per-row statistics of every internal policy (the tensor pipeline).

Pads the batch, captures the sites in layer groups (``lens.capture``), reduces each group's
vectors through the reductions' dispatcher (``lens.reduce``) and computes the residual cosines.
:mod:`internal_policy_lens.tables` turns the result into tidy pandas tables.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..config import LensSettings
from ..data.encode import Encoded
from ..model.batch import pad
from ..model.load import PolicyModel
from .capture import captured_blocks
from .reduce import cosine_keys, residual_cosines, site_stats
from .sites import SiteKey, source_key
from .unembed import Lens


@dataclass
class BatchStats:
    """The statistics of a batch's kept rows (``n`` of them).

    Attributes:
        rows_b: ``[n]`` batch row of each kept row.
        rows_t: ``[n]`` its position.
        token_ids: ``[n]`` the token at that position.
        stats: ``distinct key -> column -> [n]`` (``[n, K]`` for the top-k), keyed by the
            vector each site reads (``resid_pre[l]`` is ``resid_post[l-1]``, see ``source_key``).
        cosines: ``layer -> cos_attn / cos_ffn -> [n]`` (with extras).
    """

    rows_b: torch.Tensor
    rows_t: torch.Tensor
    token_ids: np.ndarray
    stats: dict[SiteKey, dict[str, np.ndarray]]
    cosines: dict[int, dict[str, np.ndarray]]


def kept_positions(batch: list[Encoded], mask: torch.Tensor, response_only: bool) -> torch.Tensor:
    """``[batch, pos]``: True at the positions kept (response only: those predicting a response)."""
    keep = mask.bool().cpu().clone()
    if response_only:
        for row, e in enumerate(batch):
            # Position t predicts t+1: keep prompt's last position .. the second-to-last token.
            keep[row, : max(e.response_start - 1, 0)] = False
            keep[row, len(e.input_ids) - 1 :] = False
    return keep


@torch.no_grad()
def batch_stats(
    model: PolicyModel,
    projector: Lens,
    batch: list[Encoded],
    keys: list[SiteKey],
    settings: LensSettings,
    response_only: bool,
    extras: bool,
    topk: int,
) -> BatchStats:
    """Entropy (+ extras, cosines and top-k) of every distinct vector of ``keys`` in ``batch``."""
    ids, mask = pad(
        [e.input_ids for e in batch], model.tokenizer.pad_token_id, model.device, side="right"
    )
    distinct = list(dict.fromkeys(source_key(*key) for key in keys))  # each vector once
    keep = kept_positions(batch, mask, response_only)  # [batch, pos]
    rows_b, rows_t = keep.nonzero(as_tuple=True)
    token_ids = ids[rows_b, rows_t].cpu().numpy().astype(np.int64)
    out = BatchStats(rows_b, rows_t, token_ids, {}, {})
    if len(rows_b) == 0:
        return out
    next_ids = torch.full_like(ids, -1)
    next_ids[:, :-1] = torch.where(mask[:, 1:].bool(), ids[:, 1:], -1)
    next_ids = next_ids[rows_b, rows_t] if extras else None
    # With extras the final policy is needed for every site: it joins every layer group.
    shared = ("final", model.n_layers - 1) if extras else None
    length = int(rows_t.max()) + 1  # later positions cannot change the kept ones (causal)
    # The residual cosines' vectors, keyed by their own layer so that a layer group holds them.
    cos_layers = sorted({layer for site, layer in keys if site != "final"}) if extras else []
    captured = list(dict.fromkeys(distinct + cosine_keys(cos_layers, model.parallel)))
    blocks = captured_blocks(model, ids, mask, captured, settings, length=length, shared=shared)
    for group, acts, start in blocks:
        end = start + next(iter(acts.values())).shape[1]
        sel = ((rows_t >= start) & (rows_t < end)).nonzero().squeeze(1)
        if len(sel) == 0:
            continue
        index = (rows_b[sel], rows_t[sel] - start)
        at = sel.numpy()
        for layer in sorted({lay for site, lay in group if site != "final" and lay in cos_layers}):
            into = out.cosines.setdefault(layer, {})
            for name, values in residual_cosines(acts, layer, index, model.parallel).items():
                into.setdefault(name, np.empty(len(rows_b)))[at] = values
        part = site_stats(
            projector,
            acts,
            [key for key in group if key in distinct or key == shared],
            index,
            next_ids=None if next_ids is None else next_ids[sel],
            topk=topk,
            chunk_tokens=settings.chunk_tokens,
        )
        del acts
        for key, columns in part.items():
            into = out.stats.setdefault(key, {})
            for name, values in columns.items():
                shape = (len(rows_b), *values.shape[1:])  # [n] or [n, K]
                into.setdefault(name, np.empty(shape, values.dtype))[at] = values
    return out
