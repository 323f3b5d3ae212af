"""The ``triton`` backend of site_stats on every test family, against float64 and the dispatcher."""

import numpy as np
import pytest
import torch
from helpers import ARCHS, FAMILY_ARCHS
from reference import hf_model, naive_logits

pytest.importorskip("triton", reason="triton is not installed (Linux x86-64 dev extra)")

from internal_policy_lens.lens.reduce import (  # noqa: E402
    KERNEL_MAX_TOPK,  # noqa: E402
    choose_backend,
    dispatch,
    gpu,
    kernel,
    site_stats,
)
from internal_policy_lens.lens.unembed import Lens, Precision  # noqa: E402
from internal_policy_lens.statistics import Request  # noqa: E402

EXACT_ATOL = 3e-5  # float32 products and reductions against float64 (nats)
FAST_MAX = 0.15  # bf16 products (the tiny models' stated tolerance, tests/lens/test_reduce.py)
_HF = {}


def _acts(model, seed, batch=1, pos=3):
    # One site whose rows range from flat to peaked policies, and the final site. Few rows:
    # the interpreter runs each row's program in Python (about 0.2 s a row).
    generator = torch.Generator().manual_seed(seed)
    scale = torch.logspace(-0.5, 1, pos)[None, :, None]  # [1, pos, 1]
    acts = {
        ("resid_post", model.n_layers - 2): scale
        * torch.randn(batch, pos, model.d_model, generator=generator),
        ("final", model.n_layers - 1): 3
        * torch.randn(batch, pos, model.d_model, generator=generator),
    }
    rows = torch.ones(batch, pos, dtype=torch.bool).nonzero(as_tuple=True)
    next_ids = torch.randint(-1, model.vocab_size, (batch * pos,), generator=generator)
    return acts, rows, next_ids


def _bf16_products():
    # bf16 products, as a GPU runs them (and, widened first, the CPU under the interpreter).
    return Precision("fast", torch.bfloat16, torch.float32, "bf16 products, as on a GPU")


@torch.no_grad()
def _float64(folder, acts, rows, next_ids, lens, topk):
    # Every column from its definition, on the float64 transformers model (no package code).
    hf = _HF.setdefault(folder, hf_model(folder))
    final = next(key for key in acts if key[0] == "final")
    logq = torch.log_softmax(naive_logits(hf, acts[final][rows], "final", lens), -1)
    at = next_ids.clamp(min=0)[:, None]
    out = {}
    for key, x in acts.items():
        z = naive_logits(hf, x[rows], key[0], lens)  # [n, vocab]
        logp = torch.log_softmax(z, -1)
        p = logp.exp()
        out[key] = {
            "entropy": -(p * logp).sum(-1),
            "varentropy": (p * logp.square()).sum(-1) - (p * logp).sum(-1).square(),
            "next_token_logprob": torch.where(next_ids >= 0, logp.gather(-1, at)[:, 0], torch.nan),
            "next_token_rank": torch.where(next_ids >= 0, (z > z.gather(-1, at)).sum(-1) + 1, -1),
            "kl_internal_final": (p * (logp - logq)).sum(-1),
            "top1_agrees": z.argmax(-1) == logq.argmax(-1),
            "topk_prob": p.topk(topk, -1).values,
            "probs": p,
        }
    return out


@pytest.mark.parametrize("lens", ["raw", "norm"])
@pytest.mark.parametrize("name", [*ARCHS, *FAMILY_ARCHS])
def test_triton_backend_matches_float64_on_every_family(device, model_on, name, lens):
    # Gemma's soft-capping and Granite's scaling in the kernel; 3 token rows in chunks of 2
    # (ragged: chunk_tokens 4 holds 2 rows of a site and of the final policy), the extras
    # against the final policy, the varentropy, a top-3.
    model, folder = model_on(name, device)
    acts, rows, next_ids = _acts(model, seed=len(name))
    unembedding = Lens(model, lens, "exact")
    got = site_stats(
        unembedding, acts, list(acts), rows, Request.of(True, ["varentropy"], topk=3),
        next_ids=next_ids, chunk_tokens=4,
        backend="triton",
    )  # fmt: skip
    want = _float64(folder, acts, rows, next_ids, lens, 3)
    for key, columns in want.items():
        for column in (
            "entropy", "varentropy", "next_token_logprob", "kl_internal_final", "topk_prob"
        ):
            np.testing.assert_allclose(
                got[key][column], columns[column], atol=EXACT_ATOL, rtol=1e-5, err_msg=str(key)
            )
        for column in ("next_token_rank", "top1_agrees"):
            np.testing.assert_array_equal(got[key][column], columns[column], str(key))
        # Ids up to ties (soft-capped logits tie in float32): each id has its rank's probability.
        probs = columns["probs"].gather(-1, torch.as_tensor(got[key]["topk_id"]))
        np.testing.assert_allclose(probs, columns["topk_prob"], atol=EXACT_ATOL, rtol=1e-5)


