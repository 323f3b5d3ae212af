"""BuPO's two phases on a mixture-of-experts family and a post-norm family."""

import json

import pytest
from helpers import alternating_reward, assert_ipa_then_grpo_updates, tiny_bupo_config
from safetensors.torch import load_file

from internal_policy_lens.train.loop import train_bupo


@pytest.mark.parametrize("family", ["qwen2_moe", "gemma2"])
def test_two_steps_ipa_then_grpo(family, family_dirs, tiny_dirs, data_file, tmp_path):
    folder = family_dirs(family)
    cfg = tiny_bupo_config(tiny_dirs, data_file, tmp_path / "run", model=str(folder))
    out = train_bupo(cfg, progress=False, reward=alternating_reward())
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(m["phase"], m["layer"]) for m in metrics] == [("ipa", 1), ("grpo", None)]
    start, ipa, grpo = (
        load_file(f / "model.safetensors")
        for f in (folder, out / "checkpoints/step-1", out / "checkpoints/step-2")
    )
    assert_ipa_then_grpo_updates(start, ipa, grpo)
