"""The differentiable log-probabilities of a lens's policy against a float64 computation by hand:
values on four families (Gemma 2's soft-capping, Granite's logit scaling), gradients on Qwen2."""

import pytest
import torch
from helpers import TEXTS, random_translators
from reference import entropy, hf_model, naive_logits, naive_sites, naive_tuned_logits

from internal_policy_lens.lens.logprob import lens_logprobs
from internal_policy_lens.lens.unembed import Lens

ATOL = 3e-5  # float32 products and log-softmax against float64
KEYS = [("resid_post", 1), ("mlp_out", 0), ("final", 2)]


@pytest.fixture
def tiny(models, tiny_dirs, family_models, family_dirs):
    """``name -> (float32 PolicyModel, folder)`` over the test models and the family models."""

    def get(name):
        if name in tiny_dirs:
            return models(name), tiny_dirs[name]
        return family_models(name), family_dirs(name)

    return get


def _naive_logits(hf, x, key, lens, translators):
    if lens == "tuned" and key[0] != "final":
        return naive_tuned_logits(hf, x, *translators[key])
    return naive_logits(hf, x, key[0], "norm" if lens == "tuned" else lens)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("lens_name", ["raw", "norm", "tuned"])
@pytest.mark.parametrize("name", ["qwen2", "llama", "gemma2", "granite"])
def test_lens_logprobs_equal_float64(tiny, name, lens_name, temperature):
    model, folder = tiny(name)
    hf = hf_model(folder)
    seq = model.tokenizer(TEXTS[0])["input_ids"]
    sites, _ = naive_sites(hf, seq)
    targets = torch.tensor(seq[1:])  # [pos - 1]: position t predicts t+1
    translators = random_translators(model, KEYS[:2]) if lens_name == "tuned" else None
    lens = Lens(model, lens_name, translators=translators, temperature=temperature)
    for key in KEYS:
        x = sites[key][:-1]  # [pos - 1, d_model]
        got = lens_logprobs(lens, x[None].float(), *key, targets=targets[None], entropy=True)
        logits = _naive_logits(hf, x, key, lens_name, translators) / temperature
        want = torch.log_softmax(logits, -1)  # [pos - 1, vocab] float64
        assert got.all.shape == (1, *want.shape) and got.all.dtype == torch.float32
        torch.testing.assert_close(got.all[0].double(), want, atol=ATOL, rtol=0)
        token = want.gather(-1, targets[:, None])[:, 0]
        torch.testing.assert_close(got.token[0].double(), token, atol=ATOL, rtol=0)
        torch.testing.assert_close(got.entropy[0].double(), entropy(logits), atol=ATOL, rtol=0)
    without = lens_logprobs(lens, x.float(), *key)
    assert without.token is None and without.entropy is None


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("lens_name", ["raw", "norm"])
def test_lens_logprobs_gradients_equal_float64(models, tiny_dirs, lens_name, temperature):
    """Gradients of a loss reading log pi(target) and the entropy, in the site vectors, the
    unembedding and (norm lens) the final norm's weight, against autograd on float64 by hand."""
    model = models("qwen2")
    hf = hf_model(tiny_dirs["qwen2"])
    seq = model.tokenizer(TEXTS[0])["input_ids"]
    sites, _ = naive_sites(hf, seq)
    x64 = sites["resid_post", 1][:-1]  # [pos - 1, d_model]
    targets = torch.tensor(seq[1:])
    weights = torch.linspace(-1.0, 1.0, len(targets), dtype=torch.float64)  # every row differs

    def loss(token, entropy):
        return (token * weights.to(token.dtype)).sum() + 0.3 * entropy.sum()

    norm_hf, norm = hf.model.norm, model.final_norm
    # By hand, float64: RMSNorm (norm lens), the unembedding, the temperature, log-softmax.
    x, unembed, gain = (
        t.detach().clone().requires_grad_() for t in (x64, hf.lm_head.weight, norm_hf.weight)
    )
    h = x
    if lens_name == "norm":
        h = h / torch.sqrt((h * h).mean(-1, keepdim=True) + norm_hf.variance_epsilon) * gain
    logp = torch.log_softmax(h @ unembed.T / temperature, -1)  # [pos - 1, vocab]
    loss(logp.gather(-1, targets[:, None])[:, 0], -(logp.exp() * logp).sum(-1)).backward()

    mine = x64.float().requires_grad_()
    model.bridge.zero_grad(set_to_none=True)
    try:
        lens = Lens(model, lens_name, temperature=temperature)
        out = lens_logprobs(lens, mine, "resid_post", 1, targets=targets, entropy=True)
        loss(out.token, out.entropy).backward()
        pairs = [(mine.grad, x.grad), (model.unembed.weight.grad, unembed.grad)]
        if lens_name == "norm":
            pairs.append((norm.weight.grad, gain.grad))
        else:
            assert norm.weight.grad is None  # the raw lens reads no norm
        for got, want in pairs:
            assert want.abs().max() > 1e-3  # a gradient that could be wrong
            torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-4)
    finally:
        model.bridge.zero_grad(set_to_none=True)
