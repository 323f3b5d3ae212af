"""Figures of splits and checkpoint diffs: tables in, matplotlib figures out (never saved here).

Same house style as :mod:`~internal_policy_lens.analysis.plots`: one line per group (a split)
or per site (a diff), 95% bootstrap intervals as bands where the table has them. The same
function draws ``split.png`` (``ipl split``) and the entropy-flow and entropy-change figures by
group (``ipl plot RUN --split ...``).
"""

from __future__ import annotations

import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from .plots import (
    FLOW_SITES,
    MODULE_LABELS,
    SITE_COLOURS,
    TEXT_WIDTH,
    figure_legend,
    layer_axis,
    new_figure,
    styled,
)

SPLIT_PANELS = (
    ("entropy", "resid_post", "H(resid_post) (nats)"),
    ("delta", "ffn", "FFN ΔH (nats)"),
)
"""``split.png``'s panels: ``quantity, name, axis label``."""
FLOW_PANELS = tuple(("entropy", site, f"H({site}) (nats)") for site in FLOW_SITES)
"""The entropy-flow figure by group: one panel per flow site."""
CHANGE_PANELS = tuple(
    ("delta", module, f"{label.split(':')[0]} ΔH (nats)")
    for module, (label, _) in MODULE_LABELS.items()
)
"""The entropy-change figure by group: one panel per module (ΔH of attention, FFN, layer)."""
DIFF_PANELS = (
    ("entropy_change", "ΔH = H_b − H_a (nats)"),
    ("kl_a_b", "KL(a ‖ b) (nats)"),
    ("kl_b_a", "KL(b ‖ a) (nats)"),
    ("rank_change", "next-token rank: b − a"),
    ("top_q_overlap", "overlap of top-q entropy positions"),
)


def present_panels(summary: pd.DataFrame, panels: tuple) -> list[tuple]:
    """The ``(quantity, name, ...)`` panels that ``summary`` has rows for."""
    name = summary["name"].astype(str)
    return [p for p in panels if ((summary["quantity"] == p[0]) & (name == p[1])).any()]


@styled
def split_curves(
    summary: pd.DataFrame, *, panels: tuple = SPLIT_PANELS, title: str | None = None
) -> Figure:
    """Per group, the mean of each panel's curve per layer, with ``ci_low``/``ci_high`` bands.

    ``summary``: a split's summary (``group`` then ``SUMMARY_COLUMNS``, optionally intervals).
    ``panels``: ``(quantity, name, axis label)`` each (:data:`SPLIT_PANELS`,
    :data:`FLOW_PANELS`, :data:`CHANGE_PANELS`); a delta panel gets a zero line, and the
    ``resid_post`` entropy panel the final policy's mean as a star (with its interval).

    Raises:
        ValueError: the summary has none of the panels' curves.
    """
    shown = present_panels(summary, panels)
    if not shown:
        wanted = ", ".join(f"{q} {n}" for q, n, _ in panels)
        raise ValueError(f"the split's summary has none of {wanted}")
    groups = list(dict.fromkeys(summary["group"]))
    colours = dict(zip(groups, sns.color_palette("colorblind", len(groups))))
    fig, axes = new_figure(TEXT_WIDTH, 2.6, ncols=len(shown))
    name = summary["name"].astype(str)
    finals = (summary["quantity"] == "entropy") & (name == "final")
    star = finals.any() and ("entropy", "resid_post") in [(q, w) for q, w, _ in shown]
    for ax, (quantity, which, label) in zip(axes, shown):
        if quantity == "delta":
            ax.axhline(0.0, color="0.25", lw=0.8, ls="--", zorder=1)
        for group in groups:
            mine = (summary["group"] == group) & (summary["quantity"] == quantity)
            rows = summary[mine & (name == which)].sort_values("layer")
            ax.plot(rows.layer, rows["mean"], marker="o", color=colours[group], label=group)
            if "ci_low" in rows:
                ax.fill_between(
                    rows.layer, rows.ci_low, rows.ci_high, color=colours[group], alpha=0.2, lw=0
                )
            if star and (quantity, which) == ("entropy", "resid_post"):
                _final_star(ax, summary[finals & (summary["group"] == group)], colours[group])
        ax.set_ylabel(label)
        layer_axis(ax)
    if title:
        fig.suptitle(title)
    told = "group"
    if "ci_low" in summary:
        told += " (bands: 95% intervals over resampled responses)"
    if star:
        told += "; star: the final policy"
    figure_legend(fig, axes[0], told, len(groups))
    return fig


def _final_star(ax, rows: pd.DataFrame, colour) -> None:
    """The final policy's mean entropy at its layer, with its interval as an error bar."""
    if rows.empty:
        return
    row, errors = rows.iloc[0], None
    if "ci_low" in row and pd.notna(row["ci_low"]):
        errors = [[row["mean"] - row["ci_low"]], [row["ci_high"] - row["mean"]]]
    ax.errorbar(
        row["layer"], row["mean"], yerr=errors, marker="*", ms=8, color=colour, ls="none", capsize=2
    )


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
