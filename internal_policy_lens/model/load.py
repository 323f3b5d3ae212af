"""Load a causal LM and its tokenizer through transformer-lens 4's TransformerBridge.

The bridge keeps the real Hugging Face weights (no norm folding: the raw lens needs the model's real
unembedding) and exposes every site of :data:`~internal_policy_lens.lens.sites.SITES` as a hook
point.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..bundled import BUNDLED_MODELS, bundled_model_path
from ..data.encode import encode_inputs
from .attention import attention_of, resolve_attention, set_attention
from .batch import pad, position_ids
from .device import check_device
from .families import FAMILIES, SUPPORTED_ARCHITECTURES, Family, family_of, prepare
from .files import check_weights, read_config

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "float64": torch.float64,
}


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message says why and what to do."""


@dataclass
class PolicyModel:
    """A loaded model: the TransformerBridge, its tokenizer and the facts the lens needs."""

    bridge: nn.Module
    tokenizer: object
    name: str
    revision: str | None = None
    gguf: dict | None = None
    """For a GGUF file: the file, its sha256, architecture, tensor quantization types, and the
    dtype its weights were dequantized to with why (``dtype``, ``dtype_why``)."""

    @property
    def attention(self) -> str:
        """The attention the decoder runs: ``sdpa`` (no pattern hooks) or ``eager``.

        Under sdpa no layer holds its [batch, heads, pos, pos] scores: position blocks that
        bound them are not needed.
        """
        return attention_of(self.bridge)

    def set_attention(self, attention: str = "auto") -> None:
        """Run the decoder's attention as ``attention`` (``auto``, ``eager`` or ``sdpa``).

        ``auto`` is sdpa unless the family needs eager
        (:attr:`~internal_policy_lens.model.families.Family.eager_attention`); the sites are
        the same up to float rounding either way.

        Raises:
            ValueError: for an unknown name, or ``sdpa`` on a family that needs eager.
        """
        set_attention(self.bridge, resolve_attention(attention, self.family))

    @property
    def hf_model(self) -> nn.Module:
        """The wrapped Hugging Face model (its submodules are bridge components)."""
        return self.bridge.original_model

    @property
    def config(self):
        """The Hugging Face config."""
        return self.hf_model.config

    @property
    def architecture(self) -> str:
        """Architecture name, e.g. ``Qwen2ForCausalLM``."""
        return self.config.architectures[0]

    @property
    def family(self) -> Family:
        """What the toolkit knows about this architecture (sites, output head)."""
        return family_of(self.architecture)

    @property
    def parallel(self) -> bool:
        """Whether attention and MLP both read the layer input (no ``resid_mid``)."""
        return self.family.is_parallel(self.config)

    @property
    def n_layers(self) -> int:
        """Number of decoder layers L."""
        return int(self.config.num_hidden_layers)

    @property
    def d_model(self) -> int:
        """Width of the residual stream."""
        return int(self.config.hidden_size)

    @property
    def vocab_size(self) -> int:
        """Rows of the unembedding matrix (the size of every policy)."""
        return int(self.unembed.weight.shape[0])

    @property
    def max_length(self) -> int:
        """The model's context length."""
        return int(getattr(self.config, "max_position_embeddings", 1 << 30))

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the weights."""
        return self.unembed.weight.dtype

    @property
    def device(self) -> torch.device:
        """Device of the weights."""
        return self.unembed.weight.device

    @property
    def unembed(self) -> nn.Linear:
        """The model's real unembedding (``lm_head``), never folded."""
        return self.bridge.unembed.original_component

    @property
    def final_norm(self) -> nn.Module:
        """The model's real final norm (``model.norm``)."""
        return self.bridge.ln_final.original_component

    def to_tokens(self, inputs, attention_mask: torch.Tensor | None = None):
        """``input_ids`` and ``attention_mask`` ``[batch, pos]`` on the model's device.

        ``inputs``: a string or list of strings (tokenized as given, no chat template), a list of
        token ids or of token-id lists (right-padded), or an ids tensor ``[pos]``/``[batch, pos]``
        (used as given, with ``attention_mask`` or all ones).
        """
        if isinstance(inputs, torch.Tensor):
            ids = inputs if inputs.dim() == 2 else inputs.unsqueeze(0)
            mask = torch.ones_like(ids) if attention_mask is None else attention_mask
            return ids.to(self.device), mask.to(self.device)
        if isinstance(inputs, str) or (inputs and isinstance(inputs[0], int)):
            inputs = [inputs]
        seqs = [e.input_ids for e in encode_inputs(self.tokenizer, inputs)]
        return pad(seqs, self.tokenizer.pad_token_id, self.device, side="right")

    def __call__(self, inputs, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``[batch, pos, vocab]`` of the model's own policy, like TransformerLens' model.

        ``inputs`` as in :meth:`to_tokens`; the logits at padded positions are meaningless.
        """
        ids, mask = self.to_tokens(inputs, attention_mask)
        return self.bridge(
            ids,
            attention_mask=self.visible(mask),
            position_ids=position_ids(mask),
            return_type="logits",
        )

    def visible(self, attention_mask: torch.Tensor) -> torch.Tensor:
        """The attention mask to run a right-padded batch with.

        With a sliding window shorter than a row's trailing padding, a padding position sees no
        key at all; the eager attention of transformers and of the bridge then writes NaN there,
        and the next layer spreads it to the real tokens (0 * NaN in the value product). Trailing
        padding is unmasked instead: a real token never attends to it (attention is causal), so
        the real tokens' numbers are unchanged (sdpa writes no NaN there, and runs the same
        mask: it costs nothing). Models without a sliding window keep their mask.
        """
        config = self.config
        if not getattr(config, "sliding_window", None) or not getattr(
            config, "use_sliding_window", True
        ):
            return attention_mask
        seen = attention_mask.flip(-1).cumsum(-1).flip(-1) > 0  # a real token at or after here
        return torch.where(seen, attention_mask, torch.ones_like(attention_mask))

    def new_cache(self):
        """An empty key/value cache for :meth:`forward`'s ``past``."""
        from transformers import DynamicCache

        return DynamicCache(config=self.config)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        stop_at_layer: int | None = None,
        *,
        past=None,
    ) -> torch.Tensor | None:
        """Run the decoder so that hooks fire; return the residual entering ``stop_at_layer``.

        Position ids follow the attention mask, so left- and right-padded batches give the same
        numbers as each sequence alone. Only the last position's logits are computed: the sites
        are read through hooks and projected in chunks by the lens.

        With ``past`` (a transformers ``Cache``, e.g. :meth:`new_cache`) a long sequence runs in
        blocks of positions: ``input_ids`` are the next block, ``attention_mask`` covers the
        cached positions and the block, and the block's keys and values are appended to
        ``past``. Each block's attention scores are then [block, all positions so far].
        """
        positions = position_ids(attention_mask)[:, -input_ids.shape[1] :]
        kwargs = {"attention_mask": self.visible(attention_mask), "position_ids": positions}
        kwargs |= (
            {"use_cache": False} if past is None else {"past_key_values": past, "use_cache": True}
        )
        if stop_at_layer is not None:
            return self.bridge(input_ids, stop_at_layer=stop_at_layer, **kwargs)
        self.bridge(input_ids, return_type=None, logits_to_keep=1, **kwargs)
        return None


