"""BuPO on TRL's GRPOTrainer: the overridden method, pi^k log-probs, phases, loss parity, CLI."""

import inspect
import json
import os
import subprocess
import sys
from dataclasses import asdict

import pandas as pd
import pytest
import torch
from helpers import (
    assert_ipa_then_grpo_updates,
    assert_trl_logprobs_are_ours,
    tiny_bupo_config,
    trl_batch,
    trl_rewards,
    trl_trainer,
)
from typer.testing import CliRunner

from internal_policy_lens import entropy_table
from internal_policy_lens.cli import app
from internal_policy_lens.config import BupoConfig
from internal_policy_lens.integrations.trl import trainer as bupo_trl
from internal_policy_lens.integrations.trl.run import parse_overrides, train_bupo_trl
from internal_policy_lens.model.load import load_causal_lm
from internal_policy_lens.train.loss import policy_loss
from internal_policy_lens.train.rollout import token_logprobs

K = 1  # internal layer of the 3-layer tiny models


def test_contract_of_the_overridden_trl_method():
    # If this fails, TRL changed the private method BupoGRPOTrainer overrides: re-read
    # GRPOTrainer._get_per_token_logps_and_entropies and the fused LM head before moving the pin.
    import trl
    from trl import GRPOTrainer

    version = tuple(int(x) for x in trl.__version__.split(".")[:2])
    assert (1, 16) <= version < (1, 17), trl.__version__
    bupo_trl.check_trl_contract()
    method = GRPOTrainer._get_per_token_logps_and_entropies
    names = list(inspect.signature(method).parameters)
    assert names[:8] == [
        "self",
        "model",
        "input_ids",
        "attention_mask",
        "logits_to_keep",
        "batch_size",
        "compute_entropy",
        "compute_aux_loss",
    ]
    assert "_get_per_token_logps_and_entropies" in bupo_trl.BupoGRPOTrainer.__dict__
    assert "vllm_importance_sampling_correction" in inspect.getsource(GRPOTrainer._compute_loss)


def _cfg(tiny_dirs, data_file, out, **kw):
    return tiny_bupo_config(tiny_dirs, data_file, out, **{"layer": K, "max_new_tokens": 8, **kw})


def _trainer(tiny_dirs, data_file, tmp_path, arch="qwen2", lens="raw", **kw):
    cfg = _cfg(tiny_dirs, data_file, tmp_path / "trl", model=str(tiny_dirs[arch]), lens=lens, **kw)
    return trl_trainer(cfg, K, lens)


def _batch(models, arch):
    """Four prompts and completions in TRL's layout. ``[4, P + C]``."""
    prompts, completions = ("1+1?", "12+30=?", "7*6?", "9-4="), ("2.", "42 done", "42", "5, so 5")
    return trl_batch(models(arch).tokenizer, prompts, completions)


@pytest.mark.parametrize("arch,lens", [("qwen2", "raw"), ("llama", "raw"), ("qwen3", "norm")])
def test_ipa_logprobs_are_the_lens_logprobs(models, tiny_dirs, data_file, tmp_path, arch, lens):
    trainer = _trainer(tiny_dirs, data_file, tmp_path, arch=arch, lens=lens)
    policy = models(arch)
    ids, mask, p, c = batch = _batch(models, arch)
    assert_trl_logprobs_are_ours(trainer, policy, batch, K, lens)
    # The same numbers as entropy_table, row by row, on the first (unpadded) sequence.
    row = mask[0].bool()
    seq = ids[0][row].tolist()
    table = entropy_table(policy, [seq], lens=lens, sites=["resid_post"], layers=[K], extras=True)
    trainer.state.global_step = 0
    with torch.no_grad():
        logp, entropy, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, ids[:1, row], mask[:1, row], len(seq) - 1, compute_entropy=True
        )
    table = table.sort_values("position").iloc[:-1]  # the last position predicts nothing
    torch.testing.assert_close(
        logp[0],
        torch.tensor(table["next_token_logprob"].values, dtype=logp.dtype),
        atol=2e-5,
        rtol=0,
    )
    torch.testing.assert_close(
        entropy[0], torch.tensor(table["entropy"].values, dtype=entropy.dtype), atol=2e-5, rtol=0
    )


