import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import ipl_command, write_questions
from typer.testing import CliRunner

from internal_policy_lens import entropy_table
from internal_policy_lens.cli import app

runner = CliRunner()
BENCH = [
    {
        "prompt": [
            {"role": "system", "content": "Reason step by step."},
            {"role": "user", "content": f"What is {a}+{b}?"},
        ],
        "reward_model": {"ground_truth": str(a + b)},
        "extra_info": {"index": -1},
    }
    for a, b in [(1, 2), (30, 4), (7, 7), (12, 9), (5, 60)]
]


def _simple(with_response):
    rows = []
    for a, b in [(2, 3), (10, 4), (6, 7)]:
        row = {"problem": f"Compute {a}*{b}.", "answer": str(a * b)}
        if with_response:
            row["response"] = f"{a}*{b} = {a * b}. \\boxed{{{a * b}}}"
        rows.append(row)
    return rows


def _write(rows, path):
    path = Path(path)
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".csv":
        pd.DataFrame(rows).to_csv(path, index=False)
    else:
        pd.DataFrame(rows).to_parquet(path)
    return path


def _invoke(*args):
    result = runner.invoke(app, ["entropy", *map(str, args), "--quiet"])
    return result


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
@pytest.mark.parametrize("with_response", [True, False])
def test_entropy_simple_layouts(tiny_dirs, models, tmp_path, fmt, with_response):
    data = _write(_simple(with_response), tmp_path / f"data.{fmt}")
    out = tmp_path / "run"
    result = _invoke(
        "--model",
        tiny_dirs["qwen2"],
        "--data",
        data,
        "--out",
        out,
        "--max-new-tokens",
        8,
        "--temperature",
        0,
    )
    assert result.exit_code == 0, result.output
    assert "Mean final entropy" in result.output
    for name in ("tokens.parquet", "deltas.parquet", "summary.csv", "run.json", "responses.jsonl"):
        assert (out / name).is_file()
    assert not (out / "parts").exists()
    tokens = pd.read_parquet(out / "tokens.parquet")
    responses = [json.loads(line) for line in (out / "responses.jsonl").read_text().splitlines()]
    assert [r["sample_id"] for r in responses] == [0, 1, 2]
    if with_response:
        assert responses[0]["response"] == "2*3 = 6. \\boxed{6}"
    expected = entropy_table(models("qwen2"), responses, response_only=True)
    pd.testing.assert_frame_equal(tokens, expected, check_dtype=False, check_categorical=False)
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "complete" and info["config"]["lens"] == "raw"
    assert info["model"]["architecture"] == "Qwen2ForCausalLM" and info["model"]["n_layers"] == 3
    assert len(info["config"]["data_sha256"]) == 64 and "transformers" in info["versions"]
    assert info["config"]["generation"]["max_new_tokens"] == 8
    assert info["generated"] == (0 if with_response else 3)
    assert tokens["token"].astype(str).str.len().gt(0).all()


@pytest.mark.parametrize("k", [0, 3])
def test_topk_option(tiny_dirs, models, tmp_path, k):
    data = _write(_simple(True), tmp_path / "data.jsonl")
    out = tmp_path / "run"
    result = _invoke("--model", tiny_dirs["qwen2"], "--data", data, "--out", out, "--topk", k)
    assert result.exit_code == 0, result.output
    assert json.loads((out / "run.json").read_text())["config"]["topk"] == k
    assert (out / "report.html").is_file()
    if k == 0:
        assert not (out / "topk.parquet").exists() and "topk.parquet" not in result.output
        return
    tokens, topk = pd.read_parquet(out / "tokens.parquet"), pd.read_parquet(out / "topk.parquet")
    responses = [json.loads(line) for line in (out / "responses.jsonl").read_text().splitlines()]
    _, expected = entropy_table(models("qwen2"), responses, response_only=True, topk=k)
    pd.testing.assert_frame_equal(
        topk.drop(columns="token"), expected, check_dtype=False, check_categorical=False
    )
    tokenizer = models("qwen2").tokenizer
    assert topk["token"].tolist() == [tokenizer.decode([i]) for i in topk["token_id"]]
    assert len(topk) == k * len(tokens)


