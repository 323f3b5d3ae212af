"""The report page's contract: logit-lens grid, the sample in context, defaults, extras, compare.

The grid is ``#logit-lens``; each cell carries ``data-layer``, ``data-site``, ``data-position``
and ``data-token-id`` (its rank-1 token); ``#sample-context`` carries ``data-correct`` where the
sample has a reference answer. Checked in headless Chromium against the run's own files.
"""

import json
import math
import re
import shutil

import pandas as pd
import pytest
from helpers import browser_page
from typer.testing import CliRunner

from internal_policy_lens.analysis import charts, plots
from internal_policy_lens.analysis.explorer import explorer_data
from internal_policy_lens.analysis.report import write_run_report
from internal_policy_lens.cli import app
from internal_policy_lens.commands.entropy import run_entropy
from internal_policy_lens.config import EntropyConfig, ReportConfig
from internal_policy_lens.data.answers import math_reward
from internal_policy_lens.statistics import STATISTICS, in_group
from internal_policy_lens.tables import summary_table

runner = CliRunner()
ROWS = [  # right, wrong, no \boxed{} at all, right
    {"question": "What is 2+3?", "response": "2+3 = 5. \\boxed{5}", "answer": "5"},
    {"question": "What is 10+4?", "response": "10+4 = 13. \\boxed{13}", "answer": "14"},
    {"question": "What is 6+7?", "response": "6+7 is 13", "answer": "13"},
    {"question": "What is 21+30?", "response": "21+30 = 51. \\boxed{51}", "answer": "51"},
]
EXTRA_CHARTS = {  # the charts of summary.csv's means (the rank chart reads the token table)
    "chart-kl-internal-final": "kl_internal_final",
    "chart-top1-agrees": "top1_agrees",
    "chart-cosine": "cosine",
}


@pytest.fixture(scope="module")
def answered(tiny_dirs, tmp_path_factory):
    """A finished raw-lens run with --extras (top-k 5) on four records with reference answers."""
    root = tmp_path_factory.mktemp("answered")
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    cfg = EntropyConfig(
        model=str(tiny_dirs["qwen2"]), data=str(data), out=str(root / "run"), extras=True
    )
    run_entropy(cfg, progress=False)
    return root / "run"


def _tables(run):
    return pd.read_parquet(run / "tokens.parquet"), pd.read_parquet(run / "topk.parquet")


def _plotly(page, div_id):
    """A chart's traces (name, x, y) and title, as plotly drew them."""
    return page.evaluate(
        """id => { const d = document.getElementById(id);
        return {title: d.layout.title.text,
                traces: d.data.map(t => ({name: t.name, x: Array.from(t.x), y: Array.from(t.y),
                                          legend: t.showlegend !== false}))}; }""",
        div_id,
    )


def test_summary_has_the_extras_per_layer_and_site(answered):
    tokens = pd.read_parquet(answered / "tokens.parquet")
    summary = pd.read_csv(answered / "summary.csv")
    assert summary_table(tokens).shape == summary.shape
    for quantity in ("next_token_rank", "kl_internal_final", "top1_agrees"):
        rows = summary[summary.quantity == quantity]
        assert len(rows) == tokens[["layer", "site"]].drop_duplicates().shape[0]
        for row in rows.itertuples():
            values = [
                float(v)
                for v, layer, site in zip(tokens[quantity], tokens.layer, tokens.site)
                if layer == row.layer and site == row.name and not math.isnan(float(v))
            ]
            assert row.count == len(values)
            assert row.mean == pytest.approx(math.fsum(values) / len(values), abs=1e-9)


def _median_ranks(tokens):
    """Per site, each layer's median rank of the actual next token (-1: no next token)."""
    ranked = tokens[tokens.next_token_rank >= 1].astype({"site": str})
    return {
        site: group.groupby("layer").next_token_rank.median().tolist()
        for site, group in ranked.groupby("site")
    }


