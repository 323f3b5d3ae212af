"""Train a small reasoning model from scratch on the arithmetic task (CPU, seeded).

The loop is nanoGPT-shaped: batches of freshly drawn problems (never a held-out question), loss on
the response tokens only, AdamW with warm-up and cosine decay, bfloat16 autocast. The result is a
standard transformers folder plus a model card with the loss curve and held-out accuracy.
Imported by ``train_bundled_models.py`` beside it, which trains the bundled models.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from internal_policy_lens.bundled.task import Problem, make_problem, make_problems, write_jsonl
from internal_policy_lens.config import PretrainConfig
from internal_policy_lens.data.answers import math_reward
from internal_policy_lens.data.encode import encode_prompt
from internal_policy_lens.model.batch import pad
from internal_policy_lens.model.generate import sample
from internal_policy_lens.model.load import load_model
from internal_policy_lens.model.tiny import char_tokenizer, tiny_config
from internal_policy_lens.train.evaluate import pass_at_k

HELDOUT_SEED = 10_000


def heldout_problems(cfg: PretrainConfig) -> list[Problem]:
    """The evaluation problems (also shipped as the bundled held-out set)."""
    return make_problems(
        cfg.heldout, seed=HELDOUT_SEED, max_ops=cfg.max_ops, max_value=cfg.max_value
    )


def write_task_files(folder: str | Path, cfg: PretrainConfig | None = None) -> None:
    """Write the bundled task files (held-out, demo and RL training sets).

    ``arith_demo.jsonl`` holds the first 100 held-out problems (the default data of ``ipl
    entropy``). The RL training set (2000 problems, seed 20_000) leaves out every held-out question.
    """
    cfg = cfg or PretrainConfig(out="")
    heldout = heldout_problems(cfg)
    exclude = {p.question for p in heldout}
    pool = make_problems(2400, seed=20_000, max_ops=cfg.max_ops, max_value=cfg.max_value)
    train = [p for p in pool if p.question not in exclude][:2000]
    write_jsonl(heldout, Path(folder) / "arith_heldout.jsonl")
    write_jsonl(heldout[:100], Path(folder) / "arith_demo.jsonl")  # ipl entropy's default
    write_jsonl(train, Path(folder) / "arith_train.jsonl")


def pretrain(cfg: PretrainConfig, *, progress: bool = True) -> dict:
    """Train, evaluate and save a model; return the model card's facts."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(cfg.seed)
    tokenizer = char_tokenizer()
    model_cfg = tiny_config(
        cfg.arch,
        vocab_size=len(tokenizer),
        n_layers=cfg.n_layers,
        d_model=cfg.d_model,
        n_heads=cfg.n_heads,
        n_kv_heads=cfg.n_kv_heads,
        d_mlp=cfg.d_mlp,
        tie_embeddings=True,
        init_scale=0.02,
    )
    model = AutoModelForCausalLM.from_config(model_cfg)
    heldout = heldout_problems(cfg)
    exclude = {p.question for p in heldout}
    rng = random.Random(cfg.seed)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    other = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": other, "weight_decay": 0.0},
        ],
        lr=cfg.lr,
        betas=(0.9, 0.95),
    )
    log, started, seen = [], time.perf_counter(), 0
    bar = tqdm(range(cfg.steps), desc=f"pretrain {cfg.arch}", disable=not progress)
    model.train()
    for step in bar:
        # --- batch: fresh problems, loss on the response tokens only
        ids, labels, mask = _batch(tokenizer, rng, cfg, exclude)
        for group in opt.param_groups:
            group["lr"] = _lr(step, cfg)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        seen += int(mask.sum())
        if step % 25 == 0 or step == cfg.steps - 1:
            rate = seen / (time.perf_counter() - started)
            log.append(
                {
                    "step": step,
                    "loss": loss.item(),
                    "lr": _lr(step, cfg),
                    "tokens": seen,
                    "tokens_per_s": rate,
                }
            )
            bar.set_postfix(loss=f"{loss.item():.3f}", tok_s=f"{rate:.0f}")
    minutes = (time.perf_counter() - started) / 60
    model.eval()
    facts = {
        "config": asdict(cfg),
        "train_minutes": round(minutes, 1),
        "threads": torch.get_num_threads(),
        "tokens": seen,
        "parameters": sum(p.numel() for p in model.parameters()),
        "loss_curve": log,
    }
    return _save(model, tokenizer, cfg, facts, heldout)


def _batch(tokenizer, rng, cfg, exclude):
    eos = tokenizer.eos_token_id
    rows, total = [], 0
    while total < cfg.batch_tokens:
        problem = make_problem(rng, rng.randint(1, cfg.max_ops), cfg.max_value)
        if problem.question in exclude:
            continue
        prompt = encode_prompt(tokenizer, problem.question)
        response = tokenizer(problem.solution, add_special_tokens=False)["input_ids"] + [eos]
        rows.append((prompt, response))
        total += len(prompt) + len(response)
    ids, mask = pad([p + r for p, r in rows], tokenizer.pad_token_id, side="right")
    labels = torch.full_like(ids, -100)  # the loss is on response tokens only
    for i, (p, r) in enumerate(rows):
        labels[i, len(p) : len(p) + len(r)] = torch.tensor(r)
    return ids, labels, mask


