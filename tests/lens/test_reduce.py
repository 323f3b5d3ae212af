import json
import logging
import secrets

import numpy as np
import pytest
import torch
from helpers import TEXTS
from reference import entropy

from internal_policy_lens import entropy_table
from internal_policy_lens.commands.entropy import run_entropy
from internal_policy_lens.config import EntropyConfig
from internal_policy_lens.lens import unembed
from internal_policy_lens.lens.capture import capture
from internal_policy_lens.lens.reduce import chunk_plan, site_stats, tiles
from internal_policy_lens.lens.reduce import compiled as compiling
from internal_policy_lens.lens.reduce import rows as whole_rows
from internal_policy_lens.lens.unembed import Lens, Precision, choose_precision, resolve_precision
from internal_policy_lens.model import hardware
from internal_policy_lens.statistics import Request

EXTRAS = Request.of(extras=True)

# Stated tolerances against float64 (nats), for the tiny models' vectors and vocabularies:
# exact = float32 products and reductions; fast = bf16 products (where the CPU has them natively,
# else float32), float32 reductions.
EXACT_ATOL = 3e-5
FAST_MAX, FAST_MEAN = 0.15, 0.02
F32 = torch.float32


def _random_acts(model, generator, n_sites=5, batch=2, pos=9):
    """Random site vectors ``[batch, pos, d]`` whose policies range from peaked to flat."""
    scale = torch.logspace(-1, 1, n_sites)  # one scale per site: entropies spread widely
    acts = {
        ("mlp_out", i): scale[i] * torch.randn(batch, pos, model.d_model, generator=generator)
        for i in range(n_sites)
    }
    acts["final", model.n_layers - 1] = 3 * torch.randn(
        batch, pos, model.d_model, generator=generator
    )
    return acts


def _index(batch, pos):
    rows_b, rows_t = torch.ones(batch, pos, dtype=torch.bool).nonzero(as_tuple=True)
    return rows_b, rows_t


@torch.no_grad()
def _reference(model, acts, keys, index, next_ids):
    """Entropy and extras in float64, written out from the definitions."""
    W = model.unembed.weight.double()
    b = model.unembed.bias
    final = next(k for k in keys if k[0] == "final")
    out = {}
    logq = None
    for key in [final, *[k for k in keys if k != final]]:
        z = acts[key][index].double() @ W.T + (0 if b is None else b.double())
        logp = torch.log_softmax(z, -1)
        logq = logp if key == final else logq
        target = z.gather(-1, next_ids[:, None])
        out[key] = {
            "entropy": entropy(z),
            "next_token_logprob": logp.gather(-1, next_ids[:, None])[:, 0],
            "next_token_rank": 1 + (z > target).sum(-1),
            "kl_internal_final": (logp.exp() * (logp - logq)).sum(-1),
            "top1_agrees": z.argmax(-1) == logq.argmax(-1),
        }
    return out


@pytest.mark.parametrize("precision", ["exact", "fast"])
def test_engine_matches_float64_on_random_vectors(models, precision):
    model = models("qwen2")
    seed = secrets.randbits(31)  # fresh inputs on every run; the seed is in the messages
    generator = torch.Generator().manual_seed(seed)
    acts = _random_acts(model, generator)
    index = _index(2, 9)
    next_ids = torch.randint(0, model.vocab_size, (18,), generator=generator)
    keys = list(acts)
    lens = Lens(model, "raw", precision)
    got = site_stats(lens, acts, keys, index, Request.of(True, topk=3), next_ids=next_ids)
    want = _reference(model, acts, keys, index, next_ids)
    for key in keys:  # top-3 probabilities against float64 (ids: see tests/test_tables.py)
        z = acts[key][index].double() @ model.unembed.weight.detach().double().T
        z = z + (0 if model.unembed.bias is None else model.unembed.bias.detach().double())
        top = torch.softmax(z, -1).topk(3, -1).values.numpy()
        atol = EXACT_ATOL if precision == "exact" else FAST_MAX
        np.testing.assert_allclose(got[key]["topk_prob"], top, atol=atol, err_msg=str(seed))
    entropies = np.concatenate([want[k]["entropy"].numpy() for k in keys])
    assert entropies.min() < 1.0 and entropies.max() > 0.9 * np.log(model.vocab_size)
    err = np.concatenate([np.abs(got[k]["entropy"] - want[k]["entropy"].numpy()) for k in keys])
    if precision == "exact":
        assert err.max() < EXACT_ATOL, (seed, err.max())
        for key in keys:
            for column in ("next_token_logprob", "kl_internal_final"):
                # Up to 30 nats here: float32 products give a relative error of about 1e-6.
                np.testing.assert_allclose(
                    got[key][column],
                    want[key][column],
                    atol=EXACT_ATOL,
                    rtol=1e-5,
                    err_msg=str(seed),
                )
            for column in ("next_token_rank", "top1_agrees"):
                np.testing.assert_array_equal(got[key][column], want[key][column], str(seed))
    else:
        assert err.max() < FAST_MAX and err.mean() < FAST_MEAN, (seed, err.max(), err.mean())


