"""Bottom-up Policy Optimization (paper Eq. 10): IPA on layer k for s_inter steps, then GRPO.

One readable loop. Each step: sample G responses per prompt from the full model (KV cache), score
them, normalise the rewards within each group, then run PPO-clip updates whose ratio is taken on the
internal policy pi^k during the IPA phase (the forward stops after layer k) and on the full policy
after it. Metrics go to ``metrics.jsonl`` one line per step; checkpoints are transformers folders
with the optimiser, scheduler and RNG state beside them.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..config import BupoConfig
from ..datasets import read_records
from ..models import PolicyModel, load_model
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .loss import policy_loss
from .rollout import collect, token_logprobs


def phase_of(step: int, cfg: BupoConfig) -> str:
    """``ipa`` for the first ``iterative_steps`` steps (0-based), then ``grpo``."""
    return "ipa" if step < cfg.iterative_steps else "grpo"


def train_bupo(cfg: BupoConfig, *, progress: bool = True) -> Path:
    """Run (or resume) BuPO; return the run folder."""
    out = Path(cfg.out)
    records = [r for r in read_records(cfg.data) if r["answer"] is not None]
    if not records:
        raise ValueError(f"{cfg.data}: no record has an answer; BuPO needs verifiable answers")
    model = load_model(cfg.model, dtype="float32")
    layer = _resolve_layer(cfg, model)
    params = [p for p in model.bridge.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    warmup = max(cfg.warmup_steps, 1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / warmup))
    start = _start(cfg, out, model, opt, sched, layer)
    ref = _reference_model(cfg)
    bar = tqdm(
        range(start, cfg.steps), initial=start, total=cfg.steps, disable=not progress, desc="bupo"
    )
    for step in bar:
        phase = phase_of(step, cfg)
        k = layer if phase == "ipa" else None
        # --- rollouts from the full policy
        t0 = time.perf_counter()
        rng = random.Random(cfg.seed * 1_000_003 + step)
        prompts = rng.sample(records, min(cfg.prompts_per_step, len(records)))
        model.bridge.eval()
        batch = collect(
            model,
            prompts,
            group_size=cfg.group_size,
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature,
            seed=cfg.seed * 1_000_003 + step,
        )
        with torch.no_grad():
            internal_logp, entropy_k = _logprobs(model, batch, layer, cfg)
            full_logp, entropy_full = _logprobs(model, batch, None, cfg)
            old = internal_logp if k is not None else full_logp
            ref_logp = _logprobs(ref, batch, k, cfg)[0] if ref is not None else None
        rollout_time = time.perf_counter() - t0
        # --- PPO-clip updates on pi^k (IPA) or pi_theta (GRPO)
        t0 = time.perf_counter()
        model.bridge.train()
        stats = _update(model, opt, sched, batch, old, ref_logp, k, cfg, step)
        model.bridge.eval()
        metrics = {
            "step": step,
            "phase": phase,
            "layer": k,
            "reward_mean": batch.rewards.mean().item(),
            "accuracy": (batch.rewards == 1).float().mean().item(),
            "response_length": batch.response_lengths.float().mean().item(),
            "entropy_internal": _masked_mean(entropy_k, batch.response_mask),
            "entropy_policy": _masked_mean(entropy_full, batch.response_mask),
            **stats,
            "lr": sched.get_last_lr()[0],
            "rollout_time": rollout_time,
            "update_time": time.perf_counter() - t0,
        }
        _append_metrics(out, metrics)
        bar.set_postfix(
            phase=phase,
            reward=f"{metrics['reward_mean']:.2f}",
            H=f"{metrics['entropy_policy']:.2f}",
        )
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
            save_checkpoint(out / "checkpoints" / f"step-{step + 1}", model, opt, sched, step + 1)
    return out


def _update(model, opt, sched, batch, old_logp, ref_logp, k, cfg, step) -> dict:
    n = batch.input_ids.shape[0]
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    totals: dict[str, float] = {}
    count = 0
    for _ in range(cfg.updates_per_step):
        for index in torch.randperm(n, generator=gen).split(cfg.mini_batch_size):
            mb = batch.select(index)
            logp, _ = token_logprobs(
                model,
                mb.input_ids,
                mb.attention_mask,
                layer=k,
                lens=cfg.lens,
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
                totals[name] = totals.get(name, 0.0) + value.item()
            count += 1
    return {name: value / count for name, value in totals.items()}


def _logprobs(model, batch, layer, cfg):
    return token_logprobs(
        model,
        batch.input_ids,
        batch.attention_mask,
        layer=layer,
        lens=cfg.lens,
        temperature=cfg.temperature,
    )


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> float:
    return float((values * mask).sum() / mask.sum().clamp(min=1))


def _resolve_layer(cfg: BupoConfig, model: PolicyModel) -> int:
    if cfg.layer != "auto":
        layer = int(cfg.layer)
        if not 0 <= layer < model.n_layers:
            raise ValueError(f"--layer {layer} is out of range (0..{model.n_layers - 1})")
        return layer
    return _auto_layer(cfg, model)


def _auto_layer(cfg: BupoConfig, model: PolicyModel, n: int = 16) -> int:
    """The paper's layer rule on a quick entropy pass over the first ``n`` training prompts."""
    from ..convergence import suggest_layer
    from ..evaluate import sample
    from ..tables import entropy_table, summary_table

    records = read_records(cfg.data, max_samples=n)
    responses = sample(
        model,
        [r["prompt"] for r in records],
        samples=1,
        temperature=0.0,
        max_new_tokens=cfg.max_new_tokens,
    )
    inputs = [{**r, "response": text[0]} for r, text in zip(records, responses)]
    table = entropy_table(
        model, inputs, lens=cfg.lens, sites=["mlp_in", "mlp_out"], response_only=True
    )
    suggestion = suggest_layer(summary_table(table))
    if suggestion.layer is None:
        raise ValueError(f"--layer auto: {suggestion.reason}; pass --layer K instead")
    return suggestion.layer


