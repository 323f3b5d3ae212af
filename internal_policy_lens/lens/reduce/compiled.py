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
# The compiled tile reductions (by function): None until first needed, False once compiling
# failed or computed other numbers than the eager code; the tile shapes and dtypes checked.
_compiled_tile = None
_checked_tiles: set[tuple] = set()


def use_compiled(compiled: bool | None, work: int, threshold: int = COMPILE_MIN_ELEMENTS) -> bool:
    """Whether to compile: as asked, else ``IPL_COMPILE`` (``0``/``1``), else from the work."""
    if compiled is None:
        setting = os.environ.get("IPL_COMPILE", "")
        compiled = setting == "1" if setting in ("0", "1") else work >= threshold
    return compiled


def compiled_reduce(
    logits, dtype, next_ids=None, final_logp=None, final_top=None, topk=0, wanted=((), ())
) -> Stats:
    """:func:`~.rows.reduce_logits` through ``torch.compile``; eager if compiling fails."""
    global _compiled_fused
    if _compiled_fused is None:
        _compiled_fused = torch.compile(fused_stats, dynamic=True)
    if _compiled_fused is not False:
        try:
            return _compiled_fused(logits, dtype, next_ids, final_logp, final_top, topk, wanted)
        except Exception as err:  # noqa: BLE001 - any compiler failure means: run eagerly
            _log.info("torch.compile failed (%s); using the eager reductions", err)
            _compiled_fused = False
    return reduce_logits(logits, dtype, next_ids, final_logp, final_top, topk, wanted)


def tile_sums(math, z: torch.Tensor, dtype: torch.dtype, out: tuple[torch.Tensor, ...]) -> bool:
    """Write ``math(z, dtype)``, a tile's sums (see :mod:`.tiles`), into ``out``; False if unusable.

    The compiled code's first result for each tile shape and dtype is checked against the eager
    code's: with ``ATEN_CPU_CAPABILITY=avx2`` on an AVX-512 CPU, torch 2.13's compiled tile
    gave wrong numbers (found by the benchmark); any mismatch means: run eagerly from then on.
    """
    global _compiled_tile
    if _compiled_tile is None:
        _compiled_tile = {}
    if _compiled_tile is False:
        return False
    try:
        if math not in _compiled_tile:
            _compiled_tile[math] = torch.compile(math, dynamic=True)
        values = _compiled_tile[math](z, dtype)
        shape = (math, *z.shape, z.dtype, dtype)
        if shape not in _checked_tiles:
            for got, want in zip(values, math(z, dtype), strict=True):
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, equal_nan=True)
            _checked_tiles.add(shape)
        for target, value in zip(out, values, strict=True):
            target.copy_(value)
    except Exception as err:  # noqa: BLE001 - a compiler failure or wrong code: run eagerly
        _log.warning("compiled tile reductions unusable (%s); using the eager ones", err)
        _compiled_tile = False
        return False
    return True
