"""BuPO on every device, both engines: IPA then GRPO, the freeze above k, kill and resume, probes.

Each body runs on the CPU here and, with the ``cuda`` marker, on a CUDA GPU.
"""

import json
import shutil

import pandas as pd
import pytest
from helpers import (
    alternating_reward,
    assert_ipa_then_grpo_updates,
    assert_resumed_probes_match,
    tiny_bupo_config,
    trl_rewards,
)
from safetensors.torch import load_file

from internal_policy_lens.train.loop import train_bupo

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
TIMES = {"rollout_time", "update_time", "probe_time", "step_time"}


def _builtin(cfg):
    return train_bupo(cfg, progress=False, reward=alternating_reward())


def _trl(cfg):
    from internal_policy_lens.integrations.trl.run import train_bupo_trl

    return train_bupo_trl(cfg, progress=False, reward_funcs=trl_rewards())


# engine -> (train, checkpoint folder of rollout step n): TRL's count optimiser steps, 2 a step
ENGINES = {
    "builtin": (_builtin, lambda out, n: out / "checkpoints" / f"step-{n}"),
    "trl": (_trl, lambda out, n: out / f"checkpoint-{2 * n}"),
}


def _metrics(out):
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in m.items() if k not in TIMES and "per_second" not in k} for m in lines]


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("engine", list(ENGINES))
def test_ipa_then_grpo_freezes_above_k_and_resumes(engine, device, tiny_dirs, data_file, tmp_path):
    train, checkpoint = ENGINES[engine]
    kw = dict(steps=3, iterative_steps=2, probe_every=1, probe_samples=2, device=device)
    full = train(tiny_bupo_config(tiny_dirs, data_file, tmp_path / "full", **kw))
    metrics = _metrics(full)
    assert [(m["step"], m["phase"], m["layer"]) for m in metrics] == [
        (0, "ipa", 1),
        (1, "ipa", 1),
        (2, "grpo", None),
    ]
    start = load_file(tiny_dirs["qwen2"] / "model.safetensors")
    ipa, grpo = (load_file(checkpoint(full, n) / "model.safetensors") for n in (2, 3))
    assert_ipa_then_grpo_updates(start, ipa, grpo)  # two IPA steps, then one GRPO step
    probes = pd.read_parquet(full / "probes.parquet")
    # Killed before the last checkpoint: the resumed run redoes step 2 on the same device.
    shutil.rmtree(checkpoint(full, 3))
    train(tiny_bupo_config(tiny_dirs, data_file, full, resume=True, **kw))
    resumed = _metrics(full)
    assert [m["step"] for m in resumed] == [0, 1, 2]
    for a, b in zip(metrics, resumed, strict=True):
        assert a.keys() == b.keys()
        for key, value in a.items():
            close = isinstance(value, float)
            assert value == (pytest.approx(b[key], rel=1e-5, abs=1e-7) if close else b[key]), key
    assert_resumed_probes_match(probes, pd.read_parquet(full / "probes.parquet"), [0, 1, 2, 3])
