import numpy as np
import pandas as pd
import pytest
import torch
from helpers import TEXTS, eager_attention, naive_table
from reference import entropy, hf_model, naive_logits, naive_sites

from internal_policy_lens import SITES, delta_table, entropy_table, summary_table
from internal_policy_lens.tables import TABLE_COLUMNS, TOPK_COLUMNS


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
def test_capture_budget_keeps_one_forward_pass_with_the_same_table(
    arch, models, monkeypatch, extras
):
    model = models(arch)
    whole = entropy_table(model, TEXTS, batch_size=2, extras=extras)
    stops, forward = [], type(model).forward

    def spy(self, ids, mask, stop_at_layer=None, *, past=None):
        stops.append(stop_at_layer)
        return forward(self, ids, mask, stop_at_layer=stop_at_layer, past=past)

    monkeypatch.setattr(type(model), "forward", spy)
    grouped = entropy_table(model, TEXTS, batch_size=2, extras=extras, capture_mb=1e-6)
    # A budget below one vector: each site's rows are reduced as soon as its layer computes
    # them, in the one pass of a batch (two with extras: the final policy's inputs first, then
    # every layer without the final norm again).
    per_batch = [None, model.n_layers] if extras else [None]
    assert stops == per_batch * 2  # two batches
    pd.testing.assert_frame_equal(whole, grouped, check_exact=False, atol=1e-5, rtol=0)


def test_sdpa_runs_no_position_blocks(models, monkeypatch):
    model = models("qwen2")
    assert model.attention == "sdpa"
    calls, forward = [], type(model).forward

    def spy(self, ids, mask, stop_at_layer=None, *, past=None):
        calls.append(past)
        return forward(self, ids, mask, stop_at_layer=stop_at_layer, past=past)

    monkeypatch.setattr(type(model), "forward", spy)
    entropy_table(model, TEXTS, batch_size=3, attention_mb=1e-6)
    assert calls == [None]  # one pass, no cache: the whole length at once


def test_one_pass_stops_after_the_last_layer_analysed(models, monkeypatch):
    model = models("qwen2")
    stops, forward = [], type(model).forward

    def spy(self, ids, mask, stop_at_layer=None, *, past=None):
        stops.append(stop_at_layer)
        return forward(self, ids, mask, stop_at_layer=stop_at_layer, past=past)

    monkeypatch.setattr(type(model), "forward", spy)
    table = entropy_table(model, TEXTS, sites="attn_out,mlp_out", layers=[0, 1], capture_mb=1e-6)
    assert stops == [2] and set(table.layer) == {0, 1}


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
    with eager_attention(model):  # blocks bound eager attention's scores; sdpa forms none
        blocked = entropy_table(
            model,
            TEXTS,
            batch_size=3,
            extras=extras,
            attention_mb=budget / 2**20,
            capture_mb=capture_mb,
        )
    # Blocks of 4 positions over the whole length, each attending to every earlier position
    # through one cache per pass (with extras the final policy's inputs come first, in a pass of
    # their own).
    passes = 2 if extras else 1
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
    opt_in = ["varentropy", "nucleus_size", "kl_final_internal"]
    table = entropy_table(model, [ids], extras=True, lens="norm", stats=opt_in, nucleus_p=0.8)
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
        # The float64 reference runs eager attention, whose softmax is float32 even for a
        # float64 model; the package's sdpa keeps float64: about 1.2e-6 apart.
        np.testing.assert_allclose(rows["next_token_logprob"].iloc[:-1], lp, atol=5e-6)
        np.testing.assert_array_equal(rows["next_token_rank"].iloc[:-1], rank)
        assert np.isnan(rows["next_token_logprob"].iloc[-1])
        assert rows["next_token_rank"].iloc[-1] == -1
        np.testing.assert_allclose(rows["kl_internal_final"], kl, atol=5e-6)
        agree = z.argmax(-1) == final_logp.argmax(-1)
        np.testing.assert_array_equal(rows["top1_agrees"], agree)
        # The opt-in statistics, from their definitions.
        p, h = logp.exp(), -(logp.exp() * logp).sum(-1)
        back = (final_logp.exp() * (final_logp - logp)).sum(-1)
        np.testing.assert_allclose(rows["kl_final_internal"], back, atol=5e-6)
        var = (p * logp.square()).sum(-1) - h.square()
        np.testing.assert_allclose(rows["varentropy"], var, atol=5e-6, rtol=1e-5)
        nucleus = (p.sort(-1, descending=True).values.cumsum(-1) < 0.8).sum(-1) + 1
        np.testing.assert_array_equal(rows["nucleus_size"], nucleus)
    final_rows = table[table.site == "final"]
    assert final_rows["top1_agrees"].all()
    np.testing.assert_allclose(final_rows["kl_internal_final"], 0, atol=1e-10)


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


