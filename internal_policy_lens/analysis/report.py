"""Run folders -> one self-contained interactive HTML page: what ``ipl report`` writes.

The page (``templates/report.html``, ``report.css`` and ``explorer.js`` beside it)
gets everything inline: plotly.js, the charts (plotly figures with hover values), the run's
provenance and convergence summary, and the token explorer's data as one JSON block that
``explorer.js`` reads. It works offline, opened from disk. The explorer embeds the first samples
only (:class:`~internal_policy_lens.config.ReportConfig`: ``max_samples`` and ``max_values``;
the cap is stated in the page). Nothing here imports torch.
"""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.offline import get_plotlyjs

from ..config import CompareConfig, ReportConfig
from ..runs.io import RunFolder, model_name, open_run
from .charts import change_chart, compare_charts, flow_chart
from .convergence import convergence_summary, suggest_layer

ASSETS = Path(__file__).with_name("templates")
"""The page template, its styles and the token explorer's script."""


def report_run(cfg: ReportConfig) -> Path:
    """``ipl report``: read a finished run folder and write ``RUN/report.html``."""
    run = open_run(cfg.run)
    return write_run_report(
        run.path,
        tokens=run.tokens(),
        summary=run.summary(),
        deltas=run.deltas(),
        topk=run.topk(),
        info=run.info,
        cfg=cfg,
    )


def write_run_report(
    out: str | Path,
    *,
    tokens: pd.DataFrame,
    summary: pd.DataFrame,
    deltas: pd.DataFrame,
    topk: pd.DataFrame | None,
    info: dict,
    cfg: ReportConfig | None = None,
) -> Path:
    """Write ``out/report.html`` for one run's tables; return its path."""
    cfg = cfg or ReportConfig(run=str(out))
    name = model_name(info)
    conv_cfg = cfg.convergence
    stages = None
    try:
        conv = convergence_summary(summary, int(info["model"]["n_layers"]), conv_cfg)
        stages = conv.stages
        convergence = _table_html(pd.DataFrame([conv.row()]))
        convergence += f"<pre>{html.escape(str(suggest_layer(summary, conv_cfg)))}</pre>"
    except ValueError as err:  # e.g. the run has no FFN sites
        convergence = f"<p>No convergence summary: {html.escape(str(err))}</p>"
    charts = [
        _chart(flow_chart(tokens), "chart-flow"),
        _chart(change_chart(deltas, stages, conv_cfg.tau), "chart-change"),
    ]
    data = explorer_data(tokens, topk, cfg)
    return _write_page(
        Path(out) / "report.html",
        title=f"{name} ({info['config']['lens']} lens): internal policies",
        provenance=_provenance_html(info),
        charts="".join(c for c in charts if c),
        convergence=convergence,
        data=data,
    )


def write_compare_report(cfg: CompareConfig, runs: list[RunFolder], names: list[str]) -> Path:
    """``OUT/report.html`` for several runs: relative-depth charts, provenance, convergence."""
    frames, rows, provenance = [], [], []
    for run, name in zip(runs, names):
        summary = run.summary()
        frames.append(summary.assign(model=name, n_layers=run.n_layers))
        row = {"model": name, "run": str(run.path)}
        try:
            row.update(convergence_summary(summary, run.n_layers, cfg.convergence).row())
        except ValueError as err:
            row["note"] = str(err)
        rows.append(row)
        provenance.append(f"<h3>{html.escape(name)}</h3>{_provenance_html(run.info)}")
    charts = compare_charts(pd.concat(frames, ignore_index=True))
    note = "The token explorer is in each run's own report.html (ipl report RUN)."
    return _write_page(
        Path(cfg.out) / "report.html",
        title=f"{len(runs)} runs on relative depth",
        provenance="".join(provenance),
        charts="".join(_chart(fig, f"chart-compare-{i}") for i, fig in enumerate(charts)),
        convergence=_table_html(pd.DataFrame(rows)),
        data={"samples": [], "note": note},
    )


