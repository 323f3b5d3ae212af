"""GRPO vs BuPO vs IPA only on the bundled models: same budget, two learning rates, several seeds.

    OMP_WAIT_POLICY=PASSIVE OMP_NUM_THREADS=1 python analyses/bupo_vs_grpo.py \\
        --models ipl-tiny-qwen2 --out runs/bupo_vs_grpo      # one process per model, in parallel
    python analyses/bupo_vs_grpo.py --summary-only --out runs/bupo_vs_grpo

Per model and seed, GRPO (``--iterative-steps 0``) and BuPO (``--iterative-steps`` steps of IPA on
the suggested layer, then GRPO) are trained at every learning rate of ``--lrs``, with the
training probes on (``probes.parquet``). The held-out problems are split: the first
``--test-problems`` are the test set, the rest the validation set. Each method's learning rate is
the one with the best mean validation greedy accuracy over seeds; only the runs at the chosen
learning rates are scored on the test set (greedy, and ``--eval-samples`` samples at T=1). Then
"IPA only" (internal training for all steps, the paper's Fig. 4) runs at BuPO's chosen learning
rate.

Writes OUT/<model>/runs.csv (every run), and from whatever runs exist: OUT/results.csv and
OUT/results.md (chosen learning rates, test mean and sd over seeds), and into --figures:
bupo_vs_grpo.csv, bupo_vs_grpo.md, bupo_vs_grpo_probes.png/.pdf (reward over steps and each
probe's change since step 0, mean and min-max band over seeds). Rerunning reuses finished runs
and evaluations.
"""

import argparse
import json
from dataclasses import asdict, replace
from pathlib import Path

import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from internal_policy_lens.bundled import bundled_data
from internal_policy_lens.config import BupoConfig, EvalConfig
from internal_policy_lens.data.records import read_records
from internal_policy_lens.train.folder import read_metrics, read_probes

FIGURES = Path(__file__).resolve().parents[1] / "figures"
METHODS = ("GRPO", "BuPO", "IPA only")

parser = argparse.ArgumentParser()
parser.add_argument("--out", type=Path, default=Path("runs/bupo_vs_grpo"))
parser.add_argument("--figures", type=Path, default=FIGURES)
parser.add_argument("--models", nargs="+", default=["ipl-tiny-qwen2", "ipl-tiny-llama"])
parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
parser.add_argument("--lrs", type=float, nargs="+", default=[1e-4, 3e-5])
parser.add_argument("--steps", type=int, default=32)
parser.add_argument("--iterative-steps", type=int, default=4)
parser.add_argument("--layer", default="auto", help="BuPO layer: auto or K")
parser.add_argument("--prompts-per-step", type=int, default=4)
parser.add_argument("--group-size", type=int, default=8)
parser.add_argument("--probe-every", type=int, default=4)
parser.add_argument("--probe-samples", type=int, default=8)
parser.add_argument("--test-problems", type=int, default=200)
parser.add_argument("--val-problems", type=int, default=None, help="default: all the rest")
parser.add_argument("--eval-samples", type=int, default=4)
parser.add_argument("--no-ipa-only", action="store_true", help="skip the IPA-only runs")
parser.add_argument("--summary-only", action="store_true", help="train nothing; summarise")
args = parser.parse_args()
K = args.eval_samples


def splits() -> dict[str, str]:
    """Test and validation files of the held-out problems, written once into OUT/data."""
    folder = args.out / "data"
    folder.mkdir(parents=True, exist_ok=True)
    records = read_records(str(bundled_data("arith_heldout.jsonl")))
    parts = {
        "test": records[: args.test_problems],
        "val": records[args.test_problems :][: args.val_problems],
    }
    paths = {}
    for name, rows in parts.items():
        path = folder / f"{name}.jsonl"
        text = "".join(json.dumps(r) + "\n" for r in rows)
        if not path.is_file() or path.read_text() != text:
            path.write_text(text)
        paths[name] = str(path)
    return paths


def evaluated(cfg: EvalConfig) -> dict:
    """The metrics of an evaluation, read back when the same evaluation already ran."""
    from internal_policy_lens.train.evaluate import evaluate

    done = Path(cfg.out) / "metrics.json"
    if done.exists():
        saved = json.loads(done.read_text())
        if saved["config"] == json.loads(json.dumps(asdict(cfg))):
            return saved["metrics"]
    return evaluate(cfg)[1]


