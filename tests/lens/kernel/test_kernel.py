"""The Triton reduction kernel against float64 written out from the definitions."""

import numpy as np
import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (Linux x86-64 dev extra)")

from internal_policy_lens.lens.reduce.kernel import row_stats  # noqa: E402

ATOL = 2e-5  # float32 logits reduced in float32, against float64 (nats)


def _float64(z, bias, scale, cap, logq, next_ids):
    # softmax(head(z + b)) and the extras, every formula written out, in float64.
    z = z.double() + (0 if bias is None else bias.double())
    z = z / (scale or 1.0)
    z = z if cap is None else torch.tanh(z / cap) * cap
    logp = torch.log_softmax(z, -1)
    p = logp.exp()
    rows = torch.arange(len(z)) % len(next_ids)
    at = next_ids[rows].clamp(min=0)[:, None]
    has = next_ids[rows] >= 0
    target = z.gather(-1, at)
    return {
        "entropy": -(p * logp).sum(-1),
        "next_token_logprob": torch.where(has, logp.gather(-1, at)[:, 0], torch.nan),
        "next_token_rank": torch.where(has, (z > target).sum(-1) + 1, -1),
        "kl_internal_final": (p * (logp - logq[rows])).sum(-1),
        "top1_agrees": z.argmax(-1) == logq[rows].argmax(-1),
        "probs": p,
    }


@pytest.mark.parametrize(
    ("rows", "vocab", "block", "topk", "head"),
    [
        (1, 37, 8, 0, "none"),
        (4, 105, 16, 20, "bias+scale"),
        (6, 100, 32, 5, "softcap"),
        (3, 16, 16, 16, "none"),
    ],
)
def test_row_stats_match_float64(device, rows, vocab, block, topk, head):
    # Ragged row counts, vocabularies that are not a multiple of the tile, K wider than a tile
    # (20 > 16), K equal to the vocabulary, rows of 3 sites stacked over token rows.
    generator = torch.Generator().manual_seed(rows * vocab + topk)
    spread = torch.logspace(1.3, -1, rows)[:, None]  # peaked to flat policies
    z = spread * torch.randn(rows, vocab, generator=generator)
    bias = torch.randn(vocab, generator=generator) if head == "bias+scale" else None
    scale = 1.7 if head == "bias+scale" else None
    cap = 30.0 if head == "softcap" else None  # Gemma 2's; below 30 no two logits tie
    token_rows = max(1, rows // 3)
    next_ids = torch.randint(-1, vocab, (token_rows,), generator=generator)
    logq = torch.log_softmax(3 * torch.randn(token_rows, vocab, generator=generator), -1)
    want = _float64(z, bias, scale, cap, logq.double(), next_ids)
    on = {"device": device}
    got = row_stats(
        z.to(**on),
        bias=None if bias is None else bias.to(**on),
        scale=scale,
        cap=cap,
        topk=topk,
        next_ids=next_ids.to(**on),
        final_logp=logq.to(**on),
        final_top=logq.argmax(-1).to(**on),
        block=block,
    )
    got = {name: value.cpu() for name, value in got.items()}
    if head == "none":  # the cases span peaked and flat policies
        assert want["entropy"].min() < 1.0 and (rows == 1 or want["entropy"].max() > 2.0)
    for column in ("entropy", "next_token_logprob", "kl_internal_final"):
        np.testing.assert_allclose(got[column], want[column], atol=ATOL, rtol=1e-5)
    for column in ("next_token_rank", "top1_agrees"):
        np.testing.assert_array_equal(got[column], want[column])
    if topk:
        best, ids = want["probs"].topk(topk, -1)
        np.testing.assert_allclose(got["topk_prob"], best, atol=1e-6, rtol=1e-5)
        np.testing.assert_array_equal(got["topk_id"], ids)
    else:
        assert "topk_id" not in got


def test_row_stats_without_extras_and_of_no_rows(device):
    z = torch.randn(4, 50, device=device)
    out = row_stats(z, block=16)
    assert set(out) == {"entropy"}
    logp = torch.log_softmax(z.double(), -1)
    want = -(logp.exp() * logp).sum(-1)
    np.testing.assert_allclose(out["entropy"].cpu(), want.cpu(), atol=ATOL, rtol=0)
    empty = row_stats(z[:0], topk=3)
    assert empty["entropy"].shape == (0,) and empty["topk_id"].shape == (0, 3)


def test_uniform_rows_have_entropy_log_vocab_and_ties_keep_k_distinct_ids(device):
    z = torch.zeros(2, 300, device=device)  # every logit tied, over several tiles
    out = row_stats(z, topk=7, block=64)
    np.testing.assert_allclose(out["entropy"].cpu(), np.log(300), atol=1e-6, rtol=0)
    np.testing.assert_allclose(out["topk_prob"].cpu(), 1 / 300, rtol=1e-6)
    for ids in out["topk_id"].cpu():
        assert len(set(ids.tolist())) == 7 and ids.max() < 300


@pytest.mark.parametrize(("rows", "vocab", "block"), [(1, 37, 8), (5, 105, 16), (3, 300, 64)])
def test_row_stats_varentropy_matches_float64(device, rows, vocab, block):
    # Var_p[-log p] = sum p (log p)^2 - H^2 in float64; the kernel's running merge over tiles of
    # `block` columns, peaked to flat rows, and a row whose max is in its last tile.
    generator = torch.Generator().manual_seed(rows + vocab)
    spread = torch.logspace(1.3, -1, rows)[:, None]
    z = spread * torch.randn(rows, vocab, generator=generator)
    z[0, -1] = z[0].max() + 4.0
    logp = torch.log_softmax(z.double(), -1)
    p = logp.exp()
    entropy = -(p * logp).sum(-1)
    want = (p * logp.square()).sum(-1) - entropy.square()
    got = row_stats(z.to(device), block=block, wanted=("entropy", "varentropy"))
    np.testing.assert_allclose(got["varentropy"].cpu(), want, atol=ATOL, rtol=1e-5)
    np.testing.assert_allclose(got["entropy"].cpu(), entropy, atol=ATOL, rtol=0)
    assert set(got) == {"entropy", "varentropy"}
    assert "varentropy" not in row_stats(z.to(device), block=block)  # only when asked for
