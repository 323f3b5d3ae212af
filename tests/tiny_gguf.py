"""Tiny GGUF files written here with the gguf package's GGUFWriter, the way llama.cpp lays them out.

A random transformers model (real architecture config) is written tensor by tensor under
llama.cpp's names, with the config under the GGUF keys that transformers reads and a small
byte-level BPE tokenizer. ``expected_model`` builds, independently of the package, the float model
the file should load as: the same weights after the quantization round trip.
"""

import gguf
import numpy as np
import torch
from gguf.quants import dequantize, quantize
from transformers import AutoModelForCausalLM
from transformers.convert_slow_tokenizer import bytes_to_unicode
from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

from internal_policy_lens.model.tiny import CHAT_TEMPLATE, tiny_config

ARCHS = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2}
MERGES = ["Ġ t", "h e", "i n", "Ġt he", "r e", "o n", "Ġ a", "e r"]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def vocabulary() -> list[str]:
    """Byte symbols, then one token per merge, then the control tokens."""
    tokens = list(bytes_to_unicode().values())
    tokens += ["".join(merge.split(" ")) for merge in MERGES]
    return tokens + SPECIALS


def _permute(weight: np.ndarray, n_head: int) -> np.ndarray:
    # llama.cpp stores Llama's q/k rows with the two rotary halves interleaved per head.
    rows = weight.shape[0] // n_head // 2
    return weight.reshape(n_head, 2, rows, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _stored(name: str, weight: np.ndarray, config, arch: str) -> np.ndarray:
    if arch == "llama" and name.endswith("q_proj.weight"):
        return _permute(weight, config.num_attention_heads)
    if arch == "llama" and name.endswith("k_proj.weight"):
        return _permute(weight, config.num_key_value_heads)
    return weight


def random_model(arch: str, seed: int = 0, n_layers: int = 2):
    """A random model of ``arch`` whose matrices have rows of a multiple of 32 (Q8_0 blocks)."""
    torch.manual_seed(seed)
    config = tiny_config(
        arch,
        vocab_size=len(vocabulary()),
        n_layers=n_layers,
        d_model=64,
        n_heads=4,
        n_kv_heads=2,
        d_mlp=128,
        tie_embeddings=arch == "llama",
    )
    return AutoModelForCausalLM.from_config(config).eval()


def _metadata(writer, config, arch: str) -> None:
    for gguf_key, hf_key in GGUF_CONFIG_MAPPING[arch].items():
        value = getattr(config, hf_key, None) if hf_key else None
        if value is None:
            continue
        key = f"{arch}.{gguf_key}"
        if isinstance(value, float):
            writer.add_float32(key, value)
        else:
            writer.add_uint32(key, int(value))
    tokens = vocabulary()
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_merges(MERGES)
    control = len(tokens) - len(SPECIALS)
    writer.add_token_types([3 if i >= control else 1 for i in range(len(tokens))])
    writer.add_eos_token_id(tokens.index("<|im_end|>"))
    writer.add_bos_token_id(tokens.index("<|endoftext|>"))
    writer.add_chat_template(CHAT_TEMPLATE)


def write_gguf(model, path, arch: str, qtype=gguf.GGMLQuantizationType.Q8_0) -> dict[str, str]:
    """Write ``model`` as a GGUF file; matrices in ``qtype``, vectors in F32.

    Returns the GGUF quantization type name of every tensor written, by GGUF tensor name.
    """
    config = model.config
    names = gguf.get_tensor_name_map(ARCHS[arch], config.num_hidden_layers)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(f"tiny-{arch}")
    _metadata(writer, config, arch)
    types = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        weight = _stored(name, tensor.float().numpy(), config, arch)
        kind = qtype if weight.ndim == 2 else gguf.GGMLQuantizationType.F32
        writer.add_tensor(gguf_name, quantize(weight, kind), raw_dtype=kind)
        types[gguf_name] = kind.name
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return types


def expected_model(model, qtype=gguf.GGMLQuantizationType.Q8_0):
    """``model`` with every matrix replaced by its quantize -> dequantize round trip (float32)."""
    rounded = AutoModelForCausalLM.from_config(model.config).eval()
    state = {}
    for name, tensor in model.state_dict().items():
        value = tensor.float().numpy()
        if value.ndim == 2:
            value = dequantize(quantize(value, qtype), qtype).reshape(value.shape)
        state[name] = torch.from_numpy(np.ascontiguousarray(value))
    rounded.load_state_dict(state)
    return rounded


def write_raw(path, arch: str, qtype: gguf.GGMLQuantizationType) -> None:
    """A file with a bare llama-style config and one tensor of raw bytes typed ``qtype``."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_uint32(f"{arch}.block_count", 1)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    writer.add_tensor("token_embd.weight", np.zeros((4, size), np.uint8), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
