"""A model folder's files, read without loading the model: its config and its weights' headers.

So that a command can refuse a bad option (``--layers 0-99``) or a damaged download (a truncated
``model.safetensors``, a ``config.json`` that is not JSON) in a second, before it spends minutes
loading the weights. Nothing here imports torch.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..bundled import BUNDLED_MODELS, bundled_model_path

LAYER_FIELDS = ("num_hidden_layers", "n_layer", "num_layers")
"""Where a transformers config keeps its decoder layer count (GPT-2 says ``n_layer``)."""


class ModelFileError(ValueError):
    """A model file that cannot be read; one line naming the file and the fix."""


def local_config(name_or_path: str | os.PathLike, revision: str | None = None) -> Path | None:
    """The ``config.json`` of a bundled model, a local folder or a cached hub model, else None.

    Never reaches the network: a hub model not in the local cache gives None; a bundled model
    missing from the installation raises FileNotFoundError.
    """
    name = str(name_or_path)
    if name in BUNDLED_MODELS:
        folder = bundled_model_path(name)
    else:
        folder = Path(name).expanduser()
    if folder.is_dir():
        path = folder / "config.json"
        return path if path.is_file() else None
    if folder.exists() or name.count("/") != 1:
        return None  # a single file (GGUF) or not a hub id
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(name, "config.json", revision=revision)
    return Path(cached) if isinstance(cached, str) else None


def read_config(path: Path) -> dict:
    """``config.json`` as a dict; a file that is not JSON or names no architecture: one line."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelFileError(
            f"{path}: not a valid JSON file ({err}); the download or copy was probably "
            "interrupted: fetch config.json again"
        ) from None
    if not isinstance(config, dict) or not config.get("architectures"):
        raise ModelFileError(
            f"{path}: does not name its architectures (no 'architectures' field); use the "
            "config.json that model.save_pretrained(...) wrote"
        )
    return config


def config_layers(name_or_path: str | os.PathLike, revision: str | None = None) -> int | None:
    """The model's decoder layer count read from its config.json alone; None if not at hand."""
    return _config_int(name_or_path, revision, LAYER_FIELDS)


def config_vocab(name_or_path: str | os.PathLike, revision: str | None = None) -> int | None:
    """The model's vocabulary size read from its config.json alone; None if not at hand."""
    return _config_int(name_or_path, revision, ("vocab_size",))


def _config_int(name_or_path, revision: str | None, fields: tuple[str, ...]) -> int | None:
    path = local_config(name_or_path, revision)
    if path is None:
        return None
    config = read_config(path)
    for part in (config, config.get("text_config") or {}):
        for name in fields:
            if isinstance(part.get(name), int):
                return part[name]
    return None


def check_out_outside_model(out: str | os.PathLike, name_or_path: str | os.PathLike) -> None:
    """Refuse an output folder inside the model's own folder (results among the weights).

    A bundled model's folder lies inside the installed package; a hub name or a single file
    (GGUF) has no folder to protect.
    """
    name = str(name_or_path)
    folder = bundled_model_path(name) if name in BUNDLED_MODELS else Path(name).expanduser()
    if not folder.is_dir():
        return
    folder, target = folder.resolve(), Path(out).expanduser().resolve()
    if target == folder or folder in target.parents:
        raise ModelFileError(
            f"{out}: inside the model's folder {folder} (results would mix with the weights); "
            "choose an --out outside it"
        )


def check_weights(folder: Path) -> None:
    """Open every ``*.safetensors`` file's header; a corrupt or truncated one is one line."""
    from safetensors import safe_open

    for path in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="numpy"):
                pass
        except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
            raise ModelFileError(
                f"{path}: the weights file is corrupt or truncated ({err}); an interrupted "
                "download or copy: fetch or copy it again"
            ) from None
