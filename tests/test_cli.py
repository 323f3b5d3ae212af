"""The command line itself: help text, defaults, validation before writing, messages."""

import json
import os
import shutil
import subprocess
import sys
from dataclasses import fields

import click
import pytest
import torch
from helpers import write_problems
from typer.main import get_command
from typer.testing import CliRunner

from internal_policy_lens.bundled import bundled_data, bundled_model_path
from internal_policy_lens.cli import app
from internal_policy_lens.config import (
    BupoConfig,
    ConvergenceConfig,
    EntropyConfig,
    EvalConfig,
    EvalLensConfig,
    FitLensConfig,
    GenerationConfig,
    ReportConfig,
)

runner = CliRunner()
# The config whose fields a command's options set (their defaults live there).
CONFIGS = {
    "entropy": (EntropyConfig, GenerationConfig),
    "train-bupo": (BupoConfig,),
    "eval": (EvalConfig,),
    "plot": (ConvergenceConfig,),
    "compare": (ConvergenceConfig,),
    "suggest-layer": (ConvergenceConfig,),
    "report": (ReportConfig, ConvergenceConfig),
    "fit-lens": (FitLensConfig, GenerationConfig),
    "eval-lens": (EvalLensConfig,),
}


def _commands():
    return get_command(app).commands


def test_every_option_has_help_and_shows_its_default():
    missing, undocumented = [], []
    for name, command in _commands().items():
        help_text = runner.invoke(app, [name, "--help"]).output
        defaults = {}
        for cls in CONFIGS.get(name, ()):
            for f in fields(cls):
                if f.default is not None:
                    defaults.setdefault(f.name, f.default)
        for param in command.params:
            if not isinstance(param, click.Option) or param.name == "help":
                continue
            if not param.help:
                undocumented.append(f"{name} {param.opts[0]}")
            has_default = param.default not in (None, ()) or param.name in defaults
            if has_default and "[default:" not in param.help + _shown(param):
                missing.append(f"{name} {param.opts[0]}")
        assert "Usage:" in help_text
    assert undocumented == []
    assert missing == []


def _shown(param) -> str:
    # click adds "[default: ...]" itself for options whose default is not None
    return "[default:" if param.default not in (None, ()) and param.show_default else ""


def test_help_keeps_square_brackets():
    plot = " ".join(runner.invoke(app, ["plot", "--help"]).output.split())  # wrapping aside
    assert "Sample id of the token heatmap [default: the smallest]." in plot
    bupo = runner.invoke(app, ["train-bupo", "--help"]).output
    assert "[trl] extra" in bupo
    assert "Prompts per step.  [default: 16]" in bupo


def test_eval_default_data_is_the_held_out_set(monkeypatch):
    from internal_policy_lens.train import evaluate

    seen = []

    def spy(cfg, **kwargs):
        seen.append(cfg)
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluate, "evaluate", spy)
    result = runner.invoke(app, ["eval", "--device", "cpu", "--dtype", "float32"])
    assert result.exit_code == 130
    assert seen[0].data == str(bundled_data("arith_heldout.jsonl"))
    assert (seen[0].device, seen[0].dtype) == ("cpu", "float32")


def test_train_and_eval_take_device_and_dtype(tiny_dirs, tmp_path, monkeypatch):
    from internal_policy_lens.train import evaluate, loop

    seen = []
    original = loop.load_model

    def spy(name, **kwargs):
        seen.append(kwargs)
        return original(name, **kwargs)

    monkeypatch.setattr(loop, "load_model", spy)
    monkeypatch.setattr(evaluate, "load_model", spy)
    data = write_problems(tmp_path / "p.jsonl", 4)
    args = ["train-bupo", "--model", str(tiny_dirs["qwen2"]), "--data", str(data)]
    args += ["--out", str(tmp_path / "run"), "--layer", "1", "--steps", "1", "--group-size", "2"]
    args += ["--prompts-per-step", "2", "--mini-batch-size", "4", "--max-new-tokens", "4"]
    args += ["--device", "cpu", "--dtype", "float64", "--quiet"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert (seen[0]["device"], seen[0]["dtype"]) == ("cpu", "float64")
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (saved["device"], saved["dtype"]) == ("cpu", "float64")
    args = ["eval", "--model", str(tiny_dirs["qwen2"]), "--data", str(data), "--samples", "1"]
    args += ["--out", str(tmp_path / "eval"), "--max-new-tokens", "4", "--dtype", "float64"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert seen[-1]["dtype"] == "float64"


def test_every_option_is_checked_before_anything_is_written(tiny_dirs, tmp_path, monkeypatch):
    from internal_policy_lens.commands import entropy

    loads = []
    monkeypatch.setattr(entropy, "load_model", lambda *a, **k: loads.append(a))
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"problem": "2+3?", "response": "5"}) + "\n")
    base = ["entropy", "--model", str(tiny_dirs["qwen2"]), "--data", str(data), "--quiet"]
    for extra, message in [
        (["--lens", "bogus"], "unknown lens 'bogus'; use one of raw, norm"),
        (["--precision", "half"], "unknown precision 'half'"),
        (["--sites", "mlp"], "unknown site(s) mlp"),
        (["--layers", "5-3"], "layer range '5-3' is empty: write it low-high, e.g. '3-5'"),
        (["--layers", "a"], "cannot read layer 'a'"),
        (["--shard", "2/2"], "--shard '2/2': need 0 <= i < n"),
    ]:
        out = tmp_path / "run"
        result = runner.invoke(app, [*base, "--out", str(out), *extra])
        assert result.exit_code == 2, (extra, result.output)
        assert message in result.output
        assert not out.exists()
    assert loads == []  # refused before the model was even loaded


