"""Every further family against plain transformers: sites, identities, lenses, generation.

Each family is a tiny random model from its real config class with its distinctive features
switched on (sliding windows, experts, post-norms, soft-capping, multipliers, parallel blocks).
The reference is a plain transformers model with torch hooks (tests/reference.py).
"""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import FAMILY_ARCHS, TEXTS, eager_attention, naive_table
from reference import entropy, head, hf_model, naive_sites
from typer.testing import CliRunner

from internal_policy_lens import SITES, capture, entropy_table
from internal_policy_lens.cli import app
from internal_policy_lens.model.generate import generate


@pytest.fixture(params=FAMILY_ARCHS)
def family(request):
    return request.param


def _right_padded(model, texts):
    seqs = [model.tokenizer(t)["input_ids"] for t in texts]
    ids = torch.zeros((len(seqs), max(map(len, seqs))), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return seqs, ids, mask


@pytest.mark.parametrize("dtype,tol", [("float64", 1e-5), ("float32", 1e-4)])
def test_sites_equal_transformers_and_add_up(family, family_models, family_dirs, dtype, tol):
    model = family_models(family, dtype)
    reference = hf_model(family_dirs(family), dtype=getattr(torch, dtype))
    seqs, ids, mask = _right_padded(model, TEXTS)
    with torch.no_grad(), capture(model) as acts:
        model.forward(ids, mask)
    L = model.n_layers
    parallel = family == "gpt_neox"
    assert model.parallel == parallel
    present = [s for s in SITES if s != "final" and not (parallel and s == "resid_mid")]
    assert set(acts) == {(s, i) for s in present for i in range(L)} | {("final", L - 1)}

    def close(a, b):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)

    for row, seq in enumerate(seqs):
        n = len(seq)
        ours = {k: v[row, :n] for k, v in acts.items()}
        expected, logits = naive_sites(reference, seq)
        with torch.no_grad():
            hidden = reference(torch.tensor([seq]), output_hidden_states=True).hidden_states
        # Every site, attn_in / mlp_in included, is what the plain model's modules see.
        assert ours.keys() == expected.keys()
        for key, value in expected.items():
            close(ours[key], value)
        for layer in range(L):
            a = {s: ours[s, layer] for s in present}
            close(a["resid_pre"], hidden[layer][0])
            close(a["resid_post"], a["resid_pre"] + a["attn_out"] + a["mlp_out"])
            if not parallel:
                close(a["resid_mid"], a["resid_pre"] + a["attn_out"])
            if layer + 1 < L:
                close(ours["resid_pre", layer + 1], a["resid_post"])
        # final through the unembedding and the model's own head gives the model's logits.
        with torch.no_grad():
            final = head(reference, model.unembed(ours["final", L - 1]))
        close(final, logits)


@pytest.mark.parametrize("lens", ["raw", "norm"])
def test_every_site_entropy_matches_naive_float64(family, family_models, family_dirs, lens):
    model = family_models(family, "float64")
    table = entropy_table(model, TEXTS, lens=lens, batch_size=2, chunk_tokens=7)
    naive = naive_table(family_dirs(family), model.tokenizer, TEXTS, lens)
    got = {(r.sample_id, r.position, r.layer, r.site): r.entropy for r in table.itertuples()}
    assert got.keys() == naive.keys()
    err = np.array([abs(got[k] - naive[k]) for k in naive])
    assert err.max() < 1e-5, f"max error {err.max():.2e} nats"
    assert table["entropy"].std() > 0.1  # the policies are not all uniform


