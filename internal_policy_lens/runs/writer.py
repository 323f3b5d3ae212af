"""Writing an ``ipl entropy`` run folder: its start, each batch's parts, the streamed finish.

A run is a numbered list of batches. Each batch writes its parts into ``parts/`` (Arrow IPC
files): the top-k, the deltas and the summary moments first, the token table last, so that a
token part on disk means the batch is finished (a rerun skips it). The finish streams the parts
into the run's tables, one Parquet row group per batch, and merges the moments into
``summary.csv`` exactly: what it holds at once is one batch, never the run. ``status:
complete`` is written last, after the figures and the report (``draw``), so that a run killed
before then resumes and redraws. Nothing here imports torch.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.feather as feather
import pyarrow.parquet as pq

from ..folders import Folder, FolderState, now
from ..tables.batch import BatchColumns, batch_moments, delta_rows, token_rows, topk_rows
from ..tables.frames import merge_summaries
from .shard import Shard, owns, part_path, topk_path

_log = logging.getLogger(__name__)
OUTPUTS = (
    "tokens.parquet",
    "topk.parquet",
    "deltas.parquet",
    "summary.csv",
    "responses.jsonl",
    "run.json",
    "report.html",
)
WORK_DIRS = ("parts", "generation")


def start_folder(out: Path, state: FolderState, info: dict, shard: Shard | None = None) -> dict:
    """Keep or clear ``out`` as ``state`` says, then write ``info`` as run.json (running).

    Resuming says what was kept; a shard joining a run its sibling started says so.
    """
    if state is FolderState.RESUME:
        _log.info(resume_message(out, shard))
    if state is FolderState.REDO:
        for name in OUTPUTS:
            (out / name).unlink(missing_ok=True)
        for name in WORK_DIRS:
            shutil.rmtree(out / name, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    Folder(out).write_json("run.json", info)
    return info


def resume_message(out: Path, shard: Shard | None) -> str:
    """What a rerun in ``out`` keeps: generated responses and (this shard's) analysed batches."""
    generated = sorted((out / "generation").glob("part-*.json"))
    responses = sum(len(json.loads(path.read_text())) for path in generated)
    analysed = [
        path
        for path in (out / "parts").glob("tokens-*.arrow")
        if owns(shard, int(path.stem.removeprefix("tokens-")))
    ]
    kept = []
    if generated:
        batches = _count(len(generated), "batch", "batches")
        kept.append(f"{_count(responses, 'generated response')} ({batches})")
    if analysed:
        kept.append(_count(len(analysed), "analysed batch", "analysed batches"))
    what = " and ".join(kept) if kept else "nothing (no batch was finished)"
    if shard is None:
        return f"resuming the unfinished run in {out}/: kept {what}"
    name = f"shard {shard[0]}/{shard[1]}"
    if not analysed:  # none of its own batches yet: it starts its share of the run
        reused = f" (reusing {kept[0]})" if generated else ""
        return f"{name}: starting its batches of the run in {out}/{reused}"
    return f"{name}: resuming its batches of the unfinished run in {out}/: kept {what}"


def _count(n: int, one: str, many: str | None = None) -> str:
    return f"{n:,} {one if n == 1 else many or one + 's'}"


def deltas_path(parts: Path, batch: int) -> Path:
    """The delta table of one analysis batch."""
    return parts / f"deltas-{batch:05d}.arrow"


def moments_path(parts: Path, batch: int) -> Path:
    """The summary moments of one analysis batch."""
    return parts / f"moments-{batch:05d}.parquet"


def write_batch(
    parts: Path,
    number: int,
    cols: BatchColumns,
    *,
    topk: int,
    vocab: dict[int, str],
    as_text: bool,
) -> int:
    """Write batch ``number``'s parts (its token table last); return its token rows."""
    folder = Folder(parts)
    if topk > 0:
        _write(folder, topk_path(parts, number), topk_rows(cols, vocab, as_text))
    _write(folder, deltas_path(parts, number), delta_rows(cols, as_text))
    folder.write_parquet(moments_path(parts, number).name, batch_moments(cols))
    tokens = token_rows(cols, vocab, as_text)
    _write(folder, part_path(parts, number), tokens)
    return tokens.num_rows


def combine_parts(out: Path, batches: int, topk: bool) -> dict:
    """Stream the parts of ``batches`` batches into the run's tables and summary.csv.

    Returns the facts run.json keeps: token rows, and the rows of each sample (in order).
    """
    parts, folder = out / "parts", Folder(out)
    rows = _stream(folder, "tokens.parquet", [part_path(parts, b) for b in range(batches)])
    if topk:
        _stream(folder, "topk.parquet", [topk_path(parts, b) for b in range(batches)])
    _stream(folder, "deltas.parquet", [deltas_path(parts, b) for b in range(batches)])
    moments = [pd.read_parquet(moments_path(parts, b)) for b in range(batches)]
    folder.write_csv("summary.csv", merge_summaries(moments))
    return {"rows": sum(rows.values()), "sample_rows": [[k, v] for k, v in rows.items()]}


def finish(
    out: Path,
    info: dict,
    batches: int,
    topk: bool,
    draw: Callable[[Path, dict], object],
) -> object:
    """Combine the parts, draw (figures, report), then mark the run complete; ``draw``'s result."""
    info.update(combine_parts(out, batches, topk))
    info.update(finished=now())
    drawn = draw(out, info)
    info.update(status="complete")
    Folder(out).write_json("run.json", info)
    for name in WORK_DIRS:
        shutil.rmtree(out / name, ignore_errors=True)
    return drawn


def _write(folder: Folder, path: Path, table: pa.Table) -> None:
    # A part is read once, by the finish: Arrow's own file format, no encoding to pay twice.
    with folder.atomic(path.name) as tmp:
        feather.write_feather(table, tmp, compression="uncompressed")


def _encoding(schema: pa.Schema) -> dict:
    """Parquet settings: dictionaries for ids and names, lz4 (the quickest codec).

    No dictionary for the floats: near-unique values, where one costs time and saves nothing.
    """
    ids = [f.name for f in schema if not pa.types.is_floating(f.type)]
    return {"use_dictionary": ids, "compression": "lz4"}


def _stream(folder: Folder, name: str, paths: list[Path]) -> dict:
    """``paths`` (same columns) into ``name``, one row group per part; rows per sample id."""
    counts: dict = {}
    with folder.atomic(name) as tmp:
        writer = None
        try:
            for path in paths:
                table = feather.read_table(path, memory_map=True)
                if writer is None:
                    writer = pq.ParquetWriter(tmp, table.schema, **_encoding(table.schema))
                elif table.schema != writer.schema:  # an empty batch's typed columns
                    table = table.cast(writer.schema)
                writer.write_table(table, row_group_size=max(table.num_rows, 1))
                ids = pd.Series(table.column("sample_id").to_numpy())
                for value, count in ids.value_counts(sort=False).items():
                    counts[value] = counts.get(value, 0) + int(count)
        finally:
            if writer is not None:
                writer.close()
    return {(k.item() if hasattr(k, "item") else k): v for k, v in counts.items()}