def test_fast_table_within_tolerance_of_float64(models, tiny_dirs):
    from helpers import naive_table as _naive_table

    model = models("llama")
    table = entropy_table(model, TEXTS, precision="fast", lens="norm")
    naive = _naive_table(tiny_dirs["llama"], model.tokenizer, TEXTS, "norm")
    got = {(r.sample_id, r.position, r.layer, r.site): r.entropy for r in table.itertuples()}
    err = np.array([abs(got[k] - naive[k]) for k in naive])
    assert err.max() < FAST_MAX and err.mean() < FAST_MEAN, (err.max(), err.mean())


@pytest.mark.parametrize("precision", ["exact", "fast"])
def test_chunk_sizes_from_one_row_to_all_rows_agree(models, precision):
    model = models("qwen3", "float64" if precision == "exact" else "float32")
    generator = torch.Generator().manual_seed(1)
    acts = {k: v.to(model.dtype) for k, v in _random_acts(model, generator).items()}
    next_ids = torch.randint(-1, model.vocab_size, (18,), generator=generator)
    lens = Lens(model, "norm", precision)
    results = [
        site_stats(
            lens, acts, list(acts), _index(2, 9), EXTRAS, next_ids=next_ids, chunk_tokens=c
        )
        for c in (1, 2, 5, 7, 18 * 6)
    ]
    # Only the products' rounding differs: BLAS sums a 1-row and a many-row product in
    # different orders (float64 here for exact; for fast, bf16 logits, or float32 products on a
    # CPU without native bf16, where a next-token log-prob near -10 is 1e-6 per float32 ulp).
    atol, rtol = (1e-12, 0.0) if precision == "exact" else (1e-6, 1e-6)
    for other in results[1:]:
        for key, columns in results[0].items():
            for column, value in columns.items():
                np.testing.assert_allclose(other[key][column], value, atol=atol, rtol=rtol)


@torch.no_grad()
def _tiled_and_whole(model, precision, columns, topk, rows=24, loudest=1.3):
    lens = Lens(model, "raw", precision)
    generator = torch.Generator().manual_seed(5)
    scale = torch.logspace(-1, loudest, rows)[:, None]  # flat to peaked policies
    x = (scale * torch.randn(rows, model.d_model, generator=generator)).to(lens.dtype)
    whole = whole_rows.reduce_logits(lens.logits(x, None)[None], lens.reduce_dtype, topk=topk)
    tiled = tiles.tiled_stats(lens, x, topk, columns)
    return {name: v[0] for name, v in whole.items()}, tiled


@pytest.mark.parametrize("columns", [1, 7, 16, 10_000])
def test_tiled_reductions_equal_whole_rows(arch, models, columns):
    # Tiles of one column, widths that do not divide the vocabulary, a top-k wider than a tile
    # (K=10 > 7) and one tile wider than the vocabulary: the same numbers as whole logits rows.
    model = models(arch)
    for precision in ("exact", "fast"):
        whole, tiled = _tiled_and_whole(model, precision, columns, topk=10)
        np.testing.assert_allclose(tiled["entropy"], whole["entropy"], atol=1e-5, rtol=0)
        np.testing.assert_allclose(tiled["topk_prob"], whole["topk_prob"], atol=1e-6, rtol=1e-5)
        if precision == "exact":  # bf16 logits tie often, and ties may come in either order
            np.testing.assert_array_equal(tiled["topk_id"], whole["topk_id"])


