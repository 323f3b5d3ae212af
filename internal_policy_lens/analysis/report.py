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

import pandas as pd
import plotly.graph_objects as go
from plotly.offline import get_plotlyjs

from ..config import CompareConfig, ReportConfig
from ..folders import Folder
from ..lens_kinds import LENSES
from ..runs.io import RunFolder, model_name, open_run
from .charts import change_chart, compare_charts, extras_charts, flow_chart, split_chart
from .convergence import convergence_summary
from .explorer import explorer_data
from .split_figures import CHANGE_PANELS, FLOW_PANELS
from .uncertainty import LABELS, STATS, Resampled

ASSETS = Path(__file__).with_name("templates")
"""The page template, its styles and the token explorer's script."""


def report_run(cfg: ReportConfig) -> Path:
    """``ipl report``: read a finished run folder and write ``RUN/report.html``."""
    run = open_run(cfg.run)
    samples = run.shown_samples(None if cfg.samples is None else cfg.samples.split(","))
    split = None
    if cfg.splits.split is not None:
        from .split_outputs import resampled_run

        split = resampled_run(run, cfg.splits, cfg.convergence, cfg.splits.resample_seed)
    return write_run_report(
        run.path,
        tokens=run.tokens(samples=samples),
        summary=run.summary(),
        deltas=run.deltas(samples=samples),
        topk=run.topk(samples=samples),
        info=run.info,
        cfg=cfg,
        split=split,
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
    split: Resampled | None = None,
) -> Path:
    """Write ``out/report.html`` for one run's tables (and its ``responses.jsonl``).

    With ``split`` (a resampled split of the run), the flow and change charts draw one line per
    group with its 95% intervals, and the convergence section gets the groups' intervals.
    """
    cfg = cfg or ReportConfig(run=str(out))
    stages, convergence = _convergence_html(summary, int(info["model"]["n_layers"]), cfg)
    counts = token_counts(tokens)
    bands = "Bands are the 25th–75th percentile over tokens."
    if split is None:
        charts = [
            _chart(flow_chart(tokens, counts), "chart-flow"),
            _chart(change_chart(deltas, stages, cfg.convergence.tau, counts), "chart-change"),
        ]
    else:
        charts, convergence = _split_charts(split), convergence + _split_html(split)
        bands = (
            f"The charts by {split.split.name} read every token of the run; their bands are 95% "
            "intervals over resampled responses. Other bands are the 25th–75th percentile over "
            "tokens."
        )
    extras = extras_charts(summary, tokens, counts)
    charts += [_chart(fig, f"chart-{name.replace('_', '-')}") for name, fig in extras.items()]
    lens = info["config"]["lens"]
    note = getattr(LENSES.get(lens), "note", None)  # what the lens says under the extras charts
    if extras and note:
        charts.append(f'<p class="note" id="{lens}-lens-note">{html.escape(note)}</p>')
    data = explorer_data(tokens, topk, cfg, _records(Path(out) / "responses.jsonl"))
    data["lens"] = lens
    return _write_page(
        Path(out) / "report.html",
        title=f"{model_name(info)} ({lens} lens): internal policies",
        provenance=_provenance_html(info),
        charts="".join(charts),
        chart_note=bands + _shown_note(tokens, info),
        convergence=convergence,
        data=data,
    )


