"""Splits of a run's tokens: groups and per-group summaries against a naive float64 computation."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from matplotlib.collections import PolyCollection
from typer.testing import CliRunner

from internal_policy_lens.analysis.charts import split_chart
from internal_policy_lens.analysis.convergence import convergence_summary
from internal_policy_lens.analysis.split_figures import CHANGE_PANELS, FLOW_PANELS, split_curves
from internal_policy_lens.analysis.splits import Split, split_run, split_table, token_groups
from internal_policy_lens.analysis.uncertainty import LABELS, differences, resample, run_seed
from internal_policy_lens.cli import app
from internal_policy_lens.runs.io import open_run
from internal_policy_lens.tables import summary_table

runner = CliRunner()
# Responses of different lengths; answers right for a*b with a even, wrong otherwise, one missing.
RECORDS = [
    {
        "problem": f"Compute {a}*{b}.",
        "response": f"{a}*{b} = {a * b}. " * (1 + a % 3) + f"\\boxed{{{a * b}}}",
        **({"answer": str(a * b if a % 2 == 0 else a * b + 1)} if a != 5 else {}),
    }
    for a, b in [(2, 3), (3, 4), (4, 7), (5, 5), (6, 2)]
]


@pytest.fixture(scope="module")
def run(tiny_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("splits")
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    args = ["entropy", "--model", tiny_dirs["qwen2"], "--data", data, "--out", root / "run"]
    result = runner.invoke(app, [*map(str, args), "--extras", "--batch-size", "2", "--quiet"])
    assert result.exit_code == 0, result.output
    return open_run(root / "run")


def _naive_groups(tokens, split, q):
    """{(sample, position): group}, written out with plain Python."""
    final = tokens[tokens.site.astype(str) == "final"]
    keys = list(zip(final.sample_id, final.position))
    if split == "forking":
        values = sorted(float(v) for v in final.entropy)
        at = (1 - q) * (len(values) - 1)  # numpy's linear interpolation, by hand
        lo = int(np.floor(at))
        cut = values[lo] + (at - lo) * (values[min(lo + 1, len(values) - 1)] - values[lo])
        return {k: "forking" if h >= cut else "other" for k, h in zip(keys, final.entropy)}, cut
    if split == "correctness":
        verdict = {0: "right", 1: "wrong", 2: "right", 3: "no answer", 4: "right"}
        return {k: verdict[k[0]] for k in keys}, None
    out = {}
    for sample in sorted({s for s, _ in keys}):
        positions = sorted(p for s, p in keys if s == sample)
        for rank, p in enumerate(positions):
            out[sample, p] = ["0-25%", "25-50%", "50-75%", "75-100%"][4 * rank // len(positions)]
    return out, None


def _naive_stats(values):
    values = [float(v) for v in values]
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else None
    return mean, (None if var is None else var**0.5), len(values)


@pytest.mark.parametrize("split", ["forking", "correctness", "position"])
def test_split_summary_equals_a_naive_float64_one(run, split):
    tokens = run.tokens()
    found = split_run(run, split, q=0.3)
    groups, cut = _naive_groups(tokens, split, 0.3)
    if split == "forking":
        assert found.threshold == pytest.approx(cut, abs=1e-12)
        assert found.facts()["q"] == 0.3
        share = found.tokens["forking"] / sum(found.tokens.values())
        assert 0.25 <= share <= 0.4
    assert found.tokens == pd.Series(groups).value_counts().to_dict()
    summary = found.summary().set_index(["group", "quantity", "layer", "name"])
    label = [groups[s, p] for s, p in zip(tokens.sample_id, tokens.position)]
    tokens = tokens.assign(group=label)
    checked = 0
    for (group, layer, site), rows in tokens.groupby(["group", "layer", "site"], observed=True):
        for quantity in ("entropy", "kl_internal_final"):
            mean, std, count = _naive_stats(rows[quantity])
            row = summary.loc[(group, quantity, layer, site)]
            assert row["count"] == count
            assert row["mean"] == pytest.approx(mean, rel=1e-12, abs=1e-12)
            if std is not None:
                assert row["std"] == pytest.approx(std, rel=1e-9, abs=1e-12)
            checked += 1
        if site == "mlp_out":  # the FFN change, H(mlp_out) - H(mlp_in), by hand
            inputs = tokens[
                (tokens.group == group) & (tokens.layer == layer) & (tokens.site == "mlp_in")
            ]
            before = dict(zip(zip(inputs.sample_id, inputs.position), inputs.entropy))
            pairs = zip(rows.sample_id, rows.position, rows.entropy)
            mean, std, count = _naive_stats([h - before[s, p] for s, p, h in pairs])
            row = summary.loc[(group, "delta", layer, "ffn")]
            # The table's change is a float32 difference of float32 entropies.
            assert row["count"] == count and row["mean"] == pytest.approx(mean, rel=1e-6)
    assert checked > 0
    # The same split of the table held in memory gives the same summary.
    whole = split_table(run.tokens(), split, q=0.3, correct=_correct(run))
    pd.testing.assert_frame_equal(whole.summary(), found.summary(), atol=1e-12, rtol=1e-12)


def _correct(run):
    from internal_policy_lens.analysis.splits import _verdicts

    return _verdicts(run.path / "responses.jsonl")


def test_no_split_is_the_run_summary(run):
    found = split_run(run, None).summary()
    assert set(found.group) == {"all"}
    expected = run.summary()
    pd.testing.assert_frame_equal(
        found.drop(columns="group"), expected, check_dtype=False, atol=1e-9, rtol=1e-9
    )


def test_an_older_run_is_split_under_todays_column_names(run, tmp_path):
    # A run written when the KL column was kl_to_final: its split reads it as kl_internal_final.
    import pyarrow.parquet as pq

    old = tmp_path / "old"
    shutil.copytree(run.path, old)
    file = pq.ParquetFile(run.path / "tokens.parquet")
    renamed = [n if n != "kl_internal_final" else "kl_to_final" for n in file.schema_arrow.names]
    groups = [file.read_row_group(i).rename_columns(renamed) for i in range(file.num_row_groups)]
    with pq.ParquetWriter(old / "tokens.parquet", groups[0].schema) as writer:  # one per batch
        for table in groups:
            writer.write_table(table)
    assert "kl_to_final" in pq.read_schema(old / "tokens.parquet").names
    found = split_run(open_run(old), None).summary()
    want = split_run(run, None).summary()
    pd.testing.assert_frame_equal(found, want)


def test_split_errors_name_the_fix():
    index = pd.DataFrame({"sample_id": [0, 0], "position": [0, 1], "entropy": [np.nan] * 2})
    with pytest.raises(ValueError, match="final among --sites"):
        token_groups(index, "forking")
    with pytest.raises(ValueError, match="'answer' field"):
        token_groups(index, "correctness", correct={"0": None})
    with pytest.raises(ValueError, match="unknown split 'length'"):
        token_groups(index, "length")
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        token_groups(index.fillna(1.0), "forking", q=1.0)


def test_resampled_means_equal_means_of_the_drawn_responses(run):
    """Resampling per-sample sums = pooling the tokens of the drawn responses, in float64."""
    tokens = run.tokens()
    split = split_run(run, "position")
    found = resample(split, run.n_layers, resamples=5, seed=7)
    ids = sorted(pd.unique(tokens.sample_id))
    draws = np.random.default_rng(7).integers(0, len(ids), 5 * len(ids)).reshape(5, len(ids))
    groups, _ = _naive_groups(tokens, "position", 0.2)
    tokens = tokens.assign(group=[groups[s, p] for s, p in zip(tokens.sample_id, tokens.position)])
    keys = found.keys
    for b in (0, 4):
        # A response drawn twice counts twice: each copy under its own id.
        pooled = pd.concat(
            [tokens[tokens.sample_id == ids[i]].assign(sample_id=k) for k, i in enumerate(draws[b])]
        )
        for column in np.flatnonzero(keys.quantity.to_numpy() == "entropy")[::7]:
            g, _, layer, site = keys.iloc[column]
            rows = pooled[(pooled.group == g) & (pooled.layer == layer) & (pooled.site == site)]
            expected = np.mean(rows.entropy.to_numpy(np.float64)) if len(rows) else np.nan
            np.testing.assert_allclose(found.means[b, column], expected, rtol=1e-12)
        # Each resample's abruptness and label are those of its pooled tokens' summary.
        whole = summary_table(pooled[pooled.group == "0-25%"])
        expected = convergence_summary(whole, run.n_layers)
        stats = found.stats[(found.stats.group == "0-25%") & (found.stats["resample"] == b)].iloc[0]
        np.testing.assert_allclose(stats.abruptness, expected.abruptness, rtol=1e-9)
        np.testing.assert_allclose(stats.drop_depth_50, expected.drop_depths[1], rtol=1e-9)
        assert stats.label == expected.label


def test_intervals_and_label_shares(run):
    found = resample(split_run(run, "forking"), run.n_layers, resamples=50, seed=1)
    summary = found.summary()
    assert (summary.ci_low <= summary.ci_high + 1e-12).all()
    table = found.convergence()
    assert list(table.group) == ["forking", "other"]
    shares = table[[f"label_share_{name}" for name in LABELS]].sum(axis=1)
    assert np.allclose(shares, 1.0) or table.label.isna().all()
    assert (table.resamples == 50).all() and (table.seed == 1).all()
    assert table.threshold.notna().all() and (table.q == 0.2).all()


def _synthetic(drop_late: bool, noise: float, seed: int) -> Split:
    """Eight responses of a 10-layer model: entropy falling late (abrupt) or steadily."""
    rng = np.random.default_rng(seed)
    rows = []
    for sample in range(8):
        depth = np.arange(11) / 10
        curve = np.where(depth < 0.95, 10.0, 1.0) if drop_late else 10.0 - 9.0 * depth
        curve = curve + rng.normal(0, noise, 11)
        rows.append(["all", sample, "entropy", 0, "resid_pre", 20, curve[0], 1.0])
        for layer in range(10):
            rows.append(["all", sample, "entropy", layer, "resid_post", 20, curve[layer + 1], 1.0])
    columns = ["group", "sample_id", "quantity", "layer", "name", "count", "mean", "m2"]
    return Split("all", ["all"], None, None, {"all": 160}, pd.DataFrame(rows, columns=columns))


def test_differences_outside_the_intervals_are_said():
    late = resample(_synthetic(True, 0.05, 0), 10, resamples=200, seed=run_seed(0, 0))
    steady = resample(_synthetic(False, 0.05, 1), 10, resamples=200, seed=run_seed(0, 1))
    again = resample(_synthetic(False, 0.05, 2), 10, resamples=200, seed=run_seed(0, 2))
    found = (
        differences({"late": late, "steady": steady, "again": again})
        .set_index(["run_a", "run_b", "statistic"])
        .sort_index()
    )
    row = found.loc["late", "steady", "abruptness"]
    assert row.outside and row.ci_low > 0.5  # about 1.0 vs 0.1
    assert row.difference == pytest.approx(late.point.abruptness[0] - steady.point.abruptness[0])
    # Two draws of the same steady model: no measure differs outside the intervals.
    assert not found.loc["steady", "again"].outside.any()
    assert late.convergence().label_share_abrupt[0] == 1.0


def test_split_and_compare_commands_write_intervals(run, tmp_path):
    result = runner.invoke(app, ["split", str(run.path), "--split", "forking", "--resamples", "40"])
    assert result.exit_code == 0, result.output
    folder = run.path / "splits" / "forking"
    facts = json.loads((folder / "split.json").read_text())
    assert facts["q"] == 0.2 and facts["seed"] == 0 and facts["resamples"] == 40
    assert set(pd.read_csv(folder / "summary.csv").group) == {"forking", "other"}
    assert (folder / "split.png").is_file()
    out, again = tmp_path / "cmp", tmp_path / "again"
    shutil.copytree(run.path, again)
    args = ["compare", str(run.path), str(again), "--out", str(out), "--resamples", "40"]
    result = runner.invoke(app, [*args, "--split", "position"])
    assert result.exit_code == 0, result.output
    table = pd.read_csv(out / "differences.csv")
    assert set(table.group) == {"0-25%", "25-50%", "50-75%", "75-100%"}
    assert not table.outside.any()  # a run against itself, independent draws
    assert "differences outside the 95% intervals" in result.output
    assert set(pd.read_csv(out / "splits.csv").resamples) == {40}


def test_flow_and_change_figures_by_group_draw_each_group_with_its_intervals(run):
    found = resample(split_run(run, "correctness"), run.n_layers, resamples=30, seed=2)
    summary = found.summary()
    name = summary.name.astype(str)
    for panels, zero_line in [(FLOW_PANELS, False), (CHANGE_PANELS, True)]:
        fig = split_curves(summary, panels=panels)
        axes = [ax for ax in fig.axes if ax.get_ylabel()]
        assert [ax.get_ylabel() for ax in axes] == [label for _, _, label in panels]
        for ax, (quantity, which, _) in zip(axes, panels):
            lines = {line.get_label(): line for line in ax.get_lines()}
            assert {"right", "wrong", "no answer"} <= set(lines)
            zero = [
                n for n, line in lines.items() if n.startswith("_") and line.get_ydata()[0] == 0
            ]
            assert bool(zero) == zero_line
            # The final policy: a star per group, at its mean, on the resid_post entropy panel.
            stars = [line for line in ax.get_lines() if line.get_marker() == "*"]
            finals = summary[(summary.quantity == "entropy") & (name == "final")]
            if (quantity, which) == ("entropy", "resid_post"):
                found_stars = sorted(float(line.get_ydata()[0]) for line in stars)
                np.testing.assert_allclose(found_stars, sorted(finals["mean"]))
            else:
                assert not stars
            bands = [c for c in ax.collections if isinstance(c, PolyCollection)]
            for k, group in enumerate(dict.fromkeys(summary.group)):  # the drawing order
                rows = summary[(summary.group == group) & (summary.quantity == quantity)]
                rows = rows[name[rows.index] == which].sort_values("layer")
                np.testing.assert_allclose(lines[group].get_ydata(), rows["mean"])
                # The band of the group: its top edge is ci_high, its bottom edge ci_low.
                edges = bands[k].get_paths()[0].vertices[:, 1]
                assert edges.max() == pytest.approx(rows.ci_high.max())
                assert edges.min() == pytest.approx(rows.ci_low.min())
        fig_chart = split_chart(summary, panels, "by correctness")
        means = [t for t in fig_chart.data if t.mode == "lines+markers"]
        assert len(means) == 3 * len(panels)
        assert sorted(t.name for t in means if t.showlegend) == ["no answer", "right", "wrong"]
        first = means[0]
        rows = summary[(summary.group == first.name) & (summary.quantity == panels[0][0])]
        rows = rows[name[rows.index] == panels[0][1]].sort_values("layer")
        np.testing.assert_allclose(first.y, rows["mean"])
        np.testing.assert_allclose(first.customdata[:, 1], rows.ci_high)
        stars = [t for t in fig_chart.data if t.mode == "markers"]
        finals = summary[(summary.quantity == "entropy") & (name == "final")]
        expected = sorted(finals["mean"]) if panels == FLOW_PANELS else []
        np.testing.assert_allclose(sorted(t.y[0] for t in stars), expected)


def test_plot_and_report_by_group(run, tmp_path):
    folder = tmp_path / "run"
    shutil.copytree(run.path, folder)
    result = runner.invoke(app, ["plot", str(folder), "--split", "forking", "--resamples", "30"])
    assert result.exit_code == 0, result.output
    for stem in ("entropy_flow_forking", "entropy_change_forking", "entropy_flow"):
        assert (folder / "figures" / f"{stem}.png").is_file(), stem
    assert "split forking: 30 resamples of the responses, seed 0" in result.output
    args = ["report", str(folder), "--split", "position", "--resamples", "30"]
    result = runner.invoke(app, [*args, "--resample-seed", "3"])
    assert result.exit_code == 0, result.output
    page = (folder / "report.html").read_text()
    assert "By position: 95% intervals over 30 resamples of the responses (seed 3)" in page
    table = resample(split_run(open_run(folder), "position"), run.n_layers, resamples=30, seed=3)
    for row in table.convergence().itertuples():
        cell = f"{row.abruptness:.4g} [{row.abruptness_low:.4g}, {row.abruptness_high:.4g}]"
        assert f"<td>{row.group}</td>" in page and cell in page
    assert "Entropy flow by position" in page and "Entropy change by position" in page
    assert "bands are 95% intervals over resampled responses" in page
    plain = runner.invoke(app, ["report", str(folder)])
    assert plain.exit_code == 0, plain.output
    assert "split-intervals" not in (folder / "report.html").read_text()
