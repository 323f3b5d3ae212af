"""Uncertainty by resampling responses: 95% intervals on curves, convergence measures and labels.

The bootstrap draws whole responses (samples) with replacement, never single tokens: tokens of a
response are not independent. It is cheap because it draws from per-sample sums
(:class:`~internal_policy_lens.analysis.splits.Split` holds each sample's count and mean per
(group, quantity, layer, name)): a resample's mean of a key is ``sum_s w_s count_s mean_s /
sum_s w_s count_s`` with ``w_s`` the times sample ``s`` was drawn, one matrix product for all
resamples. Each resample's curves give its abruptness, drop depths, label and shape
(:mod:`~internal_policy_lens.analysis.convergence`), computed over the ``[resamples, depths]``
array of all resamples' curves at once; intervals are the 2.5th and 97.5th
percentiles over the resamples (NaN resamples left out), and a label's share is the fraction of
resamples that give it. The seed and the number of resamples are recorded with the results.

Two runs are independent: the interval of a difference between them is taken over the
differences of their resamples, drawn with seeds derived from the one seed; a difference lies
outside the intervals when that interval excludes 0.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..config import ConvergenceConfig, derive_seed
from .convergence import (
    DROP_SHARES,
    abruptness,
    abruptness_array,
    convergence_label,
    curve_rows,
    drop_depths,
    drop_depths_array,
    drop_shape,
)
from .splits import Split

CONFIDENCE = 0.95
STATS: tuple[str, ...] = (
    "entropy_start",
    "entropy_end",
    "entropy_drop",
    "entropy_final",
    "abruptness",
    *(f"drop_depth_{round(q * 100)}" for q in DROP_SHARES),
)
"""The convergence measures that get intervals (``entropy_final``: the final policy's mean)."""
LABELS: tuple[str, ...] = ("progressive", "abrupt", "flat")
SHAPES: tuple[str, ...] = ("progressive", "abrupt-late", "abrupt-early", "flat")
_KEYS = ["group", "quantity", "layer", "name"]


@dataclass
class Resampled:
    """A split's measures on the whole run and on each resample of its responses.

    Attributes:
        split: what was resampled.
        resamples, seed: how many resamples, drawn with ``numpy.random.default_rng(seed)``.
        keys: ``group, quantity, layer, name`` of each column of ``means``.
        means: ``[resamples, keys]`` each resample's means.
        point: one row per group: :data:`STATS`, ``label`` and ``shape`` on the whole run.
        stats: the same per resample (column ``resample``).
    """

    split: Split
    resamples: int
    seed: int
    keys: pd.DataFrame
    means: np.ndarray
    point: pd.DataFrame
    stats: pd.DataFrame

    def summary(self) -> pd.DataFrame:
        """The split's summary with ``ci_low`` and ``ci_high`` of every mean."""
        low, high = _interval(self.means)
        intervals = self.keys.assign(ci_low=low, ci_high=high)
        return self.split.summary().merge(intervals, on=_KEYS, how="left")

    def convergence(self) -> pd.DataFrame:
        """One row per group: each measure with its interval, the shares of labels and shapes."""
        rows = []
        for _, point in self.point.iterrows():
            mine = self.stats[self.stats["group"] == point["group"]]
            row = {"group": point["group"]}
            for stat in STATS:
                low, high = _interval(mine[stat].to_numpy()[:, None])
                row |= {stat: point[stat], f"{stat}_low": low[0], f"{stat}_high": high[0]}
            row["label"] = point["label"]
            row |= {f"label_share_{name}": (mine["label"] == name).mean() for name in LABELS}
            row["shape"] = point["shape"]
            row |= {f"shape_share_{name}": (mine["shape"] == name).mean() for name in SHAPES}
            rows.append(row | self.facts())
        return pd.DataFrame(rows)

    def facts(self) -> dict:
        """What the files record: resamples, seed, confidence, and the split's facts."""
        facts = self.split.facts()
        return {
            "split": facts["split"],
            "q": facts["q"],
            "threshold": facts["threshold"],
            "resamples": self.resamples,
            "seed": self.seed,
            "confidence": CONFIDENCE,
        }


def resample(
    split: Split,
    n_layers: int,
    *,
    resamples: int = 1000,
    seed: int = 0,
    cfg: ConvergenceConfig | None = None,
) -> Resampled:
    """Resample ``split``'s responses ``resamples`` times (see the module docstring)."""
    cfg = cfg or ConvergenceConfig()
    frame = split.samples.assign(total=split.samples["count"] * split.samples["mean"])
    wide = frame.pivot_table(
        index="sample_id", columns=_KEYS, values=["count", "total"], aggfunc="sum", fill_value=0
    )  # [samples, keys] each; samples in sorted id order
    count, total = wide["count"], wide["total"]
    n = len(count)
    rng = np.random.default_rng(seed)
    weights = np.zeros((resamples, n))  # [resamples, samples]: times each sample is drawn
    np.add.at(weights, (np.repeat(np.arange(resamples), n), rng.integers(0, n, resamples * n)), 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = (weights @ total.to_numpy(np.float64)) / (weights @ count.to_numpy(np.float64))
    keys = count.columns.to_frame(index=False)
    point = split.summary()
    rows = [
        _measures(point[point["group"] == g], n_layers, cfg) | {"group": g} for g in split.groups
    ]
    stats = [_resampled_measures(keys, means, g, n_layers, cfg) for g in split.groups]
    return Resampled(
        split=split,
        resamples=resamples,
        seed=seed,
        keys=keys,
        means=means,
        point=pd.DataFrame(rows),
        stats=pd.concat(stats, ignore_index=True),
    )


def differences(runs: dict[str, Resampled]) -> pd.DataFrame:
    """Every pair of runs, every group both have, every measure: the difference and its interval.

    Columns ``group, statistic, run_a, run_b, a, b, difference, ci_low, ci_high, outside``
    (``outside``: the interval excludes 0).
    """
    names = list(runs)
    rows = []
    for i, first in enumerate(names):
        for second in names[i + 1 :]:
            a, b = runs[first], runs[second]
            for group in [g for g in a.split.groups if g in b.split.groups]:
                pa_, pb = _by_group(a.point, group), _by_group(b.point, group)
                sa = a.stats[a.stats["group"] == group].set_index("resample")
                sb = b.stats[b.stats["group"] == group].set_index("resample")
                for stat in STATS:
                    resampled = (sa[stat] - sb[stat]).to_numpy()[:, None]
                    low, high = _interval(resampled)
                    rows.append(
                        {
                            "group": group,
                            "statistic": stat,
                            "run_a": first,
                            "run_b": second,
                            "a": pa_[stat],
                            "b": pb[stat],
                            "difference": pa_[stat] - pb[stat],
                            "ci_low": low[0],
                            "ci_high": high[0],
                            "outside": bool(low[0] > 0 or high[0] < 0),
                        }
                    )
    return pd.DataFrame(rows)


def run_seed(seed: int, index: int) -> int:
    """The resampling seed of the ``index``-th run of a comparison seeded with ``seed``."""
    return derive_seed(seed, index)


def _by_group(point: pd.DataFrame, group: str) -> pd.Series:
    return point[point["group"] == group].iloc[0]


def _measures(summary: pd.DataFrame, n_layers: int, cfg: ConvergenceConfig) -> dict:
    """:data:`STATS`, label and shape of one group's summary (``quantity, layer, name, mean``)."""
    start, end, share = abruptness(summary, n_layers, cfg.late_depth)
    depths = drop_depths(summary, n_layers)
    final = summary[(summary["quantity"] == "entropy") & (summary["name"] == "final")]["mean"]
    return {
        "entropy_start": start,
        "entropy_end": end,
        "entropy_drop": start - end,
        "entropy_final": float(final.iloc[0]) if len(final) else float("nan"),
        "abruptness": share,
        **{f"drop_depth_{round(q * 100)}": x for q, x in zip(DROP_SHARES, depths)},
        "label": convergence_label(start, end, share, cfg),
        "shape": drop_shape(depths, start - end, cfg),
    }


def _resampled_measures(
    keys: pd.DataFrame, means: np.ndarray, group: str, n_layers: int, cfg: ConvergenceConfig
) -> pd.DataFrame:
    """:func:`_measures` of every resample of one group (``group``, ``resample`` columns added).

    The curves of all resamples are one ``[resamples, depths]`` array: the measures are array
    operations over it (:func:`abruptness_array`, :func:`drop_depths_array`), not a summary
    table per resample.
    """
    resamples = len(means)
    mine = np.flatnonzero(keys["group"].to_numpy() == group)
    base = keys.iloc[mine].reset_index(drop=True)
    curve = curve_rows(base, n_layers)
    if curve is None:
        start = end = share = np.full(resamples, np.nan)
        depths = np.full((resamples, len(DROP_SHARES)), np.nan)
    else:
        depth, rows = curve
        values = means[:, mine[rows]]  # [resamples, depths]
        start, end, share = abruptness_array(depth, values, cfg.late_depth)
        depths = drop_depths_array(depth, values)
    final = np.flatnonzero((base["quantity"] == "entropy") & (base["name"] == "final"))
    drop = start - end
    frame = pd.DataFrame(
        {
            "entropy_start": start,
            "entropy_end": end,
            "entropy_drop": drop,
            "entropy_final": means[:, mine[final[0]]] if len(final) else np.nan,
            "abruptness": share,
            **{f"drop_depth_{round(q * 100)}": depths[:, k] for k, q in enumerate(DROP_SHARES)},
            "label": [convergence_label(*row, cfg) for row in zip(start, end, share)],
            "shape": [drop_shape(tuple(row), d, cfg) for row, d in zip(depths, drop)],
        }
    )
    return frame.assign(group=group, resample=np.arange(resamples))


def _interval(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """2.5th and 97.5th percentiles of each column of ``[resamples, k]``, NaN rows left out."""
    tail = (1 - CONFIDENCE) / 2 * 100
    if values.size == 0:
        empty = np.full(values.shape[1], np.nan)
        return empty, empty
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN column: its interval is NaN
        low, high = np.nanpercentile(values.astype(np.float64), [tail, 100 - tail], axis=0)
    return low, high
