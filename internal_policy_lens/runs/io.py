"""Run folders of ``ipl entropy``: the tables and facts (``run.json``) of a finished run.

Readers use :func:`open_run` for a finished ``ipl entropy`` folder; writing (atomically, under a
lock) is :class:`~internal_policy_lens.folders.Folder`'s. Nothing here imports torch.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Iterable
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq

from ..folders import Folder
from ..statistics import TOKEN_RENAMES, renamed_columns, renamed_values

RUN_TABLES: tuple[str, ...] = ("run.json", "summary.csv", "tokens.parquet", "deltas.parquet")
"""The files of a finished ``ipl entropy`` run folder."""
FIGURE_ROWS = 1_000_000
"""Token rows that a run's figures and report read at most, in whole samples (``summary.csv``
covers every token)."""


class RunFolder(Folder):
    """The folder of an ``ipl entropy`` run: written as any :class:`Folder`, read by table.

    For a finished run (see :func:`open_run`) it reads the run's tables and facts (:attr:`info`
    is ``run.json``).
    """

    def __init__(self, path: str | os.PathLike, info: dict | None = None) -> None:
        super().__init__(path)
        self._info = info

    @property
    def info(self) -> dict:
        """``run.json``: how the run was made."""
        if self._info is None:
            self._info = self.read_json("run.json")
        return self._info

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
        """The lens of the run (``raw``, ``norm``, ``tuned``...: a registered lens kind's name)."""
        return str(self.info["config"]["lens"])

    def summary(self) -> pd.DataFrame:
        """``summary.csv`` (quantities of an older run under today's names)."""
        frame = pd.read_csv(self.path / "summary.csv")
        return renamed_values(frame, "quantity", TOKEN_RENAMES)

    def tokens(
        self,
        *,
        samples: Iterable | None = None,
        layers: Iterable[int] | None = None,
        sites: Iterable[str] | None = None,
        columns: Iterable[str] | None = None,
    ) -> pd.DataFrame:
        """``tokens.parquet``, or the rows of some ``samples``, ``layers`` and ``sites`` only.

        Filtered reads skip the file's row groups (one per batch) that hold none of the rows
        asked for, so that reading one response of a big run never reads the rest.

        Example:
            >>> run.tokens(samples=[3], sites=["resid_post"], columns=["position", "entropy"])
        """
        filters = _filters(sample_id=samples, layer=layers, site=sites)
        path = self.path / "tokens.parquet"
        if columns is not None:  # an older run's file holds some columns under older names
            held = set(pq.read_schema(path).names)
            older = {new: old for old, new in TOKEN_RENAMES.items() if old in held}
            columns = [older.get(c, c) for c in columns]
        frame = read_parquet(path, filters=filters, columns=columns)
        return renamed_columns(frame, TOKEN_RENAMES)

    def deltas(
        self, *, samples: Iterable | None = None, layers: Iterable[int] | None = None
    ) -> pd.DataFrame:
        """``deltas.parquet``, or the rows of some ``samples`` and ``layers`` only."""
        filters = _filters(sample_id=samples, layer=layers)
        return read_parquet(self.path / "deltas.parquet", filters=filters)

    def topk(self, *, samples: Iterable | None = None) -> pd.DataFrame | None:
        """``topk.parquet`` (or some ``samples``' rows), None for a run without ``--topk``."""
        path = self.path / "topk.parquet"
        filters = _filters(sample_id=samples)
        return read_parquet(path, filters=filters) if path.is_file() else None

    def sample_rows(self) -> list[tuple[object, int]]:
        """``(sample_id, token rows)`` of every sample, in the table's order."""
        rows = self.info.get("sample_rows")
        if rows is None:  # a run written before run.json kept them
            ids = self.tokens(columns=["sample_id"])["sample_id"]
            return [(k, int(v)) for k, v in ids.value_counts(sort=False).items()]
        return [(k, int(v)) for k, v in rows]

    def shown_samples(self, wanted: Iterable | None = None, max_rows: int = FIGURE_ROWS) -> list:
        """The samples that figures and pages read.

        ``wanted`` (ids or their text), else the first samples whose token rows add up to at
        most ``max_rows`` (at least one).

        Raises:
            ValueError: a wanted sample is not in the run.
        """
        known = self.sample_rows()
        if wanted is not None:
            by_text = {str(sample): sample for sample, _ in known}
            missing = [str(w) for w in wanted if str(w) not in by_text]
            if missing:
                raise ValueError(
                    f"sample {missing[0]!r} is not in the run {self.path} (it has {len(known)} "
                    f"samples; its first sample ids: {', '.join(list(by_text)[:5])})"
                )
            return [by_text[str(w)] for w in wanted]
        chosen, total = [], 0
        for sample, rows in known:
            if chosen and total + rows > max_rows:
                break
            chosen.append(sample)
            total += rows
        return chosen


def _filters(**wanted) -> list[tuple] | None:
    """Pyarrow filters: each column given is one of its values."""
    found = [(name, "in", list(values)) for name, values in wanted.items() if values is not None]
    return found or None


def read_parquet(path: str | os.PathLike, **options) -> pd.DataFrame:
    """A Parquet table of a run folder (``options``: pandas' ``filters`` and ``columns``).

    Raises:
        ValueError: the file is not readable Parquet (truncated or overwritten).
    """
    try:
        return pd.read_parquet(path, **options)
    except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(
            f"{path}: not a readable Parquet file ({reason}); rerun the `ipl entropy` command "
            "that wrote the folder (with --overwrite) to rewrite it"
        ) from None


def open_run(path: str | os.PathLike) -> RunFolder:
    """Check that ``path`` holds a finished ``ipl entropy`` run and read its ``run.json``.

    Raises:
        FileNotFoundError: the folder or one of its tables is missing, or it holds another
            command's work (a training run).
        ValueError: the run has not finished; the message gives the command to rerun.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such run folder")
    missing = [name for name in RUN_TABLES if not (path / name).is_file()]
    if "run.json" in missing:
        if _is_training_run(path):
            raise FileNotFoundError(_training_run(path))
        raise FileNotFoundError(
            f"{path}: not a finished run folder (missing {', '.join(missing)}); "
            f"write one with `ipl entropy --out {path}`"
        )
    folder = RunFolder(path)
    status = folder.info.get("status")
    if status != "complete":
        raise ValueError(
            f"{path}: unfinished run (status {status!r}, started {folder.info.get('started')}); "
            f"unless it is still running, rerun {rerun_command(folder.info, path)} to finish it "
            "(its finished batches are kept)"
        )
    if missing:
        raise FileNotFoundError(
            f"{path}: a complete run whose {', '.join(missing)} is missing; rerun "
            f"{rerun_command(folder.info, path, '--force')} to redo it"
        )
    return folder


def rerun_command(info: dict, folder: Path, *extra: str) -> str:
    """The ``ipl entropy`` command recorded in run.json, quoted for a shell.

    Its ``--out`` is ``folder`` (a moved or copied run is finished where it is), ``extra``
    options are added, and it says where to run it when that is not here (for the command's
    relative paths); a run that did not record its command gets words.
    """
    argv = info.get("command")
    extra = tuple(option for option in extra if option not in (argv or []))
    if not argv:  # a run written before run.json kept its command line
        told = f"the `ipl entropy` command that wrote the folder (--out {folder})"
        return f"{told} with {' '.join(extra)}" if extra else told
    cwd = info.get("cwd")
    elsewhere = cwd is not None and Path(cwd).resolve() != Path.cwd().resolve()
    out = str(folder.resolve() if elsewhere else folder)
    args = list(argv[1:])  # argv[0]: ipl, or the path python ran
    given = [i for i, a in enumerate(args) if a == "--out" or a.startswith("--out=")]
    for i in given:
        if args[i] == "--out":
            args[i + 1] = out
        else:
            args[i] = f"--out={out}"
    if not given:
        args += ["--out", out]
    where = f" in {cwd}" if elsewhere else ""
    return f"`{shlex.join(['ipl', *args, *extra])}`{where}"


def _is_training_run(path: Path) -> bool:
    """An ``ipl train-bupo`` folder: its metrics log or checkpoints (either engine)."""
    return (path / "metrics.jsonl").is_file() or any(_checkpoints(path))


def _checkpoints(path: Path) -> list[tuple[int, Path]]:
    """(step, folder) of a training folder's checkpoints, by step.

    ``checkpoints/step-N`` (built-in loop) or ``checkpoint-N`` (TRL).
    """
    found = [*(path / "checkpoints").glob("step-*"), *path.glob("checkpoint-*")]
    steps = [(p.name.rpartition("-")[2], p) for p in found if p.is_dir()]
    return sorted((int(step), p) for step, p in steps if step.isdigit())


def _training_run(path: Path) -> str:
    """What to say about a training folder given where an ``ipl entropy`` run is read."""
    checkpoints = _checkpoints(path)
    model = checkpoints[-1][1] if checkpoints else path / "checkpoints" / "step-N"
    return (
        f"{path}: a training run of `ipl train-bupo`, not an `ipl entropy` run: plot it with "
        f"`ipl plot-train {path}`, or analyse a checkpoint with `ipl entropy --model {model} "
        "--out RUN`"
    )


def model_name(info: dict) -> str:
    """The last part of a run's model hub name or folder: ``Qwen/Qwen3-4B`` -> ``Qwen3-4B``."""
    return Path(str(info["model"]["name_or_path"]).rstrip("/")).name
