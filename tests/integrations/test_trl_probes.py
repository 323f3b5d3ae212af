"""InternalPolicyCallback: the training probes on a plain trl.GRPOTrainer and on --engine trl."""

import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict
from types import SimpleNamespace

import pandas as pd
import pytest
from helpers import (
    PROBE_QUANTITIES,
    assert_probes_follow_the_weights,
    assert_resumed_probes_match,
    tiny_bupo_config,
    trl_rewards,
)
from transformers import TrainerCallback

from internal_policy_lens.integrations.trl import InternalPolicyCallback
from internal_policy_lens.integrations.trl.run import train_bupo_trl
from internal_policy_lens.model.load import load_causal_lm
from internal_policy_lens.train.probes import PROBE_COLUMNS

K = 1  # probed layer of the 3-layer tiny models
HEADLINE = {
    "ipl/entropy_resid_post/L1",
    "ipl/entropy_resid_post/L2",
    "ipl/delta_ffn/L1",
    "ipl/cos_hidden/1->2",
    "ipl/kl_layer_other/1->2",
    "ipl/perplexity",
    "ipl/probe_time",
}

# A plain GRPOTrainer (no BuPO) of two optimiser steps, built the same way in-process and under
# torchrun: one generation of 3 prompts x 4 responses, two mini-batches of 6.
_PLAIN = """
import json, sys
from pathlib import Path
from trl import GRPOTrainer
from internal_policy_lens.config import BupoConfig
from internal_policy_lens.data.records import read_records
from internal_policy_lens.integrations.trl import InternalPolicyCallback
from internal_policy_lens.integrations.trl.trainer import grpo_config, prompt_dataset
from internal_policy_lens.model.load import load_causal_lm


def plain_trainer(cfg, callbacks, rewards):
    model, tokenizer = load_causal_lm(cfg.model)
    args = grpo_config(
        cfg, max_steps=2, logging_steps=1, save_steps=1, disable_tqdm=True, save_only_model=True
    )
    return GRPOTrainer(
        model=model,
        args=args,
        reward_funcs=rewards,
        train_dataset=prompt_dataset(read_records(cfg.data), tokenizer),
        processing_class=tokenizer,
        callbacks=callbacks,
    )


if __name__ == "__main__":
    import itertools
    from torch import distributed as dist

    calls = itertools.count()
    def parity(completions, **kwargs):
        return [float(next(calls) % 2 == 0) for _ in completions]

    cfg = BupoConfig(**json.loads(sys.argv[1]))
    probes = InternalPolicyCallback(probe_every=1, probe_data=cfg.data, probe_samples=2, layer=1)
    plain_trainer(cfg, [probes], [parity]).train()
    rank = dist.get_rank() if dist.is_initialized() else 0
    Path(cfg.out, f"rank-{rank}.json").write_text(json.dumps(sorted(probes.times)))
"""


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """The module defining ``plain_trainer`` (also the torchrun script)."""
    root = tmp_path_factory.mktemp("plain")
    script = root / "plain_grpo.py"
    script.write_text(_PLAIN)
    sys.path.insert(0, str(root))
    try:
        import plain_grpo
    finally:
        sys.path.remove(str(root))
    return plain_grpo, script


def _cfg(tiny_dirs, data_file, out, **kw):
    return tiny_bupo_config(
        tiny_dirs, data_file, out, **{"iterative_steps": 0, "max_new_tokens": 8, **kw}
    )


def _train_plain(plain, cfg, callbacks):
    trainer = plain[0].plain_trainer(cfg, callbacks, trl_rewards())
    trainer.train()
    return trainer


