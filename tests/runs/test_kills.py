"""Kills at any moment: after a SIGKILL at each publish point (and at seeded random times), a
rerun of the same command finishes with exactly the tables (or metrics and checkpoints) of an
uninterrupted run."""

import json
import random
import signal
import subprocess
import sys
import time
from dataclasses import asdict

import pandas as pd
import pytest
import torch
from helpers import ipl_command, one_thread_env, tiny_bupo_config, write_questions
from safetensors.torch import load_file

TABLES = ("tokens.parquet", "deltas.parquet", "summary.csv", "responses.jsonl")
# Every kind of file an entropy run publishes, in the order it publishes them: the run's start,
# generated responses, the analysed parts, the tables, the final run.json and the figures.
ENTROPY_POINTS = [
    "run.json",
    "part-00001.json",
    "responses.jsonl",
    "tokens-00001.arrow",
    "tokens.parquet",
    "summary.csv",
    "token_heatmap.pdf",
    "run.json#2",
]


def _run(command, env=None, timeout=300):
    return subprocess.run(
        command, env=one_thread_env(**(env or {})), capture_output=True, text=True, timeout=timeout
    )


def _entropy(args):
    return ipl_command("entropy", *args)


def _same_tables(a, b):
    for name in TABLES:
        if name.endswith(".parquet"):
            pd.testing.assert_frame_equal(pd.read_parquet(a / name), pd.read_parquet(b / name))
        else:
            assert (a / name).read_text() == (b / name).read_text(), name
    assert json.loads((a / "run.json").read_text())["status"] == "complete"


def _nothing_half_written(out):
    """Every file under its final name is complete (temporaries are hidden and never read)."""
    for path in out.rglob("*"):
        if path.name.startswith(".") or path.is_dir():
            continue
        if path.suffix == ".parquet":
            pd.read_parquet(path)
        elif path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix in (".jsonl",):
            [json.loads(x) for x in path.read_text().splitlines()]


def _killed_at_random(command, seconds, rng):
    """Start ``command`` and SIGKILL it after a seeded random share of ``seconds``."""
    proc = subprocess.Popen(
        command,
        env=one_thread_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(rng.uniform(0.3, 1.0) * seconds)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.mark.slow
def test_entropy_killed_anywhere_then_rerun_equals_uninterrupted(tiny_dirs, tmp_path):
    data = write_questions(tmp_path / "q.jsonl", 6)
    common = ["--model", tiny_dirs["qwen3"], "--data", data, "--max-new-tokens", 24]
    common += ["--batch-size", 2, "--gen-batch-size", 2, "--seed", 3, "--quiet"]
    started = time.time()
    full = _run(_entropy([*common, "--out", tmp_path / "full"]))
    assert full.returncode == 0, full.stderr
    seconds = time.time() - started
    rng = random.Random(0)
    points = [*ENTROPY_POINTS, "random"]
    for i, point in enumerate(points):
        out = tmp_path / f"k{i}"
        command = _entropy([*common, "--out", out])
        if point == "random":
            _killed_at_random(command, seconds, rng)
        else:
            killed = _run(command, {"IPL_KILL_BEFORE_PUBLISH": point})
            assert killed.returncode == -signal.SIGKILL, (point, killed.stderr)
        _nothing_half_written(out)
        rerun = _run(command)
        assert rerun.returncode == 0, (point, rerun.stderr)
        _same_tables(out, tmp_path / "full")
        assert not (out / "parts").exists() and not (out / "generation").exists()


@pytest.mark.slow
def test_merge_killed_then_rerun_merges(tiny_dirs, tmp_path):
    rows = [{"problem": f"Compute {a}*7.", "response": f"{a}*7 = {a * 7}."} for a in range(6)]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = ["--model", tiny_dirs["llama"], "--data", data, "--batch-size", 2, "--quiet"]
    assert _run(_entropy([*common, "--out", tmp_path / "full"])).returncode == 0
    for point in ("tokens.parquet", "run.json#2"):
        out = tmp_path / point.replace("#", "-")
        first = _run(_entropy([*common, "--out", out, "--shard", "0/2"]))
        assert first.returncode == 0, first.stderr
        shard = _entropy([*common, "--out", out, "--shard", "1/2"])  # completes the parts: merges
        killed = _run(shard, {"IPL_KILL_BEFORE_PUBLISH": point})
        assert killed.returncode == -signal.SIGKILL, (point, killed.stderr)
        rerun = _run(shard)  # the killed merger left no stale claim
        assert rerun.returncode == 0, (point, rerun.stderr)
        for name in ("tokens.parquet", "deltas.parquet", "summary.csv"):
            if name.endswith(".parquet"):
                pd.testing.assert_frame_equal(
                    pd.read_parquet(out / name), pd.read_parquet(tmp_path / "full" / name)
                )
        assert json.loads((out / "run.json").read_text())["status"] == "complete"


_TRAIN = """
import json, sys
from internal_policy_lens.config import BupoConfig
from internal_policy_lens.train.loop import train_bupo
calls = iter(range(1 << 30))
def reward(text, answer):  # 1, 0, 1, 0... in call order: every group has variance
    return float(next(calls) % 2 == 0)
train_bupo(BupoConfig(**json.loads(sys.argv[1])), progress=False, reward=reward)
"""


def _metrics(out):
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    for line in lines:
        line.pop("rollout_time")
        line.pop("update_time")
    return lines


@pytest.mark.slow
def test_train_bupo_killed_anywhere_then_resume_equals_uninterrupted(
    tiny_dirs, data_file, tmp_path
):
    steps = 3

    def command(out, resume):
        cfg = tiny_bupo_config(tiny_dirs, data_file, out, steps=steps, resume=resume)
        return [sys.executable, "-c", _TRAIN, json.dumps(asdict(cfg))]

    full = _run(command(tmp_path / "full", False))
    assert full.returncode == 0, full.stderr
    # config, then each step's metrics line and checkpoint (the checkpoint folder is renamed
    # into place only when complete)
    points = ["config.json"]
    for step in range(1, steps + 1):
        points += [f"metrics.jsonl#{step}", f"step-{step}"]
    expected = _metrics(tmp_path / "full")
    final = load_file(tmp_path / "full" / f"checkpoints/step-{steps}/model.safetensors")
    for i, point in enumerate(points):
        out = tmp_path / f"k{i}"
        killed = _run(command(out, False), {"IPL_KILL_BEFORE_PUBLISH": point})
        assert killed.returncode == -signal.SIGKILL, (point, killed.stderr)
        resumed = _run(command(out, True))
        assert resumed.returncode == 0, (point, resumed.stderr)
        got = _metrics(out)
        assert [m["step"] for m in got] == list(range(steps)), point  # none lost or repeated
        for a, b in zip(got, expected):
            for key in a:
                if isinstance(a[key], float):
                    assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), (point, key)
                else:
                    assert a[key] == b[key], (point, key)
        weights = load_file(out / f"checkpoints/step-{steps}/model.safetensors")
        for key, value in final.items():
            torch.testing.assert_close(weights[key], value, rtol=1e-5, atol=1e-6)
