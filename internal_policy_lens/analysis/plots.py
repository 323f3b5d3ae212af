"""Figures from the tidy tables: a DataFrame in, a matplotlib Figure out.

Functions here never save, never load a model and never import torch; saving belongs to
``internal_policy_lens.analysis.figures`` (run folders), the CLI and ``analyses/``. Figures are
sized for a two-column paper (one column: 3.4 in, full width: 7 in) with 7-8 pt text, the seaborn
``colorblind`` palette (Okabe-Ito hues), constrained layout and a white background. Each site keeps
its colour in every figure, and a module shares the colour of its output site.
"""

from __future__ import annotations

import functools
import math

import matplotlib as mpl
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ..lens_kinds import LENSES
from ..statistics import STATISTICS, opt_in

COLUMN_WIDTH = 3.4
TEXT_WIDTH = 7.0
FLOW_SITES: tuple[str, ...] = ("resid_pre", "attn_out", "mlp_out", "resid_post")
_CB = sns.color_palette("colorblind")
SITE_COLOURS = {
    "resid_pre": _CB[7],
    "attn_out": _CB[0],
    "mlp_out": _CB[1],
    "resid_post": _CB[2],
    "final": _CB[3],
}
MODULE_LABELS = {
    "attn": ("attention: H(attn_out) − H(attn_in)", SITE_COLOURS["attn_out"]),
    "ffn": ("FFN: H(mlp_out) − H(mlp_in)", SITE_COLOURS["mlp_out"]),
    "layer": ("layer: H(resid_post) − H(resid_pre)", SITE_COLOURS["resid_post"]),
}
_STAGE_SHADES = {
    "exploration": ("FFN exploration stage (ΔH > {tau})", ""),
    "convergence": ("FFN convergence stage (ΔH < −{tau})", "///"),
}
SPREADS = {
    "std": "band: mean ± 1 s.d. over tokens",
    "iqr": "band: 25th–75th percentile over tokens",
}
"""Bands around a per-layer mean; ``iqr`` is the default (a s.d. band of entropies, which
cannot be negative, reaches below zero for skewed distributions; quantiles stay in range).
"""
PANELS = (
    ("reward_mean", "mean reward"),
    ("accuracy", "accuracy (reward = 1)"),
    ("entropy_policy", "H(π_θ), sampled tokens (nats)"),
    ("entropy_internal", "H(π^k), sampled tokens (nats)"),
    ("response_length", "response length (tokens)"),
)
"""Panels of :func:`training_curves`: a ``metrics.jsonl`` column and its axis label."""
_STYLE = {
    "font.size": 8,
    "axes.labelsize": 8,
    "axes.titlesize": 8,
    "legend.fontsize": 7,
    "legend.title_fontsize": 7,
    "legend.frameon": False,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "lines.linewidth": 1.3,
    "lines.markersize": 3,
}


def styled(fn):
    """Build the figure under the house style (text sizes are read when artists are made)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with mpl.rc_context(_STYLE):
            return fn(*args, **kwargs)

    return wrapper


def new_figure(width: float, height: float, ncols: int = 1):
    """A house-style figure of ``ncols`` axes side by side: ``(fig, axes)``."""
    fig = Figure(figsize=(width, height), layout="constrained", facecolor="white")
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    for ax in axes:
        ax.set_facecolor("white")
        ax.tick_params(labelsize=7)  # ticks are made lazily, after the rc context is gone
    return fig, axes


def band(frame: pd.DataFrame, by: str, value: str, spread: str, center: str = "mean"):
    """Per ``by`` group: the centre line and the band's low and high edges.

    ``center`` is ``mean`` or ``median``; ``spread`` is ``iqr`` (25th and 75th percentiles) or
    ``std`` (± 1 s.d.).
    """
    if spread not in SPREADS:
        raise ValueError(f"unknown spread '{spread}'; use one of {', '.join(SPREADS)}")
    grouped = frame.groupby(by, observed=True)[value]
    mid = grouped.mean() if center == "mean" else grouped.median()
    if spread == "std":
        std = grouped.std().fillna(0.0)
        return mid, mid - std, mid + std
    return mid, grouped.quantile(0.25), grouped.quantile(0.75)


def _line(ax, stats, colour, label, marker="o"):
    mid, lo, hi = stats
    ax.plot(mid.index, mid.to_numpy(), color=colour, marker=marker, label=label)
    ax.fill_between(mid.index, lo.to_numpy(), hi.to_numpy(), color=colour, alpha=0.18, lw=0)


def layer_axis(ax) -> None:
    """Label the x axis as 0-based layers, integer ticks."""
    ax.set_xlabel("layer (0-based)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def figure_legend(fig, ax, title: str, ncols: int = 2) -> None:
    """The legend of ``ax``'s lines, below the figure."""
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=ncols, title=title)


