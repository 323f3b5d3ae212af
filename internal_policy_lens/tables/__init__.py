"""Tidy tables: one row per (sample, position, layer, site), and what derives from them.

``frames`` (pandas, no torch): the columns, :func:`delta_table`, :func:`summary_table` and the
exact merge of summaries; ``batch`` (numpy and pyarrow, no torch): one batch's statistics as the
Arrow tables a run folder streams to Parquet; ``compute`` (torch): :func:`entropy_table`, the
pipeline in one call. ``from internal_policy_lens.tables import summary_table`` loads no torch:
the torch names are imported when first used (PEP 562).
"""

from __future__ import annotations

import importlib

from .frames import (
    DELTA_COLUMNS,
    SUMMARY_COLUMNS,
    SUMMARY_EXTRAS,
    TABLE_COLUMNS,
    TOPK_COLUMNS,
    delta_table,
    merge_summaries,
    summary_table,
)

_TORCH = {"entropy_table": "compute"}

__all__ = [
    "DELTA_COLUMNS",
    "SUMMARY_COLUMNS",
    "SUMMARY_EXTRAS",
    "TABLE_COLUMNS",
    "TOPK_COLUMNS",
    "delta_table",
    "entropy_table",
    "merge_summaries",
    "summary_table",
]


def __getattr__(name: str):
    if name not in _TORCH:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_TORCH[name]}"), name)
    globals()[name] = value
    return value
