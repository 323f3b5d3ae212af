"""Forking tokens, right vs wrong, two checkpoints: the README's answers, measured.

    OMP_NUM_THREADS=1 python analyses/splits_answers.py [--out runs/answers] [--figures figures]

(a) ``ipl entropy --extras`` on the bundled held-out problems (generated responses,
    ``--max-samples``) for both bundled models; each run split by ``forking`` and by
    ``correctness`` and resampled (``--resamples`` responses, seed 0): each group's abruptness
    and drop depths with 95% intervals, and the difference between the groups (forking - other,
    right - wrong) with the interval of the paired resamples (both groups from the same draws of
    responses). For correctness, the layers whose mean entropy difference lies outside its
    interval, per site.
(b) ``ipl train-bupo`` from ``ipl-tiny-qwen2``: GRPO (``--iterative-steps 0``), BuPO (the
    default 5 IPA steps) and IPA only (IPA for every step), then ``ipl diff`` of the base model
    against each final checkpoint on the qwen2 run's responses: KL per layer of the residual
    stream's policy, both directions, with 95% intervals (responses resampled, the same draws
    for every method), and IPA - GRPO per layer.
(c) ``runs/real/`` (``analyses/real_models.py``): its runs join (a) when they exist.

Every command is rerun as written (a complete entropy run is left as it is) except a training
run whose final checkpoint exists, so a second call reads and diffs again (about a minute).
Prints the markdown (also written to ``FIGURES/splits_answers.md``) and writes
``FIGURES/splits_answers_{forking,correctness}_{raw,norm}.png`` and ``splits_answers_diff.png``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from internal_policy_lens.analysis.convergence import DROP_SHARES, curve_rows, drop_depths_array
from internal_policy_lens.analysis.files import DPI
from internal_policy_lens.analysis.split_figures import SPLIT_PANELS, split_curves
from internal_policy_lens.analysis.splits import Split, split_run
from internal_policy_lens.analysis.uncertainty import Resampled, resample
from internal_policy_lens.runs.io import open_run
from internal_policy_lens.tables.frames import grouped_moments

MODELS = ("ipl-tiny-qwen2", "ipl-tiny-llama")
LENSES = ("raw", "norm")
LENSES = ("raw", "norm")
METHODS = {"GRPO": "0", "BuPO": "5", "IPA only": None}  # None: IPA for every step
MEASURES = (
    "abruptness",
    "drop_depth_50",
    "drop_depth_90",
    "kl_depth_50",
    "kl_depth_90",
    "entropy_final",
)
SITES = ("attn_out", "mlp_out", "resid_post")
"""Sites whose per-layer entropy differences are listed (resid_pre[l] is resid_post[l - 1])."""
KL_PANELS = (
    ("kl_a_b", "resid_post", "KL(base ‖ trained), resid_post (nats)"),
    ("kl_b_a", "resid_post", "KL(trained ‖ base), resid_post (nats)"),
)


def ipl(*args: str) -> None:
    """Run an ``ipl`` command in a fresh process (a complete run folder is left as it is)."""
    command = [sys.executable, "-m", "internal_policy_lens.cli", *args, "--quiet"]
    print("$ ipl " + " ".join(args), file=sys.stderr)
    subprocess.run(command, check=True, env={"OMP_NUM_THREADS": "1", **os.environ})


def save(fig, stem: Path) -> None:
    """``stem.png`` (the README shows PNGs; ``ipl`` commands write PDFs too)."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(stem.with_suffix(".png"), dpi=DPI)


def interval(value: float, values: np.ndarray) -> str:
    """``value [2.5%, 97.5%]`` of the resampled ``values`` (NaN resamples left out)."""
    if np.isnan(value):
        return "n/a"
    low, high = np.nanpercentile(values, [2.5, 97.5])
    return f"{value:.3g} [{low:.3g}, {high:.3g}]"


def outside(values: np.ndarray) -> bool:
    low, high = np.nanpercentile(values, [2.5, 97.5])
    return bool(low > 0 or high < 0)