@pytest.mark.parametrize("aggregation,kl_coef", [("token", 0.0), ("sequence", 0.1)])
def test_same_loss_as_the_builtin_loop(
    models, tiny_dirs, data_file, tmp_path, aggregation, kl_coef
):
    trainer = _trainer(
        tiny_dirs, data_file, tmp_path, aggregation=aggregation, kl_coef=kl_coef, clip_high=0.28
    )
    trainer.model.train()
    policy = models("qwen2")
    ids, mask, p, c = _batch(models, "qwen2")
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5])
    gen = torch.Generator().manual_seed(0)
    drift = 0.3 * torch.randn(4, c, generator=gen)  # old != current, so both clips are hit
    ref_drift = 0.2 * torch.randn(4, c, generator=gen)
    for layer in (K, None):
        trainer.state.global_step = 0 if layer is not None else trainer.steps_per_rollout
        with torch.no_grad():
            current, _ = token_logprobs(policy, ids, mask, layer=layer)
        old, ref = current[:, p - 1 :] + drift, current[:, p - 1 :] + ref_drift
        logp, _ = token_logprobs(policy, ids, mask, layer=layer)
        builtin, stats = policy_loss(
            logp[:, p - 1 :],
            old,
            advantages,
            mask[:, p:],
            clip_low=0.2,
            clip_high=0.28,
            aggregation=aggregation,
            ref_logp=ref,
            kl_coef=kl_coef,
        )
        inputs = {
            "prompt_ids": ids[:, :p],
            "prompt_mask": mask[:, :p],
            "completion_ids": ids[:, p:],
            "completion_mask": mask[:, p:],
            "advantages": advantages,
            "old_per_token_logps": old,
            "ref_per_token_logps": ref,
            "num_items_in_batch": mask[:, p:].sum(),
        }
        loss = trainer._compute_loss(trainer.model, inputs)
        assert 0 < stats["clip_frac"] < 1
        torch.testing.assert_close(loss, builtin, atol=1e-5, rtol=1e-5)


def _weights(folder):
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


_DDP_SCRIPT = """
import itertools, json, sys
from internal_policy_lens.config import BupoConfig
from internal_policy_lens.integrations.trl.run import train_bupo_trl
calls = itertools.count()
def parity(completions, **kwargs):
    return [float(next(calls) % 2 == 0) for _ in completions]
train_bupo_trl(BupoConfig(**json.loads(sys.argv[1])), progress=False, reward_funcs=[parity])
"""


@pytest.mark.parametrize("processes", [1, 2])
def test_two_steps_freeze_above_k_during_ipa_only(tiny_dirs, data_file, tmp_path, processes):
    cfg = _cfg(tiny_dirs, data_file, tmp_path / "run")
    if processes == 1:
        out = train_bupo_trl(cfg, progress=False, reward_funcs=trl_rewards())
    else:  # DDP over two CPU processes (gloo), launched as accelerate or torchrun would
        script = tmp_path / "ddp.py"
        script.write_text(_DDP_SCRIPT)
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        command += ["--nproc_per_node", "2", str(script), json.dumps(asdict(cfg))]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        out = tmp_path / "run"
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    phases = [(m["step"], m["phase"], m["layer"]) for m in metrics]
    assert phases == [(0, "ipa", K), (1, "grpo", None)]
    assert all(m["loss"] == m["loss"] and m["grad_norm"] > 0 for m in metrics)
    per_rollout = 2  # 3 prompts x 4 responses in mini-batches of 6
    start = _weights(tiny_dirs["qwen2"])
    ipa = _weights(out / f"checkpoint-{per_rollout}")
    grpo = _weights(out / f"checkpoint-{2 * per_rollout}")
    assert_ipa_then_grpo_updates(start, ipa, grpo)


