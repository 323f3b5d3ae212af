"""Tidy pandas tables: one row per (sample, position, layer, site), and what derives from them.

:func:`entropy_table` is the pipeline in one call: records -> token ids (``data.encode``) ->
per-row statistics of every internal policy (``lens.stats``: captured sites, logits and their
reductions) -> rows. No tensors are computed here.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from .config import LensSettings
from .data.encode import Encoded, encode_inputs
from .lens.capture import site_keys
from .lens.reduce import COSINE_COLUMNS
from .lens.sites import MODULES, SITES, SiteKey, source_key
from .lens.stats import batch_stats
from .lens.tuned import make_lens
from .lens.unembed import EXTRA_COLUMNS, Lens
from .model.device import exact_kernels
from .model.load import PolicyModel

TABLE_COLUMNS: tuple[str, ...] = (
    "sample_id",
    "position",
    "token_id",
    "token",
    "layer",
    "site",
    "entropy",
)
DELTA_COLUMNS: tuple[str, ...] = ("sample_id", "position", "layer", "module", "delta")
SUMMARY_COLUMNS: tuple[str, ...] = ("quantity", "layer", "name", "mean", "std", "count")
SUMMARY_EXTRAS: tuple[str, ...] = ("next_token_rank", "kl_to_final", "top1_agrees")
"""The extras columns that summary_table averages per (layer, site)."""
TOPK_COLUMNS: tuple[str, ...] = (
    "sample_id",
    "position",
    "layer",
    "site",
    "rank",
    "token_id",
    "prob",
)


def entropy_table(
    model: PolicyModel,
    inputs: Sequence,
    *,
    lens: str | None = None,
    lens_path: str | None = None,
    sites: Iterable[str] | str | None = None,
    layers: Iterable[int] | str | None = None,
    response_only: bool = False,
    extras: bool = False,
    topk: int = 0,
    batch_size: int = 8,
    chunk_tokens: int | None = None,
    precision: str | None = None,
    capture_mb: float | None = None,
    attention_mb: float | None = None,
    settings: LensSettings | None = None,
    projector: Lens | None = None,
    progress: bool = False,
) -> pd.DataFrame | tuple[pd.DataFrame, pd.DataFrame]:
    """Entropy (nats) of every internal policy at every position (and, with ``topk``, its top-k).

    Args:
        model: from :func:`load_model`.
        inputs: token-id lists (used as given), strings (tokenized as given, no chat template)
            or records ``{"prompt", "response", "sample_id"}`` (chat template applied).
        lens: ``raw`` (paper, no final norm; the default), ``norm`` (logit lens) or ``tuned``
            (a translator per site and layer, then the final norm; every analysed site and
            layer needs one in the lens folder).
        lens_path: folder of the tuned lens (``ipl fit-lens``, or the tuned-lens package's
            ``config.json`` + ``params.pt``); default for a bundled model: its shipped lens.
        sites: subset of :data:`SITES` (default all).
        layers: 0-based layers (default all); ``final`` is always stored at layer L-1.
        response_only: keep the positions whose next token is a response token (records only).
            Default False here, True in ``ipl entropy`` (``EntropyConfig.response_only``): this
            function also takes text and token ids, which have no response to select, so by
            default it keeps every position; ``ipl entropy`` always has records with responses
            and averages over the response tokens as the paper does. Pass
            ``response_only=True`` for the rows of an ``ipl entropy`` run's ``tokens.parquet``.
        extras: add ``next_token_logprob``, ``next_token_rank`` (1 = top), ``kl_to_final``
            (KL(internal || final), nats) and ``top1_agrees``; and the residual cosines of the
            row's layer, ``cos_attn`` = cos(attn_out, resid_pre) and ``cos_ffn`` =
            cos(mlp_out, resid_mid) (in a parallel block, GPT-NeoX, which has no resid_mid:
            cos(mlp_out, resid_pre)), computed in float64 from the captured vectors. They
            belong to the (token, layer), not to the site: every site's row of the layer
            carries the same value (NaN on the ``final`` rows).
        topk: K > 0 also returns every policy's K most probable tokens, computed in the same
            pass over each chunk's logits (no second product); the entropy table is the same
            as without it.
        batch_size: sequences per forward pass.
        chunk_tokens: logits rows formed at once (all sites of a chunk of tokens are stacked
            into one product); bounds the extra memory. Default 1024.
        precision: ``exact`` (float32 products and reductions; float64 for a float64 model),
            ``fast`` (products in bf16, or the model's fp16, where the device runs them natively,
            else float32; reductions in float32) or ``auto`` (the default: ``fast`` for a
            bf16/fp16 model, else ``exact``). See
            :func:`~internal_policy_lens.lens.unembed.choose_precision`.
        capture_mb: bound on the captured site vectors held at once (MiB, default 512). When a
            batch's vectors of all sites would exceed it, the layers are taken in groups, one
            forward pass per group, stopped after the group's last layer (same numbers, more
            forward passes: with G groups about (G + 1) / 2 forward passes instead of one).
        attention_mb: bound on one layer's attention scores (MiB, counted in float32, which the
            attention's softmax uses; default 256). When a batch's [heads, positions, positions]
            scores would exceed it, the decoder runs over blocks of positions with a key/value
            cache, each block attending to every earlier position (same numbers up to float
            rounding; the captured vectors are then per block too).
        settings: the lens, its folder and the five above as one
            :class:`~internal_policy_lens.config.LensSettings` (what ``ipl entropy``
            passes); the keyword arguments given replace its fields.
        projector: a ready :class:`~internal_policy_lens.lens.unembed.Lens` of the settings'
            lens (``ipl entropy`` makes one per run and passes it to every batch); default:
            made here from the settings (precision chosen, unembedding cast, lens folder read).
        progress: show a progress bar.

    Returns:
        Columns ``sample_id, position, token_id, token, layer, site, entropy`` (+ extras), sorted
        by sample, position, layer and site. ``position`` is 0-based in the input sequence,
        ``token_id`` is the token at that position and ``token`` its text; the policy there
        predicts position + 1. With ``topk`` K > 0, the pair ``(tokens, topk)`` where ``topk``
        has the columns :data:`TOPK_COLUMNS` (``sample_id, position, layer, site, rank,
        token_id, prob``): K rows per row of ``tokens``, in the same order, ``rank`` 1 the most
        probable, ``prob`` in the lens's policy.
    """
    settings = (settings or LensSettings()).update(
        lens=lens,
        lens_path=lens_path,
        precision=precision,
        chunk_tokens=chunk_tokens,
        capture_mb=capture_mb,
        attention_mb=attention_mb,
    )
    encoded = encode_inputs(model.tokenizer, inputs)
    if response_only and any(e.response_start is None for e in encoded):
        raise ValueError("response_only=True needs records with a 'response' for every input")
    keys = site_keys(model, sites, layers)
    if projector is None:
        projector = make_lens(model, settings)
    elif projector.kind != settings.lens:
        raise ValueError(f"the lens given is '{projector.kind}', the settings' '{settings.lens}'")
    projector.check(keys)
    parts, tops = [], []
    bar = tqdm(total=len(encoded), unit="sample", disable=not progress)
    for start in range(0, len(encoded), batch_size):
        batch = encoded[start : start + batch_size]
        with exact_kernels(projector.precision == "exact" and model.device.type == "cuda"):
            table, top = _batch_table(
                model, projector, batch, keys, settings, response_only, extras, topk
            )
        parts.append(table)
        tops.append(top)
        bar.update(len(batch))
    bar.close()
    tokens = pd.concat(parts, ignore_index=True)
    tokens.insert(3, "token", token_text(model.tokenizer, tokens["token_id"]))
    return (tokens, pd.concat(tops, ignore_index=True)) if topk > 0 else tokens


def token_text(tokenizer, token_ids: pd.Series) -> pd.Series:
    """The text of each token id (each distinct id decoded once).

    Plain strings, not a categorical: tables of several calls concatenate without surprises.
    """
    unique = token_ids.unique().tolist()
    text = dict(zip(unique, (tokenizer.decode([i]) for i in unique)))
    return token_ids.map(text).astype(str)


def _batch_table(
    model: PolicyModel,
    projector: Lens,
    batch: list[Encoded],
    keys: list[SiteKey],
    settings: LensSettings,
    response_only: bool,
    extras: bool,
    topk: int,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    found = batch_stats(model, projector, batch, keys, settings, response_only, extras, topk)
    if len(found.rows_b) == 0:
        columns = [c for c in TABLE_COLUMNS if c != "token"]  # added by entropy_table
        empty = pd.DataFrame(columns=[*columns, *(_extra_columns() if extras else ())])
        return empty, pd.DataFrame(columns=list(TOPK_COLUMNS))
    sources = {key: source_key(*key) for key in keys}  # resid_pre[l] is resid_post[l-1]
    stats, cosines = found.stats, found.cosines
    n, k = len(found.rows_b), len(keys)
    frame = {
        "sample_id": np.repeat(
            np.array([batch[b].sample_id for b in found.rows_b.tolist()], dtype=object), k
        ),
        "position": np.repeat(found.rows_t.numpy().astype(np.int32), k),
        "token_id": np.repeat(found.token_ids, k),
        "layer": np.tile(np.array([layer for _, layer in keys], dtype=np.int16), n),
        "site": pd.Categorical(np.tile([site for site, _ in keys], n), categories=SITES),
    }
    for column in ("entropy", *(EXTRA_COLUMNS if extras else ())):
        matrix = np.stack([stats[sources[key]][column] for key in keys], axis=1)  # [rows, keys]
        frame[column] = matrix.reshape(-1)
    for column in COSINE_COLUMNS if extras else ():
        missing = np.full(n, np.nan)
        matrix = np.stack(
            [missing if s == "final" else cosines[layer][column] for s, layer in keys], axis=1
        )  # [rows, keys]
        frame[column] = matrix.reshape(-1)
    out = pd.DataFrame(frame)
    out["sample_id"] = out["sample_id"].infer_objects()
    return out, _topk_frame(out, [stats[sources[key]] for key in keys], topk)


def _extra_columns() -> tuple[str, ...]:
    return (*EXTRA_COLUMNS, *COSINE_COLUMNS)


def _topk_frame(tokens: pd.DataFrame, per_key: list[dict[str, np.ndarray]], k: int):
    """K rows per row of ``tokens`` (same order): rank, token id and probability."""
    if k <= 0:
        return None
    k = per_key[0]["topk_id"].shape[1]  # at most the vocabulary
    ids = np.stack([s["topk_id"] for s in per_key], axis=1)  # [rows, keys, K]
    probs = np.stack([s["topk_prob"] for s in per_key], axis=1)  # [rows, keys, K]
    frame = {name: np.repeat(tokens[name].to_numpy(), k) for name in TOPK_COLUMNS[:3]}
    frame["site"] = pd.Categorical(np.repeat(tokens["site"].astype(str), k), categories=SITES)
    frame["rank"] = np.tile(np.arange(1, k + 1, dtype=np.int16), len(tokens))
    frame["token_id"] = ids.reshape(-1).astype(np.int64)
    frame["prob"] = probs.reshape(-1)
    out = pd.DataFrame(frame)
    out["sample_id"] = out["sample_id"].infer_objects()
    return out


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
    """Mean, std and count of entropy, delta and (with the extras) residual cosine per layer.

    Entropy per (layer, site), delta per (layer, module), cosine per layer and module; with the
    extras also ``next_token_rank``, ``kl_to_final`` and ``top1_agrees`` (the share of tokens
    whose top-1 is the final policy's) per (layer, site).

    Returns columns ``quantity`` (``entropy``, ``delta``, ``cosine`` or an extra), ``layer``,
    ``name`` (the site, the module, or ``attn``/``ffn`` for ``cos_attn``/``cos_ffn``), ``mean``,
    ``std``, ``count``. A cosine counts each (token, layer) once, not once per site.
    """
    deltas = delta_table(table) if deltas is None else deltas
    sources = [("entropy", table, "site", "entropy"), ("delta", deltas, "module", "delta")]
    for column in SUMMARY_EXTRAS:
        if column in table.columns:
            # next_token_rank is -1 (next_token_logprob NaN) where no next token is analysed.
            frame = table[table[column] >= 1] if column == "next_token_rank" else table
            sources.append((column, frame.astype({column: float}), "site", column))
    if set(COSINE_COLUMNS) <= set(table.columns):
        per_layer = table[table["site"] != "final"].drop_duplicates(
            ["sample_id", "position", "layer"]
        )
        cosines = per_layer.melt(
            id_vars=["layer"], value_vars=list(COSINE_COLUMNS), var_name="module"
        ).dropna(subset=["value"])
        cosines["module"] = cosines["module"].str.removeprefix("cos_")
        sources.append(("cosine", cosines, "module", "value"))
    parts = []
    for quantity, frame, by, value in sources:
        if frame.empty:
            continue
        grouped = frame.groupby(["layer", by], observed=True)[value].agg(["mean", "std", "count"])
        grouped = grouped.reset_index().rename(columns={by: "name"})
        grouped["name"] = grouped["name"].astype(str)
        parts.append(grouped.assign(quantity=quantity))
    out = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=SUMMARY_COLUMNS)
    return out[list(SUMMARY_COLUMNS)]
