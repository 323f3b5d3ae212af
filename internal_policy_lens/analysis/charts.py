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


def flow_chart(tokens: pd.DataFrame) -> go.Figure | None:
    """Mean entropy per layer of the flow sites with their quartile band; None without them."""
    site = tokens["site"].astype(str)
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
    return _layout(
        fig,
        "Entropy flow: mean per layer; band: 25th–75th percentile over tokens",
        "layer (0-based)",
        "entropy (nats)",
    )


def change_chart(deltas: pd.DataFrame, stages, tau: float) -> go.Figure | None:
    """Mean entropy change per layer and module, quartile band, FFN stages shaded."""
    if deltas.empty:
        return None
    module = deltas["module"].astype(str)
    fig = go.Figure()
    shades = (("exploration", "#e0e0e0", "ΔH > "), ("convergence", "#bdbdbd", "ΔH < −"))
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
                annotation_text=f"FFN {stage} ({rule}{tau:g})",
                annotation_position="top left",
            )
    fig.add_hline(y=0, line_dash="dash", line_color="#444444")
    for name, (label, _) in plots.MODULE_LABELS.items():
        if (module == name).any():
            mid, lo, hi = plots.band(deltas[module == name], "layer", "delta", "iqr")
            _band_traces(fig, mid, lo, hi, label, _HEX[name])
    return _layout(
        fig,
        "Entropy change per layer (mean; band: 25th–75th percentile); FFN stages shaded",
        "layer (0-based)",
        "entropy change ΔH (nats)",
    )


def compare_charts(stacked: pd.DataFrame) -> list[go.Figure]:
    """Stacked summaries (``model``, ``n_layers`` added) on relative depth, three panels."""
    panels = (
        ("entropy", "resid_post", "Layer output H(resid_post)", "entropy (nats)"),
        ("delta", "ffn", "FFN ΔH", "ΔH (nats)"),
        ("delta", "attn", "Attention ΔH", "ΔH (nats)"),
    )
    figures = []
    palette = sns.color_palette("colorblind", n_colors=max(stacked["model"].nunique(), 1))
    for quantity, which, title, unit in panels:
        fig = go.Figure()
        for model, rgb in zip(dict.fromkeys(stacked["model"]), palette):
            frame = stacked[(stacked["model"] == model) & (stacked["quantity"] == quantity)]
            frame = frame[frame["name"].astype(str) == which]
            colour = hex_colour(rgb)
            fig.add_scatter(
                x=(frame["layer"] + 1) / frame["n_layers"],
                y=frame["mean"],
                mode="lines+markers",
                name=model,
                line=dict(color=colour),
                customdata=frame["layer"],
                hovertemplate="layer %{customdata}<br>depth %{x:.2f}<br>%{y:.3f}",
            )
        figures.append(
            _layout(
                fig,
                f"{title} (mean over tokens) on relative depth",
                "relative depth (l + 1) / L",
                unit,
            )
        )
    return figures


def _band_traces(fig: go.Figure, mid, lo, hi, name: str, colour: str) -> None:
    x = mid.index.astype(int).tolist()
    fill = colour + "33"  # the line's colour, 20% opaque
    fig.add_scatter(
        x=x,
        y=hi.to_numpy(),
        mode="lines",
        line=dict(width=0),
        showlegend=False,
        hoverinfo="skip",
        legendgroup=name,
    )
    fig.add_scatter(
        x=x,
        y=lo.to_numpy(),
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
        y=mid.to_numpy(),
        mode="lines+markers",
        name=name,
        legendgroup=name,
        line=dict(color=colour),
        customdata=np.c_[lo.to_numpy(), hi.to_numpy()],
        hovertemplate="layer %{x}<br>mean %{y:.3f}<br>25%: %{customdata[0]:.3f}"
        "<br>75%: %{customdata[1]:.3f}<extra>" + name + "</extra>",
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