@pytest.mark.parametrize("topk", [0, 20])
def test_triton_backend_narrow_tiles_and_bf16_products(device, model_on, monkeypatch, topk):
    # Tiles of 16 columns (the vocabulary, 105, is not a multiple), K = 20 wider than a tile,
    # bf16 products with float32 results: within float32 rounding of the float64 policy of the
    # bf16-rounded operands (soft-capped, Gemma 2), and within the bf16 tolerance of float64.
    monkeypatch.setattr(kernel, "BLOCK", 16)
    model, folder = model_on("gemma2", device)
    acts, rows, next_ids = _acts(model, seed=3)
    unembedding = Lens(model, "raw", _bf16_products())
    got = site_stats(
        unembedding, acts, list(acts), rows, Request.of(True, topk=topk), next_ids=next_ids,
        chunk_tokens=7,
        backend="triton",
    )  # fmt: skip
    want = _float64(folder, acts, rows, next_ids, "raw", max(topk, 1))
    weight = model.unembed.weight.detach().cpu().to(torch.bfloat16).double()
    cap = model.config.final_logit_softcapping
    for key, x in acts.items():
        z = x[rows].to(torch.bfloat16).double() @ weight.T
        logp = torch.log_softmax(torch.tanh(z / cap) * cap, -1)
        rounded = -(logp.exp() * logp).sum(-1)
        np.testing.assert_allclose(got[key]["entropy"], rounded, atol=EXACT_ATOL, rtol=0)
        if topk:
            best = logp.exp().topk(topk, -1).values
            np.testing.assert_allclose(got[key]["topk_prob"], best, atol=EXACT_ATOL, rtol=1e-5)
        err = np.abs(got[key]["entropy"] - want[key]["entropy"].numpy())
        assert err.max() < FAST_MAX, (key, err.max())
    assert ("topk_id" in got[key]) == bool(topk)


def test_float32_results_of_half_products(device):
    # CUDA (torch >= 2.8) writes float32 results of bf16 operands; the CPU widens them first.
    x = torch.randn(5, 8, dtype=torch.bfloat16, device=device)
    w = torch.randn(11, 8, dtype=torch.bfloat16, device=device)
    buffer = torch.empty(100, device=device)
    got = gpu.float_product(x, w, buffer)
    assert got.dtype == torch.float32 and got.data_ptr() == buffer.data_ptr()
    torch.testing.assert_close(got, x.float() @ w.float().T, rtol=1e-5, atol=1e-5)
    assert gpu.float_results(device, torch.bfloat16) == (device == "cuda")


def test_dispatcher_chooses_from_device_statistics_and_topk(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    extras = Request.of(extras=True, topk=20)
    assert choose_backend(cpu, Request(topk=5)) == "tiles"
    assert choose_backend(cpu, Request(topk=6)) == "rows"
    assert choose_backend(cpu, Request.of(extras=True)) == "rows"
    monkeypatch.setattr(dispatch, "triton_support", lambda device: (True, "CUDA with Triton"))
    assert choose_backend(cuda, extras) == "triton"
    assert choose_backend(cuda, Request(topk=KERNEL_MAX_TOPK + 1)) == "rows"
    assert choose_backend(cuda, Request(), dtype=torch.float64) == "tiles"
    # Without Triton (macOS, a CPU-only install): the CPU backends, on any device.
    monkeypatch.setattr(dispatch, "triton_support", lambda device: (False, "not installed"))
    assert choose_backend(cuda, extras) == "rows"
    with pytest.raises(ValueError, match="cannot run here: not installed"):
        choose_backend(cuda, Request(), backend="triton")
    with pytest.raises(ValueError, match="unknown reduction backend 'gpu'"):
        choose_backend(cpu, Request(), backend="gpu")
    with pytest.raises(ValueError, match="tiles backend does not compute next_token_logprob"):
        choose_backend(cpu, Request.of(extras=True), backend="tiles")
