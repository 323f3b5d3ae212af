"""The statistics registry, the dispatcher's choice by capability, and the opt-in statistics
against float64 written out from their definitions, on several architectures and backends."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from reference import hf_model, naive_logits

from internal_policy_lens.commands.entropy import run_entropy
from internal_policy_lens.config import EntropyConfig
from internal_policy_lens.lens.reduce import BACKENDS, capability, choose_backend, site_stats, tiles
from internal_policy_lens.lens.unembed import Lens
from internal_policy_lens.statistics import (
    STATISTICS,
    Request,
    opt_in,
    resolve,
    summarised,
)

EXACT_ATOL = 3e-5  # float32 products and reductions against float64 (nats, nats^2 relative)


def _acts(model, seed, n_sites=4, batch=2, pos=7):
    # Site vectors whose policies range from peaked to flat (one scale per site).
    generator = torch.Generator().manual_seed(seed)
    scale = torch.logspace(-1, 1.2, n_sites)
    acts = {
        ("mlp_out", i % model.n_layers): scale[i]
        * torch.randn(batch, pos, model.d_model, generator=generator)
        for i in range(min(n_sites, model.n_layers))
    }
    acts[("resid_post", 0)] = 8 * torch.randn(batch, pos, model.d_model, generator=generator)
    index = torch.ones(batch, pos, dtype=torch.bool).nonzero(as_tuple=True)
    return acts, index


def _float64(folder, acts, index, lens):
    # Entropy and varentropy from their definitions: Var_p[-log p] = sum p (log p)^2 - H^2.
    hf = hf_model(folder)
    out = {}
    for key, x in acts.items():
        logp = torch.log_softmax(naive_logits(hf, x[index].double(), key[0], lens), -1)
        p = logp.exp()
        h = -(p * logp).sum(-1)
        out[key] = {"entropy": h, "varentropy": (p * logp.square()).sum(-1) - h.square()}
    return out


def test_each_statistic_is_declared_once_and_rows_computes_every_one():
    assert set(capability("rows").computes) == set(STATISTICS)
    for backend in BACKENDS:
        assert capability(backend).computes <= set(STATISTICS), backend
        assert "entropy" in capability(backend).computes
    for s in STATISTICS.values():
        assert s.dtype in ("float", "int64", "bool") and s.unit and s.definition
    assert "varentropy" in opt_in() and "next_token_rank" not in opt_in()
    assert resolve(False, "varentropy") == ("entropy", "varentropy")
    assert resolve(True)[0] == "entropy" and "kl_internal_final" in resolve(True)
    with pytest.raises(ValueError, match="unknown statistic 'entropyy'"):
        resolve(False, ["entropyy"])
    with pytest.raises(ValueError, match="comes with --extras"):
        resolve(False, ["top1_agrees"])
    assert "varentropy" in summarised(["entropy", "varentropy"])


@pytest.mark.parametrize("lens", ["raw", "norm"])
def test_varentropy_matches_float64_on_rows_and_tiles(models, tiny_dirs, monkeypatch, arch, lens):
    model = models(arch)
    acts, index = _acts(model, seed=len(arch))
    want = _float64(tiny_dirs[arch], acts, index, lens)
    request = Request(("varentropy",), topk=3)
    assert choose_backend(torch.device("cpu"), request) == "tiles"  # an exact merge over tiles
    monkeypatch.setattr(tiles, "TILE_ELEMENTS", 1)  # tiles of MIN_TILE_COLUMNS: several a row
    monkeypatch.setattr(tiles, "MIN_TILE_COLUMNS", 16)
    for backend in ("rows", "tiles"):
        got = site_stats(Lens(model, lens), acts, list(acts), index, request, backend=backend)
        for key, columns in want.items():
            for name in ("entropy", "varentropy"):
                np.testing.assert_allclose(
                    got[key][name], columns[name], atol=EXACT_ATOL, rtol=1e-5, err_msg=backend
                )
    spread = np.concatenate([got[key]["varentropy"] for key in acts])
    assert spread.min() >= 0 and np.ptp(spread) > 0.5  # peaked and flat policies both


@pytest.mark.parametrize("name", ["gemma2", "granite", "gpt2"])
def test_varentropy_on_families_with_a_head_transformation_or_a_bias(
    family_models, family_dirs, name
):
    model = family_models(name)
    acts, index = _acts(model, seed=3, pos=4)
    want = _float64(family_dirs(name), acts, index, "raw")
    got = site_stats(Lens(model), acts, list(acts), index, Request(("varentropy",)))
    for key, columns in want.items():
        np.testing.assert_allclose(
            got[key]["varentropy"], columns["varentropy"], atol=EXACT_ATOL, rtol=1e-5
        )


def test_a_uniform_policy_has_zero_varentropy(models):
    # Its surprise is the same for every token: log V, with no spread.
    model = models("qwen2")
    x = torch.zeros(1, 2, model.d_model)
    acts, index = {("resid_post", 0): x}, (torch.zeros(2, dtype=torch.long), torch.arange(2))
    for backend in ("rows", "tiles"):
        got = site_stats(
            Lens(model), acts, list(acts), index, Request(("varentropy",)), backend=backend
        )
        np.testing.assert_allclose(got[("resid_post", 0)]["varentropy"], 0, atol=1e-6)


def test_varentropy_reaches_the_tables_the_summary_and_the_report(tiny_dirs, tmp_path):
    data = tmp_path / "d.jsonl"
    rows = [
        {"problem": f"{i}+3?", "response": f"{i}+3 = {i + 3}. \\boxed{{{i + 3}}}"} for i in range(3)
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    cfg = EntropyConfig(
        model=str(tiny_dirs["qwen2"]), data=str(data), out=str(out), stats=["varentropy"]
    )
    run = run_entropy(cfg, progress=False)
    tokens = pd.read_parquet(out / "tokens.parquet")
    assert list(tokens.columns[tokens.columns.get_loc("entropy") :]) == ["entropy", "varentropy"]
    assert (tokens["varentropy"] >= 0).all()
    summary = pd.read_csv(out / "summary.csv")
    means = summary[summary["quantity"] == "varentropy"].set_index(["layer", "name"])["mean"]
    want = tokens.groupby(["layer", "site"], observed=True)["varentropy"].mean()
    for (layer, site), value in want.items():
        assert means[layer, site] == pytest.approx(value, rel=1e-6)
    info = json.loads((out / "run.json").read_text())
    assert info["statistics"]["varentropy"]["unit"] == "nats^2"
    assert 'id="chart-varentropy"' in (out / "report.html").read_text()
    assert (out / "figures" / "statistics.png").is_file()
    assert "statistics" not in run.figures.skipped


def _nucleus64(folder, acts, index, lens, mass):
    # The smallest k whose k most probable tokens hold `mass`, from the float64 sorted policy.
    hf = hf_model(folder)
    out = {}
    for key, x in acts.items():
        p = torch.softmax(naive_logits(hf, x[index].double(), key[0], lens), -1)
        held = p.sort(-1, descending=True).values.cumsum(-1)
        out[key] = (held < mass).sum(-1) + 1
    return out


@pytest.mark.parametrize("mass", [0.5, 0.9, 0.99])
def test_nucleus_size_matches_float64_and_runs_on_rows(models, tiny_dirs, arch, mass):
    model = models(arch)
    acts, index = _acts(model, seed=len(arch) + 1)
    request = Request(("nucleus_size",), parameters=(("nucleus_p", mass),))
    assert choose_backend(torch.device("cpu"), request) == "rows"
    got = site_stats(Lens(model, "norm"), acts, list(acts), index, request)
    want = _nucleus64(tiny_dirs[arch], acts, index, "norm", mass)
    sizes = []
    for key, value in want.items():
        np.testing.assert_array_equal(got[key]["nucleus_size"], value.numpy(), err_msg=str(key))
        sizes.append(value.numpy())
    sizes = np.concatenate(sizes)
    assert sizes.min() < sizes.max() <= model.vocab_size  # peaked and flat policies both


def test_nucleus_size_is_handed_over_by_the_backends_that_cannot_sort(monkeypatch):
    from internal_policy_lens.lens.reduce import dispatch

    monkeypatch.setattr(dispatch, "triton_support", lambda device: (True, ""))
    request = Request(("varentropy", "nucleus_size"), topk=5)
    assert choose_backend(torch.device("cuda"), request) == "rows"
    for backend in ("tiles", "triton"):
        with pytest.raises(ValueError, match="does not compute nucleus_size; the rows backend"):
            choose_backend(torch.device("cuda"), request, backend=backend)
    assert "whole_row" in STATISTICS["nucleus_size"].needs
    with pytest.raises(ValueError, match="nucleus_p must lie in"):
        Request(("nucleus_size",), parameters=(("nucleus_p", 1.5),))


def test_nucleus_p_is_an_option_of_ipl_entropy(tiny_dirs, tmp_path):
    from typer.testing import CliRunner

    from internal_policy_lens.cli import app

    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"problem": "2+3?", "response": "2+3 = 5. \\boxed{5}"}) + "\n")
    out = tmp_path / "run"
    args = ["entropy", "--model", str(tiny_dirs["llama"]), "--data", str(data), "--out", str(out)]
    args += ["--stats", "nucleus_size", "--nucleus-p", "0.5", "--quiet"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    info = json.loads((out / "run.json").read_text())
    assert info["statistics"]["nucleus_size"]["nucleus_p"] == 0.5
    assert info["config"]["parameters"] == {"nucleus_p": 0.5}
    tokens = pd.read_parquet(out / "tokens.parquet")
    assert tokens["nucleus_size"].dtype == np.int64 and (tokens["nucleus_size"] >= 1).all()
    summary = pd.read_csv(out / "summary.csv")
    assert (summary["quantity"] == "nucleus_size").any()
    assert 'id="chart-nucleus-size"' in (out / "report.html").read_text()
    assert (out / "figures" / "statistics.png").is_file()


@pytest.mark.slow
def test_compiled_tiles_give_the_eager_varentropy(models, monkeypatch):
    from internal_policy_lens.lens.reduce import compiled as compiling

    monkeypatch.setattr(tiles, "TILE_ELEMENTS", 1)
    monkeypatch.setattr(tiles, "MIN_TILE_COLUMNS", 13)
    model = models("qwen3")
    acts, index = _acts(model, seed=9)
    args = (Lens(model), acts, list(acts), index, Request(("varentropy",), topk=2))
    eager = site_stats(*args, compiled=False, backend="tiles")
    compiled = site_stats(*args, compiled=True, backend="tiles")
    assert tiles.tile_spread in compiling._compiled_tile, "the varentropy's tiles were not compiled"
    for key, columns in eager.items():
        for name in ("entropy", "varentropy"):
            np.testing.assert_allclose(compiled[key][name], columns[name], atol=1e-5, rtol=1e-5)


def test_the_registry_refuses_what_it_cannot_hold():
    from internal_policy_lens.statistics import Statistic, register

    with pytest.raises(ValueError, match="the statistic 'entropy' is declared twice"):
        register(Statistic("entropy", "float", "nats", "again"))
    with pytest.raises(ValueError, match="unknown group 'sometimes'"):
        register(Statistic("spare", "float", "nats", "a spare", group="sometimes"))
    assert "spare" not in STATISTICS
    with pytest.raises(ValueError, match="unknown statistic parameter 'nucleus_q'"):
        Request(("nucleus_size",), parameters=(("nucleus_q", 0.5),))
