"""Run folders -> figure files: what ``ipl plot``, ``ipl compare`` and ``ipl entropy`` write.

The plotting itself is in :mod:`internal_policy_lens.plots` (tables in, figures out); this module
reads run folders, picks what each figure needs and saves every figure as PNG (200 dpi) and PDF.
It never imports torch.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from . import plots
from .config import CompareConfig, ConvergenceConfig, PlotConfig
from .convergence import (
    LayerSuggestion,
    convergence_summary,
    ffn_curve,
    find_stages,
    suggest_layer,
)

FORMATS: tuple[str, ...] = ("png", "pdf")
DPI = 200
_TABLES = ("run.json", "summary.csv", "tokens.parquet", "deltas.parquet")


@dataclass
class RunFolder:
    """A finished ``ipl entropy`` run folder; its tables are read on demand."""

    path: Path
    info: dict

    @property
    def name(self) -> str:
        """The model's name (see :func:`model_name`)."""
        return model_name(self.info)

    @property
    def n_layers(self) -> int:
        """The model's number of decoder layers."""
        return int(self.info["model"]["n_layers"])

    @property
    def lens(self) -> str:
        """The lens of the run (``raw`` or ``norm``)."""
        return str(self.info["config"]["lens"])

    def summary(self) -> pd.DataFrame:
        """``summary.csv``."""
        return pd.read_csv(self.path / "summary.csv")

    def tokens(self) -> pd.DataFrame:
        """``tokens.parquet``."""
        return pd.read_parquet(self.path / "tokens.parquet")

    def deltas(self) -> pd.DataFrame:
        """``deltas.parquet``."""
        return pd.read_parquet(self.path / "deltas.parquet")


def model_name(info: dict) -> str:
    """The last part of a run's model hub name or folder: ``Qwen/Qwen3-4B`` -> ``Qwen3-4B``."""
    return Path(str(info["model"]["name_or_path"]).rstrip("/")).name


def open_run(path: str | Path) -> RunFolder:
    """Check that ``path`` holds a finished run and read its ``run.json``.

    Raises:
        FileNotFoundError: the folder or one of its tables is missing.
        ValueError: the run has not finished.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such run folder")
    missing = [name for name in _TABLES if not (path / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{path}: not a finished run folder (missing {', '.join(missing)}); "
            f"write one with `ipl entropy --out {path}`"
        )
    info = json.loads((path / "run.json").read_text())
    if info.get("status") != "complete":
        raise ValueError(
            f"{path}: the run is not complete (status {info.get('status')!r}); "
            "rerun the same `ipl entropy` command to finish it"
        )
    return RunFolder(path, info)


@dataclass
class FigureReport:
    """What a figure writer wrote and what it left out."""

    written: list[Path] = field(default_factory=list)
    """Every file written (each figure as PNG and PDF)."""
    skipped: dict[str, str] = field(default_factory=dict)
    """Figure name -> why it was not drawn (e.g. its sites were not analysed)."""

    def __str__(self) -> str:
        lines = [f"wrote {path}" for path in self.written]
        lines += [f"skipped {name}: {why}" for name, why in self.skipped.items()]
        return "\n".join(lines)


def save_figure(fig, stem: Path) -> list[Path]:
    """Write ``fig`` as ``stem.png`` and ``stem.pdf``; return the paths."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_suffix(f".{fmt}") for fmt in FORMATS]
    with warnings.catch_warnings():  # tokens in scripts the font lacks are drawn as boxes
        warnings.filterwarnings("ignore", message="Glyph .* missing from font")
        for path in paths:
            fig.savefig(path, dpi=DPI)
    return paths


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
    """Draw a run's figures into ``out_dir/figures/``: flow, change, heatmap, next-token extras.

    A figure whose data the run lacks (sites not analysed, no ``--extras``) is skipped with the
    reason. ``sample`` and ``site`` choose the heatmap's sample and site; ``folder`` replaces
    ``out_dir/figures`` and ``prefix`` starts every file name (``analyses/make_figures.py``).

    Raises:
        ValueError: ``sample`` or ``site`` is not in ``tokens``.
    """
    sample, site = _heatmap_choice(tokens, sample, site)
    title = f"{model_name(info)} ({info['config']['lens']} lens)"
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
    }
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
    sites = list(dict.fromkeys(tokens["site"].astype(str)))
    if site is None:
        site = "resid_post" if "resid_post" in sites else sites[0]
    elif site not in sites:
        raise ValueError(f"site {site!r} is not in the run; it has {', '.join(sites)}")
    samples = tokens["sample_id"].astype(str)
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
    """``ipl plot``: read a run folder and write its figures to ``RUN/figures/``."""
    run = open_run(cfg.run)
    return write_run_figures(
        run.path,
        run.tokens(),
        run.deltas(),
        run.summary(),
        run.info,
        sample=cfg.sample,
        site=cfg.site,
        cfg=cfg.convergence,
    )


def compare(cfg: CompareConfig) -> tuple[FigureReport, pd.DataFrame]:
    """``ipl compare``: runs overlaid on relative depth, and one convergence row per run.

    Writes ``OUT/comparison.{png,pdf}`` and ``OUT/convergence.csv`` (columns ``model, run, lens``
    then :meth:`Convergence.row`; ``note`` says why a run has no summary).
    """
    runs = [open_run(path) for path in cfg.runs]
    names = [run.name for run in runs]
    names = [
        f"{name} ({run.path.name})" if names.count(name) > 1 else name
        for name, run in zip(names, runs)
    ]
    summaries = [run.summary() for run in runs]
    stacked = pd.concat(
        [s.assign(model=n, n_layers=r.n_layers) for s, n, r in zip(summaries, names, runs)],
        ignore_index=True,
    )
    out = Path(cfg.out)
    report = FigureReport()
    fig = plots.compare_runs(stacked, late_depth=cfg.convergence.late_depth)
    report.written += save_figure(fig, out / "comparison")
    rows = []
    for run, name, summary in zip(runs, names, summaries):
        row = {"model": name, "run": str(run.path), "lens": run.lens}
        try:
            row.update(convergence_summary(summary, run.n_layers, cfg.convergence).row())
        except ValueError as err:  # e.g. the run has no FFN sites
            row["note"] = str(err)
        rows.append(row)
    table = pd.DataFrame(rows)
    table.to_csv(out / "convergence.csv", index=False)
    report.written.append(out / "convergence.csv")
    return report, table


def suggest_run_layer(
    run_dir: str | Path, cfg: ConvergenceConfig | None = None
) -> tuple[RunFolder, LayerSuggestion]:
    """``ipl suggest-layer``: the BuPO layer of a run folder (see ``convergence.suggest_layer``)."""
    run = open_run(run_dir)
    return run, suggest_layer(run.summary(), cfg)