def test_vllm_correction_is_off_during_ipa_only(tiny_dirs, data_file, tmp_path):
    trainer = _trainer(tiny_dirs, data_file, tmp_path)
    trainer.vllm_importance_sampling_correction = True  # what TRL sets from the config
    trainer.state.global_step = trainer.steps_per_rollout - 1
    assert trainer.in_ipa and not trainer.vllm_importance_sampling_correction
    trainer.state.global_step = trainer.steps_per_rollout
    assert not trainer.in_ipa and trainer.vllm_importance_sampling_correction


def test_grpo_config_maps_the_builtin_fields():
    cfg = BupoConfig(
        prompts_per_step=4, group_size=8, mini_batch_size=16, updates_per_step=2, steps=10
    )
    args = bupo_trl.grpo_config(cfg, world_size=2, output_dir="unused")
    assert args.per_device_train_batch_size == 8
    assert args.generation_batch_size == 32 and args.num_generations == 8
    assert args.num_iterations == 2 and args.max_steps == 10 * 2 * 2
    assert (args.epsilon, args.epsilon_high, args.beta) == (0.2, 0.2, 0.0)
    assert args.loss_type == "bnpo" and args.max_completion_length == cfg.max_new_tokens
    with pytest.raises(ValueError, match="multiple of mini_batch_size"):
        bupo_trl.grpo_config(BupoConfig(prompts_per_step=3, group_size=5), output_dir="unused")


def test_cli_engine_trl(tiny_dirs, data_file, tmp_path):
    # Through the command line the reward is the real one (all 0 for a random model).
    out = tmp_path / "cli"
    args = ["train-bupo", "--engine", "trl", "--model", str(tiny_dirs["llama"])]
    args += ["--data", str(data_file), "--out", str(out), "--layer", "1", "--steps", "2"]
    args += ["--iterative-steps", "1", "--group-size", "4", "--prompts-per-step", "2"]
    args += ["--mini-batch-size", "8", "--max-new-tokens", "6", "--quiet"]
    args += ["--trl-option", "log_completions=false", "--probe-every", "1", "--probe-samples", "2"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["phase"] for m in metrics] == ["ipa", "grpo"]
    assert (out / "final" / "model.safetensors").is_file()
    probes = pd.read_parquet(out / "probes.parquet")  # the same probes as the built-in engine
    assert sorted(probes["step"].unique()) == [0, 1, 2]
    assert set(probes.loc[probes.quantity == "kl_layer_other", "layer"]) == {1}
    config = json.loads((out / "config.json").read_text())
    assert config["engine"] == "trl" and config["trl_options"] == {"log_completions": False}


def test_cli_engine_trl_plain_grpo_reads_no_layer(tiny_dirs, data_file, tmp_path):
    # --iterative-steps 0 (--layer auto, no probes): no entropy pass, no layer, and the summary.
    out = tmp_path / "grpo"
    args = ["train-bupo", "--engine", "trl", "--model", str(tiny_dirs["llama"])]
    args += ["--data", str(data_file), "--out", str(out), "--steps", "1"]
    args += ["--iterative-steps", "0", "--group-size", "4", "--prompts-per-step", "2"]
    args += ["--mini-batch-size", "8", "--max-new-tokens", "6", "--quiet"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert json.loads((out / "config.json").read_text())["layer"] is None
    assert "--layer auto" not in result.output
    assert "accuracy 0.000 (step 0; 1 GRPO step)" in result.output  # the real reward: all 0


def test_resume_redoes_the_steps_after_the_last_checkpoint(tiny_dirs, data_file, tmp_path):
    import shutil

    cfg = _cfg(tiny_dirs, data_file, tmp_path / "run", steps=3)
    out = train_bupo_trl(cfg, progress=False, reward_funcs=trl_rewards())
    full = (out / "metrics.jsonl").read_text().splitlines()
    shutil.rmtree(out / "checkpoint-6")  # killed after step 2's metrics, before its checkpoint
    with pytest.raises(ValueError, match="--resume"):
        train_bupo_trl(cfg, progress=False, reward_funcs=trl_rewards())
    with pytest.raises(ValueError, match="another configuration"):
        train_bupo_trl(
            _cfg(tiny_dirs, data_file, out, steps=3, lr=1e-3, resume=True), progress=False
        )
    resumed = _cfg(tiny_dirs, data_file, out, steps=3, resume=True)
    train_bupo_trl(resumed, progress=False, reward_funcs=trl_rewards())
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(m["step"], m["phase"]) for m in lines] == [(0, "ipa"), (1, "grpo"), (2, "grpo")]
    assert [json.loads(x)["loss"] for x in full[:2]] == [m["loss"] for m in lines[:2]]
    assert (out / "checkpoint-6").is_dir()


