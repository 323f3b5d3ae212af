"""The callers of the reduction dispatcher beyond the tables: fit-lens's metrics, the training
probes' pairwise KL, and the dispatcher's reference policy and reverse KL they use."""

import numpy as np
import pytest
import torch
from helpers import TEXTS
from reference import entropy, hf_model, naive_logits, naive_sites

from internal_policy_lens.config import LensSettings
from internal_policy_lens.data.encode import encode_inputs
from internal_policy_lens.lens import fit
from internal_policy_lens.lens.reduce import choose_backend, dispatch, site_stats
from internal_policy_lens.lens.unembed import Lens
from internal_policy_lens.statistics import Request
from internal_policy_lens.train import probes, rollout

EXACT_ATOL = 3e-5


def _kl(logp, logq):
    """KL(p || q) per row, float64, from log-probabilities."""
    return (logp.exp() * (logp - logq)).sum(-1)


@pytest.fixture
def spy(monkeypatch):
    """Records every call of the dispatcher (the callers import it from the package)."""
    calls = []

    def recording(*args, **kw):
        request = args[4] if len(args) > 4 else kw.get("request", dispatch.ENTROPY)
        calls.append({"lens": args[0], "request": request, **kw})
        return dispatch.site_stats(*args, **kw)

    monkeypatch.setattr(fit, "site_stats", recording)
    monkeypatch.setattr(probes, "site_stats", recording)
    monkeypatch.setattr(rollout, "site_stats", recording)
    return calls


@pytest.mark.parametrize("lens", ["raw", "norm"])
def test_reference_site_and_reverse_kl_match_float64(models, tiny_dirs, lens):
    # A reference policy other than the final one, without next tokens: KL both ways and top-1.
    model = models("qwen2")
    hf = hf_model(tiny_dirs["qwen2"])
    generator = torch.Generator().manual_seed(7)
    acts = {
        ("resid_post", j): 4 * torch.randn(2, 5, model.d_model, generator=generator)
        for j in (0, 1, 2)
    }
    index = torch.ones(2, 5, dtype=torch.bool).nonzero(as_tuple=True)
    ref = ("resid_post", 1)
    wanted = ("kl_internal_final", "top1_agrees", "kl_final_internal")
    got = site_stats(
        Lens(model, lens), acts, list(acts), index, Request(wanted, reference=ref), chunk_tokens=7
    )
    logp = {
        key: torch.log_softmax(naive_logits(hf, x[index], key[0], lens), -1)
        for key, x in acts.items()
    }
    for key in acts:
        assert set(got[key]) == {"entropy", "kl_internal_final", "top1_agrees", "kl_final_internal"}
        want_to, want_from = _kl(logp[key], logp[ref]), _kl(logp[ref], logp[key])
        np.testing.assert_allclose(
            got[key]["kl_internal_final"], want_to, atol=EXACT_ATOL, rtol=1e-5
        )
        np.testing.assert_allclose(
            got[key]["kl_final_internal"], want_from, atol=EXACT_ATOL, rtol=1e-5
        )
        agrees = logp[key].argmax(-1) == logp[ref].argmax(-1)
        np.testing.assert_array_equal(got[key]["top1_agrees"], agrees)
    assert np.abs(got["resid_post", 0]["kl_final_internal"]).min() > 1e-3  # not a zero comparison
    np.testing.assert_allclose(got[ref]["kl_final_internal"], 0, atol=1e-5)


def test_backends_are_chosen_by_what_they_compute(monkeypatch):
    # The reverse KL, another reference policy or a temperature: only the rows backend.
    monkeypatch.setattr(dispatch, "triton_support", lambda device: (True, ""))
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    reverse = Request(("kl_final_internal",))
    assert choose_backend(cpu, reverse) == "rows"
    assert choose_backend(cuda, reverse) == "rows"
    extras = Request.of(extras=True, topk=5)
    assert choose_backend(cuda, extras, other_reference=True) == "rows"
    assert choose_backend(cpu, Request(), temperature=True) == "rows"
    assert choose_backend(cpu, reverse, backend="rows") == "rows"
    for backend in ("tiles", "triton"):
        with pytest.raises(ValueError, match="does not compute kl_final_internal"):
            choose_backend(cuda, reverse, backend=backend)
        with pytest.raises(ValueError, match="reference policy other than the final"):
            choose_backend(cuda, Request(), backend=backend, other_reference=True)
        with pytest.raises(ValueError, match="no lens temperature"):
            choose_backend(cuda, Request(), backend=backend, temperature=True)
    # The kernel computes the four extras only together.
    alone = Request(("next_token_rank",))
    assert choose_backend(cuda, alone) == "rows"
    with pytest.raises(ValueError, match="only together"):
        choose_backend(cuda, alone, backend="triton")


def _rows(model, hf, keys):
    """fit-lens rows of TEXTS' tokens: the package's collected vectors and the float64 model's."""
    ids = model.tokenizer(TEXTS[0])["input_ids"][:12]
    naive, logits = naive_sites(hf, ids)
    acts = {key: naive[key][:-1].float() for key in keys}
    nxt = torch.tensor(ids[1:])
    final = torch.log_softmax(logits.double()[:-1], -1)
    # The final norm's output, from the float64 model's own head input.
    x = naive["final", model.n_layers - 1][:-1]
    return fit.Rows(acts, x.float(), nxt, [0]), final


