"""The one owner of run folders on disk: atomic writes, hashes, versions, ``run.json``.

Every command that writes a folder (``ipl entropy``, ``merge``, ``plot``, ``compare``,
``train-bupo``, ``eval``) writes through :class:`RunFolder`: each file goes to a temporary name in
the same folder, is flushed to disk, then renamed onto its final name, so an interrupted command
never leaves a half-written file under a final name. Readers use :func:`open_run` for a finished
``ipl entropy`` folder. Nothing here imports torch.

A writer first checks that the folder can be written (:meth:`RunFolder.check_writable`, before
any work) and holds an exclusive lock on it (:meth:`RunFolder.lock`: ``fcntl.flock`` on
``.lock`` inside it, released by the operating system when the process ends, however it ends), so
two commands never write one folder at once. Shards of one data-parallel run share the folder
lock and hold one of their own each. A write that fails (no space left, a read-only or vanished
folder) raises :class:`RunFolderError`, whose message names the folder and what was kept.

For tests of interrupted runs, the environment variable ``IPL_KILL_BEFORE_PUBLISH=NAME[#k]`` makes
the process kill itself (SIGKILL) just before it publishes (renames onto its final name, or
appends to a log) a file or checkpoint folder called NAME for the k-th time.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd

RUN_TABLES: tuple[str, ...] = ("run.json", "summary.csv", "tokens.parquet", "deltas.parquet")
"""The files of a finished ``ipl entropy`` run folder."""
VERSIONED_PACKAGES: tuple[str, ...] = (
    "internal-policy-lens",
    "torch",
    "transformers",
    "transformer-lens",
    "pandas",
)


LOCK = ".lock"
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class RunFolderError(RuntimeError):
    """A folder cannot be written, or another process is writing it.

    The message names the folder, says why, what was kept and what to do.
    """


_published: dict[str, int] = {}


def kill_point(name: str) -> None:
    """Kill this process if ``IPL_KILL_BEFORE_PUBLISH`` names ``name`` (interrupted-run tests).

    ``NAME#k`` kills before the k-th publication of ``NAME`` by this process (default: the first).
    """
    wanted = os.environ.get("IPL_KILL_BEFORE_PUBLISH")
    if not wanted:
        return
    _published[name] = _published.get(name, 0) + 1
    target, _, count = wanted.partition("#")
    if target == name and _published[name] == int(count or 1):
        os.kill(os.getpid(), signal.SIGKILL)


class RunFolder:
    """A folder of results: written atomically, read back by name.

    For a finished ``ipl entropy`` run (see :func:`open_run`) it also reads the run's tables and
    facts (:attr:`info` is ``run.json``).
    """

    def __init__(self, path: str | os.PathLike, info: dict | None = None) -> None:
        self.path = Path(path)
        self._info = info

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    # --- writing

    def create(self) -> RunFolder:
        """Make the folder (and its parents) if it does not exist; return self."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise RunFolderError(self._unusable(err)) from None
        return self

    def check_writable(self) -> RunFolder:
        """Fail before any work when the folder cannot be made or written; return self.

        Creates nothing: the folder, or its nearest existing parent, must be a writable folder.

        Raises:
            RunFolderError: the path is a file, lies under a file, or is not writable (read-only
                file system, no permission).
        """
        existing = next(p for p in (self.path, *self.path.parents) if p.exists())
        if not existing.is_dir():
            what = (
                "is a file, not a folder"
                if existing == self.path
                else f"lies under a file ({existing})"
            )
            raise RunFolderError(f"{self.path}: {what}; choose a folder path for --out")
        if not os.access(existing, os.W_OK | os.X_OK):
            why = "a read-only file system" if _read_only(existing) else "no permission to write"
            raise RunFolderError(
                f"{self.path}: cannot write in {existing} ({why}); choose a --out where you can "
                "write"
            )
        return self

    @contextlib.contextmanager
    def lock(self, name: str = LOCK, *, shared: bool = False, if_free: bool = False):
        """Hold an advisory lock on the folder (``name`` inside it) for the block.

        ``shared`` locks are held together (the shards of one run); an exclusive one excludes
        every other. Yields True; with ``if_free``, yields False instead of raising when another
        process holds the lock.

        Raises:
            RunFolderError: another process holds the lock; the message names its pid.
        """
        self.check_writable().create()
        path = self.path / name
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
            except BlockingIOError:
                if if_free:
                    yield False
                    return
                holder = path.read_text().strip() or "unknown"
                raise RunFolderError(
                    f"{self.path}: another ipl process (pid {holder}) is writing this folder; "
                    "wait for it to finish, or choose another --out"
                ) from None
            os.ftruncate(fd, 0)  # the holder's pid, for the message a second writer gets
            os.pwrite(fd, str(os.getpid()).encode(), 0)
            yield True
        finally:
            os.close(fd)  # releases the lock

    def _unusable(self, err: OSError, detail: str = "") -> str:
        """One line: the folder, the operating system's reason, what was kept and what to do."""
        if err.errno in _NO_SPACE:
            fix = "free some space, then rerun the same command (finished work is kept)"
        elif err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            fix = "choose a --out where you can write"
        else:
            fix = "check the path, or choose another --out"
        return f"{self.path}: {err.strerror or err}{detail}; {fix}"

    @contextlib.contextmanager
    def atomic(self, name: str | os.PathLike) -> Iterator[Path]:
        """Yield a temporary path for ``name``; flush it and rename it onto ``name`` on success.

        ``name`` is relative to the folder (or absolute). The temporary file is removed when the
        block raises.
        """
        path = self.path / name
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            yield tmp
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            kill_point(path.name)
            os.replace(tmp, path)
        except OSError as err:
            detail = f"; nothing was written to {path.name}"
            raise RunFolderError(self._unusable(err, detail)) from None
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)

    def write_text(self, name: str | os.PathLike, text: str) -> Path:
        """Write ``text`` (UTF-8) atomically; return the path."""
        with self.atomic(name) as tmp:
            tmp.write_text(text, encoding="utf-8")
        return self.path / name

    def write_json(self, name: str | os.PathLike, payload) -> Path:
        """Write ``payload`` as indented JSON atomically (non-JSON values as strings)."""
        return self.write_text(name, json.dumps(payload, indent=2, default=str))

    def write_parquet(self, name: str | os.PathLike, frame: pd.DataFrame) -> Path:
        """Write ``frame`` as Parquet (no index) atomically."""
        with self.atomic(name) as tmp:
            frame.to_parquet(tmp, index=False)
        return self.path / name

    def write_csv(self, name: str | os.PathLike, frame: pd.DataFrame) -> Path:
        """Write ``frame`` as CSV (no index) atomically."""
        with self.atomic(name) as tmp:
            frame.to_csv(tmp, index=False)
        return self.path / name

    def append_line(self, name: str | os.PathLike, payload: dict) -> None:
        """Append ``payload`` as one JSON line (a log: a killed writer loses at most that line)."""
        kill_point(Path(name).name)
        try:
            with open(self.path / name, "a") as fh:
                fh.write(json.dumps(payload) + "\n")
                fh.flush()
        except OSError as err:
            raise RunFolderError(self._unusable(err)) from None

    # --- reading

    def read_json(self, name: str | os.PathLike):
        """A JSON file of the folder."""
        return json.loads((self.path / name).read_text())

    def read_lines(self, name: str | os.PathLike) -> list[dict]:
        """The JSON lines of a log written by :meth:`append_line` (blank lines skipped)."""
        text = (self.path / name).read_text()
        return [json.loads(line) for line in text.splitlines() if line.strip()]

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


def _read_only(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


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


def sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes (recorded with the data a run read)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def versions() -> dict:
    """Versions of the packages that shape the results, and of Python."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in VERSIONED_PACKAGES:
        with contextlib.suppress(PackageNotFoundError):
            found[name] = version(name)
    found["python"] = sys.version.split()[0]
    return found


def now() -> str:
    """The local time as ISO 8601 with its UTC offset."""
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
