import numpy as np
import pandas as pd
import pytest
import torch
from helpers import TEXTS, naive_table
from reference import entropy, hf_model, naive_logits, naive_sites

from internal_policy_lens import SITES, delta_table, entropy_table, summary_table
from internal_policy_lens.tables import TABLE_COLUMNS


@pytest.mark.parametrize("lens", ["raw", "norm"])
@pytest.mark.parametrize("dtype,tol", [("float64", 1e-5), ("float32", 2e-3)])
def test_every_site_matches_naive_float64(arch, models, tiny_dirs, lens, dtype, tol):
    model = models(arch, dtype)
    table = entropy_table(model, TEXTS, lens=lens, batch_size=2, chunk_tokens=7)
    naive = naive_table(tiny_dirs[arch], model.tokenizer, TEXTS, lens)
    assert list(table.columns) == list(TABLE_COLUMNS)
    got = {(r.sample_id, r.position, r.layer, r.site): r.entropy for r in table.itertuples()}
    assert got.keys() == naive.keys()
    err = np.array([abs(got[k] - naive[k]) for k in naive])
    assert err.max() < tol, f"max error {err.max():.2e} nats"
    # The test is only meaningful if the entropies spread well below log|V|.
    assert table["entropy"].std() > 0.3
    assert table["entropy"].min() < 0.5 * np.log(model.vocab_size)


def test_final_is_entropy_of_model_logits(arch, models, tiny_dirs):
    model = models(arch)
    reference = hf_model(tiny_dirs[arch], dtype=torch.float32)
    table = entropy_table(model, TEXTS[:1], sites=["final"])
    ids = torch.tensor([model.tokenizer(TEXTS[0])["input_ids"]])
    with torch.no_grad():
        expected = entropy(reference(ids).logits[0])
    assert (table["layer"] == model.n_layers - 1).all()
    np.testing.assert_allclose(table["entropy"], expected.numpy(), atol=1e-5)


def test_norm_lens_last_resid_post_equals_final(arch, models):
    model = models(arch)
    last = model.n_layers - 1
    table = entropy_table(model, TEXTS, lens="norm", sites=["resid_post", "final"], layers=[last])
    wide = table.pivot(index=["sample_id", "position"], columns="site", values="entropy")
    np.testing.assert_allclose(wide["resid_post"], wide["final"], atol=1e-5)
    raw = entropy_table(model, TEXTS, lens="raw", sites=["resid_post", "final"], layers=[last])
    raw_wide = raw.pivot(index=["sample_id", "position"], columns="site", values="entropy")
    assert np.abs(raw_wide["resid_post"] - raw_wide["final"]).max() > 1e-3  # raw has no norm


def test_padded_batch_equals_each_alone(arch, models):
    model = models(arch)
    together = entropy_table(model, TEXTS, batch_size=3, extras=True)
    alone = pd.concat(
        [entropy_table(model, [t], extras=True).assign(sample_id=i) for i, t in enumerate(TEXTS)],
        ignore_index=True,
    )
    pd.testing.assert_frame_equal(together, alone, check_exact=False, atol=1e-5, rtol=0)


def test_chunk_sizes_give_identical_results(models):
    model = models("qwen2")
    tables = [entropy_table(model, TEXTS, chunk_tokens=c, extras=True) for c in (1, 5, 10_000)]
    # Equal up to float32 rounding: BLAS sums a 1-row and a many-row product in different orders.
    for other in tables[1:]:
        pd.testing.assert_frame_equal(tables[0], other, check_exact=False, atol=1e-5, rtol=0)


@pytest.mark.parametrize("extras", [False, True])
def test_capture_budget_groups_layers_with_the_same_table(arch, models, monkeypatch, extras):
    model = models(arch)
    whole = entropy_table(model, TEXTS, batch_size=2, extras=extras)
    stops, forward = [], type(model).forward

    def spy(self, ids, mask, stop_at_layer=None, *, past=None):
        stops.append(stop_at_layer)
        return forward(self, ids, mask, stop_at_layer=stop_at_layer, past=past)

    monkeypatch.setattr(type(model), "forward", spy)
    grouped = entropy_table(model, TEXTS, batch_size=2, extras=extras, capture_mb=1e-6)
    # A budget below one vector: one group per layer, each forward stopped after its layer
    # (with extras every group needs the final policy, so every pass runs to the end).
    L = model.n_layers
    per_batch = [None] * L if extras else [*range(1, L), None]
    assert stops == per_batch * 2  # two batches
    pd.testing.assert_frame_equal(whole, grouped, check_exact=False, atol=1e-5, rtol=0)