def test_norm_lens_last_resid_post_equals_final(family, family_models, family_dirs):
    model = family_models(family)
    last = model.n_layers - 1
    table = entropy_table(model, TEXTS, lens="norm", sites=["resid_post", "final"], layers=[last])
    wide = table.pivot(index=["sample_id", "position"], columns="site", values="entropy")
    np.testing.assert_allclose(wide["resid_post"], wide["final"], atol=1e-5)
    # final is the entropy of the plain model's own logits (soft-capped / scaled where it is).
    reference = hf_model(family_dirs(family), dtype=torch.float32)
    ids = torch.tensor([model.tokenizer(TEXTS[0])["input_ids"]])
    with torch.no_grad():
        expected = entropy(reference(ids).logits[0])
    got = wide.loc[0, "final"].to_numpy()
    np.testing.assert_allclose(got, expected.numpy(), atol=1e-5)


def _greedy_no_cache(model, prompt, steps):
    ids = torch.tensor([prompt])
    out = []
    for _ in range(steps):
        with torch.no_grad():
            logits = model.hf_model(ids, use_cache=False).logits[0, -1]
        out.append(int(logits.argmax()))
        if out[-1] == model.tokenizer.eos_token_id:
            break
        ids = torch.cat([ids, torch.tensor([[out[-1]]])], dim=1)
    return out


def test_cached_greedy_generation_equals_uncached_loop(family, family_models):
    model = family_models(family)
    prompts = [model.tokenizer(t)["input_ids"] for t in TEXTS]
    batched = generate(model, prompts, max_new_tokens=10, temperature=0)
    for prompt, got in zip(prompts, batched, strict=True):
        assert got == _greedy_no_cache(model, prompt, 10)


def test_models_command_lists_every_family():
    from internal_policy_lens.model.families import FAMILIES

    result = CliRunner().invoke(app, ["models"])
    assert result.exit_code == 0, result.output
    for family in FAMILIES:
        assert f"{family.name}\t{family.hf_class}" in result.output


