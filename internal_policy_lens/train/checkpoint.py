"""Checkpoints: a transformers folder plus the optimiser, scheduler and RNG state beside it."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..folders import FolderError, kill_point
from ..model.load import PolicyModel, save_model

STATE = "trainer_state.pt"


def save_checkpoint(folder: Path, model: PolicyModel, opt, sched, step: int) -> Path:
    """Write ``folder`` atomically: a sibling temporary folder is renamed when complete."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save_model(model, tmp)
        torch.save(
            {
                "step": step,
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "torch_rng": torch.get_rng_state(),
                # Dropout on a GPU draws from the CUDA generators, not the CPU's.
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
                "python_rng": random.getstate(),
            },
            tmp / STATE,
        )
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise FolderError(
            f"{folder.parent}: could not write checkpoint {folder.name} ({err.strerror or err}); "
            "the earlier checkpoints are kept: free space, then rerun with --resume"
        ) from None
    kill_point(folder.name)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def checkpoint_step(folder: Path) -> int | None:
    """N of a ``step-N`` or ``checkpoint-N`` folder (None for any other name)."""
    number = folder.name.rpartition("-")[2]
    return int(number) if number.isdigit() else None


def latest_checkpoint(out: Path) -> Path | None:
    """The complete checkpoint with the highest step under ``out/checkpoints``, or None."""
    found = [
        (checkpoint_step(p), p)
        for p in (out / "checkpoints").glob("step-*")
        if checkpoint_step(p) is not None and (p / STATE).is_file()
    ]
    return max(found)[1] if found else None


def load_checkpoint(folder: Path, model: PolicyModel, opt, sched) -> int:
    """Restore weights, optimiser, scheduler and RNG state; return the step to continue from."""
    weights = load_file(folder / "model.safetensors")
    used = set()
    with torch.no_grad():
        for key, param in model.hf_model.state_dict(keep_vars=True).items():
            name = key.replace("._original_component", "")
            if name == "lm_head.weight" and name not in weights:  # tied: saved as the embedding
                name = "model.embed_tokens.weight"
            if name in weights:
                param.copy_(weights[name])
                used.add(name)
    if used != set(weights):
        raise ValueError(f"{folder}: weights {sorted(set(weights) - used)} match no parameter")
    # On the host: RNG states must be CPU tensors; the optimiser moves its state to the weights.
    state = torch.load(folder / STATE, weights_only=False, map_location="cpu")
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    cuda_rng = state.get("cuda_rng", [])
    if cuda_rng and torch.cuda.is_available() and len(cuda_rng) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_rng)
    random.setstate(state["python_rng"])
    return int(state["step"])