def _present(frame: pd.DataFrame, column: str, wanted, what: str) -> list[str]:
    have = {str(value) for value in pd.unique(frame[column])}  # not a string per row
    found = [name for name in wanted if name in have]
    if not found:
        raise ValueError(f"the table has none of the {what} {', '.join(wanted)}")
    return found


@styled
def entropy_flow(tokens: pd.DataFrame, *, spread: str = "iqr", title: str | None = None) -> Figure:
    """Mean entropy per layer of the layer input, attention output, FFN output and layer output.

    Args:
        tokens: an entropy table (``entropy_table`` or ``tokens.parquet``).
        spread: the band: ``iqr`` (25th-75th percentile over tokens, the default: entropies are
            skewed and never negative) or ``std`` (mean ± 1 s.d.).
        title: axes title (e.g. the model's name).

    ``final`` (the model's output policy), when present, is a star at the last layer.
    """
    sites = _present(tokens, "site", FLOW_SITES, "sites")
    fig, (ax,) = new_figure(COLUMN_WIDTH, 3.0)
    site = tokens["site"]  # compared as is: a categorical or strings alike
    for name in sites:
        stats = band(tokens[site == name], "layer", "entropy", spread)
        _line(ax, stats, SITE_COLOURS[name], name)
    final = tokens[site == "final"]
    if len(final):
        star = dict(marker="*", ms=9, ls="none", color=SITE_COLOURS["final"])
        ax.plot(final["layer"].max(), final["entropy"].mean(), **star, label="final (output)")
    ax.set_ylabel("entropy (nats)")
    layer_axis(ax)
    ax.set_title(title or "")
    figure_legend(fig, ax, f"mean entropy per layer; {SPREADS[spread]}")
    return fig


@styled
def entropy_change(
    deltas: pd.DataFrame,
    *,
    spread: str = "iqr",
    stages: dict[str, tuple[int, int] | None] | None = None,
    tau: float | None = None,
    title: str | None = None,
) -> Figure:
    """Mean entropy change per layer of attention, FFN and the whole layer, with a zero line.

    Args:
        deltas: a delta table (``delta_table`` or ``deltas.parquet``).
        spread: ``iqr`` or ``std`` (see :func:`entropy_flow`).
        stages: from ``convergence.find_stages``; shades the exploration and convergence layers.
        tau: the stages' threshold (nats), for the legend.
        title: axes title.
    """
    modules = _present(deltas, "module", MODULE_LABELS, "modules")
    fig, (ax,) = new_figure(COLUMN_WIDTH, 3.2)
    module = deltas["module"]
    threshold = "tau" if tau is None else f"tau = {tau:g} nats"
    for stage, (label, hatch) in _STAGE_SHADES.items():
        span = (stages or {}).get(stage)
        if span is not None:
            ax.axvspan(
                span[0] - 0.5,
                span[1] + 0.5,
                fc="0.92",
                hatch=hatch,
                ec="0.75",
                lw=0,
                label=label.format(tau=threshold),
            )
    ax.axhline(0.0, color="0.25", lw=0.8, ls="--", zorder=1)
    for name in modules:
        label, colour = MODULE_LABELS[name]
        _line(ax, band(deltas[module == name], "layer", "delta", spread), colour, label)
    ax.set_ylabel("entropy change ΔH (nats)")
    layer_axis(ax)
    ax.set_title(title or "")
    figure_legend(fig, ax, f"mean ΔH per layer; {SPREADS[spread]}", ncols=1)
    return fig


def token_label(text: str, limit: int = 10) -> str:
    """A token's text made visible on an axis: whitespace shown, ``$`` escaped, long ones cut."""
    shown = text.replace("\n", "\\n").replace("\t", "\\t").replace(" ", "␣") or "∅"
    shown = shown if len(shown) <= limit else shown[: limit - 1] + "…"
    return shown.replace("$", r"\$")


