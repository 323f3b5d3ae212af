"""One place that chooses how the logits of a call are formed and reduced.

Backends (one module each):

- ``triton`` (:mod:`.gpu`, CUDA): each chunk's stacked product into one reused float32 buffer,
  then one Triton kernel reading each logit once (entropy, top-k and the extras on chip).
- ``tiles`` (:mod:`.tiles`, CPU, the statistics with an exact merge across vocabulary tiles,
  K <= 5): vocabulary tiles that stay in the cache.
- ``rows`` (:mod:`.rows`): whole logits rows, one fused pass; every statistic, any top-k, any
  reference policy, a lens with a temperature.

Each backend's module declares what it computes (its ``CAPABILITY``, a
:class:`~.common.Capability`); :func:`choose_backend` takes the first that covers a call's
:class:`~internal_policy_lens.statistics.Request`.

The ``tiles`` and ``rows`` reductions run eagerly or through ``torch.compile``
(:mod:`.compiled`), decided from the amount of work.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import torch

from ...model.hardware import triton_support
from ...statistics import Request
from ..sites import SiteKey
from ..unembed import Lens
from . import rows, tiles
from .common import Capability, final_key
from .compiled import TILED_COMPILE_MIN_ELEMENTS, compiled_reduce, use_compiled
from .rows import reduce_logits, rows_site_stats
from .tiles import tiles_site_stats

BACKENDS: tuple[str, ...] = ("triton", "tiles", "rows")
ENTROPY = Request()
"""The request of the entropy alone."""


def capability(backend: str) -> Capability:
    """What ``backend`` computes (each backend's module declares it)."""
    if backend == "triton":
        from . import kernel  # imports triton: only asked where triton runs, or in its tests

        return kernel.CAPABILITY
    return {"tiles": tiles.CAPABILITY, "rows": rows.CAPABILITY}[backend]


def choose_backend(
    device: torch.device,
    request: Request = ENTROPY,
    backend: str | None = None,
    dtype: torch.dtype = torch.float32,
    *,
    other_reference: bool = False,
    temperature: bool = False,
) -> str:
    """The backend for a call on ``device`` (``backend`` forces one, if it can run the call).

    The first of ``triton`` (CUDA with Triton, float32 reductions: ``dtype``), ``tiles`` and
    ``rows`` whose :class:`~.common.Capability` covers the call: its statistics, its top-k, a
    reference policy other than the final one or without next tokens (``other_reference``), a
    lens temperature (``temperature``). ``rows`` computes every statistic.

    Raises:
        ValueError: for an unknown backend, one that cannot run here or cannot run the call.
    """
    needs = dict(other_reference=other_reference, temperature=temperature)
    if backend is None:
        kernel = device.type == "cuda" and dtype == torch.float32 and triton_support(device)[0]
        for name in ("triton", "tiles", "rows") if kernel else ("tiles", "rows"):
            if capability(name).missing(request, **needs) is None:
                return name
        raise ValueError(f"no backend computes {', '.join(request.statistics)}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown reduction backend '{backend}'; use one of {', '.join(BACKENDS)}")
    if backend == "triton":
        usable, why = triton_support(device)
        if not usable:
            raise ValueError(f"the triton backend cannot run here: {why}")
    missing = capability(backend).missing(request, **needs)
    if missing is not None:
        raise ValueError(f"the {backend} backend {missing}; the rows backend can")
    return backend


@torch.no_grad()
def site_stats(
    lens: Lens,
    acts: dict[SiteKey, torch.Tensor],
    keys: Sequence[SiteKey],
    index: tuple[torch.Tensor, torch.Tensor],
    request: Request = ENTROPY,
    *,
    next_ids: torch.Tensor | None = None,
    chunk_tokens: int = 1024,
    compiled: bool | None = None,
    backend: str | None = None,
) -> dict[SiteKey, dict[str, np.ndarray]]:
    """Per-row statistics (nats) of the policies of ``keys``, for the rows picked by ``index``.

    Args:
        lens: how site vectors become logits, and in which precision.
        acts: ``(site, layer) -> [batch, pos, d_model]`` captured vectors.
        keys: the distinct sites to reduce; each vector is projected once.
        index: ``(batch_rows, positions)``, the rows to keep, ``[n]`` each.
        request: the statistics (:data:`~internal_policy_lens.statistics.STATISTICS`), the
            top-k and the reference policy of the call. Statistics that need the reference
            compare with ``request.reference`` if given, else with the ``final`` site, which
            ``keys`` must then hold; ``final`` in their names means this policy. With ``topk``
            K > 0 come ``topk_id`` and ``topk_prob``, ``[n, K]`` each: the policy's K most
            probable token ids, most probable first, and their probabilities.
        next_ids: ``[n]`` the actual next token (-1 where there is none), for the statistics
            that need it.
        chunk_tokens: logits rows formed at once (the reference policy's rows included), at
            most the ``n`` rows picked by ``index``.
        compiled: use the ``torch.compile``d reductions (``tiles`` and ``rows``); ``None``
            decides from the environment variable ``IPL_COMPILE`` (``0`` or ``1``), else from
            the amount of work. A compile failure falls back to the eager reductions (same
            numbers up to float rounding).
        backend: ``triton``, ``tiles`` or ``rows``; ``None`` chooses (:func:`choose_backend`).

    Returns:
        ``key -> column -> [n]`` arrays, a column per statistic; ``[n, K]`` for the top-k.

    Raises:
        ValueError: for statistics that need next tokens without ``next_ids``.
    """
    if request.needs("next_token") and next_ids is None:
        raise ValueError(f"{', '.join(request.statistics)}: the next-token columns need next_ids")
    final = request.reference
    if final is None and request.needs("reference"):
        final = final_key(keys)
    sites = [key for key in keys if key != final]
    n = len(index[0])
    request = replace(request, topk=min(request.topk, lens.vocab_size))
    work = n * len(keys) * lens.vocab_size
    device = lens.weight.device
    other = final is not None and (next_ids is None or final[0] != "final")
    chosen = choose_backend(
        device,
        request,
        backend,
        lens.reduce_dtype,
        other_reference=other,
        temperature=lens.temperature != 1.0,
    )
    if chosen == "triton":
        from .gpu import fused_site_stats  # imports triton: only where it runs

        out = fused_site_stats(lens, acts, sites, final, index, next_ids, request, chunk_tokens)
    elif chosen == "tiles":
        compiled = use_compiled(compiled, work, TILED_COMPILE_MIN_ELEMENTS)
        out = tiles_site_stats(lens, acts, sites, index, request, chunk_tokens, compiled)
    else:
        reduce = compiled_reduce if use_compiled(compiled, work) else reduce_logits
        out = rows_site_stats(
            lens, acts, sites, final, index, next_ids, request, chunk_tokens, reduce
        )
    return {key: out[key] for key in keys}
