"""The ground floor's owner of folders on disk: atomic writes, appends, locks, hashes, versions.

Every command that writes a folder (a run, a lens, a training run, a figure) writes through
:class:`Folder`: each file goes to a temporary name in the same folder, is flushed to disk, then
renamed onto its final name, so an interrupted command never leaves a half-written file under a
final name. Nothing here imports torch, nor any other module of the package.

A writer first checks that the folder can be written (:meth:`Folder.check_writable`, before any
work) and holds an exclusive lock on it (:meth:`Folder.lock`: ``fcntl.flock`` on ``.lock``
inside it, released by the operating system when the process ends, however it ends), so two
commands never write one folder at once. Shards of one data-parallel run share the folder lock
and hold one of their own each. A write that fails (no space left, a read-only or vanished
folder) raises :class:`FolderError`, whose message names the folder and what was kept.

What a command does with a folder that holds earlier work (start, resume, reuse it, or redo it)
is decided in one place, :func:`folder_state`.

For tests of interrupted runs, the environment variable ``IPL_KILL_BEFORE_PUBLISH=NAME[#k]`` makes
the process kill itself (SIGKILL) just before it publishes (renames onto its final name, or
appends to a log) a file or checkpoint folder called NAME for the k-th time.
"""

from __future__ import annotations

import contextlib
import enum
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
from typing import TYPE_CHECKING

import pandas as pd

if TYPE_CHECKING:
    from typing import Self  # Python 3.11; annotations only (3.10 is supported)

VERSIONED_PACKAGES: tuple[str, ...] = (
    "internal-policy-lens",
    "torch",
    "transformers",
    "transformer-lens",
    "pandas",
)


LOCK = ".lock"
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class FolderError(RuntimeError):
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


class Folder:
    """A folder of results: written atomically, read back by name."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r})"

    # --- writing

    def create(self) -> Self:
        """Make the folder (and its parents) if it does not exist; return self."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise FolderError(self._unusable(err)) from None
        return self

    def check_writable(self) -> Self:
        """Fail before any work when the folder cannot be made or written; return self.

        Creates nothing: the folder, or its nearest existing parent, must be a writable folder.

        Raises:
            FolderError: the path is a file, lies under a file, or is not writable (read-only
                file system, no permission).
        """
        existing = next(p for p in (self.path, *self.path.parents) if p.exists())
        if not existing.is_dir():
            what = (
                "is a file, not a folder"
                if existing == self.path
                else f"lies under a file ({existing})"
            )
            raise FolderError(f"{self.path}: {what}; choose a folder path for --out")
        if not os.access(existing, os.W_OK | os.X_OK):
            why = "a read-only file system" if _read_only(existing) else "no permission to write"
            raise FolderError(
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
            FolderError: another process holds the lock; the message names its pid.
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
                raise FolderError(
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
            raise FolderError(self._unusable(err, detail)) from None
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
            raise FolderError(self._unusable(err)) from None

    # --- reading

    def read_json(self, name: str | os.PathLike):
        """A JSON file of the folder."""
        return json.loads((self.path / name).read_text())

    def read_lines(self, name: str | os.PathLike) -> list[dict]:
        """The JSON lines of a log written by :meth:`append_line` (blank lines skipped)."""
        text = (self.path / name).read_text()
        return [json.loads(line) for line in text.splitlines() if line.strip()]


def _read_only(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


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


class FolderState(str, enum.Enum):  # not enum.StrEnum: Python 3.11
    """What a command does with its output folder (see :func:`folder_state`)."""

    NEW = "new"
    """No earlier work: start."""
    RESUME = "resume"
    """Unfinished work of this configuration: continue it (finished parts are kept)."""
    COMPLETE = "complete"
    """Finished work of this configuration: reuse it, change nothing."""
    REDO = "redo"
    """Earlier work to replace (``--force``, or another configuration with ``--overwrite``)."""


class FolderConfigError(ValueError):
    """The folder holds work of another configuration, and replacing it was not asked for."""


def folder_state(
    record: Path,
    saved: dict | None,
    config: dict,
    *,
    complete: bool,
    overwrite: bool = False,
    force: bool = False,
    holds: str = "the folder holds a run",
    fix: str = "pass --overwrite to start over or choose another --out",
) -> FolderState:
    """Decide what a command does with a folder that may hold earlier work: the rerun rule.

    Args:
        record: the file that records the earlier work's configuration (named in the error).
        saved: that configuration, or None when the folder holds no earlier work.
        config: this command's configuration.
        complete: whether the earlier work finished.
        overwrite: work of another configuration may be replaced (``--overwrite``).
        force: work of this configuration is redone, finished or not (``--force``).
        holds: the error's words for what the folder holds.
        fix: the error's words for what to do.

    Returns:
        NEW without earlier work; with this configuration's, REDO under ``force``, else
        COMPLETE or RESUME; with another configuration's, REDO under ``overwrite``.

    Raises:
        FolderConfigError: another configuration's work without ``overwrite``; the message
            names the file, the fields that differ and ``fix``.
    """
    if saved is None:
        return FolderState.NEW
    if saved == config:
        if force:
            return FolderState.REDO
        return FolderState.COMPLETE if complete else FolderState.RESUME
    if overwrite:
        return FolderState.REDO
    changed = sorted(k for k in config if saved.get(k) != config[k])
    raise FolderConfigError(
        f"{record}: {holds} with another configuration (differs in {', '.join(changed)}); {fix}"
    )
