"""Read prompt/response datasets (JSON Lines, JSON, CSV, Parquet) into normalized records.

A record is ``{"sample_id", "prompt", "response", "answer", "line"}``: ``prompt`` is a string or
a list of ``{"role", "content"}`` chat messages (from ``prompt``, ``problem`` or ``question``);
``response`` (from ``response``, ``completion`` or ``output``) and ``answer`` (from
``reward_model.ground_truth``, ``answer``, ``ground_truth`` or ``final_answer``) are strings or
None; ``sample_id`` is the ``sample_id``/``id``/``index`` field, else ``extra_info.index`` when
every such record has a distinct one >= 0, else the 0-based record position; ``line`` is the 1-based
line (JSON, CSV) or 0-based row (Parquet). Bad input raises :class:`DataError`, a one-line
message naming the file, the line or row, and the fix.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ..folders import Folder

__all__ = ["DataError", "read_records", "write_records_jsonl"]

SUPPORTED_EXTENSIONS = (".jsonl", ".json", ".parquet", ".csv")
PROMPT_FIELDS = ("prompt", "problem", "question")
RESPONSE_FIELDS = ("response", "completion", "output")
ANSWER_FIELDS = ("answer", "ground_truth", "final_answer")
ID_FIELDS = ("sample_id", "id", "index")
RECORD_KEYS = ("sample_id", "prompt", "response", "answer")

_JSON_TYPES = {list: "array", str: "string", int: "number", float: "number", bool: "boolean"}
_WHITESPACE = re.compile(r"[ \t\n\r]*")
# Escaped on writing so that readers splitting with str.splitlines() still see one record a line.
_LINE_BREAKS = {ord(c): f"\\u{ord(c):04x}" for c in "\x85\u2028\u2029"}


class DataError(ValueError):
    """Bad input data.

    ``str(err)`` is one line: ``'<file>:<line>: <what is wrong>; <how to fix>'``, or
    ``'<file>: row <n>: ...'`` for Parquet, or ``'<file>: ...'`` when no line applies.
    """

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class _Where:
    """Formats the location of a record in one file for error messages."""

    def __init__(self, name: str, rows: bool):
        self.name, self.rows = name, rows

    def __call__(self, line: int | None = None) -> str:
        if line is None:
            return self.name
        return f"{self.name}: {self.unit(line)}" if self.rows else f"{self.name}:{line}"

    def unit(self, line: int) -> str:
        return f"row {line}" if self.rows else f"line {line}"


def read_records(path: str | os.PathLike, *, max_samples: int | None = None) -> list[dict]:
    """Read a dataset file into normalized records.

    The whole file is read and checked, so ids do not depend on ``max_samples``.

    Args:
        path: A ``.jsonl``, ``.json``, ``.csv`` or ``.parquet`` file (extension case-insensitive).
        max_samples: Keep only the first this many records; None keeps all.

    Returns:
        Records with the keys ``sample_id``, ``prompt``, ``response``, ``answer`` and ``line``.

    Raises:
        DataError: The file is missing, empty, unreadable or holds a bad record.
        ValueError: ``max_samples`` is negative.
    """
    if max_samples is not None and max_samples < 0:
        raise ValueError(f"max_samples must be >= 0 or None, got {max_samples}")
    name, path = os.fspath(path), Path(path)
    relative = "" if path.is_absolute() else f" (relative to {os.getcwd()})"
    if path.is_dir():
        found = sorted(p.name for p in path.iterdir() if p.suffix.lower() in SUPPORTED_EXTENSIONS)
        hint = f", e.g. {path / found[0]}" if found else ""
        raise DataError(f"{name}: is a directory; check the path{relative}: pass a data file{hint}")
    ext = path.suffix.lower()
    if ext not in _READERS:
        raise DataError(
            f'{name}: unsupported file type "{ext or "(no extension)"}"; '
            f"use one of {', '.join(SUPPORTED_EXTENSIONS)}"
        )
    if not path.is_file():
        raise DataError(f"{name}: file not found; check the path{relative}")
    if path.stat().st_size == 0:
        raise DataError(f"{name}: file is empty; add records to it or pick another file")
    where = _Where(name, rows=ext == ".parquet")
    entries = _READERS[ext](path, where)
    if not entries:
        raise DataError(f"{name}: no records found; add at least one record to the file")
    parsed = [_normalize(raw, line, where) for line, raw in entries]
    records = _assign_ids(parsed, where)
    empty = [line for line, raw in entries if _empty_response(raw)]
    if empty:
        warnings.warn(
            f"{name}: {len(empty)} of {len(entries)} records have an empty response (first on "
            f"{where.unit(empty[0])}); an empty response counts as none, so they get a generated "
            "one",
            stacklevel=2,
        )
    return records if max_samples is None else records[:max_samples]


def write_records_jsonl(records: Iterable[Mapping[str, Any]], path: str | os.PathLike) -> Path:
    """Write normalized records as JSON Lines, atomically.

    Only ``sample_id``, ``prompt``, ``response`` and ``answer`` are written (``line`` and any
    other key are dropped). The lines go to a temporary file in the same folder, which then
    replaces ``path``, so readers never see a partly written file.

    Args:
        records: Records as returned by :func:`read_records` (``response``/``answer`` optional).
        path: The output file; missing parent folders are created.

    Returns:
        The output path.

    Raises:
        ValueError: A record has no ``sample_id`` or ``prompt``.
    """
    path = Path(path)
    lines = []
    for index, record in enumerate(records):
        if "sample_id" not in record or "prompt" not in record:
            raise ValueError(f"record {index} needs 'sample_id' and 'prompt' keys")
        row = {key: record.get(key) for key in RECORD_KEYS}
        lines.append(json.dumps(row, ensure_ascii=False).translate(_LINE_BREAKS) + "\n")
    Folder(path.parent).create().write_text(path.name, "".join(lines))
    return path


# --- file formats: each reader returns [(line, raw record dict), ...] ---


def _read_text(path: Path, where: _Where) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{where()}: not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8"
        ) from exc


def _as_object(value: Any, loc: str) -> dict:
    if not isinstance(value, dict):
        kind = "null" if value is None else _JSON_TYPES.get(type(value), type(value).__name__)
        raise DataError(
            f"{loc}: expected a JSON object, got a JSON {kind}; write each record as an object "
            'such as {"prompt": "...", "answer": "..."}'
        )
    return value


def _json_error(exc: json.JSONDecodeError, loc: str, fix: str) -> DataError:
    # Some messages end in "starting at" ("Unterminated string starting at"): no second "at".
    what = exc.msg.removesuffix(" at")
    return DataError(f"{loc}: malformed JSON ({what} at column {exc.colno}); {fix}")


def _read_jsonl(path: Path, where: _Where, text: str | None = None) -> list[tuple[int, Any]]:
    text = _read_text(path, where) if text is None else text
    fix = "make each line one complete JSON object"
    if path.suffix.lower() == ".json":
        fix += ", or make the whole file one JSON array of objects"
    entries = []
    for line_no, line in enumerate(text.split("\n"), 1):  # not splitlines(): keep U+2028 etc.
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise _json_error(exc, where(line_no), fix) from exc
        entries.append((line_no, _as_object(value, where(line_no))))
    return entries


def _read_json(path: Path, where: _Where) -> list[tuple[int, Any]]:
    text = _read_text(path, where)
    if not text.lstrip().startswith("["):
        return _read_jsonl(path, where, text)
    try:
        items = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _json_error(
            exc, where(exc.lineno), "make the file one valid JSON array of objects"
        ) from exc
    # Second pass to find the line on which each item starts.
    decoder, entries = json.JSONDecoder(), []
    pos = _WHITESPACE.match(text, text.index("[") + 1).end()
    line, counted = 1, 0
    for _ in items:
        line, counted = line + text.count("\n", counted, pos), pos
        value, pos = decoder.raw_decode(text, pos)
        entries.append((line, _as_object(value, where(line))))
        pos = _WHITESPACE.match(text, _WHITESPACE.match(text, pos).end() + 1).end()
    return entries


def _read_parquet(path: Path, where: _Where) -> list[tuple[int, Any]]:
    import pandas as pd

    try:
        frame = pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises many types; all mean "not readable"
        raise DataError(
            f"{where()}: cannot read Parquet ({type(exc).__name__}: {str(exc)[:200]}); "
            "check that it is a Parquet file, e.g. re-save it with DataFrame.to_parquet"
        ) from exc
    return [(row, _to_python(raw)) for row, raw in enumerate(frame.to_dict("records"))]


def _read_csv(path: Path, where: _Where) -> list[tuple[int, Any]]:
    import pandas as pd

    text = _read_text(path, where)
    try:
        # pandas' missing-value markers (NaN, NA, null, N/A...) are missing cells, as empty ones
        frame = pd.read_csv(io.StringIO(text), dtype=str)
    except pd.errors.EmptyDataError:
        return []
    except Exception as exc:  # pandas raises ParserError, ValueError, csv.Error, ...
        raise DataError(
            f"{where()}: cannot parse CSV ({str(exc)[:200]}); check the quoting and that every "
            "row has as many fields as the header"
        ) from exc
    rows = [
        {
            # A missing response cell is kept as "" so that every format follows one rule.
            key: value if isinstance(value, str) else "" if key in RESPONSE_FIELDS else None
            for key, value in raw.items()
        }
        for raw in frame.to_dict("records")
    ]
    return list(zip(_csv_lines(text, len(rows)), rows))


def _csv_lines(text: str, n_rows: int) -> list[int]:
    """The line each CSV record starts on (header = line 1), allowing for quoted newlines."""
    starts, last = [], 0
    try:
        reader = csv.reader(io.StringIO(text))
        for fields in reader:
            if fields:  # blank lines come back as [] and pandas skips them too
                starts.append(last + 1)
            last = reader.line_num
    except csv.Error:
        starts = []
    starts = starts[1:]
    return starts if len(starts) == n_rows else list(range(2, n_rows + 2))


_READERS = {
    ".jsonl": _read_jsonl,
    ".json": _read_json,
    ".parquet": _read_parquet,
    ".csv": _read_csv,
}


def _to_python(value: Any) -> Any:
    """Numpy arrays/scalars (as pandas gives them for Parquet) to plain Python; NaN to None."""
    if isinstance(value, dict):
        return {key: _to_python(item) for key, item in value.items()}
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        return [_to_python(item) for item in value]
    if isinstance(value, float) and math.isnan(value):
        return None
    return None if type(value).__name__ == "NAType" else value


# --- records ---


def _pick(raw: Mapping, keys: Iterable[str]) -> tuple[str | None, Any]:
    for key in keys:
        if raw.get(key) is not None:
            return key, raw[key]
    return None, None


def _prompt(raw: Mapping, loc: str) -> str | list[dict]:
    key, value = _pick(raw, PROMPT_FIELDS)
    if key is None:
        raise DataError(
            f"{loc}: record has no prompt (its fields: {', '.join(map(str, raw)) or 'none'}); "
            'give it a "prompt", "problem" or "question" field'
        )
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value:
        messages = []
        for i, message in enumerate(value):
            if not (
                isinstance(message, Mapping)
                and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)
            ):
                raise DataError(
                    f"{loc}: {key}[{i}] is not a chat message ({str(message)[:80]}); give every "
                    'message string "role" and "content" fields'
                )
            messages.append({"role": message["role"], "content": message["content"]})
        return messages
    raise DataError(
        f'{loc}: "{key}" is a {type(value).__name__}{" (empty)" if value == [] else ""}; make it a '
        'string or a list of {"role": ..., "content": ...} messages'
    )


def _answer(raw: Mapping, loc: str) -> str | None:
    reward = raw.get("reward_model")
    key, value = "reward_model.ground_truth", None
    if isinstance(reward, Mapping):
        value = reward.get("ground_truth")
    if value is None:
        key, value = _pick(raw, ANSWER_FIELDS)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if value is not None and not isinstance(value, str):
        raise DataError(
            f'{loc}: "{key}" is a {type(value).__name__}; make the answer a string or a number'
        )
    return value


def _empty_response(raw: Mapping) -> bool:
    _, response = _pick(raw, RESPONSE_FIELDS)
    return isinstance(response, str) and not response.strip()


def _normalize(raw: Mapping, line: int, where: _Where) -> tuple[dict, Any, int | None]:
    """One record without its id, plus its explicit id and usable extra_info.index (or None)."""
    loc = where(line)
    key, response = _pick(raw, RESPONSE_FIELDS)
    if _empty_response(raw):
        response = None  # one rule for every format: an empty response is no response
    if response is not None and not isinstance(response, str):
        raise DataError(f'{loc}: "{key}" is a {type(response).__name__}; make it a string')
    record = {"prompt": _prompt(raw, loc), "response": response, "answer": _answer(raw, loc)}
    record["line"] = line
    key, sample_id = _pick(raw, ID_FIELDS)
    if isinstance(sample_id, float) and sample_id.is_integer():
        sample_id = int(sample_id)  # Parquet int columns with nulls come back as float
    if key is not None and (isinstance(sample_id, bool) or not isinstance(sample_id, (int, str))):
        raise DataError(
            f'{loc}: "{key}" is a {type(sample_id).__name__}; ids must be integers or strings'
        )
    info = raw.get("extra_info")
    extra = info.get("index") if isinstance(info, Mapping) else None
    usable = isinstance(extra, int) and not isinstance(extra, bool) and extra >= 0
    return record, sample_id, extra if usable else None


def _assign_ids(parsed: list[tuple[dict, Any, int | None]], where: _Where) -> list[dict]:
    ids = [sample_id for _, sample_id, _ in parsed]
    missing = [i for i, sample_id in enumerate(ids) if sample_id is None]
    extras = [parsed[i][2] for i in missing]
    use_extra = None not in extras and len(set(extras)) == len(extras)
    for i, extra in zip(missing, extras):
        ids[i] = extra if use_extra else i
    if len({type(sample_id) for sample_id in ids}) > 1:
        ids = [str(sample_id) for sample_id in ids]
    first_line: dict[Any, int] = {}
    records = []
    for (record, _, _), sample_id in zip(parsed, ids):
        line = record["line"]
        if sample_id in first_line:
            raise DataError(
                f"{where(line)}: duplicate sample_id {sample_id!r} (first on "
                f"{where.unit(first_line[sample_id])}); make the ids unique, or drop the "
                '"sample_id"/"id"/"index" fields to number records by position'
            )
        first_line[sample_id] = line
        records.append({"sample_id": sample_id, **record})
    return records