def test_rank_chart_and_next_token_png_plot_the_median(answered):
    tokens, _ = _tables(answered)
    medians = _median_ranks(tokens)
    fig = charts.median_chart(tokens, "next_token_rank", STATISTICS["next_token_rank"].chart)
    assert "median" in fig.layout.title.text and "median" in fig.layout.yaxis.title.text
    drawn = {t.name: list(t.y) for t in fig.data if t.showlegend is not False}
    assert set(drawn) == set(medians) & {*plots.FLOW_SITES, "final"}
    assert len(fig.data) == 3 * len(drawn)  # the line and its band's two edges
    for site, ys in drawn.items():
        assert ys == medians[site]
    png = plots.next_token_extras(tokens).axes[0]
    assert "median" in png.get_ylabel()
    for line in png.lines:
        assert list(line.get_ydata()) == medians[line.get_label()]
    # Whole ranks label the log axis (1, 2, 5, 10, ...), from rank 1 up to the largest shown.
    low, high = fig.layout.yaxis.range
    top = max(max(t.y) for t in fig.data)
    assert 0.85 < 10**low < 1 and top <= 10**high < 200
    ticks = [t for t in (1, 2, 5, 10, 20, 50, 100) if math.log10(t) <= high]
    assert list(fig.layout.yaxis.tickvals) == ticks
    assert list(fig.layout.yaxis.ticktext) == [str(t) for t in ticks]


def test_explorer_data_context_defaults_and_digits(answered):
    tokens, topk = _tables(answered)
    records = [json.loads(line) for line in (answered / "responses.jsonl").read_text().splitlines()]
    data = explorer_data(tokens, topk, ReportConfig(run=str(answered)), records)
    verdicts = [s["context"]["correct"] for s in data["samples"]]
    assert verdicts == [math_reward(r["response"], r["answer"]) == 1.0 for r in ROWS]
    assert verdicts == [True, False, False, True]  # both marks are exercised
    for sample, row in zip(data["samples"], ROWS):
        context = sample["context"]
        assert row["question"] in context["prompt"] and context["answer"] == row["answer"]
        # The last response token is no position's input; the page still shows it.
        assert context["tail"] == row["response"][-1]
        # Default colouring: the (site, layer) whose entropy varies most over the positions.
        mine = tokens[tokens.sample_id == sample["id"]]
        spread = {}
        for (site, layer), group in mine.groupby(["site", "layer"], observed=True):
            values = group.entropy.astype(float).tolist()
            mean = math.fsum(values) / len(values)
            spread[str(site), int(layer)] = math.fsum((v - mean) ** 2 for v in values)
        assert tuple(data["keys"][sample["default_key"]]) == max(spread, key=spread.get)
        # Probabilities keep 5 significant digits, however small.
        want = topk[topk.sample_id == sample["id"]].set_index(["position", "site", "layer", "rank"])
        for i, position in enumerate(sample["positions"][:3]):
            for k, (site, layer) in enumerate(data["keys"]):
                for r, shown in enumerate(sample["topk_probs"][i][k]):
                    true = float(want.loc[(position, site, layer, r + 1), "prob"])
                    assert shown == pytest.approx(true, rel=1e-4)


@pytest.mark.slow
def test_logit_lens_grid_in_headless_chromium(answered):
    tokens, topk = _tables(answered)
    rank1 = topk[topk["rank"] == 1].astype({"site": str})
    n_layers = int(tokens.layer.max()) + 1
    with browser_page(answered / "report.html", width=700) as (page, errors, requests):
        assert page.locator("#lens-site-select").input_value() == "resid_post"
        assert "raw lens" in page.locator("#lens-note").inner_text()
        for index in range(len(ROWS)):
            page.select_option("#sample-select", index=index)
            sample = sorted(tokens.sample_id.unique())[index]
            for site in ("resid_post", "mlp_out"):
                page.select_option("#lens-site-select", site)
                cells = page.eval_on_selector_all(
                    "#logit-lens td[data-site]",
                    """cells => cells.map(c => [Number(c.dataset.layer), c.dataset.site,
                        Number(c.dataset.position), Number(c.dataset.tokenId), c.title])""",
                )
                want = rank1[(rank1.sample_id == sample) & rank1.site.isin([site, "final"])]
                got = {(layer, s, pos): tid for layer, s, pos, tid, _ in cells}
                assert len(got) == len(cells) == len(want)
                assert {s for _, s, _ in got} == {site, "final"}
                for row in want.itertuples():
                    assert got[row.layer, row.site, row.position] == row.token_id
                assert (
                    len(got)
                    == (n_layers + 1) * tokens[tokens.sample_id == sample].position.nunique()
                )
                assert all("#1 " in c[4] and "#5 " in c[4] and "nats" in c[4] for c in cells)
        # Positions beyond the width scroll sideways inside the grid's box, not the page.
        box = page.locator("#logit-lens-scroll")
        assert box.evaluate("e => getComputedStyle(e).overflowX") == "auto"
        assert box.evaluate("e => e.scrollWidth > e.clientWidth")
        # Clicking a grid cell opens that position's details.
        page.locator("#logit-lens td[data-site]").nth(2).click()
        assert "position" in page.locator("#position-detail h3").inner_text()
        # Table headers keep their words whole at this width: each lies on one line.
        lines = page.eval_on_selector_all(
            "table.facts th",
            """ths => ths.filter(th => th.textContent).map(th => {
                const r = document.createRange(); r.selectNodeContents(th);
                return [th.textContent, r.getClientRects().length]; })""",
        )
        assert len(lines) > 5 and [t for t, n in lines if n != 1] == []
    assert errors == [] and requests == []