def test_trl_options_reach_grpo_config():
    overrides = parse_overrides(["use_vllm=true", "vllm_mode=colocate", "beta=0.05"])
    assert overrides == {"use_vllm": True, "vllm_mode": "colocate", "beta": 0.05}
    with pytest.raises(ValueError, match="GRPOConfig field"):
        parse_overrides(["no_such_field=1"])


def test_contract_check_fails_loudly_when_trl_changes(monkeypatch):
    from trl import GRPOTrainer

    monkeypatch.setattr(GRPOTrainer, "_get_per_token_logps_and_entropies", lambda self, m, x: 0)
    with pytest.raises(RuntimeError, match="changed what BuPO overrides"):
        bupo_trl.check_trl_contract()


def test_internal_policy_refuses_bad_layer_and_lens(tiny_dirs):
    model, _ = load_causal_lm(tiny_dirs["qwen2"])
    with pytest.raises(ValueError, match="layer 3 is out of range"):
        with bupo_trl.internal_policy(model, 3):
            pass
    with pytest.raises(ValueError, match=r"lens 'tuned' cannot train pi\^k"):
        with bupo_trl.internal_policy(model, 0, "tuned"):
            pass
    assert len(model.get_decoder().layers) == 3  # left as it was


def test_trainer_refuses_settings_that_break_ipa(tiny_dirs, data_file, tmp_path):
    cfg = _cfg(tiny_dirs, data_file, tmp_path / "bad")
    model, tokenizer = load_causal_lm(cfg.model)
    common = dict(
        model=model,
        reward_funcs=trl_rewards(),
        train_dataset=bupo_trl.prompt_dataset([{"prompt": "1+1?", "answer": "2"}] * 4, tokenizer),
        processing_class=tokenizer,
        layer=K,
        iterative_steps=1,
    )
    masked = bupo_trl.grpo_config(cfg, disable_tqdm=True, off_policy_mask_threshold=0.5)
    with pytest.raises(ValueError, match="off_policy_mask_threshold"):
        bupo_trl.BupoGRPOTrainer(args=masked, **common)
    split = bupo_trl.grpo_config(  # 3 optimiser micro-steps per generation, accumulated by 2
        cfg,
        disable_tqdm=True,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        steps_per_generation=3,
        generation_batch_size=None,
    )
    with pytest.raises(ValueError, match="must be a multiple of gradient_accumulation_steps"):
        bupo_trl.BupoGRPOTrainer(args=split, **common)


def test_cli_engine_errors(tiny_dirs, data_file, tmp_path, monkeypatch):
    args = ["train-bupo", "--model", str(tiny_dirs["qwen2"]), "--data", str(data_file)]
    args += ["--out", str(tmp_path / "x"), "--layer", "1", "--quiet"]
    unknown = CliRunner().invoke(app, [*args, "--engine", "jax"])
    assert unknown.exit_code == 2 and "unknown engine 'jax'" in unknown.output
    stray = CliRunner().invoke(app, [*args, "--trl-option", "beta=0.1"])
    assert stray.exit_code == 2 and "--trl-option without --engine trl" in stray.output
    monkeypatch.setitem(sys.modules, "internal_policy_lens.integrations.trl.run", None)
    missing = CliRunner().invoke(app, [*args, "--engine", "trl"])
    assert missing.exit_code == 2 and "needs TRL" in missing.output
    assert "pip install 'internal-policy-lens[trl]'" in missing.output
    assert not (tmp_path / "x").exists()
