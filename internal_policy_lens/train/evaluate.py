"""``ipl eval``: Avg@K and the unbiased Pass@k of a model on problems with answers."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from math import comb

import pandas as pd

from ..config import EvalConfig
from ..data.answers import math_reward
from ..data.records import read_records
from ..folders import Folder, sha256
from ..model.generate import SEEDING, sample
from ..model.load import load_model

_log = logging.getLogger(__name__)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased Pass@k from ``n`` samples of which ``c`` are correct: 1 - C(n-c, k) / C(n, k)."""
    if not 0 < k <= n:
        raise ValueError(f"k={k} must be in 1..n={n}")
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def pass_ks(samples: int) -> list[int]:
    """The k of Pass@k to report: 1, 2, 4, ... below ``samples``, then ``samples``."""
    ks, k = [], 1
    while k < samples:
        ks.append(k)
        k *= 2
    return ks + [samples]


def evaluate(
    cfg: EvalConfig, *, reward: Callable[[str, str], float] = math_reward
) -> tuple[pd.DataFrame, dict]:
    """Sample ``cfg.samples`` responses per problem; write and return per-problem results.

    A response is correct when ``reward(response, answer)`` is 1 (default:
    :func:`~internal_policy_lens.data.answers.math_reward`, the last boxed answer matches).

    Writes ``results.csv`` (one row per problem: correct count, Avg@K, Pass@k), ``samples.jsonl``
    (every response with its reward) and ``metrics.json`` (the means, with the configuration).
    """
    out = Folder(cfg.out).check_writable()  # before any work
    records = read_records(cfg.data, max_samples=cfg.max_samples)
    missing = [r["line"] for r in records if r["answer"] is None]
    if missing:
        raise ValueError(f"{cfg.data}:{missing[0]}: record has no answer; ipl eval needs answers")
    done = None if cfg.force else _complete(cfg, out)
    if done is not None:
        _log.info(
            "nothing to do: %s/ holds this evaluation, complete (same configuration and data); "
            "nothing was changed, pass --force to evaluate again",
            cfg.out,
        )
        return done
    model = load_model(cfg.model, dtype=cfg.dtype, device=cfg.device)
    with out.lock():  # one writer per results folder
        return _evaluate(cfg, model, records, reward, out)


def _evaluate(cfg: EvalConfig, model, records: list[dict], reward, out: Folder):
    responses = sample(
        model,
        [r["prompt"] for r in records],
        samples=cfg.samples,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        max_new_tokens=cfg.max_new_tokens,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        keys=[r["sample_id"] for r in records],
        progress=True,
        desc="eval",
    )
    rows, lines = [], []
    for record, texts in zip(records, responses):
        rewards = [reward(t, record["answer"]) for t in texts]
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
    out.write_csv("results.csv", table)
    out.write_text("samples.jsonl", "".join(json.dumps(x) + "\n" for x in lines))
    info = {
        "metrics": metrics,
        "problems": len(table),
        "config": cfg.identity(),
        "seeding": SEEDING,
    }
    out.write_json("metrics.json", {**info, "data_sha256": sha256(cfg.data)})
    return table, metrics


def _complete(cfg: EvalConfig, out: Folder) -> tuple[pd.DataFrame, dict] | None:
    """The folder's results when it holds this evaluation (configuration and data), else None."""
    if not (out.path / "metrics.json").is_file() or not (out.path / "results.csv").is_file():
        return None
    info = out.read_json("metrics.json")
    if info.get("config") != cfg.identity() or info.get("data_sha256") != sha256(cfg.data):
        return None
    if info.get("seeding") != SEEDING:  # sampled another way: its responses differ
        return None
    return pd.read_csv(out.path / "results.csv"), info["metrics"]
