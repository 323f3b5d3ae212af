import json

import pandas as pd
import pytest
import torch
from helpers import (
    PROBE_QUANTITIES,
    alternating_reward,
    assert_probes_follow_the_weights,
    assert_resumed_probes_match,
    tiny_bupo_config,
)

from internal_policy_lens.train import probes
from internal_policy_lens.train.loop import train_bupo
from internal_policy_lens.train.probes import PROBE_COLUMNS

TRAINING = dict(steps=4, save_every=2, iterative_steps=2)


def _train(tiny_dirs, data_file, out, **kw):
    cfg = tiny_bupo_config(tiny_dirs, data_file, out, **{**TRAINING, **kw})
    return train_bupo(cfg, progress=False, reward=alternating_reward())


def _metrics(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def probed(tiny_dirs, tmp_path_factory):
    from helpers import write_problems

    root = tmp_path_factory.mktemp("probed")
    data = write_problems(root / "train.jsonl", 12)
    torch.manual_seed(0)
    run = _train(tiny_dirs, data, root / "run", probe_every=2, probe_samples=3)
    return run, data


def test_probes_equal_independent_computations_on_the_checkpoints(probed, tiny_dirs):
    run, _ = probed
    table = pd.read_parquet(run / "probes.parquet")
    assert list(table.columns) == list(PROBE_COLUMNS)
    assert sorted(table["step"].unique()) == [0, 2, 4]
    assert set(table["quantity"]) == PROBE_QUANTITIES
    records = [json.loads(x) for x in (run / "probe_set.jsonl").read_text().splitlines()]
    assert len(records) == 3 and all(r["response"] for r in records)
    k = json.loads((run / "config.json").read_text())["layer"]
    probed = {0: tiny_dirs["qwen2"], 2: run / "checkpoints/step-2", 4: run / "checkpoints/step-4"}
    assert_probes_follow_the_weights(table, probed, records, k)


def test_probing_changes_nothing_in_training(probed, tiny_dirs):
    from safetensors.torch import load_file

    run, data = probed
    plain = _train(tiny_dirs, data, run.parent / "plain")
    assert not (plain / "probes.parquet").exists()
    timing = {"rollout_time", "update_time", "probe_time"}
    a, b = _metrics(run), _metrics(plain)
    assert [m["step"] for m in a] == [m["step"] for m in b] == [0, 1, 2, 3]
    assert [("probe_time" in m) for m in a] == [True, False, True, False]
    assert all(m["probe_time"] > 0 for m in a if "probe_time" in m)
    for x, y in zip(a, b):
        assert x.keys() - timing == y.keys() - timing
        for key in x.keys() - timing:
            if isinstance(x[key], float):
                assert x[key] == pytest.approx(y[key], rel=1e-6, abs=1e-6), key
            else:
                assert x[key] == y[key], key
    for step in (2, 4):
        w1 = load_file(run / f"checkpoints/step-{step}/model.safetensors")
        w2 = load_file(plain / f"checkpoints/step-{step}/model.safetensors")
        assert w1.keys() == w2.keys()
        for name in w1:
            torch.testing.assert_close(w1[name], w2[name], atol=1e-6, rtol=0)


def test_every_probe_reads_the_same_probe_set(tiny_dirs, data_file, tmp_path, monkeypatch):
    seen, original = [], probes.probe_rows

    def spy(model, records, layer, settings):
        seen.append(json.dumps(records, sort_keys=True))
        return original(model, records, layer, settings)

    monkeypatch.setattr(probes, "probe_rows", spy)
    run = _train(tiny_dirs, data_file, tmp_path / "run", steps=2, probe_every=1, probe_samples=2)
    assert len(seen) == 3 and len(set(seen)) == 1  # steps 0, 1, 2
    on_disk = [json.loads(x) for x in (run / "probe_set.jsonl").read_text().splitlines()]
    assert json.dumps(on_disk, sort_keys=True) == seen[0]
    assert [r["sample_id"] for r in on_disk] == ["probe-0", "probe-1"]


def test_resume_keeps_one_probe_per_step(tiny_dirs, data_file, tmp_path, monkeypatch):
    from internal_policy_lens.train import loop

    kw = dict(probe_every=1, probe_samples=2)
    full = _train(tiny_dirs, data_file, tmp_path / "full", **kw)
    calls, original = {"n": 0}, loop.append_metrics

    def crash(out, metrics):
        original(out, metrics)
        calls["n"] += 1
        if calls["n"] == 3:  # killed after step 2 (0-based), after its probe; last checkpoint: 2
            raise KeyboardInterrupt

    monkeypatch.setattr(loop, "append_metrics", crash)
    with pytest.raises(KeyboardInterrupt):
        _train(tiny_dirs, data_file, tmp_path / "cut", **kw)
    monkeypatch.setattr(loop, "append_metrics", original)
    cut = pd.read_parquet(tmp_path / "cut" / "probes.parquet")
    assert sorted(cut["step"].unique()) == [0, 1, 2]
    resumed = _train(tiny_dirs, data_file, tmp_path / "cut", resume=True, **kw)
    a, b = (pd.read_parquet(r / "probes.parquet") for r in (full, resumed))
    assert_resumed_probes_match(a, b, [0, 1, 2, 3, 4])
    assert [("probe_time" in m) for m in _metrics(resumed)] == [True] * 4


def test_plot_train_draws_the_probes(probed, tmp_path):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from typer.testing import CliRunner

    from internal_policy_lens.analysis.plots import probe_panels
    from internal_policy_lens.cli import app
    from internal_policy_lens.train.folder import read_probes

    run, _ = probed
    table, k = read_probes(run)
    assert k == 1
    fig = probe_panels({"a": table, "b": table}, {"a": k, "b": k})
    FigureCanvasAgg(fig).draw()
    cos_ax, ffn_ax, _, kl_ax, heat_ax = fig.axes[:5]
    # panel (a): one line per later layer j, its values the probes'
    cos = table[table.quantity == "cos_hidden"]
    assert len(cos_ax.lines) == cos["other_layer"].nunique() == 1  # 3 layers, k = 1: j = 2
    line = cos.sort_values("step")
    assert list(cos_ax.lines[0].get_ydata()) == pytest.approx(line["value"].tolist())
    ffn = table[(table.quantity == "delta_ffn") & (table.layer == k)].sort_values("step")
    assert list(ffn_ax.lines[0].get_ydata()) == pytest.approx(ffn["value"].tolist())
    assert len(kl_ax.lines) == 1
    heat = table[table.quantity == "entropy_resid_post"]
    assert heat_ax.images[0].get_array().shape == (heat.layer.nunique(), heat.step.nunique())
    with pytest.raises(ValueError, match="the probes have no perplexity"):
        probe_panels({"c": table[table.quantity != "perplexity"]}, {"c": k})
    result = CliRunner().invoke(app, ["plot-train", str(run), "--out", str(tmp_path / "f")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "f/probes.png").stat().st_size > 10_000
    assert "1 of 1 runs probed" in result.output
