"""Logits -> entropy and the other per-token statistics (paper Eq. 7), behind one dispatcher.

The analysis costs one vocabulary-sized product per (site, layer, token), then passes over each
product's logits. For a chunk of token rows, the rows of every site and layer are stacked into
one product ``[sites * rows, d_model] @ W_U^T`` of at most ``chunk_tokens`` rows, and
:func:`site_stats` hands it to the backend that :func:`choose_backend` picks from the device,
the extras and the top-k: the Triton kernel on CUDA (:mod:`.gpu`, :mod:`.kernel`), vocabulary
tiles on the CPU (:mod:`.tiles`), whole rows with extras (:mod:`.rows`), either compiled or
eager (:mod:`.compiled`). :mod:`.cosines` holds the residual cosines (no unembedding).
"""

from ..sites import COSINE_COLUMNS
from .common import KERNEL_MAX_TOPK, Capability, Stats, chunk_plan
from .cosines import cosine_keys, residual_cosines
from .dispatch import BACKENDS, capability, choose_backend, site_stats
from .rows import final_policy, reduce_logits
from .tiles import TILED_MAX_TOPK, tile_columns, tiled_stats

__all__ = [
    "BACKENDS",
    "Capability",
    "COSINE_COLUMNS",
    "KERNEL_MAX_TOPK",
    "TILED_MAX_TOPK",
    "Stats",
    "capability",
    "choose_backend",
    "chunk_plan",
    "cosine_keys",
    "final_policy",
    "reduce_logits",
    "residual_cosines",
    "site_stats",
    "tile_columns",
    "tiled_stats",
]
