"""GGUF checkpoints (llama.cpp's single-file format) as a model source.

transformers reads a GGUF file's config, tokenizer and tensors (``gguf_file=``), dequantizing every
tensor to the requested dtype; the ``gguf`` package (the optional extra ``[gguf]``) parses the file.
The loaded model is a plain float transformers model, handed to the TransformerBridge like any
other. What the file was (its sha256 and the quantization type of each tensor) is kept as facts for
run.json, because the dequantized weights are the rounded ones, not the original checkpoint's.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

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


def inspect_gguf(source: GgufSource) -> dict:
    """The file's architecture and tensor types; rejects types the gguf package cannot read.

    Every quantization type present is dequantized once, on the first row of a tensor of that
    type, by the same ``gguf`` routine transformers uses, so an unsupported type is one message
    here rather than a traceback halfway through loading.
    """
    reader = _reader(source)  # first: it names the extra when the gguf package is missing
    from gguf import dequantize

    field = reader.get_field("general.architecture")
    architecture = field.contents() if field is not None else "<none>"
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


def load_gguf_model(source: GgufSource, dtype, progress: bool = True):
    """The file's weights dequantized to ``dtype``, as a plain transformers model on the CPU.

    transformers marks a GGUF-loaded model as quantized (``quantization_config``) although its
    weights are ordinary float tensors; the marks are dropped so that the model saves, casts and
    trains like any other. ``progress``: show transformers' dequantization bar.
    """
    from transformers import AutoModelForCausalLM

    with _dequantization_bar(progress):
        model = AutoModelForCausalLM.from_pretrained(
            source.folder, gguf_file=source.file, dtype=dtype
        )
    model.config.architectures = [type(model).__name__]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    return model


@contextlib.contextmanager
def _dequantization_bar(show: bool):
    """The GGUF dequantization bar of transformers, off in the block unless ``show``.

    transformers draws it with a plain tqdm that its own progress switch does not reach (and tqdm
    reads its environment defaults once, at import): the loader module's ``tqdm`` is a disabled
    one for the block, and the original again after it.
    """
    from transformers import modeling_gguf_pytorch_utils as loader

    original = loader.tqdm
    if not show:
        loader.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        loader.tqdm = original
