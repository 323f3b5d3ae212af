"""A GGUF file's weights, dequantized one tensor at a time into a model built without weights.

transformers' own GGUF loading (``from_pretrained(gguf_file=...)``) dequantizes every tensor of the
file and keeps them all until the model takes them over: at its peak a process holds the model
and a second copy of it (2.2 times a 0.5B bfloat16 model's size above what the process held
before; 1.1 times here). Here the model is built on the meta device, given uninitialized storage
in its dtype on its device, and each tensor of the file is read, dequantized, fixed up and copied
into its parameter in turn. The names and the fix-ups are transformers' own (its GGUF name map
and per-architecture tensor processors), so the weights are bit for bit those its loader gives,
rounded once to the model's dtype.

Only where each tensor lies is taken from the ``gguf`` package's reader, which is then let go:
its parsed metadata (a numpy view per vocabulary entry) outweighs the file itself. The tensors
are read with plain reads, not through the reader's memory map, whose pages of the file would
count in the process's resident memory (a third of a bfloat16 model for a 4-bit file).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import BinaryIO, NamedTuple

import numpy as np
import torch

CHUNK_ELEMENTS = 1 << 22
"""Elements dequantized at once: bounds the dequantizer's float32 temporaries (a few of them)."""


def empty_model(config, dtype: torch.dtype, device: str):
    """The causal LM of ``config`` in ``dtype`` on ``device``, its parameters not yet written.

    Built on the meta device (no memory, no random initialization), then given uninitialized
    storage: pages the operating system backs only once a tensor is written into them.
    """
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.to_empty(device=device)


class StoredTensor(NamedTuple):
    """Where and how the file stores one tensor."""

    name: str
    qtype: object
    """The ``gguf.GGMLQuantizationType``."""
    shape: tuple[int, ...]
    """The dequantized shape, outermost first (GGUF lists dimensions innermost first)."""
    rows: int
    row_width: int
    """Stored items per row: bytes of quantized blocks, or floats."""
    item: np.dtype
    offset: int
    """Of its first byte in the file."""
    n_bytes: int


def stored_tensors(reader) -> list[StoredTensor]:
    """Each tensor of the file a ``gguf.GGUFReader`` opened, as :class:`StoredTensor`."""
    tensors = []
    for t in reader.tensors:
        rows, width = t.data.reshape(-1, t.data.shape[-1]).shape  # a view: nothing is read
        shape = tuple(int(n) for n in reversed(t.shape.tolist()))
        layout = (rows, width, t.data.dtype, int(t.data_offset), int(t.n_bytes))
        tensors.append(StoredTensor(t.name, t.tensor_type, shape, *layout))
    return tensors


class TensorNames(NamedTuple):
    """How a file's tensors become a model's: transformers' processor and name map for them."""

    processor: object
    """Fixes a tensor up (``process``), as transformers does for the file's architecture."""
    to_model: dict[str, str]
    """GGUF tensor name -> the model's parameter name."""


def tensor_names(model, architecture: str) -> TensorNames:
    """How the tensors of a file of ``architecture`` (``general.architecture``) become ``model``'s.

    transformers' tensor processor for the architecture, and its map of GGUF tensor names to the
    model's parameter names.
    """
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
    )

    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=model.config.to_dict())
    return TensorNames(processor, get_gguf_hf_weights_map(model, processor))