@pytest.mark.parametrize("family", ["gemma2", "granite"])
def test_tiled_reductions_apply_the_output_head_per_tile(family_models, family):
    # Soft-capping (Gemma) and logit scaling (Granite) are applied to every tile (vectors small
    # enough that no two logits tie at Gemma's cap).
    model = family_models(family)
    whole, tiled = _tiled_and_whole(model, "exact", 5, topk=3, loudest=0.5)
    np.testing.assert_allclose(tiled["entropy"], whole["entropy"], atol=1e-5, rtol=0)
    np.testing.assert_array_equal(tiled["topk_id"], whole["topk_id"])


def test_tiled_reductions_tiny_vocabulary_and_full_topk(models):
    model = models("qwen2")
    vocab = model.vocab_size
    whole, tiled = _tiled_and_whole(model, "exact", 3, topk=vocab, rows=4)  # K = vocabulary
    np.testing.assert_array_equal(tiled["topk_id"], whole["topk_id"])
    np.testing.assert_allclose(tiled["topk_prob"].sum(-1), 1.0, atol=1e-5)
    assert tiles.tile_columns(1, vocab) == vocab  # a tiny vocabulary: one tile
    assert tiles.tile_columns(10**9, 151936) == tiles.MIN_TILE_COLUMNS
    assert tiles.tile_columns(1024, 151936, 1 << 19) == 512


@pytest.mark.parametrize("precision", ["exact", "fast"])
def test_tiled_site_stats_match_float64(models, monkeypatch, precision):
    # Narrow tiles (7 columns, not a divisor of the vocabulary) through site_stats, without
    # extras (the tiled path), against float64 written out from the definitions.
    monkeypatch.setattr(tiles, "TILE_ELEMENTS", 1)
    monkeypatch.setattr(tiles, "MIN_TILE_COLUMNS", 7)
    tiled = tiles.tiled_stats
    model = models("llama")
    seed = secrets.randbits(31)
    acts = _random_acts(model, torch.Generator().manual_seed(seed))
    keys, index = list(acts), _index(2, 9)
    seen = []
    monkeypatch.setattr(tiles, "tiled_stats", lambda *a: seen.append(1) or tiled(*a))
    got = site_stats(
        Lens(model, "raw", precision), acts, keys, index, Request(topk=4), chunk_tokens=40
    )
    assert seen  # the tiled path ran
    W = model.unembed.weight.detach().double()
    b = model.unembed.bias
    atol = EXACT_ATOL if precision == "exact" else FAST_MAX
    for key in keys:
        z = acts[key][index].double() @ W.T + (0 if b is None else b.detach().double())
        err = np.abs(got[key]["entropy"] - entropy(z).numpy())
        assert err.max() < atol, (seed, key, err.max())
        top = torch.softmax(z, -1).topk(4, -1).values.numpy()
        np.testing.assert_allclose(got[key]["topk_prob"], top, atol=atol, err_msg=str(seed))
        if precision == "exact":
            assert (got[key]["topk_id"][:, 0] == z.argmax(-1).numpy()).all(), seed


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["exact", "fast"])
def test_compiled_tiles_equal_eager_tiles(models, monkeypatch, precision):
    monkeypatch.setattr(tiles, "TILE_ELEMENTS", 1)
    monkeypatch.setattr(tiles, "MIN_TILE_COLUMNS", 13)
    model = models("qwen3")
    acts = _random_acts(model, torch.Generator().manual_seed(4))
    args = (Lens(model, "raw", precision), acts, list(acts), _index(2, 9))
    eager = site_stats(*args, Request(topk=4), chunk_tokens=30, compiled=False)
    compiled = site_stats(*args, Request(topk=4), chunk_tokens=30, compiled=True)
    assert compiling._compiled_tile not in (None, False), "torch.compile did not run"
    for key, columns in eager.items():
        for column, value in columns.items():
            np.testing.assert_allclose(compiled[key][column], value, atol=1e-5, rtol=0)


def test_wrong_compiled_tiles_are_caught_and_replaced_by_eager(models, monkeypatch, caplog):
    # A compiled tile reduction whose numbers differ from the eager code's is never used.
    def wrong(z, dtype):
        top, log_total, mean = tiles.tile_math(z, dtype)
        return top, log_total + 1.0, mean

    monkeypatch.setattr(compiling, "_compiled_tile", {tiles.tile_math: wrong})
    monkeypatch.setattr(compiling, "_checked_tiles", set())
    model = models("qwen2")
    acts = _random_acts(model, torch.Generator().manual_seed(6))
    args = (Lens(model), acts, list(acts), _index(2, 9))
    with caplog.at_level(logging.WARNING):
        compiled = site_stats(*args, compiled=True)
    assert compiling._compiled_tile is False and "compiled tile reductions unusable" in caplog.text
    eager = site_stats(*args, compiled=False)
    for key in eager:
        np.testing.assert_array_equal(compiled[key]["entropy"], eager[key]["entropy"])