def _reference_model(cfg: BupoConfig) -> PolicyModel | None:
    if cfg.kl_coef <= 0:
        return None
    ref = load_model(cfg.model, dtype="float32")
    ref.bridge.requires_grad_(False)
    return ref


def _start(cfg, out, model, opt, sched, layer) -> int:
    """Resume from the latest checkpoint or start a fresh run folder; return the first step."""
    config = {**asdict(cfg), "layer": layer}
    config.pop("resume")
    checkpoint = latest_checkpoint(out)
    if cfg.resume and checkpoint is not None:
        check_resume_config(out, config)
        step = load_checkpoint(checkpoint, model, opt, sched)
        _truncate_metrics(out, step)
        return step
    if (out / "metrics.jsonl").exists() and not cfg.resume:
        raise ValueError(
            f"{out}: holds a training run; pass --resume to continue it or choose another --out"
        )
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return 0


def check_resume_config(out: Path, config: dict) -> None:
    """Refuse to resume a run whose ``config.json`` differs from ``config``, naming the fields."""
    saved = json.loads((out / "config.json").read_text())
    if saved != config:
        changed = sorted(k for k in config if saved.get(k) != config[k])
        raise ValueError(
            f"{out / 'config.json'}: --resume with another configuration "
            f"(differs in {', '.join(changed)})"
        )


def _append_metrics(out: Path, metrics: dict) -> None:
    with open(out / "metrics.jsonl", "a") as fh:
        fh.write(json.dumps(metrics) + "\n")
        fh.flush()


def _truncate_metrics(out: Path, step: int) -> None:
    """Drop metric lines of steps after the checkpoint (they are redone)."""
    path = out / "metrics.jsonl"
    if not path.exists():
        return
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    kept = [ln for ln in lines if _safe_step(ln) is not None and _safe_step(ln) < step]
    path.write_text("".join(ln + "\n" for ln in kept))


def _safe_step(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError):
        return None
