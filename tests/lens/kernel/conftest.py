"""The Triton kernel's tests run on a GPU, or on the CPU under Triton's interpreter.

``TRITON_INTERPRET`` must be set before Triton's first import (``triton.jit`` reads it when it
wraps a function, Triton's own library functions included), so tests/conftest.py sets it where
torch sees no CUDA GPU. On a GPU machine the kernel is compiled and only the ``cuda`` cases run.
"""

import os

import pytest

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICES = [
    pytest.param(
        "cpu",
        marks=pytest.mark.skipif(
            not INTERPRETED, reason="the CPU runs the kernel only under TRITON_INTERPRET=1"
        ),
    ),
    pytest.param("cuda", marks=pytest.mark.cuda),
]


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture(scope="session")
def model_on(tiny_dirs, family_dirs):
    """``(name, device) -> (model, folder)``: a tiny float32 model of any test family."""
    from internal_policy_lens import load_model

    cache = {}

    def get(name, device):
        if (name, device) not in cache:
            folder = tiny_dirs[name] if name in tiny_dirs else family_dirs(name)
            model = load_model(folder, dtype="float32", device=device)
            cache[name, device] = (model, folder)
        return cache[name, device]

    return get
