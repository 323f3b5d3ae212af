"""--device is checked before anything is read or loaded: one line, exit 2, what is available."""

import pytest
import torch
from typer.testing import CliRunner

from internal_policy_lens import load_model
from internal_policy_lens.cli import app
from internal_policy_lens.model.device import (
    DeviceError,
    available_devices,
    check_device,
    exact_kernels,
)

runner = CliRunner()
# Every command that takes --device; paths that do not exist, so that an error about them
# (rather than about the device) would mean something was read first.
COMMANDS = {
    "entropy": ["entropy", "--data", "missing.jsonl", "--model", "./missing-model"],
    "fit-lens": ["fit-lens", "--data", "missing.jsonl", "--model", "./missing-model"],
    "eval-lens": ["eval-lens", "--data", "missing.jsonl", "--model", "./missing-model"],
    "eval": ["eval", "--data", "missing.jsonl", "--model", "./missing-model"],
    "train-bupo": ["train-bupo", "--data", "missing.jsonl", "--model", "./missing-model"],
    "train-bupo-trl": ["train-bupo", "--engine", "trl", "--data", "missing.jsonl"],
}


@pytest.fixture
def two_gpus(monkeypatch):
    """torch as it looks on a CUDA build with two GPUs (nothing runs on them)."""
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


def _error(args, tmp_path, monkeypatch) -> str:
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --device "), result.output
    assert not (tmp_path / "out").exists()
    return lines[0]


@pytest.mark.parametrize("command", list(COMMANDS))
def test_unknown_device(command, tmp_path, monkeypatch):
    line = _error([*COMMANDS[command], "--device", "bogus"], tmp_path, monkeypatch)
    assert line == "error: --device 'bogus' is not a device; available: auto, cpu"


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.skipif(torch.version.cuda is not None, reason="needs a CPU-only build of torch")
def test_cuda_on_a_cpu_build_says_how_to_get_one(command, tmp_path, monkeypatch):
    line = _error([*COMMANDS[command], "--device", "cuda"], tmp_path, monkeypatch)
    version = torch.__version__
    assert line == (
        f"error: --device 'cuda' needs a CUDA build of torch, and torch {version} is not; "
        "available: auto, cpu; for one, in a fresh environment: make setup "
        f"TORCH=torch=={version.split('+')[0]} "
        "TORCH_INDEX=https://download.pytorch.org/whl/cu130"
    )


@pytest.mark.parametrize("command", ["entropy", "train-bupo", "eval"])
def test_mps_where_torch_has_none(command, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    line = _error([*COMMANDS[command], "--device", "mps"], tmp_path, monkeypatch)
    assert line.startswith(f"error: --device 'mps' is not available in torch {torch.__version__}")
    assert line.endswith("; available: auto, cpu")


@pytest.mark.parametrize("command", list(COMMANDS))
def test_cuda_index_beyond_the_gpus(command, tmp_path, monkeypatch, two_gpus):
    line = _error([*COMMANDS[command], "--device", "cuda:2"], tmp_path, monkeypatch)
    assert line == (
        "error: --device 'cuda:2' is beyond the 2 CUDA GPU(s) torch sees; "
        "available: auto, cpu, cuda, cuda:0, cuda:1"
    )


def test_cuda_build_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceError) as err:
        check_device("cuda:0")
    assert str(err.value) == (
        f"--device 'cuda:0' finds no GPU (torch {torch.__version__}, CUDA 13.0); "
        "available: auto, cpu; check nvidia-smi and CUDA_VISIBLE_DEVICES"
    )


def test_devices_that_exist_pass(two_gpus):
    assert check_device("cpu") == "cpu"
    assert check_device("auto") == "cuda"
    assert [check_device(d) for d in ("cuda", "cuda:0", "cuda:1")] == ["cuda", "cuda:0", "cuda:1"]
    assert available_devices() == ["auto", "cpu", "cuda", "cuda:0", "cuda:1"]


def test_auto_is_the_cpu_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert check_device("auto") == "cpu"


def test_load_model_checks_the_device_before_reading_the_model(tmp_path):
    with pytest.raises(DeviceError, match="'bogus' is not a device"):
        load_model(tmp_path / "no-such-model", device="bogus")


def test_trl_engine_names_how_to_pick_another_gpu(tmp_path, monkeypatch, two_gpus):
    monkeypatch.chdir(tmp_path)
    args = ["train-bupo", "--engine", "trl", "--device", "cuda:1", "--out", str(tmp_path / "o")]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert result.output.strip() == (
        "error: --engine trl runs on the GPU that accelerate picks, not --device cuda:1; "
        "choose it with CUDA_VISIBLE_DEVICES=1 and --device cuda"
    )
    assert not (tmp_path / "o").exists()


def test_exact_kernels_restore_what_they_change():
    matmul = torch.backends.cuda.matmul
    name = "fp32_precision" if hasattr(matmul, "fp32_precision") else "allow_tf32"
    before = getattr(matmul, name)
    setattr(matmul, name, "tf32" if name == "fp32_precision" else True)
    try:
        with exact_kernels():
            assert getattr(matmul, name) == ("ieee" if name == "fp32_precision" else False)
            assert torch.backends.cuda.math_sdp_enabled()
            assert not torch.backends.cuda.flash_sdp_enabled()
            assert not torch.backends.cuda.mem_efficient_sdp_enabled()
        assert getattr(matmul, name) == ("tf32" if name == "fp32_precision" else True)
        assert torch.backends.cuda.flash_sdp_enabled()
        with pytest.raises(KeyError), exact_kernels():
            raise KeyError("the block failed")
        assert getattr(matmul, name) == ("tf32" if name == "fp32_precision" else True)
        assert torch.backends.cuda.flash_sdp_enabled()
        with exact_kernels(False):
            assert getattr(matmul, name) == ("tf32" if name == "fp32_precision" else True)
            assert torch.backends.cuda.flash_sdp_enabled()
    finally:
        setattr(matmul, name, before)
