"""The TRL engine on a mixture-of-experts family and a post-norm, soft-capped family."""

import json

import pytest
import torch
from helpers import (
    FAMILY_ARCHS,
    assert_ipa_then_grpo_updates,
    assert_trl_logprobs_are_ours,
    tiny_bupo_config,
    trl_batch,
    trl_rewards,
    trl_trainer,
)
from safetensors.torch import load_file

from internal_policy_lens.integrations.trl import trainer as bupo_trl
from internal_policy_lens.integrations.trl.run import train_bupo_trl
from internal_policy_lens.model.families import family_of
from internal_policy_lens.model.load import load_causal_lm
from internal_policy_lens.train.rollout import token_logprobs

K = 1


@pytest.mark.parametrize("family,lens", [("qwen2_moe", "raw"), ("gemma2", "norm")])
def test_ipa_logprobs_are_the_lens_logprobs(
    family, lens, family_dirs, family_models, tiny_dirs, data_file, tmp_path
):
    cfg = tiny_bupo_config(
        tiny_dirs, data_file, tmp_path / "trl", model=str(family_dirs(family)), layer=K, lens=lens
    )
    trainer = trl_trainer(cfg, K, lens)
    tokenizer = trainer.processing_class
    policy = family_models(family)
    # Prompts left-padded, completions right-padded (TRL's layout), longer than the window.
    batch = trl_batch(
        tokenizer, ("1+1?", "12+30=? twice", "7*6?"), ("2.", "42 done, then 84", "42")
    )
    assert_trl_logprobs_are_ours(trainer, policy, batch, K, lens)


@pytest.mark.parametrize("family", ["qwen2_moe", "gemma2"])
def test_two_steps_freeze_above_k_during_ipa_only(
    family, family_dirs, tiny_dirs, data_file, tmp_path
):
    folder = family_dirs(family)
    cfg = tiny_bupo_config(
        tiny_dirs, data_file, tmp_path / "run", model=str(folder), layer=K, max_new_tokens=8
    )
    out = train_bupo_trl(cfg, progress=False, reward_funcs=trl_rewards())
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(m["step"], m["phase"], m["layer"]) for m in metrics] == [
        (0, "ipa", K),
        (1, "grpo", None),
    ]
    per_rollout = 2  # 3 prompts x 4 responses in mini-batches of 6
    start, ipa, grpo = (
        load_file(f / "model.safetensors")
        for f in (folder, out / f"checkpoint-{per_rollout}", out / f"checkpoint-{2 * per_rollout}")
    )
    assert_ipa_then_grpo_updates(start, ipa, grpo)


@pytest.mark.parametrize("lens", ["raw", "norm"])
@pytest.mark.parametrize("family", FAMILY_ARCHS)
def test_trimmed_forward_is_the_lens_policy(family, lens, family_dirs, family_models):
    """pi^k inside the plain model's own forward (what the TRL engine trains) on every family."""
    model, tokenizer = load_causal_lm(family_dirs(family))
    ids = torch.tensor([tokenizer("Let x=5; x*x=25 and 25+1=26.")["input_ids"]])
    mask = torch.ones_like(ids)
    with torch.no_grad(), bupo_trl.internal_policy(model, K, lens):
        logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
    layers = getattr(model.get_decoder(), family_of(type(model).__name__).layers_attr)
    assert len(layers) == 3  # restored
    ours, _ = token_logprobs(family_models(family), ids, mask, layer=K, lens_name=lens)
    expected = logp.gather(-1, ids[0, 1:, None])[:, 0]
    torch.testing.assert_close(ours[0], expected, atol=2e-5, rtol=0)
