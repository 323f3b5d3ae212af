"""The tables' columns and what derives from a token table: deltas and the summary (no torch).

A summary is count, mean and standard deviation per (quantity, layer, name). A run folder builds
it batch by batch: each batch's *moments* (count, mean and the sum of squared deviations ``m2``,
float64) merge exactly (:func:`merge_summaries`, Chan et al.'s pairwise update), so the summary
of a run never needs its whole token table. :func:`summary_table` gives the same numbers from a
token table held in memory.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from ..lens.sites import COSINE_COLUMNS, MODULES, SITES
from ..statistics import STATISTICS, in_group, summarised

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
MOMENT_COLUMNS: tuple[str, ...] = ("quantity", "layer", "name", "count", "mean", "m2")
"""A summary before it is finished: what merges exactly across batches."""
SUMMARY_EXTRAS: tuple[str, ...] = summarised(in_group("extras"))
"""The extras columns that summary_table averages per (layer, site) (see
:func:`~internal_policy_lens.statistics.summarised` for every statistic's)."""
TOPK_COLUMNS: tuple[str, ...] = (
    "sample_id",
    "position",
    "layer",
    "site",
    "rank",
    "token_id",
    "prob",
)


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


def summary_table(
    table: pd.DataFrame, deltas: pd.DataFrame | None = None, by: Sequence[str] = ()
) -> pd.DataFrame:
    """Mean, std and count of entropy, delta and (with the extras) residual cosine per layer.

    Entropy per (layer, site), delta per (layer, module), cosine per layer and module; and
    every other statistic of ``table`` that the summary averages (the registry's
    ``summary``), per (layer, site): with the extras ``next_token_rank``,
    ``kl_internal_final`` and ``top1_agrees`` (the share of tokens whose top-1 is the final
    policy's).

    Returns columns ``quantity`` (``entropy``, ``delta``, ``cosine`` or a statistic), ``layer``,
    ``name`` (the site, the module, or ``attn``/``ffn`` for ``cos_attn``/``cos_ffn``), ``mean``,
    ``std``, ``count``. A cosine counts each (token, layer) once, not once per site.

    ``by``: columns of ``table`` that hold one value per (sample, position), such as a split's
    ``group`` (:mod:`~internal_policy_lens.analysis.splits`): one summary per value, those
    columns first.
    """
    return finish_summary(summary_moments(table, deltas, by), by)


def summary_moments(
    table: pd.DataFrame, deltas: pd.DataFrame | None = None, by: Sequence[str] = ()
) -> pd.DataFrame:
    """:func:`summary_table` before it is finished: ``by`` then ``MOMENT_COLUMNS``."""
    by = list(by)
    deltas = delta_table(table) if deltas is None else deltas
    if by and not set(by) <= set(deltas.columns):
        columns = list(dict.fromkeys(["sample_id", "position", *by]))
        tokens = table[columns].drop_duplicates(["sample_id", "position"])
        deltas = deltas.merge(tokens, on=["sample_id", "position"])
    sources = [("entropy", table, "site", "entropy"), ("delta", deltas, "module", "delta")]
    for column in summarised(table.columns):
        low = STATISTICS[column].counted_from  # next_token_rank: -1 where no next token
        frame = table if low is None else table[table[column] >= low]
        sources.append((column, frame.astype({column: float}), "site", column))
    if set(COSINE_COLUMNS) <= set(table.columns):
        per_layer = table[table["site"] != "final"].drop_duplicates(
            ["sample_id", "position", "layer"]
        )
        cosines = per_layer.melt(
            id_vars=[*by, "layer"], value_vars=list(COSINE_COLUMNS), var_name="module"
        ).dropna(subset=["value"])
        cosines["module"] = cosines["module"].str.removeprefix("cos_")
        sources.append(("cosine", cosines, "module", "value"))
    parts = []
    for quantity, frame, name, value in sources:
        if frame.empty:
            continue
        keys = [*(frame[c] for c in by), frame["layer"], frame[name]]
        moments = grouped_moments(frame[value], keys)
        moments.columns = [*by, "layer", "name", "count", "mean", "m2"]
        moments["name"] = moments["name"].astype(str)
        parts.append(moments.assign(quantity=quantity))
    if not parts:
        return pd.DataFrame(columns=[*by, *MOMENT_COLUMNS])
    return pd.concat(parts, ignore_index=True)[[*by, *MOMENT_COLUMNS]]


def grouped_moments(values: pd.Series, keys: list) -> pd.DataFrame:
    """``keys`` then count, mean and m2 (float64) of ``values`` per group of ``keys``.

    ``keys``: pandas' groupby keys, e.g. columns of the frame that holds ``values``.
    """
    grouped = values.astype("float64").groupby(keys, observed=True)
    moments = grouped.agg(["count", "mean", "var"])
    moments["m2"] = moments.pop("var").fillna(0.0) * (moments["count"] - 1)
    return moments.reset_index()


def merge_summaries(parts: list[pd.DataFrame], by: Sequence[str] = ()) -> pd.DataFrame:
    """The moments of several batches (``MOMENT_COLUMNS`` each) merged into a finished summary.

    Exact: the merged mean and ``m2`` are those of all the values together (float64), whatever
    the batches (Chan, Golub and LeVeque's update, summed over the batches at once). ``by``:
    further key columns of the parts (a split's ``group``), kept first.
    """
    parts = [p for p in parts if len(p)]
    if not parts:
        return pd.DataFrame(columns=[*by, *SUMMARY_COLUMNS])
    frame = pd.concat(parts, ignore_index=True)
    keys = [*by, "quantity", "layer", "name"]
    frame["weighted"] = frame["count"] * frame["mean"]
    total = frame.groupby(keys, sort=False)[["count", "weighted", "m2"]].sum()
    total["mean"] = total["weighted"] / total["count"]
    mean = frame.join(total["mean"].rename("grand"), on=keys)["grand"]
    frame["spread"] = frame["count"] * (frame["mean"] - mean) ** 2
    total["m2"] += frame.groupby(keys, sort=False)["spread"].sum()
    return finish_summary(total.reset_index()[[*by, *MOMENT_COLUMNS]], by)


def finish_summary(moments: pd.DataFrame, by: Sequence[str] = ()) -> pd.DataFrame:
    """Moments -> ``SUMMARY_COLUMNS`` (std with one degree of freedom, NaN for one value).

    Rows in a fixed order: ``by`` as first seen, quantities as first seen, then layer, then
    name (sites in :data:`SITES` order, modules in :data:`MODULES` order).
    """
    out = moments.copy()
    out["count"] = out["count"].astype("int64")
    out["std"] = np.sqrt(out["m2"] / (out["count"] - 1)).where(out["count"] > 1)
    seen = {c: {v: i for i, v in enumerate(dict.fromkeys(out[c]))} for c in (*by, "quantity")}
    keys = [*by, "quantity", "layer", "name"]
    out = out.sort_values(keys, key=_ranked(seen), kind="stable")
    return out[[*by, *SUMMARY_COLUMNS]].reset_index(drop=True)


_NAMES = {name: i for i, name in enumerate((*SITES, *MODULES))}


def _ranked(seen: dict[str, dict]):
    """Sort keys: the columns of ``seen`` in their first-seen order, sites and modules by rank."""

    def key(column: pd.Series) -> pd.Series:
        if column.name in seen:
            return column.map(seen[column.name])
        return column.map(_NAMES).fillna(len(_NAMES)) if column.name == "name" else column

    return key


def moments(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """count, mean and m2 (float64) of each column of ``values`` ``[rows, cols]``, NaN skipped."""
    values = np.asarray(values, dtype=np.float64)
    present = ~np.isnan(values)
    count = present.sum(axis=0)
    filled = np.where(present, values, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = filled.sum(axis=0) / count
        m2 = (np.where(present, values - mean, 0.0) ** 2).sum(axis=0)
    return count, mean, m2
