"""The TRL engine's internal layer policy pi^k (the trimmed forward and TRL's fused LM head) is
:func:`~internal_policy_lens.lens.logprob.lens_logprobs`'s, and both are a float64 computation's."""

import pytest
import torch
from helpers import tiny_bupo_config, trl_batch, trl_trainer
from reference import hf_model, naive_logits, naive_sites

from internal_policy_lens.lens.capture import capture
from internal_policy_lens.lens.logprob import lens_logprobs
from internal_policy_lens.lens.unembed import Lens

K = 1  # internal layer of the 3-layer tiny models
TEMPERATURE = 0.7  # TRL divides the logits by it in its fused head; the lens does too
ATOL = 2e-5


@pytest.mark.parametrize(
    "name,lens_name", [("qwen2", "raw"), ("llama", "raw"), ("llama", "norm"), ("gemma2", "norm")]
)
def test_trl_internal_logprobs_are_lens_logprobs_and_float64(
    name, lens_name, models, tiny_dirs, family_models, family_dirs, data_file, tmp_path
):
    folder = tiny_dirs[name] if name in tiny_dirs else family_dirs(name)
    policy = models(name) if name in tiny_dirs else family_models(name)
    cfg = tiny_bupo_config(
        tiny_dirs, data_file, tmp_path, model=str(folder), layer=K, temperature=TEMPERATURE
    )
    trainer = trl_trainer(cfg, K, lens_name)
    # Prompts left-padded, completions right-padded (TRL's layout). ids, mask [N, P + C]
    ids, mask, p, c = trl_batch(
        policy.tokenizer, ("1+1?", "12+30=? twice", "7*6?"), ("2.", "42 done, then 84", "42")
    )
    trainer.state.global_step = 0
    assert trainer.in_ipa
    with torch.no_grad():
        engine, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, mask, c)
    lens = Lens(policy, lens_name, temperature=TEMPERATURE)
    hf = hf_model(folder)
    key = ("resid_post", K)
    for row in range(len(ids)):
        real = mask[row].nonzero()[:, 0]  # [n] the sequence's positions in the padded row
        seq = ids[row, real]  # [n] unpadded
        with torch.no_grad(), capture(policy, keys=[key]) as acts:
            policy.forward(seq[None], torch.ones_like(seq[None]), stop_at_layer=K + 1)
        ours = lens_logprobs(lens, acts[key][0, :-1], *key, targets=seq[1:]).token
        naive, _ = naive_sites(hf, seq.tolist())
        logits = naive_logits(hf, naive[key][:-1], "resid_post", lens_name) / TEMPERATURE
        want = torch.log_softmax(logits, -1).gather(-1, seq[1:, None])[:, 0]  # float64
        # Completion token j (padded position p + j) is predicted at unpadded index p + j - 1
        # - real[0]; the engine's row holds the C completion positions, padding last.
        n = int(mask[row, p:].sum())
        at = p - 1 - int(real[0]) + torch.arange(n)
        torch.testing.assert_close(engine[row, :n], ours[at], atol=ATOL, rtol=0)
        torch.testing.assert_close(engine[row, :n].double(), want[at], atol=ATOL, rtol=0)
        torch.testing.assert_close(ours.double(), want, atol=ATOL, rtol=0)
