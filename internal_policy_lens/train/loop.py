"""Bottom-up Policy Optimization (paper Eq. 10): IPA on layer k for s_inter steps, then GRPO.

One readable loop. Each step: sample G responses per prompt from the full model (KV cache), score
them, normalise the rewards within each group, then run PPO-clip updates whose ratio is taken on the
internal policy pi^k during the IPA phase (the forward stops after layer k) and on the full policy
after it. Metrics go to ``metrics.jsonl`` one line per step; checkpoints are transformers folders
with the optimiser, scheduler and RNG state beside them.
"""

from __future__ import annotations

import logging
import random
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..config import BupoConfig, derive_seed
from ..data.answers import math_reward
from ..data.records import read_records
from ..folders import Folder
from ..lens_kinds import model_lens
from ..model.files import check_out_outside_model
from ..model.load import PolicyModel, load_model
from .checkpoint import checkpoint_step, latest_checkpoint, load_checkpoint, save_checkpoint
from .folder import append_metrics, start_training
from .layer import check_layer, reads_layer, resolve_layer
from .loss import policy_loss
from .probes import ProbePlan, Prober
from .rollout import collect, token_logprobs

_log = logging.getLogger(__name__)

Reward = Callable[[str, str], float]
"""A reward function: (response text, reference answer) -> reward in [0, 1]."""


def phase_of(step: int, cfg: BupoConfig) -> str:
    """``ipa`` for the first ``iterative_steps`` steps (0-based), then ``grpo``."""
    return "ipa" if step < cfg.iterative_steps else "grpo"


def train_bupo(cfg: BupoConfig, *, progress: bool = True, reward: Reward = math_reward) -> Path:
    r"""Run (or resume) BuPO; return the run folder.

    ``reward`` scores each sampled response against its record's answer (default: the last
    ``\boxed{}`` must match, :func:`~internal_policy_lens.data.answers.math_reward`).
    """
    model_lens(cfg.lens)  # refuses a lens that is not made of the model's weights
    check_out_outside_model(cfg.out, cfg.model)
    folder = Folder(cfg.out).check_writable()  # before any work
    check_layer(cfg)
    if training_complete(cfg):
        _log.info(
            "nothing to do: %s/ holds this training run, complete (%d steps, same "
            "configuration); nothing was changed",
            cfg.out,
            cfg.steps,
        )
        return Path(cfg.out)
    records = training_records(cfg)
    model = load_model(cfg.model, dtype=cfg.dtype, device=cfg.device, progress=progress)
    layer = resolve_layer(cfg, model, progress=progress)
    with folder.lock():  # one writer per run folder
        return _train(cfg, model, layer, records, reward, progress)


def _train(
    cfg: BupoConfig, model, layer: int | None, records, reward: Reward, progress: bool
) -> Path:
    out = Path(cfg.out)
    params = [p for p in model.bridge.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    warmup = max(cfg.warmup_steps, 1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / warmup))
    start = _start(cfg, out, model, opt, sched, layer)
    ref = _reference_model(cfg)
    prober = Prober(ProbePlan.of(cfg), model, layer, out, start) if cfg.probe_every > 0 else None
    bar = tqdm(
        range(start, cfg.steps),
        initial=start,
        total=cfg.steps,
        disable=not progress,
        desc=phase_of(start, cfg),  # the bar is labelled by the phase that runs
        unit="step",
    )
    for step in bar:
        # --- probes of the weights after `step` updates (no gradients, random state restored)
        probe_time = prober(step) if prober is not None and prober.due(step) else None
        phase = phase_of(step, cfg)
        bar.set_description(phase, refresh=False)
        k = layer if phase == "ipa" else None
        # --- rollouts from the full policy
        t0 = time.perf_counter()
        seed = derive_seed(cfg.seed, step)
        prompts = random.Random(seed).sample(records, min(cfg.prompts_per_step, len(records)))
        model.bridge.eval()
        batch = collect(
            model,
            prompts,
            reward=reward,
            group_size=cfg.group_size,
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature,
            seed=seed,
        )
        warn_if_no_signal(batch.rewards, cfg.group_size, step)
        with torch.no_grad():
            # Plain GRPO without probes has no layer: no internal policy to read.
            internal_logp, entropy_k = (
                _logprobs(model, batch, layer, cfg) if layer is not None else (None, None)
            )
            full_logp, entropy_full = _logprobs(model, batch, None, cfg)
            old = internal_logp if k is not None else full_logp
            ref_logp = _logprobs(ref, batch, k, cfg)[0] if ref is not None else None
        rollout_time = time.perf_counter() - t0
        # --- PPO-clip updates on pi^k (IPA) or pi_theta (GRPO)
        t0 = time.perf_counter()
        model.bridge.train()
        stats = update_policy(model, opt, sched, batch, old, ref_logp, k, cfg, seed)
        model.bridge.eval()
        metrics = {
            "step": step,
            "phase": phase,
            "layer": k,
            **_rollout_stats(batch, entropy_k, entropy_full),
            **stats,
            "lr": sched.get_last_lr()[0],
            "rollout_time": rollout_time,
            "update_time": time.perf_counter() - t0,
            **({"probe_time": probe_time} if probe_time is not None else {}),
        }
        append_metrics(out, metrics)
        bar.set_postfix(
            reward=f"{metrics['reward_mean']:.2f}",
            H=f"{metrics['entropy_policy']:.2f}",
        )
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
            save_checkpoint(out / "checkpoints" / f"step-{step + 1}", model, opt, sched, step + 1)
    if prober is not None and prober.due(cfg.steps):
        prober(cfg.steps)  # the final weights (no metrics line: no step follows)
    return out


