"""Rollouts from the full policy, and log-probabilities under the full or an internal policy."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..data.encode import encode_prompt
from ..lens.capture import capture
from ..lens.logprob import lens_logprobs, logprobs
from ..lens.reduce import site_stats
from ..lens.unembed import Lens
from ..model.batch import pad, position_ids
from ..model.generate import generate, response_seed
from ..model.load import PolicyModel
from .loss import group_advantages


@dataclass
class RolloutBatch:
    """G responses for each of P prompts, as one left-padded batch of N = P * G sequences."""

    input_ids: torch.Tensor  # [N, T] prompt + response, left-padded
    attention_mask: torch.Tensor  # [N, T]
    response_mask: (
        torch.Tensor
    )  # [N, T-1] 1 where the target token (position t+1) is a response token
    rewards: torch.Tensor  # [N]
    advantages: torch.Tensor  # [N]
    response_lengths: torch.Tensor  # [N]
    texts: list[str]

    def select(self, index: torch.Tensor) -> RolloutBatch:
        """The sub-batch of the given rows (a mini-batch)."""
        rows = index.tolist()
        index = index.to(self.input_ids.device)
        return RolloutBatch(
            self.input_ids[index],
            self.attention_mask[index],
            self.response_mask[index],
            self.rewards[index],
            self.advantages[index],
            self.response_lengths[index],
            [self.texts[i] for i in rows],
        )


def collect(
    model: PolicyModel,
    records: list[dict],
    *,
    reward: Callable[[str, str], float],
    group_size: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float = 1.0,
    seed: int = 0,
) -> RolloutBatch:
    """Sample ``group_size`` responses per record from the full model and score them.

    ``reward(text, answer)`` scores a response against its record's answer. Response k to
    the j-th record is seeded with ``response_seed(seed, j, k)``.
    """
    tokenizer = model.tokenizer
    prompts = [encode_prompt(tokenizer, r["prompt"]) for r in records for _ in range(group_size)]
    responses = generate(
        model,
        prompts,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        seeds=[response_seed(seed, j, k) for j in range(len(records)) for k in range(group_size)],
    )
    texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
    answers = [r["answer"] for r in records for _ in range(group_size)]
    device = model.device  # every tensor of the batch lives with the model that reads it
    rewards = torch.tensor([float(reward(t, a)) for t, a in zip(texts, answers)], device=device)
    advantages = group_advantages(rewards.view(len(records), group_size)).view(-1)
    ids, mask = pad([p + r for p, r in zip(prompts, responses)], tokenizer.pad_token_id, device)
    lengths = torch.tensor([len(r) for r in responses], device=device)
    # Target t+1 is a response token iff it lies in the last len(response) real positions.
    positions = torch.arange(ids.shape[1] - 1, 0, -1, device=device)  # distance to the end
    response_mask = positions.unsqueeze(0) <= lengths.unsqueeze(1)  # [N, T-1]
    return RolloutBatch(ids, mask, response_mask.long(), rewards, advantages, lengths, texts)


def token_logprobs(
    model: PolicyModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    layer: int | None = None,
    lens_name: str = "raw",
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each next token and the policy's entropy, ``[N, T-1]`` each.

    With ``layer=None`` the policy is the model's own output; with ``layer=k`` it is the internal
    layer policy pi^k (``resid_post`` of layer k through the lens named ``lens_name``), and the
    forward pass stops after layer k, so layers above k and the final norm take no part and get
    no gradient.
    Without gradients the entropy (a statistic, never differentiated) is reduced by the
    dispatcher (:func:`~internal_policy_lens.lens.reduce.site_stats`) from the same pass.
    """
    key = ("final", model.n_layers - 1) if layer is None else ("resid_post", layer)
    with capture(model, keys=[key]) as acts:
        if layer is None:
            logits = model.bridge(
                input_ids,
                attention_mask=model.visible(attention_mask),
                position_ids=position_ids(attention_mask),
                return_type="logits",
            )
        else:
            model.forward(input_ids, attention_mask, stop_at_layer=layer + 1)
    targets = input_ids[:, 1:]  # [N, T-1]: position t predicts t+1
    grad = torch.is_grad_enabled()
    # A Lens casts the unembedding to its products' dtype: made only where one projects.
    lens = None if layer is None and grad else Lens(model, lens_name, temperature=temperature)
    if layer is None:  # the model's own logits, the ones the rollouts were sampled from
        out = logprobs(logits[:, :-1].float() / temperature, targets, entropy=grad)
    else:
        hidden = acts[key][:, :-1]  # [N, T-1, d_model]
        out = lens_logprobs(lens, hidden, key[0], layer, targets=targets, entropy=grad)
    if grad:
        return out.token, out.entropy
    return out.token, policy_entropy(lens, acts, key)


def policy_entropy(lens: Lens, acts: dict, key: tuple[str, int]) -> torch.Tensor:
    """Entropy ``[N, T-1]`` (float32) of ``key``'s policy at every position but the last."""
    x = acts[key]  # [N, T, d_model]
    every = torch.ones(x.shape[0], x.shape[1] - 1, dtype=torch.bool, device=x.device)
    index = every.nonzero(as_tuple=True)  # [N * (T-1)] each
    entropy = site_stats(lens, acts, [key], index)[key]["entropy"]  # [N * (T-1)]
    return torch.from_numpy(entropy).float().to(x.device).view(x.shape[0], -1)