def save_model(model: PolicyModel, folder: str | os.PathLike) -> Path:
    """Save the model as a standard transformers folder (weights, config, tokenizer).

    The bridge wraps every module, so its state dict holds several aliases per weight; the plain
    architecture's parameter names pick the real ones.
    """
    from transformers import AutoModelForCausalLM

    clean: dict[str, torch.Tensor] = {}
    for key, value in model.hf_model.state_dict().items():
        clean.setdefault(key.replace("._original_component", ""), value)
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(model.config)
    plain.load_state_dict({k: clean[k] for k in plain.state_dict()}, assign=True)
    plain.tie_weights()
    plain.generation_config = model.hf_model.generation_config
    folder = Path(folder)
    plain.save_pretrained(folder)
    model.tokenizer.save_pretrained(folder)
    return folder


def load_model(
    name_or_path: str | os.PathLike,
    *,
    dtype: str | torch.dtype = "auto",
    device: str = "auto",
    revision: str | None = None,
    device_map: str | dict | None = None,
    progress: bool = True,
    gguf_file: str | None = None,
    attention: str = "auto",
) -> PolicyModel:
    """Load a model of a supported family (:data:`FAMILIES`) with its tokenizer.

    Args:
        name_or_path: a bundled model (``ipl-tiny-qwen2``, ``ipl-tiny-llama``), a local folder
            saved by transformers (config.json, weights and tokenizer files), a hub name such
            as ``Qwen/Qwen2.5-7B`` (needs the network) or a ``.gguf`` file (needs the ``gguf``
            extra; its weights are dequantized to ``dtype``, its tokenizer read from the file).
        dtype: ``auto`` (the checkpoint's dtype on a GPU, float32 on the CPU; for a ``.gguf``
            file bfloat16 where the device multiplies it natively, CUDA with bf16 or a CPU with
            AVX-512 bf16/AMX, else float32, the choice and why in ``model.gguf``), ``float32``,
            ``bfloat16``, ``float16`` or ``float64`` (for reference computations).
        device: ``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda``, ``cuda:1``...
            Ignored when ``device_map`` is given.
        revision: hub revision (branch, tag or commit).
        device_map: split a model larger than one device over the visible devices
            (``"auto"``, ``"balanced"`` or an explicit transformers device map).
        progress: show transformers' weight-loading bar.
        gguf_file: the name of a GGUF file inside the folder ``name_or_path``.
        attention: ``auto`` (torch's sdpa unless the family needs eager attention), ``eager``
            or ``sdpa``; see :meth:`PolicyModel.set_attention`.

    Raises:
        ModelLoadError: with what happened and what to do.
        DeviceError: for a ``device`` this machine cannot run (before anything is loaded).
    """
    device = check_device(device)
    source = _gguf_source(name_or_path, gguf_file)
    if source is not None:
        return _load_gguf(source, dtype, device, device_map, progress, attention)
    name, config = _resolve(name_or_path, revision)
    tokenizer = _load_tokenizer(name, revision)
    torch_dtype = _resolve_dtype(dtype, config, check_device("auto") if device_map else device)
    from transformer_lens.model_bridge import TransformerBridge

    logging.getLogger("transformer_lens").setLevel(logging.ERROR)
    placement = {"device_map": device_map} if device_map else {"device": device}
    try:
        with _loading_bar(progress):
            bridge = TransformerBridge.boot_transformers(
                name, tokenizer=tokenizer, dtype=torch_dtype, revision=revision, **placement
            )
    except OSError as err:
        raise ModelLoadError(_hub_message(name, err)) from err
    prepare(bridge.original_model)
    return _policy(bridge, tokenizer, str(name_or_path), attention, revision=revision)


