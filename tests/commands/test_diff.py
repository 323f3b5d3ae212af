"""ipl diff: two tiny checkpoints on the same tokens against a float64 computation by hand."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from reference import hf_model, naive_logits, naive_sites
from typer.testing import CliRunner

from internal_policy_lens import load_model
from internal_policy_lens.cli import app
from internal_policy_lens.data.encode import encode_inputs
from internal_policy_lens.data.records import read_records
from internal_policy_lens.model.tiny import make_tiny_model

runner = CliRunner()
RECORDS = [
    {"problem": f"Compute {a}+{b}.", "response": f"{a}+{b} = {a + b}. \\boxed{{{a + b}}}"}
    for a, b in [(2, 3), (14, 9), (7, 7)]
]


@pytest.fixture(scope="module")
def setup(tiny_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("diff")
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    other = make_tiny_model("qwen2", root / "b", seed=11, n_layers=3)  # same tokenizer
    return root, data, tiny_dirs["qwen2"], other


def _diff(a, b, data, out, *extra):
    args = ["diff", "--model", a, "--model-b", b, "--data", data, "--out", out]
    result = runner.invoke(app, [*map(str, args), "--dtype", "float64", "--quiet", *extra])
    assert result.exit_code == 0, result.output
    return result.output


def test_diff_equals_a_float64_computation(setup):
    root, data, a, b = setup
    out = root / "ab"
    _diff(a, b, data, out, "--batch-size", "2", "--sites", "resid_post,mlp_out,final")
    tokens = pd.read_parquet(out / "tokens.parquet")
    models = [hf_model(a), hf_model(b)]
    tokenizer = load_model(a, device="cpu").tokenizer  # the ids the run reads
    encoded = encode_inputs(tokenizer, read_records(data))
    checked = 0
    for e in encoded:
        sites = [naive_sites(m, e.input_ids)[0] for m in models]
        rows = tokens[tokens.sample_id == e.sample_id]
        for row in rows.itertuples():
            key = (row.site, row.layer)
            logp = [
                torch.log_softmax(naive_logits(m, s[key][row.position], row.site, "raw"), -1)
                for m, s in zip(models, sites)
            ]
            p = [x.exp() for x in logp]
            nxt = e.input_ids[row.position + 1]
            expected = {
                "entropy_a": -(p[0] * logp[0]).sum(),
                "entropy_b": -(p[1] * logp[1]).sum(),
                "kl_a_b": (p[0] * (logp[0] - logp[1])).sum(),
                "kl_b_a": (p[1] * (logp[1] - logp[0])).sum(),
                "rank_a": (logp[0] > logp[0][nxt]).sum() + 1,
                "rank_b": (logp[1] > logp[1][nxt]).sum() + 1,
            }
            # The bridge's attention softmax runs in float32 even for a float64 model.
            for name, value in expected.items():
                assert getattr(row, name) == pytest.approx(float(value), rel=1e-6, abs=1e-7)
            checked += 1
    assert checked == len(tokens) > 0
    table = pd.read_csv(out / "diff.csv")
    final = table[table.site == "final"].iloc[0]
    rows = tokens[tokens.site == "final"]
    assert final.kl_a_b == pytest.approx(rows.kl_a_b.mean(), rel=1e-12)
    assert final.entropy_change == pytest.approx((rows.entropy_b - rows.entropy_a).mean())
    assert final.rank_change == pytest.approx((rows.rank_b - rows.rank_a).mean())
    # The overlap of the top-q (0.2) entropy positions, by hand.
    ea, eb = rows.entropy_a.to_numpy(), rows.entropy_b.to_numpy()
    top_a, top_b = ea >= np.quantile(ea, 0.8), eb >= np.quantile(eb, 0.8)
    assert final.top_q_overlap == pytest.approx((top_a & top_b).sum() / top_a.sum())
    assert final.kl_a_b > 0 and (out / "diff.png").is_file()
    assert "KL(a ‖ b)" in (out / "report.html").read_text()
    assert json.loads((out / "diff.json").read_text())["q"] == 0.2


def test_a_model_diffed_with_itself_is_all_zeros(setup):
    root, data, a, _ = setup
    out = root / "aa"
    _diff(a, a, data, out)
    table = pd.read_csv(out / "diff.csv")
    for column in ("entropy_change", "kl_a_b", "kl_b_a", "rank_change"):
        assert (table[column] == 0).all(), column
    assert (table.top_q_overlap == 1).all()
    assert (table.entropy_a > 0).all()


def test_different_tokenizers_are_refused_in_one_line(setup):
    root, data, a, _ = setup
    other = root / "other-template"
    shutil.copytree(a, other)
    for path in other.glob("*.jinja"):  # another chat template: other ids for the same records
        path.write_text("Q: {{ messages[0]['content'] }}\nA:")
    args = ["diff", "--model", a, "--model-b", other, "--data", data]
    result = runner.invoke(app, [*map(str, args), "--out", str(root / "x"), "--quiet"])
    assert result.exit_code == 2, result.output
    message = result.output.strip()
    assert message.startswith("error:") and "\n" not in message and "one tokenizer" in message
