"""The ``triton`` backend: float32 products into one reused buffer, reduced by the kernel.

For each chunk of token rows (as many as fit in ``chunk_tokens``, see :func:`gpu_plan`), the
rows of a group of sites are multiplied by the unembedding with float32 results
(``torch.mm(..., out_dtype=torch.float32)``: bf16/fp16 operands, float32 accumulation and
output, on CUDA with torch >= 2.8) into one buffer of at most ``chunk_tokens`` rows allocated
once per call; :func:`~.kernel.row_stats` then reads each logit once, adding the lens's bias and
the head transformation itself. The logits are never rounded to bf16 (at 7B widths that alone
cost up to 0.65 nats). With extras, the final policy's rows come first: their log-probabilities
``[rows, vocab]`` (float32) and argmax are formed once per chunk and read by every site's pass.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import torch

from ...model.families import head_transform
from ...statistics import Request
from ..sites import SiteKey
from ..unembed import Lens
from .common import allocate, chunks, rows_of, stacked_inputs, store, to_numpy
from .kernel import row_stats


def fused_site_stats(
    lens: Lens,
    acts: dict[SiteKey, torch.Tensor],
    sites: Sequence[SiteKey],
    final: SiteKey | None,
    index: tuple[torch.Tensor, torch.Tensor],
    next_ids: torch.Tensor | None,
    request: Request,
    chunk_tokens: int,
    block: int | None = None,
) -> dict[SiteKey, dict[str, np.ndarray]]:
    """:func:`~.dispatch.site_stats` through the Triton kernel (``block``: its tile width)."""
    n, extras, topk = len(index[0]), final is not None, request.topk
    rows, group = gpu_plan(n, len(sites), chunk_tokens, extras)
    device = lens.weight.device
    keys = [*sites, *([final] if extras else [])]
    out = {key: allocate(lens, n, request) for key in keys}
    wanted = request.statistics
    buffer = torch.empty(rows * group * lens.vocab_size, dtype=torch.float32, device=device)
    head = _head_constants(lens)
    for part in chunks(n, rows):
        size = part.stop - part.start
        reference = {}
        if extras:
            nxt = next_ids[part].to(device)
            x = lens.inputs(rows_of(acts, final, index, part, lens), "final")
            logp = torch.log_softmax(_final_logits(lens, x, buffer), -1)  # [size, vocab]
            reference = dict(next_ids=nxt, final_logp=logp, final_top=logp.argmax(-1))
            stats = row_stats(logp, topk=topk, block=block, wanted=wanted, **reference)
            store(out, [final], part, {k: v[None] for k, v in stats.items()})
        for start in range(0, len(sites), group):
            group_keys = sites[start : start + group]
            x = stacked_inputs(lens, acts, group_keys, index, part)  # [sites * size, d_model]
            logits = float_product(x, lens.weight, buffer)
            stats = row_stats(
                logits, bias=lens.bias, topk=topk, block=block, wanted=wanted, **head, **reference
            )
            stats = {k: v.unflatten(0, (len(group_keys), size)) for k, v in stats.items()}
            store(out, group_keys, part, stats)
    return to_numpy(out)


def gpu_plan(n_rows: int, n_sites: int, chunk_tokens: int, extras: bool) -> tuple[int, int]:
    """Token rows per chunk and sites per product: as many token rows of one site as fit.

    A GPU runs a product of ``chunk_tokens`` rows of one site as fast as one of all sites'
    rows of a few tokens, and gathering one site's rows is one indexing op instead of one per
    site (each a kernel launch). With extras the final policy's rows take half the chunk.
    """
    rows = max(1, min(n_rows, chunk_tokens // (2 if extras else 1)))
    sites = max(1, min(n_sites, (chunk_tokens - int(extras) * rows) // rows))
    return rows, sites


def float_product(x: torch.Tensor, weight: torch.Tensor, buffer: torch.Tensor) -> torch.Tensor:
    """``x @ weight^T`` ``[rows, vocab]`` with float32 results, written into ``buffer``.

    Half operands keep their speed and accumulate in float32 where ``torch.mm`` takes
    ``out_dtype`` (CUDA, torch >= 2.8); elsewhere (the CPU under the interpreter, an older
    torch) they are widened first: the same numbers up to the order of the float32 sums.
    """
    out = buffer[: len(x) * len(weight)].view(len(x), len(weight))
    if x.dtype == torch.float32:
        return torch.mm(x, weight.t(), out=out)
    if float_results(str(x.device), x.dtype):
        return torch.mm(x, weight.t(), out_dtype=torch.float32, out=out)
    return torch.mm(x.float(), weight.float().t(), out=out)


@functools.cache
def float_results(device: str, dtype: torch.dtype) -> bool:
    """Whether ``torch.mm`` of ``dtype`` operands on ``device`` writes float32 results."""
    try:
        ones = torch.ones(2, 2, dtype=dtype, device=device)
        torch.mm(ones, ones, out_dtype=torch.float32)
    except (TypeError, RuntimeError):  # no such argument, or no kernel for this device
        return False
    return True


def _final_logits(lens: Lens, x: torch.Tensor, buffer: torch.Tensor) -> torch.Tensor:
    # The model's own logits [rows, vocab] in float32: bias and head transformation in place.
    logits = float_product(x, lens.weight, buffer)
    if lens.bias is not None:
        logits += lens.bias.float()
    return logits if lens.config is None else head_transform(lens.config, logits, inplace=True)


def _head_constants(lens: Lens) -> dict[str, float | None]:
    # The head transformation's constants, for the kernel (see families.head_transform).
    config = lens.config
    scale = getattr(config, "logits_scaling", None)
    return {
        "scale": None if scale in (None, 1, 1.0) else float(scale),
        "cap": getattr(config, "final_logit_softcapping", None),
    }
