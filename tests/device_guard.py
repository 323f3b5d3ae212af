"""A CPU-only guard against device mixing: the default device is ``meta`` inside the block.

On a GPU the crash to prevent is a tensor made on the CPU (``torch.tensor(...)``, ``torch.zeros``,
``torch.arange`` without ``device=``) meeting the model's CUDA tensors. Here the model and its
data stay on the CPU while every tensor created without a device lands on ``meta`` instead, so
the first operation mixing the two raises, as CUDA would. What it cannot see: explicit
``device="cpu"`` or ``.cpu()`` copies (no-ops here), tensors from numpy (always CPU), and
anything that only goes wrong on CUDA kernels; the ``cuda`` tests cover those on a GPU.
"""

import contextlib

import torch

MIXED = "meta"  # the words of torch's errors when a meta tensor meets a CPU one


@contextlib.contextmanager
def stray_tensors_elsewhere():
    """Tensors created without a device go to ``meta`` in the block (thread-local, undone after)."""
    with torch.device("meta"):
        yield
