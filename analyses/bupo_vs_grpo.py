"""GRPO vs BuPO on the bundled models: same budget, several seeds, evaluated before and after.

    OMP_WAIT_POLICY=PASSIVE python analyses/bupo_vs_grpo.py --out runs/bupo_vs_grpo

Writes OUT/results.csv and OUT/results.md (held-out greedy accuracy and Avg@K before and after each
run), every run folder under OUT/, and `ipl plot-train` draws the runs' curves.
"""

import argparse
import json
from dataclasses import asdict, replace
from pathlib import Path

import pandas as pd

from internal_policy_lens.config import BupoConfig, EvalConfig
from internal_policy_lens.train.evaluate import evaluate
from internal_policy_lens.train.loop import train_bupo

parser = argparse.ArgumentParser()
parser.add_argument("--out", type=Path, default=Path("runs/bupo_vs_grpo"))
parser.add_argument("--models", nargs="+", default=["ipl-tiny-qwen2", "ipl-tiny-llama"])
parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
parser.add_argument("--steps", type=int, default=20)
parser.add_argument("--iterative-steps", type=int, default=4)
parser.add_argument(
    "--layer",
    nargs="+",
    default=["auto"],
    help="BuPO layer: auto, K, or MODEL=K per model (auto declines for a model without an FFN "
    "exploration stage)",
)
parser.add_argument("--eval-problems", type=int, default=200)
parser.add_argument("--eval-samples", type=int, default=4)
args = parser.parse_args()


def layer_of(model: str) -> str:
    given = dict(x.split("=", 1) if "=" in x else ("*", x) for x in args.layer)
    return given.get(model, given.get("*", "auto"))


def evaluated(cfg: EvalConfig) -> dict:
    """The metrics of an evaluation, read back when the same evaluation already ran."""
    done = Path(cfg.out) / "metrics.json"
    if done.exists():
        saved = json.loads(done.read_text())
        if saved["config"] == json.loads(json.dumps(asdict(cfg))):
            return saved["metrics"]
    return evaluate(cfg)[1]


def score(model: str, out: Path) -> dict:
    greedy = evaluated(
        EvalConfig(
            model=model,
            out=str(out / "greedy"),
            samples=1,
            temperature=0,
            max_samples=args.eval_problems,
        )
    )
    sampled = evaluated(
        EvalConfig(
            model=model,
            out=str(out / "sampled"),
            max_samples=args.eval_problems,
            samples=args.eval_samples,
            temperature=1.0,
        )
    )
    return {
        "greedy": greedy["avg@1"],
        f"avg@{args.eval_samples}": sampled[f"avg@{args.eval_samples}"],
        f"pass@{args.eval_samples}": sampled[f"pass@{args.eval_samples}"],
    }


rows = []
for model in args.models:
    base = score(model, args.out / model / "base")
    rows.append({"model": model, "method": "base", "seed": None, **base})
    for seed in args.seeds:
        for method, s_inter in (("GRPO", 0), ("BuPO", args.iterative_steps)):
            run = args.out / model / f"{method.lower()}-seed{seed}"
            cfg = BupoConfig(
                model=model,
                out=str(run),
                iterative_steps=s_inter,
                layer=layer_of(model),
                steps=args.steps,
                seed=seed,
                save_every=args.steps,
            )
            if not (run / "checkpoints" / f"step-{args.steps}").is_dir():
                train_bupo(replace(cfg, resume=(run / "metrics.jsonl").exists()))
            after = score(str(run / "checkpoints" / f"step-{args.steps}"), run / "eval")
            rows.append({"model": model, "method": method, "seed": seed, **after})
            print(rows[-1], flush=True)

table = pd.DataFrame(rows)
table.to_csv(args.out / "results.csv", index=False)
summary = (
    table.groupby(["model", "method"], sort=False).mean(numeric_only=True).drop(columns="seed")
)
header = "| model | method | " + " | ".join(summary.columns) + " |"
lines = [header, "| --- " * (len(summary.columns) + 2) + "|"]
lines += [
    f"| {m} | {k} | " + " | ".join(f"{v:.3f}" for v in row) + " |"
    for (m, k), row in summary.iterrows()
]
(args.out / "results.md").write_text("\n".join(lines) + "\n")
print(summary.to_string(float_format=lambda x: f"{x:.3f}"))