def test_chunk_plan_bounds_logits_rows():
    for n_rows in (1, 5, 40):
        for n_sites in (1, 3, 20):
            for chunk in (1, 2, 7, 16, 1000):
                for extras in (False, True):
                    rows, sites = chunk_plan(n_rows, n_sites, chunk, extras)
                    assert 1 <= rows <= n_rows and 1 <= sites <= n_sites
                    assert rows * sites <= max(chunk, 1)
                    if extras and chunk > 1:
                        assert rows * sites + rows <= chunk
    assert chunk_plan(100, 10, 1024, False) == (100, 10)  # everything in one product
    # The final policy's 100 rows and nine sites' fill a chunk; rows are never cut for sites.
    assert chunk_plan(100, 10, 1024, True) == (100, 9)
    assert chunk_plan(10_000, 169, 1024, False) == (1024, 1)  # wide products, not 6-row ones


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["exact", "fast"])
def test_compiled_equals_eager(models, precision):
    model = models("llama_tied")
    generator = torch.Generator().manual_seed(2)
    acts = _random_acts(model, generator)
    next_ids = torch.randint(-1, model.vocab_size, (18,), generator=generator)
    lens = Lens(model, "raw", precision)
    args = (lens, acts, list(acts), _index(2, 9))
    eager = site_stats(
        *args, Request.of(True, topk=4), next_ids=next_ids, chunk_tokens=30, compiled=False
    )
    compiled = site_stats(
        *args, Request.of(True, topk=4), next_ids=next_ids, chunk_tokens=30, compiled=True
    )
    assert compiling._compiled_fused not in (None, False), "torch.compile did not run"
    for key, columns in eager.items():
        assert {"topk_id", "topk_prob"} <= set(columns) and columns["topk_id"].shape == (18, 4)
        for column, value in columns.items():
            np.testing.assert_allclose(compiled[key][column], value, atol=1e-5, rtol=0)


def test_compile_failure_falls_back_to_eager(models, monkeypatch):
    def broken(fn, **kwargs):
        def run(*args):
            raise RuntimeError("no compiler here")

        return run

    monkeypatch.setattr(torch, "compile", broken)
    monkeypatch.setattr(compiling, "_compiled_fused", None)
    model = models("qwen2")
    acts = _random_acts(model, torch.Generator().manual_seed(3))
    args = (Lens(model), acts, list(acts), _index(2, 9))
    next_ids = torch.arange(18)  # with extras the eager path reduces whole logits rows, as here
    fallback = site_stats(*args, EXTRAS, next_ids=next_ids, compiled=True)
    eager = site_stats(*args, EXTRAS, next_ids=next_ids, compiled=False)
    assert compiling._compiled_fused is False
    for key in eager:
        np.testing.assert_array_equal(fallback[key]["entropy"], eager[key]["entropy"])


def test_deduplicated_resid_pre_equals_its_own_capture(models):
    model = models("qwen2")
    table = entropy_table(model, TEXTS[:2], sites=["resid_pre"], batch_size=2)
    ids = [model.tokenizer(t)["input_ids"] for t in TEXTS[:2]]
    for sample, seq in enumerate(ids):
        one = torch.tensor([seq])
        with torch.no_grad(), capture(model, ["resid_pre"]) as acts:
            model.forward(one, torch.ones_like(one))
        stats = site_stats(Lens(model), acts, list(acts), _index(1, len(seq)))
        for (_, layer), columns in stats.items():
            rows = table[(table.sample_id == sample) & (table.layer == layer)]
            # A padded batch and a lone sequence run sdpa's kernel on different shapes: float32
            # rounding apart (about 2e-6 nats), where a wrong vector would be far off.
            np.testing.assert_allclose(rows["entropy"], columns["entropy"], atol=5e-6, rtol=0)