def write_compare_report(
    cfg: CompareConfig, runs: list[RunFolder], names: list[str], differences: list[str] = ()
) -> Path:
    """``OUT/report.html`` for several runs: relative-depth charts, provenance, convergence.

    ``differences`` (:func:`~internal_policy_lens.analysis.figures.run_differences`) are
    stated at the top of the page.
    """
    frames, rows, provenance, no_cosines = [], [], [], []
    for run, name in zip(runs, names):
        summary = run.summary()
        counts = token_counts(summary=summary, samples=run.info.get("samples"))
        frames.append(summary.assign(model=f"{name} ({counts})", n_layers=run.n_layers))
        if not (summary["quantity"] == "cosine").any():
            no_cosines.append(name)
        row = {"model": name, "run": str(run.path)}
        try:
            row.update(convergence_summary(summary, run.n_layers, cfg.convergence).row())
        except ValueError as err:
            row["note"] = str(err)
        rows.append(row)
        provenance.append(f"<h3>{html.escape(name)}</h3>{_provenance_html(run.info)}")
    charts = compare_charts(pd.concat(frames, ignore_index=True), no_cosines)
    warning = "".join(f'<p class="warning">warning: {html.escape(d)}</p>' for d in differences)
    return _write_page(
        Path(cfg.out) / "report.html",
        title=f"{len(runs)} runs on relative depth",
        provenance="".join(provenance),
        charts=warning + "".join(_chart(fig, f"chart-compare-{i}") for i, fig in enumerate(charts)),
        chart_note="Each point is a layer's mean over the run's tokens (no bands); the token "
        "explorer is in each run's own report.html (ipl report RUN).",
        convergence=_table_html(pd.DataFrame(rows)),
        data=None,
    )


def _split_charts(split: Resampled) -> list[str]:
    """The flow and change charts of a split: one line per group, intervals as bands."""
    tokens = ", ".join(f"{group} {n:,}" for group, n in split.split.tokens.items())
    what = f"by {split.split.name}; tokens {tokens}; bands: 95% intervals"
    summary = split.summary()
    return [
        _chart(split_chart(summary, FLOW_PANELS, f"Entropy flow {what}"), "chart-flow"),
        _chart(split_chart(summary, CHANGE_PANELS, f"Entropy change {what}"), "chart-change"),
    ]


def _split_html(split: Resampled) -> str:
    """The groups' measures, each as ``value [low, high]``, and the labels' shares."""
    table = split.convergence()
    rows = {"group": table["group"], "tokens": table["group"].map(split.split.tokens)}
    for stat in STATS:
        rows[stat] = [
            f"{v:.4g} [{lo:.4g}, {hi:.4g}]"
            for v, lo, hi in zip(table[stat], table[f"{stat}_low"], table[f"{stat}_high"])
        ]
    shares = [
        ", ".join(f"{name} {row['label_share_' + name]:.0%}" for name in LABELS)
        for _, row in table.iterrows()
    ]
    rows["label (share of resamples)"] = [f"{t} ({s})" for t, s in zip(table["label"], shares)]
    facts = split.facts()
    cut = f"; forking at H(final) >= {facts['threshold']:.4g} nats" if facts["q"] else ""
    head = (
        f"By {facts['split']}: 95% intervals over {facts['resamples']} resamples of the "
        f"responses (seed {facts['seed']}){cut}"
    )
    return f'<h3 id="split-intervals">{html.escape(head)}</h3>' + _table_html(pd.DataFrame(rows))


def _shown_note(tokens: pd.DataFrame, info: dict) -> str:
    """What the page's charts and explorer read, when it is not the whole run."""
    total = info.get("samples")
    shown = tokens["sample_id"].unique()
    if total is None or len(shown) >= total:
        return ""
    first, last = shown[0], shown[-1]
    return (
        f" The charts and the explorer read {len(shown)} of the run's {total} samples "
        f"({first} to {last}, a bound on what the page holds); the tables on this page and "
        "summary.csv cover every token. Choose others with `ipl report RUN --samples ID,ID`."
    )


def token_counts(
    tokens: pd.DataFrame | None = None, *, summary: pd.DataFrame | None = None, samples=None
) -> str:
    """``"N samples, M tokens"`` of a token table, or of a summary and run.json's samples."""
    if tokens is not None:
        samples = tokens["sample_id"].nunique()
        n = len(tokens.drop_duplicates(["sample_id", "position"]))
    else:  # every analysed token has one entropy row per (site, layer)
        n = int(summary[summary["quantity"] == "entropy"]["count"].max())
    return f"{samples} samples, {n:,} tokens"


