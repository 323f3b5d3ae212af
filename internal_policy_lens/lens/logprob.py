"""Log-probabilities of one policy, with gradients: what a loss differentiates.

The statistics read without gradients (entropies, ranks and KLs of many sites at once, fused
or tiled over the vocabulary) are the reduction engine's, :mod:`.reduce`. Where a loss needs
the policy's log-probabilities themselves (the PPO ratio of an internal policy pi^k in BuPO, the
tuned-lens fit's KL), they come from :func:`lens_logprobs`: the site vectors through the
:class:`~.unembed.Lens` (its lens, temperature, bias and the model's head transformation), then
one log-softmax.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .unembed import Lens


class LogProbs(NamedTuple):
    """A policy's log-probabilities, and what is read from them."""

    all: torch.Tensor
    """``[..., vocab]`` the log-softmax, float32."""
    token: torch.Tensor | None
    """``[...]`` log pi(target), with ``targets``."""
    entropy: torch.Tensor | None
    """``[...]`` the entropy (nats), with ``entropy=True``."""


def logprobs(
    logits: torch.Tensor, targets: torch.Tensor | None = None, *, entropy: bool = False
) -> LogProbs:
    """The log-softmax of ``logits`` ``[..., vocab]`` in float32, differentiable.

    ``targets`` ``[...]`` (token ids) adds their log-probabilities; ``entropy`` the entropy.
    Float32 whatever the logits' dtype: a PPO ratio ``exp(logp - old)`` reads differences far
    below a bf16 logit's rounding.
    """
    logp = torch.log_softmax(logits.float(), -1)  # [..., vocab]
    token = None if targets is None else logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return LogProbs(logp, token, -(logp.exp() * logp).sum(-1) if entropy else None)


def lens_logprobs(
    lens: Lens,
    x: torch.Tensor,
    site: str,
    layer: int | None = None,
    *,
    targets: torch.Tensor | None = None,
    entropy: bool = False,
) -> LogProbs:
    """The policy of ``site`` vectors ``x`` ``[..., d_model]`` of ``layer`` through ``lens``.

    Differentiable in ``x``, the unembedding, the final norm (norm and tuned lenses) and the
    translators (tuned lens, which needs the ``layer``). ``targets`` and ``entropy`` as for
    :func:`logprobs`.
    """
    rows = x.reshape(-1, x.shape[-1])  # [rows, d_model]
    logits = lens.logits(lens.inputs(rows, site, layer), None)  # [rows, vocab]
    return logprobs(logits.view(*x.shape[:-1], -1), targets, entropy=entropy)