def warn_if_no_signal(rewards: torch.Tensor, group_size: int, step: int) -> None:
    """Warn when every group's rewards are equal: all advantages are 0, nothing is learned."""
    groups = rewards.view(-1, group_size)  # [prompts, G]
    flat = (groups == groups[:, :1]).all(dim=1)  # [prompts]: every response scored alike
    if bool(flat.all()):
        values = sorted(set(groups[:, 0].tolist()))
        warnings.warn(
            f"step {step}: every group's rewards are identical: {int(flat.sum())} of "
            f"{len(flat)} groups have identical rewards (rewards {values}), so every advantage "
            "is 0 and the policy-gradient update is zero; use prompts the model solves "
            "sometimes, or a larger --group-size",
            stacklevel=2,
        )


def training_records(cfg: BupoConfig) -> list[dict]:
    """The records of ``cfg.data`` that have an answer (a reward needs one)."""
    records = [r for r in read_records(cfg.data) if r["answer"] is not None]
    if not records:
        raise ValueError(f"{cfg.data}: no record has an answer; BuPO needs verifiable answers")
    return records


def update_policy(model, opt, sched, batch, old_logp, ref_logp, k, cfg, seed: int) -> dict:
    """PPO-clip updates on a step's rollouts; ratio on pi^k when ``k`` is a layer. Mean stats."""
    n, device = batch.input_ids.shape[0], batch.input_ids.device
    gen = torch.Generator().manual_seed(seed)  # mini-batch order, the same on every device
    totals: dict[str, torch.Tensor] = {}
    count = 0
    for _ in range(cfg.updates_per_step):
        for index in torch.randperm(n, generator=gen, device="cpu").split(cfg.mini_batch_size):
            mb = batch.select(index)
            index = index.to(device)
            logp, _ = token_logprobs(
                model,
                mb.input_ids,
                mb.attention_mask,
                layer=k,
                lens_name=cfg.lens,
                temperature=cfg.temperature,
            )
            loss, stats = policy_loss(
                logp,
                old_logp[index],
                mb.advantages,
                mb.response_mask,
                clip_low=cfg.clip_low,
                clip_high=cfg.clip_high,
                aggregation=cfg.aggregation,
                ref_logp=None if ref_logp is None else ref_logp[index],
                kl_coef=cfg.kl_coef,
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(
                [p for p in model.bridge.parameters() if p.grad is not None], cfg.grad_clip
            )
            opt.step()
            sched.step()
            for name, value in {"loss": loss.detach(), "grad_norm": norm, **stats}.items():
                totals[name] = totals.get(name, 0.0) + value.double()
            count += 1
    means = (torch.stack(list(totals.values())) / count).tolist()  # the one copy to the host
    return dict(zip(totals, means))


def _logprobs(model, batch, layer, cfg):
    return token_logprobs(
        model,
        batch.input_ids,
        batch.attention_mask,
        layer=layer,
        lens_name=cfg.lens,
        temperature=cfg.temperature,
    )


def _rollout_stats(batch, entropy_k: torch.Tensor | None, entropy_full: torch.Tensor) -> dict:
    """A step's rollout metrics, computed where the batch lives and copied to the host once.

    ``entropy_internal`` is None when the run reads no layer (``entropy_k`` is None).
    """
    tokens = batch.response_mask.sum().clamp(min=1)

    def token_mean(entropy: torch.Tensor | None) -> torch.Tensor | None:
        return None if entropy is None else (entropy * batch.response_mask).sum() / tokens

    means = {
        "reward_mean": batch.rewards.mean(),
        "accuracy": (batch.rewards == 1).float().mean(),
        "response_length": batch.response_lengths.float().mean(),
        "entropy_internal": token_mean(entropy_k),
        "entropy_policy": token_mean(entropy_full),
    }
    present = [name for name, value in means.items() if value is not None]
    values = torch.stack([means[name] for name in present]).tolist()  # one copy to the host
    return {**means, **dict(zip(present, values))}


def _reference_model(cfg: BupoConfig) -> PolicyModel | None:
    if cfg.kl_coef <= 0:
        return None
    ref = load_model(cfg.model, dtype=cfg.dtype, device=cfg.device, progress=False)
    ref.bridge.requires_grad_(False)
    return ref


def training_complete(cfg: BupoConfig) -> bool:
    """Whether ``cfg.out`` holds this run (its config.json) with the checkpoint of its last step.

    With ``layer="auto"`` the layer the run chose is accepted; a run that reads no layer
    (plain GRPO without probes) records none.
    """
    out = Path(cfg.out)
    if not (out / "config.json").is_file():
        return False
    saved = Folder(out).read_json("config.json")
    config = asdict(cfg)
    config.pop("resume")
    if not reads_layer(cfg):
        config["layer"] = None  # plain GRPO records no layer
    elif cfg.layer == "auto":
        config["layer"] = saved.get("layer")
    last = latest_checkpoint(out)
    return saved == config and last is not None and checkpoint_step(last) == cfg.steps


def _start(cfg, out, model, opt, sched, layer) -> int:
    """Resume from the latest checkpoint or start a fresh run folder; return the first step."""
    config = {**asdict(cfg), "layer": layer}
    config.pop("resume")
    checkpoint = latest_checkpoint(out)
    step = None if checkpoint is None else checkpoint_step(checkpoint)
    start_training(out, config, resume=cfg.resume, resume_step=step)
    if cfg.resume and checkpoint is not None:
        return load_checkpoint(checkpoint, model, opt, sched)
    return 0