@pytest.mark.slow
def test_sample_context_defaults_and_extras_in_headless_chromium(answered):
    tokens, topk = _tables(answered)
    summary = pd.read_csv(answered / "summary.csv")
    records = [json.loads(line) for line in (answered / "responses.jsonl").read_text().splitlines()]
    data = explorer_data(tokens, topk, ReportConfig(run=str(answered)), records)
    with browser_page(answered / "report.html") as (page, errors, requests):
        for index, row in enumerate(ROWS):
            page.select_option("#sample-select", index=index)
            context = page.locator("#sample-context")
            verdict = math_reward(row["response"], row["answer"]) == 1.0
            assert context.get_attribute("data-correct") == str(verdict).lower()
            text = context.inner_text()
            assert row["question"] in text and row["response"] in text and row["answer"] in text
            assert page.locator("#token-text .tail").inner_text() == row["response"][-1]
            # The tokens are coloured at the sample's most varied (site, layer).
            site, layer = data["keys"][data["samples"][index]["default_key"]]
            assert page.locator("#site-select").input_value() == site
            assert page.locator("#layer-select").input_value() == str(layer)
        # The extras charts' points are summary.csv's means.
        counts = f"4 samples, {len(tokens.drop_duplicates(['sample_id', 'position'])):,} tokens"
        for div_id, quantity in EXTRA_CHARTS.items():
            chart = _plotly(page, div_id)
            assert counts in chart["title"]
            rows = summary[summary.quantity == quantity]
            drawn = {t["name"] for t in chart["traces"]}
            shown = {"attn", "ffn"} if quantity == "cosine" else {*plots.FLOW_SITES, "final"}
            assert drawn == set(rows.name) & shown
            for trace in chart["traces"]:
                want = rows[rows.name == trace["name"]].sort_values("layer")
                assert trace["x"] == want.layer.tolist()
                assert trace["y"] == pytest.approx(want["mean"].tolist(), rel=1e-12)
        # The rank chart draws the medians that next_token.png draws, on a log axis whose
        # labels are whole ranks at their own heights (no "2 5" for 20 and 50, nothing below 1).
        rank = _plotly(page, "chart-next-token-rank")
        assert counts in rank["title"] and "median" in rank["title"]
        medians = _median_ranks(tokens)
        for trace in [t for t in rank["traces"] if t["legend"]]:
            assert trace["y"] == medians[trace["name"]]
        ticks = page.eval_on_selector_all(
            "#chart-next-token-rank .ytick text",
            """ts => ts.map(t => { const b = t.getBoundingClientRect();
                return [t.textContent, (b.top + b.bottom) / 2]; })""",
        )
        values = [(int(text.replace(",", "")), y) for text, y in ticks]
        assert len(values) >= 3 and min(v for v, _ in values) == 1
        (v0, y0), (v1, y1) = values[0], values[-1]
        per_decade = (y1 - y0) / math.log10(v1 / v0)
        for v, y in values:
            assert y == pytest.approx(y0 + per_decade * math.log10(v / v0), abs=1.0)
        for div_id in ("chart-flow", "chart-change"):
            assert counts in _plotly(page, div_id)["title"]
        assert page.locator("#raw-lens-note").count() == 1
        # The convergence evidence is a table, not a text dump.
        section = page.locator("#convergence")
        assert section.locator("pre").count() == 0
        assert section.locator("table").count() == 2
        assert "ffn_delta" in section.locator("table").nth(1).inner_text()
        assert "layer" in page.locator("#layer-rule").inner_text()
    assert errors == [] and requests == []


