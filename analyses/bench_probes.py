"""Cost of the training probes relative to a training step, on a bundled model.

    nice -n 10 python analyses/bench_probes.py [--model ipl-tiny-qwen2] [--steps 4]
        [--probe-samples 8] [--prompts-per-step 16] [--group-size 8]

Trains ``--steps`` steps of BuPO with a probe at every step (``--probe-every 1``) through the
built-in trainer and reads ``metrics.jsonl``: per step the probe's time beside the step's time
(rollout + update), and their ratio. The first probe also samples the probe set's responses
(once per run), so it is printed apart from the median of the others.
"""

import argparse
import os
import statistics
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from internal_policy_lens.config import BupoConfig  # noqa: E402
from internal_policy_lens.train.folder import read_metrics  # noqa: E402
from internal_policy_lens.train.loop import train_bupo  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--model", default="ipl-tiny-qwen2")
parser.add_argument("--steps", type=int, default=4)
parser.add_argument("--probe-samples", type=int, default=BupoConfig.probe_samples)
parser.add_argument("--prompts-per-step", type=int, default=BupoConfig.prompts_per_step)
parser.add_argument("--group-size", type=int, default=BupoConfig.group_size)
args = parser.parse_args()

with tempfile.TemporaryDirectory() as tmp:
    cfg = BupoConfig(
        model=args.model,
        out=str(Path(tmp) / "run"),
        steps=args.steps,
        save_every=10**6,
        probe_every=1,
        probe_samples=args.probe_samples,
        prompts_per_step=args.prompts_per_step,
        group_size=args.group_size,
        layer=1,
    )
    train_bupo(cfg, progress=False)
    metrics = read_metrics(cfg.out)

step_time = metrics["rollout_time"] + metrics["update_time"]
ratio = metrics["probe_time"] / step_time
print(f"model {args.model}, {args.prompts_per_step} prompts x {args.group_size} responses per step")
print(f"probe: {args.probe_samples} prompts, one response each, max {cfg.max_new_tokens} tokens")
print("step  step_s  probe_s  probe/step")
for step, s, p, r in zip(metrics["step"], step_time, metrics["probe_time"], ratio):
    print(f"{step:4d}  {s:6.2f}  {p:7.3f}  {r:9.1%}")
later = ratio.iloc[1:]
if len(later):
    print(f"median probe/step after step 0: {statistics.median(later):.1%}")
print(f"step 0 (samples the probe set's responses too): {ratio.iloc[0]:.1%}")
