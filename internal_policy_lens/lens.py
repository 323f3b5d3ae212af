"""Site vector -> logits -> entropy and the other per-token statistics (paper Eqs. 5-8).

Logits are only ever formed for a chunk of rows at a time and reduced in float32, whatever the
model's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .models import PolicyModel

LENSES: tuple[str, ...] = ("raw", "norm")
EXTRA_COLUMNS: tuple[str, ...] = (
    "next_token_logprob",
    "next_token_rank",
    "kl_to_final",
    "top1_agrees",
)


class Lens:
    """Turns site vectors into float32 logits with the ``raw`` or ``norm`` lens.

    ``raw`` (the paper's definition): ``x @ W_U^T (+ b_U)``. ``norm`` (the logit lens):
    ``final_norm(x) @ W_U^T (+ b_U)``. The ``final`` site is the final norm's output already, so
    it is projected as it is under both lenses and gives the model's own logits.
    """

    def __init__(self, model: PolicyModel, lens: str = "raw") -> None:
        if lens not in LENSES:
            raise ValueError(f"unknown lens '{lens}'; use one of {', '.join(LENSES)}")
        self.kind = lens
        self.norm = model.final_norm
        unembed = model.unembed
        # Products and reductions in float32, or float64 for a float64 model.
        self.dtype = torch.promote_types(unembed.weight.dtype, torch.float32)
        self.weight = unembed.weight.to(self.dtype)  # [vocab, d_model]
        bias = getattr(unembed, "bias", None)
        self.bias = None if bias is None else bias.to(self.dtype)

    def logits(self, x: torch.Tensor, site: str) -> torch.Tensor:
        """Project ``x`` ``[rows, d_model]`` of ``site`` to float32 logits ``[rows, vocab]``."""
        if self.kind == "norm" and site != "final":
            x = self.norm(x)
        return F.linear(x.to(self.dtype), self.weight, self.bias)


def policy_stats(
    logits: torch.Tensor,
    next_ids: torch.Tensor | None = None,
    final_logp: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Per-row statistics of the policies ``softmax(logits)``, in float32 (nats).

    Args:
        logits: ``[rows, vocab]``.
        next_ids: ``[rows]`` the actual next token (-1 where there is none); adds
            ``next_token_logprob`` and ``next_token_rank`` (1 = the policy's top token).
        final_logp: ``[rows, vocab]`` log-probabilities of the model's output policy; adds
            ``kl_to_final`` = KL(internal || final) and ``top1_agrees`` (same argmax).
    """
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    logp = torch.log_softmax(logits, dim=-1)  # [rows, vocab]
    p = logp.exp()
    out = {"entropy": -(p * logp).sum(-1)}
    if next_ids is not None:
        has_next = next_ids >= 0
        idx = next_ids.clamp(min=0).unsqueeze(-1)
        target = logits.gather(-1, idx)
        logprob = logp.gather(-1, idx).squeeze(-1)
        rank = (logits > target).sum(-1) + 1
        out["next_token_logprob"] = torch.where(has_next, logprob, torch.nan)
        out["next_token_rank"] = torch.where(has_next, rank, -1)
    if final_logp is not None:
        out["kl_to_final"] = (p * (logp - final_logp)).sum(-1)
        out["top1_agrees"] = logits.argmax(-1) == final_logp.argmax(-1)
    return out
