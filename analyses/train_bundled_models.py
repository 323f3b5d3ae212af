"""Train the two bundled reference models and write the bundled held-out set.

    OMP_WAIT_POLICY=PASSIVE python analyses/train_bundled_models.py [--steps N] [--arch qwen2 llama]

Writes internal_policy_lens/bundled/ipl-tiny-{arch}/ (transformers folder + model card) and
internal_policy_lens/data/arith_{heldout,train}.jsonl.
"""

import argparse
from pathlib import Path

from internal_policy_lens.pretrain import PretrainConfig, pretrain, write_task_files

ROOT = Path(__file__).resolve().parents[1] / "internal_policy_lens"

parser = argparse.ArgumentParser()
parser.add_argument("--arch", nargs="+", default=["qwen2", "llama"])
parser.add_argument("--steps", type=int, default=PretrainConfig.steps)
parser.add_argument("--out", type=Path, default=ROOT / "bundled")
args = parser.parse_args()

for arch in args.arch:
    cfg = PretrainConfig(out=str(args.out / f"ipl-tiny-{arch}"), arch=arch, steps=args.steps)
    facts = pretrain(cfg)
    overall = facts["evaluation"]["overall"]
    print(
        f"{arch}: {facts['train_minutes']} min, {facts['parameters']:,} parameters, "
        f"greedy {overall['greedy']:.1%}, pass@{cfg.pass_k} {overall['pass_at_k']:.1%}"
    )
write_task_files(ROOT / "data")
