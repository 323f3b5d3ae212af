import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.image import imread
from typer.testing import CliRunner

from internal_policy_lens.analysis.convergence import suggest_layer
from internal_policy_lens.cli import app
from internal_policy_lens.config import ConvergenceConfig

runner = CliRunner()
RECORDS = [
    {"problem": f"Compute {a}*{b}.", "response": f"{a}*{b} = {a * b}. \\boxed{{{a * b}}}"}
    for a, b in [(2, 3), (10, 4), (6, 7)]
]
FIGURES = ("entropy_flow", "entropy_change", "token_heatmap")


@pytest.fixture(scope="module")
def runs(tiny_dirs, tmp_path_factory):
    """Run folders written by `ipl entropy` on two tiny models (qwen2 with extras, llama)."""
    root = tmp_path_factory.mktemp("runs")
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    out = {}
    for name, extra in (("qwen2", ["--extras"]), ("llama", [])):
        out[name] = root / name
        args = ["entropy", "--model", tiny_dirs[name], "--data", data, "--out", out[name]]
        result = runner.invoke(app, [*map(str, args), *extra, "--quiet"])
        assert result.exit_code == 0, result.output
    return out


def assert_image(path):
    image = imread(path)
    assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 300
    assert image[..., :3].std() > 0.05  # drawn, not blank


def test_entropy_writes_figures(runs):
    folder = runs["qwen2"] / "figures"
    for name in (*FIGURES, "next_token", "residual_cosine"):
        assert_image(folder / f"{name}.png")
        assert (folder / f"{name}.pdf").read_bytes()[:4] == b"%PDF"
    # Without --extras there is no next-token or residual-cosine figure.
    assert not (runs["llama"] / "figures" / "next_token.png").exists()
    assert not (runs["llama"] / "figures" / "residual_cosine.png").exists()
    # The extras' residual cosines are in the summary: per layer, attention and FFN.
    summary = pd.read_csv(runs["qwen2"] / "summary.csv")
    cosine = summary[summary.quantity == "cosine"]
    assert len(cosine) == 2 * summary.layer.nunique() and set(cosine.name) == {"attn", "ffn"}
    assert cosine["mean"].between(-1, 1).all()
    assert "cosine" not in set(pd.read_csv(runs["llama"] / "summary.csv").quantity)
    assert (runs["llama"] / "figures" / "entropy_flow.png").is_file()


