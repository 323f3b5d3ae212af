"""Training curves of one or several ``ipl train-bupo`` runs (reward, accuracy, entropy, length)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from ..plots import TEXT_WIDTH, _styled

PANELS = (
    ("reward_mean", "mean reward"),
    ("accuracy", "accuracy (reward = 1)"),
    ("entropy_policy", "H(π_θ), sampled tokens (nats)"),
    ("entropy_internal", "H(π^k), sampled tokens (nats)"),
    ("response_length", "response length (tokens)"),
)


def read_metrics(run: str | Path) -> pd.DataFrame:
    """A run folder's ``metrics.jsonl`` as a DataFrame (one row per step)."""
    path = Path(run) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics; is {run} a folder of ipl train-bupo?")
    lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    if not lines:
        raise ValueError(f"{path}: no step has finished yet")
    return pd.DataFrame(lines)


@_styled
def training_curves(runs: dict[str, pd.DataFrame]) -> Figure:
    """Reward, accuracy, entropies and response length against step, one colour per run.

    A dotted vertical line marks each run's switch from IPA to GRPO (its first ``grpo`` step).
    """
    import seaborn as sns

    colours = dict(zip(runs, sns.color_palette("colorblind", len(runs))))
    fig = Figure(figsize=(TEXT_WIDTH, 4.2), layout="constrained", facecolor="white")
    axes = fig.subplots(2, 3).ravel()
    for ax, (column, label) in zip(axes, PANELS):
        for name, frame in runs.items():
            ax.plot(frame["step"], frame[column], color=colours[name], label=name)
            switch = frame.loc[frame["phase"] == "grpo", "step"]
            if (frame["phase"] == "ipa").any() and len(switch):
                ax.axvline(switch.iloc[0] - 0.5, color=colours[name], linestyle=":", linewidth=1)
        ax.set_xlabel("step")
        ax.set_ylabel(label)
    axes[-1].axis("off")
    handles, labels = axes[0].get_legend_handles_labels()
    axes[-1].legend(handles, labels, loc="center", title="run (dotted: IPA → GRPO switch)")
    return fig