@pytest.mark.parametrize("extras,capture_mb", [(False, 512), (True, 1e-6)])
def test_attention_budget_runs_position_blocks_with_the_same_table(
    arch, models, monkeypatch, extras, capture_mb
):
    from internal_policy_lens.lens.capture import position_block

    model = models(arch, "float64")
    whole = entropy_table(model, TEXTS, batch_size=3, extras=extras)
    length = int(whole.position.max()) + 1  # the longest text
    heads = model.config.num_attention_heads
    budget = 3 * heads * length * 4 * 4  # bytes: 4 positions per block
    assert position_block(3, heads, length, budget) == 4
    calls, forward = [], type(model).forward

    def spy(self, ids, mask, stop_at_layer=None, *, past=None):
        calls.append((ids.shape[1], mask.shape[1], past))
        return forward(self, ids, mask, stop_at_layer=stop_at_layer, past=past)

    monkeypatch.setattr(type(model), "forward", spy)
    blocked = entropy_table(
        model,
        TEXTS,
        batch_size=3,
        extras=extras,
        attention_mb=budget / 2**20,
        capture_mb=capture_mb,
    )
    # Blocks of 4 positions over the whole length, each attending to every earlier position
    # through one cache per pass (one pass per layer group).
    passes = 1 if capture_mb == 512 else model.n_layers
    assert [c[0] for c in calls] == ([4] * (length // 4) + [length % 4] * (length % 4 > 0)) * passes
    assert [c[1] for c in calls] == [
        min(4 * i, length) for i in range(1, -(-length // 4) + 1)
    ] * passes
    assert len({id(c[2]) for c in calls}) == passes and all(c[2] is not None for c in calls)
    # The bridge's attention softmax runs in float32 even for a float64 model, and the blocks'
    # softmaxes round differently: equal to ~1e-8 in entropy, ~1e-6 in log-probabilities.
    pd.testing.assert_frame_equal(whole, blocked, check_exact=False, atol=1e-5, rtol=0)


def test_logits_never_exceed_chunk_rows(models, monkeypatch):
    from internal_policy_lens.lens.unembed import Lens

    model = models("qwen3")
    seen = []
    original = Lens.logits

    def spy(self, x, site):
        out = original(self, x, site)
        seen.append(out.shape[0])
        return out

    monkeypatch.setattr(Lens, "logits", spy)
    entropy_table(model, TEXTS * 2, chunk_tokens=16, batch_size=6, extras=True)
    assert seen and max(seen) <= 16


def test_logits_buffer_follows_the_rows_of_a_small_run(models, monkeypatch):
    from internal_policy_lens.lens.unembed import Lens

    model = models("qwen3")
    seen = []
    original = Lens.reused_output

    def spy(self, rows):
        seen.append(rows)
        return original(self, rows)

    monkeypatch.setattr(Lens, "reused_output", spy)
    table = entropy_table(model, TEXTS[:2], batch_size=2, extras=True, chunk_tokens=100_000)
    tokens = len(table[(table.site == "resid_post") & (table.layer == 0)])
    sites = table.groupby(["site", "layer"]).ngroups
    assert tokens * sites < 100_000  # all logits fit one chunk: chunk_tokens does not bound them
    assert seen and max(seen) <= tokens


def test_bfloat16_within_tolerance_of_float32(arch, models):
    model32, model16 = models(arch), models(arch, "bfloat16")
    a = entropy_table(model32, TEXTS)
    b = entropy_table(model16, TEXTS)
    err = (a["entropy"] - b["entropy"]).abs()
    # Stated tolerance for bfloat16 weights and activations (reductions stay in float32).
    assert err.mean() < 0.05 and err.max() < 0.5, (err.mean(), err.max())


def test_extras_match_naive(arch, models, tiny_dirs):
    model = models(arch, "float64")
    reference = hf_model(tiny_dirs[arch])
    ids = model.tokenizer(TEXTS[0])["input_ids"]
    table = entropy_table(model, [ids], extras=True, lens="norm")
    acts, logits = naive_sites(reference, ids)
    final_logp = torch.log_softmax(logits, -1)
    for site, layer in [("mlp_out", 0), ("resid_post", 1), ("attn_in", 2), ("final", 2)]:
        z = naive_logits(reference, acts[site, layer], site, "norm")
        logp = torch.log_softmax(z, -1)
        rows = table[(table.site == site) & (table.layer == layer)].sort_values("position")
        nxt = torch.tensor(ids[1:])
        lp = logp[:-1].gather(-1, nxt[:, None])[:, 0]
        rank = 1 + (z[:-1] > z[:-1].gather(-1, nxt[:, None])).sum(-1)
        kl = (logp.exp() * (logp - final_logp)).sum(-1)
        np.testing.assert_allclose(rows["next_token_logprob"].iloc[:-1], lp, atol=1e-6)
        np.testing.assert_array_equal(rows["next_token_rank"].iloc[:-1], rank)
        assert np.isnan(rows["next_token_logprob"].iloc[-1])
        assert rows["next_token_rank"].iloc[-1] == -1
        np.testing.assert_allclose(rows["kl_to_final"], kl, atol=1e-6)
        agree = z.argmax(-1) == final_logp.argmax(-1)
        np.testing.assert_array_equal(rows["top1_agrees"], agree)
    final_rows = table[table.site == "final"]
    assert final_rows["top1_agrees"].all()
    np.testing.assert_allclose(final_rows["kl_to_final"], 0, atol=1e-10)


def test_delta_table_follows_definitions(models):
    model = models("llama")
    table = entropy_table(model, TEXTS)
    deltas = delta_table(table)
    assert list(deltas.columns) == ["sample_id", "position", "layer", "module", "delta"]
    h = {(r.sample_id, r.position, r.layer, r.site): r.entropy for r in table.itertuples()}
    pairs = {
        "layer": ("resid_pre", "resid_post"),
        "attn": ("attn_in", "attn_out"),
        "ffn": ("mlp_in", "mlp_out"),
    }
    assert len(deltas) == 3 * len(table[table.site == "resid_pre"])
    for r in deltas.itertuples():
        site_in, site_out = pairs[r.module]
        expected = (
            h[r.sample_id, r.position, r.layer, site_out]
            - h[r.sample_id, r.position, r.layer, site_in]
        )
        assert r.delta == pytest.approx(expected, abs=1e-6)


def test_summary_table(models):
    model = models("qwen2")
    table = entropy_table(model, TEXTS)
    summary = summary_table(table)
    assert list(summary.columns) == ["quantity", "layer", "name", "mean", "std", "count"]
    row = summary[
        (summary.quantity == "entropy") & (summary.layer == 1) & (summary.name == "mlp_out")
    ]
    values = table[(table.layer == 1) & (table.site == "mlp_out")]["entropy"]
    assert row["mean"].item() == pytest.approx(values.mean(), rel=1e-6)
    assert row["std"].item() == pytest.approx(values.std(), rel=1e-5)
    assert row["count"].item() == len(values)
    deltas = delta_table(table)
    ffn = summary[(summary.quantity == "delta") & (summary.name == "ffn") & (summary.layer == 0)]
    assert ffn["mean"].item() == pytest.approx(
        deltas[(deltas.module == "ffn") & (deltas.layer == 0)]["delta"].mean(), rel=1e-6
    )


def test_records_response_only(models):
    model = models("qwen2")
    records = [
        {
            "prompt": [{"role": "user", "content": "2+3?"}],
            "response": "5 \\boxed{5}",
            "sample_id": "a",
        },
        {"prompt": "7*6?", "response": "42", "sample_id": "b"},
    ]
    full = entropy_table(model, records, sites=["final"])
    resp = entropy_table(model, records, sites=["final"], response_only=True)
    tok = model.tokenizer
    for rec in records:
        prompt = (
            rec["prompt"]
            if isinstance(rec["prompt"], list)
            else [{"role": "user", "content": rec["prompt"]}]
        )
        text = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        n_prompt = len(tok(text, add_special_tokens=False)["input_ids"])
        n_resp = len(tok(rec["response"], add_special_tokens=False)["input_ids"])
        got = resp[resp.sample_id == rec["sample_id"]]["position"].tolist()
        assert got == list(range(n_prompt - 1, n_prompt + n_resp - 1))
        assert len(full[full.sample_id == rec["sample_id"]]) == n_prompt + n_resp
    with pytest.raises(ValueError, match="response_only"):
        entropy_table(model, ["plain text"], response_only=True)


def test_subsets_and_table_order(models):
    model = models("qwen3")
    table = entropy_table(model, TEXTS[:2], sites=["mlp_out", "final", "attn_in"], layers=[1, 0])
    assert list(table.site.cat.categories) == list(SITES)
    first = table[(table.sample_id == 0) & (table.position == 0)]
    assert list(zip(first.layer, first.site)) == [
        (0, "attn_in"),
        (0, "mlp_out"),
        (1, "attn_in"),
        (1, "mlp_out"),
        (2, "final"),
    ]
    with pytest.raises(ValueError, match="unknown site"):
        entropy_table(model, TEXTS, sites=["mlp"])
    with pytest.raises(ValueError, match="out of range"):
        entropy_table(model, TEXTS, layers=[3])


def test_token_column_is_the_decoded_token(models):
    model = models("qwen2")
    table = entropy_table(model, TEXTS[:2], sites=["final"])
    assert list(table.columns[:4]) == ["sample_id", "position", "token_id", "token"]
    expected = [model.tokenizer.decode([i]) for i in table["token_id"]]
    assert table["token"].astype(str).tolist() == expected
