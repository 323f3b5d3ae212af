"""The interactive report: its data and caps, bad input, and the page in real headless Chromium."""

import json
import shutil

import pandas as pd
import pytest
from helpers import browser_page
from typer.testing import CliRunner

from internal_policy_lens.analysis.report import explorer_data
from internal_policy_lens.cli import app
from internal_policy_lens.commands.entropy import run_entropy
from internal_policy_lens.commands.figures import report
from internal_policy_lens.config import EntropyConfig, ReportConfig

runner = CliRunner()


@pytest.fixture(scope="module")
def run_dir(tiny_dirs, tmp_path_factory):
    """A finished run (top-k 5, the default) of the tiny qwen2 model on four answered records."""
    root = tmp_path_factory.mktemp("report")
    rows = [
        {"question": f"What is {a}+{b}?", "response": f"{a}+{b} = {a + b}. \\boxed{{{a + b}}}"}
        for a, b in [(2, 3), (10, 4), (6, 7), (21, 30)]
    ]
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = EntropyConfig(model=str(tiny_dirs["qwen2"]), data=str(data), out=str(root / "run"))
    run_entropy(cfg, progress=False)
    return root / "run"


def _copy(run_dir, tmp_path):
    return shutil.copytree(run_dir, tmp_path / "run")


def test_run_writes_report_and_topk(run_dir):
    page = (run_dir / "report.html").read_text()
    assert 'id="report-data"' in page and "Plotly" in page
    assert "<script src=" not in page and "<link " not in page  # everything inline
    topk = pd.read_parquet(run_dir / "topk.parquet")
    tokens = pd.read_parquet(run_dir / "tokens.parquet")
    assert list(topk.columns) == [
        *("sample_id", "position", "layer", "site", "rank", "token_id", "token", "prob")
    ]
    assert len(topk) == 5 * len(tokens)


def test_explorer_data_is_capped(run_dir):
    tokens = pd.read_parquet(run_dir / "tokens.parquet")
    topk = pd.read_parquet(run_dir / "topk.parquet")
    full = explorer_data(tokens, topk, ReportConfig(run=str(run_dir)))
    assert full["cap"]["samples_shown"] == full["cap"]["samples_total"] == 4
    n_keys = len(full["keys"])
    per_position = n_keys * (1 + 2 * 5)
    first = len(full["samples"][0]["positions"])
    # Room for the first sample and part of the second: the second is left out, not cut.
    cfg = ReportConfig(run=str(run_dir), max_values=(first + 2) * per_position)
    capped = explorer_data(tokens, topk, cfg)
    assert capped["cap"]["samples_shown"] == 1
    assert len(capped["samples"][0]["positions"]) == first
    # Less than one sample: its first positions only.
    cut = explorer_data(tokens, topk, ReportConfig(run=str(run_dir), max_values=3 * per_position))
    assert cut["samples"][0]["positions"] == full["samples"][0]["positions"][:3]
    two = explorer_data(tokens, topk, ReportConfig(run=str(run_dir), max_samples=2))
    assert [s["id"] for s in two["samples"]] == [0, 1]
    assert two["cap"]["positions_shown"] < two["cap"]["positions_total"]


def test_report_of_a_folder_that_is_not_a_run(tmp_path):
    result = runner.invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 2
    assert "not a finished run folder" in result.output and "ipl entropy" in result.output
    result = runner.invoke(app, ["report", str(tmp_path / "nothing")])
    assert result.exit_code == 2 and "no such run folder" in result.output


def test_report_site_must_be_in_the_run(run_dir, tmp_path):
    run = _copy(run_dir, tmp_path)
    result = runner.invoke(app, ["report", str(run), "--site", "mlp"])
    assert result.exit_code == 2
    assert "site 'mlp' is not in the run; it has resid_pre" in result.output


def test_report_without_topk_says_how_to_add_it(run_dir, tmp_path):
    run = _copy(run_dir, tmp_path)
    (run / "topk.parquet").unlink()
    (run / "report.html").unlink()
    result = runner.invoke(app, ["report", str(run)])
    assert result.exit_code == 0, result.output
    page = (run / "report.html").read_text()
    data = json.loads(page.split('id="report-data">')[1].split("</script>")[0])
    assert data["topk"] == 0 and "topk_ids" not in data["samples"][0]
    assert "--topk 5" in page  # the explorer's note on how to add top-k


def test_report_open_without_a_browser_says_where_the_page_is(run_dir, tmp_path):
    run = _copy(run_dir, tmp_path)
    asked = []

    def no_browser(url):
        asked.append(url)
        return False  # what webbrowser.open returns where no browser can be started

    said = report(ReportConfig(run=str(run)), True, browser=no_browser).splitlines()
    assert asked == [(run / "report.html").resolve().as_uri()]
    assert said[1:] == [f"no browser found: open {run / 'report.html'}"]
    said = report(ReportConfig(run=str(run)), True, browser=lambda url: True).splitlines()
    assert len(said) == 1 and said[0].startswith(f"wrote {run / 'report.html'}")


