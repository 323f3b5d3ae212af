"""Which device a run asks for, checked before anything is read or loaded.

A device this machine cannot run would otherwise surface as a long traceback from deep inside
torch ("Torch not compiled with CUDA enabled") after the data was read and the model loaded.
"""

from __future__ import annotations

import contextlib

import torch

CUDA_INDEX = "https://download.pytorch.org/whl/cu130"
"""Where CUDA builds of torch come from (the error for a CPU-only build names it)."""


class DeviceError(ValueError):
    """A ``--device`` this machine or this torch build cannot run; the message says why."""


def available_devices() -> list[str]:
    """The devices this machine can run, as ``--device`` takes them (``auto`` first)."""
    found = ["auto", "cpu"]
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        found += ["cuda"] + [f"cuda:{i}" for i in range(count)]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        found.append("mps")
    return found


def check_device(device: str) -> str:
    """``device`` resolved (``auto``: CUDA when available, else the CPU) and known to work here.

    Raises:
        DeviceError: for an unknown device, a device type this torch build or machine lacks, or
            an index beyond the devices present; the message lists what is available.
    """
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise DeviceError(_message(device, "is not a device")) from None
    if parsed.type == "cpu":
        return device
    if parsed.type == "cuda":
        _check_cuda(device, parsed)
        return device
    backend = getattr(torch.backends, parsed.type, None) or getattr(torch, parsed.type, None)
    if backend is None or not backend.is_available():
        raise DeviceError(_message(device, f"is not available in torch {torch.__version__} here"))
    if parsed.index not in (None, 0):
        raise DeviceError(_message(device, "is beyond the devices present"))
    return device


def _check_cuda(device: str, parsed: torch.device) -> None:
    if torch.version.cuda is None:
        raise DeviceError(
            _message(device, f"needs a CUDA build of torch, and torch {torch.__version__} is not")
            + "; for one, in a fresh environment: "
            f"make setup TORCH=torch=={torch.__version__.split('+')[0]} TORCH_INDEX={CUDA_INDEX}"
        )
    if not torch.cuda.is_available():
        raise DeviceError(
            _message(device, f"finds no GPU (torch {torch.__version__}, CUDA {torch.version.cuda})")
            + "; check nvidia-smi and CUDA_VISIBLE_DEVICES"
        )
    count = torch.cuda.device_count()
    if parsed.index is not None and parsed.index >= count:
        raise DeviceError(_message(device, f"is beyond the {count} CUDA GPU(s) torch sees"))


def _message(device: str, why: str) -> str:
    return f"--device '{device}' {why}; available: {', '.join(available_devices())}"


@contextlib.contextmanager
def exact_kernels(enabled: bool = True):
    """IEEE float32 matrix products and the math attention kernel inside the block, if enabled.

    On CUDA, float32 products may run as TF32 and scaled-dot-product attention picks fused
    kernels whose float32 rounding differs from the plain computation; exact precision promises
    float64 within 1e-4 nats, so its forward runs neither. The settings are as they were after
    the block. Callers enable it for exact precision on CUDA only: on the CPU the math kernel is
    slower than the fused one and no faster product is in play.
    """
    if not enabled:
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    matmul = torch.backends.cuda.matmul
    name = "fp32_precision" if hasattr(matmul, "fp32_precision") else "allow_tf32"
    before = getattr(matmul, name)
    setattr(matmul, name, "ieee" if name == "fp32_precision" else False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        setattr(matmul, name, before)
