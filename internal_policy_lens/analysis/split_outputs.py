"""Splits and intervals into files: ``ipl split RUN`` and ``ipl compare --split``.

``RUN/splits/<split>/``: ``summary.csv`` (``group`` then the summary's columns, with ``ci_low``
and ``ci_high``), ``convergence.csv`` (one row per group: each measure with its interval, the
shares of labels and shapes over the resamples, q, threshold, resamples, seed), ``split.json``
(the same facts and the tokens per group) and ``split.png/.pdf`` (one line per group).
``ipl plot RUN --split SPLIT`` adds ``RUN/figures/entropy_flow_SPLIT`` and
``entropy_change_SPLIT`` (.png/.pdf): the flow and change figures with one line per group.
``ipl compare`` writes ``OUT/splits.csv`` (every run's convergence rows) and
``OUT/differences.csv`` (:func:`~internal_policy_lens.analysis.uncertainty.differences`).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from ..config import CompareConfig, ConvergenceConfig, PlotConfig, SplitConfig, SplitRunConfig
from ..folders import Folder
from ..runs.io import RunFolder, open_run
from .files import save_figure
from .split_figures import CHANGE_PANELS, FLOW_PANELS, split_curves
from .splits import split_run
from .uncertainty import Resampled, differences, resample, run_seed


def resampled_run(
    run: RunFolder, cfg: SplitConfig, convergence: ConvergenceConfig, seed: int
) -> Resampled:
    """The run split by ``cfg.split`` (None: one group) and resampled with ``seed``."""
    return resample(
        split_run(run, cfg.split, cfg.q),
        run.n_layers,
        resamples=cfg.resamples,
        seed=seed,
        cfg=convergence,
    )


def write_split(cfg: SplitRunConfig) -> str:
    """``ipl split``: write ``RUN/splits/<split>/`` (module docstring); what was written."""
    run = open_run(cfg.run)
    found = resampled_run(run, cfg.splits, cfg.convergence, cfg.splits.resample_seed)
    folder = Folder(run.path / "splits" / found.split.name).create()
    with Folder(run.path).lock():
        folder.write_csv("summary.csv", found.summary())
        table = found.convergence()
        folder.write_csv("convergence.csv", table)
        folder.write_json("split.json", found.split.facts() | found.facts())
        title = f"{run.name} ({run.lens} lens), split: {found.split.name}"
        save_figure(split_curves(found.summary(), title=title), folder.path / "split")
    shown = ["group", "abruptness", "abruptness_low", "abruptness_high", "label"]
    shown += [f"label_share_{name}" for name in ("progressive", "abrupt", "flat")]
    return (
        f"wrote {folder.path}/ (summary.csv, convergence.csv, split.json, split.png/.pdf); "
        f"{cfg.splits.resamples} resamples of the responses, seed {cfg.splits.resample_seed}\n"
        + table[shown].to_string(index=False, float_format=lambda v: f"{v:.3g}")
    )


def write_split_figures(run: RunFolder, cfg: PlotConfig) -> tuple[list[Path], dict, str]:
    """``ipl plot --split``: the flow and change figures by group into ``RUN/figures/``.

    Every token of the run counts (the split is streamed from ``tokens.parquet``), not only
    the samples the other figures read; bands are the 95% intervals over resampled responses.
    Returns the files written, the figures skipped (name -> why) and a line to print.
    """
    written, skipped = [], {}
    found = resampled_run(run, cfg.splits, cfg.convergence, cfg.splits.resample_seed)
    summary, split = found.summary(), found.split
    counts = ", ".join(f"{group} {n:,}" for group, n in split.tokens.items())
    title = f"{run.name} ({run.lens} lens) by {split.name}: tokens {counts}"
    for name, panels in (("entropy_flow", FLOW_PANELS), ("entropy_change", CHANGE_PANELS)):
        stem = f"{name}_{split.name}"
        try:
            fig = split_curves(summary, panels=panels, title=title)
        except ValueError as err:  # the run lacks these sites
            skipped[stem] = str(err)
            continue
        written += save_figure(fig, run.path / "figures" / stem)
    cut = f", forking at H(final) >= {split.threshold:.4g} nats" if split.q else ""
    note = (
        f"split {split.name}: {cfg.splits.resamples} resamples of the responses, seed "
        f"{cfg.splits.resample_seed}{cut}"
    )
    return written, skipped, note


def compare_splits(cfg: CompareConfig, runs: list[RunFolder], names: list[str]) -> list[str]:
    """``ipl compare``'s intervals: ``OUT/splits.csv``, ``OUT/differences.csv``; lines to print.

    Run ``i`` is resampled with seed ``run_seed(seed, i)``, so the runs' draws are independent.
    """
    found = {
        name: resampled_run(run, cfg.splits, cfg.convergence, run_seed(cfg.splits.resample_seed, i))
        for i, (name, run) in enumerate(zip(names, runs))
    }
    out = Folder(cfg.out)
    rows = [r.convergence().assign(model=name) for name, r in found.items()]
    out.write_csv("splits.csv", pd.concat(rows, ignore_index=True))
    table = differences(found)
    out.write_csv("differences.csv", table)
    if table.empty:
        return []
    lines = [
        f"differences outside the 95% intervals ({cfg.splits.resamples} resamples of the "
        f"responses, seed {cfg.splits.resample_seed}; {Path(cfg.out) / 'differences.csv'}):"
    ]
    for row in table[table.outside].itertuples():
        lines.append(
            f"  {row.group}: {row.statistic} {row.run_a} {row.a:.3g} vs {row.run_b} {row.b:.3g}: "
            f"{row.difference:+.3g} [{row.ci_low:+.3g}, {row.ci_high:+.3g}]"
        )
    inside = table[~table.outside]
    if len(inside):
        lines.append(
            f"  within the intervals: {', '.join(sorted(set(inside.statistic)))} "
            "(for at least one pair and group)"
        )
    return lines
