"""One batch's statistics -> the Arrow tables a run writes, and their moments (no torch).

The statistics of a batch are columns ``[n]`` (``[n, K]`` for the top-k) per distinct (site,
layer) key, for its ``n`` kept rows. A token table has one row per (row, key), row-major; a
top-k table K rows per token row; a delta table one row per (row, layer, module). Every column
is built with numpy and handed to Arrow as is: sample ids and token texts are taken from a
dictionary (one value per sample or distinct token id), never one Python object per row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from ..lens.sites import COSINE_COLUMNS, MODULES, SITES, SiteKey
from ..statistics import STATISTICS, summarised, table_columns
from .frames import MOMENT_COLUMNS, moments

_SITE_NAMES = pa.array(SITES)
_MODULE_NAMES = pa.array(list(MODULES))


@dataclass
class BatchColumns:
    """A batch's kept rows and the statistics of each key of ``keys`` at them.

    Attributes:
        samples: the batch's sample ids (ints, or strings), one per sequence.
        rows_b: ``[n]`` the sequence of each kept row; ``positions``, ``token_ids``: ``[n]``.
        keys: the (site, layer) keys of the table, in order.
        per_key: for each key, its columns (the statistics, ``topk_id`` / ``topk_prob``).
        cosines: ``layer -> cos_attn / cos_ffn -> [n]`` (when ``with_cosines``).
        statistics: the statistics' names, in the tables' order (registry order).
        with_cosines: the tables carry the residual cosines (with the extras).
        passes: forward passes of the decoder that computed them.
    """

    samples: Sequence
    rows_b: np.ndarray
    positions: np.ndarray
    token_ids: np.ndarray
    keys: list[SiteKey]
    per_key: list[dict[str, np.ndarray]]
    cosines: dict[int, dict[str, np.ndarray]]
    statistics: tuple[str, ...] = ("entropy",)
    with_cosines: bool = False
    passes: int = 0

    @property
    def n(self) -> int:
        """Kept rows."""
        return len(self.rows_b)


def sample_array(samples: Sequence, as_text: bool) -> pa.Array:
    """The sample ids as one Arrow type: int64, or strings when any id (of the run) is text."""
    return pa.array(
        [str(s) for s in samples] if as_text else list(samples),
        pa.string() if as_text else pa.int64(),
    )


def token_rows(cols: BatchColumns, vocab: dict[int, str] | None, as_text: bool) -> pa.Table:
    """``sample_id, position, token_id, [token,] layer, site, entropy`` (+ statistics, cosines)."""
    k = len(cols.keys)
    rows = np.repeat(np.arange(cols.n), k)
    table = {
        "sample_id": _take(sample_array(cols.samples, as_text), cols.rows_b[rows]),
        "position": pa.array(cols.positions[rows].astype(np.int32)),
        "token_id": pa.array(cols.token_ids[rows].astype(np.int64)),
    }
    if vocab is not None:
        table["token"] = texts(cols.token_ids[rows], vocab)
    table["layer"] = pa.array(np.tile([layer for _, layer in cols.keys], cols.n).astype(np.int16))
    table["site"] = _names(np.tile([SITES.index(s) for s, _ in cols.keys], cols.n), _SITE_NAMES)
    for column in table_columns(cols.statistics):
        table[column] = pa.array(_matrix(cols, column).reshape(-1))
    for column in COSINE_COLUMNS if cols.with_cosines else ():
        missing = np.full(cols.n, np.nan)
        matrix = np.stack(
            [missing if s == "final" else cols.cosines[layer][column] for s, layer in cols.keys],
            axis=1,
        )  # [rows, keys]
        table[column] = pa.array(matrix.reshape(-1))
    return pa.table(table)


def topk_rows(cols: BatchColumns, vocab: dict[int, str] | None, as_text: bool) -> pa.Table:
    """K rows per token row: ``sample_id, position, layer, site, rank, token_id, [token,] prob``."""
    ids = np.stack([s["topk_id"] for s in cols.per_key], axis=1)  # [rows, keys, K]
    probs = np.stack([s["topk_prob"] for s in cols.per_key], axis=1)  # [rows, keys, K]
    n, k, top = ids.shape
    rows = np.repeat(np.arange(n), k * top)
    key = np.tile(np.repeat(np.arange(k), top), n)
    table = {
        "sample_id": _take(sample_array(cols.samples, as_text), cols.rows_b[rows]),
        "position": pa.array(cols.positions[rows].astype(np.int32)),
        "layer": pa.array(np.array([layer for _, layer in cols.keys], np.int16)[key]),
        "site": _names(np.array([SITES.index(s) for s, _ in cols.keys])[key], _SITE_NAMES),
        "rank": pa.array(np.tile(np.arange(1, top + 1, dtype=np.int16), n * k)),
        "token_id": pa.array(ids.reshape(-1).astype(np.int64)),
    }
    if vocab is not None:
        table["token"] = texts(ids.reshape(-1), vocab)
    table["prob"] = pa.array(probs.reshape(-1))
    return pa.table(table)


def delta_rows(cols: BatchColumns, as_text: bool) -> pa.Table:
    """``sample_id, position, layer, module, delta``: one row per (row, layer, module)."""
    pairs, matrix = _deltas(cols)
    rows = np.repeat(np.arange(cols.n), len(pairs))
    values = matrix.reshape(-1)
    kept = ~np.isnan(values)
    rows = rows[kept]
    layers = np.tile(np.array([layer for layer, _ in pairs], np.int16), cols.n)[kept]
    modules = np.tile(np.array([m for _, m in pairs], np.int8), cols.n)[kept]
    return pa.table(
        {
            "sample_id": _take(sample_array(cols.samples, as_text), cols.rows_b[rows]),
            "position": pa.array(cols.positions[rows].astype(np.int32)),
            "layer": pa.array(layers),
            "module": _names(modules, _MODULE_NAMES),
            "delta": pa.array(values[kept]),
        }
    )


def batch_moments(cols: BatchColumns) -> pd.DataFrame:
    """The batch's moments per (quantity, layer, name): what its summary merges (float64)."""
    parts = []
    names = [(layer, site) for site, layer in cols.keys]
    parts.append(_moments("entropy", names, _matrix(cols, "entropy")))
    pairs, deltas = _deltas(cols)
    parts.append(_moments("delta", [(layer, list(MODULES)[m]) for layer, m in pairs], deltas))
    for column in summarised(cols.statistics):
        values = _matrix(cols, column).astype(np.float64)
        low = STATISTICS[column].counted_from
        if low is not None:  # below it: undefined (a rank of -1: no next token analysed)
            values[values < low] = np.nan
        parts.append(_moments(column, names, values))
    if cols.with_cosines:
        layers = sorted(cols.cosines)
        for column in COSINE_COLUMNS:
            values = np.stack([cols.cosines[layer][column] for layer in layers], axis=1)
            name = column.removeprefix("cos_")
            parts.append(_moments("cosine", [(layer, name) for layer in layers], values))
    frame = pd.concat([p for p in parts if len(p)], ignore_index=True)
    return frame[frame["count"] > 0][list(MOMENT_COLUMNS)].reset_index(drop=True)