@styled
def token_heatmap(
    tokens: pd.DataFrame,
    *,
    sample_id=None,
    site: str = "resid_post",
    max_labels: int = 40,
    title: str | None = None,
) -> Figure:
    """Entropy of one site's policy, layer x position, for one sample, tokens on the x axis.

    Args:
        tokens: an entropy table; token text from its ``token`` column, else the ``token_id``.
        sample_id: the sample to show (compared as text; default: the smallest id).
        site: the site to show.
        max_labels: at most this many token labels (every k-th position is labelled).
        title: axes title (default: the sample and site).
    """
    if tokens.empty:
        raise ValueError("the table has no rows")
    sample_id = tokens["sample_id"].min() if sample_id is None else sample_id
    rows = tokens[(tokens["sample_id"].astype(str) == str(sample_id)) & (tokens["site"] == site)]
    if rows.empty:
        raise ValueError(f"no rows for sample {sample_id!r} at site {site!r}")
    grid = rows.pivot_table(index="layer", columns="position", values="entropy")
    text_column = "token" if "token" in rows.columns else "token_id"
    text = rows.drop_duplicates("position").set_index("position")[text_column].astype(str)
    height = min(max(1.4 + 0.16 * len(grid), 2.2), 5.0)
    fig, (ax,) = new_figure(TEXT_WIDTH, height)
    image = ax.imshow(
        grid.to_numpy(), aspect="auto", origin="lower", cmap="viridis", interpolation="nearest"
    )
    ax.grid(False)
    step = max(1, math.ceil(grid.shape[1] / max_labels))
    ticks = np.arange(0, grid.shape[1], step)
    ax.set_xticks(ticks, [token_label(text[grid.columns[i]]) for i in ticks], rotation=90)
    rows_step = max(1, math.ceil(len(grid) / 12))
    ax.set_yticks(np.arange(0, len(grid), rows_step), [str(v) for v in grid.index[::rows_step]])
    shown = "every position" if step == 1 else f"every {step} positions"
    ax.set_xlabel(f"input token (labels: {shown}; the policy there predicts the next token)")
    ax.set_ylabel("layer")
    ax.set_title(title or f"sample {sample_id}, site {site}")
    bar = fig.colorbar(image, ax=ax, pad=0.01)
    bar.set_label("entropy (nats)")
    bar.ax.tick_params(labelsize=7)
    return fig


@styled
def next_token_extras(
    tokens: pd.DataFrame, *, spread: str = "iqr", title: str | None = None
) -> Figure:
    """Rank of the actual next token (median, log scale) and KL to the final policy, per layer.

    Needs the extras columns ``next_token_rank`` and ``kl_internal_final`` (``--extras``).

    Args:
        tokens: an entropy table with extras.
        spread: the band of the KL panel, ``std`` or ``iqr``; the rank panel always shows the
            median and the 25th-75th percentile.
        title: figure title.
    """
    missing = {"next_token_rank", "kl_internal_final"} - set(tokens.columns)
    if missing:
        raise ValueError(f"the table has no {', '.join(sorted(missing))} (run with --extras)")
    sites = _present(tokens, "site", ("attn_out", "mlp_out", "resid_post"), "sites")
    fig, (rank_ax, kl_ax) = new_figure(TEXT_WIDTH, 2.8, ncols=2)
    site = tokens["site"]  # compared as is: a categorical or strings alike
    for name in sites:
        rows = tokens[site == name]
        ranked = rows[rows["next_token_rank"] >= 1]  # -1: the position has no next token
        rank = band(ranked, "layer", "next_token_rank", "iqr", "median")
        kl = band(rows.dropna(subset=["kl_internal_final"]), "layer", "kl_internal_final", spread)
        _line(rank_ax, rank, SITE_COLOURS[name], name)
        _line(kl_ax, kl, SITE_COLOURS[name], name)
    rank_ax.set_yscale("log")
    rank_ax.set_ylabel("rank of the actual next token\n(1 = top; median, 25th–75th pct.)")
    kl_ax.set_ylabel("KL(internal ‖ final) (nats)\n" + SPREADS[spread].replace("band: ", ""))
    for ax, letter in ((rank_ax, "a"), (kl_ax, "b")):
        layer_axis(ax)
        ax.set_title(f"({letter})", loc="left")
    if title:
        fig.suptitle(title)
    figure_legend(fig, rank_ax, "policy read at site", ncols=len(sites))
    return fig