def test_raw_lens_note_only_under_the_raw_lens_with_extras(answered, tmp_path):
    tokens, topk = _tables(answered)
    summary = pd.read_csv(answered / "summary.csv")
    deltas = pd.read_parquet(answered / "deltas.parquet")
    info = json.loads((answered / "run.json").read_text())
    plain = summary[summary.quantity.isin(["entropy", "delta"])]  # a run without --extras
    bare = tokens.drop(columns=list(in_group("extras")))
    cases = [("raw", tokens, summary, True), ("raw", bare, plain, False)]
    cases.append(("norm", tokens, summary, False))
    for i, (lens, rows, table, shown) in enumerate(cases):
        out = tmp_path / str(i)
        run_info = {**info, "config": {**info["config"], "lens": lens}}
        write_run_report(out, tokens=rows, summary=table, deltas=deltas, topk=topk, info=run_info)
        page = (out / "report.html").read_text()
        assert ('id="raw-lens-note"' in page) == shown
        assert ('id="chart-kl-internal-final"' in page) == (table is summary)
        assert ('id="chart-next-token-rank"' in page) == (rows is tokens)


def _provenance(page: str, row: str) -> str:
    """The value of one row of the page's provenance table."""
    section = page.split('<section id="provenance">')[1]
    return re.search(rf"<td>{row}</td>\s*<td>(.*?)</td>", section, re.S).group(1)


def test_provenance_states_generation_and_precision_once(answered, tmp_path):
    tokens, topk = _tables(answered)
    summary = pd.read_csv(answered / "summary.csv")
    deltas = pd.read_parquet(answered / "deltas.parquet")
    info = json.loads((answered / "run.json").read_text())
    assert info["generated"] == 0  # every record of the fixture has its response
    generation = {"max_new_tokens": 12, "temperature": 0.7, "top_p": 1.0, "seed": 3}
    generation["samples_per_prompt"] = 1
    settings = "temperature 0.7, top-p 1.0, seed 3, at most 12 new tokens, 1 per prompt"
    fast = {"mode": "fast", "products": "bfloat16", "reductions": "float32"}
    fast["reason"] = "CUDA runs bfloat16 natively: bfloat16 products"
    cases = [  # (generated, temperature, precision) -> the two rows
        (0, 0.7, info["precision"], "none generated: every record had its response"),
        (2, 0.7, fast, f"2 of 4 responses generated: {settings}"),
        (None, 0.7, "exact", f"{settings} (for the records without a response)"),
        (4, 0, "exact", "4 of 4 responses generated: greedy (temperature 0), seed 3, "),
    ]
    precisions = [
        "exact: float32 products, float32 reductions",
        "fast: bfloat16 products, float32 reductions (CUDA runs bfloat16 natively)",
        "exact",
        "exact",
    ]
    for i, ((made, temperature, precision, want), shown) in enumerate(zip(cases, precisions)):
        config = {**info["config"], "generation": {**generation, "temperature": temperature}}
        run_info = {**info, "config": config, "generated": made, "precision": precision}
        if made is None:
            del run_info["generated"]  # a run.json written before the count was recorded
        out = tmp_path / str(i)
        write_run_report(
            out, tokens=tokens, summary=summary, deltas=deltas, topk=topk, info=run_info
        )
        page = (out / "report.html").read_text()
        assert _provenance(page, "generation").startswith(want)
        assert _provenance(page, "precision") == shown
    assert info["precision"]["reason"] == "exact: float32 products and reductions"