def _policy(bridge, tokenizer, name: str, attention: str, **facts) -> PolicyModel:
    """The booted ``bridge``, in eval mode and running ``attention``, as a :class:`PolicyModel`."""
    bridge.eval()
    model = PolicyModel(bridge=bridge, tokenizer=tokenizer, name=name, **facts)
    try:
        model.set_attention(attention)
    except ValueError as err:
        raise ModelLoadError(f"'{name}': {err}") from err
    return model


def _gguf_source(name_or_path, gguf_file: str | None):
    from .gguf import GgufError, gguf_source

    try:
        return gguf_source(name_or_path, gguf_file)
    except GgufError as err:
        raise ModelLoadError(str(err)) from err


def _load_gguf(source, dtype, device: str, device_map, progress: bool, attention: str):
    """A GGUF file's model, dequantized to ``dtype``, bridged like any other checkpoint."""
    from transformer_lens.model_bridge import TransformerBridge

    if device_map:
        raise ModelLoadError(
            f"'{source.path}': --device-map is not supported for GGUF files; pass --device"
        )
    hf_model, tokenizer, facts, torch_dtype = _gguf_parts(source, dtype, device, progress)
    logging.getLogger("transformer_lens").setLevel(logging.ERROR)
    bridge = TransformerBridge.boot_transformers(
        str(source.path), hf_model=hf_model, tokenizer=tokenizer, dtype=torch_dtype, device=device
    )
    return _policy(bridge, tokenizer, str(source.path), attention, gguf=facts)


def _gguf_parts(source, dtype, device: str, progress: bool):
    """(plain model on ``device``, tokenizer, the file's facts, torch dtype) of a GGUF file.

    ``dtype="auto"`` is :func:`~.gguf.default_dtype`'s choice; the facts record the dtype and why.
    """
    from .gguf import (
        GgufError,
        architecture_of,
        default_dtype,
        gguf_facts,
        load_gguf_model,
        load_gguf_tokenizer,
    )

    try:
        facts = gguf_facts(source)
        architecture, config = architecture_of(source)
        _check_architecture(architecture, str(source.path))
        tokenizer = _checked_tokenizer(str(source.path), load_gguf_tokenizer(source))
        if dtype == "auto":
            torch_dtype, why = default_dtype(device)
        else:
            torch_dtype, why = _resolve_dtype(dtype, config, device), "asked for"
        hf_model = load_gguf_model(source, config, torch_dtype, device, progress)
    except GgufError as err:
        raise ModelLoadError(str(err)) from err
    prepare(hf_model)
    facts |= {"dtype": str(torch_dtype).removeprefix("torch."), "dtype_why": why}
    return hf_model, tokenizer, facts, torch_dtype


