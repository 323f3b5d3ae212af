r"""Splits of a run's tokens into groups and the summary of each group (pandas, pyarrow; no torch).

A split gives every analysed token (sample, position) one group:

- ``forking``: ``forking`` where the final policy's entropy is in the top ``q`` of the run (at or
  above its ``1 - q`` quantile, numpy's default linear interpolation; the threshold is
  recorded), else ``other``. Wang et al. 2025 (arXiv 2506.01939) call these high-entropy
  positions forking tokens.
- ``correctness``: ``right`` or ``wrong`` by the response's last ``\boxed{}`` against the
  record's answer (:func:`~internal_policy_lens.data.answers.math_reward`); ``no answer`` where
  the record has none.
- ``position``: the quarter of the response the token lies in, by its rank among the sample's
  analysed positions (``0-25%`` ... ``75-100%``).
- ``all`` (no split): one group.

The run folder's ``tokens.parquet`` is read one row group (one batch) at a time, only the columns
needed: first the token index (one row per token: the final policy's entropy, or the first key's
rows where ``final`` was not analysed), then each batch's moments per (group, sample) of every
quantity of the summary (:func:`~internal_policy_lens.tables.frames.summary_moments`). What the
split holds is those per-sample moments: they merge exactly into each group's summary, and the
resampling of :mod:`~internal_policy_lens.analysis.uncertainty` draws from them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from ..data.answers import math_reward
from ..runs.io import RunFolder
from ..statistics import TOKEN_RENAMES, renamed_columns
from ..tables.frames import merge_summaries, summary_moments

SPLITS: tuple[str, ...] = ("forking", "correctness", "position")
"""The splits a summary can be made by (``None``: one group, ``all``)."""
QUARTERS: tuple[str, ...] = ("0-25%", "25-50%", "50-75%", "75-100%")
_ORDER = ("forking", "other", "right", "wrong", "no answer", *QUARTERS, "all")
_INDEX = ("sample_id", "position", "entropy")


@dataclass
class Split:
    """A run's tokens split into groups, held as per-sample moments.

    Attributes:
        name: the split (:data:`SPLITS`), or ``all``.
        groups: the groups present, in a fixed order.
        q: the forking share (None for another split).
        threshold: the final-policy entropy (nats) at or above which a token is forking.
        tokens: tokens per group.
        samples: ``group, sample_id`` then ``MOMENT_COLUMNS``: each sample's moments per group.
    """

    name: str
    groups: list[str]
    q: float | None
    threshold: float | None
    tokens: dict[str, int]
    samples: pd.DataFrame

    def summary(self) -> pd.DataFrame:
        """``group`` then ``SUMMARY_COLUMNS``: the summary of each group (merged exactly)."""
        return merge_summaries([self.samples.drop(columns="sample_id")], by=["group"])

    def facts(self) -> dict:
        """What a split's files record beside its tables."""
        return {
            "split": self.name,
            "q": self.q,
            "threshold": self.threshold,
            "groups": self.groups,
            "tokens": self.tokens,
            "samples": int(self.samples["sample_id"].nunique()),
        }


