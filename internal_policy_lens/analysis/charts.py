"""Tables -> interactive plotly charts for the HTML report (the static figures are in ``plots``).

The same quantities as :mod:`internal_policy_lens.analysis.plots`, with its colours and its
25th-75th percentile bands, as plotly figures whose points show their values on hover. Nothing
here imports torch.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import seaborn as sns

from ..statistics import STATISTICS, Chart, charted
from . import plots


def hex_colour(rgb) -> str:
    """``#rrggbb`` of an RGB triple in [0, 1] (matplotlib/seaborn colours -> plotly)."""
    return "#" + "".join(f"{round(255 * c):02x}" for c in rgb[:3])


_HEX = {
    name: hex_colour(rgb)
    for name, rgb in {
        **plots.SITE_COLOURS,
        **{m: c for m, (_, c) in plots.MODULE_LABELS.items()},
    }.items()
}


def flow_chart(tokens: pd.DataFrame, counts: str = "") -> go.Figure | None:
    """Mean entropy per layer of the flow sites with their quartile band; None without them.

    ``counts`` (e.g. ``"4 samples, 96 tokens"``) goes into the title.
    """
    site = tokens["site"]  # compared as is: a categorical or strings alike
    fig = go.Figure()
    for name in [s for s in plots.FLOW_SITES if (site == s).any()]:
        mid, lo, hi = plots.band(tokens[site == name], "layer", "entropy", "iqr")
        _band_traces(fig, mid, lo, hi, name, _HEX[name])
    final = tokens[site == "final"]
    if len(final):
        fig.add_scatter(
            x=[int(final["layer"].max())],
            y=[final["entropy"].mean()],
            mode="markers",
            marker=dict(symbol="star", size=14, color=_HEX["final"]),
            name="final (output)",
        )
    if not fig.data:
        return None
    title = "Entropy flow: mean per layer; band: 25th–75th percentile over tokens"
    return _layout(fig, _titled(title, counts), "layer (0-based)", "entropy (nats)")


def change_chart(deltas: pd.DataFrame, stages, tau: float, counts: str = "") -> go.Figure | None:
    """Mean entropy change per layer and module, quartile band, FFN stages shaded."""
    if deltas.empty:
        return None
    module = deltas["module"]
    fig = go.Figure()
    shades = (("exploration", "#e0e0e0", "ΔH > "), ("convergence", "#bdbdbd", "ΔH < −"))
    threshold = f"tau = {tau:g} nats"
    for stage, pattern, rule in shades:
        span = (stages or {}).get(stage)
        if span is not None:
            fig.add_vrect(
                x0=span[0] - 0.5,
                x1=span[1] + 0.5,
                fillcolor=pattern,
                opacity=0.35,
                line_width=0,
                layer="below",
                annotation_text=f"FFN {stage} ({rule}{threshold})",
                annotation_position="top left",
            )
    fig.add_hline(y=0, line_dash="dash", line_color="#444444")
    for name, (label, _) in plots.MODULE_LABELS.items():
        if (module == name).any():
            mid, lo, hi = plots.band(deltas[module == name], "layer", "delta", "iqr")
            _band_traces(fig, mid, lo, hi, label, _HEX[name])
    title = "Entropy change per layer (mean; band: 25th–75th percentile); FFN stages shaded"
    return _layout(fig, _titled(title, counts), "layer (0-based)", "entropy change ΔH (nats)")


def split_chart(summary: pd.DataFrame, panels: tuple, title: str) -> go.Figure | None:
    """A split's curves, one subplot per panel and one line per group, 95% intervals as bands.

    ``summary``: :meth:`~internal_policy_lens.analysis.uncertainty.Resampled.summary`;
    ``panels``: :data:`~internal_policy_lens.analysis.split_figures.FLOW_PANELS` or
    ``CHANGE_PANELS``. A group's traces share a legend entry (a click hides it in every panel);
    the final policy's mean is a star with its interval beside the ``resid_post`` entropy.
    None when the summary has none of the panels.
    """
    from plotly.subplots import make_subplots

    from .split_figures import present_panels

    shown = present_panels(summary, panels)
    if not shown:
        return None
    groups = list(dict.fromkeys(summary["group"]))
    palette = dict(zip(groups, map(hex_colour, sns.color_palette("colorblind", len(groups)))))
    fig = make_subplots(rows=1, cols=len(shown), subplot_titles=[p[2] for p in shown])
    name = summary["name"].astype(str)
    for column, (quantity, which, _) in enumerate(shown, start=1):
        if quantity == "delta":
            fig.add_hline(y=0, line_dash="dash", line_color="#444444", row=1, col=column)
        for group in groups:
            rows = summary[
                (summary["group"] == group) & (summary["quantity"] == quantity) & (name == which)
            ].sort_values("layer")
            mid = rows.set_index("layer")["mean"]
            lo, hi = rows["ci_low"], rows["ci_high"]
            traces = go.Figure()
            _band_traces(traces, mid, lo, hi, group, palette[group], edges=("95% low", "95% high"))
            for trace in traces.data:
                trace.showlegend = trace.showlegend is not False and column == 1
                fig.add_trace(trace, row=1, col=column)
            final = summary[
                (summary["group"] == group) & (summary["quantity"] == "entropy") & (name == "final")
            ]
            if (quantity, which) == ("entropy", "resid_post") and len(final):
                _final_star(fig, final.iloc[0], group, palette[group], column)
    fig.update_xaxes(title_text="layer (0-based)")
    return _layout(fig, title, "layer (0-based)", "")


