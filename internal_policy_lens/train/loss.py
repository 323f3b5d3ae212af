"""GRPO's pure pieces (paper Eq. 3): group advantages and the clipped policy loss.

The same loss serves IPA (Eq. 9) and GRPO: only where the log-probabilities come from differs
(the internal layer policy pi^k or the full policy).
"""

from __future__ import annotations

import torch


def group_advantages(rewards: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``(R_i - mean(R)) / (std(R) + eps)`` within each group; ``rewards`` is ``[groups, G]``.

    ``std`` is the sample standard deviation (Bessel-corrected, as ``torch.std``), matching the
    reference GRPO implementations. A group whose rewards are all equal gets zero advantages.
    """
    mean = rewards.mean(dim=1, keepdim=True)
    std = rewards.std(dim=1, keepdim=True)
    return (rewards - mean) / (std + eps)


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    aggregation: str = "token",
    ref_logp: torch.Tensor | None = None,
    kl_coef: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO-clip loss ``-min(r A, clip(r, 1-clip_low, 1+clip_high) A)`` over response tokens.

    Args:
        logp: ``[batch, tokens]`` log pi_theta of the sampled tokens (with gradient).
        old_logp: ``[batch, tokens]`` log pi_old of the same tokens (no gradient).
        advantages: ``[batch]`` one advantage per response, broadcast to its tokens.
        mask: ``[batch, tokens]`` 1 on response tokens.
        clip_low: lower clip range eps_low.
        clip_high: upper clip range eps_high.
        aggregation: ``token`` (mean over all response tokens of the batch, the paper's code)
            or ``sequence`` (mean over tokens within a response, then over responses).
        ref_logp: log pi_ref for the optional KL penalty (k3 estimator).
        kl_coef: beta of the KL penalty (0 = none, the default).

    Returns:
        The scalar loss and statistics (``clip_frac``, ``ratio_mean``, ``kl``).
    """
    mask = mask.to(logp.dtype)
    ratio = torch.exp(logp - old_logp)
    adv = advantages.unsqueeze(-1)  # [batch, 1]
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high) * adv
    per_token = -torch.minimum(unclipped, clipped)
    kl = torch.zeros_like(per_token)
    if ref_logp is not None and kl_coef > 0:
        delta = ref_logp - logp
        kl = torch.exp(delta) - delta - 1.0
        per_token = per_token + kl_coef * kl
    loss = _aggregate(per_token, mask, aggregation)
    with torch.no_grad():
        stats = {
            "clip_frac": _aggregate((clipped < unclipped).to(logp.dtype), mask, "token"),
            "ratio_mean": _aggregate(ratio, mask, "token"),
            "kl": _aggregate(kl, mask, "token"),
        }
    return loss, stats


def _aggregate(values: torch.Tensor, mask: torch.Tensor, aggregation: str) -> torch.Tensor:
    if aggregation == "token":
        return (values * mask).sum() / mask.sum().clamp(min=1)
    if aggregation == "sequence":
        per_seq = (values * mask).sum(-1) / mask.sum(-1).clamp(min=1)
        return per_seq.mean()
    raise ValueError(f"unknown aggregation '{aggregation}'; use token or sequence")