def _lr(step: int, cfg: PretrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(cfg.steps - cfg.warmup, 1)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _save(model, tokenizer, cfg, facts, heldout) -> dict:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "training.json").write_text(json.dumps(facts, indent=2))
    return evaluate_saved(out)


def evaluate_saved(folder: str | Path) -> dict:
    """(Re-)evaluate a trained folder through load_model; rewrite training.json and the card."""
    folder = Path(folder)
    facts = json.loads((folder / "training.json").read_text())
    cfg = PretrainConfig(**facts["config"])
    facts["evaluation"] = accuracy_report(
        str(folder), heldout_problems(cfg), pass_k=cfg.pass_k, seed=cfg.seed
    )
    (folder / "training.json").write_text(json.dumps(facts, indent=2))
    (folder / "README.md").write_text(model_card(folder.name, facts))
    return facts


def accuracy_report(
    model_path: str, problems: list[Problem], *, pass_k: int = 8, seed: int = 0
) -> dict:
    """Greedy accuracy, pass@k and mean@k at temperature 1, overall and by difficulty."""
    model = load_model(model_path, dtype="float32", device="cpu")
    questions = [p.question for p in problems]
    greedy = sample(model, questions, samples=1, temperature=0.0, max_new_tokens=96, seed=seed)
    sampled = sample(
        model, questions, samples=pass_k, temperature=1.0, max_new_tokens=96, seed=seed + 1
    )
    rows = []
    for p, g, s in zip(problems, greedy, sampled):
        correct = sum(math_reward(r, p.answer) == 1.0 for r in s)
        rows.append(
            (
                p.difficulty,
                math_reward(g[0], p.answer) == 1.0,
                pass_at_k(pass_k, correct, pass_k),
                correct / pass_k,
            )
        )
    levels = sorted({r[0] for r in rows})
    by = [_summarise(str(d), [r for r in rows if r[0] == d]) for d in levels]
    return {
        "problems": len(rows),
        "pass_k": pass_k,
        "by_difficulty": by,
        "overall": _summarise("all", rows),
    }


def _summarise(label: str, rows: list[tuple]) -> dict:
    n = len(rows)
    return {
        "difficulty": label,
        "problems": n,
        "greedy": sum(r[1] for r in rows) / n,
        "pass_at_k": sum(r[2] for r in rows) / n,
        "mean_at_k": sum(r[3] for r in rows) / n,
    }


def model_card(name: str, facts: dict) -> str:
    """A markdown model card: architecture, size, data, training, loss curve, accuracy."""
    cfg, ev = facts["config"], facts["evaluation"]
    curve = facts["loss_curve"]
    marks = [curve[int(i * (len(curve) - 1) / 8)] for i in range(9)]
    lines = [
        f"# {name}",
        "",
        f"A {cfg['arch']} causal LM trained from scratch by "
        "`analyses/pretrain.py` (`python analyses/train_bundled_models.py`) on "
        "the arithmetic task of `internal_policy_lens.bundled.task` (problems: a start value and "
        f"1 to {cfg['max_ops']} operations applied left to right; additions/subtractions of 1-2 "
        f"digit numbers, multiplications by 2-9; every intermediate value in [0, "
        f"{cfg['max_value']}]). Character-level tokenizer with a ChatML template; the loss is "
        "on the response tokens only. Held-out questions are never trained on.",
        "",
        "| | |",
        "| --- | --- |",
        f"| layers / d_model / heads (kv) / d_mlp | {cfg['n_layers']} / {cfg['d_model']} / "
        f"{cfg['n_heads']} ({cfg['n_kv_heads']}) / {cfg['d_mlp']} |",
        f"| parameters | {facts['parameters']:,} (tied embeddings) |",
        f"| steps x batch tokens | {cfg['steps']} x {cfg['batch_tokens']} "
        f"({facts['tokens']:,} tokens seen) |",
        f"| optimiser | AdamW lr {cfg['lr']} (warm-up {cfg['warmup']}, cosine to 10%), "
        f"wd {cfg['weight_decay']}, clip 1.0, bf16 autocast={cfg['bf16']} |",
        f"| seed | {cfg['seed']} |",
        f"| training time | {facts['train_minutes']} min on CPU, "
        f"{facts.get('threads', '?')} thread(s) |",
        "",
        f"Reproduce: `python analyses/train_bundled_models.py --arch {cfg['arch']} "
        f"--steps {cfg['steps']} --threads {facts.get('threads', 2)}` (the default run trains "
        "both bundled models at once, one thread each).",
        "",
        "## Loss (nats per response token)",
        "",
        "| step | " + " | ".join(str(m["step"]) for m in marks) + " |",
        "| --- " * (len(marks) + 1) + "|",
        "| loss | " + " | ".join(f"{m['loss']:.3f}" for m in marks) + " |",
        "",
        f"## Held-out accuracy ({ev['problems']} problems, seed {HELDOUT_SEED})",
        "",
        f"| operations | problems | greedy | pass@{ev['pass_k']} (T=1) | mean@{ev['pass_k']} "
        "(T=1) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for row in ev["by_difficulty"] + [ev["overall"]]:
        lines.append(
            f"| {row['difficulty']} | {row['problems']} | {row['greedy']:.1%} | "
            f"{row['pass_at_k']:.1%} | {row['mean_at_k']:.1%} |"
        )
    return "\n".join(lines) + "\n"