def test_report_on_a_corrupted_parquet(run_dir, tmp_path):
    run = _copy(run_dir, tmp_path)
    for name in ("topk.parquet", "tokens.parquet"):
        good = (run / name).read_bytes()
        (run / name).write_bytes(good[: len(good) // 2])  # truncated, e.g. a full disk
        result = runner.invoke(app, ["report", str(run)])
        assert result.exit_code == 2, result.output
        assert f"{name}: not a readable Parquet file" in result.output
        assert len(result.output.strip().splitlines()) == 1
        (run / name).write_bytes(good)


def test_compare_writes_one_report_for_several_runs(run_dir, tmp_path):
    result = runner.invoke(app, ["compare", str(run_dir), str(run_dir), "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    page = (tmp_path / "report.html").read_text()
    for i in range(3):
        assert f'id="chart-compare-{i}"' in page
    assert page.count("ipl-tiny") == 0 and page.count("qwen2") >= 2  # both runs' provenance


@pytest.mark.slow
def test_report_in_headless_chromium(run_dir, tmp_path):
    tokens = pd.read_parquet(run_dir / "tokens.parquet")
    topk = pd.read_parquet(run_dir / "topk.parquet")
    with browser_page(run_dir / "report.html") as (page, errors, requests):
        # The explorer renders the first sample's tokens, one element per position.
        sample = tokens[tokens.sample_id == tokens.sample_id.min()]
        spans = page.locator('#token-text .tok[data-sample="0"]')
        positions = [int(spans.nth(i).get_attribute("data-position")) for i in range(spans.count())]
        assert positions == sorted(sample["position"].unique())
        # Clicking a token fills #position-detail: the layer grid and the top-k table.
        position = positions[3]
        page.click(f'.tok[data-sample="0"][data-position="{position}"]')
        detail = page.locator("#position-detail")
        cells = detail.locator("#layer-grid td[data-site]")
        here = sample[sample.position == position]
        assert cells.count() == len(here)
        for i in range(cells.count()):
            cell = cells.nth(i)
            row = here[(here.site == cell.get_attribute("data-site"))]
            row = row[row.layer == int(cell.get_attribute("data-layer"))]
            assert abs(float(cell.get_attribute("data-entropy")) - row.entropy.iloc[0]) < 1e-3
        shown = detail.locator("[data-rank]")
        want = topk[(topk.sample_id == 0) & (topk.position == position)]
        want = want[want.site.astype(str).isin(["resid_post", "final"])]
        assert shown.count() == len(want) > 0
        for i in range(shown.count()):
            cell = shown.nth(i)
            row = want[
                (want.site == cell.get_attribute("data-site"))
                & (want.layer == int(cell.get_attribute("data-layer")))
                & (want["rank"] == int(cell.get_attribute("data-rank")))
            ]
            assert len(row) == 1
            assert int(cell.get_attribute("data-token-id")) == row.token_id.iloc[0]
            assert abs(float(cell.get_attribute("data-prob")) - row.prob.iloc[0]) < 1e-5
        # The actual next token is marked where it appears in the top-k.
        next_id = sample[sample.position == position + 1].token_id.iloc[0]
        marked = detail.locator("td.actual")
        assert marked.count() == int((want.token_id == next_id).sum())
        # Keyboard: the right arrow moves to the next token.
        page.keyboard.press("ArrowRight")
        assert f"position {positions[4]}:" in detail.locator("h3").inner_text()
        # Another sample: its first position is selected, the panel shows it, the keys go on.
        page.focus("#sample-select")
        page.select_option("#sample-select", index=2)
        third = tokens[tokens.sample_id == sorted(tokens.sample_id.unique())[2]]
        where = sorted(third["position"].unique())
        assert detail.locator("h3").inner_text().startswith(f"Sample 2, position {where[0]}:")
        cells = detail.locator("#layer-grid td[data-site]")
        here = third[third.position == where[0]].astype({"site": str})
        shown = {
            (c.get_attribute("data-site"), int(c.get_attribute("data-layer"))): float(
                c.get_attribute("data-entropy")
            )
            for c in cells.all()
        }
        assert len(shown) == len(here)
        for row in here.itertuples():
            assert shown[row.site, row.layer] == pytest.approx(row.entropy, abs=1e-3)
        selected = page.locator("#token-text .tok.selected")
        assert selected.count() == 1 and selected.get_attribute("data-sample") == "2"
        page.keyboard.press("ArrowRight")
        assert f"Sample 2, position {where[1]}:" in detail.locator("h3").inner_text()
        assert page.locator("#token-text .tok.selected").get_attribute("data-index") == "1"
        # The charts render: plotly's SVG with drawn traces.
        for chart in ("chart-flow", "chart-change"):
            assert page.locator(f"#{chart} svg.main-svg").count() > 0
            assert page.locator(f"#{chart} .scatterlayer .trace").count() > 0
        page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
    assert errors == [] and requests == []
    assert (tmp_path / "report.png").stat().st_size > 10_000
