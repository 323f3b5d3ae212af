"""``ipl train-bupo --engine trl``: the built-in loop's config on :class:`BupoGRPOTrainer`.

A run folder holds TRL's ``checkpoint-N/`` (N in optimiser steps), ``final/``, ``config.json``
and ``metrics.jsonl`` with one line per rollout step in the built-in loop's column names (plus
TRL's own metrics), so ``ipl plot-train`` reads both kinds of run. With ``--probe-every N`` the
:class:`~internal_policy_lens.integrations.trl.callback.InternalPolicyCallback` writes
``probes.parquet`` as the built-in loop does (steps in rollout steps, k the run's layer).
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict
from pathlib import Path

from transformers import TrainerCallback
from trl import GRPOConfig

from ...config import BupoConfig
from ...folders import Folder
from ...model.files import check_out_outside_model
from ...model.load import load_causal_lm, load_model
from ...train.checkpoint import checkpoint_step
from ...train.folder import append_metrics, start_training
from ...train.layer import check_layer, reads_layer, resolve_layer
from ...train.loop import training_records
from .callback import InternalPolicyCallback
from .trainer import BupoGRPOTrainer, grpo_config, math_reward_func, prompt_dataset


class _Metrics(TrainerCallback):
    """One ``metrics.jsonl`` line per rollout step, with the built-in loop's column names."""

    def __init__(
        self,
        out: Path,
        per_rollout: int,
        layer: int | None,
        iterative_steps: int,
        probes: InternalPolicyCallback | None = None,
    ):
        self.out, self.per_rollout, self.layer, self.s = out, per_rollout, layer, iterative_steps
        self.probes = probes  # its probe of step s (before s's update) goes on step s's line

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or "reward" not in logs:
            return
        step = (state.global_step - 1) // self.per_rollout
        ipa = step < self.s
        entropy = logs.get("entropy")
        line = {
            "step": step,
            "phase": "ipa" if ipa else "grpo",
            "layer": self.layer if ipa else None,
            "reward_mean": logs["reward"],
            "accuracy": logs.get("rewards/math_reward_func/mean"),
            "response_length": logs.get("completions/mean_length"),
            "entropy_internal": entropy if ipa else None,
            "entropy_policy": None if ipa else entropy,
            **{k: v for k, v in logs.items() if not k.startswith("ipl/")},  # probes.parquet's
        }
        if self.probes is not None and step in self.probes.times:
            line["probe_time"] = self.probes.times[step]
        append_metrics(self.out, line)


def train_bupo_trl(
    cfg: BupoConfig, *, progress: bool = True, reward_funcs=None, overrides: dict | None = None
) -> Path:
    """Run (or resume) BuPO on TRL's GRPOTrainer with the built-in loop's config; return ``out``.

    Works as one process or under ``accelerate launch`` (DDP, DeepSpeed, FSDP). Writes TRL's
    ``checkpoint-N/`` folders, ``metrics.jsonl``, ``config.json`` and the final model in
    ``final/``. ``reward_funcs`` default to :func:`math_reward_func`; ``overrides`` are
    GRPOConfig fields (e.g. ``use_vllm=True``), recorded in ``config.json``.
    """
    if cfg.device.startswith("cuda:") and cfg.device != "cuda:0":
        raise ValueError(
            f"--engine trl runs on the GPU that accelerate picks, not --device {cfg.device}; "
            f"choose it with CUDA_VISIBLE_DEVICES={cfg.device[5:]} and --device cuda"
        )
    out = Path(cfg.out)
    check_out_outside_model(out, cfg.model)
    folder = Folder(out).check_writable()  # before any work
    check_layer(cfg)
    records = training_records(cfg)
    layer = None  # plain GRPO without probes reads no layer: no model to load for it
    if reads_layer(cfg):
        policy = load_model(cfg.model, dtype="float32", device="cpu")
        layer = resolve_layer(cfg, policy, progress=progress)
    # One writer per run folder: the process of rank 0 (the one that writes the run's files).
    with folder.lock() if _writer() else contextlib.nullcontext():
        return _train(cfg, out, records, layer, progress, reward_funcs, overrides or {})


def _writer() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _train(
    cfg, out: Path, records, layer: int | None, progress, reward_funcs, overrides: dict
) -> Path:
    args = grpo_config(cfg, disable_tqdm=not progress, **overrides)
    per_rollout = args.steps_per_generation * args.num_iterations
    resume = _start(cfg, out, layer, per_rollout, overrides)
    model, tokenizer = load_causal_lm(cfg.model, dtype=cfg.dtype)
    probes = None
    if cfg.probe_every > 0:
        probes = InternalPolicyCallback(
            cfg.probe_every,
            cfg.probe_data or cfg.data,
            cfg.probe_samples,
            layer,
            cfg.lens,
            output_dir=out,
            step_unit=per_rollout,
        )
    trainer = BupoGRPOTrainer(
        model=model,
        args=args,
        reward_funcs=reward_funcs or [math_reward_func],
        train_dataset=prompt_dataset(records, tokenizer),
        processing_class=tokenizer,
        callbacks=[_Metrics(out, per_rollout, layer, cfg.iterative_steps, probes)]
        + ([probes] if probes is not None else []),
        layer=layer,
        iterative_steps=cfg.iterative_steps,
        lens=cfg.lens,
    )
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(str(out / "final"))
    return out


def parse_overrides(items: list[str]) -> dict:
    """``["use_vllm=true", "vllm_mode=colocate"]`` -> GRPOConfig fields (JSON values, else text)."""
    fields = GRPOConfig.__dataclass_fields__
    out = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or key not in fields:
            raise ValueError(f"--trl-option '{item}': expected FIELD=VALUE with a GRPOConfig field")
        try:
            out[key] = json.loads(text)
        except ValueError:
            out[key] = text
    return out


def _start(
    cfg: BupoConfig, out: Path, layer: int | None, per_rollout: int, overrides: dict
) -> bool:
    """Check or write ``config.json``; return whether to resume from TRL's latest checkpoint."""
    config = {**asdict(cfg), "layer": layer, "engine": "trl", "trl_options": overrides}
    config.pop("resume")
    done = [checkpoint_step(p) for p in out.glob("checkpoint-*") if checkpoint_step(p)]
    step = max(done) // per_rollout if done else None  # rollout steps finished
    start_training(out, config, resume=cfg.resume, resume_step=step, writer=_writer())
    return cfg.resume and step is not None