def texts(token_ids: np.ndarray, vocab: dict[int, str]) -> pa.Array:
    """The text of each token id, one string per distinct id (decoded by ``vocab``)."""
    unique = np.flatnonzero(np.bincount(token_ids))  # sorted distinct ids, in linear time
    position = np.zeros(int(unique[-1]) + 1 if len(unique) else 1, np.int32)
    position[unique] = np.arange(len(unique), dtype=np.int32)
    words = pa.array([vocab[int(i)] for i in unique], pa.string())
    return pa.DictionaryArray.from_arrays(pa.array(position[token_ids]), words).cast(pa.string())


def _matrix(cols: BatchColumns, column: str) -> np.ndarray:
    return np.stack([s[column] for s in cols.per_key], axis=1)  # [rows, keys]


def _deltas(cols: BatchColumns) -> tuple[list[tuple[int, int]], np.ndarray]:
    """The (layer, module index) pairs present, and the deltas ``[rows, pairs]``."""
    entropy = {key: s["entropy"] for key, s in zip(cols.keys, cols.per_key)}
    layers = sorted({layer for site, layer in cols.keys if site != "final"})
    pairs, columns = [], []
    for layer in layers:
        for m, (site_in, site_out) in enumerate(MODULES.values()):
            if (site_in, layer) in entropy and (site_out, layer) in entropy:
                pairs.append((layer, m))
                columns.append(entropy[site_out, layer] - entropy[site_in, layer])
    matrix = np.stack(columns, axis=1) if columns else np.empty((cols.n, 0), np.float32)
    return pairs, matrix


def _moments(quantity: str, names: list[tuple[int, str]], values: np.ndarray) -> pd.DataFrame:
    count, mean, m2 = moments(values)
    return pd.DataFrame(
        {
            "quantity": quantity,
            "layer": [layer for layer, _ in names],
            "name": [name for _, name in names],
            "count": count,
            "mean": mean,
            "m2": m2,
        }
    )


def _take(values: pa.Array, index: np.ndarray) -> pa.Array:
    return pc.take(values, pa.array(index.astype(np.int64)))


def _names(index: np.ndarray, names: pa.Array) -> pa.DictionaryArray:
    return pa.DictionaryArray.from_arrays(pa.array(np.asarray(index, np.int8)), names)
