"""Residual cosines: how each module's write lines up with the stream it is added to.

No unembedding here: the captured vectors themselves, in float64.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from ..sites import SiteKey


def cosine_keys(layers: Iterable[int], parallel: bool) -> list[SiteKey]:
    """The vectors :func:`residual_cosines` reads for ``layers``, all keyed by their own layer.

    ``resid_pre`` is captured at the layer's input (not as ``resid_post[l-1]``), so that every
    vector of a layer falls in the same layer group of the memory-bounded forward.
    """
    sites = (
        ("resid_pre", "attn_out", "mlp_out")
        if parallel
        else (
            "resid_pre",
            "attn_out",
            "resid_mid",
            "mlp_out",
        )
    )
    return [(site, layer) for layer in layers for site in sites]


@torch.no_grad()
def residual_cosines(
    acts: dict[SiteKey, torch.Tensor],
    layer: int,
    index: tuple[torch.Tensor, torch.Tensor],
    parallel: bool,
) -> dict[str, np.ndarray]:
    """``cos_attn`` and ``cos_ffn`` (float64, ``[n]``) of ``layer`` at the rows of ``index``.

    ``cos_attn = cos(attn_out, resid_pre)``; ``cos_ffn = cos(mlp_out, resid_mid)``, the stream
    the FFN's write is added to. In a parallel block (GPT-NeoX) both modules read and write
    ``resid_pre`` and there is no ``resid_mid``: there ``cos_ffn = cos(mlp_out, resid_pre)``.
    Negative: the module suppresses the stream's direction; near 0: it writes new, orthogonal
    features; positive: it amplifies. NaN where a vector is zero.
    """

    def rows(site: str) -> torch.Tensor:
        x = acts[site, layer]  # [batch, pos, d_model]
        return x[index[0].to(x.device), index[1].to(x.device)].double()  # [n, d_model]

    def cosine(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
        return ((a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))).cpu().numpy()

    stream = rows("resid_pre")
    mid = stream if parallel else rows("resid_mid")
    return {"cos_attn": cosine(rows("attn_out"), stream), "cos_ffn": cosine(rows("mlp_out"), mid)}
