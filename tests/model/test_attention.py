"""Torch's sdpa against the bridge's eager attention, on every family.

The decoder runs transformers' attention through ``scaled_dot_product_attention`` wherever the
family allows it; every site must be what eager attention gives, within float32 rounding, on a
right-padded batch and over position blocks with a key/value cache. The torch profiler counts
the sdpa kernels that really ran, so a model that only claims sdpa fails.
"""

import numpy as np
import pandas as pd
import pytest
import torch
import transformers
from helpers import TEXTS
from reference import hf_model

from internal_policy_lens import ModelLoadError, capture, entropy_table, load_model
from internal_policy_lens.bundled import bundled_data
from internal_policy_lens.data.records import read_records
from internal_policy_lens.model.families import FAMILIES, TINY_ARCHITECTURES, family_of_arch
from internal_policy_lens.model.load import policy_view

SDPA = "aten::scaled_dot_product_attention"
EAGER_ONLY = [f.arch for f in FAMILIES if f.eager_attention]


@pytest.fixture(params=TINY_ARCHITECTURES)
def folder(request, tiny_dirs, family_dirs):
    """A tiny random model of every family (the first ones from the session's tiny_dirs)."""
    arch = request.param
    return tiny_dirs[arch] if arch in tiny_dirs else family_dirs(arch)


@pytest.fixture(scope="module")
def loaded():
    """``(folder, attention) -> model``, each loaded once, for the tests that do not switch it."""
    cache = {}

    def get(folder, attention="auto"):
        if (folder, attention) not in cache:
            cache[folder, attention] = _load(folder, attention)
        return cache[folder, attention]

    return get


def _load(folder, attention="auto"):
    return load_model(folder, dtype="float32", device="cpu", progress=False, attention=attention)


def _sites(model, ids, mask):
    """Every site of every layer, and how many sdpa kernels the forward pass ran."""
    with (
        torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof,
        torch.no_grad(),
        capture(model) as acts,
    ):
        model.forward(ids, mask)
    return dict(acts), sum(event.name == SDPA for event in prof.events())


def _assert_same_sites(got, expected, mask):
    """Equal on every real token: max |a - b| / max |b| <= 1e-5 per site and row; no NaN."""
    assert got.keys() == expected.keys()
    for key, want in expected.items():
        assert torch.isfinite(got[key]).all(), key
        for row, n in enumerate(mask.sum(1).tolist()):
            a, b = got[key][row, :n], want[row, :n]
            err = ((a - b).abs().max() / b.abs().max()).item()
            assert err <= 1e-5, f"{key}, row {row}: relative error {err:.1e}"


def test_sdpa_sites_equal_eager_on_a_right_padded_batch(folder, loaded):
    sdpa, eager = loaded(folder), loaded(folder, "eager")
    family = sdpa.family
    ids, mask = sdpa.to_tokens(TEXTS[:2])
    assert mask[1].sum() < mask[0].sum() == mask.shape[1]  # two lengths, the second padded
    got, kernels = _sites(sdpa, ids, mask)
    expected, eager_kernels = _sites(eager, ids, mask)
    assert eager.attention == "eager" and eager_kernels == 0
    if family.eager_attention:
        assert sdpa.attention == "eager" and kernels == 0
    else:
        assert sdpa.attention == "sdpa" and kernels == sdpa.n_layers  # one kernel per layer
    _assert_same_sites(got, expected, mask)


def test_switching_attention_on_a_loaded_model(folder):
    model = _load(folder)
    if model.family.eager_attention:
        pytest.skip("an eager-only family has nothing to switch")
    ids, mask = model.to_tokens(TEXTS[:2])
    model.set_attention("eager")
    expected, kernels = _sites(model, ids, mask)
    assert model.attention == "eager" and kernels == 0
    model.set_attention("sdpa")
    got, kernels = _sites(model, ids, mask)
    assert model.attention == "sdpa" and kernels == model.n_layers
    _assert_same_sites(got, expected, mask)


@pytest.mark.parametrize("arch", EAGER_ONLY)
def test_eager_only_families_stay_eager(arch, family_dirs):
    reason = family_of_arch(arch).eager_attention
    model = _load(family_dirs(arch))  # its own: the test tries to switch it
    assert model.attention == "eager"
    with pytest.raises(ValueError, match="runs eager attention only: " + reason.split("(")[0]):
        model.set_attention("sdpa")
    assert model.attention == "eager"
    with pytest.raises(ModelLoadError, match="runs eager attention only"):
        _load(family_dirs(arch), "sdpa")


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.arch)
def test_eager_exactly_where_transformers_has_no_sdpa(family):
    # The registry's reason and transformers' own flag must agree; a transformers release that
    # adds sdpa to one of these families shows up here.
    supports_sdpa = getattr(transformers, family.hf_class)._supports_sdpa
    assert supports_sdpa == (family.eager_attention is None), family.name


def test_unknown_attention_is_refused(tiny_dirs):
    with pytest.raises(ModelLoadError, match="unknown attention 'flash'; use auto, eager, sdpa"):
        _load(tiny_dirs["qwen2"], "flash")


def test_policy_view_runs_sdpa_and_leaves_the_model_as_it_was(tiny_dirs):
    plain = hf_model(tiny_dirs["qwen3"], dtype=torch.float32)
    view = policy_view(plain, _load(tiny_dirs["qwen3"]).tokenizer)
    assert view.attention == "sdpa" and plain.config._attn_implementation == "eager"
    ids, mask = view.to_tokens(TEXTS[:2])
    got, kernels = _sites(view, ids, mask)
    expected, _ = _sites(_load(tiny_dirs["qwen3"], "eager"), ids, mask)
    assert kernels == view.n_layers
    _assert_same_sites(got, expected, mask)


@pytest.mark.slow
def test_bundled_default_tables_unchanged_by_sdpa():
    records = read_records(bundled_data())
    tables = {}
    for attention in ("auto", "eager"):
        model = load_model("ipl-tiny-qwen2", dtype="float32", device="cpu", attention=attention)
        tables[model.attention] = entropy_table(model, records, batch_size=16)
    sdpa, eager = tables["sdpa"], tables["eager"]
    assert len(sdpa) > 10_000
    pd.testing.assert_frame_equal(sdpa.drop(columns="entropy"), eager.drop(columns="entropy"))
    # Float32 rounding: the eager float32 table is itself up to 8e-5 nats (mean 7e-7) from a
    # float64 run, and sdpa rounds differently (measured: max 1.3e-4, mean 4e-7 apart). A wrong
    # mask or position would move entropies by tenths of a nat.
    err = np.abs(sdpa["entropy"].to_numpy() - eager["entropy"].to_numpy())
    assert err.mean() < 2e-6 and err.max() < 5e-4, f"{err.mean():.1e} / {err.max():.1e} nats"