def test_plot_command(runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(runs["llama"], run)
    shutil.rmtree(run / "figures")
    result = runner.invoke(app, ["plot", str(run), "--sample", "1", "--site", "mlp_out"])
    assert result.exit_code == 0, result.output
    for name in FIGURES:
        assert_image(run / "figures" / f"{name}.png")
        assert (run / "figures" / f"{name}.pdf").is_file()
        assert f"wrote {run / 'figures' / name}.png" in result.output
    assert "skipped next_token" in result.output and "--extras" in result.output


@pytest.mark.parametrize(
    "args,message",
    [
        (["plot", "{tmp}/nothing"], "no such run folder"),
        (["plot", "{tmp}"], "not a finished run folder"),
        (["plot", "{run}", "--sample", "99"], "sample '99' is not in the run"),
        (["plot", "{run}", "--site", "attn"], "site 'attn' is not in the run"),
        (["compare", "{run}", "{tmp}/nothing", "--out", "{tmp}/cmp"], "no such run folder"),
        (["suggest-layer", "{tmp}"], "not a finished run folder"),
    ],
)
def test_user_errors_exit_2_with_one_line(runs, tmp_path, args, message):
    filled = [a.format(tmp=tmp_path, run=runs["qwen2"]) for a in args]
    result = runner.invoke(app, filled)
    assert result.exit_code == 2
    assert message in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_compare_command(runs, tmp_path):
    out = tmp_path / "cmp"
    result = runner.invoke(
        app, ["compare", str(runs["qwen2"]), str(runs["llama"]), "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert_image(out / "comparison.png")
    assert (out / "comparison.pdf").is_file()
    assert_image(out / "comparison_cosine.png")  # qwen2's run has the extras
    assert f"wrote {out / 'comparison_cosine.png'}" in result.output
    table = pd.read_csv(out / "convergence.csv")
    assert len(table) == 2
    assert table["model"].tolist() == ["qwen2", "llama"]  # folder names of the tiny models
    for column in ("exploration", "integration", "convergence", "abruptness", "label", "tau"):
        assert column in table.columns
    assert set(table["label"]) <= {"progressive", "abrupt", "flat"}
    assert (table["tau"] == ConvergenceConfig.tau).all()
    assert table["n_layers"].tolist() == [3, 3]
    summary = pd.read_csv(runs["qwen2"] / "summary.csv")
    expected = suggest_layer(summary).layer
    got = table.loc[0, "suggested_layer"]
    assert (expected is None and np.isnan(got)) or got == expected


def test_compare_names_the_same_model_twice_by_folder(runs, tmp_path):
    again = tmp_path / "again"
    shutil.copytree(runs["qwen2"], again)
    out = tmp_path / "cmp"
    result = runner.invoke(app, ["compare", str(runs["qwen2"]), str(again), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert pd.read_csv(out / "convergence.csv")["model"].tolist() == [
        "qwen2 (qwen2)",
        "qwen2 (again)",
    ]


def _with_ffn(run, tmp_path, ffn):
    """A copy of a run folder whose summary has the given mean FFN delta per layer."""
    copy = tmp_path / "edited"
    shutil.copytree(run, copy)
    summary = pd.read_csv(copy / "summary.csv")
    is_ffn = (summary["quantity"] == "delta") & (summary["name"] == "ffn")
    summary.loc[is_ffn, "mean"] = ffn
    summary.to_csv(copy / "summary.csv", index=False)
    return copy


def test_suggest_layer_command(runs, tmp_path):
    run = _with_ffn(runs["qwen2"], tmp_path, [0.4, 0.02, -0.3])
    result = runner.invoke(app, ["suggest-layer", str(run)])
    assert result.exit_code == 0, result.output
    assert "3 layers, raw lens" in result.output
    assert "suggested BuPO layer: 0 (0-based)" in result.output
    assert "+0.400" in result.output and "integration" in result.output


def test_suggest_layer_says_when_there_is_none(runs, tmp_path):
    run = _with_ffn(runs["llama"], tmp_path, [0.01, -0.02, 0.0])
    result = runner.invoke(app, ["suggest-layer", str(run)])
    assert result.exit_code == 1
    assert "no layer suggested: no exploration stage" in result.output
    wider = runner.invoke(app, ["suggest-layer", str(run), "--tau", "0.005"])
    assert wider.exit_code == 0 and "suggested BuPO layer: 0" in wider.output


def test_make_figures_script(runs, tmp_path):
    import runpy

    script = Path(__file__).parents[2] / "analyses" / "make_figures.py"
    main = runpy.run_path(str(script))["main"]
    main([str(runs["qwen2"]), str(runs["llama"]), "--out", str(tmp_path / "figs")])
    names = {p.name for p in (tmp_path / "figs").iterdir()}
    assert {"comparison.png", "comparison.pdf", "convergence.csv"} <= names
    assert {"qwen2-entropy_flow.png", "llama-entropy_change.pdf", "qwen2-next_token.png"} <= names
    assert "llama-next_token.png" not in names


def test_run_without_rows_skips_every_figure(runs, tmp_path):
    from internal_policy_lens.analysis.figures import write_run_figures
    from internal_policy_lens.runs.io import open_run

    run = open_run(runs["llama"])
    tokens, deltas, summary = run.tokens(), run.deltas(), run.summary()
    report = write_run_figures(tmp_path, tokens[:0], deltas[:0], summary[:0], run.info)
    assert report.written == []
    assert set(report.skipped) == {
        "entropy_flow",
        "entropy_change",
        "token_heatmap",
        "next_token",
        "residual_cosine",
    }


def test_compare_one_model_under_several_lenses(runs, tiny_dirs, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    folders = {}
    for lens in ("norm", "tuned"):
        folders[lens] = tmp_path / lens
        args = ["entropy", "--model", tiny_dirs["llama"], "--data", data, "--out", folders[lens]]
        args += ["--lens", lens, "--quiet"]
        if lens == "tuned":
            fit = ["fit-lens", "--model", tiny_dirs["llama"], "--data", data, "--out"]
            lens_dir = tmp_path / "lens"
            sites = "resid_pre,attn_in,attn_out,resid_mid,mlp_in,mlp_out,resid_post"
            result = runner.invoke(
                app,
                [
                    *map(str, fit),
                    str(lens_dir),
                    "--sites",
                    sites,
                    "--steps",
                    "2",
                    "--heldout",
                    "0.34",
                    "--quiet",
                ],
            )
            assert result.exit_code == 0, result.output
            args += ["--lens-path", lens_dir]
        result = runner.invoke(app, list(map(str, args)))
        assert result.exit_code == 0, result.output
    out = tmp_path / "cmp"
    paths = [str(runs["llama"]), str(folders["norm"]), str(folders["tuned"])]
    result = runner.invoke(app, ["compare", *paths, "--out", str(out)])
    assert result.exit_code == 0, result.output
    table = pd.read_csv(out / "convergence.csv")
    assert table["lens"].tolist() == ["raw", "norm", "tuned"]
    assert table["model"].tolist() == ["llama (raw)", "llama (norm)", "llama (tuned)"]
    assert table["abruptness"].notna().all()


def _column(output: str, header: str, column: str) -> list[str]:
    """The values of a right-aligned column of a table printed by DataFrame.to_string."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.lstrip().startswith(header))
    end = lines[start].index(column) + len(column)
    rows = [line for line in lines[start + 1 :] if not line.startswith(("note:", "warning:"))]
    return [line[:end].split()[-1] for line in rows if line.strip()]


def test_compare_of_residual_sites_only(runs, tiny_dirs, tmp_path):
    # The README's tuned-lens example analyses resid_pre, resid_post and final: no FFN change.
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    residual = tmp_path / "residual"
    args = ["entropy", "--model", tiny_dirs["qwen2"], "--data", data, "--out", residual]
    args += ["--sites", "resid_pre,resid_post,final", "--quiet"]
    result = runner.invoke(app, list(map(str, args)))
    assert result.exit_code == 0, result.output
    out = tmp_path / "cmp"
    result = runner.invoke(app, ["compare", str(runs["qwen2"]), str(residual), "--out", str(out)])
    assert result.exit_code == 0, result.output
    table = pd.read_csv(out / "convergence.csv")
    full, partial = table.iloc[0], table.iloc[1]
    assert partial["n_layers"] == 3 and partial["label"] in {"progressive", "abrupt", "flat"}
    for column in ("entropy_start", "entropy_end", "abruptness", "drop_depth_50"):
        assert partial[column] == pytest.approx(full[column]), column  # same model, lens, data
    assert partial[["exploration", "integration", "convergence", "suggested_layer"]].isna().all()
    assert "mlp_in and mlp_out" in partial["note"]
    assert f"note: qwen2 (residual): {partial['note']}" in result.output
    suggested = runner.invoke(app, ["suggest-layer", str(residual)])
    assert suggested.exit_code == 1, suggested.output
    assert "no layer suggested: the summary has no FFN entropy change" in suggested.output
    assert "mlp_in and mlp_out" in suggested.output and "error" not in suggested.output


def test_compare_prints_layers_as_integers_and_explains_abruptness(runs, tmp_path):
    with_layer = _with_ffn(runs["qwen2"], tmp_path / "a", [0.4, 0.02, -0.3])
    without = _with_ffn(runs["llama"], tmp_path / "b", [0.01, -0.02, 0.0])
    # Entropy that rises in the middle and ends above its start (the norm lens on tiny models):
    # H(0) 0, H(2/3) 2, H(1) 0.1, so H(0.9) = 0.67 and the abruptness (0.67 - 0.1) / (0 - 0.1).
    summary = pd.read_csv(without / "summary.csv")
    entropy = summary["quantity"] == "entropy"
    for site, means in (("resid_pre", [0.0, 0.0, 2.0]), ("resid_post", [0.0, 2.0, 0.1])):
        rows = entropy & (summary["name"] == site)
        summary.loc[rows, "mean"] = summary.loc[rows, "layer"].map(dict(enumerate(means)))
    summary.to_csv(without / "summary.csv", index=False)
    out = tmp_path / "cmp"
    result = runner.invoke(app, ["compare", str(with_layer), str(without), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert _column(result.output, "model", "n_layers") == ["3", "3"]
    assert _column(result.output, "model", "suggested_layer") == ["0", "<NA>"]
    lines = (out / "convergence.csv").read_text().splitlines()
    assert lines[1].split(",")[3] == "3" and lines[1].split(",")[8] == "0"  # not 3.0, 0.0
    table = pd.read_csv(out / "convergence.csv")
    assert table.loc[1, "label"] == "flat" and not 0 <= table.loc[1, "abruptness"] <= 1
    note = [line for line in result.output.splitlines() if line.startswith("note: llama")]
    assert len(note) == 1 and "measures nothing: the entropy does not fall" in note[0]
    assert table.loc[1, "note"] in note[0] and pd.isna(table.loc[0, "note"])


def test_compare_of_one_run_twice_warns_and_names_each(runs, tmp_path):
    out = tmp_path / "cmp"
    with pytest.warns(UserWarning) as caught:
        result = runner.invoke(
            app, ["compare", str(runs["qwen2"]), str(runs["qwen2"]), "--out", str(out)]
        )
    assert result.exit_code == 0, result.output
    said = [str(w.message) for w in caught]
    names = "qwen2 (qwen2), qwen2 (qwen2) #2"
    assert said == [f"{runs['qwen2'].resolve()} is given 2 times ({names}): the same run"]
    assert pd.read_csv(out / "convergence.csv")["model"].tolist() == [
        "qwen2 (qwen2)",
        "qwen2 (qwen2) #2",
    ]


def test_runs_of_the_same_samples_from_another_file_do_not_differ(runs, tiny_dirs, tmp_path):
    # The lens comparison: norm on the raw run's responses.jsonl, another file with another hash.
    info = json.loads((runs["llama"] / "run.json").read_text())
    norm = tmp_path / "norm"
    args = ["entropy", "--model", tiny_dirs["llama"], "--lens", "norm", "--quiet"]
    args += ["--data", runs["llama"] / "responses.jsonl", "--out", norm]
    result = runner.invoke(app, list(map(str, args)))
    assert result.exit_code == 0, result.output
    assert (
        json.loads((norm / "run.json").read_text())["config"]["data_sha256"]
        != info["config"]["data_sha256"]
    )
    with pytest.warns(UserWarning) as caught:
        result = runner.invoke(
            app, ["compare", str(runs["llama"]), str(norm), "--out", str(tmp_path / "cmp")]
        )
    assert result.exit_code == 0, result.output
    assert [str(w.message).split(":")[0] for w in caught] == ["the runs differ in lens"]
    # Fewer samples from the same file do differ.
    fewer = tmp_path / "fewer"
    result = runner.invoke(app, list(map(str, [*args[:-1], fewer, "--max-samples", "2"])))
    assert result.exit_code == 0, result.output
    with pytest.warns(UserWarning) as caught:
        result = runner.invoke(
            app, ["compare", *map(str, (runs["llama"], norm, fewer)), "--out", str(tmp_path / "c")]
        )
    assert result.exit_code == 0, result.output
    said = [str(w.message) for w in caught]
    assert [s.split(":")[0] for s in said] == [
        "the runs differ in lens",
        "the runs differ in samples",
    ]
    positions = pd.read_parquet(runs["llama"] / "tokens.parquet", columns=["sample_id", "position"])
    tokens = len(positions.drop_duplicates())
    assert f"llama (raw): 3 samples of data.jsonl, {tokens:,} tokens" in said[1]
    assert "llama (norm) (norm): 3 samples of responses.jsonl" in said[1]
    assert "llama (norm) (fewer): 2 samples of responses.jsonl" in said[1]