def _records(path: Path) -> list[dict] | None:
    """The run's ``responses.jsonl`` records (the sample in context), or None without it."""
    if not path.is_file():
        return None
    from ..data.records import read_records

    return read_records(path)


def _convergence_html(summary: pd.DataFrame, n_layers: int, cfg: ReportConfig):
    """The FFN stages (for the change chart) and the convergence section's tables."""
    try:
        conv = convergence_summary(summary, n_layers, cfg.convergence)
    except ValueError as err:  # e.g. the run has no FFN sites
        return None, f"<p>No convergence summary: {html.escape(str(err))}</p>"
    suggestion = conv.suggestion
    head = (
        f"suggested BuPO layer: {suggestion.layer} (0-based)"
        if suggestion.layer is not None
        else "no layer suggested"
    )
    text = (
        _table_html(pd.DataFrame([conv.row()]))
        + f'<p id="layer-rule">{html.escape(head)}: {html.escape(suggestion.reason)}</p>'
        + _table_html(suggestion.evidence)
    )
    return conv.stages, text


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
    """run.json's precision, each fact once: a mode (older runs) or the mode, dtypes and why.

    The recorded reason is ``"<why>: <what runs>"``; what runs is the dtypes already shown, so
    only the why is added, and only where it is not the mode's own name (``exact``).
    """
    if not isinstance(precision, dict):
        return str(precision)
    mode = precision.get("mode")
    text = f"{mode}: {precision.get('products')} products, {precision.get('reductions')} reductions"
    why = str(precision.get("reason") or "").rpartition(": ")[0]
    return text if why in ("", mode) else f"{text} ({why})"


def _generation_text(info: dict) -> str:
    """The generation settings, with how many responses they made where run.json says."""
    gen = info.get("config", {}).get("generation")
    if not gen:
        return "not recorded"
    made = info.get("generated")
    if made == 0:
        return "none generated: every record had its response"
    sampler = (
        "greedy (temperature 0)"
        if gen.get("temperature") == 0
        else f"temperature {gen.get('temperature')}, top-p {gen.get('top_p')}"
    )
    text = (
        f"{sampler}, seed {gen.get('seed')}, at most {gen.get('max_new_tokens')} new tokens, "
        f"{gen.get('samples_per_prompt')} per prompt"
    )
    if made is None:  # runs written before run.json counted them
        return f"{text} (for the records without a response)"
    return f"{made} of {info.get('samples')} responses generated: {text}"


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
        "generation": _generation_text(info),
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


def _write_page(path: Path, *, title, provenance, charts, chart_note, convergence, data) -> Path:
    """Fill the template; ``data`` None: a page without the token explorer (``ipl compare``)."""
    explorer, nav = "", ""
    if data is not None:
        payload = json.dumps(data, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        explorer = _fill(
            "explorer.html",
            data=payload.replace("</", "<\\/"),  # never closes the script element early
            script=(ASSETS / "explorer.js").read_text(encoding="utf-8"),
        )
        nav = ' · <a href="#explorer">Logit lens and token explorer</a>'
    page = _fill(
        "report.html",
        title=html.escape(title),
        style=(ASSETS / "report.css").read_text(encoding="utf-8"),
        plotly=get_plotlyjs(),
        nav=nav,
        provenance=provenance,
        charts=charts or "<p>No charts: the run lacks their sites.</p>",
        chart_note=html.escape(chart_note),
        convergence=convergence,
        explorer=explorer,
    )
    return Folder(path.parent).create().write_text(path.name, page)


def _fill(template: str, **parts: str) -> str:
    """One pass over a template: text put in (plotly.js, data) is never scanned for markers."""
    text = (ASSETS / template).read_text(encoding="utf-8")
    return re.sub(r"\{\{ (\w+) \}\}", lambda m: parts[m.group(1)], text)
