"""Run folders -> figure files: what ``ipl plot``, ``ipl compare`` and ``ipl entropy`` write.

The plotting itself is in :mod:`internal_policy_lens.analysis.plots` (tables in, figures out);
this module reads run folders (through :mod:`internal_policy_lens.runs.io`), picks what each
figure needs and saves every figure as PNG (200 dpi) and PDF. It never imports torch.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from ..config import CompareConfig, ConvergenceConfig, PlotConfig
from ..folders import Folder
from ..runs.io import RunFolder, model_name, open_run
from ..statistics import opt_in
from . import plots
from .convergence import (
    LayerSuggestion,
    convergence_summary,
    ffn_curve,
    find_stages,
    suggest_layer,
)
from .files import FORMATS, save_figure


@dataclass
class FigureReport:
    """What a figure writer wrote and what it left out."""

    written: list[Path] = field(default_factory=list)
    """Every file written (each figure as PNG and PDF)."""
    skipped: dict[str, str] = field(default_factory=dict)
    """Figure name -> why it was not drawn (e.g. its sites were not analysed)."""
    notes: list[str] = field(default_factory=list)
    """Lines to print after them (``ipl compare``: the differences outside the intervals)."""

    def __str__(self) -> str:
        lines = [f"wrote {path}" for path in self.written]
        lines += [f"skipped {name}: {why}" for name, why in self.skipped.items()]
        lines += self.notes
        return "\n".join(lines)


def write_run_figures(
    out_dir: str | Path,
    tokens: pd.DataFrame,
    deltas: pd.DataFrame,
    summary: pd.DataFrame,
    info: dict,
    *,
    sample=None,
    site: str | None = None,
    cfg: ConvergenceConfig | None = None,
    folder: str | Path | None = None,
    prefix: str = "",
) -> FigureReport:
    """Draw a run's figures into ``out_dir/figures/``: flow, change, heatmap, extras, cosines.

    ``next_token`` and ``residual_cosine`` need the extras columns; ``statistics`` is drawn for
    a run with opt-in statistics (``--stats``).

    A figure whose data the run lacks (sites not analysed, no ``--extras``) is skipped with the
    reason. ``sample`` and ``site`` choose the heatmap's sample and site; ``folder`` replaces
    ``out_dir/figures`` and ``prefix`` starts every file name (``analyses/make_figures.py``).

    Raises:
        ValueError: ``sample`` or ``site`` is not in ``tokens``.
    """
    sample, site = _heatmap_choice(tokens, sample, site)
    title = f"{model_name(info)} ({info['config']['lens']} lens)"
    if info.get("model", {}).get("parallel_block"):
        title += "; parallel attention and MLP: no resid_mid"
    cfg = cfg or ConvergenceConfig()
    stages = _stages(summary, cfg)
    builders = {
        "entropy_flow": lambda: plots.entropy_flow(tokens, title=title),
        "entropy_change": lambda: plots.entropy_change(
            deltas, stages=stages, tau=cfg.tau, title=title
        ),
        "token_heatmap": lambda: plots.token_heatmap(
            tokens, sample_id=sample, site=site, title=f"{title}: sample {sample}, site {site}"
        ),
        "next_token": lambda: plots.next_token_extras(tokens, title=title),
        "residual_cosine": lambda: plots.residual_cosine(tokens, title=title),
    }
    if set(opt_in()) & set(tokens.columns):  # a run without --stats has no such figure
        builders["statistics"] = lambda: plots.opt_in_statistics(tokens, title=title)
    report = FigureReport()
    folder = Path(out_dir) / "figures" if folder is None else Path(folder)
    for name, build in builders.items():
        try:
            fig = build()
        except ValueError as err:  # the run lacks this figure's data
            report.skipped[name] = str(err)
            for fmt in FORMATS:  # a figure left by an earlier run in this folder is stale
                (folder / f"{prefix}{name}.{fmt}").unlink(missing_ok=True)
            continue
        report.written += save_figure(fig, folder / f"{prefix}{name}")
    return report


def _heatmap_choice(tokens: pd.DataFrame, sample, site):
    if tokens.empty:
        return sample, site
    sites = [str(s) for s in pd.unique(tokens["site"])]
    if site is None:
        site = "resid_post" if "resid_post" in sites else sites[0]
    elif site not in sites:
        raise ValueError(f"site {site!r} is not in the run; it has {', '.join(sites)}")
    samples = pd.Series(pd.unique(tokens["sample_id"])).astype(str)  # not a string per row
    if sample is None:
        sample = tokens["sample_id"].min()
    elif not (samples == str(sample)).any():
        first = ", ".join(samples.drop_duplicates().head(5))
        raise ValueError(f"sample {sample!r} is not in the run (its first sample ids: {first})")
    return sample, site


def _stages(summary: pd.DataFrame, cfg: ConvergenceConfig):
    try:
        return find_stages(ffn_curve(summary), cfg.tau)
    except ValueError:  # no FFN deltas: nothing to shade
        return None


def plot_run(cfg: PlotConfig) -> FigureReport:
    """``ipl plot``: read a run folder and write its figures to ``RUN/figures/``.

    With ``cfg.splits.split``, also the flow and change figures by group
    (:func:`~internal_policy_lens.analysis.split_outputs.write_split_figures`).
    """
    run = open_run(cfg.run)
    samples = run.shown_samples(None if cfg.samples is None else cfg.samples.split(","))
    if cfg.sample is not None and cfg.sample not in map(str, samples):
        samples = [*samples, *run.shown_samples([cfg.sample])]
    report = write_run_figures(
        run.path,
        run.tokens(samples=samples),
        run.deltas(samples=samples),
        run.summary(),
        run.info,
        sample=cfg.sample,
        site=cfg.site,
        cfg=cfg.convergence,
    )
    if cfg.splits.split is not None:
        from .split_outputs import write_split_figures

        written, skipped, note = write_split_figures(run, cfg)
        report.written += written
        report.skipped |= skipped
        report.notes.append(note)
    return report


def compare(cfg: CompareConfig) -> tuple[FigureReport, pd.DataFrame]:
    """``ipl compare``: runs overlaid on relative depth, and one convergence row per run.

    Writes ``OUT/comparison.{png,pdf}``, ``OUT/comparison_cosine.{png,pdf}`` (when a run has
    the extras' residual cosines), ``OUT/report.html`` (unless ``cfg.report`` is False)
    and ``OUT/convergence.csv`` (columns ``model, run, lens``
    then :meth:`Convergence.row`; ``note`` says what a run's sites leave out and how to read an
    abruptness outside [0, 1]).
    """
    folder = Folder(cfg.out).check_writable()
    runs = [open_run(path) for path in cfg.runs]
    with folder.lock():  # one writer per output folder
        return _compare(cfg, runs)


def _compare(cfg: CompareConfig, runs: list[RunFolder]) -> tuple[FigureReport, pd.DataFrame]:
    names = run_names(runs)
    summaries = [run.summary() for run in runs]
    stacked = pd.concat(
        [s.assign(model=n, n_layers=r.n_layers) for s, n, r in zip(summaries, names, runs)],
        ignore_index=True,
    )
    out = Path(cfg.out)
    report = FigureReport()
    fig = plots.compare_runs(stacked, late_depth=cfg.convergence.late_depth)
    report.written += save_figure(fig, out / "comparison")
    try:
        report.written += save_figure(plots.compare_cosines(stacked), out / "comparison_cosine")
    except ValueError as err:  # no run has the extras
        report.skipped["comparison_cosine"] = str(err)
    rows = [
        {
            "model": name,
            "run": str(run.path),
            "lens": run.lens,
            **convergence_summary(summary, run.n_layers, cfg.convergence).row(),
        }
        for run, name, summary in zip(runs, names, summaries)
    ]
    # Layer numbers stay integers beside a run without a suggested layer (not 6.0 and NaN).
    table = pd.DataFrame(rows).astype({"n_layers": "Int64", "suggested_layer": "Int64"})
    report.written.append(Folder(out).write_csv("convergence.csv", table))
    if cfg.splits.split is not None or len(runs) > 1:
        from .split_outputs import compare_splits

        report.notes = compare_splits(cfg, runs, names)
    differences = run_differences(runs, names)
    for difference in differences:
        warnings.warn(difference, stacklevel=2)
    if cfg.report:
        from .report import write_compare_report  # plotly loads only when a page is written

        report.written.append(write_compare_report(cfg, runs, names, differences))
    return report, table


def run_names(runs: list[RunFolder]) -> list[str]:
    """One distinct name per run, for legends and tables: the model's, then what tells apart.

    Runs of one model are named by lens, then by folder name (by path where folder names do
    not tell them apart); a folder given twice is numbered (``#2``).
    """
    names = [run.name for run in runs]
    names = [
        f"{name} ({run.lens})"
        if len({r.lens for r, n in zip(runs, names) if n == name}) > 1
        else name
        for name, run in zip(names, runs)
    ]

    def told_apart(name: str, run: RunFolder) -> str:
        same = [r for r, n in zip(runs, names) if n == name]
        if len(same) == 1:
            return name
        folders = {r.path.name for r in same}
        by_name = len(folders) == len({r.path.resolve() for r in same})
        return f"{name} ({run.path.name if by_name else run.path})"

    names = [told_apart(name, run) for name, run in zip(names, runs)]
    return [
        f"{name} #{names[:i].count(name) + 1}" if name in names[:i] else name
        for i, name in enumerate(names)
    ]


def run_differences(runs: list[RunFolder], names: list[str]) -> list[str]:
    """What makes the runs' curves not like for like.

    A folder given twice, or runs that differ in lens, samples (the sample ids and tokens
    analysed, not the data file), sites or extras.
    """
    found = []
    folders = [run.path.resolve() for run in runs]
    for folder in dict.fromkeys(folders):
        same = [name for name, f in zip(names, folders) if f == folder]
        if len(same) > 1:
            found.append(f"{folder} is given {len(same)} times ({', '.join(same)}): the same run")
    summaries = [run.summary() for run in runs]
    analysed = [_analysed(run, summary) for run, summary in zip(runs, summaries)]
    told = {
        "lens": [run.lens for run in runs],
        "samples": [text for text, _ in analysed],
        "sites": [", ".join(sorted(_sites(summary))) for summary in summaries],
        "extras": [
            "extras" if (summary["quantity"] == "cosine").any() else "no extras"
            for summary in summaries
        ],
    }
    # Samples are compared by what was analysed (ids, tokens per sample), not by the data file.
    compared = {**told, "samples": [per_sample for _, per_sample in analysed]}
    for what, values in told.items():
        if len({repr(value) for value in compared[what]}) == 1:
            continue
        same_text = len(set(values)) == 1
        found.append(
            f"the runs differ in {what}: "
            + "; ".join(f"{name}: {value}" for name, value in zip(names, values))
            + (" (other sample ids or tokens per sample)" if same_text else "")
        )
    return found


def _analysed(run: RunFolder, summary: pd.DataFrame) -> tuple[str, list[tuple[str, int]]]:
    """What a run analysed: ``"N samples of FILE, M tokens"``, and (sample id, tokens) each.

    Each token has one row per (site, layer) key, and each key one entropy row in the summary.
    """
    keys = max(int((summary["quantity"] == "entropy").sum()), 1)
    tokens = [(str(sample), rows // keys) for sample, rows in run.sample_rows()]
    data = Path(str(run.info.get("config", {}).get("data"))).name
    told = f"{len(tokens)} samples of {data}, {sum(n for _, n in tokens):,} tokens"
    return told, tokens


def _sites(summary: pd.DataFrame) -> set[str]:
    return set(summary[summary["quantity"] == "entropy"]["name"].astype(str))


def suggest_run_layer(
    run_dir: str | Path, cfg: ConvergenceConfig | None = None
) -> tuple[RunFolder, LayerSuggestion]:
    """``ipl suggest-layer``: the BuPO layer of a run folder (see :func:`suggest_layer`)."""
    run = open_run(run_dir)
    return run, suggest_layer(run.summary(), cfg)
