"""Figures and the convergence table of the real-model runs (analyses/real_models.py).

Reads only the run folders' summary.csv and run.json; writes figures/real_*.png and
OUT/convergence.csv, and prints the table the README quotes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from internal_policy_lens.analysis.convergence import (  # noqa: E402
    convergence_summary,
    drop_depths,
    drop_shape,
)
from internal_policy_lens.config import ConvergenceConfig  # noqa: E402
from internal_policy_lens.runs.io import RunFolder  # noqa: E402

LENSES = ("raw", "norm", "tuned")
COLOURS = {"raw": "tab:red", "norm": "tab:blue", "tuned": "tab:green"}
STAGE_COLOURS = {"exploration": "#f4cccc", "integration": "#eeeeee", "convergence": "#cfe2f3"}
NAMES = {"qwen": "Qwen2.5-Coder-0.5B-Instruct (Q4_K_M)", "smollm2": "SmolLM2-135M-Instruct (Q4_1)"}


def _runs(out: Path, models: list[str]) -> dict[tuple[str, str, str], tuple[pd.DataFrame, dict]]:
    """{(model, responses, lens): (summary, run.json)} for every finished run folder."""
    runs = {}
    for model in models:
        for responses in ("greedy", "sampled"):
            for lens in LENSES:
                folder = out / f"{model}-{responses}-{lens}"
                if (folder / "summary.csv").is_file():
                    info = json.loads((folder / "run.json").read_text())
                    runs[model, responses, lens] = (pd.read_csv(folder / "summary.csv"), info)
    return runs


def _entropy(summary: pd.DataFrame, name: str) -> pd.Series:
    rows = summary[(summary["quantity"] == "entropy") & (summary["name"] == name)]
    return rows.set_index("layer")["mean"].sort_index()


def kl_convergence(folder: Path, n_layers: int) -> dict:
    """Drop depths and shape of the mean KL(internal || final) of the residual stream.

    The same definitions as the entropy's (analysis.convergence), applied to the KL curve: where
    the internal policy becomes the model's own, which entropy alone cannot tell when an
    internal policy is confident and wrong.
    """
    columns = ["layer", "site", "kl_internal_final"]
    tokens = RunFolder(folder).tokens(columns=columns)  # older runs' names read as today's
    means = tokens.groupby(["site", "layer"], observed=True)["kl_internal_final"].mean()
    rows = [("entropy", 0, "resid_pre", means["resid_pre", 0])]
    rows += [("entropy", lay, "resid_post", means["resid_post", lay]) for lay in range(n_layers)]
    curve = pd.DataFrame(rows, columns=["quantity", "layer", "name", "mean"])
    depths = drop_depths(curve, n_layers)
    shape = drop_shape(depths, rows[0][3] - rows[-1][3], ConvergenceConfig())
    return {"kl_start": rows[0][3], **{f"kl_depth_{q}": x for q, x in zip((10, 50, 90), depths)},
            "kl_shape": shape}  # fmt: skip


def convergence_table(runs, out: Path) -> pd.DataFrame:
    """One row per run: tokens, final entropy, the abruptness label, drop depths, shape, stages."""
    rows = []
    for (model, responses, lens), (summary, info) in runs.items():
        conv = convergence_summary(summary, info["model"]["n_layers"])
        final = _entropy(summary, "final")
        tokens = summary[(summary["quantity"] == "entropy") & (summary["name"] == "final")]
        rows.append(
            {
                "model": model,
                "responses": responses,
                "lens": lens,
                "samples": info.get("samples"),
                "tokens": int(tokens["count"].iloc[0]),
                "final_entropy": float(final.iloc[0]),
                **conv.row(),
                **kl_convergence(out / f"{model}-{responses}-{lens}", conv.n_layers),
            }
        )
    return pd.DataFrame(rows)


def entropy_flow(runs, models: list[str]):
    """Mean H(resid_post) against relative depth, one panel per model, one line per lens."""
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        for lens in LENSES:
            if (model, "greedy", lens) not in runs:
                continue
            summary, info = runs[model, "greedy", lens]
            n = info["model"]["n_layers"]
            post = _entropy(summary, "resid_post")
            depth = np.concatenate([[0.0], (post.index.to_numpy() + 1) / n])
            values = np.concatenate([[_entropy(summary, "resid_pre").iloc[0]], post.to_numpy()])
            ax.plot(depth, values, "o-", ms=3, color=COLOURS[lens], label=f"{lens} lens")
        ax.axhline(np.log(info["model"]["vocab_size"]), color="grey", ls=":", label="log |V|")
        final = _entropy(runs[model, "greedy", "raw"][0], "final").iloc[0]
        ax.axhline(final, color="black", ls="--", label=f"final policy ({final:.2f})")
        ax.set(title=NAMES[model], xlabel="relative depth (layer + 1) / L", ylabel="entropy (nats)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def ffn_stages(runs, models: list[str]):
    """Mean FFN entropy change per layer, shaded by the paper's stages; models x lenses run."""
    lenses = [lens for lens in LENSES if any((m, "greedy", lens) in runs for m in models)]
    fig, axes = plt.subplots(len(models), len(lenses), figsize=(5 * len(lenses), 3.4 * len(models)))
    axes = np.atleast_2d(axes)
    for row, model in enumerate(models):
        for col, lens in enumerate(lenses):
            ax = axes[row, col]
            if (model, "greedy", lens) not in runs:
                ax.set_axis_off()
                continue
            summary, info = runs[model, "greedy", lens]
            conv = convergence_summary(summary, info["model"]["n_layers"])
            for stage, span in conv.stages.items():
                if span is not None:
                    lo, hi = span[0] - 0.5, span[1] + 0.5
                    ax.axvspan(lo, hi, color=STAGE_COLOURS[stage], label=stage)
            curve = conv.ffn_delta
            ax.bar(curve.index, curve.to_numpy(), color=COLOURS[lens])
            ax.axhline(0, color="black", lw=0.6)
            layer = conv.suggestion.layer
            ax.set(
                title=f"{model}, {lens} lens: suggested layer {layer}",
                xlabel="layer (0-based)",
                ylabel="mean FFN dH (nats)",
            )
            if row == 0 and col == 0:
                ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def write_figures(out: Path, figures: Path, models: list[str]) -> pd.DataFrame:
    """Write figures/real_*.png and OUT/convergence.csv; print the table."""
    runs = _runs(out, models)
    table = convergence_table(runs, out)
    table.to_csv(out / "convergence.csv", index=False)
    shown = models if all((m, "greedy", "raw") in runs for m in models) else []
    if shown:
        entropy_flow(runs, shown).savefig(figures / "real_entropy_flow.png", dpi=120)
        ffn_stages(runs, shown).savefig(figures / "real_ffn_stages.png", dpi=120)
    for lens in LENSES:
        comparison = out / f"compare-{lens}" / "comparison.png"
        if comparison.is_file():
            shutil.copyfile(comparison, figures / f"real_compare_{lens}.png")
    for model in models:
        heatmap = out / f"{model}-greedy-norm" / "figures" / "token_heatmap.png"
        if heatmap.is_file():
            shutil.copyfile(heatmap, figures / f"real_logit_lens_{model}.png")
    columns = ["model", "responses", "lens", "tokens", "final_entropy", "entropy_start"]
    columns += ["entropy_end", "abruptness", "label", "drop_depth_10", "drop_depth_50"]
    columns += ["drop_depth_90", "shape", "exploration", "integration", "convergence"]
    columns += ["suggested_layer", "kl_start", "kl_depth_10", "kl_depth_50", "kl_depth_90"]
    columns += ["kl_shape"]
    with pd.option_context("display.width", 250, "display.max_columns", 30):
        print(table[columns].round(3).to_string(index=False))
    return table