@pytest.mark.parametrize("source", ["folder", "gguf"])
def test_topk_beyond_the_vocabulary_is_clamped_and_recorded(tiny_dirs, tmp_path, source):
    if source == "folder":  # the vocabulary is read from config.json before the model loads
        model = tiny_dirs["qwen2"]
        vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    else:  # a GGUF file has no config.json: the loaded model's vocabulary decides
        pytest.importorskip("gguf")
        from tiny_gguf import random_model, write_gguf

        model = tmp_path / "tiny.gguf"
        write_gguf(random_model("qwen2"), model, "qwen2")
        vocab = None
    data = _write(_simple(True), tmp_path / "data.jsonl")
    args = ["--model", model, "--data", data, "--out", tmp_path / "run", "--topk", 500]
    with pytest.warns(UserWarning, match=r"--topk 500 is more than the model's \d+-token") as seen:
        result = _invoke(*args)
    assert result.exit_code == 0, result.output
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    vocab = vocab or info["model"]["vocab_size"]
    assert info["config"]["topk"] == vocab < 500
    assert f"using --topk {vocab}" in str(seen[0].message)
    topk = pd.read_parquet(tmp_path / "run" / "topk.parquet")
    assert topk["rank"].max() == vocab  # ranks count from 1
    again = _invoke(*args)  # the same command finds its run complete
    assert again.exit_code == 0 and "Nothing to do" in again.output, again.output


def test_characters_outside_the_vocabulary_are_counted_in_a_warning(tiny_dirs, tmp_path):
    rows = _simple(True)
    rows[0]["response"] = "2×3 = 6 ✓"  # two characters the character tokenizer lacks
    rows[2]["problem"] = "Compute 6·7."
    data = _write(rows, tmp_path / "data.jsonl")
    args = ["--model", tiny_dirs["qwen2"], "--data", data, "--out", tmp_path / "run", "--topk", 0]
    with pytest.warns(UserWarning, match="unknown token") as seen:
        result = _invoke(*args)
    assert result.exit_code == 0, result.output
    [warning] = [w for w in seen if "unknown token" in str(w.message)]
    assert str(warning.message).startswith(
        "3 tokens in 2 of 3 sequences are the tokenizer's unknown token '<|unk|>'"
    )


def test_benchmark_layout_norm_lens_extras_and_reuse(tiny_dirs, tmp_path):
    data = _write(BENCH, tmp_path / "bench.jsonl")
    out = tmp_path / "run"
    result = _invoke(
        "--model",
        tiny_dirs["llama"],
        "--data",
        data,
        "--out",
        out,
        "--lens",
        "norm",
        "--extras",
        "--max-new-tokens",
        6,
        "-n",
        2,
        "--sites",
        "mlp_in,mlp_out,final",
    )
    assert result.exit_code == 0, result.output
    tokens = pd.read_parquet(out / "tokens.parquet")
    assert set(tokens.site.astype(str)) == {"mlp_in", "mlp_out", "final"}
    assert {"kl_internal_final", "next_token_rank"} <= set(tokens.columns)
    assert sorted(tokens.sample_id.unique())[:2] == ["0:0", "0:1"]
    deltas = pd.read_parquet(out / "deltas.parquet")
    assert set(deltas.module.astype(str)) == {"ffn"}
    # The responses file is a valid --data: the analysis is re-run without generating.
    again = tmp_path / "again"
    result = _invoke(
        "--model",
        tiny_dirs["llama"],
        "--data",
        out / "responses.jsonl",
        "--out",
        again,
        "--lens",
        "norm",
        "--extras",
        "--sites",
        "mlp_in,mlp_out,final",
    )
    assert result.exit_code == 0, result.output
    assert not (again / "generation").exists()
    pd.testing.assert_frame_equal(pd.read_parquet(again / "tokens.parquet"), tokens)


def test_different_config_refused_unless_overwrite(tiny_dirs, tmp_path):
    data = _write(_simple(True), tmp_path / "d.jsonl")
    out = tmp_path / "run"
    assert _invoke("--model", tiny_dirs["qwen2"], "--data", data, "--out", out).exit_code == 0
    again = _invoke("--model", tiny_dirs["qwen2"], "--data", data, "--out", out)
    assert again.exit_code == 0, again.output
    other = _invoke("--model", tiny_dirs["qwen2"], "--data", data, "--out", out, "--lens", "norm")
    assert other.exit_code == 2
    assert "another configuration" in other.output and "lens" in other.output
    assert "--overwrite" in other.output
    forced = _invoke(
        "--model", tiny_dirs["qwen2"], "--data", data, "--out", out, "--lens", "norm", "--overwrite"
    )
    assert forced.exit_code == 0, forced.output
    assert json.loads((out / "run.json").read_text())["config"]["lens"] == "norm"


