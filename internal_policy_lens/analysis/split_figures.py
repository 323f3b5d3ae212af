"""Figures of splits and checkpoint diffs: tables in, matplotlib figures out (never saved here).

Same house style as :mod:`~internal_policy_lens.analysis.plots`: one line per group (a split)
or per site (a diff), 95% bootstrap intervals as bands where the table has them.
"""

from __future__ import annotations

import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from .plots import SITE_COLOURS, TEXT_WIDTH, figure_legend, layer_axis, new_figure, styled

_PANELS = (
    ("entropy", "resid_post", "H(resid_post) (nats)"),
    ("delta", "ffn", "FFN ΔH = H(mlp_out) − H(mlp_in) (nats)"),
)
DIFF_PANELS = (
    ("entropy_change", "ΔH = H_b − H_a (nats)"),
    ("kl_a_b", "KL(a ‖ b) (nats)"),
    ("kl_b_a", "KL(b ‖ a) (nats)"),
    ("rank_change", "next-token rank: b − a"),
    ("top_q_overlap", "overlap of top-q entropy positions"),
)


@styled
def split_curves(summary: pd.DataFrame, *, title: str | None = None) -> Figure:
    """Per group, mean H(resid_post) and FFN ΔH per layer, with ``ci_low``/``ci_high`` bands.

    ``summary``: a split's summary (``group`` then ``SUMMARY_COLUMNS``, optionally intervals).

    Raises:
        ValueError: the summary has neither curve.
    """
    panels = [p for p in _PANELS if ((summary.quantity == p[0]) & (summary.name == p[1])).any()]
    if not panels:
        raise ValueError("the split's summary has no resid_post entropy and no FFN change")
    groups = list(dict.fromkeys(summary["group"]))
    colours = dict(zip(groups, sns.color_palette("colorblind", len(groups))))
    fig, axes = new_figure(TEXT_WIDTH, 2.6, ncols=len(panels))
    for ax, (quantity, name, label) in zip(axes, panels):
        for group in groups:
            rows = summary[
                (summary.group == group) & (summary.quantity == quantity) & (summary.name == name)
            ].sort_values("layer")
            ax.plot(rows.layer, rows["mean"], marker="o", color=colours[group], label=group)
            if "ci_low" in rows:
                ax.fill_between(
                    rows.layer, rows.ci_low, rows.ci_high, color=colours[group], alpha=0.2, lw=0
                )
        ax.set_ylabel(label)
        layer_axis(ax)
    if title:
        fig.suptitle(title)
    legend = "group (bands: 95% intervals over resampled responses)"
    figure_legend(fig, axes[0], legend, len(groups))
    return fig


@styled
def diff_panels(table: pd.DataFrame, *, title: str | None = None) -> Figure:
    """Per site, the diff's measures against layer (``diff.csv``: layer, site, the measures)."""
    sites = [s for s in SITE_COLOURS if s in set(table.site) and s != "final"]
    if not sites:
        raise ValueError("the diff has no site other than final to draw against layer")
    fig, axes = new_figure(TEXT_WIDTH, 2.2, ncols=len(DIFF_PANELS))
    for ax, (column, label) in zip(axes, DIFF_PANELS):
        for site in sites:
            rows = table[table.site == site].sort_values("layer")
            ax.plot(rows.layer, rows[column], marker="o", color=SITE_COLOURS[site], label=site)
        final = table[table.site == "final"]
        if len(final):
            ax.plot(final.layer, final[column], "*", color=SITE_COLOURS["final"], label="final")
        ax.set_title(label)
        layer_axis(ax)
    if title:
        fig.suptitle(title)
    figure_legend(fig, axes[0], "site", len(sites) + 1)
    return fig
