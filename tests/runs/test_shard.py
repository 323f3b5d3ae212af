"""Data-parallel ipl entropy: shards of a run folder merge into the single-process tables."""

import json
import os
import subprocess
import sys

import pandas as pd
import pytest
from typer.testing import CliRunner

from internal_policy_lens import EntropyConfig, GenerationConfig, load_model, run_entropy
from internal_policy_lens.cli import app
from internal_policy_lens.runs.shard import resolve_shard, work_order
from internal_policy_lens.tables import entropy_table

TABLES = ("tokens.parquet", "topk.parquet", "deltas.parquet", "summary.csv")


@pytest.fixture
def prompts(tmp_path):
    # No responses: the run generates them (3 per generation batch), then analyses 2 per batch.
    rows = [{"id": f"p{i}", "question": f"What is {i}+{i}?"} for i in range(7)]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cfg(tiny_dirs, prompts, out, **kw):
    generation = GenerationConfig(max_new_tokens=6, batch_size=3, seed=3)
    return EntropyConfig(
        model=str(tiny_dirs["qwen2"]),
        data=str(prompts),
        out=str(out),
        device="cpu",
        batch_size=2,
        extras=True,
        generation=generation,
        **kw,
    )


def _assert_same_run(a, b):
    for name in TABLES:
        read = pd.read_csv if name.endswith(".csv") else pd.read_parquet
        x, y = read(a / name), read(b / name)
        assert list(x.dtypes) == list(y.dtypes), name
        pd.testing.assert_frame_equal(x, y, check_exact=True)
    assert (a / "responses.jsonl").read_text() == (b / "responses.jsonl").read_text()
    assert not (b / "parts").exists() and not (b / "generation").exists()
    assert json.loads((b / "run.json").read_text())["status"] == "complete"


def test_shards_merge_into_the_single_process_tables(tiny_dirs, prompts, tmp_path):
    single = run_entropy(_cfg(tiny_dirs, prompts, tmp_path / "one"), progress=False)
    sharded = tmp_path / "two"
    assert run_entropy(_cfg(tiny_dirs, prompts, sharded, shard="1/2"), progress=False) is None
    with pytest.raises(ValueError, match="batches are not analysed yet"):
        from internal_policy_lens.commands.entropy import merge_run

        merge_run(sharded)
    merged = run_entropy(_cfg(tiny_dirs, prompts, sharded, shard="0/2"), progress=False)
    assert merged is not None and merged.info["samples"] == 7
    assert merged.info["generated"] == single.info["generated"] == 7  # no record had a response
    pd.testing.assert_frame_equal(merged.tokens, single.tokens, check_exact=True)
    _assert_same_run(tmp_path / "one", sharded)
    with pytest.raises(ValueError, match="is already merged"):
        merge_run(sharded)


def test_two_processes_under_accelerate_env_equal_one(tiny_dirs, prompts, tmp_path):
    # What `accelerate launch --num_processes 2 -m internal_policy_lens.cli entropy ...` does:
    # two processes with RANK/WORLD_SIZE set, running at once; the last one to finish merges.
    # The one-process reference runs the same way, with the same thread count (CPU float
    # reductions depend on it).
    args = ["--model", str(tiny_dirs["qwen2"]), "--data", str(prompts), "--device", "cpu"]
    args += ["--batch-size", "2", "--gen-batch-size", "3", "--max-new-tokens", "6"]
    args += ["--seed", "3", "--extras", "--quiet"]
    command = [sys.executable, "-m", "internal_policy_lens.cli", "entropy", *args]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    env["OMP_NUM_THREADS"] = "1"
    ranks = [{"RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2"} for r in range(2)]
    runs = [("one", {})] + [("two", rank) for rank in ranks]
    procs = [
        subprocess.Popen(
            [*command, "--out", str(tmp_path / out)],
            env={**env, **extra},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for out, extra in runs
    ]
    outputs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outputs
    assert sum("Wrote" in text for text in outputs[1:]) == 1, outputs  # exactly one merged
    _assert_same_run(tmp_path / "one", tmp_path / "two")


def test_ipl_merge_and_shard_parsing(tiny_dirs, prompts, tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["merge", str(out)])
    assert result.exit_code == 2 and "has no shard parts" in result.output
    assert resolve_shard("1/3") == (1, 3) and resolve_shard("0/1") is None
    for bad in ("3/3", "a/b", "1"):
        with pytest.raises(ValueError, match="--shard"):
            resolve_shard(bad)
    with pytest.raises(ValueError, match="'3/3': need 0 <= i < n"):
        resolve_shard("3/3")
    with pytest.raises(ValueError, match="'a/b': expected i/n"):
        resolve_shard("a/b")
    assert work_order(5, (1, 2)) == [1, 3, 0, 2, 4]


def test_device_map_auto_gives_the_same_table(models, tiny_dirs):
    mapped = load_model(tiny_dirs["llama"], dtype="float32", device_map="auto")
    texts = ["Solve 12+7*3. \\boxed{33}", "What is 9-4?"]
    pd.testing.assert_frame_equal(
        entropy_table(mapped, texts, extras=True),
        entropy_table(models("llama"), texts, extras=True),
    )
