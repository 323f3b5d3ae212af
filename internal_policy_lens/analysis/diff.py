"""A checkpoint diff's tables, figure and page, from its ``tokens.parquet`` (pandas, no torch).

``summary.csv``: mean, std and count per (quantity, layer, site) of ``entropy_a``,
``entropy_b``, ``entropy_change`` (b - a), ``kl_a_b`` (KL(a || b)), ``kl_b_a`` and
``rank_change`` (rank of the actual next token under b minus under a), merged exactly over the
row groups (one per batch). ``diff.csv``: one row per (layer, site) with those means and the
overlap of the top-q entropy positions: ``threshold_a`` / ``threshold_b`` are each model's
``1 - q`` entropy quantile at the site, and ``top_q_overlap`` the share of a's positions at or
above its threshold that are at or above b's too (1 when the models agree). The overlap reads the
table one layer at a time (two float columns of that layer's rows).
"""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from ..folders import Folder
from ..tables.frames import MOMENT_COLUMNS, grouped_moments, merge_summaries
from .files import save_figure
from .split_figures import diff_panels

QUANTITIES: tuple[str, ...] = (
    "entropy_a",
    "entropy_b",
    "entropy_change",
    "kl_a_b",
    "kl_b_a",
    "rank_change",
)


@dataclass
class DiffResult:
    """What ``ipl diff`` wrote: the folder, the per-(layer, site) table and the facts."""

    out: Path
    table: pd.DataFrame
    info: dict

    def __str__(self) -> str:
        top = self.table[self.table.site != "final"].nlargest(3, "kl_a_b")
        moved = ", ".join(f"{r.site} {r.layer} ({r.kl_a_b:.3g})" for r in top.itertuples())
        final = self.table[self.table.site == "final"]
        final_text = (
            f"; final policy KL(a || b) {final.kl_a_b.iloc[0]:.4g} nats, top-{self.info['q']:g} "
            f"overlap {final.top_q_overlap.iloc[0]:.3f}"
            if len(final)
            else ""
        )
        return (
            f"Wrote {self.out}/ (tokens.parquet, summary.csv, diff.csv, diff.png/.pdf, "
            f"report.html, diff.json) for {self.info['samples']} samples. Largest KL(a || b): "
            f"{moved or 'n/a'}{final_text}."
        )


def write_diff(out: Path, info: dict) -> DiffResult:
    """Tables, figure and page of the diff in ``out`` (its ``tokens.parquet`` written)."""
    folder = Folder(out)
    summary = diff_summary(out / "tokens.parquet")
    table = _wide(summary).merge(top_overlap(out / "tokens.parquet", info["q"]), how="left")
    folder.write_csv("summary.csv", summary)
    folder.write_csv("diff.csv", table)
    title = f"{Path(info['model_b']).name} vs {Path(info['model_a']).name} ({info['lens']} lens)"
    try:
        figure = diff_panels(table, title=title)
        save_figure(figure, out / "diff")
    except ValueError:  # only the final site: nothing to draw against layer
        figure = None
    folder.write_json("diff.json", info)
    with folder.atomic("report.html") as tmp:
        Path(tmp).write_text(_page(title, info, table, figure), encoding="utf-8")
    return DiffResult(out, table, info)


def diff_summary(path: Path) -> pd.DataFrame:
    """``summary.csv``: the moments of each row group, merged exactly (see the module)."""
    file = pq.ParquetFile(path)
    parts = []
    for i in range(file.num_row_groups):
        chunk = file.read_row_group(i).to_pandas()
        chunk["entropy_change"] = chunk["entropy_b"] - chunk["entropy_a"]
        ranked = (chunk["rank_a"] >= 1) & (chunk["rank_b"] >= 1)
        chunk["rank_change"] = (chunk["rank_b"] - chunk["rank_a"]).where(ranked).astype(float)
        long = chunk.melt(id_vars=["layer", "site"], value_vars=list(QUANTITIES)).dropna()
        moments = grouped_moments(long["value"], [long["variable"], long["layer"], long["site"]])
        moments.columns = ["quantity", "layer", "name", "count", "mean", "m2"]
        moments["name"] = moments["name"].astype(str)
        parts.append(moments[list(MOMENT_COLUMNS)])
    return merge_summaries(parts)


def top_overlap(path: Path, q: float) -> pd.DataFrame:
    """Per (layer, site): each model's top-q entropy threshold and the overlap of the two sets."""
    layers = pq.read_table(path, columns=["layer"]).column("layer").unique().to_pylist()
    rows = []
    for layer in sorted(layers):
        frame = pd.read_parquet(
            path, columns=["site", "entropy_a", "entropy_b"], filters=[("layer", "==", layer)]
        )
        for site, part in frame.groupby("site", observed=True):
            a, b = part["entropy_a"].to_numpy(np.float64), part["entropy_b"].to_numpy(np.float64)
            cut_a, cut_b = np.quantile(a, 1 - q), np.quantile(b, 1 - q)
            top_a, top_b = a >= cut_a, b >= cut_b
            rows.append(
                {
                    "layer": layer,
                    "site": str(site),
                    "threshold_a": cut_a,
                    "threshold_b": cut_b,
                    "top_q_overlap": (top_a & top_b).sum() / max(top_a.sum(), 1),
                }
            )
    return pd.DataFrame(rows)


def _wide(summary: pd.DataFrame) -> pd.DataFrame:
    wide = summary.pivot_table(index=["layer", "name"], columns="quantity", values="mean")
    counts = summary[summary.quantity == "entropy_a"].set_index(["layer", "name"])["count"]
    wide = wide.join(counts.rename("tokens")).reset_index().rename(columns={"name": "site"})
    columns = ["layer", "site", "tokens", *[q for q in QUANTITIES if q in wide]]
    return wide[columns].sort_values(["layer", "site"], kind="stable").reset_index(drop=True)


def _page(title: str, info: dict, table: pd.DataFrame, figure) -> str:
    """A self-contained page: provenance, the figure (PNG inline) and the table."""
    image = ""
    if figure is not None:
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=150)
        data = base64.b64encode(buffer.getvalue()).decode()
        image = f'<img alt="diff" style="max-width:100%" src="data:image/png;base64,{data}">'
    facts = "".join(
        f"<li>{html.escape(k)}: {html.escape(str(info[k]))}</li>"
        for k in ("model_a", "model_b", "lens", "q", "data", "data_sha256", "samples", "dtype")
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;"
        "font-size:12px}td,th{padding:2px 6px;border-bottom:1px solid #ddd}</style></head><body>"
        f"<h1>{html.escape(title)}</h1><ul>{facts}</ul>"
        "<p>KL(a ‖ b) = Σ p_a (log p_a − log p_b), nats, per position, averaged. Rank change: "
        "the actual next token's rank under b minus under a. Overlap: share of a's top-q "
        "entropy positions that are in b's top q.</p>"
        f"{image}{table.to_html(index=False, float_format=lambda v: f'{v:.4g}')}</body></html>"
    )