@pytest.mark.parametrize("lens", ["raw", "norm"])
def test_lens_metrics_equal_float64_through_the_dispatcher(models, tiny_dirs, spy, lens):
    model = models("qwen2")
    hf = hf_model(tiny_dirs["qwen2"])
    keys = [("resid_post", 0), ("mlp_out", 1), ("resid_post", 2)]
    rows, final = _rows(model, hf, keys)
    table = fit.lens_metrics(Lens(model, lens), rows, chunk=9).set_index(["site", "layer"])
    assert len(spy) == 1 and "kl_final_internal" in spy[0]["request"].statistics
    for key in keys:
        logp = torch.log_softmax(naive_logits(hf, rows.acts[key].double(), key[0], lens), -1)
        got = table.loc[key]
        want_ce = -logp.gather(-1, rows.next_ids[:, None]).mean().item()
        agree = (logp.argmax(-1) == final.argmax(-1)).double().mean().item()
        want_kl = _kl(final, logp).mean().item()
        assert got["kl_final_internal"] == pytest.approx(want_kl, abs=EXACT_ATOL)
        assert got["next_token_ce"] == pytest.approx(want_ce, abs=EXACT_ATOL)
        assert got["top1_agrees"] == pytest.approx(agree, abs=1e-12)
    # Not a comparison of zeros (the last layer's norm lens is the final policy itself).
    assert table.loc[("resid_post", 0), "kl_final_internal"] > 1e-3


def test_pairwise_probes_equal_float64_through_the_dispatcher(models, tiny_dirs, spy):
    model = models("qwen2")
    hf = hf_model(tiny_dirs["qwen2"])
    record = {"sample_id": "a", "prompt": TEXTS[0][:40], "response": TEXTS[2]}
    got = probes.pairwise(model, [record], 0, LensSettings(lens="norm"))
    request = spy[0]["request"]
    assert len(spy) == 1 and request.reference == ("resid_post", 0)
    assert request.statistics == ("entropy", "kl_final_internal")
    (encoded,) = encode_inputs(model.tokenizer, [record])
    naive, _ = naive_sites(hf, encoded.input_ids)
    kept = [p for p in range(len(encoded.input_ids) - 1) if p + 1 >= encoded.response_start]
    h = {j: naive["resid_post", j][kept].double() for j in range(model.n_layers)}
    logp = {
        j: torch.log_softmax(naive_logits(hf, x, "resid_post", "norm"), -1) for j, x in h.items()
    }
    for j in range(1, model.n_layers):
        want = _kl(logp[0], logp[j]).mean().item()
        assert got["kl_layer_other"][j] == pytest.approx(want, abs=EXACT_ATOL)
        assert got["kl_layer_other"][j] > 1e-3
        cos = torch.nn.functional.cosine_similarity(h[0], h[j]).mean().item()
        assert got["cos_hidden"][j] == pytest.approx(cos, abs=1e-6)  # float32 vectors


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("layer", [1, None])
def test_trainer_entropy_without_gradients_equals_float64(
    models, tiny_dirs, spy, layer, temperature
):
    # The rollout metrics' entropies (pi^k and pi_theta, at the sampling temperature), reduced by
    # the dispatcher; the log-probs and the differentiable path keep their own reductions.
    model = models("qwen2")
    hf = hf_model(tiny_dirs["qwen2"])
    ids = torch.tensor([model.tokenizer(text)["input_ids"][:10] for text in TEXTS[:2]])
    mask = torch.ones_like(ids)
    args = (model, ids, mask)
    with torch.no_grad():
        logp, got = rollout.token_logprobs(*args, layer=layer, temperature=temperature)
    assert len(spy) == 1 and spy[0]["lens"].temperature == temperature
    with torch.no_grad(), torch.enable_grad():
        _, differentiable = rollout.token_logprobs(*args, layer=layer, temperature=temperature)
    key = ("final", model.n_layers - 1) if layer is None else ("resid_post", layer)
    for row, seq in enumerate(ids.tolist()):
        naive, _ = naive_sites(hf, seq)
        want = entropy(naive_logits(hf, naive[key][:-1], key[0], "raw") / temperature)
        np.testing.assert_allclose(got[row], want, atol=EXACT_ATOL, rtol=0)
    torch.testing.assert_close(got, differentiable.detach(), atol=1e-5, rtol=0)
    assert got.shape == logp.shape and got.dtype == torch.float32
    assert got.min() < 0.9 * np.log(model.vocab_size)  # not flat policies everywhere


def test_a_lens_temperature_divides_the_logits_and_runs_on_rows(family_models):
    # Soft-capped: the temperature comes after the head transformation.
    model = family_models("gemma2")
    x = torch.randn(3, model.d_model)
    plain, hot = Lens(model), Lens(model, temperature=0.5)
    with torch.no_grad():
        torch.testing.assert_close(hot.logits(x, "final"), plain.logits(x, "final") / 0.5)
    acts = {("final", 0): x[None]}
    index = (torch.zeros(3, dtype=torch.long), torch.arange(3))
    with pytest.raises(ValueError, match="temperature"):
        site_stats(hot, acts, list(acts), index, backend="tiles")
