"""``ipl diff`` as a library call: two models, the same token ids, compared batch by batch.

Writes ``OUT/tokens.parquet`` (one row per position and key: :data:`~..lens.diff.DIFF_STATS`,
one row group per batch), then the tables, figure and page of
:mod:`~internal_policy_lens.analysis.diff` from it, and ``OUT/diff.json`` (both models, the
lens, the data's sha256, versions).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from ..analysis.diff import DiffResult, write_diff
from ..config import DiffConfig, LensSettings
from ..data.encode import encode_inputs
from ..data.records import read_records
from ..folders import Folder, now, sha256, versions
from ..lens.capture import site_keys
from ..lens.diff import DIFF_STATS, diff_batch
from ..lens.tuned import make_lens
from ..lens_kinds import model_lenses
from ..model.load import load_model


def run_diff(cfg: DiffConfig, *, progress: bool = True) -> DiffResult:
    """Read ``cfg.data`` through both models and write the diff folder.

    Raises:
        ValueError: a lens other than raw or norm, records without responses, or models that
            read the data as different token ids or have different vocabularies.
    """
    if cfg.lens not in model_lenses():  # a fitted lens belongs to one model, not to both
        raise ValueError(f"ipl diff takes --lens {' or '.join(model_lenses())}, not {cfg.lens!r}")
    folder = Folder(cfg.out).check_writable()
    records = read_records(cfg.data, max_samples=cfg.max_samples)
    missing = [r["sample_id"] for r in records if r["response"] is None]
    if missing:
        raise ValueError(
            f"{cfg.data}: record {missing[0]} has no response; a diff reads given responses "
            "(use an `ipl entropy` run's responses.jsonl)"
        )
    models = tuple(
        load_model(name, dtype=cfg.dtype, device=cfg.device, progress=progress)
        for name in (cfg.model, cfg.model_b)
    )
    encoded = _same_tokens(models, records, cfg)
    settings = LensSettings(lens=cfg.lens)
    lenses = tuple(make_lens(m, settings) for m in models)
    keys = site_keys(models[0], cfg.sites, cfg.layers)
    if site_keys(models[1], cfg.sites, cfg.layers) != keys:
        raise ValueError(f"{cfg.model} and {cfg.model_b} differ in layers or sites; diff one model")
    as_text = any(not isinstance(e.sample_id, int) for e in encoded)
    out = Path(cfg.out)
    with folder.create().lock(), folder.atomic("tokens.parquet") as tmp:
        writer = None
        bar = tqdm(total=len(encoded), desc="diff", unit="sample", disable=not progress)
        try:
            for start in range(0, len(encoded), cfg.batch_size):
                batch = encoded[start : start + cfg.batch_size]
                found = diff_batch(models, lenses, batch, keys, settings, cfg.response_only)
                table = _rows(batch, keys, found, as_text)
                writer = writer or pq.ParquetWriter(tmp, table.schema, compression="lz4")
                writer.write_table(table, row_group_size=max(table.num_rows, 1))
                bar.update(len(batch))
        finally:
            bar.close()
            if writer is not None:
                writer.close()
    info = {
        "model_a": cfg.model,
        "model_b": cfg.model_b,
        "lens": cfg.lens,
        "q": cfg.q,
        "data": cfg.data,
        "data_sha256": sha256(cfg.data),
        "samples": len(encoded),
        "n_layers": models[0].n_layers,
        "dtype": str(models[0].dtype).removeprefix("torch."),
        "command": sys.argv,
        "finished": now(),
        "versions": versions(),
    }
    return write_diff(out, info)


def _same_tokens(models, records, cfg: DiffConfig):
    """The records' token ids, the same under both tokenizers (else one line naming both)."""
    a, b = (encode_inputs(m.tokenizer, records) for m in models)
    differ = next((x.sample_id for x, y in zip(a, b) if x.input_ids != y.input_ids), None)
    if differ is not None or models[0].vocab_size != models[1].vocab_size:
        where = f"sample {differ}" if differ is not None else "the vocabulary size"
        raise ValueError(
            f"{cfg.model} and {cfg.model_b} read {cfg.data} as different tokens (first at "
            f"{where}): a diff needs one tokenizer; compare checkpoints of one model"
        )
    return a


def _rows(batch, keys, found, as_text: bool) -> pa.Table:
    """One row per (kept row, key): ids, layer, site and the statistics."""
    rows_b, positions, token_ids, stats = found
    n, k = len(rows_b), len(keys)
    rows = np.repeat(np.arange(n), k)
    samples = [str(e.sample_id) if as_text else e.sample_id for e in batch]
    columns = {
        "sample_id": pa.array([samples[i] for i in rows_b[rows]], pa.string() if as_text else None),
        "position": pa.array(positions[rows].astype(np.int32)),
        "token_id": pa.array(token_ids[rows]),
        "layer": pa.array(np.tile([layer for _, layer in keys], n).astype(np.int16)),
        "site": pa.array(np.tile([site for site, _ in keys], n)).dictionary_encode(),
    }
    for name in DIFF_STATS:
        matrix = np.stack([stats[key][name] for key in keys], axis=1) if n else np.empty((0, k))
        columns[name] = pa.array(matrix.reshape(-1))  # [rows, keys] -> row-major
    return pa.table(columns)
