"""The pipeline in one call: records -> token ids -> statistics -> tables.

Records become token ids (``data.encode``), then per-row statistics of every internal policy
(``lens.stats``: the streamed forward, logits and their reductions), then tables
(``tables.batch``). This module only calls the tensor pipeline; it computes no statistic itself.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
from tqdm.auto import tqdm

from ..config import LensSettings
from ..data.encode import Encoded, encode_inputs
from ..lens.capture import site_keys
from ..lens.sites import COSINE_COLUMNS, SiteKey, source_key
from ..lens.stats import batch_stats
from ..lens.tuned import make_lens
from ..lens.unembed import Lens
from ..model.device import exact_kernels
from ..model.load import PolicyModel
from ..statistics import STATISTICS, Request, table_columns
from .batch import BatchColumns, token_rows, topk_rows
from .frames import TOPK_COLUMNS


def entropy_table(
    model: PolicyModel,
    inputs: Sequence,
    *,
    lens: str | Lens | None = None,
    lens_path: str | None = None,
    sites: Iterable[str] | str | None = None,
    layers: Iterable[int] | str | None = None,
    response_only: bool = False,
    extras: bool = False,
    stats: Iterable[str] | str | None = None,
    topk: int = 0,
    batch_size: int = 8,
    chunk_tokens: int | None = None,
    precision: str | None = None,
    capture_mb: float | None = None,
    attention_mb: float | None = None,
    settings: LensSettings | None = None,
    progress: bool = False,
    **parameters: float,
) -> pd.DataFrame | tuple[pd.DataFrame, pd.DataFrame]:
    """Entropy (nats) of every internal policy at every position (and, with ``topk``, its top-k).

    Args:
        model: from :func:`load_model`.
        inputs: token-id lists (used as given), strings (tokenized as given, no chat template)
            or records ``{"prompt", "response", "sample_id"}`` (chat template applied).
        lens: ``raw`` (paper, no final norm; the default), ``norm`` (logit lens) or ``tuned``
            (a translator per site and layer, then the final norm; every analysed site and
            layer needs one in the lens folder); or a ready
            :class:`~internal_policy_lens.lens.unembed.Lens` (``ipl entropy`` makes one per
            run and passes it to every batch; else one is made here from the settings:
            precision chosen, unembedding cast, lens folder read).
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
        extras: add ``next_token_logprob``, ``next_token_rank`` (1 = top),
            ``kl_internal_final`` (KL(internal ‖ final), nats) and ``top1_agrees``; and the
            residual cosines of the
            row's layer, ``cos_attn`` = cos(attn_out, resid_pre) and ``cos_ffn`` =
            cos(mlp_out, resid_mid) (in a parallel block, GPT-NeoX, which has no resid_mid:
            cos(mlp_out, resid_pre)), computed in float64 from the captured vectors. They
            belong to the (token, layer), not to the site: every site's row of the layer
            carries the same value (NaN on the ``final`` rows).
        stats: opt-in statistics to add (names or one comma-separated string; see
            :func:`internal_policy_lens.statistics.opt_in`), one column each.
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
        capture_mb: bound on the captured site rows held at once (MiB, default 512): the rows
            gathered during the forward pass are reduced whenever they reach it (one forward
            pass, two with the statistics against the final policy; same numbers whatever the
            bound).
        attention_mb: bound on one layer's attention scores under eager attention (MiB,
            counted in float32, which the attention's softmax uses; default 256; sdpa forms no
            scores and ignores it). When a batch's [heads, positions, positions]
            scores would exceed it, the decoder runs over blocks of positions with a key/value
            cache, each block attending to every earlier position (same numbers up to float
            rounding; the captured vectors are then per block too).
        settings: the lens, its folder and the five above as one
            :class:`~internal_policy_lens.config.LensSettings` (what ``ipl entropy``
            passes); the keyword arguments given replace its fields.
        progress: show a progress bar.
        parameters: the statistics' parameters by name (e.g. ``nucleus_p``).

    Returns:
        Columns ``sample_id, position, token_id, token, layer, site, entropy`` (+ the other
        statistics in registry order, then the cosines), sorted
        by sample, position, layer and site. ``position`` is 0-based in the input sequence,
        ``token_id`` is the token at that position and ``token`` its text; the policy there
        predicts position + 1. With ``topk`` K > 0, the pair ``(tokens, topk)`` where ``topk``
        has the columns :data:`TOPK_COLUMNS` (``sample_id, position, layer, site, rank,
        token_id, prob``): K rows per row of ``tokens``, in the same order, ``rank`` 1 the most
        probable, ``prob`` in the lens's policy.
    """
    ready = None if lens is None or isinstance(lens, str) else lens
    settings = (settings or LensSettings()).update(
        lens=lens if ready is None else ready.name,
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
    request = Request.of(extras, stats, topk, **parameters)
    ready = make_lens(model, settings) if ready is None else ready
    ready.check(keys)
    as_text = any(not isinstance(e.sample_id, int) for e in encoded)
    parts, tops, vocab = [], [], {}
    bar = tqdm(total=len(encoded), unit="sample", disable=not progress)
    for start in range(0, len(encoded), batch_size):
        batch = encoded[start : start + batch_size]
        cols = batch_columns(model, ready, batch, keys, settings, response_only, request, extras)
        decode_tokens(model.tokenizer, cols, vocab)  # the same token texts as a run folder's
        parts.append(token_rows(cols, vocab, as_text))
        if topk > 0 and cols.n:
            tops.append(topk_rows(cols, None, as_text))
        bar.update(len(batch))
    bar.close()
    tokens = pa.concat_tables(parts).to_pandas()
    if topk <= 0:
        return tokens
    top = pa.concat_tables(tops).to_pandas() if tops else pd.DataFrame(columns=list(TOPK_COLUMNS))
    return tokens, top


def batch_columns(
    model: PolicyModel,
    lens: Lens,
    batch: list[Encoded],
    keys: list[SiteKey],
    settings: LensSettings,
    response_only: bool,
    request: Request,
    cosines: bool = False,
) -> BatchColumns:
    """``request``'s statistics (and cosines) of every key of ``keys`` at ``batch``'s kept rows."""
    with exact_kernels(lens.precision == "exact" and model.device.type == "cuda"):
        found = batch_stats(model, lens, batch, keys, settings, response_only, request, cosines)
    if not found.stats:  # no kept row: typed empty columns, so that batches concatenate
        found.stats = {source_key(*key): _empty(request) for key in keys}
        layers = {layer for site, layer in keys if site != "final"} if cosines else ()
        found.cosines = {layer: {c: np.empty(0) for c in COSINE_COLUMNS} for layer in layers}
    return BatchColumns(
        samples=[e.sample_id for e in batch],
        rows_b=found.rows_b.numpy(),
        positions=found.rows_t.numpy(),
        token_ids=found.token_ids,
        keys=keys,
        per_key=[found.stats[source_key(*key)] for key in keys],
        cosines=found.cosines,
        statistics=table_columns(request.statistics),
        with_cosines=cosines,
        passes=found.passes,
    )


_NUMPY_DTYPES = {"float": np.float32, "int64": np.int64, "bool": np.bool_}


def _empty(request: Request) -> dict[str, np.ndarray]:
    out = {n: np.empty(0, _NUMPY_DTYPES[STATISTICS[n].dtype]) for n in request.statistics}
    if request.topk > 0:
        out |= {
            "topk_id": np.empty((0, request.topk), np.int64),
            "topk_prob": np.empty((0, request.topk), np.float32),
        }
    return out


def decode_tokens(tokenizer, cols: BatchColumns, vocab: dict[int, str]) -> None:
    """Add the text of every token id of ``cols`` (its tokens and top-k) to ``vocab``, once each."""
    ids = [cols.token_ids, *(s["topk_id"].reshape(-1) for s in cols.per_key if "topk_id" in s)]
    for i in np.unique(np.concatenate(ids)).tolist() if cols.n else []:
        if i not in vocab:
            vocab[i] = tokenizer.decode([i])