def kl_depths(found: Resampled, n_layers: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Drop depths of each group's mean KL(internal ‖ final) curve: on the run, per resample.

    The entropy's definitions (``analysis.convergence``) on the KL curve of the residual stream:
    where the internal policy becomes the model's own, whatever its entropy. Returns the point
    (one row per group) and the resamples (``group, resample`` rows), columns ``kl_depth_*``.
    """
    keys, summary = found.keys, found.split.summary()
    points, resampled = [], []
    for group in found.split.groups:
        mine = np.flatnonzero((keys.group == group) & (keys.quantity == "kl_internal_final"))
        base = keys.iloc[mine].assign(quantity="entropy").reset_index(drop=True)
        depth, rows = curve_rows(base, n_layers)
        means = summary[(summary.group == group) & (summary.quantity == "kl_internal_final")]
        point = base.iloc[rows].merge(means, on=["layer", "name"], how="left")["mean"]
        columns = [f"kl_depth_{round(q * 100)}" for q in DROP_SHARES]
        one = drop_depths_array(depth, point.to_numpy()[None, :])
        every = drop_depths_array(depth, found.means[:, mine[rows]])
        points.append(pd.DataFrame(one, columns=columns).assign(group=group))
        frame = pd.DataFrame(every, columns=columns)
        resampled.append(frame.assign(group=group, resample=np.arange(len(frame))))
    return pd.concat(points), pd.concat(resampled)


def group_rows(name: str, found: Resampled, n_layers: int) -> list[str]:
    """One markdown row per group, then the paired difference of the first two groups."""
    point_kl, stats_kl = kl_depths(found, n_layers)
    point = found.point.merge(point_kl, on="group").set_index("group")
    stats = found.stats.merge(stats_kl, on=["group", "resample"])
    stats = stats.set_index(["group", "resample"])
    groups = found.split.groups
    rows = []
    for group in groups:
        mine = stats.loc[group]
        cells = [interval(point.loc[group, m], mine[m].to_numpy()) for m in MEASURES]
        tokens = f"{found.split.tokens[group]:,}"
        rows.append(
            f"| {name} | {group} | {tokens} | {' | '.join(cells)} | {point.loc[group, 'shape']} |"
        )
    if len(groups) < 2:  # e.g. no response of the run has a checkable answer
        rows.append(f"| {name} | (one group only: no difference) | | |" + " |" * len(MEASURES))
        return rows
    first, second = groups[:2]
    cells = []
    for m in MEASURES:
        paired = (stats.loc[first, m] - stats.loc[second, m]).to_numpy()
        text = interval(point.loc[first, m] - point.loc[second, m], paired)
        cells.append(f"**{text}**" if outside(paired) and text != "n/a" else text)
    rows.append(f"| {name} | {first} − {second} | | {' | '.join(cells)} | |")
    return rows


def layers_outside(found: Resampled, first: str, second: str, quantity: str, site: str) -> str:
    """The layers whose paired mean difference (first - second) excludes 0, signed: ``2+ 5−``."""
    keys = found.keys
    mine = (keys.quantity == quantity) & (keys.name == site)
    out = []
    for layer in sorted(keys[mine].layer.unique()):
        column = {
            g: np.flatnonzero(mine & (keys.layer == layer) & (keys.group == g))
            for g in (first, second)
        }
        if all(len(c) for c in column.values()):
            diff = found.means[:, column[first][0]] - found.means[:, column[second][0]]
            if outside(diff):
                out.append(f"{int(layer)}{'+' if np.nanmean(diff) > 0 else '−'}")
    return " ".join(out) or "none"


def part_a(runs: dict[str, Path], resamples: int, figures: Path) -> list[str]:
    """The table of (a), the layers outside the intervals; a figure per split and lens."""
    head = " | ".join(MEASURES)
    lines = [
        f"| run | group | tokens | {head} | shape |",
        "|" + " --- |" * (len(MEASURES) + 4),
    ]
    columns = [f"H({site})" for site in SITES] + ["KL-to-final(resid_post)"]
    outside_lines = [
        f"| run | difference | {' | '.join(columns)} |",
        "|" + " --- |" * (len(columns) + 2),
    ]
    thresholds = []
    frames = {}
    for name, path in runs.items():
        run = open_run(path)
        for split in ("forking", "correctness"):
            found = resample(split_run(run, split), run.n_layers, resamples=resamples, seed=0)
            lines += group_rows(name, found, run.n_layers)
            summary = found.summary()
            frames.setdefault((split, run.lens), []).append(
                summary.assign(group=run.name + ": " + summary.group)
            )
            if split == "forking":
                thresholds.append(f"{name} {found.split.threshold:.4g}")
            if len(found.split.groups) < 2:
                continue
            first, second = found.split.groups[:2]
            cells = [layers_outside(found, first, second, "entropy", site) for site in SITES]
            cells.append(layers_outside(found, first, second, "kl_internal_final", "resid_post"))
            outside_lines.append(f"| {name} | {first} − {second} | {' | '.join(cells)} |")
    for (split, lens), parts in frames.items():
        fig = split_curves(pd.concat(parts), panels=SPLIT_PANELS, title=f"{lens} lens, by {split}")
        save(fig, figures / f"splits_answers_{split}_{lens}")
    told = (
        "Layers whose mean difference lies outside its 95% interval (paired resamples), with "
        "its sign:"
    )
    cut = "Forking threshold, H(final) in nats: " + ", ".join(thresholds) + "."
    return [*lines, "", cut, "", told, "", *outside_lines]


def train_and_diff(out: Path, steps: int, entropy_run: Path) -> dict[str, Path]:
    """The three training runs and their diffs against the base model; the diff folders."""
    diffs = {}
    for method, iterative in METHODS.items():
        short = method.split()[0].lower()
        train = out / f"train-{short}"
        final = train / "checkpoints" / f"step-{steps}"
        if final.is_dir():  # trained already (delete the folder to train again)
            print(f"{final} exists: not trained again", file=sys.stderr)
        else:
            ipl(
                "train-bupo", "--model", MODELS[0], "--out", str(train), "--steps", str(steps),
                "--iterative-steps", iterative or str(steps), "--prompts-per-step", "4",
                "--group-size", "8", "--mini-batch-size", "32", "--save-every", str(steps),
            )  # fmt: skip
        diffs[method] = out / f"diff-{short}"
        ipl(
            "diff", "--model", MODELS[0], "--model-b", str(final),
            "--data", str(entropy_run / "responses.jsonl"), "--out", str(diffs[method]),
        )  # fmt: skip
    return diffs


def diff_split(diffs: dict[str, Path]) -> Split:
    """Each diff's per-sample KL moments as one split, a group per method (paired draws).

    The diffs read the same responses, so one draw of responses weighs every method alike.
    """
    parts, tokens = [], {}
    for method, folder in diffs.items():
        columns = ["sample_id", "position", "layer", "site", "kl_a_b", "kl_b_a"]
        table = pq.read_table(folder / "tokens.parquet", columns=columns).to_pandas()
        for quantity in ("kl_a_b", "kl_b_a"):
            keys = [table["sample_id"], table["layer"], table["site"].astype(str)]
            moments = grouped_moments(table[quantity], keys).rename(columns={"site": "name"})
            parts.append(moments.assign(group=method, quantity=quantity))
        tokens[method] = len(table.drop_duplicates(["sample_id", "position"]))
    columns = ["group", "sample_id", "quantity", "layer", "name", "count", "mean", "m2"]
    samples = pd.concat(parts, ignore_index=True)[columns]
    return Split("method", list(diffs), None, None, tokens, samples)


def part_b(diffs: dict[str, Path], resamples: int, figures: Path) -> list[str]:
    found = resample(diff_split(diffs), 8, resamples=resamples, seed=0)
    keys, means = found.keys, found.means
    summary = found.summary()
    save(
        split_curves(summary, panels=KL_PANELS, title="ipl-tiny-qwen2: base vs trained"),
        figures / "splits_answers_diff",
    )
    layers = sorted(keys[keys.name == "resid_post"].layer.unique())
    lines = [
        "| method | direction | " + " | ".join(f"layer {int(x)}" for x in layers) + " | final |",
        "|" + " --- |" * (len(layers) + 3),
    ]

    def column(method, quantity, site, layer=None):
        mine = (keys.group == method) & (keys.quantity == quantity) & (keys.name == site)
        if layer is not None:
            mine &= keys.layer == layer
        return np.flatnonzero(mine)[0]

    point = summary.set_index(["group", "quantity", "name", "layer"])["mean"]
    for method in diffs:
        for quantity, told in (("kl_a_b", "KL(base ‖ trained)"), ("kl_b_a", "KL(trained ‖ base)")):
            cells = [
                interval(
                    point[method, quantity, "resid_post", x],
                    means[:, column(method, quantity, "resid_post", x)],
                )
                for x in layers
            ]
            final_layer = keys[(keys.name == "final")].layer.max()
            cells.append(
                interval(
                    point[method, quantity, "final", final_layer],
                    means[:, column(method, quantity, "final")],
                )
            )
            lines.append(f"| {method} | {told} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| IPA only − | direction | " + " | ".join(f"layer {int(x)}" for x in layers) + " |",
        "|" + " --- |" * (len(layers) + 2),
    ]
    for other in ("GRPO", "BuPO"):
        for quantity, told in (("kl_a_b", "KL(base ‖ trained)"), ("kl_b_a", "KL(trained ‖ base)")):
            cells = []
            for x in layers:
                paired = (
                    means[:, column("IPA only", quantity, "resid_post", x)]
                    - means[:, column(other, quantity, "resid_post", x)]
                )
                value = (
                    point["IPA only", quantity, "resid_post", x]
                    - point[other, quantity, "resid_post", x]
                )
                text = interval(value, paired)
                cells.append(f"**{text}**" if outside(paired) else text)
            lines.append(f"| {other} | {told} | " + " | ".join(cells) + " |")
    lines.append("")
    top = summary[(summary.quantity == "kl_a_b") & (summary.name == "resid_post")]
    for method in diffs:
        mine = top[top.group == method].nlargest(3, "mean")
        moved = ", ".join(f"{int(r.layer)} ({r.mean:.3g})" for r in mine.itertuples())
        lines.append(f"- {method}: largest KL(base ‖ trained) of resid_post at layers {moved}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/answers"))
    parser.add_argument("--figures", type=Path, default=Path("figures"))
    parser.add_argument("--max-samples", type=int, default=64)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--real", type=Path, default=Path("runs/real"))
    args = parser.parse_args()
    runs = {}
    for model in MODELS:
        for lens in LENSES:
            name = f"{model} ({lens})"
            folder = f"entropy-{model.rsplit('-', 1)[1]}" + ("" if lens == "raw" else f"-{lens}")
            runs[name] = args.out / folder
            ipl(
                "entropy", "--model", model, "--lens", lens, "--out", str(runs[name]),
                "--extras", "--max-samples", str(args.max_samples),
            )  # fmt: skip
    real = sorted(p.parent for p in args.real.glob("*/tokens.parquet"))
    runs |= {f"real: {p.name}": p for p in real}
    lines = ["### (a) Forking tokens and right vs wrong", ""]
    lines += part_a(runs, args.resamples, args.figures)
    if not real:
        lines += [
            "",
            f"Real weights: not run ({args.real}/ holds no run). "
            "`python analyses/real_models.py --stages fetch,identities,entropy,compare,figures` "
            "writes the runs; this script then adds them to the table.",
        ]
    diffs = train_and_diff(args.out, args.steps, runs[f"{MODELS[0]} (raw)"])
    lines += ["", "### (b) Two checkpoints: base vs trained", ""]
    lines += part_b(diffs, args.resamples, args.figures)
    text = "\n".join(lines) + "\n"
    (args.figures / "splits_answers.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
