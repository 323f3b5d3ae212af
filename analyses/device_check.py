"""The device check: the cuda tests, entropy and train-bupo smoke runs, the GPU bench; one table.

Run it through analyses/device_check.sh, which installs the carried wheels first. ``--device
cpu`` runs the same steps on the CPU, smaller, to check this script where there is no GPU. Exits
with 1 when a step fails.
"""

import argparse
import json
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
# Runs the ipl command line in this process and reports its peak GPU memory as it ends.
IPL = """
import sys, torch
from internal_policy_lens.cli import app
sys.argv = ["ipl", *sys.argv[1:]]
try:
    app()
finally:
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
    print(f"peak_mib {peak / 2**20:.0f}")
"""
MODELS = ("ipl-tiny-qwen2", "ipl-tiny-llama")
# (pytest arguments, entropy samples, training steps) on a GPU and, smaller, on the CPU. The
# notebook's test imports nbclient, which a GPU image need not have (and it has no cuda test).
SIZES = {
    "cuda": (["-m", "cuda", "-n", "4", "--ignore", "tests/test_notebook.py"], 8, 3),
    "cpu": (
        ["tests/test_devices.py", "tests/train/test_train_devices.py"]
        + ["-k", "qwen2-cpu or builtin-cpu"],
        4,
        2,
    ),
}


def run(command: list[str], log: Path, timeout: int, check: bool = True) -> str:
    """Run ``command`` from the repository root; its output goes to ``log``; raise on failure
    (if ``check``)."""
    done = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False
    )
    log.write_text(done.stdout + done.stderr)
    if check and done.returncode != 0:
        tail = (done.stdout + done.stderr).strip().splitlines()[-3:]
        raise RuntimeError(f"exit {done.returncode}: {' | '.join(tail)} (log {log})")
    return done.stdout


def ipl(args: list[str], log: Path, timeout: int = 240) -> int:
    """Run ``ipl ARGS``; return its peak GPU memory in MiB."""
    out = run([sys.executable, "-c", IPL, *args], log, timeout)
    return int(out.strip().splitlines()[-1].split()[1])


def tests(device: str, work: Path) -> str:
    report = work / "tests.xml"
    args = SIZES[device][0]
    command = [sys.executable, "-m", "pytest", "-q", *args, f"--junitxml={report}"]
    run(command, work / "tests.log", 300, check=False)  # the errors are printed even then
    if not report.is_file():
        raise RuntimeError(f"pytest wrote no report (log {work / 'tests.log'})")
    suite = ET.parse(report).getroot().find("testsuite")
    rows = [
        {"test": case.get("name"), "max_errors": prop.get("value")}
        for case in suite.iter("testcase")
        for prop in case.iter("property")
        if prop.get("name") == "max_errors"
    ]
    if rows:
        print(pd.DataFrame(rows).to_string(index=False), flush=True)
    counts = {k: suite.get(k) for k in ("tests", "failures", "errors", "skipped")}
    summary = " ".join(f"{k} {v}" for k, v in counts.items())
    if counts["failures"] != "0" or counts["errors"] != "0":
        raise RuntimeError(f"{summary} (log {work / 'tests.log'})")
    return summary


def entropy(device: str, work: Path, model: str) -> str:
    samples = SIZES[device][1]
    common = ["--model", model, "--max-samples", str(samples), "--dtype", "float32", "--quiet"]
    on = work / f"entropy-{model}-{device}"
    peak = ipl(["entropy", *common, "--device", device, "--out", str(on)], work / f"{on.name}.log")
    # The same responses read on the CPU: the tables must agree (exact precision on both).
    cpu = work / f"entropy-{model}-cpu-again"
    data = ["--data", str(on / "responses.jsonl")]
    ipl(["entropy", *common, *data, "--device", "cpu", "--out", str(cpu)], work / f"{cpu.name}.log")
    a, b = (pd.read_parquet(p / "tokens.parquet") for p in (on, cpu))
    diff = (a["entropy"] - b["entropy"]).abs().max()
    return f"{len(a)} rows; max |{device} - cpu| {diff:.1e} nats; peak {peak} MiB"


def train(device: str, work: Path, engine: str) -> str:
    out = work / f"bupo-{engine}-{device}"
    args = ["train-bupo", "--engine", engine, "--device", device, "--out", str(out), "--quiet"]
    args += ["--layer", "5", "--steps", str(SIZES[device][2]), "--iterative-steps", "1"]
    args += ["--group-size", "4", "--prompts-per-step", "4", "--mini-batch-size", "8"]
    args += ["--max-new-tokens", "32", "--probe-every", "1", "--probe-samples", "4"]
    peak = ipl(args, work / f"{out.name}.log")
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    phases = "/".join(m["phase"] for m in metrics)
    rewards = " ".join(f"{m['reward_mean']:.2f}" for m in metrics)
    probes = pd.read_parquet(out / "probes.parquet")["step"].nunique()
    return f"{phases}; reward {rewards}; {probes} probes; peak {peak} MiB"


def bench(work: Path, script: Path) -> str:
    out = run([sys.executable, str(script)], work / "bench.log", 300)
    return out.strip().splitlines()[-1] if out.strip() else "no output"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=list(SIZES))
    parser.add_argument("--work", type=Path, default=Path("/tmp/ipl-device-check"))
    parser.add_argument("--bench", type=Path, default=ROOT / "analyses" / "bench_gpu.py")
    parser.add_argument("--only", help="Comma-separated step names to run (default: all).")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    device, work = args.device, args.work
    steps = [
        ("pytest", lambda: tests(device, work)),
        *[(f"entropy {m}", lambda m=m: entropy(device, work, m)) for m in MODELS],
        *[(f"train-bupo {e}", lambda e=e: train(device, work, e)) for e in ("builtin", "trl")],
    ]
    if args.bench.is_file():
        steps.append((args.bench.name, lambda: bench(work, args.bench)))
    if args.only:
        steps = [(name, step) for name, step in steps if name in args.only.split(",")]
    rows = []
    for name, step in steps:
        start = time.perf_counter()
        try:
            status, numbers = "ok", step()
        except Exception as err:  # a failed step is reported; the others still run
            status, numbers = "FAILED", str(err)
        rows.append((name, status, f"{time.perf_counter() - start:.0f}", numbers))
        print(f"{name}: {status}", flush=True)
    table = pd.DataFrame(rows, columns=["step", "status", "seconds", "numbers"])
    print(f"\ndevice check on {device}:")
    print(table.to_string(index=False))
    return 1 if (table["status"] != "ok").any() else 0


if __name__ == "__main__":
    sys.exit(main())
