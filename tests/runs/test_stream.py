"""The streamed run folder: its tables equal the in-memory ones, and reads can be filtered."""

import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from typer.testing import CliRunner

from internal_policy_lens.cli import app
from internal_policy_lens.runs.io import open_run
from internal_policy_lens.tables import delta_table, merge_summaries, summary_table
from internal_policy_lens.tables.frames import MOMENT_COLUMNS

runner = CliRunner()


def _data(tmp_path, n=5):
    rows = [
        {"problem": f"Compute {a}+{a}.", "response": f"{a}+{a} = {2 * a}." * (1 + a % 3)}
        for a in range(n)
    ]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_streamed_tables_equal_the_in_memory_ones(tiny_dirs, tmp_path):
    out = tmp_path / "run"
    args = ["entropy", "--model", str(tiny_dirs["qwen2"]), "--data", str(_data(tmp_path))]
    result = runner.invoke(app, [*args, "--out", str(out), "--extras", "--batch-size", "2"])
    assert result.exit_code == 0, result.output
    run = open_run(out)
    tokens, deltas = run.tokens(), run.deltas()
    # One Parquet row group per batch (5 samples in batches of 2).
    assert pq.ParquetFile(out / "tokens.parquet").num_row_groups == 3
    assert run.info["forward_passes"] == [2, 2, 2]  # with the extras: the final policy first
    expected = delta_table(tokens)
    order = ["sample_id", "position", "layer", "module"]
    pd.testing.assert_frame_equal(
        deltas.sort_values(order).reset_index(drop=True),
        expected.sort_values(order).reset_index(drop=True),
        check_dtype=False,
        check_categorical=False,
    )
    # The summary merged from the batches' moments equals the one of the whole table.
    whole = summary_table(tokens, deltas)
    pd.testing.assert_frame_equal(run.summary(), whole, check_dtype=False, atol=1e-9, rtol=1e-9)
    assert sum(rows for _, rows in run.sample_rows()) == len(tokens) == run.info["rows"]


def test_merged_moments_are_exact_whatever_the_split():
    rng = np.random.default_rng(0)
    values = rng.normal(3.0, 2.0, 1001)
    parts = []
    for chunk in np.array_split(values, [1, 7, 500]):  # a part of one value among them
        parts.append(
            pd.DataFrame(
                [
                    [
                        "entropy",
                        0,
                        "final",
                        len(chunk),
                        chunk.mean(),
                        ((chunk - chunk.mean()) ** 2).sum(),
                    ]
                ],
                columns=list(MOMENT_COLUMNS),
            )
        )
    merged = merge_summaries(parts).iloc[0]
    assert merged["count"] == len(values)
    np.testing.assert_allclose(merged["mean"], values.mean(), rtol=1e-14)
    np.testing.assert_allclose(merged["std"], values.std(ddof=1), rtol=1e-12)


def test_filtered_reads_equal_the_whole_table_filtered(tiny_dirs, tmp_path):
    out = tmp_path / "run"
    args = ["entropy", "--model", str(tiny_dirs["llama"]), "--data", str(_data(tmp_path))]
    assert runner.invoke(app, [*args, "--out", str(out), "--batch-size", "2"]).exit_code == 0
    run = open_run(out)
    whole = run.tokens()
    part = run.tokens(samples=[3], layers=[1], sites=["resid_post", "mlp_out"])
    expected = whole[
        (whole.sample_id == 3) & (whole.layer == 1) & whole.site.isin(["resid_post", "mlp_out"])
    ].reset_index(drop=True)
    pd.testing.assert_frame_equal(part, expected, check_categorical=False)
    assert set(run.topk(samples=[0, 4]).sample_id) == {0, 4}
    assert run.shown_samples(max_rows=1) == [0]  # at least one whole sample
    assert run.shown_samples(["2", 4]) == [2, 4]


def test_text_and_integer_sample_ids_mix_in_one_run(tiny_dirs, tmp_path):
    """Records with a response keep integer ids, generated ones get 'id:k': one string column."""
    rows = [{"problem": "Compute 2+2.", "response": "2+2 = 4."}, {"problem": "Compute 3+3."}]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    args = ["entropy", "--model", str(tiny_dirs["qwen2"]), "--data", str(data), "--quiet"]
    result = runner.invoke(app, [*args, "--out", str(out), "-n", "2", "--max-new-tokens", "8"])
    assert result.exit_code == 0, result.output
    ids = open_run(out).tokens(columns=["sample_id"])["sample_id"]
    assert set(ids) == {"0", "1:0", "1:1"}