def test_entropy_run_and_compare_across_parallel_and_post_norm_families(family_dirs, tmp_path):
    data = tmp_path / "data.jsonl"
    rows = [{"question": f"What is {i}+{i}?", "response": f"{2 * i}. Done."} for i in range(3)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    runs = {}
    for name in ("gpt_neox", "gemma2"):
        runs[name] = tmp_path / name
        args = ["entropy", "--model", family_dirs(name), "--data", data, "--out", runs[name]]
        result = CliRunner().invoke(app, [*map(str, args), "--quiet"])
        assert result.exit_code == 0, result.output
    info = json.loads((runs["gpt_neox"] / "run.json").read_text())["model"]
    assert info["parallel_block"] and info["absent_sites"] == ["resid_mid"]
    assert info["family"] == "GPT-NeoX / Pythia"
    tokens = pd.read_parquet(runs["gpt_neox"] / "tokens.parquet")
    assert "resid_mid" not in set(tokens["site"].astype(str))
    deltas = pd.read_parquet(runs["gpt_neox"] / "deltas.parquet")
    assert set(deltas["module"].astype(str)) == {"layer", "attn", "ffn"}
    assert deltas["delta"].notna().all()
    gemma = json.loads((runs["gemma2"] / "run.json").read_text())["model"]
    assert not gemma["parallel_block"] and gemma["absent_sites"] == []
    assert any((runs["gpt_neox"] / "figures").glob("*.png"))
    out = tmp_path / "cmp"
    result = CliRunner().invoke(
        app, ["compare", str(runs["gpt_neox"]), str(runs["gemma2"]), "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert pd.read_csv(out / "convergence.csv")["model"].tolist() == ["gpt_neox", "gemma2"]


@pytest.mark.parametrize("capture_mb", [512, 1e-6])
def test_position_blocks_and_capture_budget_give_the_same_table(family, family_models, capture_mb):
    """Under eager attention, blocks of 4 positions through the key/value cache (a window of 4
    included), with the rows reduced in one group or one site at a time, give the table of one
    whole pass (and of sdpa, which runs no blocks)."""
    model = family_models(family, "float64")
    whole = entropy_table(model, TEXTS, batch_size=3, extras=True)
    length = int(whole.position.max()) + 1
    budget = 3 * model.config.num_attention_heads * length * 4 * 4  # 4 positions per block
    with eager_attention(model):  # blocks bound eager attention's scores; sdpa forms none
        blocked = entropy_table(
            model,
            TEXTS,
            batch_size=3,
            extras=True,
            attention_mb=budget / 2**20,
            capture_mb=capture_mb,
        )
    pd.testing.assert_frame_equal(whole, blocked, check_exact=False, atol=1e-5, rtol=0)


def test_cached_generation_scores_equal_plain_transformers(family, family_models, family_dirs):
    """Step logits too: a random model often repeats one token, which hides a broken cache."""
    model = family_models(family)
    reference = hf_model(family_dirs(family), dtype=torch.float32)
    prompt = torch.tensor([model.tokenizer("Compute 17*3+4 step by step.")["input_ids"]])
    ids, expected = prompt, []
    for _ in range(12):
        with torch.no_grad():
            expected.append(reference(ids, use_cache=False).logits[:, -1])
        ids = torch.cat([ids, expected[-1].argmax(-1, keepdim=True)], dim=1)
    with torch.no_grad():
        got = model.hf_model.generate(
            prompt,
            max_new_tokens=12,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
            use_cache=True,
            output_scores=True,
            return_dict_in_generate=True,
        )
    assert got.sequences.tolist() == ids.tolist()
    torch.testing.assert_close(
        torch.stack(got.scores, 1), torch.stack(expected, 1), atol=1e-4, rtol=1e-4
    )


def test_save_model_round_trip(family, family_models, tmp_path):
    """What the trainer's checkpoints are: a plain transformers folder giving the same logits."""
    from internal_policy_lens import load_model
    from internal_policy_lens.model.load import save_model

    model = family_models(family)
    folder = save_model(model, tmp_path / "saved")
    again = load_model(folder, device="cpu")
    plain = hf_model(folder, dtype=torch.float32)
    ids = torch.tensor([model.tokenizer("12+7=19, then 19*2=38")["input_ids"]])
    with torch.no_grad():
        expected = model.bridge(ids)
        torch.testing.assert_close(again.bridge(ids), expected, atol=0, rtol=0)
        torch.testing.assert_close(plain(ids).logits, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["granite", "olmo2"])
def test_module_hooks_removed_even_when_body_raises(name, family_models):
    """Sites read from the HF modules (not bridge hook points) come and go like the others."""
    model = family_models(name)

    def counts():
        return {
            key: (len(m._forward_hooks), len(m._forward_pre_hooks))
            for key, m in model.bridge.named_modules()
        }

    ids = torch.tensor([model.tokenizer(TEXTS[0])["input_ids"]])
    with torch.no_grad():  # the bridge sets up hooks of its own on the first forward
        model.forward(ids, torch.ones_like(ids))
    before = counts()
    with pytest.raises(RuntimeError, match="boom"):
        with capture(model) as acts:
            assert counts() != before
            model.forward(ids, torch.ones_like(ids))
            assert len(acts) == 7 * model.n_layers + 1
            raise RuntimeError("boom")
    assert counts() == before


@pytest.mark.parametrize("name", ["gemma2", "granite", "qwen3_moe"])
def test_fast_precision_and_bfloat16_within_tolerance(name, family_models):
    """The head transformation also runs on the reused bfloat16 logits buffer of ``fast``."""
    model32 = family_models(name)
    exact = entropy_table(model32, TEXTS, lens="norm")
    fast = entropy_table(model32, TEXTS, lens="norm", precision="fast")
    half = entropy_table(family_models(name, "bfloat16"), TEXTS, lens="norm")
    for other in (fast, half):
        err = (exact["entropy"] - other["entropy"]).abs()
        assert err.mean() < 0.05, err.mean()
        # A bfloat16 router picks other experts for a few tokens (seen: 0.70 nats on one
        # mlp_out row of the tiny Qwen3-MoE), so the worst row is bounded for dense models only.
        if other is fast or "moe" not in name:
            assert err.max() < 0.5, err.max()
