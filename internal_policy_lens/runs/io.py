"""Run folders of ``ipl entropy``: the tables and facts (``run.json``) of a finished run.

Readers use :func:`open_run` for a finished ``ipl entropy`` folder; writing (atomically, under a
lock) is :class:`~internal_policy_lens.folders.Folder`'s. Nothing here imports torch.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from ..folders import Folder

RUN_TABLES: tuple[str, ...] = ("run.json", "summary.csv", "tokens.parquet", "deltas.parquet")
"""The files of a finished ``ipl entropy`` run folder."""


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
        """The lens of the run (``raw`` or ``norm``)."""
        return str(self.info["config"]["lens"])

    def summary(self) -> pd.DataFrame:
        """``summary.csv``."""
        return pd.read_csv(self.path / "summary.csv")

    def tokens(self) -> pd.DataFrame:
        """``tokens.parquet``."""
        return read_parquet(self.path / "tokens.parquet")

    def deltas(self) -> pd.DataFrame:
        """``deltas.parquet``."""
        return read_parquet(self.path / "deltas.parquet")

    def topk(self) -> pd.DataFrame | None:
        """``topk.parquet``, or None for a run analysed without ``--topk``."""
        path = self.path / "topk.parquet"
        return read_parquet(path) if path.is_file() else None


def read_parquet(path: str | os.PathLike) -> pd.DataFrame:
    """A Parquet table of a run folder.

    Raises:
        ValueError: the file is not readable Parquet (truncated or overwritten).
    """
    try:
        return pd.read_parquet(path)
    except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(
            f"{path}: not a readable Parquet file ({reason}); rerun the `ipl entropy` command "
            "that wrote the folder (with --overwrite) to rewrite it"
        ) from None


def open_run(path: str | os.PathLike) -> RunFolder:
    """Check that ``path`` holds a finished ``ipl entropy`` run and read its ``run.json``.

    Raises:
        FileNotFoundError: the folder or one of its tables is missing.
        ValueError: the run has not finished.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such run folder")
    missing = [name for name in RUN_TABLES if not (path / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{path}: not a finished run folder (missing {', '.join(missing)}); "
            f"write one with `ipl entropy --out {path}`"
        )
    folder = RunFolder(path)
    if folder.info.get("status") != "complete":
        raise ValueError(
            f"{path}: the run is not complete (status {folder.info.get('status')!r}); "
            "rerun the same `ipl entropy` command to finish it"
        )
    return folder


def model_name(info: dict) -> str:
    """The last part of a run's model hub name or folder: ``Qwen/Qwen3-4B`` -> ``Qwen3-4B``."""
    return Path(str(info["model"]["name_or_path"]).rstrip("/")).name
