"""analyses/device_check.sh on the CPU: its steps, its table and its exit code."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _check(tmp_path, only, bench):
    env = {**os.environ, "DEVICE": "cpu", "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    command = ["bash", str(ROOT / "analyses" / "device_check.sh"), "--work", str(tmp_path)]
    command += ["--only", only, "--bench", str(bench)]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_device_check_runs_its_steps_and_fails_when_one_fails(tmp_path):
    bench = tmp_path / "bench_gpu.py"
    bench.write_text("print('tokens/s 123 (bench)')\n")
    done = _check(tmp_path, "entropy ipl-tiny-llama,bench_gpu.py", bench)
    assert done.returncode == 0, done.stdout + done.stderr
    table = done.stdout.split("device check on cpu:")[1].strip().splitlines()
    assert table[0].split() == ["step", "status", "seconds", "numbers"]
    assert table[1].split()[:3] == ["entropy", "ipl-tiny-llama", "ok"]
    assert "max |cpu - cpu| 0.0e+00 nats" in table[1]
    assert table[2].split()[:2] == ["bench_gpu.py", "ok"] and "tokens/s 123 (bench)" in table[2]
    bench.write_text("raise SystemExit('the bench broke')\n")
    done = _check(tmp_path, "bench_gpu.py", bench)
    assert done.returncode == 1
    row = done.stdout.split("device check on cpu:")[1].strip().splitlines()[1]
    assert row.split()[:2] == ["bench_gpu.py", "FAILED"] and "the bench broke" in row
