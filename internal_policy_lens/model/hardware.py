"""What the hardware runs well: native half products, and the Triton kernels.

The reductions' dispatcher (:mod:`~internal_policy_lens.lens.reduce.dispatch`) and the lens's
precision (:func:`~internal_policy_lens.lens.unembed.choose_precision`) ask here.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import time
from pathlib import Path

import torch


def half_support(device: torch.device, dtype: torch.dtype, d_model: int = 1024) -> tuple[bool, str]:
    """Whether ``device`` multiplies ``dtype`` (bf16/fp16) matrices natively, and how it is known.

    CUDA: ``torch.cuda.is_bf16_supported()`` for bf16, always for fp16. CPU: the ATen kernels'
    capability (``torch.backends.cpu.get_cpu_capability()``, lowered by ``ATEN_CPU_CAPABILITY``)
    and the ``/proc/cpuinfo`` flags (``avx512_bf16``/``amx_bf16``, ``avx512_fp16``/``amx_fp16``);
    where these do not decide (another architecture, ``ONEDNN_MAX_CPU_ISA`` set), a one-time
    micro-benchmark of an unembedding-shaped product, cached per device for the process.
    """
    if device.type == "cuda":
        if dtype == torch.float16 or torch.cuda.is_bf16_supported():
            return True, f"CUDA runs {_name(dtype)} natively"
        return False, f"this CUDA device has no native {_name(dtype)}"
    if device.type != "cpu":
        return True, f"{device.type} device: {_name(dtype)} products assumed native"
    capability = cpu_capability()
    flags = cpu_flags()
    wanted = {
        torch.bfloat16: ("avx512_bf16", "amx_bf16"),
        torch.float16: ("avx512_fp16", "amx_fp16"),
    }
    has = sorted(set(wanted[dtype]) & flags)
    lowered = os.environ.get("ONEDNN_MAX_CPU_ISA")  # oneDNN runs the half products
    if has and capability.startswith("AVX512") and not lowered:
        return True, f"CPU {capability} with {'/'.join(has)}"
    if not has and "avx2" in flags:
        return False, f"CPU {capability} without {' or '.join(wanted[dtype])}"
    return _measured_half(str(device), dtype, d_model)  # another architecture, or lowered kernels


def cpu_capability() -> str:
    """The CPU kernels ATen runs (``AVX512``, ``AVX2``, ``DEFAULT``, ...)."""
    return torch.backends.cpu.get_cpu_capability()


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags of ``/proc/cpuinfo`` (empty where it cannot be read)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


@functools.cache
def _measured_half(device: str, dtype: torch.dtype, d_model: int) -> tuple[bool, str]:
    # A product of the unembedding's width against a slice of a vocabulary, in both dtypes.
    times = {}
    with torch.no_grad():
        for kind in (torch.float32, dtype):
            x = torch.randn(64, d_model, device=device).to(kind)
            w = torch.randn(8192, d_model, device=device).to(kind)
            torch.mm(x, w.t())  # warm-up
            start = time.perf_counter()
            for _ in range(3):
                torch.mm(x, w.t())
            times[kind] = time.perf_counter() - start
    ratio = times[torch.float32] / times[dtype]
    where = f"{device} ({cpu_capability()})"
    return ratio > 1.2, f"measured on {where}: {_name(dtype)} products {ratio:.1f}x float32's speed"


def triton_support(device: torch.device) -> tuple[bool, str]:
    """Whether the Triton reduction kernel runs on ``device``, and why not where it does not.

    It runs on CUDA devices where ``triton`` is installed (it ships with CUDA builds of torch);
    on the CPU only under Triton's interpreter (``TRITON_INTERPRET=1``), which is for tests.
    """
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed"
    if device.type == "cuda":
        return True, "CUDA device with Triton"
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return True, "CPU under Triton's interpreter (TRITON_INTERPRET=1)"
    return False, f"Triton kernels need a CUDA device (this is {device.type})"


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