def explorer_data(tokens: pd.DataFrame, topk: pd.DataFrame | None, cfg: ReportConfig) -> dict:
    """The token explorer's JSON: per embedded sample, its tokens, entropies and top-k.

    Entropies are ``[positions][keys]`` (nats, 3 decimals), top-k ids and probabilities
    ``[positions][keys][K]`` (probabilities to 5 decimals); ``keys`` lists the (site, layer)
    columns. ``cap`` says what was left out.
    """
    keys = tokens[["site", "layer"]].drop_duplicates().astype({"site": str})
    keys = [(s, int(layer)) for s, layer in keys.itertuples(index=False)]
    k = 0 if topk is None else int(topk["rank"].max())
    sites = list(dict.fromkeys(site for site, _ in keys))
    if cfg.site is not None and cfg.site not in sites:
        raise ValueError(f"site {cfg.site!r} is not in the run; it has {', '.join(sites)}")
    default_site = cfg.site or ("resid_post" if "resid_post" in sites else sites[0])
    samples, used, vocab = [], 0, {}
    ids = sorted(tokens["sample_id"].unique(), key=lambda v: (str(type(v)), v))
    per_position = len(keys) * (1 + 2 * k)
    for sample in ids[: cfg.max_samples]:
        rows = tokens[tokens["sample_id"] == sample]
        wide = rows.pivot(index="position", columns=["site", "layer"], values="entropy")
        room = (cfg.max_values - used) // per_position
        if room <= 0 or (samples and room < len(wide)):
            break
        wide = wide.iloc[:room]
        first = rows.drop_duplicates("position").set_index("position").loc[wide.index]
        entry = {
            "id": _jsonable(sample),
            "positions": wide.index.tolist(),
            "token_ids": first["token_id"].astype(int).tolist(),
            "entropy": wide[[(s, layer) for s, layer in keys]].to_numpy().round(3).tolist(),
        }
        if "token" in first:
            vocab.update(zip(entry["token_ids"], first["token"].astype(str)))
        if k:
            entry.update(_sample_topk(topk, sample, wide.index, keys, k, vocab))
        samples.append(entry)
        used += len(wide) * per_position
    shown_positions = sum(len(s["positions"]) for s in samples)
    total_positions = tokens.drop_duplicates(["sample_id", "position"]).shape[0]
    return {
        "keys": keys,
        "sites": sites,
        "default_site": default_site,
        "topk": k,
        "vocab": {str(i): t for i, t in vocab.items()},
        "samples": samples,
        "cap": {
            "max_samples": cfg.max_samples,
            "max_values": cfg.max_values,
            "samples_shown": len(samples),
            "samples_total": len(ids),
            "positions_shown": shown_positions,
            "positions_total": int(total_positions),
        },
    }


def _sample_topk(topk, sample, positions, keys, k, vocab) -> dict:
    rows = topk[(topk["sample_id"] == sample) & topk["position"].isin(positions)]
    rows = rows.astype({"site": str}).set_index(["position", "site", "layer", "rank"])
    index = pd.MultiIndex.from_tuples(
        [(p, s, layer, r) for p in positions for s, layer in keys for r in range(1, k + 1)]
    )
    rows = rows.reindex(index)  # [positions * keys * K], NaN where a policy has fewer
    if "token" in rows:
        known = rows.dropna(subset=["token_id"])
        vocab.update(zip(known["token_id"].astype(int), known["token"].astype(str)))
    shape = (len(positions), len(keys), k)
    ids = rows["token_id"].fillna(-1).astype(int).to_numpy().reshape(shape)
    probs = rows["prob"].fillna(0.0).to_numpy(dtype=float).reshape(shape).round(5)
    return {"topk_ids": ids.tolist(), "topk_probs": probs.tolist()}


def _jsonable(value):
    return value.item() if isinstance(value, np.generic) else value


def _chart(fig: go.Figure | None, div_id: str) -> str:
    if fig is None:
        return ""
    body = fig.to_html(
        full_html=False,
        include_plotlyjs=False,
        div_id=div_id,
        config={"displaylogo": False, "responsive": True},
    )
    return f'<div class="chart">{body}</div>'


def _precision_text(precision) -> str:
    """run.json's precision: a mode (older runs) or the mode, dtypes and why."""
    if not isinstance(precision, dict):
        return str(precision)
    return (
        f"{precision.get('mode')}: {precision.get('products')} products, "
        f"{precision.get('reductions')} reductions ({precision.get('reason')})"
    )


def _provenance_html(info: dict) -> str:
    model, config = info.get("model", {}), info.get("config", {})
    rows = {
        "model": model.get("name_or_path"),
        "architecture": f"{model.get('architecture')}, {model.get('n_layers')} layers, "
        f"d_model {model.get('d_model')}, vocabulary {model.get('vocab_size')}",
        "weights": f"{model.get('dtype')} on {model.get('device')}",
        "lens": config.get("lens"),
        "precision": _precision_text(info.get("precision")),
        "data": config.get("data"),
        "data sha256": config.get("data_sha256"),
        "samples, rows": f"{info.get('samples')}, {info.get('rows')}",
        "top-k": config.get("topk", 0) or "none",
        "started / finished": f"{info.get('started')} / {info.get('finished')}",
        "command": " ".join(map(str, info.get("command") or [])),
        "versions": ", ".join(f"{k} {v}" for k, v in (info.get("versions") or {}).items()),
    }
    return _table_html(pd.DataFrame({"": list(rows), "value": [str(v) for v in rows.values()]}))


def _table_html(frame: pd.DataFrame) -> str:
    return frame.to_html(index=False, na_rep="", classes="facts", border=0, escape=True)


def _write_page(path: Path, *, title, provenance, charts, convergence, data) -> Path:
    page = (ASSETS / "report.html").read_text(encoding="utf-8")
    payload = json.dumps(data, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    parts = {
        "title": html.escape(title),
        "style": (ASSETS / "report.css").read_text(encoding="utf-8"),
        "plotly": get_plotlyjs(),
        "provenance": provenance,
        "charts": charts or "<p>No charts: the run lacks their sites.</p>",
        "convergence": convergence,
        "data": payload.replace("</", "<\\/"),  # never closes the script element early
        "explorer": (ASSETS / "explorer.js").read_text(encoding="utf-8"),
    }
    # One pass over the template: text put in (plotly.js, data) is never scanned for markers.
    page = re.sub(r"\{\{ (\w+) \}\}", lambda m: parts[m.group(1)], page)
    return RunFolder(path.parent).create().write_text(path.name, page)