@pytest.mark.parametrize("command", ["entropy", "train-bupo"])
def test_an_out_inside_the_model_folder_is_refused(tiny_dirs, tmp_path, command):
    model = tmp_path / "model"  # a copy: a command that wrongly ran would write into it
    shutil.copytree(tiny_dirs["qwen2"], model)
    data = write_problems(tmp_path / "d.jsonl", 2)
    out = model / "runs" / "a"
    args = [command, "--model", str(model), "--data", str(data), "--out", str(out), "--quiet"]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert result.output.strip() == (
        f"error: {out}: inside the model's folder {model} (results would mix with the weights); "
        "choose an --out outside it"
    )
    assert not (model / "runs").exists()


def test_an_out_inside_a_bundled_model_is_refused():
    from internal_policy_lens.model.files import ModelFileError, check_out_outside_model

    folder = bundled_model_path("ipl-tiny-llama")
    with pytest.raises(ModelFileError, match="inside the model's folder"):
        check_out_outside_model(folder / "tuned-lens" / "run", "ipl-tiny-llama")
    check_out_outside_model(folder.parent / "run", "ipl-tiny-llama")  # beside it is fine


def test_ctrl_c_says_what_was_kept(monkeypatch, tmp_path):
    from internal_policy_lens.commands import entropy

    def interrupted(cfg, progress):
        raise KeyboardInterrupt

    monkeypatch.setattr(entropy, "run_entropy", interrupted)
    result = runner.invoke(app, ["entropy", "--out", str(tmp_path / "x"), "--quiet"])
    assert result.exit_code == 130
    assert "interrupted; finished batches are kept" in result.output
    assert "rerun the same command to resume" in result.output


def _entropy_subprocess(args, env_extra=None):
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_DISABLE_PROGRESS_BARS"}
    env.update(OMP_NUM_THREADS="1", **(env_extra or {}))
    code = "from internal_policy_lens.cli import app; app()"
    command = [sys.executable, "-c", code, "entropy", *map(str, args)]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_messages_of_a_run(tiny_dirs, tmp_path):
    data = tmp_path / "d.jsonl"
    rows = [{"problem": f"Compute {a}*7.", "response": f"{a}*7 = {a * 7}."} for a in (2, 3, 4)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = ["--model", tiny_dirs["qwen2"], "--data", data, "--max-length", "20", "--all-tokens"]
    quiet = _entropy_subprocess([*common, "--out", tmp_path / "a", "--quiet"])
    assert quiet.returncode == 0, quiet.stderr
    # The truncation warning is one plain line, without a Python source line.
    lines = [x for x in quiet.stderr.splitlines() if "longer than 20 tokens" in x]
    assert lines == [
        "warning: 3 of 3 sequences are longer than 20 tokens and were truncated to it (the tail "
        "of their response is not analysed)"
    ]
    assert "warnings.warn" not in quiet.stderr and "UserWarning" not in quiet.stderr
    assert "Loading weights" not in quiet.stderr  # --quiet hides transformers' bar too
    # The summary names the figures written and those skipped, with why.
    assert "Figures in " in quiet.stdout and "entropy_flow" in quiet.stdout
    assert "Skipped figure next_token: " in quiet.stdout and "--extras" in quiet.stdout
    loud = _entropy_subprocess([*common, "--out", tmp_path / "b"])
    assert "Loading weights" in loud.stderr  # the check above can fail
    # A rerun of an unfinished run says that it resumes.
    info = json.loads((tmp_path / "a" / "run.json").read_text())
    info["status"] = "running"
    (tmp_path / "a" / "run.json").write_text(json.dumps(info))
    again = _entropy_subprocess([*common, "--out", tmp_path / "a", "--quiet"])
    assert again.returncode == 0, again.stderr
    assert f"resuming the unfinished run in {tmp_path / 'a'}/" in again.stderr


def test_model_call_and_run_with_cache_match_transformers(tiny_dirs, models):
    from reference import hf_model

    from internal_policy_lens import capture, run_with_cache

    model = models("llama")
    texts = ["Start with 3. Add 4.", "x"]
    logits = model(texts)  # right-padded batch
    reference = hf_model(tiny_dirs["llama"], dtype=torch.float32)
    for row, text in enumerate(texts):
        ids = torch.tensor([model.tokenizer(text)["input_ids"]])
        with torch.no_grad():
            expected = reference(ids).logits[0]
        torch.testing.assert_close(logits[row, : ids.shape[1]], expected, atol=1e-5, rtol=0)
    again, cache = run_with_cache(model, texts, sites=["mlp_out", "final"], layers=[1])
    torch.testing.assert_close(again, logits.detach(), atol=1e-6, rtol=0)
    assert sorted(cache) == [("final", model.n_layers - 1), ("mlp_out", 1)]
    ids, mask = model.to_tokens(texts)
    with torch.no_grad(), capture(model, ["mlp_out"], [1]) as acts:
        model.forward(ids, mask)
    torch.testing.assert_close(cache["mlp_out", 1], acts["mlp_out", 1], atol=0, rtol=0)
