"""What ships with the package: two small trained models, the arithmetic task and its data.

``task`` defines the verifiable arithmetic problems the shipped data were drawn from. This module
names the shipped files and finds them; it imports nothing from the rest of the package (the
tooling that built the models lives in ``model/tiny.py`` and ``analyses/pretrain.py``).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

BUNDLED_MODELS: tuple[str, ...] = ("ipl-tiny-qwen2", "ipl-tiny-llama")
"""Small reference models trained by ``analyses/train_bundled_models.py``."""
DEFAULT_MODEL = BUNDLED_MODELS[0]
"""The model of every command when none is given."""
DEFAULT_DATA = "arith_demo.jsonl"
"""The data of ``ipl entropy`` when none is given: 100 held-out arithmetic problems."""


def bundled_data(name: str = DEFAULT_DATA) -> Path:
    """Path of a data file shipped with the package (``bundled/data/NAME``)."""
    return Path(str(resources.files(__name__) / "data" / name))


def bundled_model_path(name: str) -> Path:
    """Folder of a bundled model (see :data:`BUNDLED_MODELS`).

    Raises:
        FileNotFoundError: where the folder has no ``config.json`` (saying how to get it back).
    """
    folder = Path(str(resources.files(__name__) / name))
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"the bundled model '{name}' is missing from {folder.parent}; reinstall the package "
            "or train it with: python analyses/train_bundled_models.py"
        )
    return folder
