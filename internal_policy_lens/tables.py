"""Tidy pandas tables: one row per (sample, position, layer, site), and what derives from them."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from .data import Encoded, encode_inputs
from .engine import site_stats
from .hooks import SiteKey, capture, site_keys
from .lens import EXTRA_COLUMNS, Lens
from .models import PolicyModel
from .sites import MODULES, SITES

TABLE_COLUMNS: tuple[str, ...] = ("sample_id", "position", "token_id", "layer", "site", "entropy")
DELTA_COLUMNS: tuple[str, ...] = ("sample_id", "position", "layer", "module", "delta")
SUMMARY_COLUMNS: tuple[str, ...] = ("quantity", "layer", "name", "mean", "std", "count")


def entropy_table(
    model: PolicyModel,
    inputs: Sequence,
    *,
    lens: str = "raw",
    sites: Iterable[str] | str | None = None,
    layers: Iterable[int] | str | None = None,
    response_only: bool = False,
    extras: bool = False,
    batch_size: int = 8,
    chunk_tokens: int = 1024,
    precision: str = "auto",
    capture_mb: float = 512,
    attention_mb: float = 256,
    progress: bool = False,
) -> pd.DataFrame:
    """Entropy (nats) of every internal policy at every position.

    Args:
        model: from :func:`load_model`.
        inputs: token-id lists (used as given), strings (tokenized as given, no chat template)
            or records ``{"prompt", "response", "sample_id"}`` (chat template applied).
        lens: ``raw`` (paper, no final norm) or ``norm`` (logit lens).
        sites: subset of :data:`SITES` (default all).
        layers: 0-based layers (default all); ``final`` is always stored at layer L-1.
        response_only: keep the positions whose next token is a response token (records only).
        extras: add ``next_token_logprob``, ``next_token_rank`` (1 = top), ``kl_to_final``
            (KL(internal || final), nats) and ``top1_agrees``.
        batch_size: sequences per forward pass.
        chunk_tokens: logits rows formed at once (all sites of a chunk of tokens are stacked
            into one product); bounds the extra memory.
        precision: ``exact`` (float32 products, float64 reductions; float64 for a float64
            model), ``fast`` (products in bf16, or the model's fp16, reductions in float32) or
            ``auto`` (``fast`` for a bf16/fp16 model, else ``exact``). See :class:`Lens`.
        capture_mb: bound on the captured site vectors held at once (MiB). When a batch's
            vectors of all sites would exceed it, the layers are taken in groups, one forward
            pass per group, stopped after the group's last layer (same numbers, more forward
            passes: with G groups about (G + 1) / 2 forward passes instead of one).
        attention_mb: bound on one layer's attention scores (MiB, counted in float32, which the
            attention's softmax uses). When a batch's [heads, positions, positions] scores would
            exceed it, the decoder runs over blocks of positions with a key/value cache, each
            block attending to every earlier position (same numbers up to float rounding;
            the captured vectors are then per block too).
        progress: show a progress bar.

    Returns:
        Columns ``sample_id, position, token_id, layer, site, entropy`` (+ extras), sorted by
        sample, position, layer and site. ``position`` is 0-based in the input sequence and
        ``token_id`` is the token at that position; the policy there predicts position + 1.
    """
    encoded = encode_inputs(model.tokenizer, inputs)
    if response_only and any(e.response_start is None for e in encoded):
        raise ValueError("response_only=True needs records with a 'response' for every input")
    keys = site_keys(model, sites, layers)
    projector = Lens(model, lens, precision)
    parts = []
    bar = tqdm(total=len(encoded), unit="sample", disable=not progress)
    for start in range(0, len(encoded), batch_size):
        batch = encoded[start : start + batch_size]
        parts.append(
            _batch_table(
                model,
                projector,
                batch,
                keys,
                response_only,
                extras,
                chunk_tokens,
                capture_mb,
                attention_mb,
            )
        )
        bar.update(len(batch))
    bar.close()
    return pd.concat(parts, ignore_index=True)


@torch.no_grad()
def _batch_table(
    model: PolicyModel,
    projector: Lens,
    batch: list[Encoded],
    keys: list[SiteKey],
    response_only: bool,
    extras: bool,
    chunk_tokens: int,
    capture_mb: float,
    attention_mb: float,
) -> pd.DataFrame:
    ids, mask = _pad_right(batch, model.tokenizer.pad_token_id, model.device)
    sources = {key: _source(key) for key in keys}  # resid_pre[l] is resid_post[l-1]
    final_key = ("final", model.n_layers - 1)
    distinct = list(dict.fromkeys(sources.values()))  # each distinct vector once
    keep = _kept_positions(batch, mask, response_only)  # [batch, pos]
    rows_b, rows_t = keep.nonzero(as_tuple=True)
    if len(rows_b) == 0:
        return pd.DataFrame(columns=[*TABLE_COLUMNS, *(EXTRA_COLUMNS if extras else ())])
    next_ids = torch.full_like(ids, -1)
    next_ids[:, :-1] = torch.where(mask[:, 1:].bool(), ids[:, 1:], -1)
    next_ids = next_ids[rows_b, rows_t] if extras else None
    length = int(rows_t.max()) + 1  # later positions cannot change the kept ones (causal)
    heads = model.config.num_attention_heads
    span = position_block(len(batch), heads, length, attention_mb * 2**20)
    per_key = len(batch) * span * model.d_model * torch.finfo(model.dtype).bits // 8
    stats: dict[SiteKey, dict[str, np.ndarray]] = {}
    for group in _layer_groups(distinct, per_key, capture_mb * 2**20, final_key, extras):
        # With extras the final policy is needed for every site: it is in every group.
        stop = None if final_key in group else max(layer for _, layer in group) + 1
        past = model.new_cache() if span < length else None
        for start in range(0, length, span):
            end = min(start + span, length)
            with capture(model, keys=group) as acts:
                model.forward(ids[:, start:end], mask[:, :end], stop_at_layer=stop, past=past)
            sel = ((rows_t >= start) & (rows_t < end)).nonzero().squeeze(1)
            if len(sel) == 0:
                continue
            part = site_stats(
                projector,
                acts,
                group,
                (rows_b[sel], rows_t[sel] - start),
                next_ids=None if next_ids is None else next_ids[sel],
                chunk_tokens=chunk_tokens,
            )
            del acts
            at = sel.numpy()
            for key, columns in part.items():
                into = stats.setdefault(key, {})
                for name, values in columns.items():
                    into.setdefault(name, np.empty(len(rows_b), values.dtype))[at] = values
    n, k = len(rows_b), len(keys)
    frame = {
        "sample_id": np.repeat(
            np.array([batch[b].sample_id for b in rows_b.tolist()], dtype=object), k
        ),
        "position": np.repeat(rows_t.numpy().astype(np.int32), k),
        "token_id": np.repeat(ids[rows_b, rows_t].cpu().numpy().astype(np.int64), k),
        "layer": np.tile(np.array([layer for _, layer in keys], dtype=np.int16), n),
        "site": pd.Categorical(np.tile([site for site, _ in keys], n), categories=SITES),
    }
    for column in ("entropy", *(EXTRA_COLUMNS if extras else ())):
        matrix = np.stack([stats[sources[key]][column] for key in keys], axis=1)  # [rows, keys]
        frame[column] = matrix.reshape(-1)
    out = pd.DataFrame(frame)
    out["sample_id"] = out["sample_id"].infer_objects()
    return out


def position_block(batch: int, heads: int, length: int, budget: float) -> int:
    """Positions per block so that one layer's float32 attention scores fit ``budget`` bytes.

    The scores of a block are [batch, heads, block, length] at most; ``length`` when they fit.
    """
    return max(1, min(length, int(budget // (batch * heads * length * 4))))


def _layer_groups(
    keys: list[SiteKey], per_key: int, budget: float, final_key: SiteKey, extras: bool
) -> list[list[SiteKey]]:
    """``keys`` in groups of consecutive layers, each capturing at most ``budget`` bytes.

    A group holds at least one layer's keys. With extras, ``final_key`` joins every group.
    """
    by_layer: dict[int, list[SiteKey]] = {}
    for key in sorted((k for k in keys if not (extras and k == final_key)), key=lambda k: k[1]):
        by_layer.setdefault(key[1], []).append(key)
    groups: list[list[SiteKey]] = []
    current: list[SiteKey] = []
    shared = [final_key] if extras else []
    for layer_keys in by_layer.values():
        if current and (len(current) + len(layer_keys) + len(shared)) * per_key > budget:
            groups.append(current + shared)
            current = []
        current += layer_keys
    if current or not groups:
        groups.append(current + shared)
    return groups


def _source(key: SiteKey) -> SiteKey:
    site, layer = key
    return ("resid_post", layer - 1) if site == "resid_pre" and layer > 0 else key


def _pad_right(batch: list[Encoded], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    # Right padding: with causal attention a real token never sees the padding after it.
    length = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), length), dtype=torch.long)
    for row, e in enumerate(batch):
        ids[row, : len(e.input_ids)] = torch.tensor(e.input_ids)
        mask[row, : len(e.input_ids)] = 1
    return ids.to(device), mask.to(device)


def _kept_positions(batch: list[Encoded], mask: torch.Tensor, response_only: bool) -> torch.Tensor:
    keep = mask.bool().cpu().clone()
    if response_only:
        for row, e in enumerate(batch):
            # Position t predicts t+1: keep prompt's last position .. the second-to-last token.
            keep[row, : max(e.response_start - 1, 0)] = False
            keep[row, len(e.input_ids) - 1 :] = False
    return keep


def delta_table(table: pd.DataFrame) -> pd.DataFrame:
    """Entropy change per position and layer (paper Eq. 8, Eqs. 11-13).

    ``layer``: H(resid_post) - H(resid_pre); ``attn``: H(attn_out) - H(attn_in); ``ffn``:
    H(mlp_out) - H(mlp_in). A module whose two sites are not both in ``table`` is left out.
    """
    wide = table[table["site"] != "final"].pivot(
        index=["sample_id", "position", "layer"], columns="site", values="entropy"
    )
    frames = []
    for module, (site_in, site_out) in MODULES.items():
        if site_in in wide.columns and site_out in wide.columns:
            delta = (wide[site_out] - wide[site_in]).dropna()
            frames.append(delta.rename("delta").reset_index().assign(module=module))
    if not frames:
        return pd.DataFrame({c: [] for c in DELTA_COLUMNS})
    out = pd.concat(frames, ignore_index=True)
    out["module"] = pd.Categorical(out["module"], categories=list(MODULES))
    out = out.sort_values(["sample_id", "position", "layer", "module"], kind="stable")
    return out[list(DELTA_COLUMNS)].reset_index(drop=True)


def summary_table(table: pd.DataFrame, deltas: pd.DataFrame | None = None) -> pd.DataFrame:
    """Mean, std and count of entropy per (layer, site) and of delta per (layer, module).

    Returns columns ``quantity`` (``entropy`` or ``delta``), ``layer``, ``name`` (the site or
    module), ``mean``, ``std``, ``count``.
    """
    deltas = delta_table(table) if deltas is None else deltas
    parts = []
    for quantity, frame, by, value in (
        ("entropy", table, "site", "entropy"),
        ("delta", deltas, "module", "delta"),
    ):
        if frame.empty:
            continue
        grouped = frame.groupby(["layer", by], observed=True)[value].agg(["mean", "std", "count"])
        grouped = grouped.reset_index().rename(columns={by: "name"})
        grouped["name"] = grouped["name"].astype(str)
        parts.append(grouped.assign(quantity=quantity))
    out = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=SUMMARY_COLUMNS)
    return out[list(SUMMARY_COLUMNS)]