@styled
def opt_in_statistics(
    tokens: pd.DataFrame, *, spread: str = "iqr", title: str | None = None
) -> Figure:
    """One panel per opt-in statistic the table holds (``--stats``), per layer and site.

    The statistics and their axes come from the registry
    (:data:`~internal_policy_lens.statistics.STATISTICS`): a new statistic with a chart gets its
    panel here without a change to this function.
    """
    names = [n for n in opt_in() if n in tokens.columns and STATISTICS[n].chart is not None]
    if not names:
        raise ValueError(f"the table has no opt-in statistic (run with --stats {opt_in()[0]})")
    sites = _present(tokens, "site", ("attn_out", "mlp_out", "resid_post"), "sites")
    fig, axes = new_figure(TEXT_WIDTH, 2.8, ncols=len(names))
    axes = np.atleast_1d(axes)
    site = tokens["site"]
    for ax, name, letter in zip(axes, names, "abcdefgh"):
        chart = STATISTICS[name].chart
        for where in sites:
            rows = tokens[site == where]
            _line(ax, band(rows, "layer", name, spread), SITE_COLOURS[where], where)
        if chart.log:
            ax.set_yscale("log")
        ax.set_ylabel(f"{chart.axis}\n" + SPREADS[spread].replace("band: ", ""))
        ax.set_title(f"({letter}) {name}", loc="left")
        layer_axis(ax)
    if title:
        fig.suptitle(title)
    figure_legend(fig, axes[0], "policy read at site", ncols=len(sites))
    return fig


COSINE_LABELS = {
    "cos_attn": ("attention: cos(attn_out, resid_pre)", SITE_COLOURS["attn_out"]),
    "cos_ffn": ("FFN: cos(mlp_out, resid_mid)", SITE_COLOURS["mlp_out"]),
}
"""The residual cosines' legend labels and colours (a module shares its output site's)."""


@styled
def residual_cosine(
    tokens: pd.DataFrame, *, spread: str = "iqr", title: str | None = None
) -> Figure:
    """Cosine of each module's write with the stream it is added to, per layer.

    Below zero the module suppresses the stream's direction, near zero it writes orthogonal
    (new) features, above zero it amplifies. In a parallel block the FFN's stream is
    ``resid_pre`` (there is no ``resid_mid``).

    Args:
        tokens: an entropy table with the extras columns ``cos_attn`` and ``cos_ffn``; each
            (token, layer) counts once (every site's row of a layer carries the same value).
        spread: the band, ``iqr`` (25th-75th percentile over tokens) or ``std``.
        title: figure title.
    """
    missing = set(COSINE_LABELS) - set(tokens.columns)
    if missing:
        raise ValueError(f"the table has no {', '.join(sorted(missing))} (run with --extras)")
    rows = tokens[tokens["site"] != "final"]
    rows = rows.drop_duplicates(["sample_id", "position", "layer"])
    if rows.empty:
        raise ValueError("the table has no layer rows for the residual cosines")
    fig, (ax,) = new_figure(COLUMN_WIDTH, 2.6)
    ax.axhline(0.0, color="0.25", lw=0.8, ls="--", zorder=1)
    for column, (label, colour) in COSINE_LABELS.items():
        _line(ax, band(rows.dropna(subset=[column]), "layer", column, spread), colour, label)
    ax.set_ylabel("cosine with the residual stream\n" + SPREADS[spread].replace("band: ", ""))
    ax.set_ylim(-1.05, 1.05)
    layer_axis(ax)
    if title:
        fig.suptitle(title)
    figure_legend(fig, ax, "module write (mean over tokens)", ncols=1)
    return fig


@styled
def compare_cosines(summaries: pd.DataFrame) -> Figure:
    """Several models' residual cosines (mean over tokens) on one relative-depth axis.

    Args:
        summaries: summary tables stacked, with the columns ``model`` and ``n_layers`` (as in
            :func:`compare_runs`); the ``cosine`` rows are drawn.
    """
    cosines = summaries[summaries["quantity"] == "cosine"]
    if cosines.empty:
        raise ValueError("no run has residual cosines (run ipl entropy with --extras)")
    models = list(dict.fromkeys(summaries["model"]))
    palette = sns.color_palette("colorblind", n_colors=max(len(models), 1))
    fig, axes = new_figure(TEXT_WIDTH, 2.6, ncols=2)
    lacking = [m for m in models if m not in set(cosines["model"])]
    if lacking:  # named, not drawn as empty legend entries
        fig.text(
            0.5,
            0.0,
            f"no residual cosines (run without --extras): {', '.join(lacking)}",
            ha="center",
            va="top",
            fontsize=7,
        )
    for ax, (name, label) in zip(axes, (("attn", "cos_attn"), ("ffn", "cos_ffn"))):
        for model, colour in zip(models, palette):
            if model in lacking:
                continue
            frame = cosines[(cosines["model"] == model) & (cosines["name"].astype(str) == name)]
            depth = (frame["layer"] + 1) / frame["n_layers"]
            legend = model if ax is axes[0] else None
            ax.plot(depth, frame["mean"], color=colour, marker="o", label=legend)
        ax.axhline(0.0, color="0.25", lw=0.8, ls="--", zorder=1)
        ax.set_title(f"({'ab'[name == 'ffn']}) {COSINE_LABELS[label][0]}", loc="left")
        ax.set_xlabel("relative depth (l + 1) / L")
        ax.set_ylabel("cosine (mean over tokens)")
        ax.set_xlim(-0.02, 1.02)
        ax.set_ylim(-1.05, 1.05)
    figure_legend(fig, axes[0], "model", ncols=min(len(models), 4))
    return fig