def test_navigation_follows_the_page(answered, other, tmp_path):
    with pytest.warns(UserWarning, match="differ in"):
        result = runner.invoke(app, ["compare", str(answered), str(other), "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    for path in (answered / "report.html", tmp_path / "report.html"):
        page = path.read_text()
        nav = page.split("<nav>")[1].split("</nav>")[0]
        sections = re.findall(r'<section id="(\w+)"', page)
        assert re.findall(r'href="#(\w+)"', nav) == sections
        assert len(sections) == (4 if path.parent == answered else 3)


@pytest.fixture(scope="module")
def other(tiny_dirs, tmp_path_factory):
    """A norm-lens run without extras on the first two records."""
    root = tmp_path_factory.mktemp("other")
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    cfg = EntropyConfig(
        model=str(tiny_dirs["qwen2"]),
        data=str(data),
        out=str(root / "run"),
        lens="norm",
        max_samples=2,
    )
    run_entropy(cfg, progress=False)
    return root / "run"


@pytest.mark.slow
def test_compare_says_how_runs_differ_in_headless_chromium(answered, other, tmp_path):
    with pytest.warns(UserWarning) as caught:
        result = runner.invoke(app, ["compare", str(answered), str(other), "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    said = [str(w.message) for w in caught if "differ in" in str(w.message)]
    assert [s.split(":")[0] for s in said] == [
        f"the runs differ in {what}" for what in ("lens", "samples", "extras")
    ]
    assert "2 samples of data.jsonl" in said[1]
    summary = pd.read_csv(answered / "summary.csv")
    n_layers = int(summary.layer.max()) + 1
    with browser_page(tmp_path / "report.html") as (page, errors, requests):
        assert page.locator("#explorer").count() == 0  # no empty token explorer
        warnings = page.locator(".warning").all_inner_texts()
        assert len(warnings) == 3 and all("differ in" in w for w in warnings)
        assert "25th" not in page.locator("#charts .note").inner_text()  # no bands claimed
        # The layer-output panel's depth axis is comparison.png's: layer 0's input at 0.
        first = _plotly(page, "chart-compare-0")["traces"][0]
        post = summary[(summary.quantity == "entropy") & (summary.name == "resid_post")]
        pre0 = summary[(summary.quantity == "entropy") & (summary.name == "resid_pre")]
        assert first["x"] == [0.0, *((post.layer + 1) / n_layers).tolist()]
        assert first["y"][0] == pytest.approx(pre0[pre0.layer == 0]["mean"].iloc[0])
        names = [t["name"] for t in _plotly(page, "chart-compare-0")["traces"]]
        assert "(4 samples, " in names[0] and "(2 samples, " in names[1]
        # The cosine panels: drawn for the run with extras, the other one named in the title.
        for div_id in ("chart-compare-3", "chart-compare-4"):
            chart = _plotly(page, div_id)
            assert [t["name"] for t in chart["traces"]] == names[:1]
            assert f"no cosines: {names[1].split(' (2 samples')[0]}" in chart["title"]
    assert errors == [] and requests == []


def test_compare_png_names_runs_without_cosines():
    frame = pd.DataFrame(
        {
            "quantity": ["cosine", "cosine", "entropy"],
            "layer": [0, 0, 0],
            "name": ["attn", "ffn", "resid_post"],
            "mean": [0.1, 0.2, 1.0],
            "model": ["with", "with", "without"],
            "n_layers": [1, 1, 1],
        }
    )
    fig = plots.compare_cosines(frame)
    labels = [t.get_text() for t in fig.legends[0].get_texts()] if fig.legends else []
    assert "without" not in labels
    assert any("without" in t.get_text() for t in fig.texts)


def test_report_page_without_records_still_renders(answered, tmp_path):
    run = shutil.copytree(answered, tmp_path / "run")
    (run / "responses.jsonl").unlink()
    result = runner.invoke(app, ["report", str(run)])
    assert result.exit_code == 0, result.output
    page = (run / "report.html").read_text()
    data = json.loads(page.split('id="report-data">')[1].split("</script>")[0])
    assert "context" not in data["samples"][0]


@pytest.mark.slow
def test_small_probabilities_show_their_size_in_headless_chromium(answered, tmp_path):
    tokens, topk = _tables(answered)
    peaked = topk.assign(prob=topk.prob.where(topk["rank"] == 1, topk.prob * 1e-4))
    info = json.loads((answered / "run.json").read_text())
    summary = pd.read_csv(answered / "summary.csv")
    deltas = pd.read_parquet(answered / "deltas.parquet")
    out = tmp_path / "peaked"
    write_run_report(out, tokens=tokens, summary=summary, deltas=deltas, topk=peaked, info=info)
    with browser_page(out / "report.html") as (page, errors, requests):
        page.locator("#token-text .tok").nth(2).click()
        shown = page.eval_on_selector_all(
            "#topk-table td[data-prob]", "cs => cs.map(c => [Number(c.dataset.prob), c.innerText])"
        )
        small = [(p, text) for p, text in shown if p < 0.001]
        assert len(small) == 4 * len(shown) // 5  # ranks 2-5
        for p, text in small:
            assert float(text.split()[-1]) == pytest.approx(p, rel=0.05)  # not 0.000
    assert errors == [] and requests == []