def score(model: str, out: Path, data: dict[str, str], test: bool = True) -> dict:
    """Validation greedy accuracy, and with ``test`` the test set's greedy, Avg@K and Pass@K."""

    def run(split, name, samples, temperature):
        cfg = EvalConfig(model=model, data=data[split], out=str(out / name), samples=samples)
        return evaluated(replace(cfg, temperature=temperature))

    scores = {"val_greedy": run("val", "val-greedy", 1, 0)["avg@1"]}
    if test:
        sampled = run("test", "sampled", K, 1.0)
        scores["greedy"] = run("test", "greedy", 1, 0)["avg@1"]
        scores[f"avg@{K}"] = sampled[f"avg@{K}"]
        scores[f"pass@{K}"] = sampled[f"pass@{K}"]
    return scores


def train(
    model: str, method: str, lr: float, seed: int, data: dict[str, str], test: bool = False
) -> dict:
    """Train one run (or reuse it) and score it: validation only, unless ``test``."""
    from internal_policy_lens.train.loop import train_bupo

    inter = {"GRPO": 0, "BuPO": args.iterative_steps, "IPA only": args.steps}[method]
    run = args.out / model / f"{method.lower().replace(' ', '-')}-lr{lr:g}-seed{seed}"
    cfg = BupoConfig(
        model=model,
        out=str(run),
        iterative_steps=inter,
        layer=args.layer,
        steps=args.steps,
        seed=seed,
        lr=lr,
        prompts_per_step=args.prompts_per_step,
        group_size=args.group_size,
        probe_every=args.probe_every,
        probe_samples=args.probe_samples,
        save_every=args.steps,
    )
    if not (run / "checkpoints" / f"step-{args.steps}").is_dir():
        train_bupo(replace(cfg, resume=(run / "metrics.jsonl").exists()), progress=False)
    after = score(str(run / "checkpoints" / f"step-{args.steps}"), run / "eval", data, test)
    row = {"model": model, "method": method, "lr": lr, "seed": seed, "run": str(run), **after}
    print(row, flush=True)
    return row


def chosen_lrs(rows: pd.DataFrame) -> pd.Series:
    """Per (model, method): the learning rate with the best mean validation greedy accuracy."""
    trained = rows[rows["method"] != "base"]
    means = trained.groupby(["model", "method", "lr"])["val_greedy"].mean().reset_index()
    best = means.loc[means.groupby(["model", "method"])["val_greedy"].idxmax()]
    return best.set_index(["model", "method"])["lr"]


def train_model(model: str, data: dict[str, str]) -> None:
    """Every run of one model; the test set only scores the chosen learning rates."""
    path = args.out / model / "runs.csv"
    base = {"model": model, "method": "base", **score(model, args.out / model / "base", data)}
    rows = []
    for seed in args.seeds:
        for lr in args.lrs:
            for method in ("GRPO", "BuPO"):
                rows.append(train(model, method, lr, seed, data))
                pd.DataFrame([base, *rows]).to_csv(path, index=False)
    lrs = chosen_lrs(pd.DataFrame(rows))
    rows = [
        train(model, r["method"], r["lr"], r["seed"], data, test=True)
        if lrs[(model, r["method"])] == r["lr"]
        else r
        for r in rows
    ]
    pd.DataFrame([base, *rows]).to_csv(path, index=False)
    if not args.no_ipa_only:
        for seed in args.seeds:
            rows.append(train(model, "IPA only", lrs[(model, "BuPO")], seed, data, test=True))
            pd.DataFrame([base, *rows]).to_csv(path, index=False)