def test_precision_auto_follows_model_dtype(models):
    assert resolve_precision("auto", torch.bfloat16) == "fast"
    assert resolve_precision("auto", torch.float16) == "fast"
    assert resolve_precision("auto", torch.float32) == "exact"
    assert resolve_precision("fast", torch.float64) == "fast"
    with pytest.raises(ValueError, match="unknown precision"):
        resolve_precision("medium", torch.float32)
    assert Lens(models("qwen2", "float64"), precision="exact").dtype == torch.float64
    assert Lens(models("qwen2", "float64"), precision="exact").reduce_dtype == torch.float64
    assert Lens(models("qwen2", "bfloat16"), precision="exact").dtype == torch.float32
    assert Lens(models("qwen2", "bfloat16"), precision="exact").reduce_dtype == torch.float32


def _fake_cpu(monkeypatch, capability, flags):
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.setattr(hardware, "cpu_capability", lambda: capability)
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset(flags))


def test_auto_runs_bf16_products_only_where_the_cpu_has_them(models, monkeypatch, caplog):
    _fake_cpu(monkeypatch, "AVX512", {"avx2", "avx512f", "avx512_bf16"})
    native = choose_precision("auto", torch.bfloat16, "cpu")
    assert (native.mode, native.products, native.reductions) == ("fast", torch.bfloat16, F32)
    assert "avx512_bf16" in native.reason
    assert Lens(models("qwen2"), precision="fast").dtype == torch.bfloat16
    assert choose_precision("auto", torch.float32, "cpu").products == F32  # exact

    _fake_cpu(monkeypatch, "AVX2", {"avx2", "fma"})
    emulated = choose_precision("auto", torch.bfloat16, "cpu")
    assert (emulated.mode, emulated.products, emulated.reductions) == ("fast", F32, F32)
    assert "without avx512_bf16" in emulated.reason
    unembed._warn_once.cache_clear()
    with caplog.at_level(logging.WARNING):
        asked = choose_precision("fast", torch.bfloat16, "cpu", d_model=77)
    assert asked.products == F32 and "float32 products" in caplog.text  # said, not silent
    lens = Lens(models("qwen2", "bfloat16"), precision="fast")
    assert (lens.dtype, lens.reduce_dtype, lens.precision) == (F32, F32, "fast")
    # Kernels lowered to AVX2 on a CPU that has the flag: no native bf16 either.
    _fake_cpu(monkeypatch, "AVX2", {"avx2", "avx512_bf16"})
    monkeypatch.setattr(hardware, "_measured_half", lambda *a: (False, "measured: slower"))
    assert choose_precision("auto", torch.bfloat16, "cpu").products == F32


def test_ambiguous_cpu_is_measured_once(monkeypatch):
    _fake_cpu(monkeypatch, "DEFAULT", set())  # another architecture: no x86 flags
    hardware._measured_half.cache_clear()
    first = choose_precision("fast", torch.bfloat16, "cpu", d_model=32)
    assert first.reason.startswith("measured on cpu") and first.products in (torch.bfloat16, F32)
    assert hardware._measured_half.cache_info().misses == 1
    assert choose_precision("fast", torch.bfloat16, "cpu", d_model=32) == first
    assert hardware._measured_half.cache_info().hits == 1


def test_float32_reductions_equal_float64(arch, models):
    """exact's float32 reductions against float64 reductions of the very same float32 logits."""
    model = models(arch)
    generator = torch.Generator().manual_seed(4)
    acts = _random_acts(model, generator)
    next_ids = torch.randint(-1, model.vocab_size, (18,), generator=generator)
    args = (acts, list(acts), _index(2, 9))
    lens32 = Lens(model, "norm", "exact")
    assert lens32.reduce_dtype == F32
    wide = Precision("exact", F32, torch.float64, "reference")
    got = site_stats(lens32, *args, EXTRAS, next_ids=next_ids)
    want = site_stats(Lens(model, "norm", wide), *args, EXTRAS, next_ids=next_ids)
    for key, columns in want.items():
        assert np.ptp(columns["entropy"]) > 0.5  # policies from peaked to flat
        for column, value in columns.items():
            np.testing.assert_allclose(got[key][column], value, atol=1e-5, rtol=1e-6)