def _final_star(fig: go.Figure, row: pd.Series, group: str, colour: str, column: int) -> None:
    """The final policy's mean entropy of ``group`` as a star, its interval as an error bar."""
    fig.add_scatter(
        x=[int(row["layer"])],
        y=[row["mean"]],
        error_y=dict(
            type="data",
            symmetric=False,
            array=[row["ci_high"] - row["mean"]],
            arrayminus=[row["mean"] - row["ci_low"]],
        ),
        mode="markers",
        marker=dict(symbol="star", size=12, color=colour),
        name=f"{group}: final",
        legendgroup=group,
        showlegend=False,
        hovertemplate="final policy %{y:.3f}<extra>" + group + "</extra>",
        row=1,
        col=column,
    )


COSINE_CHART = Chart("Residual cosine: module write vs the stream it is added to (mean)", "cosine")


def extra_charts() -> tuple[tuple[str, Chart], ...]:
    """The per-layer charts beyond the entropy's: a quantity and its chart.

    Every statistic with a chart in the registry
    (:func:`~internal_policy_lens.statistics.charted`), then the residual cosines.
    """
    return (*charted(), ("cosine", COSINE_CHART))


def median_chart(
    tokens: pd.DataFrame, quantity: str, chart: Chart, counts: str = ""
) -> go.Figure | None:
    """A token column's median per layer and site with its quartile band; None without it.

    What ``next_token.png`` (:func:`~.plots.next_token_extras`) draws for the rank. Values
    below the statistic's ``counted_from`` (the rank's -1: no next token) are left out, as in
    the summary. A log axis is labelled with whole numbers (1, 2, 5, 10, ...) from 1.
    """
    if quantity not in tokens.columns:
        return None
    floor = STATISTICS[quantity].counted_from
    rows = tokens if floor is None else tokens[tokens[quantity] >= floor]
    site = rows["site"]
    fig, top = go.Figure(), 1.0
    for name in [s for s in (*plots.FLOW_SITES, "final") if (site == s).any()]:
        mid, lo, hi = plots.band(rows[site == name], "layer", quantity, "iqr", "median")
        _band_traces(fig, mid, lo, hi, name, _HEX[name], centre="median")
        top = max(top, float(hi.max()))
    if not fig.data:
        return None
    _layout(fig, _titled(chart.title, counts), "layer (0-based)", chart.axis)
    if not chart.log:
        return fig
    low, high = -0.05, np.log10(top) + 0.05  # log10 units: the markers at 1 are not cut
    ticks = [t for t in _whole_ticks(top) if np.log10(t) <= high]
    return fig.update_yaxes(
        type="log", tickvals=ticks, ticktext=[f"{t:,}" for t in ticks], range=[low, high]
    )


def _whole_ticks(top: float) -> list[int]:
    """1, 2, 5, 10, 20, 50, ... up to ``top`` (1, 10, 100, ... beyond three decades)."""
    steps = (1, 2, 5) if top <= 1000 else (1,)
    decades = int(np.log10(top)) + 1
    return [step * 10**d for d in range(decades + 1) for step in steps]


def extras_charts(
    summary: pd.DataFrame, tokens: pd.DataFrame, counts: str = ""
) -> dict[str, go.Figure]:
    """One chart per charted quantity that the run holds.

    A chart marked ``median`` (the rank) reads the token table (:func:`median_chart`); the
    others' points are the summary's means.
    """
    charts = {}
    for quantity, chart in extra_charts():
        if chart.median:
            fig = median_chart(tokens, quantity, chart, counts)
            if fig is not None:
                charts[quantity] = fig
            continue
        rows = summary[summary["quantity"] == quantity]
        if rows.empty:
            continue
        fig = go.Figure()
        names = ("attn", "ffn") if quantity == "cosine" else (*plots.FLOW_SITES, "final")
        for name in [n for n in names if (rows["name"].astype(str) == n).any()]:
            part = rows[rows["name"].astype(str) == name].sort_values("layer")
            colour = _HEX["attn_out" if name == "attn" else "mlp_out" if name == "ffn" else name]
            fig.add_scatter(
                x=part["layer"].astype(int).tolist(),
                y=part["mean"].tolist(),
                mode="lines+markers",
                name=name,
                line=dict(color=colour),
                customdata=part["count"].astype(int).tolist(),
                hovertemplate="layer %{x}<br>mean %{y:.4g}<br>%{customdata} tokens",
            )
        _layout(fig, _titled(chart.title, counts), "layer (0-based)", chart.axis)
        if chart.log:
            fig.update_yaxes(type="log")
        charts[quantity] = fig
    return charts


