"""Accuracy metrics: Avg@K and the unbiased Pass@k, and the bundled task's accuracy report."""

from __future__ import annotations

import json
from dataclasses import asdict
from math import comb
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from .data import encode_prompt
from .generate import generate
from .task import Problem, check


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased Pass@k from ``n`` samples of which ``c`` are correct: 1 - C(n-c, k) / C(n, k)."""
    if not 0 < k <= n:
        raise ValueError(f"k={k} must be in 1..n={n}")
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def sample(
    model,
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
    """``samples`` decoded responses per prompt (strings or chat messages), batched and seeded."""
    encoded = [encode_prompt(model.tokenizer, p) for p in prompts]
    jobs = [(i, ids) for i, ids in enumerate(encoded) for _ in range(samples)]
    out: list[list[str]] = [[] for _ in prompts]
    bar = tqdm(total=len(jobs), unit="resp", disable=not progress)
    for start in range(0, len(jobs), batch_size):
        batch = jobs[start : start + batch_size]
        tokens = generate(
            model,
            [ids for _, ids in batch],
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed + start // batch_size,
        )
        texts = model.tokenizer.batch_decode(tokens, skip_special_tokens=True)
        for (i, _), text in zip(batch, texts):
            out[i].append(text)
        bar.update(len(batch))
    bar.close()
    return out


def accuracy_report(
    model_path: str, problems: list[Problem], *, pass_k: int = 8, seed: int = 0
) -> dict:
    """Greedy accuracy, pass@k and mean@k at temperature 1, overall and by difficulty."""
    from .models import load_model

    model = load_model(model_path, dtype="float32", device="cpu")
    questions = [p.question for p in problems]
    greedy = sample(model, questions, samples=1, temperature=0.0, max_new_tokens=96, seed=seed)
    sampled = sample(
        model, questions, samples=pass_k, temperature=1.0, max_new_tokens=96, seed=seed + 1
    )
    rows = []
    for p, g, s in zip(problems, greedy, sampled):
        correct = sum(check(r, p.answer) for r in s)
        rows.append(
            (
                p.difficulty,
                check(g[0], p.answer),
                pass_at_k(pass_k, correct, pass_k),
                correct / pass_k,
            )
        )
    levels = sorted({r[0] for r in rows})
    by = [_summarise(str(d), [r for r in rows if r[0] == d]) for d in levels]
    return {
        "problems": len(rows),
        "pass_k": pass_k,
        "by_difficulty": by,
        "overall": _summarise("all", rows),
    }


def _summarise(label: str, rows: list[tuple]) -> dict:
    n = len(rows)
    return {
        "difficulty": label,
        "problems": n,
        "greedy": sum(r[1] for r in rows) / n,
        "pass_at_k": sum(r[2] for r in rows) / n,
        "mean_at_k": sum(r[3] for r in rows) / n,
    }


def pass_ks(samples: int) -> list[int]:
    """The k of Pass@k to report: 1, 2, 4, ... below ``samples``, then ``samples``."""
    ks, k = [], 1
    while k < samples:
        ks.append(k)
        k *= 2
    return ks + [samples]


def evaluate(cfg) -> tuple[pd.DataFrame, dict]:
    """Sample ``cfg.samples`` responses per problem; write and return per-problem results.

    Writes ``results.csv`` (one row per problem: correct count, Avg@K, Pass@k), ``samples.jsonl``
    (every response with its reward) and ``metrics.json`` (the means, with the configuration).
    """
    from .datasets import read_records
    from .models import load_model
    from .train.rewards import math_reward

    records = read_records(cfg.data, max_samples=cfg.max_samples)
    missing = [r["line"] for r in records if r["answer"] is None]
    if missing:
        raise ValueError(f"{cfg.data}:{missing[0]}: record has no answer; ipl eval needs answers")
    model = load_model(cfg.model)
    responses = sample(
        model,
        [r["prompt"] for r in records],
        samples=cfg.samples,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        max_new_tokens=cfg.max_new_tokens,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        progress=True,
    )
    rows, lines = [], []
    for record, texts in zip(records, responses):
        rewards = [math_reward(t, record["answer"]) for t in texts]
        correct = int(sum(r == 1.0 for r in rewards))
        row = {
            "sample_id": record["sample_id"],
            "answer": record["answer"],
            "n": cfg.samples,
            "correct": correct,
            f"avg@{cfg.samples}": correct / cfg.samples,
        }
        row.update({f"pass@{k}": pass_at_k(cfg.samples, correct, k) for k in pass_ks(cfg.samples)})
        rows.append(row)
        lines += [
            {"sample_id": record["sample_id"], "response": t, "reward": r}
            for t, r in zip(texts, rewards)
        ]
    table = pd.DataFrame(rows)
    metrics = {c: float(table[c].mean()) for c in table.columns if "@" in c}
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "results.csv", index=False)
    (out / "samples.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (out / "metrics.json").write_text(
        json.dumps({"metrics": metrics, "problems": len(table), "config": asdict(cfg)}, indent=2)
    )
    return table, metrics