def _naive_topk(folder, tokenizer, texts, lens, k):
    """{(sample, position, layer, site): (probs [k+1], ids [k+1])} in float64, sorted."""
    model = hf_model(folder)
    out = {}
    for sample, text in enumerate(texts):
        acts, _ = naive_sites(model, tokenizer(text)["input_ids"])
        for (site, layer), x in acts.items():
            probs = torch.softmax(naive_logits(model, x, site, lens), -1)
            top, ids = probs.sort(-1, descending=True)
            for pos in range(len(x)):
                out[sample, pos, layer, site] = (top[pos, : k + 1], ids[pos, : k + 1])
    return out


@pytest.mark.parametrize("lens", ["raw", "norm"])
def test_topk_matches_naive_float64(arch, models, tiny_dirs, lens):
    k = 4
    model = models(arch, "float64")
    tokens, topk = entropy_table(model, TEXTS, lens=lens, topk=k, batch_size=2, chunk_tokens=7)
    assert list(topk.columns) == list(TOPK_COLUMNS)
    assert len(topk) == k * len(tokens)
    naive = _naive_topk(tiny_dirs[arch], model.tokenizer, TEXTS, lens, k)
    groups = topk.groupby(["sample_id", "position", "layer", "site"], observed=True)
    assert len(groups) == len(naive)
    checked_ids = 0
    for key, rows in groups:
        want_p, want_id = naive[key]
        assert rows["rank"].tolist() == list(range(1, k + 1))
        np.testing.assert_allclose(rows["prob"], want_p[:k], atol=1e-5, err_msg=str(key))
        assert (np.diff(rows["prob"].to_numpy()) <= 0).all(), key  # most probable first
        gaps = torch.diff(want_p).abs()  # [k]: rank r to r+1
        for r in range(k):  # where the order is not a near-tie, the same token
            before = gaps[r - 1] if r else torch.tensor(1.0)
            if min(before, gaps[r]) > 1e-6:
                assert rows["token_id"].iloc[r] == want_id[r], (key, r)
                checked_ids += 1
    assert checked_ids > 0.9 * len(topk)
    # The same pass, the same entropy table: bit for bit.
    plain = entropy_table(model, TEXTS, lens=lens, batch_size=2, chunk_tokens=7)
    pd.testing.assert_frame_equal(plain, tokens, check_exact=True)


def test_topk_rank1_of_final_is_the_models_argmax(arch, models, tiny_dirs):
    model = models(arch)
    reference = hf_model(tiny_dirs[arch], dtype=torch.float32)
    _, topk = entropy_table(model, TEXTS[:1], sites=["final", "mlp_out"], topk=3)
    ids = torch.tensor([model.tokenizer(TEXTS[0])["input_ids"]])
    with torch.no_grad():
        argmax = reference(ids).logits[0].argmax(-1)
    first = topk[(topk.site == "final") & (topk["rank"] == 1)].sort_values("position")
    np.testing.assert_array_equal(first["token_id"], argmax.numpy())
    assert set(topk["site"].astype(str)) == {"final", "mlp_out"}
    # K above the vocabulary: every token, once.
    _, everything = entropy_table(model, TEXTS[1:2], sites=["final"], topk=10**6)
    assert everything["rank"].max() == model.vocab_size
    np.testing.assert_allclose(everything.groupby("position")["prob"].sum(), 1.0, atol=1e-5)


