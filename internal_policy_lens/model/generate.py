"""Batched response generation with the KV cache, seeded per response: the one generation loop.

Each sampled response draws its tokens from its own random stream (a ``torch.Generator`` seeded
with :func:`response_seed`), so a response depends on its prompt's key, its sample number, the
model, the sampling settings and the seed, never on the other prompts of its batch nor on the
batch size (up to float rounding of batched products that decides near ties).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence

import torch
from tqdm.auto import tqdm

from ..data.encode import encode_prompt
from .batch import pad
from .load import PolicyModel

SEEDING = (
    "per response: token t of response k to prompt p is drawn by the exponential race "
    "(argmax p_v / E_v, E_v ~ Exp(1), the same law as a categorical draw) with the t-th draws "
    "of a torch.Generator on the model's device seeded with response_seed(seed, key of p, k) = "
    "the first 63 bits of sha256('seed/key/k'); a response does not depend on its batch"
)
"""How sampled responses are seeded; the run folders record it beside the seed."""


def response_seed(seed: int, key: int | str, k: int = 0) -> int:
    """The random stream of response ``k`` to the prompt keyed ``key`` (its record's id)."""
    digest = hashlib.sha256(f"{seed}/{key}/{k}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # 63 bits: any torch.Generator seed


class _RowSampler:
    """A logits processor that samples each row from its own generator (temperature, top-p).

    It returns scores that are -inf except at the drawn token, so the greedy step of
    ``generate`` takes exactly that token.
    """

    def __init__(self, seeds: Sequence[int], temperature: float, top_p: float):
        from transformers import TemperatureLogitsWarper, TopPLogitsWarper

        self.seeds = [int(s) for s in seeds]
        self.generators: list[torch.Generator] = []  # made on the logits' device at step 1
        self.warpers = [TemperatureLogitsWarper(temperature)]
        if top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(top_p))

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        for warper in self.warpers:
            scores = warper(input_ids, scores)
        probs = scores.float().softmax(-1)  # [batch, vocab]
        if not self.generators:  # a model split over devices gives logits on its last one
            self.generators = [torch.Generator(probs.device).manual_seed(s) for s in self.seeds]
        race = torch.empty_like(probs)
        for row, generator in zip(race, self.generators):  # one stream per response
            row.exponential_(generator=generator)
        chosen = probs.div(race).argmax(-1, keepdim=True)  # [batch, 1]
        return torch.full_like(scores, float("-inf")).scatter_(1, chosen, 0.0)


class _EachStep:
    """A logits processor that only reports each decoding step (for a progress bar)."""

    def __init__(self, on_step: Callable[[], None]):
        self.on_step = on_step

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.on_step()
        return scores


@torch.no_grad()
def generate(
    model: PolicyModel,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seeds: Sequence[int] | None = None,
    on_step: Callable[[], None] | None = None,
) -> list[list[int]]:
    """Generate one response per prompt in a single left-padded batch.

    Sampling uses exactly ``temperature`` and ``top_p`` (no top-k, no repetition penalty, whatever
    the checkpoint's generation_config says); ``temperature=0`` is greedy. Response ``i`` draws
    from a generator seeded with ``seeds[i]`` (default: ``response_seed(0, i)``), see
    :data:`SEEDING`. ``on_step`` is called at every decoding step. The returned token lists
    stop after the first EOS (included) and hold no padding.
    """
    from transformers import GenerationConfig, LogitsProcessorList

    tokenizer = model.tokenizer
    eos = tokenizer.eos_token_id
    settings = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,  # the row sampler draws; the greedy step takes its token
        top_k=None,
        eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id,
    )
    processors = LogitsProcessorList()
    if temperature > 0:
        seeds = [response_seed(0, i) for i in range(len(prompts))] if seeds is None else seeds
        if len(seeds) != len(prompts):
            raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts; give one per prompt")
        processors.append(_RowSampler(seeds, temperature, top_p))
    if on_step is not None:
        processors.append(_EachStep(on_step))
    ids, mask = pad(prompts, tokenizer.pad_token_id, model.device, side="left")
    out = model.hf_model.generate(
        input_ids=ids,
        attention_mask=mask,
        generation_config=settings,
        logits_processor=processors,
        use_cache=True,
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
    keys: Sequence[int | str] | None = None,
    progress: bool = False,
    desc: str = "generate",
) -> list[list[str]]:
    """``samples`` decoded responses per prompt (strings or chat messages), batched and seeded.

    Response ``k`` to prompt ``i`` is seeded with ``response_seed(seed, keys[i], k)`` (default
    keys: the prompts' indices), so it does not depend on ``batch_size`` or on the other prompts.
    """
    keys = range(len(prompts)) if keys is None else keys
    encoded = [encode_prompt(model.tokenizer, p) for p in prompts]
    jobs = [(i, k) for i in range(len(encoded)) for k in range(samples)]
    out: list[list[str]] = [[] for _ in prompts]
    with GenerationBar(len(jobs), max_new_tokens, desc=desc, disable=not progress) as bar:
        for start in range(0, len(jobs), batch_size):
            batch = jobs[start : start + batch_size]
            texts = generate_texts(
                model,
                [encoded[i] for i, _ in batch],
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_p=top_p,
                seeds=[response_seed(seed, keys[i], k) for i, k in batch],
                on_step=bar.step,
            )
            for (i, _), text in zip(batch, texts):
                out[i].append(text)
            bar.done(len(batch))
    return out


class GenerationBar(tqdm):
    """A bar of responses that also shows the current batch's decoding step, as it moves."""

    def __init__(self, total: int, max_new_tokens: int, **kwargs):
        super().__init__(total=total, unit="resp", **kwargs)
        self.max_new_tokens, self.steps, self.shown = max_new_tokens, 0, 0.0

    def step(self) -> None:
        """One decoding step of the current batch (redrawn at most every ``mininterval``)."""
        self.steps += 1
        now = time.monotonic()
        if not self.disable and now - self.shown >= self.mininterval:
            self.shown = now
            self.set_postfix_str(f"token {self.steps}/{self.max_new_tokens} of the batch")

    def done(self, responses: int) -> None:
        """The current batch finished with ``responses`` responses."""
        self.steps = 0
        self.set_postfix_str("", refresh=False)
        self.update(responses)