@pytest.mark.slow
def test_plain_grpo_trainer_probes_the_trained_weights(plain, tiny_dirs, data_file, tmp_path):
    cfg = _cfg(tiny_dirs, data_file, tmp_path / "probed")
    probes = InternalPolicyCallback(probe_every=1, probe_data=cfg.data, probe_samples=2, layer=K)
    reporter = _Reporter()  # stands for report_to's reporters, which come before given callbacks
    trainer = plain[0].plain_trainer(cfg, [reporter], trl_rewards())
    probes.attach(trainer)
    assert trainer.callback_handler.callbacks.index(
        probes
    ) < trainer.callback_handler.callbacks.index(reporter)
    trainer.train()
    out = tmp_path / "probed"
    table = pd.read_parquet(out / "probes.parquet")
    assert list(table.columns) == list(PROBE_COLUMNS)
    assert sorted(table["step"].unique()) == [0, 1, 2]  # optimiser steps taken
    assert set(table["quantity"]) == PROBE_QUANTITIES
    assert sorted(probes.times) == [0, 1, 2] and all(t > 0 for t in probes.times.values())
    # The headline numbers are in the trainer's log history, at the step they were measured.
    history = trainer.state.log_history
    logged = {e["step"]: e for e in history if "ipl/perplexity" in e}
    assert sorted(logged) == [0, 1, 2]
    assert all(HEADLINE <= e.keys() for e in logged.values())
    assert all("loss" in logged[s] for s in (1, 2))  # merged into the trainer's own line
    assert [e for e in reporter.logs if "ipl/perplexity" in e] == [logged[1], logged[2]]
    rows = table[(table.step == 2) & (table.quantity == "kl_layer_other")]
    assert logged[2]["ipl/kl_layer_other/1->2"] == rows["value"].item()
    # Each probe equals an independent computation on the weights of its step.
    records = [json.loads(x) for x in (out / "probe_set.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(r["response"] for r in records)
    probed = {0: tiny_dirs["qwen2"], 1: out / "checkpoint-1", 2: out / "checkpoint-2"}
    assert_probes_follow_the_weights(table, probed, records, K)
    # The trainer's model is left as it was: its own module names and attention.
    assert list(trainer.model.state_dict()) == list(load_causal_lm(cfg.model)[0].state_dict())
    # Probing changes nothing in training: the same logged training numbers without it.
    bare = _train_plain(plain, _cfg(tiny_dirs, data_file, tmp_path / "bare"), [])
    assert not (tmp_path / "bare" / "probes.parquet").exists()
    a = [e for e in history if "loss" in e]
    b = [e for e in bare.state.log_history if "loss" in e]
    assert [e["step"] for e in a] == [e["step"] for e in b] == [1, 2]
    assert "reward" in b[0]  # logged with the generation (step 1)
    for x, y in zip(a, b):
        numbers = {
            k for k in y if isinstance(y[k], float) and "time" not in k and "per_second" not in k
        }
        assert numbers >= {"loss", "grad_norm", "entropy"}
        assert {k for k in x if not k.startswith("ipl/")} == y.keys()
        for key in numbers:
            assert x[key] == pytest.approx(y[key], rel=1e-6, abs=1e-6), key


@pytest.mark.slow
def test_only_the_main_process_probes_under_torchrun(plain, tiny_dirs, data_file, tmp_path):
    out = tmp_path / "ddp"
    cfg = _cfg(tiny_dirs, data_file, out)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc_per_node", "2", str(plain[1]), json.dumps(asdict(cfg))]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((out / "rank-0.json").read_text()) == [0, 1, 2]
    assert json.loads((out / "rank-1.json").read_text()) == []  # rank 1 never probed
    table = pd.read_parquet(out / "probes.parquet")
    assert table.groupby("step").size().index.tolist() == [0, 1, 2]
    assert not table.duplicated(["step", "quantity", "layer", "other_layer"]).any()


@pytest.mark.slow
def test_engine_trl_probes_and_resumes_with_one_probe_per_step(tiny_dirs, data_file, tmp_path):
    kw = dict(layer=K, max_new_tokens=8, steps=3, probe_every=1, probe_samples=2)
    full = train_bupo_trl(
        tiny_bupo_config(tiny_dirs, data_file, tmp_path / "full", **kw),
        progress=False,
        reward_funcs=trl_rewards(),
    )
    a = pd.read_parquet(full / "probes.parquet")
    assert sorted(a["step"].unique()) == [0, 1, 2, 3]  # rollout steps, as metrics.jsonl
    metrics = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [0, 1, 2]
    assert all(m["probe_time"] > 0 and not any(k.startswith("ipl/") for k in m) for m in metrics)
    # Killed after step 2's probe, before its checkpoint: the resumed run redoes steps 2 and 3.
    shutil.rmtree(full / "checkpoint-6")
    resumed = train_bupo_trl(
        tiny_bupo_config(tiny_dirs, data_file, full, resume=True, **kw),
        progress=False,
        reward_funcs=trl_rewards(),
    )
    b = pd.read_parquet(resumed / "probes.parquet")
    assert_resumed_probes_match(a, b, [0, 1, 2, 3])
    metrics = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    assert [(m["step"], m["probe_time"] > 0) for m in metrics] == [(0, True), (1, True), (2, True)]


class _Reporter(TrainerCallback):
    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append({**logs, "step": state.global_step})


def _timing(key: str) -> bool:
    return "time" in key or "per_second" in key


def test_callback_refuses_bad_settings():
    with pytest.raises(ValueError, match="at least 1"):
        InternalPolicyCallback(probe_every=0)
    with pytest.raises(ValueError, match="lens 'tuned'"):
        InternalPolicyCallback(lens="tuned")


def test_callback_refuses_a_layer_the_model_lacks(tiny_dirs, data_file, tmp_path):
    probes = InternalPolicyCallback(probe_data=str(data_file), probe_samples=1, layer=3)
    with pytest.raises(ValueError, match=r"layer 3 is out of range \(0\.\.2\)"):
        _begin(probes, tiny_dirs["qwen2"], tmp_path)
    assert not (tmp_path / "probes.parquet").exists()


def _begin(callback, folder, out, dataset=None):
    """``on_train_begin`` of a fresh run on the model in ``folder`` (what a trainer calls)."""
    from transformers import TrainerControl, TrainerState

    model, tokenizer = load_causal_lm(folder)
    args = SimpleNamespace(output_dir=str(out), seed=0, temperature=1.0, max_completion_length=8)
    state = TrainerState()
    callback.on_train_begin(
        args,
        state,
        TrainerControl(),
        model=model,
        processing_class=tokenizer,
        train_dataloader=SimpleNamespace(dataset=dataset(tokenizer) if dataset else None),
    )
    return state


def test_probe_data_defaults_to_the_training_prompts(tiny_dirs, data_file, tmp_path):
    from datasets import Dataset

    from internal_policy_lens.integrations.trl.trainer import prompt_dataset

    records = [{"prompt": f"What is {i}+1?", "answer": str(i + 1)} for i in range(5)]
    probes = InternalPolicyCallback(probe_samples=2, layer=K)
    _begin(probes, tiny_dirs["qwen2"], tmp_path, lambda tok: prompt_dataset(records, tok))
    drawn = [
        json.loads(x)["prompt"] for x in (tmp_path / "probe_set.jsonl").read_text().splitlines()
    ]
    assert len(drawn) == 2
    trl_prompts = [r["prompt"] for r in prompt_dataset(records, probes.prober.model.tokenizer)]
    assert all(p in trl_prompts for p in drawn)
    with pytest.raises(ValueError, match="no 'prompt' column.*pass probe_data="):
        _begin(
            InternalPolicyCallback(layer=K),
            tiny_dirs["qwen2"],
            tmp_path / "other",
            lambda tok: Dataset.from_list([{"text": "1+1?"}]),
        )


@pytest.mark.parametrize(
    "model", [pytest.param("ipl-tiny-qwen2", marks=pytest.mark.slow), "random"]
)
def test_default_layer_is_the_suggested_layer(model, tiny_dirs, data_file, tmp_path):
    from internal_policy_lens import load_model
    from internal_policy_lens.train.layer import suggested_layer

    folder = model if model != "random" else tiny_dirs["qwen2"]
    probes = InternalPolicyCallback(probe_data=str(data_file), probe_samples=3)
    policy = load_model(folder, dtype="float32", device="cpu")
    if model == "random":  # a random model's entropies suggest no layer: a one-line error
        with pytest.raises(ValueError, match=r"no layer can be suggested \(.*\); pass layer=K"):
            _begin(probes, folder, tmp_path)
        records = [json.loads(x) for x in (tmp_path / "probe_set.jsonl").read_text().splitlines()]
        with pytest.raises(ValueError):
            suggested_layer(policy, records, max_new_tokens=8, lens="raw")
        return
    state = _begin(probes, folder, tmp_path)
    records = [json.loads(x) for x in (tmp_path / "probe_set.jsonl").read_text().splitlines()]
    assert probes.layer == suggested_layer(policy, records, max_new_tokens=8, lens="raw")
    k, last = probes.layer, policy.n_layers - 1
    entry = state.log_history[0]  # the step-0 probe's own entry
    assert entry["step"] == 0 and entry[f"ipl/kl_layer_other/{k}->{last}"] > 0
    table = pd.read_parquet(tmp_path / "probes.parquet")
    assert set(table["step"]) == {0} and set(
        table.loc[table.quantity == "cos_hidden", "layer"]
    ) == {k}