def _naive_cosines(reference, ids, parallel=False):
    """cos(attn_out, resid_pre) and cos(mlp_out, resid_mid) per layer, float64, by hand."""
    acts, _ = naive_sites(reference, ids)
    out = {}
    for layer in range(len({key[1] for key in acts if key[0] == "resid_pre"})):
        pre = acts["resid_pre", layer].double()
        mid = pre if parallel else acts["resid_mid", layer].double()
        for name, write, stream in (
            ("cos_attn", acts["attn_out", layer].double(), pre),
            ("cos_ffn", acts["mlp_out", layer].double(), mid),
        ):
            dot = (write * stream).sum(-1)
            out[name, layer] = (dot / write.norm(dim=-1) / stream.norm(dim=-1)).numpy()
    return out


def _check_cosines(table, naive, ids, tol=1e-6):
    rows = table[table.site != "final"]
    assert table.loc[table.site == "final", ["cos_attn", "cos_ffn"]].isna().all().all()
    for (name, layer), expected in naive.items():
        per_site = rows[rows.layer == layer].pivot(index="position", columns="site", values=name)
        assert per_site.shape == (len(ids), rows.site.nunique())
        for site in per_site.columns:  # every site's row of the layer carries the same value
            np.testing.assert_allclose(per_site[site], expected, atol=tol, rtol=0)


@pytest.mark.parametrize("capture_mb", [512, 1e-6])
def test_residual_cosines_match_naive_float64(arch, models, tiny_dirs, capture_mb):
    # capture_mb=1e-6: one layer per group, so resid_pre[l] and resid_post[l-1] are apart.
    model = models(arch, "float64")
    reference = hf_model(tiny_dirs[arch])
    ids = model.tokenizer(TEXTS[1])["input_ids"]
    table = entropy_table(model, [ids], extras=True, capture_mb=capture_mb)
    naive = _naive_cosines(reference, ids)
    _check_cosines(table, naive, ids)
    values = table[["cos_attn", "cos_ffn"]].dropna().to_numpy()
    assert values.std() > 0.05 and (np.abs(values) <= 1 + 1e-9).all()  # not a constant


def test_residual_cosines_of_a_parallel_block_read_resid_pre(family_models, family_dirs):
    model = family_models("gpt_neox", "float64")
    assert model.parallel
    reference = hf_model(family_dirs("gpt_neox"))
    ids = model.tokenizer(TEXTS[0])["input_ids"]
    table = entropy_table(model, [ids], extras=True, sites=["attn_out", "mlp_out", "final"])
    _check_cosines(table, _naive_cosines(reference, ids, parallel=True), ids)


def test_residual_cosines_only_some_layers(models):
    model = models("qwen2")
    whole = entropy_table(model, TEXTS[:2], extras=True)
    part = entropy_table(model, TEXTS[:2], extras=True, sites=["mlp_out"], layers=[1])
    expected = whole[(whole.site == "mlp_out") & (whole.layer == 1)].reset_index(drop=True)
    cosines = ["cos_attn", "cos_ffn"]  # float64 from the vectors: the same to 1e-6
    pd.testing.assert_frame_equal(part[cosines], expected[cosines], atol=1e-6, rtol=0)
    # exact reduces in float32: other rows per product round the other columns differently
    pd.testing.assert_frame_equal(part, expected, check_exact=False, atol=1e-5, rtol=0)


def test_summary_has_cosine_rows_once_per_token_and_layer(models):
    model = models("llama")
    table = entropy_table(model, TEXTS, extras=True)
    summary = summary_table(table)
    cos = summary[summary.quantity == "cosine"]
    assert sorted(set(cos.name)) == ["attn", "ffn"]
    assert sorted(cos.layer.unique()) == list(range(model.n_layers))
    one_site = table[table.site == "resid_post"]
    for row in cos.itertuples():
        values = one_site.loc[one_site.layer == row.layer, f"cos_{row.name}"]
        assert row.count == len(values) == len(one_site) / model.n_layers
        assert row.mean == pytest.approx(values.mean(), abs=1e-12)
        assert row.std == pytest.approx(values.std(), abs=1e-12)
    assert "cosine" not in set(summary_table(entropy_table(model, TEXTS)).quantity)
