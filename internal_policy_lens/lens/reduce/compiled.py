"""The reductions through ``torch.compile``: one fused loop per tile, or two per whole row.

Compiling is never required: a compiler failure, or compiled code that computes other numbers
than the eager code, means running eagerly from then on.
"""

from __future__ import annotations

import logging
import os

import torch

from .common import Stats
from .rows import fused_stats, reduce_logits

# Work (logits elements) from which compiling pays for itself in one call: torch.compile takes
# seconds once per process, the eager reductions of whole logits rows (the path with extras)
# about 6 ns per element on 2 CPU cores.
COMPILE_MIN_ELEMENTS = 1 << 30
# The same for the tiled reductions (no extras): compiling them takes about 5 s per process and
# saves about 0.9 ns per element next to the eager tiles with bf16 products (nothing measurable
# with float32 products), so it pays from about 6e9 elements.
TILED_COMPILE_MIN_ELEMENTS = 1 << 33
_log = logging.getLogger(__name__)

# The compiled reductions: None until first needed, False once compiling failed (stay eager).
_compiled_fused = None
# The compiled tile reductions: None until first needed, False once compiling failed or
# computed other numbers than the eager code; the tile shapes and dtypes already checked.
_compiled_tile = None
_checked_tiles: set[tuple] = set()


def use_compiled(compiled: bool | None, work: int, threshold: int = COMPILE_MIN_ELEMENTS) -> bool:
    """Whether to compile: as asked, else ``IPL_COMPILE`` (``0``/``1``), else from the work."""
    if compiled is None:
        setting = os.environ.get("IPL_COMPILE", "")
        compiled = setting == "1" if setting in ("0", "1") else work >= threshold
    return compiled


def compiled_reduce(
    logits, dtype, next_ids=None, final_logp=None, final_top=None, topk=0, kl_from=False
) -> Stats:
    """:func:`~.rows.reduce_logits` through ``torch.compile``; eager if compiling fails."""
    global _compiled_fused
    if _compiled_fused is None:
        _compiled_fused = torch.compile(fused_stats, dynamic=True)
    if _compiled_fused is not False:
        try:
            return _compiled_fused(logits, dtype, next_ids, final_logp, final_top, topk, kl_from)
        except Exception as err:  # noqa: BLE001 - any compiler failure means: run eagerly
            _log.info("torch.compile failed (%s); using the eager reductions", err)
            _compiled_fused = False
    return reduce_logits(logits, dtype, next_ids, final_logp, final_top, topk, kl_from)


def _tile_math(z: torch.Tensor, dtype: torch.dtype):
    # One tile's max, log S_t and sum p (z - m_t), as one expression graph for torch.compile.
    zf = z.to(dtype)
    top = zf.amax(-1, keepdim=True)
    shifted = zf - top
    weights = shifted.exp()
    total = weights.sum(-1)
    return top.squeeze(-1), total.log(), (weights * shifted).sum(-1) / total


def tile_sums(z: torch.Tensor, dtype: torch.dtype, out: tuple[torch.Tensor, ...]) -> bool:
    """Write one tile's max, ``log S_t`` and ``sum p (z - m_t)`` into ``out``; False if unusable.

    The compiled code's first result for each tile shape and dtype is checked against the eager
    code's: with ``ATEN_CPU_CAPABILITY=avx2`` on an AVX-512 CPU, torch 2.13's compiled tile
    gave wrong numbers (found by the benchmark); any mismatch means: run eagerly from then on.
    """
    global _compiled_tile
    if _compiled_tile is None:
        _compiled_tile = torch.compile(_tile_math, dynamic=True)
    if _compiled_tile is False:
        return False
    try:
        values = _compiled_tile(z, dtype)
        shape = (*z.shape, z.dtype, dtype)
        if shape not in _checked_tiles:
            for got, want in zip(values, _tile_math(z, dtype), strict=True):
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, equal_nan=True)
            _checked_tiles.add(shape)
        for target, value in zip(out, values, strict=True):
            target.copy_(value)
    except Exception as err:  # noqa: BLE001 - a compiler failure or wrong code: run eagerly
        _log.warning("compiled tile reductions unusable (%s); using the eager ones", err)
        _compiled_tile = False
        return False
    return True