@styled
def compare_runs(summaries: pd.DataFrame, *, late_depth: float = 0.9) -> Figure:
    """Several models on one relative-depth axis: layer-output entropy, FFN and attention ΔH.

    Args:
        summaries: summary tables stacked, with two more columns: ``model`` (the legend name)
            and ``n_layers`` (that model's layer count). Relative depth is ``(layer + 1) / L``:
            the depth after the layer, so layer 0's input sits at 0 and the last layer at 1, and
            28-, 32- and 36-layer models line up.
        late_depth: shades the depth range counted as late by the abruptness measure.
    """
    models = list(dict.fromkeys(summaries["model"]))
    fig, axes = new_figure(TEXT_WIDTH, 2.9, ncols=3)
    palette = sns.color_palette("colorblind", n_colors=max(len(models), 1))
    axes[0].axvspan(
        late_depth, 1.0, color="0.92", lw=0, label=f"last {1 - late_depth:.0%} of depth"
    )
    panels = (("entropy", "resid_post"), ("delta", "ffn"), ("delta", "attn"))
    for model, colour in zip(models, palette):
        frame = summaries[summaries["model"] == model]
        depth = (frame["layer"] + 1) / frame["n_layers"]
        name = frame["name"].astype(str)
        for ax, (quantity, which) in zip(axes, panels):
            keep = (frame["quantity"] == quantity) & (name == which)
            x, y = depth[keep].to_numpy(), frame.loc[keep, "mean"].to_numpy()
            start = (frame["quantity"] == "entropy") & (name == "resid_pre") & (frame["layer"] == 0)
            if which == "resid_post" and start.any():
                x, y = np.r_[0.0, x], np.r_[frame.loc[start, "mean"].iloc[0], y]
            ax.plot(x, y, color=colour, marker="o", label=model if ax is axes[0] else None)
    labels = ("(a) layer output H(resid_post)", "(b) FFN ΔH", "(c) attention ΔH")
    units = ("entropy (nats)", "entropy change ΔH (nats)", "entropy change ΔH (nats)")
    for ax, label, unit in zip(axes, labels, units):
        ax.set_title(label, loc="left")
        ax.set_xlabel("relative depth (l + 1) / L")
        ax.set_ylabel(unit)
        ax.set_xlim(-0.02, 1.02)
    for ax in axes[1:]:
        ax.axhline(0.0, color="0.25", lw=0.8, ls="--", zorder=1)
    figure_legend(fig, axes[0], "model (mean over tokens)", ncols=min(len(models) + 1, 4))
    return fig


@styled
def training_curves(runs: dict[str, pd.DataFrame]) -> Figure:
    """Reward, accuracy, entropies and response length against step, one colour per run.

    A dotted vertical line marks each run's switch from IPA to GRPO (its first ``grpo`` step).
    """
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
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    axes[-1].axis("off")
    handles, labels = axes[0].get_legend_handles_labels()
    axes[-1].legend(handles, labels, loc="center", title="run (dotted: IPA → GRPO switch)")
    return fig


PROBE_PANELS = (
    ("cos_hidden", "cos(H^k, H^j)"),
    ("delta_ffn", "ΔH of layer k's FFN (nats)"),
    ("perplexity", "perplexity of π_θ"),
    ("kl_layer_other", "KL(π^k ‖ π^j) (nats)"),
)
"""Panels of :func:`probe_panels`: a probe quantity and its axis label (the paper's Figs. 4-5)."""


