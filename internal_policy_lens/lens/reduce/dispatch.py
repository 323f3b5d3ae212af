"""One place that chooses how the logits of a call are formed and reduced.

Backends (one module each):

- ``triton`` (:mod:`.gpu`, CUDA): each chunk's stacked product into one reused float32 buffer,
  then one Triton kernel reading each logit once (entropy, top-k and the extras on chip).
- ``tiles`` (:mod:`.tiles`, CPU, no extras, K <= 5): vocabulary tiles that stay in the cache.
- ``rows`` (:mod:`.rows`): whole logits rows, one fused pass; with extras or a wider top-k,
  and the only one to take a reference policy other than the extras' final one, the KL from
  the reference, or a lens with a temperature (``general`` calls).

The ``tiles`` and ``rows`` reductions run eagerly or through ``torch.compile``
(:mod:`.compiled`), decided from the amount of work.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ...model.hardware import triton_support
from ..sites import SiteKey
from ..unembed import Lens
from .common import final_key
from .compiled import TILED_COMPILE_MIN_ELEMENTS, compiled_reduce, use_compiled
from .rows import reduce_logits, rows_site_stats
from .tiles import TILED_MAX_TOPK, tiles_site_stats

BACKENDS: tuple[str, ...] = ("triton", "tiles", "rows")
# The widest top-k of the Triton kernel (its per-row candidates live in registers).
KERNEL_MAX_TOPK = 64


def choose_backend(
    device: torch.device,
    extras: bool,
    topk: int,
    backend: str | None = None,
    dtype: torch.dtype = torch.float32,
    general: bool = False,
) -> str:
    """The backend for a call on ``device`` (``backend`` forces one, if it can run the call).

    A ``general`` call (a reference policy without next tokens or other than the final one, the
    KL from the reference, or a lens with a temperature) runs on ``rows``. Otherwise, CUDA with
    Triton, float32 reductions (``dtype``): ``triton`` up to K = :data:`KERNEL_MAX_TOPK`.
    Elsewhere (and for a float64 model) ``tiles`` without extras and K <=
    :data:`~.tiles.TILED_MAX_TOPK`, else ``rows``.

    Raises:
        ValueError: for an unknown backend, one that cannot run here or cannot run the call.
    """
    if backend is None and general:
        return "rows"
    if backend is None:
        kernel = device.type == "cuda" and dtype == torch.float32 and topk <= KERNEL_MAX_TOPK
        if kernel and triton_support(device)[0]:
            return "triton"
        return "tiles" if not extras and topk <= TILED_MAX_TOPK else "rows"
    if backend not in BACKENDS:
        raise ValueError(f"unknown reduction backend '{backend}'; use one of {', '.join(BACKENDS)}")
    if general and backend != "rows":
        raise ValueError(
            "only the rows backend takes another reference policy, the KL from it or a temperature"
        )
    if backend == "triton":
        usable, why = triton_support(device)
        if not usable:
            raise ValueError(f"the triton backend cannot run here: {why}")
        if topk > KERNEL_MAX_TOPK:
            raise ValueError(f"the triton backend takes a top-k up to {KERNEL_MAX_TOPK}")
    if backend == "tiles" and (extras or topk > TILED_MAX_TOPK):
        raise ValueError(f"the tiles backend takes no extras and a top-k up to {TILED_MAX_TOPK}")
    return backend


@torch.no_grad()
def site_stats(
    lens: Lens,
    acts: dict[SiteKey, torch.Tensor],
    keys: Sequence[SiteKey],
    index: tuple[torch.Tensor, torch.Tensor],
    *,
    next_ids: torch.Tensor | None = None,
    topk: int = 0,
    chunk_tokens: int = 1024,
    compiled: bool | None = None,
    backend: str | None = None,
    reference: SiteKey | None = None,
    kl_from: bool = False,
) -> dict[SiteKey, dict[str, np.ndarray]]:
    """Per-row statistics (nats) of the policies of ``keys``, for the rows picked by ``index``.

    Args:
        lens: how site vectors become logits, and in which precision.
        acts: ``(site, layer) -> [batch, pos, d_model]`` captured vectors.
        keys: the distinct sites to reduce; each vector is projected once.
        index: ``(batch_rows, positions)``, the rows to keep, ``[n]`` each.
        next_ids: ``[n]`` the actual next token (-1 where there is none). Given, adds the extras
            (:data:`~internal_policy_lens.lens.unembed.EXTRA_COLUMNS`); then ``keys`` must hold the
            ``final`` site, against which ``kl_to_final`` and ``top1_agrees`` are taken.
        topk: K > 0 adds ``topk_id`` and ``topk_prob``, ``[n, K]`` each: the policy's K most
            probable token ids, most probable first, and their probabilities.
        chunk_tokens: logits rows formed at once (the final policy's rows included), at most
            the ``n`` rows picked by ``index``.
        compiled: use the ``torch.compile``d reductions (``tiles`` and ``rows``); ``None``
            decides from the environment variable ``IPL_COMPILE`` (``0`` or ``1``), else from
            the amount of work. A compile failure falls back to the eager reductions (same
            numbers up to float rounding).
        backend: ``triton``, ``tiles`` or ``rows``; ``None`` chooses (:func:`choose_backend`).
        reference: the key among ``keys`` of the policy that ``kl_to_final`` and ``top1_agrees``
            compare with, instead of the ``final`` site (then these two columns come without
            ``next_ids`` too); ``final`` in the column names means this policy.
        kl_from: adds ``kl_from_final`` = KL(reference || policy), the reverse direction (the
            reference is the ``final`` site unless ``reference`` names another).

    Returns:
        ``key -> column -> [n]`` arrays: ``entropy`` (+ extras); ``[n, K]`` for the top-k.
    """
    final = reference
    if final is None and (next_ids is not None or kl_from):
        final = final_key(keys)
    sites = [key for key in keys if key != final]
    n = len(index[0])
    topk = min(topk, lens.vocab_size)
    work = n * len(keys) * lens.vocab_size
    device, extras = lens.weight.device, final is not None
    other = extras and (next_ids is None or final[0] != "final")
    general = kl_from or other or lens.temperature != 1.0
    chosen = choose_backend(device, extras, topk, backend, lens.reduce_dtype, general)
    if chosen == "triton":
        from .gpu import fused_site_stats  # imports triton: only where it runs

        out = fused_site_stats(lens, acts, sites, final, index, next_ids, topk, chunk_tokens)
    elif chosen == "tiles":
        compiled = use_compiled(compiled, work, TILED_COMPILE_MIN_ELEMENTS)
        out = tiles_site_stats(lens, acts, sites, index, topk, chunk_tokens, compiled)
    else:
        reduce = compiled_reduce if use_compiled(compiled, work) else reduce_logits
        out = rows_site_stats(
            lens, acts, sites, final, index, next_ids, topk, chunk_tokens, reduce, kl_from
        )
    return {key: out[key] for key in keys}
