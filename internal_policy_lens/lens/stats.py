"""A batch of encoded inputs -> per-row statistics of every internal policy (the tensor pipeline).

Pads the batch and runs the decoder once (``lens.capture.streamed_rows``): each site's kept rows
are gathered as its layer computes them and reduced through the reductions' dispatcher
(``lens.reduce``) whenever the gathered rows reach the ``capture_mb`` budget, so that what a
batch holds is bounded by design, not by running the decoder again. Statistics against the
final policy (the extras' KL and top-1 agreement) take a first pass for its inputs (``final``'s
kept rows): two passes. :mod:`internal_policy_lens.tables` turns the result
into tables.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..config import LensSettings
from ..data.encode import Encoded
from ..model.batch import pad
from ..model.load import PolicyModel
from ..statistics import Request
from .capture import streamed_rows
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
        cosines: ``layer -> cos_attn / cos_ffn -> [n]`` (when asked for).
        passes: forward passes of the decoder (position blocks counted once per pass).
    """

    rows_b: torch.Tensor
    rows_t: torch.Tensor
    token_ids: np.ndarray
    stats: dict[SiteKey, dict[str, np.ndarray]]
    cosines: dict[int, dict[str, np.ndarray]]
    passes: int = 0


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
    lens: Lens,
    batch: list[Encoded],
    keys: list[SiteKey],
    settings: LensSettings,
    response_only: bool,
    request: Request,
    cosines: bool = False,
) -> BatchStats:
    """``request``'s statistics (and the cosines) of every distinct vector of ``keys`` in ``batch``.

    Statistics against the final policy take a first pass for its inputs.
    """
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
    rows = (rows_b, rows_t)
    reference = None
    next_ids = None
    if request.needs("next_token"):
        next_ids = next_tokens(ids, mask)[rows_b, rows_t]
    if request.needs("reference"):
        # The first pass: the final policy's inputs at the kept rows, [n, d_model].
        final = ("final", model.n_layers - 1)
        inputs = gathered_rows(model, ids, mask, [final], rows, settings)[final]
        out.passes += 1
        distinct = [key for key in distinct if key != final]
        reference = (final, inputs)
    cos_layers = sorted({layer for site, layer in keys if site != "final"}) if cosines else []
    sink = _Gathered(lens, out, settings, request, model.parallel, reference, next_ids)
    sink.wanted(distinct, cosine_keys(cos_layers, model.parallel))
    streamed_rows(model, ids, mask, sink.hooked, rows, settings, sink.add, sink.flush)
    out.passes += 1
    return out


def next_tokens(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[batch, pos]``: the token after each position (-1 after the last, and on padding)."""
    nxt = torch.full_like(ids, -1)
    nxt[:, :-1] = torch.where(mask[:, 1:].bool(), ids[:, 1:], -1)
    return nxt


def gathered_rows(
    model: PolicyModel,
    ids: torch.Tensor,
    mask: torch.Tensor,
    keys: list[SiteKey],
    rows: tuple[torch.Tensor, torch.Tensor],
    settings: LensSettings,
) -> dict[SiteKey, torch.Tensor]:
    """``key -> [n, d_model]``: the vectors of ``keys`` at the ``n`` kept ``rows``, one pass."""
    n = len(rows[0])
    out = {k: torch.empty(n, model.d_model, dtype=model.dtype, device=model.device) for k in keys}

    def keep(key, x, at):
        out[key][at.to(out[key].device)] = x.to(out[key].device)

    streamed_rows(model, ids, mask, keys, rows, settings, keep)
    return out


class _Gathered:
    """The kept rows of the sites gathered during a pass, reduced when they reach the budget.

    Statistics go to ``out.stats`` by key (``final`` too, when it is the reference), cosines to
    ``out.cosines`` by layer as soon as a layer's vectors are in. ``reference``: the final key
    and its inputs ``[n, d_model]``; ``next_ids``: the next tokens ``[n]``.
    """

    def __init__(self, lens, out, settings, request, parallel, reference=None, next_ids=None):
        self.lens, self.out, self.request, self.parallel = lens, out, request, parallel
        self.chunk_tokens = settings.chunk_tokens
        self.budget = settings.capture_mb * 2**20
        self.reference, self.next_ids = reference, next_ids
        self.pending: dict[SiteKey, torch.Tensor] = {}
        self.cosine: dict[SiteKey, torch.Tensor] = {}

    def wanted(self, distinct: list[SiteKey], cosines: list[SiteKey]) -> None:
        """The keys reduced and the keys whose vectors the cosines read."""
        self.reduced, self.cosine_keys = set(distinct), set(cosines)
        self.hooked = list(dict.fromkeys(distinct + cosines))

    def add(self, key: SiteKey, rows: torch.Tensor, at: torch.Tensor) -> None:
        """Take ``rows`` ``[m, d_model]`` of ``key`` (the rows ``at`` of the pass's block)."""
        if key in self.cosine_keys:
            self.cosine[key] = rows
            self._cosines(key[1], at)
        if key in self.reduced:
            self.pending[key] = rows
            held = sum(x.numel() * x.element_size() for x in self.pending.values())
            if held >= self.budget:
                self.flush(at)

    def flush(self, at: torch.Tensor) -> None:
        """Reduce the pending rows (all of one block, the rows ``at``) into ``out.stats``."""
        if not self.pending:
            return
        keys = list(self.pending)
        acts = {key: x.unsqueeze(0) for key, x in self.pending.items()}  # [1, m, d_model]
        self.pending = {}
        index = _all_rows(len(at), acts[keys[0]].device)
        if self.reference is not None:  # the final policy joins every reduction
            final, inputs = self.reference
            acts[final] = inputs[at.to(inputs.device)].unsqueeze(0)
            keys.append(final)
        part = site_stats(
            self.lens,
            acts,
            keys,
            index,
            self.request,
            next_ids=None if self.next_ids is None else self.next_ids[at],
            chunk_tokens=self.chunk_tokens,
        )
        n, idx = len(self.out.rows_b), at.numpy()
        for key, columns in part.items():
            into = self.out.stats.setdefault(key, {})
            for name, values in columns.items():
                shape = (n, *values.shape[1:])  # [n] or [n, K]
                into.setdefault(name, np.empty(shape, values.dtype))[idx] = values

    def _cosines(self, layer: int, at: torch.Tensor) -> None:
        needed = cosine_keys([layer], self.parallel)
        if not all(key in self.cosine for key in needed):
            return
        acts = {key: self.cosine.pop(key).unsqueeze(0) for key in needed}  # [1, m, d_model]
        index = _all_rows(len(at), acts[needed[0]].device)
        into = self.out.cosines.setdefault(layer, {})
        for name, values in residual_cosines(acts, layer, index, self.parallel).items():
            into.setdefault(name, np.empty(len(self.out.rows_b)))[at.numpy()] = values


def _all_rows(m: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The index of every row of gathered vectors ``[1, m, d_model]``."""
    return torch.zeros(m, dtype=torch.long, device=device), torch.arange(m, device=device)