def policy_view(
    hf_model: nn.Module, tokenizer, name: str = "trained", attention: str = "auto"
) -> PolicyModel:
    """A :class:`PolicyModel` over a transformers model's own parameters, for reading it live.

    The bridge inserts its wrappers into the module tree it is given, so it gets a copy of
    ``hf_model``'s modules whose parameters and buffers *are* ``hf_model``'s (the same tensors,
    no copy of the weights): the view reads every later update of ``hf_model``, while
    ``hf_model`` itself (its module names, state dict, attention implementation and training
    mode) is left as it was. The view computes what the plain architecture computes: forwards
    that a trainer set on the instances are dropped from the copy. Pass the plain model (unwrap
    DDP's ``module`` first); parameters that a trainer shards or replaces (FSDP, DeepSpeed
    ZeRO-3) are not read through it. ``attention`` as in :func:`load_model`.
    """
    from transformer_lens.model_bridge import TransformerBridge

    shared = {id(t): t for t in itertools.chain(hf_model.parameters(), hf_model.buffers())}
    tree = copy.deepcopy(hf_model, memo=shared)  # new modules around the same tensors
    for module in tree.modules():
        # Forwards a trainer set on the instances (TRL's fused LM head, accelerate's autocast)
        # close over the original modules: the view runs each class's own forward.
        module.__dict__.pop("forward", None)
        module.__dict__.pop("_original_forward", None)
    prepare(tree)
    logging.getLogger("transformer_lens").setLevel(logging.ERROR)
    bridge = TransformerBridge.boot_transformers(
        name, hf_model=tree, tokenizer=tokenizer, dtype=next(tree.parameters()).dtype
    )
    return _policy(bridge, tokenizer, name, attention)