@styled
def probe_panels(runs: dict[str, pd.DataFrame], layers: dict[str, int]) -> Figure:
    """Training probes over steps, one row per run (``probes.parquet`` of ``ipl train-bupo``).

    Columns: (a) cos(H^k, H^j) and (d) KL(π^k ‖ π^j), one line per later layer j; (b) the FFN
    entropy change of layer k; (c) the perplexity of π_θ on the probe responses (log scale); (e)
    the entropy of every layer's ``resid_post`` policy, layer x step. ``layers`` gives each run's
    k.

    Raises:
        ValueError: a run without the probe quantities.
    """
    fig = Figure(figsize=(TEXT_WIDTH, 1.9 * len(runs) + 0.4), layout="constrained")
    fig.set_facecolor("white")
    grid = fig.subplots(len(runs), len(PROBE_PANELS) + 1, squeeze=False)
    for row, (name, probes) in zip(grid, runs.items()):
        k = layers[name]
        missing = {q for q, _ in PROBE_PANELS} - set(probes["quantity"])
        if missing:
            raise ValueError(f"{name}: the probes have no {', '.join(sorted(missing))}")
        for ax, (quantity, label) in zip(row, PROBE_PANELS):
            rows = probes[probes["quantity"] == quantity]
            if quantity == "delta_ffn":
                rows = rows[rows["layer"] == k]
            if rows["other_layer"].notna().any():
                others = sorted(rows["other_layer"].dropna().unique())
                palette = sns.color_palette("crest", n_colors=len(others))
                for j, colour in zip(others, palette):
                    line = rows[rows["other_layer"] == j].sort_values("step")
                    ax.plot(line["step"], line["value"], color=colour, label=f"j={int(j)}")
                ax.legend(fontsize=6, ncols=2)
            else:
                line = rows.sort_values("step")
                ax.plot(line["step"], line["value"], color=SITE_COLOURS["mlp_out"], marker="o")
            values = rows["value"]
            if quantity == "perplexity" and values.max() > 10 * values.min():
                ax.set_yscale("log")  # it can grow by orders of magnitude when IPA lasts too long
            else:
                ax.yaxis.set_major_locator(MaxNLocator(nbins=4))
            ax.set_xlabel("step")
            ax.xaxis.set_major_locator(MaxNLocator(nbins=3, integer=True))
            ax.set_ylabel(label)
        heat = probes[probes["quantity"] == "entropy_resid_post"]
        wide = heat.pivot_table(index="layer", columns="step", values="value")
        ax = row[-1]
        image = ax.imshow(wide.to_numpy(), aspect="auto", origin="lower", cmap="viridis")
        every = max(1, -(-len(wide.columns) // 3))  # at most 3 step labels
        shown = range(0, len(wide.columns), every)
        ax.set_xticks(list(shown), [str(int(wide.columns[i])) for i in shown], fontsize=6)
        ax.set_xlabel("step")
        ax.set_ylabel("layer")
        fig.colorbar(image, ax=ax, label="H(resid_post) (nats)")
        row[0].set_title(f"{name} (k = {k})", loc="left")
    return fig


@styled
def lens_quality(table: pd.DataFrame, *, site: str = "resid_post") -> Figure:
    """KL(final || lens) per layer of ``site``, one line per lens, log scale (``ipl eval-lens``).

    Args:
        table: ``ipl eval-lens``'s table (``layer, site, lens, kl_final_internal, ...``). A KL of
            zero (the last layer under the norm and tuned lenses) is drawn at the axis floor.
        site: the site drawn.
    """
    frame = table[table["site"].astype(str) == site]
    if frame.empty:
        raise ValueError(f"the table has no rows for site {site!r}")
    rank = {name: i for i, name in enumerate(LENSES)}  # registration order; others come last
    lenses = sorted(set(frame["lens"]), key=lambda n: (rank.get(n, len(rank)), n))
    fig, (ax,) = new_figure(COLUMN_WIDTH, 2.6)
    palette = sns.color_palette("colorblind", n_colors=len(lenses))
    floor = 1e-4
    for lens, colour in zip(lenses, palette):
        rows = frame[frame["lens"] == lens].sort_values("layer")
        ax.plot(
            rows["layer"],
            rows["kl_final_internal"].clip(lower=floor),
            color=colour,
            marker="o",
            label=lens,
        )
    ax.set_yscale("log")
    ax.set_ylabel("KL(final ‖ lens) (nats)")
    ax.set_title(f"{site}: distance to the output policy", loc="left")
    layer_axis(ax)
    figure_legend(fig, ax, "lens (held-out tokens)", ncols=len(lenses))
    return fig
