"""Batched response generation with the KV cache, seeded per batch."""

from __future__ import annotations

import torch

from .models import PolicyModel


def left_pad(seqs: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists into ``input_ids`` and ``attention_mask`` ``[batch, pos]``."""
    length = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.long)
    for row, seq in enumerate(seqs):
        ids[row, length - len(seq) :] = torch.tensor(seq, dtype=torch.long)
        mask[row, length - len(seq) :] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def generate(
    model: PolicyModel,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
) -> list[list[int]]:
    """Generate one response per prompt in a single left-padded batch.

    Sampling uses exactly ``temperature`` and ``top_p`` (no top-k, no repetition penalty, whatever
    the checkpoint's generation_config says); ``temperature=0`` is greedy. The returned token
    lists stop after the first EOS (included) and hold no padding.
    """
    from transformers import GenerationConfig

    tokenizer = model.tokenizer
    eos = tokenizer.eos_token_id
    settings = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=temperature > 0,
        temperature=temperature if temperature > 0 else None,
        top_p=top_p if temperature > 0 else None,
        top_k=None,
        eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id,
    )
    ids, mask = left_pad(prompts, tokenizer.pad_token_id, model.device)
    torch.manual_seed(seed)
    out = model.hf_model.generate(
        input_ids=ids, attention_mask=mask, generation_config=settings, use_cache=True
    )
    responses = []
    for row in out[:, ids.shape[1] :].tolist():
        if eos in row:
            row = row[: row.index(eos) + 1]
        responses.append(row)
    return responses