def test_run_records_precision(tiny_dirs, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"problem": "2+3?", "response": "5 \\boxed{5}"}) + "\n")
    for precision, resolved in (("auto", "exact"), ("fast", "fast")):
        out = tmp_path / precision
        cfg = EntropyConfig(
            model=str(tiny_dirs["qwen2"]), data=str(data), out=str(out), precision=precision
        )
        run_entropy(cfg, progress=False)
        info = json.loads((out / "run.json").read_text())
        assert info["config"]["precision"] == precision
        chosen = info["precision"]
        assert chosen["mode"] == resolved  # what auto became for a float32 model
        want = choose_precision(precision, torch.float32, "cpu")
        assert chosen["products"] == str(want.products).removeprefix("torch.")
        assert chosen["reductions"] == "float32" and chosen["reason"] == want.reason


def test_reused_output_buffer_gives_the_same_logits_and_keeps_autograd(models):
    model = models("qwen2")  # its lm_head has no bias; the q/k/v biases are elsewhere
    lens = Lens(model, "norm")
    x = torch.randn(5, model.d_model)
    fresh = lens.logits(x, "resid_post")
    with torch.no_grad(), lens.reused_output(8):
        first = lens.logits(x, "resid_post")
        torch.testing.assert_close(first, fresh.detach(), rtol=0, atol=1e-6)
        assert first.data_ptr() == lens.logits(x[:2], "resid_post").data_ptr()  # one buffer
        assert lens.logits(torch.randn(9, model.d_model), None).shape[0] == 9  # too big: fresh
    with lens.reused_output(8):  # with gradients the buffer is never used (the trainer's case)
        assert lens.logits(x, "resid_post").requires_grad


def test_cli_precision_option(tiny_dirs, tmp_path):
    from typer.testing import CliRunner

    from internal_policy_lens.cli import app

    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"problem": "2+3?", "response": "5 \\boxed{5}"}) + "\n")
    common = ["entropy", "--model", str(tiny_dirs["qwen2"]), "--data", str(data), "--quiet"]
    result = CliRunner().invoke(app, [*common, "--out", str(tmp_path / "a"), "--precision", "fast"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "a" / "run.json").read_text())["precision"]["mode"] == "fast"
    bad = CliRunner().invoke(app, [*common, "--out", str(tmp_path / "b"), "--precision", "half"])
    assert bad.exit_code == 2 and "unknown precision 'half'" in bad.output
    assert not (tmp_path / "b").exists()


def test_cli_memory_bounds_reach_entropy_table(tiny_dirs, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from internal_policy_lens.cli import app
    from internal_policy_lens.commands import entropy as run

    seen, original = [], run.batch_columns

    def spy(model, lens, batch, keys, settings, *args):
        seen.append((settings.capture_mb, settings.attention_mb))  # one object for the settings
        return original(model, lens, batch, keys, settings, *args)

    monkeypatch.setattr(run, "batch_columns", spy)
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"problem": "2+3?", "response": "5 \\boxed{5}"}) + "\n")
    args = ["entropy", "--model", str(tiny_dirs["qwen2"]), "--data", str(data), "--quiet"]
    args += ["--out", str(tmp_path / "a"), "--capture-mb", "0.5", "--attention-mb", "0.001"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert seen == [(0.5, 0.001)]
    config = json.loads((tmp_path / "a" / "run.json").read_text())["config"]
    assert (config["capture_mb"], config["attention_mb"]) == (0.5, 0.001)


def test_lens_bias_zero_dropped_nonzero_kept(models):
    model = models("llama", "float64")
    x = torch.randn(6, model.d_model, dtype=torch.float64)
    W, b = model.unembed.weight, model.unembed.bias
    lens = Lens(model, "raw", precision="exact")
    if b is not None:
        assert not b.any() and lens.bias is None  # the bridge's all-zero bias is skipped
    torch.testing.assert_close(lens.logits(x, "resid_post"), x @ W.T, rtol=0, atol=1e-12)
    with torch.no_grad():
        bias = torch.randn(model.vocab_size, dtype=torch.float64)
        saved = None if b is None else b.clone()
        if b is None:
            model.unembed.bias = torch.nn.Parameter(bias)
        else:
            b.copy_(bias)
        try:
            lens = Lens(model, "raw", precision="exact")
            assert lens.bias is not None
            with lens.reused_output(8):
                got = lens.logits(x, "resid_post")
            torch.testing.assert_close(got, x @ W.T + bias, rtol=0, atol=1e-12)
        finally:
            if saved is None:
                model.unembed.bias = None
            else:
                model.unembed.bias.copy_(saved)