def token_groups(
    index: pd.DataFrame, split: str | None, q: float = 0.2, correct: dict | None = None
) -> tuple[np.ndarray, float | None]:
    """The group of each row of ``index`` (one row per token), and the forking threshold.

    Args:
        index: ``sample_id, position, entropy`` (the final policy's; NaN where not analysed).
        split: one of :data:`SPLITS`, or None (every token in ``all``).
        q: the forking share, in (0, 1).
        correct: ``str(sample_id) -> True/False/None`` (None: no answer), for ``correctness``.

    Raises:
        ValueError: an unknown split, a ``q`` outside (0, 1), no final-policy entropy for
            ``forking``, or no answer at all for ``correctness``.
    """
    if split is None:
        return np.full(len(index), "all", dtype=object), None
    if split == "forking":
        if not 0 < q < 1:
            raise ValueError(f"the forking share q must lie in (0, 1), not {q}")
        entropy = index["entropy"].to_numpy(np.float64)
        if len(entropy) and np.isnan(entropy).all():
            raise ValueError(
                "the forking split needs the final policy's entropy: rerun `ipl entropy` "
                "with final among --sites"
            )
        threshold = float(np.quantile(entropy, 1 - q)) if len(entropy) else float("nan")
        return np.where(entropy >= threshold, "forking", "other").astype(object), threshold
    if split == "correctness":
        verdicts = index["sample_id"].astype(str).map(correct or {})
        if verdicts.isna().all():
            raise ValueError(
                "the correctness split needs answers: no record of the run has an answer "
                "(give --data records with an 'answer' field)"
            )
        names = verdicts.map({True: "right", False: "wrong"}).fillna("no answer")
        return names.to_numpy(object), None
    if split == "position":
        ordered = index.sort_values(["sample_id", "position"], kind="stable")
        by_sample = ordered.groupby("sample_id", sort=False)["position"]
        rank = by_sample.cumcount().to_numpy()
        count = by_sample.transform("size").to_numpy()
        quarter = pd.Series(np.asarray(QUARTERS, object)[4 * rank // count], ordered.index)
        return quarter.reindex(index.index).to_numpy(object), None
    raise ValueError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")


def split_table(
    tokens: pd.DataFrame, split: str | None, q: float = 0.2, correct: dict | None = None
) -> Split:
    """A token table held in memory (``entropy_table``'s), split (see :func:`token_groups`)."""
    index = _index_of(tokens)
    groups, threshold = token_groups(index, split, q, correct)
    labels = index[["sample_id", "position"]].assign(group=groups)
    moments = summary_moments(tokens.merge(labels), by=["group", "sample_id"])
    return _split(split, q, threshold, labels, moments)


def split_run(run: RunFolder, split: str | None, q: float = 0.2) -> Split:
    """A run folder's tokens split, read one row group (one batch) at a time."""
    file = pq.ParquetFile(run.path / "tokens.parquet")
    wanted = [c for c in file.schema_arrow.names if c not in ("token", "token_id")]
    index = _run_index(file)
    correct = _verdicts(run.path / "responses.jsonl") if split == "correctness" else None
    groups, threshold = token_groups(index, split, q, correct)
    labels = index[["sample_id", "position"]].assign(group=groups)
    by_sample = {s: frame for s, frame in labels.groupby("sample_id", sort=False)}
    parts = []
    for i in range(file.num_row_groups):
        # An older run's columns under today's names, as RunFolder.tokens() reads them.
        chunk = renamed_columns(file.read_row_group(i, columns=wanted).to_pandas(), TOKEN_RENAMES)
        if chunk.empty:
            continue
        mine = pd.concat([by_sample[s] for s in pd.unique(chunk["sample_id"])])
        parts.append(summary_moments(chunk.merge(mine), by=["group", "sample_id"]))
    moments = pd.concat(parts, ignore_index=True) if parts else summary_moments(pd.DataFrame())
    return _split(split, q, threshold, labels, moments)


def _split(split, q, threshold, labels: pd.DataFrame, moments: pd.DataFrame) -> Split:
    counts = labels["group"].value_counts()
    groups = sorted(counts.index, key=_ORDER.index)
    moments = moments.sort_values(
        "group", key=lambda c: c.map(_ORDER.index), kind="stable"
    ).reset_index(drop=True)
    return Split(
        name=split or "all",
        groups=groups,
        q=q if split == "forking" else None,
        threshold=threshold,
        tokens={g: int(counts[g]) for g in groups},
        samples=moments,
    )


def _index_of(tokens: pd.DataFrame) -> pd.DataFrame:
    """One row per token: the final policy's entropy, NaN where ``final`` is not in the table."""
    sites = tokens["site"].astype(str)
    if (sites == "final").any():
        rows = tokens[sites == "final"]
        return rows[list(_INDEX)].reset_index(drop=True)
    first = tokens[(sites == sites.iloc[0]) & (tokens["layer"] == tokens["layer"].iloc[0])]
    return first[["sample_id", "position"]].assign(entropy=np.nan).reset_index(drop=True)


def _run_index(file: pq.ParquetFile) -> pd.DataFrame:
    """:func:`_index_of` of a run's ``tokens.parquet``, row group by row group."""
    columns = ["sample_id", "position", "layer", "site", "entropy"]
    parts = []
    for i in range(file.num_row_groups):
        chunk = file.read_row_group(i, columns=columns).to_pandas()
        if len(chunk):
            parts.append(_index_of(chunk))
    if not parts:
        return pd.DataFrame({c: [] for c in _INDEX})
    return pd.concat(parts, ignore_index=True)


def _verdicts(path: Path) -> dict[str, bool | None]:
    """``str(sample_id) -> math_reward(response, answer) == 1`` (None without an answer)."""
    from ..data.records import read_records

    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no responses to check (the correctness split reads the run's "
            "responses.jsonl); rerun the `ipl entropy` command that wrote the folder"
        )
    return {
        str(r["sample_id"]): None
        if r.get("answer") is None or r.get("response") is None
        else math_reward(r["response"], r["answer"]) == 1.0
        for r in read_records(path)
    }