def summarise() -> pd.DataFrame:
    frames = [pd.read_csv(p) for p in sorted(args.out.glob("*/runs.csv"))]
    if not frames:
        raise SystemExit(f"{args.out}: no runs.csv yet")
    rows = pd.concat(frames, ignore_index=True)
    rows.to_csv(args.out / "results.csv", index=False)
    lrs = chosen_lrs(rows)
    keep = [r.method == "base" or lrs.get((r.model, r.method)) == r.lr for r in rows.itertuples()]
    chosen = rows[keep]
    columns = ["greedy", f"avg@{K}", f"pass@{K}"]
    grouped = chosen.groupby(["model", "method"], sort=False)
    table = grouped[columns].agg(["mean", "std"])
    table[("seeds", "n")] = grouped.size()
    lines = [
        "| model | method | lr | seeds | " + " | ".join(columns) + " |",
        "| --- " * (len(columns) + 4) + "|",
    ]
    for (model, method), row in table.iterrows():
        lr = "" if method == "base" else f"{lrs[(model, method)]:g}"
        cells = [
            f"{row[(c, 'mean')]:.3f}"
            + ("" if pd.isna(row[(c, "std")]) else f" ± {row[(c, 'std')]:.3f}")
            for c in columns
        ]
        seeds = int(row[("seeds", "n")]) if method != "base" else ""
        lines.append(f"| {model} | {method} | {lr} | {seeds} | " + " | ".join(cells) + " |")
    means = rows[rows["method"] != "base"].groupby(["model", "method", "lr"])
    lines += [
        "",
        "Validation greedy accuracy (mean over seeds) per learning rate, which chose the lr:",
        "",
        "| model | method | " + " | ".join(f"lr {lr:g}" for lr in args.lrs) + " |",
        "| --- " * (len(args.lrs) + 2) + "|",
    ]
    by_lr = means["val_greedy"].mean().unstack("lr")
    for (model, method), row in by_lr.iterrows():
        cells = [f"{row.get(lr, float('nan')):.3f}" for lr in args.lrs]
        lines.append(f"| {model} | {method} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    (args.out / "results.md").write_text(text)
    args.figures.mkdir(parents=True, exist_ok=True)
    (args.figures / "bupo_vs_grpo.md").write_text(text)
    rows.drop(columns="run").to_csv(args.figures / "bupo_vs_grpo.csv", index=False)
    print(text)
    probe_figure(chosen[chosen["method"] != "base"])
    return rows


PANELS = (
    ("reward", "reward (rollouts, mean of 4 steps)"),
    ("cos_hidden", "Δ cos(H^k, H^L-1)"),
    ("delta_ffn", "Δ (ΔH of layer k's FFN) (nats)"),
    ("kl_layer_other", "Δ KL(π^k ‖ π^L-1) (nats)"),
    ("perplexity", "Δ perplexity of π_θ (probe set)"),
)


def probe_figure(runs: pd.DataFrame) -> None:
    """One row per model: reward and probes over steps, one colour per method, seed band.

    Each probe is drawn as its change since the run's step 0: every seed has its own probe set,
    whose starting values differ far more than training moves them.
    """
    models = list(dict.fromkeys(runs["model"]))
    colours = dict(zip(METHODS, sns.color_palette("colorblind", len(METHODS))))
    fig = Figure(figsize=(11, 2.3 * len(models) + 0.5), layout="constrained")
    fig.set_facecolor("white")
    grid = fig.subplots(len(models), len(PANELS), squeeze=False)
    for row, model in zip(grid, models):
        for method, group in runs[runs["model"] == model].groupby("method", sort=False):
            curves = {name: [] for name, _ in PANELS}
            for run in group["run"]:
                reward = read_metrics(run).set_index("step")["reward_mean"]
                curves["reward"].append(reward.rolling(4, min_periods=1).mean())
                probes, k = read_probes(run)
                last = probes["other_layer"].max()
                for name, _ in PANELS[1:]:
                    rows = probes[probes["quantity"] == name]
                    if name == "delta_ffn":
                        rows = rows[rows["layer"] == k]
                    elif name != "perplexity":
                        rows = rows[rows["other_layer"] == last]
                    values = rows.set_index("step")["value"].sort_index()
                    curves[name].append(values - values.iloc[0])  # change since step 0
            for ax, (name, label) in zip(row, PANELS):
                frame = pd.concat(curves[name], axis=1)
                colour = colours[method]
                ax.plot(frame.index, frame.mean(axis=1), color=colour, label=method)
                ax.fill_between(
                    frame.index, frame.min(axis=1), frame.max(axis=1), color=colour, alpha=0.2
                )
                ax.set_xlabel("step")
                ax.set_ylabel(label, fontsize=7)
        row[0].set_title(model, loc="left", fontsize=8)
    grid[0][0].legend(fontsize=7, title="mean, min-max over seeds", title_fontsize=6)
    for suffix in ("png", "pdf"):
        fig.savefig(args.figures / f"bupo_vs_grpo_probes.{suffix}", dpi=150)


if args.summary_only:
    summarise()
else:
    data = splits()
    for model in args.models:
        train_model(model, data)
    summarise()
