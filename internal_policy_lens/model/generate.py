"""Batched response generation with the KV cache, seeded per batch: the one generation loop."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..data.encode import encode_prompt
from .batch import pad
from .load import PolicyModel


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
    ids, mask = pad(prompts, tokenizer.pad_token_id, model.device, side="left")
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


def generate_texts(model: PolicyModel, prompts: list[list[int]], **sampling) -> list[str]:
    """:func:`generate`'s responses decoded to text (special tokens dropped)."""
    tokens = generate(model, prompts, **sampling)
    return model.tokenizer.batch_decode(tokens, skip_special_tokens=True)


def sample(
    model: PolicyModel,
    prompts: list,
    *,
    samples: int,
    temperature: float,
    max_new_tokens: int,
    batch_size: int = 64,
    seed: int = 0,
    top_p: float = 1.0,
    progress: bool = False,
) -> list[list[str]]:
    """``samples`` decoded responses per prompt (strings or chat messages), batched and seeded.

    Batch ``b`` of the (prompt, sample) pairs is seeded with ``seed + b``.
    """
    encoded = [encode_prompt(model.tokenizer, p) for p in prompts]
    jobs = [(i, ids) for i, ids in enumerate(encoded) for _ in range(samples)]
    out: list[list[str]] = [[] for _ in prompts]
    bar = tqdm(total=len(jobs), unit="resp", disable=not progress)
    for start in range(0, len(jobs), batch_size):
        batch = jobs[start : start + batch_size]
        texts = generate_texts(
            model,
            [ids for _, ids in batch],
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed + start // batch_size,
        )
        for (i, _), text in zip(batch, texts):
            out[i].append(text)
        bar.update(len(batch))
    bar.close()
    return out
