"""Train the two bundled reference models and write the bundled held-out set.

    OMP_WAIT_POLICY=PASSIVE python analyses/train_bundled_models.py [--arch qwen2 llama] [--steps N]

By default the two models train at the same time, each in its own process on one thread (on two
cores that is faster than one after the other on two threads). Writes
internal_policy_lens/bundled/ipl-tiny-{arch}/ (transformers folder + model card) and
internal_policy_lens/bundled/data/arith_{heldout,demo,train}.jsonl.
"""

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "internal_policy_lens"

parser = argparse.ArgumentParser()
parser.add_argument("--arch", nargs="+", default=["qwen2", "llama"])
parser.add_argument("--steps", type=int, help="steps for every arch (default: config.STEPS)")
parser.add_argument("--out", type=Path, default=ROOT / "bundled")
parser.add_argument(
    "--threads",
    type=int,
    help="threads per training (default: 1 when the archs train at once, else torch's)",
)
parser.add_argument("--sequential", action="store_true", help="one arch after the other")
parser.add_argument("--no-task-files", action="store_true", help=argparse.SUPPRESS)
args = parser.parse_args()

if len(args.arch) > 1 and not args.sequential:
    # one process per arch, one thread each; the task files are written once both are done
    common = ["--out", str(args.out), "--threads", str(args.threads or 1), "--no-task-files"]
    if args.steps:
        common += ["--steps", str(args.steps)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads or 1)}
    procs = [
        subprocess.Popen([sys.executable, __file__, "--arch", arch, *common], env=env)
        for arch in args.arch
    ]
    codes = [p.wait() for p in procs]
    if any(codes):
        sys.exit(f"training failed: exit codes {dict(zip(args.arch, codes))}")
    args.arch = []

import torch  # noqa: E402
from pretrain import pretrain, write_task_files  # noqa: E402 (analyses/pretrain.py)

from internal_policy_lens.config import STEPS, PretrainConfig  # noqa: E402

if args.threads:
    torch.set_num_threads(args.threads)
for arch in args.arch:
    steps = args.steps or STEPS[arch]
    cfg = PretrainConfig(out=str(args.out / f"ipl-tiny-{arch}"), arch=arch, steps=steps)
    facts = pretrain(cfg)
    overall = facts["evaluation"]["overall"]
    print(
        f"{arch}: {facts['train_minutes']} min on {torch.get_num_threads()} thread(s), "
        f"{facts['parameters']:,} parameters, "
        f"greedy {overall['greedy']:.1%}, pass@{cfg.pass_k} {overall['pass_at_k']:.1%}"
    )
if not args.no_task_files:
    write_task_files(ROOT / "bundled" / "data")
