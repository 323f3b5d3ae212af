"""GGUF checkpoints (llama.cpp's single-file format) as a model source.

transformers reads a GGUF file's config and tokenizer (``gguf_file=``); the weights are read here,
one tensor at a time, into a model built without weights (:mod:`.gguf_weights`); the ``gguf``
package (the optional extra ``[gguf]``) parses the file. The loaded model is a plain float
transformers model, handed to the TransformerBridge like any other. What the file was (its sha256
and the quantization type of each tensor) and the dtype it was dequantized to (and why) are kept
as facts for run.json, because the dequantized weights are the rounded ones, not the original
checkpoint's.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

INSTALL_HINT = "pip install 'internal-policy-lens[gguf]'"


class GgufError(ValueError):
    """A GGUF file that cannot be loaded; the message says why and what to do."""


@dataclass(frozen=True)
class GgufSource:
    """A GGUF file, split the way transformers addresses it (a folder and a file name)."""

    path: Path

    @property
    def folder(self) -> str:
        """The folder transformers loads from."""
        return str(self.path.parent)

    @property
    def file(self) -> str:
        """The file name, transformers' ``gguf_file``."""
        return self.path.name


def gguf_source(name_or_path: str | os.PathLike, gguf_file: str | None = None) -> GgufSource | None:
    """The GGUF file meant by ``--model`` (and ``--gguf-file``), or None for any other model.

    ``name_or_path`` is a ``.gguf`` file, or a folder holding the file named by ``gguf_file``.
    """
    path = Path(name_or_path).expanduser()
    if gguf_file is not None:
        if Path(gguf_file).name != gguf_file:
            raise GgufError(
                f"--gguf-file '{gguf_file}' must be a file name inside the --model folder; "
                "pass a path to the file as --model instead"
            )
        path = path / gguf_file
    elif path.suffix.lower() != ".gguf":
        return None
    if not path.is_file():
        raise GgufError(f"GGUF file '{path}' does not exist; pass the path of a .gguf file")
    return GgufSource(path.resolve())


def _reader(source: GgufSource):
    try:
        from gguf import GGUFReader
    except ImportError as err:
        raise GgufError(f"reading '{source.path}' needs the gguf package: {INSTALL_HINT}") from err
    try:
        return GGUFReader(source.path)
    except (ValueError, OSError) as err:
        raise GgufError(f"'{source.path}' is not a readable GGUF file ({err})") from err


def _architecture(reader) -> str:
    field = reader.get_field("general.architecture")
    return field.contents() if field is not None else "<none>"


def inspect_gguf(source: GgufSource) -> dict:
    """The file's architecture and tensor types; rejects types the gguf package cannot read.

    Every quantization type present is dequantized once, on the first row of a tensor of that
    type, by the same ``gguf`` routine transformers uses, so an unsupported type is one message
    here rather than a traceback halfway through loading.
    """
    reader = _reader(source)  # first: it names the extra when the gguf package is missing
    from gguf import dequantize

    architecture = _architecture(reader)
    first = {}
    for tensor in reader.tensors:
        first.setdefault(tensor.tensor_type, tensor)
    for qtype, tensor in first.items():
        try:
            dequantize(tensor.data[:1], qtype)
        except NotImplementedError as err:
            raise GgufError(
                f"'{source.path}': tensor '{tensor.name}' has quantization type {qtype.name}, "
                "which the gguf package cannot dequantize; convert the file to another type "
                "(e.g. Q8_0, Q4_K_M or F16)"
            ) from err
    types = Counter(tensor.tensor_type.name for tensor in reader.tensors)
    return {"architecture": architecture, "tensor_types": dict(sorted(types.items()))}


def gguf_facts(source: GgufSource) -> dict:
    """What run.json records about a GGUF model: the file, its sha256, its tensor types."""
    from ..folders import sha256

    info = inspect_gguf(source)
    return {
        "file": str(source.path),
        "sha256": sha256(source.path),
        "architecture": info["architecture"],
        "tensor_types": info["tensor_types"],
    }


def architecture_of(source: GgufSource) -> tuple[str, object]:
    """The transformers class name a GGUF file loads as, and its config (check it first)."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        config = AutoConfig.from_pretrained(source.folder, gguf_file=source.file)
    except ValueError as err:  # transformers' word on an architecture it cannot read
        raise GgufError(f"'{source.path}': transformers cannot load this file: {err}") from err
    # A GGUF config names no architectures; the causal-LM class follows from its model type.
    return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type, "<none>"), config


def load_gguf_tokenizer(source: GgufSource):
    """The tokenizer stored in the file (vocabulary, merges, special tokens, chat template)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(source.folder, gguf_file=source.file)


def load_gguf_model(source: GgufSource, config, dtype, device: str = "cpu", progress: bool = True):
    """The file's weights dequantized to ``dtype``, as a plain transformers model on ``device``.

    ``config``: the file's config (:func:`architecture_of`). At its peak the process holds the
    model in ``dtype`` and about one float32 tensor of the file (see :mod:`.gguf_weights`).
    ``progress``: show a bar over the file's tensors.
    """
    from .gguf_weights import empty_model, fill_from_gguf, stored_tensors, tensor_names

    reader = _reader(source)
    architecture, tensors = _architecture(reader), stored_tensors(reader)
    del reader  # its parsed metadata outweighs the file: gone before the weights come
    model = empty_model(config, dtype, device)
    try:
        names = tensor_names(model, architecture)
        fill_from_gguf(model, source.path, tensors, names, progress)
    except ValueError as err:
        raise GgufError(f"'{source.path}': {err}") from err
    model.config.architectures = [type(model).__name__]
    return model


def default_dtype(device: str, support=None) -> tuple[torch.dtype, str]:
    """The dtype a GGUF model is dequantized to when none is asked for, and why.

    bfloat16 where ``device`` multiplies it natively (CUDA with bf16; a CPU with AVX-512 bf16 or
    AMX): half the memory of float32, and faster there. float32 elsewhere: on an AVX2-only CPU
    bf16 products are emulated, 3-4x slower than float32. The weights were rounded to 4-8 bits
    in the file; bfloat16 rounds them again, to 8 significant bits. ``support``: how the device
    is judged, :func:`~internal_policy_lens.model.hardware.half_support` unless given.
    """
    import torch

    from .hardware import half_support

    native, why = (support or half_support)(torch.device(device), torch.bfloat16)
    return (torch.bfloat16 if native else torch.float32), why
