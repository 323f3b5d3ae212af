"""The run folder of a training run, for both trainers (built-in loop and TRL).

``config.json`` holds the resolved configuration; ``metrics.jsonl`` one line per step. A run is
resumed only with the same configuration, and the metric lines of steps after the checkpoint
it resumes from are dropped (they are redone). Nothing here imports torch.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from ..folders import Folder, folder_state
from ..statistics import PROBE_RENAMES, renamed_values

METRICS = "metrics.jsonl"


def start_training(
    out: Path, config: dict, *, resume: bool, resume_step: int | None, writer: bool = True
) -> None:
    """Check a folder before training into it, or set it up for a fresh run.

    Args:
        out: the run folder.
        config: the resolved configuration (``config.json``).
        resume: whether the user asked to resume (``--resume``).
        resume_step: the step of the folder's last checkpoint (None: there is none). With
            ``resume`` the run continues from it, or from step 0 when there is none (a run
            killed before its first checkpoint starts again).
        writer: whether this process writes the run's files (rank 0 of several).

    Raises:
        ValueError: when resuming with another configuration, or when a fresh run would write
            into a folder that holds a run.
    """
    folder = Folder(out)
    if resume and (out / "config.json").is_file():
        check_resume_config(out, config)
        if writer:
            _truncate_metrics(folder, resume_step or 0)
        return
    if (out / METRICS).exists():
        raise ValueError(
            f"{out}: holds a training run; pass --resume to continue it, or choose another --out"
        )
    if writer:
        folder.create().write_json("config.json", config)


def check_resume_config(out: Path, config: dict) -> None:
    """Refuse to resume a run whose ``config.json`` differs from ``config``, naming the fields."""
    folder_state(
        out / "config.json",
        Folder(out).read_json("config.json"),
        config,
        complete=False,  # how far the run got is its checkpoints' business
        holds="--resume",
        fix="resume with the options the run was started with, or choose another --out",
    )


def append_metrics(out: Path, metrics: dict) -> None:
    """Append one step's metrics to ``metrics.jsonl``."""
    Folder(out).append_line(METRICS, metrics)


def read_metrics(run: str | Path) -> pd.DataFrame:
    """A run folder's ``metrics.jsonl`` as a DataFrame (one row per step)."""
    path = Path(run) / METRICS
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics; is {run} a folder of ipl train-bupo?")
    lines = Folder(run).read_lines(METRICS)
    if not lines:
        raise ValueError(f"{path}: no step has finished yet")
    return pd.DataFrame(lines)


def training_summary(run: str | Path) -> str | None:
    """Reward and accuracy at the start and the end of a run, and its phases (None: no steps).

    Per-step rewards are noisy, so the start and the end are means over the first and the last
    quarter of the steps (at least one step each).
    """
    path = Path(run) / METRICS
    lines = Folder(run).read_lines(METRICS) if path.is_file() else []
    if not lines:
        return None
    metrics = pd.DataFrame(lines)
    window = max(1, len(metrics) // 4)
    first, last = metrics.iloc[:window], metrics.iloc[-window:]
    one = len(metrics) == 1
    changes = [
        f"{name} {last[column].mean():.3f}"
        if one
        else f"{name} {first[column].mean():.3f} -> {last[column].mean():.3f}"
        for name, column in (("reward", "reward_mean"), ("accuracy", "accuracy"))
        if column in metrics and metrics[column].notna().any()
    ]
    ipa = metrics[metrics["phase"] == "ipa"]
    phases = []
    if not ipa.empty:
        phases.append(f"{_count(len(ipa), 'IPA step')} on layer {int(ipa['layer'].iloc[0])}")
    if len(ipa) < len(metrics):
        phases.append(_count(len(metrics) - len(ipa), "GRPO step"))
    when = _span(last) if one else f"{_span(first)} -> {_span(last)}"
    when = f"means of {when}" if window > 1 else when
    return f"{', '.join(changes)} ({when}; {', then '.join(phases)})"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'s' if n != 1 else ''}"


def _span(frame: pd.DataFrame) -> str:
    steps = frame["step"].tolist()
    return f"step {steps[0]}" if len(steps) == 1 else f"steps {steps[0]}-{steps[-1]}"


def _truncate_metrics(folder: Folder, step: int) -> None:
    """Drop metric lines of steps at or after ``step`` (they are redone)."""
    path = folder.path / METRICS
    if not path.exists():
        return
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    kept = [ln for ln in lines if (_step(ln) is not None and _step(ln) < step)]
    folder.write_text(METRICS, "".join(ln + "\n" for ln in kept))


def _step(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError):
        return None


def read_probes(run: str | Path) -> tuple[pd.DataFrame, int] | None:
    """A run folder's ``probes.parquet`` and its trained layer k, or None without probes."""
    path = Path(run) / "probes.parquet"
    if not path.is_file():
        return None
    rows = renamed_values(pd.read_parquet(path), "quantity", PROBE_RENAMES)
    return rows, int(Folder(run).read_json("config.json")["layer"])
