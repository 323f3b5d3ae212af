"""Cost of the training probes relative to a training step, on a bundled model.

    nice -n 10 python analyses/bench_probes.py [--engine builtin|trl] [--model ipl-tiny-qwen2]
        [--steps 4] [--probe-samples N] [--prompts-per-step 16] [--group-size 8]

Trains ``--steps`` steps of BuPO (``builtin``) or of a plain TRL GRPOTrainer with
:class:`~internal_policy_lens.integrations.trl.InternalPolicyCallback` (``trl``) with a probe
at every step, and prints per step the probe's time beside the step's time and their ratio.
The built-in steps are rollout steps (rollout + update, from ``metrics.jsonl``); the TRL steps
are optimiser steps (on_step_begin to on_step_end, generation included), and the probe set and
layer are the callback's defaults (``--probe-samples`` 16, the suggested layer); it ends with
the mean probe over the mean step, and that cost amortised over the default ``probe_every``.
The first probe also samples the probe set's responses (once per run): the built-in engine
prints it apart from the others; TRL's (before step 1) is not printed.
"""

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from internal_policy_lens.config import BupoConfig, ProbeSettings  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--engine", choices=["builtin", "trl"], default="builtin")
parser.add_argument("--model", default="ipl-tiny-qwen2")
parser.add_argument("--steps", type=int, default=4)
parser.add_argument("--probe-samples", type=int, default=None)
parser.add_argument("--prompts-per-step", type=int, default=BupoConfig.prompts_per_step)
parser.add_argument("--group-size", type=int, default=BupoConfig.group_size)
args = parser.parse_args()


def builtin(cfg: BupoConfig) -> tuple[list[float], list[float]]:
    """Per rollout step: step seconds, probe seconds."""
    from internal_policy_lens.train.folder import read_metrics
    from internal_policy_lens.train.loop import train_bupo

    train_bupo(cfg, progress=False)
    metrics = read_metrics(cfg.out)
    return list(metrics["rollout_time"] + metrics["update_time"]), list(metrics["probe_time"])


def trl(cfg: BupoConfig, samples: int) -> tuple[list[float], list[float]]:
    """Per optimiser step of a plain GRPOTrainer: step seconds, probe seconds (after it)."""
    from transformers import TrainerCallback
    from trl import GRPOTrainer

    from internal_policy_lens.data.records import read_records
    from internal_policy_lens.integrations.trl import InternalPolicyCallback
    from internal_policy_lens.integrations.trl.trainer import grpo_config, prompt_dataset
    from internal_policy_lens.model.load import load_causal_lm

    class Timer(TrainerCallback):
        def __init__(self):
            self.times, self.start = [], 0.0

        def on_step_begin(self, *a, **k):
            self.start = time.perf_counter()

        def on_step_end(self, *a, **k):
            self.times.append(time.perf_counter() - self.start)

    model, tokenizer = load_causal_lm(cfg.model)
    timer = Timer()
    probes = InternalPolicyCallback(probe_every=1, probe_data=cfg.data, probe_samples=samples)
    GRPOTrainer(
        model=model,
        args=grpo_config(cfg, disable_tqdm=True, save_strategy="no", logging_steps=1),
        reward_funcs=[
            lambda completions, **kw: [float(sum(map(ord, str(c))) % 2) for c in completions]
        ],
        train_dataset=prompt_dataset(read_records(cfg.data), tokenizer),
        processing_class=tokenizer,
        callbacks=[timer, probes],  # the timer's on_step_end runs before the probe
    ).train()
    print(f"probed layer k = {probes.layer} (suggested)")
    return timer.times, [probes.times[s] for s in sorted(probes.times)]


with tempfile.TemporaryDirectory() as tmp:
    samples = args.probe_samples or (
        ProbeSettings.probe_samples if args.engine == "trl" else BupoConfig.probe_samples
    )
    cfg = BupoConfig(
        model=args.model,
        out=str(Path(tmp) / "run"),
        steps=args.steps,
        save_every=10**6,
        probe_every=1,
        probe_samples=samples,
        prompts_per_step=args.prompts_per_step,
        group_size=args.group_size,
        layer=1,
        iterative_steps=0 if args.engine == "trl" else BupoConfig.iterative_steps,
    )
    if args.engine == "builtin":
        steps, probes = builtin(cfg)
    else:
        steps, probes = trl(cfg, samples)
        probes = probes[1:]  # the probe after step s (step 0's probe read the starting weights)

unit = "rollout" if args.engine == "builtin" else "optimiser"
print(f"{args.engine}: model {args.model}, {args.prompts_per_step} prompts x {args.group_size}")
print(f"probe: {samples} prompts, one response each, max {cfg.max_new_tokens} tokens")
print(f"{unit} step  step_s  probe_s  probe/step")
ratio = [p / s for s, p in zip(steps, probes)]
first = 0 if args.engine == "builtin" else 1  # TRL: the probe after optimiser step 1, 2...
for step, (s, p, r) in enumerate(zip(steps, probes, ratio), start=first):
    print(f"{step:4d}  {s:6.2f}  {p:7.3f}  {r:9.1%}")
if args.engine == "builtin":
    if len(ratio) > 1:
        print(f"median probe/step after step 0: {statistics.median(ratio[1:]):.1%}")
    print(f"step 0 (samples the probe set's responses too): {ratio[0]:.1%}")
else:  # means: one optimiser step in steps_per_generation also generates the rollouts
    every, mean = ProbeSettings.probe_every, statistics.mean(probes) / statistics.mean(steps)
    print(f"mean probe / mean step: {mean:.1%}")
    print(f"amortised at the default probe_every={every}: {mean / every:.2%} of a step")