@contextlib.contextmanager
def _loading_bar(show: bool):
    """Transformers' progress bars off for the block unless ``show``; as they were after it."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    if not show:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def load_causal_lm(
    name_or_path: str | os.PathLike,
    *,
    dtype: str | torch.dtype = "float32",
    revision: str | None = None,
    gguf_file: str | None = None,
):
    """A plain transformers model and its tokenizer, without the bridge, on the CPU.

    For trainers that wrap and place the model themselves (TRL's GRPOTrainer with accelerate,
    DeepSpeed or FSDP). The same names (a ``.gguf`` file too, dequantized to ``dtype``), checks
    and tokenizer fixes as :func:`load_model`.
    """
    from transformers import AutoModelForCausalLM

    source = _gguf_source(name_or_path, gguf_file)
    if source is not None:
        hf_model, tokenizer, _, _ = _gguf_parts(source, dtype, "cpu", progress=False)
        return hf_model, tokenizer
    name, config = _resolve(name_or_path, revision)
    tokenizer = _load_tokenizer(name, revision)
    model = AutoModelForCausalLM.from_pretrained(
        name, dtype=_resolve_dtype(dtype, config, "cpu"), revision=revision
    )
    prepare(model)
    return model, tokenizer


def _resolve(name_or_path: str | os.PathLike, revision: str | None):
    """The folder or hub name to load, and its config; rejects unsupported architectures."""
    from transformers import AutoConfig

    name = str(name_or_path)
    try:
        local = bundled_model_path(name) if name in BUNDLED_MODELS else Path(name).expanduser()
    except FileNotFoundError as err:  # a bundled model missing from the installation
        raise ModelLoadError(str(err)) from None
    if local.is_dir():
        _check_local_folder(local)
        name = str(local)
    elif _looks_like_path(name):
        raise ModelLoadError(
            f"model path '{name}' does not exist. Pass a folder saved by transformers "
            "(config.json, model.safetensors and tokenizer files) or a hub name such as "
            "Qwen/Qwen2.5-7B."
        )
    try:
        config = AutoConfig.from_pretrained(name, revision=revision)
    except OSError as err:
        raise ModelLoadError(_hub_message(name, err)) from err
    _check_architecture((config.architectures or ["<none>"])[0], name)
    return name, config


def _check_architecture(architecture: str, name: str) -> None:
    if architecture not in SUPPORTED_ARCHITECTURES:
        families = ", ".join(f"{f.hf_class} ({f.name})" for f in FAMILIES)
        raise ModelLoadError(
            f"architecture '{architecture}' of '{name}' is not supported; supported: {families}. "
            "`ipl models` lists them."
        )


def _looks_like_path(name: str) -> bool:
    # A hub id is "owner/name" (or a bare name); anything else is meant as a folder.
    return (
        name.startswith((".", "/", "~"))
        or name.count("/") > 1
        or os.sep != "/"
        and os.sep in name
        or Path(name).suffix in {".json", ".safetensors", ".bin"}
    )


def _check_local_folder(folder: Path) -> None:
    if not (folder / "config.json").is_file():
        raise ModelLoadError(
            f"'{folder}' has no config.json; pass the folder that model.save_pretrained(...) wrote."
        )
    if not any((folder / f).is_file() for f in _TOKENIZER_FILES):
        raise ModelLoadError(
            f"'{folder}' has no tokenizer files ({', '.join(_TOKENIZER_FILES)}); save the "
            "tokenizer next to the weights with tokenizer.save_pretrained('"
            f"{folder}')."
        )
    # A damaged download or copy fails here in one line, not in a safetensors traceback.
    _check_model_type(folder / "config.json", read_config(folder / "config.json"))
    check_weights(folder)


def _check_model_type(path: Path, config: dict) -> None:
    """A ``model_type`` that transformers does not know: one line naming the file.

    transformers' own error advises upgrading it, to a release this package excludes.
    """
    from transformers import __version__
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    model_type = config.get("model_type")
    if isinstance(model_type, str) and model_type not in CONFIG_MAPPING_NAMES:
        raise ModelLoadError(
            f"{path}: model_type '{model_type}' is not a model type transformers {__version__} "
            "knows; `ipl models` lists the supported families (use the config.json that "
            "model.save_pretrained(...) wrote)"
        )


def _load_tokenizer(name: str, revision: str | None):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name, revision=revision)
        tokenizer = _faithful_tokenizer(name, tokenizer)
    except (OSError, ValueError) as err:
        raise ModelLoadError(
            f"could not load the tokenizer of '{name}': {err}. Save it with "
            "tokenizer.save_pretrained(folder) next to the weights."
        ) from err
    return _checked_tokenizer(name, tokenizer)


def _checked_tokenizer(name: str, tokenizer):
    """``tokenizer``, refused when it encodes text to nothing; a pad token when it has none."""
    if not tokenizer("a 1+2", add_special_tokens=False)["input_ids"]:
        raise ModelLoadError(
            f"the tokenizer of '{name}' encodes text to nothing; its tokenizer files are "
            "incomplete. Save the model's real tokenizer next to the weights."
        )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


_PROBE = "Start with 12. Add 7.\n  x = 19 * 3; done"


def _faithful_tokenizer(name: str, tokenizer):
    """The folder's own tokenizer.json, when AutoTokenizer rebuilt it into something else.

    For some model types (Qwen2 among them) AutoTokenizer replaces the saved pre-tokenizer with
    the family's own, whatever tokenizer_config.json says; a custom tokenizer in such a folder then
    silently loses its spaces. The saved file is the truth: compare on a probe and reload it as is.
    """
    file = Path(name) / "tokenizer.json"
    if not file.is_file():
        return tokenizer
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    expected = Tokenizer.from_file(str(file)).encode(_PROBE, add_special_tokens=False).ids
    if tokenizer(_PROBE, add_special_tokens=False)["input_ids"] == expected:
        return tokenizer
    logging.getLogger(__name__).debug(
        "%s: AutoTokenizer changed the saved tokenizer; using tokenizer.json as saved", name
    )
    return PreTrainedTokenizerFast.from_pretrained(name)


def _hub_message(name: str, err: Exception) -> str:
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False")
    reason = "the hub is switched off (HF_HUB_OFFLINE=1)" if offline else "the hub is unreachable"
    return (
        f"could not load '{name}': it is not a local folder and {reason} or does not know "
        f"it ({type(err).__name__}). Pass a local folder saved by transformers, e.g. "
        "--model /path/to/Qwen2.5-7B, or download it first where the network allows."
    )


def _resolve_dtype(dtype: str | torch.dtype, config, device: str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if not device.startswith("cuda"):
            return torch.float32
        stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        return (
            stored if isinstance(stored, torch.dtype) else _DTYPES.get(str(stored), torch.float32)
        )
    if dtype not in _DTYPES:
        raise ModelLoadError(f"unknown dtype '{dtype}'; use auto, {', '.join(_DTYPES)}")
    return _DTYPES[dtype]
