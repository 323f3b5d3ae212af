"""Data-parallel ``ipl entropy``: each process analyses its share of the batches, then one merges.

The analysis of a run folder is a numbered list of batches (``batch_size`` sequences each); batch
b belongs to shard ``b % n``. A shard writes its batches' token (and top-k) tables into the run
folder's ``parts/``, the same files a single process writes, so the merge
(:func:`internal_policy_lens.commands.entropy.merge_run`) concatenates the very tables a single
process would have, in the same order: the results are identical row for row.

Responses still to be generated are seeded per generation batch, so any process produces the
same text for a batch; a shard generates its own generation batches first, then any batch no
other shard has written yet, and never waits. The shard that completes the last part merges
(a lock keeps it to one; a killed merger leaves no stale claim); ``ipl merge OUT`` merges by
hand.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..folders import Folder

Shard = tuple[int, int]  # (index i, count n)
MERGING = ".lock-merge"  # held by the shard that merges (released if it dies)
META = "meta.json"


def resolve_shard(text: str | None) -> Shard | None:
    """``'i/n'`` -> ``(i, n)``; without it, accelerate's ``RANK``/``WORLD_SIZE``; else None.

    Raises:
        ValueError: for text that is not ``i/n`` with ``0 <= i < n``.
    """
    if text is None:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        return (int(os.environ.get("RANK", "0")), world) if world > 1 else None
    try:
        index, count = (int(x) for x in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard '{text}': expected i/n, e.g. 0/2") from None
    if not 0 <= index < count:
        raise ValueError(f"--shard '{text}': need 0 <= i < n")
    return (index, count) if count > 1 else None


def shard_device(device: str, shard: Shard | None) -> str:
    """Under ``accelerate launch`` with ``--device auto``, one GPU per process (``LOCAL_RANK``)."""
    import torch

    local = os.environ.get("LOCAL_RANK")
    if shard is None or device != "auto" or local is None or not torch.cuda.is_available():
        return device
    return f"cuda:{int(local) % torch.cuda.device_count()}"


def owns(shard: Shard | None, batch: int) -> bool:
    """Whether ``batch`` is this shard's to analyse (every batch without sharding)."""
    return shard is None or batch % shard[1] == shard[0]


def work_order(n_batches: int, shard: Shard | None) -> list[int]:
    """Batch indices with this shard's own first (the others follow for what is still missing)."""
    return sorted(range(n_batches), key=lambda b: (not owns(shard, b), b))


def part_path(parts: Path, batch: int) -> Path:
    """The token table of one analysis batch (an Arrow IPC file, read once by the merge)."""
    return parts / f"tokens-{batch:05d}.arrow"


def topk_path(parts: Path, batch: int) -> Path:
    """The top-k table of one analysis batch (written before its token table)."""
    return parts / f"topk-{batch:05d}.arrow"


def read_meta(parts: Path) -> dict | None:
    """What a complete set of parts is (written by :func:`write_meta`), or None before."""
    path = parts / META
    return json.loads(path.read_text()) if path.is_file() else None


def write_meta(parts: Path, n_batches: int, samples: int, truncated: int, topk: bool) -> None:
    """Record what a complete set of parts is, for the merge (same content from every shard)."""
    meta = {"batches": n_batches, "samples": samples, "truncated": truncated, "topk": topk}
    Folder(parts).write_json(META, meta)


def missing_parts(parts: Path, n_batches: int) -> list[int]:
    """The batches whose token table is not written yet."""
    return [b for b in range(n_batches) if not part_path(parts, b).is_file()]
