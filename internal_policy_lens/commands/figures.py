"""The commands that read finished runs: compare, suggest-layer, report, plot-train."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..config import CompareConfig, ConvergenceConfig, ReportConfig
from ..lens_kinds import PAPER_LENS


def compare(cfg: CompareConfig) -> str:
    """Overlay the runs; the figures written, then the convergence table."""
    from ..analysis.figures import compare as compare_runs

    report, table = compare_runs(cfg)
    notes = [f"note: {model}: {note}" for model, note in zip(table["model"], table["note"]) if note]
    return "\n".join([str(report), table.drop(columns="note").to_string(index=False), *notes])


def suggest_layer(run: Path, cfg: ConvergenceConfig) -> tuple[str, bool]:
    """The paper's BuPO layer of ``run`` with its evidence, and whether a layer qualifies."""
    from ..analysis.figures import suggest_run_layer

    folder, suggestion = suggest_run_layer(run, cfg)
    lines = [f"{folder.name}: {folder.n_layers} layers, {folder.lens} lens"]
    if folder.lens != PAPER_LENS:
        lines.append(
            f"note: the paper's rule reads the {PAPER_LENS} lens; this run used the "
            f"{folder.lens} lens"
        )
    lines.append(str(suggestion))
    return "\n".join(lines), suggestion.layer is not None


def report(cfg: ReportConfig, open_page: bool, browser: Callable[[str], bool] | None = None) -> str:
    """Write the run's interactive page (and open it in the browser if asked).

    ``browser`` opens a URL and says whether it could (default: :func:`webbrowser.open`).
    """
    from ..analysis.report import report_run

    path = report_run(cfg)
    lines = [f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)"]
    if open_page:
        import webbrowser

        if not (browser or webbrowser.open)(path.resolve().as_uri()):
            lines.append(f"no browser found: open {path}")
    return "\n".join(lines)


def plot_train(runs: list[Path], out: Path) -> str:
    """Training curves of the runs, and the probe panels of those trained with probes."""
    from ..analysis.figures import save_figure
    from ..analysis.plots import probe_panels, training_curves
    from ..train.folder import read_metrics, read_probes

    frames = {str(r): read_metrics(r) for r in runs}
    probes = {str(r): read_probes(r) for r in runs}
    probes = {name: found for name, found in probes.items() if found is not None}
    save_figure(training_curves(frames), out / "training")
    lines = [f"wrote {out}/training.png and training.pdf"]
    if not probes:
        return "\n".join([*lines, "no probes.png: no run has probes (train with --probe-every N)"])
    tables = {name: table for name, (table, _) in probes.items()}
    figure = probe_panels(tables, {name: k for name, (_, k) in probes.items()})
    save_figure(figure, out / "probes")
    lines.append(
        f"wrote {out}/probes.png and probes.pdf ({len(probes)} of {len(runs)} runs probed)"
    )
    return "\n".join(lines)