def fill_from_gguf(
    model,
    path,
    tensors: list[StoredTensor],
    names: TensorNames,
    progress: bool = False,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> None:
    """Write the ``tensors`` of the GGUF file ``path`` (:func:`stored_tensors`) into ``model``.

    A tensor that ``names.processor`` leaves as it is goes into its parameter in blocks of rows
    of about ``chunk_elements``; one it fixes up is dequantized whole first (Llama's q/k rows).
    Non-persistent buffers (rotary frequencies) are computed afterwards by the model's own
    initialization, which skips every parameter written here.

    Raises:
        ValueError: for a tensor whose shape is not its parameter's, or a parameter the file
            does not hold.
    """
    from tqdm.auto import tqdm

    processor, to_model = names
    params = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers())
    # Tensors a processor writes itself (merged MoE experts, GPT-2's head), by parameter name.
    written: dict[str, dict[str, torch.Tensor]] = {"tensors": {}}
    with open(path, "rb") as file:
        for tensor in tqdm(tensors, desc="Dequantizing GGUF tensors", disable=not progress):
            name = to_model.get(tensor.name)
            if name is not None and _passes_through(processor, tensor, to_model):
                _copy_rows(file, tensor, _target(params, name, tensor.shape), chunk_elements)
                continue
            result = processor.process(
                weights=_dequantized(file, tensor, chunk_elements),
                name=tensor.name,
                tensor_key_mapping=to_model,
                parsed_parameters=written,
            )
            if result.name in to_model:
                weights = torch.from_numpy(np.ascontiguousarray(result.weights))
                _target(params, to_model[result.name], weights.shape).copy_(weights)
    for name, weights in written["tensors"].items():
        # A name the model lacks is ignored, as transformers ignores unexpected keys; a
        # parameter left unwritten is then reported by _finish.
        if name in params:
            _target(params, name, weights.shape).copy_(weights)
    _finish(model)


def _passes_through(processor, tensor, names) -> bool:
    """Whether the processor leaves this tensor as it is, so it can go in row by row.

    Asked on an empty array of the tensor's row shape, with a scratch place for what the
    processor writes itself: a processor that fixes a tensor up returns another array, another
    name, or fails on the empty one.
    """
    probe = np.empty((0, *tensor.shape[1:]), np.float32)
    try:
        result = processor.process(
            weights=probe,
            name=tensor.name,
            tensor_key_mapping=names,
            parsed_parameters={"tensors": {}},
        )
    except (ValueError, IndexError, KeyError, TypeError):
        return False
    return result.weights is probe and result.name == tensor.name


def _target(params: dict, name: str, shape) -> torch.Tensor:
    """The storage of parameter ``name``, checked to have the ``shape`` of what it receives."""
    param = params[name]
    if tuple(param.shape) != tuple(shape):
        raise ValueError(
            f"the GGUF tensor for '{name}' has shape {tuple(shape)}, the model's parameter "
            f"{tuple(param.shape)}"
        )
    param._is_hf_initialized = True  # transformers' mark: its initialization skips this tensor
    return param.data


def _copy_rows(file: BinaryIO, tensor, param: torch.Tensor, chunk: int) -> None:
    rows = param.view(-1, param.shape[-1])  # [rows, cols]
    for start, block in _row_blocks(file, tensor, chunk):
        rows[start : start + block.shape[0]].copy_(torch.from_numpy(block))


def _dequantized(file: BinaryIO, tensor, chunk: int) -> np.ndarray:
    """The whole tensor in float32, in its (outermost first) shape."""
    out = np.empty(tensor.shape, np.float32)
    rows = out.reshape(tensor.rows, -1)
    for start, block in _row_blocks(file, tensor, chunk):
        rows[start : start + block.shape[0]] = block
    return out


def _row_blocks(file: BinaryIO, tensor, chunk: int) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, float32 ``[rows, cols]``) for consecutive blocks of the tensor's rows.

    The stored rows (quantized blocks as bytes, or plain floats) lie one after another in the
    file; each block of them is read and dequantized on its own.
    """
    from gguf import dequantize

    step = max(1, chunk // (math.prod(tensor.shape) // tensor.rows))  # rows per block
    row_bytes = tensor.n_bytes // tensor.rows
    for start in range(0, tensor.rows, step):
        block = np.empty((min(step, tensor.rows - start), tensor.row_width), tensor.item)
        file.seek(tensor.offset + start * row_bytes)
        file.readinto(memoryview(block).cast("B"))
        yield start, dequantize(block, tensor.qtype).reshape(block.shape[0], -1)


def _finish(model) -> None:
    """Tie the head, compute the non-persistent buffers, refuse parameters left unwritten."""
    model.tie_weights()
    model.initialize_weights()  # the buffers; parameters marked as written are skipped
    missing = [n for n, p in model.named_parameters() if not getattr(p, "_is_hf_initialized", 0)]
    if missing:
        raise ValueError(
            f"the file holds no tensor for {len(missing)} parameter(s) of the model, e.g. "
            f"{', '.join(missing[:3])}"
        )
    model.eval()
