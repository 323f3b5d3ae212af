"""Options and model files are checked before the model loads; every such error is one line."""

import json
import shutil

import pytest
from typer.testing import CliRunner

from internal_policy_lens.cli import app

runner = CliRunner()


def _cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def _one_error_line(result, *words):
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize(
    "args, option",
    [
        (["entropy", "--topk", "-1"], "--topk"),
        (["entropy", "--max-samples", "0"], "--max-samples"),
        (["train-bupo", "--steps", "0"], "--steps"),
        (["eval", "--max-samples", "0"], "--max-samples"),
        (["fit-lens", "--steps", "-2"], "--steps"),
    ],
)
def test_value_errors_are_one_line(args, option):
    line = _one_error_line(_cli(*args), option, f"ipl {args[0]} --help")
    assert "Usage:" not in line


@pytest.fixture
def broken(tiny_dirs, tmp_path):
    """A copy of a tiny model whose weights file was cut in half (an interrupted copy)."""
    folder = shutil.copytree(tiny_dirs["qwen2"], tmp_path / "broken")
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    return folder


def test_options_are_checked_before_the_model_loads(broken, tmp_path):
    # The weights cannot load: each error below proves its check ran before loading.
    out = tmp_path / "out"
    common = ["--model", broken, "--out", out]
    _one_error_line(_cli("entropy", *common, "--layers", "0-99"), "layer 3 is out of range")
    _one_error_line(_cli("train-bupo", *common, "--layer", "99"), "--layer 99 is out of range")
    missing = tmp_path / "no-lens"
    _one_error_line(
        _cli("entropy", *common, "--lens", "tuned", "--lens-path", missing),
        f"{missing}: no such lens folder",
    )
    _one_error_line(
        _cli("eval-lens", *common, "--lens-path", missing), f"{missing}: no such lens folder"
    )
    assert not out.exists()


def test_corrupt_model_files_are_one_line(broken, tmp_path):
    out = tmp_path / "out"
    common = ["entropy", "--model", broken, "--out", out]
    weights = broken / "model.safetensors"
    _one_error_line(_cli(*common), f"{weights}: the weights file is corrupt or truncated")
    weights.write_bytes(b"")
    _one_error_line(_cli(*common), f"{weights}: the weights file is corrupt or truncated")
    config = broken / "config.json"
    good = json.loads(config.read_text())
    config.write_text(config.read_text()[:40])  # cut mid-file
    _one_error_line(_cli(*common), f"{config}: not a valid JSON file")
    config.write_text(json.dumps({k: v for k, v in good.items() if k != "architectures"}))
    _one_error_line(_cli(*common), f"{config}: does not name its architectures")
    assert not out.exists()