def compare_charts(stacked: pd.DataFrame, missing_cosines: list[str] = ()) -> list[go.Figure]:
    """Stacked summaries (``model``, ``n_layers`` added) on relative depth, mean over tokens.

    The panels of ``comparison.png`` (layer 0's input at depth 0 in the layer-output panel), and
    the residual cosines when a run has them; ``missing_cosines`` names the runs without them.
    """
    panels = [
        ("entropy", "resid_post", "Layer output H(resid_post)", "entropy (nats)"),
        ("delta", "ffn", "FFN ΔH", "ΔH (nats)"),
        ("delta", "attn", "Attention ΔH", "ΔH (nats)"),
    ]
    if (stacked["quantity"] == "cosine").any():
        lacking = f" (no cosines: {', '.join(missing_cosines)})" if missing_cosines else ""
        panels += [
            ("cosine", "attn", "Attention cos(attn_out, resid_pre)" + lacking, "cosine"),
            ("cosine", "ffn", "FFN cos(mlp_out, resid_mid)" + lacking, "cosine"),
        ]
    palette = sns.color_palette("colorblind", n_colors=max(stacked["model"].nunique(), 1))
    figures = []
    for quantity, which, title, unit in panels:
        fig = go.Figure()
        for model, rgb in zip(dict.fromkeys(stacked["model"]), palette):
            frame = stacked[stacked["model"] == model]
            x, y, layer = _depth_curve(frame, quantity, which)
            if len(x) == 0:
                continue  # named in the title, not drawn as an empty legend entry
            fig.add_scatter(
                x=x,
                y=y,
                mode="lines+markers",
                name=model,
                line=dict(color=hex_colour(rgb)),
                customdata=layer,
                hovertemplate="layer %{customdata}<br>depth %{x:.2f}<br>%{y:.3f}",
            )
        fig = _layout(fig, f"{title} (mean over tokens)", "relative depth (l + 1) / L", unit)
        figures.append(fig.update_xaxes(range=[-0.02, 1.02]))
    return figures


def _depth_curve(frame: pd.DataFrame, quantity: str, which: str):
    """Points at depth (layer + 1) / L; the layer-output curve starts at layer 0's input (0)."""
    name = frame["name"].astype(str)
    rows = frame[(frame["quantity"] == quantity) & (name == which)].sort_values("layer")
    x = ((rows["layer"] + 1) / rows["n_layers"]).tolist()
    y, layer = rows["mean"].tolist(), rows["layer"].astype(int).astype(str).tolist()
    start = frame[(frame["quantity"] == "entropy") & (name == "resid_pre") & (frame["layer"] == 0)]
    if which == "resid_post" and quantity == "entropy" and len(start) and len(rows):
        x, y, layer = [0.0, *x], [float(start["mean"].iloc[0]), *y], ["0 (input)", *layer]
    return x, y, layer


def _titled(title: str, counts: str) -> str:
    return f"{title}<br><sup>{counts}</sup>" if counts else title


def _band_traces(
    fig: go.Figure, mid, lo, hi, name: str, colour: str, centre="mean", edges=("25%", "75%")
) -> None:
    """A band from ``lo`` to ``hi`` and the ``mid`` line over it (hover: ``edges`` name them)."""
    x = mid.index.astype(int).tolist()
    low, high = edges
    fill = colour + "33"  # the line's colour, 20% opaque
    fig.add_scatter(
        x=x,
        y=hi.tolist(),
        mode="lines",
        line=dict(width=0),
        showlegend=False,
        hoverinfo="skip",
        legendgroup=name,
    )
    fig.add_scatter(
        x=x,
        y=lo.tolist(),
        mode="lines",
        line=dict(width=0),
        fill="tonexty",
        fillcolor=fill,
        showlegend=False,
        hoverinfo="skip",
        legendgroup=name,
    )
    fig.add_scatter(
        x=x,
        y=mid.tolist(),
        mode="lines+markers",
        name=name,
        legendgroup=name,
        line=dict(color=colour),
        customdata=np.c_[lo.to_numpy(), hi.to_numpy()],
        hovertemplate="layer %{x}<br>" + centre + " %{y:.3f}<br>" + low + ": "
        "%{customdata[0]:.3f}<br>" + high + ": %{customdata[1]:.3f}<extra>" + name + "</extra>",
    )


def _layout(fig: go.Figure, title: str, xaxis: str, yaxis: str) -> go.Figure:
    fig.update_layout(
        title=title,
        xaxis_title=xaxis,
        yaxis_title=yaxis,
        template="plotly_white",
        height=420,
        margin=dict(l=60, r=20, t=60, b=50),
        hovermode="closest",
    )
    return fig
