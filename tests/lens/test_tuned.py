"""The tuned lens: identity with the norm lens, float64 reference, fitting, resume, folders."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import TEXTS, lens_folder, random_translators
from reference import entropy, hf_model, naive_sites, naive_tuned_logits
from typer.testing import CliRunner

from internal_policy_lens import entropy_table, load_model
from internal_policy_lens.bundled import bundled_data
from internal_policy_lens.cli import app
from internal_policy_lens.config import FitLensConfig
from internal_policy_lens.data.records import read_records
from internal_policy_lens.lens.fit import fit_lens
from internal_policy_lens.lens.sites import SITES
from internal_policy_lens.lens.tuned import (
    LensFolderError,
    fitted_keys,
    read_lens,
    zero_translators,
)

runner = CliRunner()
NON_FINAL = [s for s in SITES if s != "final"]


def test_zero_translators_give_the_norm_lens_table(arch, models, tmp_path):
    model = models(arch)
    keys = fitted_keys(NON_FINAL, model.n_layers)
    folder = lens_folder(model, tmp_path / "lens", zero_translators(keys, model.d_model))
    tuned = entropy_table(model, TEXTS, lens="tuned", lens_path=folder, extras=True)
    norm = entropy_table(model, TEXTS, lens="norm", extras=True)
    pd.testing.assert_frame_equal(tuned, norm, check_exact=False, atol=1e-6, rtol=0)


def test_tuned_entropies_match_float64_by_hand(arch, models, tiny_dirs, tmp_path):
    model = models(arch, "float64")
    keys = fitted_keys(NON_FINAL, model.n_layers)
    translators = random_translators(model, keys)
    folder = lens_folder(model, tmp_path / "lens", translators)
    table = entropy_table(model, TEXTS, lens="tuned", lens_path=folder, chunk_tokens=7)
    reference = hf_model(tiny_dirs[arch])
    errors = []
    for number, text in enumerate(TEXTS):
        acts, _ = naive_sites(reference, model.tokenizer(text)["input_ids"])
        for (site, layer), x in acts.items():
            if site == "final":
                continue
            key = ("resid_post", layer - 1) if site == "resid_pre" and layer > 0 else (site, layer)
            want = entropy(naive_tuned_logits(reference, x, *translators[key])).numpy()
            got = table[(table.sample_id == number) & (table.layer == layer)]
            got = got[got.site == site].sort_values("position")
            errors.append(np.abs(got["entropy"].to_numpy() - want).max())
    assert max(errors) < 1e-5
    # The translators matter: the tuned table is not the norm lens's.
    norm = entropy_table(model, TEXTS, lens="norm")
    assert np.abs(norm["entropy"] - table["entropy"]).max() > 1e-2


def test_missing_translator_is_named(models, tmp_path):
    model = models("qwen2")
    keys = fitted_keys(["resid_pre", "resid_post"], model.n_layers)
    folder = lens_folder(model, tmp_path / "lens", zero_translators(keys, model.d_model))
    with pytest.raises(ValueError, match="no translator for attn_in at layer 0"):
        entropy_table(model, TEXTS, lens="tuned", lens_path=folder)
    table = entropy_table(model, TEXTS, lens="tuned", lens_path=folder, sites="resid_pre,final")
    assert set(table["site"].astype(str)) == {"resid_pre", "final"}


def test_tuned_lens_format_round_trips(models, tmp_path):
    model = models("qwen2")
    keys = fitted_keys(["resid_pre", "resid_post"], model.n_layers)
    translators = random_translators(model, keys)
    last = ("resid_post", model.n_layers - 1)
    translators[last] = zero_translators([last], model.d_model)[last]  # the package's identity
    folder = lens_folder(model, tmp_path / "tl", translators, fmt="tuned-lens")
    assert {p.name for p in folder.iterdir()} == {"config.json", "params.pt", "lens.json"}
    state = torch.load(folder / "params.pt", weights_only=True)
    assert sorted(state) == sorted(
        f"{i}.{n}" for i in range(model.n_layers) for n in "weight bias".split()
    )
    torch.testing.assert_close(state["0.weight"], translators["resid_pre", 0][0])
    torch.testing.assert_close(state["2.bias"], translators["resid_post", 1][1])
    back, _ = read_lens(folder, model)
    assert back.keys() == translators.keys()
    for key, (a, b) in translators.items():
        torch.testing.assert_close(back[key][0], a, rtol=0, atol=0)
        torch.testing.assert_close(back[key][1], b, rtol=0, atol=0)


def test_a_folder_written_by_the_tuned_lens_package_loads(models, tmp_path):
    model = models("llama")
    d, n = model.d_model, model.n_layers
    folder = tmp_path / "published"
    folder.mkdir()
    config = {
        "base_model_name_or_path": "some/llama",
        "d_model": d,
        "num_hidden_layers": n,
        "bias": True,
        "base_model_revision": None,
        "unembed_hash": None,
        "lens_type": "linear_tuned_lens",
    }
    (folder / "config.json").write_text(json.dumps(config))
    gen = torch.Generator().manual_seed(1)
    layers = torch.nn.ModuleList([torch.nn.Linear(d, d) for _ in range(n)])
    with torch.no_grad():
        for layer in layers:
            layer.weight.copy_(0.01 * torch.randn(d, d, generator=gen))
    # Older releases saved the whole lens module: keys carry a "layer_translators." prefix.
    state = {f"layer_translators.{k}": v for k, v in layers.state_dict().items()}
    torch.save(state, folder / "params.pt")
    translators, meta = read_lens(folder, model)
    torch.testing.assert_close(translators["resid_pre", 0][0], layers[0].weight.detach())
    torch.testing.assert_close(translators["resid_post", n - 2][1], layers[n - 1].bias.detach())
    assert not translators["resid_post", n - 1][0].any()
    assert meta["model"]["name_or_path"] == "some/llama"
    table = entropy_table(model, TEXTS[:1], lens="tuned", lens_path=folder, sites="resid_post")
    assert table["entropy"].notna().all()


def test_a_lens_for_another_model_is_refused_naming_both(models, tiny_dirs, tmp_path):
    qwen2, qwen3 = models("qwen2"), models("qwen3")
    keys = fitted_keys(["resid_post"], qwen2.n_layers)
    folder = lens_folder(qwen2, tmp_path / "lens", zero_translators(keys, qwen2.d_model))
    with pytest.raises(LensFolderError) as err:
        read_lens(folder, qwen3)
    assert str(tiny_dirs["qwen2"]) in str(err.value) and str(tiny_dirs["qwen3"]) in str(err.value)
    narrow = models("llama_tied")  # another d_model: the tuned-lens format names both too
    keys = fitted_keys(["resid_pre", "resid_post"], qwen2.n_layers)
    tl = lens_folder(qwen2, tmp_path / "tl", zero_translators(keys, qwen2.d_model), "tuned-lens")
    (tl / "lens.json").unlink()
    with pytest.raises(LensFolderError, match=f"{tiny_dirs['qwen2']}.*{tiny_dirs['llama_tied']}"):
        read_lens(tl, narrow)


def _cli(*args):
    """Run ``ipl ARGS`` in this process; ``output`` holds stdout and stderr."""
    return runner.invoke(app, [str(a) for a in args])


def _bad_folders(model, root):
    keys = fitted_keys(["resid_pre", "resid_post"], model.n_layers)
    good = lens_folder(model, root / "good", zero_translators(keys, model.d_model))
    missing = lens_folder(model, root / "missing", zero_translators(keys, model.d_model))
    (missing / "translators.safetensors").unlink()
    wide = {k: (torch.zeros(5, 5), torch.zeros(5)) for k in keys}
    shapes = lens_folder(model, root / "shapes", wide)
    return [
        (root / "nowhere", [], "no such lens folder"),
        (missing, [], "translators.safetensors: missing"),
        (shapes, [], "has shapes (5, 5)"),
        (good, ["--sites", "mlp_out"], "no translator for mlp_out at layer 0"),
        (good, ["--layers", "7"], "layer 7 is out of range"),
    ]


def test_bad_lens_folders_exit_2_with_one_line_and_write_nothing(tiny_dirs, models, tmp_path):
    model = models("qwen2")
    for number, (folder, extra, message) in enumerate(_bad_folders(model, tmp_path)):
        out = tmp_path / f"out{number}"
        args = ["entropy", "--model", tiny_dirs["qwen2"], "--data", tmp_path / "d.jsonl"]
        (tmp_path / "d.jsonl").write_text('{"prompt": "1+1?", "response": "2"}\n')
        result = _cli(*args, "--out", out, "--lens", "tuned", "--lens-path", folder, *extra)
        assert result.exit_code == 2, result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], lines
        assert not out.exists()


@pytest.mark.parametrize(
    "args,message",
    [
        (["--format", "tuned-lens", "--sites", "mlp_out"], "holds resid_pre[0] and resid_post"),
        (["--format", "pt"], "unknown lens format 'pt'"),
        (["--sites", "final"], "has no translator"),
    ],
)
def test_fit_lens_refuses_bad_settings_before_any_work(tiny_dirs, tmp_path, args, message):
    out = tmp_path / "lens"
    result = _cli("fit-lens", "--model", tiny_dirs["qwen2"], "--out", out, *args)
    assert result.exit_code == 2 and message in result.output
    assert len(result.output.strip().splitlines()) == 1 and not out.exists()


def _solved(n):
    """Bundled problems with their worked solutions as responses (no generation needed)."""
    path = bundled_data("arith_heldout.jsonl")
    raw = [json.loads(line) for line in open(path)][:n]
    records = read_records(path, max_samples=n)
    return [{**r, "response": x["extra_info"]["solution"]} for r, x in zip(records, raw)]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ipl-tiny-qwen2", "ipl-tiny-llama"])
def test_a_small_fit_beats_the_norm_lens_on_held_out_tokens(name, tmp_path):
    model = load_model(name, dtype="float32", device="cpu")
    cfg = FitLensConfig(model=name, out=str(tmp_path / "lens"), steps=40, heldout=0.25, seed=3)
    meta = fit_lens(model, _solved(80), cfg, progress=False)
    table = pd.DataFrame(meta["heldout"]["evaluation"])
    wide = table.pivot_table(index=["site", "layer"], columns="lens", values="kl_final_internal")
    assert len(wide) == model.n_layers + 1  # resid_pre[0] and resid_post[0..L-1]
    both_tiny = (wide["norm"] < 0.01) & (wide["tuned"] < 0.01)
    worse = wide[~both_tiny & ~(wide["tuned"] < wide["norm"])]
    assert worse.empty, f"tuned not below norm:\n{worse}"
    assert (~both_tiny).sum() >= model.n_layers  # the comparison is not vacuous


def test_resume_after_a_kill_equals_an_uninterrupted_fit(models, tmp_path):
    model = models("qwen3")
    records = [
        {
            "prompt": f"What is {i}+{i}?",
            "response": f"{i}+{i}={2 * i}. \\boxed{{{2 * i}}}",
            "sample_id": i,
        }
        for i in range(12)
    ]
    base = dict(steps=7, save_every=2, batch_tokens=64, sites=["resid_post", "mlp_out"])

    class Killed(Exception):
        pass

    def kill_at(step, kl):
        if step == 5:  # after the checkpoint of step 4
            raise Killed

    full = fit_lens(model, records, FitLensConfig(out=str(tmp_path / "a"), **base), progress=False)
    cfg = FitLensConfig(out=str(tmp_path / "b"), **base)
    with pytest.raises(Killed):
        fit_lens(model, records, cfg, progress=False, on_step=kill_at)
    assert json.loads((tmp_path / "b" / "checkpoint.json").read_text())["step"] == 4
    steps = []
    resumed = fit_lens(model, records, cfg, progress=False, on_step=lambda s, kl: steps.append(s))
    assert steps == [5, 6, 7]
    a, _ = read_lens(tmp_path / "a", model)
    b, _ = read_lens(tmp_path / "b", model)
    for key in a:
        torch.testing.assert_close(a[key][0], b[key][0], rtol=0, atol=1e-6)
        torch.testing.assert_close(a[key][1], b[key][1], rtol=0, atol=1e-6)
    pd.testing.assert_frame_equal(
        pd.DataFrame(resumed["heldout"]["evaluation"]),
        pd.DataFrame(full["heldout"]["evaluation"]),
        check_exact=False,
        atol=1e-6,
    )
    assert not (tmp_path / "b" / "checkpoint.json").exists()
    assert any(a[key][0].abs().max() > 1e-4 for key in a)  # the fit moved the translators


@pytest.mark.slow
def test_fit_and_eval_lens_commands(tiny_dirs, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"question": f"What is {i}+1?"}) + "\n" for i in range(8)))
    lens = tmp_path / "lens"
    common = ["--model", tiny_dirs["llama"], "--data", data, "--out", lens, "--quiet"]
    result = _cli("fit-lens", *common, "--steps", "3", "--max-new-tokens", "6", "--heldout", "0.25")
    assert result.exit_code == 0, result.output
    meta = json.loads((lens / "lens.json").read_text())
    assert len(meta["heldout"]["samples"]) == 2 and meta["data_sha256"]
    assert (lens / "responses.jsonl").is_file() and not (lens / "generation").exists()
    out = tmp_path / "eval"
    result = _cli("eval-lens", "--model", tiny_dirs["llama"], "--lens-path", lens, "--out", out)
    assert result.exit_code == 0, result.output
    table = pd.read_csv(out / "lens_eval.csv")
    assert list(table.columns) == [
        "layer",
        "site",
        "lens",
        "kl_final_internal",
        "next_token_ce",
        "top1_agrees",
    ]
    assert set(table["lens"]) == {"raw", "norm", "tuned"}
    assert len(table) == 3 * 4  # resid_pre[0], resid_post[0..2]
    assert (out / "lens_eval.png").is_file() and (out / "lens_eval.pdf").is_file()
    last = table[(table.site == "resid_post") & (table.layer == 2) & (table.lens == "norm")]
    assert last["kl_final_internal"].abs().max() < 1e-5  # the norm lens's last layer is the output
    run = tmp_path / "run"
    args = ["entropy", "--model", tiny_dirs["llama"], "--data", lens / "responses.jsonl"]
    result = _cli(
        *args,
        "--out",
        run,
        "--lens",
        "tuned",
        "--lens-path",
        lens,
        "--sites",
        "resid_pre,resid_post,final",
        "--quiet",
    )
    assert result.exit_code == 0, result.output
    info = json.loads((run / "run.json").read_text())
    assert info["config"]["lens"] == "tuned" and len(info["lens"]["sha256"]) == 64


def test_zero_steps_write_identity_translators_and_lens_path_needs_tuned(models, tmp_path):
    model = models("qwen2")
    records = [{"prompt": f"{i}+1?", "response": f"{i + 1}", "sample_id": i} for i in range(4)]
    cfg = FitLensConfig(out=str(tmp_path / "lens"), steps=0, sites=["mlp_out"])
    meta = fit_lens(model, records, cfg, progress=False)
    assert meta["translators"] == [f"mlp_out.{i}" for i in range(model.n_layers)]
    translators, _ = read_lens(tmp_path / "lens", model)
    assert all(not a.any() and not b.any() for a, b in translators.values())
    evaluation = pd.DataFrame(meta["heldout"]["evaluation"])
    kl = evaluation.pivot_table(index="layer", columns="lens", values="kl_final_internal")
    np.testing.assert_allclose(kl["tuned"], kl["norm"], atol=1e-6)
    with pytest.raises(ValueError, match="goes with the tuned lens"):
        entropy_table(model, TEXTS, lens="norm", lens_path=tmp_path / "lens")


def test_fit_in_the_tuned_lens_format_reads_back(models, tmp_path):
    model = models("llama")
    records = [{"prompt": f"{i}*2?", "response": f"{2 * i}", "sample_id": i} for i in range(6)]
    cfg = FitLensConfig(out=str(tmp_path / "tl"), steps=3, format="tuned-lens", batch_tokens=16)
    meta = fit_lens(model, records, cfg, progress=False)
    assert meta["format"] == "tuned-lens"
    assert {"config.json", "params.pt"} <= {p.name for p in (tmp_path / "tl").iterdir()}
    translators, _ = read_lens(tmp_path / "tl", model)
    assert translators["resid_pre", 0][0].abs().max() > 0  # trained, and read back
    table = entropy_table(model, TEXTS, lens="tuned", lens_path=tmp_path / "tl", sites="resid_post")
    assert table["entropy"].notna().all()