def _bad(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "name,text,pattern",
    [
        ("missing.jsonl", None, r"missing\.jsonl.*(not exist|not found)"),
        ("empty.jsonl", "", r"empty\.jsonl.*(empty|no records)"),
        (
            "broken.jsonl",
            '{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": \n',
            r"broken\.jsonl:3: .*JSON",
        ),
        ("noprompt.jsonl", '{"prompt": "a"}\n{"answer": "2"}\n', r"noprompt\.jsonl:2: .*prompt"),
        ("data.txt", "hello\n", r"data\.txt.*\.txt.*(jsonl|JSONL)"),
    ],
)
def test_bad_input_files(tiny_dirs, tmp_path, name, text, pattern):
    path = tmp_path / name if text is None else _bad(tmp_path, name, text)
    result = _invoke("--model", tiny_dirs["qwen2"], "--data", path, "--out", tmp_path / "run")
    assert result.exit_code == 2
    assert pytest.importorskip("re").search(pattern, result.output), result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_unknown_site_and_layer_out_of_range(tiny_dirs, tmp_path):
    data = _write(_simple(True), tmp_path / "d.jsonl")
    site = _invoke(
        "--model",
        tiny_dirs["qwen2"],
        "--data",
        data,
        "--out",
        tmp_path / "a",
        "--sites",
        "resid_pre,mlp",
    )
    assert site.exit_code == 2 and "unknown site(s) mlp" in site.output
    layer = _invoke(
        "--model", tiny_dirs["qwen2"], "--data", data, "--out", tmp_path / "b", "--layers", "0,7"
    )
    assert layer.exit_code == 2 and "layer 7 is out of range" in layer.output
    model = _invoke("--model", tmp_path / "nothing", "--data", data, "--out", tmp_path / "c")
    assert model.exit_code == 2 and "does not exist" in model.output
    assert not any((tmp_path / d).exists() for d in "abc")


def test_truncation_is_counted(tiny_dirs, tmp_path):
    data = _write(_simple(True), tmp_path / "d.jsonl")
    out = tmp_path / "run"
    with pytest.warns(UserWarning, match="3 of 3 sequences are longer than 30 tokens"):
        result = runner.invoke(
            app,
            [
                "entropy",
                "--model",
                str(tiny_dirs["qwen2"]),
                "--data",
                str(data),
                "--out",
                str(out),
                "--max-length",
                "30",
                "--all-tokens",
                "--quiet",
            ],
        )
    assert result.exit_code == 0, result.output
    tokens = pd.read_parquet(out / "tokens.parquet")
    assert tokens.position.max() == 29
    assert json.loads((out / "run.json").read_text())["truncated"] == 3


def _cli(*args):
    return ipl_command("entropy", *args)


@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted(tiny_dirs, tmp_path):
    data = write_questions(tmp_path / "q.jsonl", 40)
    common = [
        "--model",
        tiny_dirs["qwen3"],
        "--data",
        data,
        "--max-new-tokens",
        48,
        "--batch-size",
        2,
        "--gen-batch-size",
        2,
        "--temperature",
        1.0,
        "--seed",
        7,
        "--quiet",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    full = tmp_path / "full"
    subprocess.run(_cli(*common, "--out", full), check=True, env=env, capture_output=True)
    out = tmp_path / "killed"
    for stage in ("generation", "parts"):  # kill once in each phase
        proc = subprocess.Popen(
            _cli(*common, "--out", out),
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.time() + 120
        while time.time() < deadline and len(list((out / stage).glob("*[0-9].*"))) < 2:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert len(list((out / stage).glob("*[0-9].*"))) >= 2, f"never reached {stage}"
        assert not (out / "tokens.parquet").exists()
    subprocess.run(_cli(*common, "--out", out), check=True, env=env, capture_output=True)
    for name in ("tokens.parquet", "topk.parquet", "deltas.parquet"):
        pd.testing.assert_frame_equal(pd.read_parquet(out / name), pd.read_parquet(full / name))
    topk = pd.read_parquet(out / "topk.parquet")  # 5 ranks per token row, none lost or twice
    assert not topk.duplicated(["sample_id", "position", "layer", "site", "rank"]).any()
    assert len(topk) == 5 * len(pd.read_parquet(out / "tokens.parquet"))
    assert (out / "responses.jsonl").read_text() == (full / "responses.jsonl").read_text()


def test_a_batch_with_no_kept_row_leaves_a_complete_run(tiny_dirs, tmp_path):
    # The first record's response is cut away entirely by --max-length, alone in its batch: its
    # empty columns are typed, the tables' columns stay numeric and the figures and the report
    # are made before the run is complete.
    long_prompt = "Add the numbers " + " ".join(str(i) for i in range(40)) + "."
    records = [
        {"sample_id": 0, "prompt": long_prompt, "response": "780"},
        {"sample_id": 1, "prompt": "2+3?", "response": "2+3 = 5"},
    ]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "run"
    args = ["entropy", "--model", str(tiny_dirs["qwen2"]), "--data", str(data), "--out", str(out)]
    args += ["--max-length", "24", "--batch-size", "1", "--extras", "--quiet"]
    with pytest.warns(UserWarning, match="longer than 24 tokens"):
        result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "complete"
    tokens = pd.read_parquet(out / "tokens.parquet")
    assert set(tokens["sample_id"]) == {1}
    assert tokens["entropy"].dtype == np.float32 and tokens["next_token_rank"].dtype == np.int64
    assert (out / "report.html").is_file() and (out / "figures" / "entropy_flow.png").is_file()
