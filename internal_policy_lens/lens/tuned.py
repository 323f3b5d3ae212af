"""The tuned lens's translators (Belrose et al. 2023, arXiv 2303.08112) and its folder on disk.

A translator maps a site vector ``x`` ``[..., d_model]`` to ``x + x A^T + b`` (``A``
``[d_model, d_model]``, ``b`` ``[d_model]``, both zero at the start, so that the untrained tuned
lens is the norm lens); :class:`~internal_policy_lens.lens.unembed.Lens` then applies the model's
final norm and unembedding. There is one translator per (site, layer); ``resid_pre`` of layer
``l > 0`` is ``resid_post`` of layer ``l - 1`` and shares its translator.

A lens folder holds ``lens.json`` (model name and config hash, sites, layers, the fit's data
sha256 and settings, the held-out evaluation) and the translators, either

- ``translators.safetensors`` (format ``ipl``): tensors ``{site}.{layer}.weight`` / ``.bias``, or
- ``config.json`` + ``params.pt`` (format ``tuned-lens``, the tuned-lens package's own layout):
  ``params.pt`` is the state dict of its ``layer_translators`` (keys ``{i}.weight``, ``{i}.bias``,
  torch.nn.Linear layout), translator ``i`` reading the model's ``hidden_states[i]``, i.e.
  ``resid_pre`` of layer 0 for ``i = 0`` and ``resid_post`` of layer ``i - 1`` after. The package
  has no translator for the last layer's output (``resid_post[L-1]``, the model's own last
  residual): there the translator is the identity. A folder published by that project (no
  ``lens.json``) is read from ``config.json`` + ``params.pt`` alone.
"""

from __future__ import annotations

import hashlib
import json
import os
from functools import partial
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..bundled import BUNDLED_MODELS, bundled_model_path
from ..config import LensSettings
from ..folders import Folder
from ..lens_kinds import folder_lenses, lens_kind
from ..model.load import PolicyModel
from .sites import SITES, SiteKey
from .unembed import Lens

LENS_FORMATS: tuple[str, ...] = ("ipl", "tuned-lens")
META = "lens.json"
IPL_FILE = "translators.safetensors"
TL_CONFIG, TL_PARAMS = "config.json", "params.pt"
FIT_HINT = "fit one with `ipl fit-lens --model MODEL --out DIR`"
# Config entries that do not change what the model computes.
# Entries that say how the model runs, not what it is: the attention implementation (sdpa or
# eager) and whether attention weights are returned change no number a lens reads.
_VOLATILE = (
    "_name_or_path",
    "name_or_path",
    "transformers_version",
    "torch_dtype",
    "dtype",
    "_attn_implementation",
    "_attn_implementation_autoset",
    "attn_implementation",
    "output_attentions",
)


class LensFolderError(ValueError):
    """A lens folder is missing, incomplete, malformed or for another model."""


def fitted_keys(sites, n_layers: int) -> list[SiteKey]:
    """The translators a fit of ``sites`` trains, in canonical order."""
    keys = []
    for site in SITES:
        if site in sites:
            keys += [(site, 0)] if site == "resid_pre" else [(site, i) for i in range(n_layers)]
    return keys


def config_hash(model: PolicyModel, *, legacy: bool = False) -> str:
    """SHA-256 of the model's config (name, dtype, version and attention entries left out).

    ``legacy``: the hash that lens folders fitted before the attention entries were left out
    carry (the bridge then always returned attention weights: ``output_attentions`` true).
    """
    config = {k: v for k, v in model.config.to_dict().items() if k not in _VOLATILE}
    if legacy:
        config["output_attentions"] = True
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def model_facts(model: PolicyModel) -> dict:
    """What identifies the model a lens belongs to (written to and checked from lens.json)."""
    return {
        "name_or_path": model.name,
        "architecture": model.architecture,
        "n_layers": model.n_layers,
        "d_model": model.d_model,
        "config_hash": config_hash(model),
    }


def zero_translators(
    keys, d_model: int, dtype=torch.float32, device: torch.device | str = "cpu"
) -> dict[SiteKey, tuple]:
    """Identity translators ``key -> (A, b)`` (zeros): the tuned lens equals the norm lens."""
    zeros = partial(torch.zeros, dtype=dtype, device=device)
    return {key: (zeros(d_model, d_model), zeros(d_model)) for key in keys}


def lens_folder(lens_path: str | os.PathLike | None, model_name: str) -> str | os.PathLike | None:
    """The tuned lens's folder: ``lens_path``, else a bundled model's shipped lens, else None.

    ``model_name`` is the name the model was loaded by (a bundled model's name finds its lens).
    """
    if lens_path is not None:
        return lens_path
    if model_name in BUNDLED_MODELS:
        return bundled_model_path(model_name) / "tuned-lens"
    return None


def folder_hash(path: str | os.PathLike) -> str:
    """SHA-256 over a lens folder's files that define the lens (recorded in run.json)."""
    path = Path(path)
    digest = hashlib.sha256()
    for name in (META, IPL_FILE, TL_CONFIG, TL_PARAMS):
        if (path / name).is_file():
            digest.update(name.encode() + b"\0" + (path / name).read_bytes())
    return digest.hexdigest()


def write_lens(
    path: str | os.PathLike, translators: dict[SiteKey, tuple], meta: dict, fmt: str = "ipl"
) -> Path:
    """Write the translators and ``lens.json`` to ``path`` (each file atomically)."""
    if fmt not in LENS_FORMATS:
        raise ValueError(f"unknown lens format '{fmt}'; use one of {', '.join(LENS_FORMATS)}")
    folder = Folder(path).create()
    if fmt == "ipl":
        tensors = {}
        for (site, layer), (weight, bias) in translators.items():
            tensors[f"{site}.{layer}.weight"] = weight.detach().float().contiguous()
            tensors[f"{site}.{layer}.bias"] = bias.detach().float().contiguous()
        with folder.atomic(IPL_FILE) as tmp:
            save_file(tensors, str(tmp))
    else:
        state, config = _to_tuned_lens(translators, meta["model"])
        with folder.atomic(TL_PARAMS) as tmp:
            torch.save(state, tmp)
        folder.write_json(TL_CONFIG, config)
    return folder.write_json(META, {**meta, "format": fmt})


def read_lens(
    path: str | os.PathLike | None, model: PolicyModel
) -> tuple[dict[SiteKey, tuple], dict]:
    """Read a lens folder for ``model``: ``(translators, meta)``, translators in float32.

    Raises:
        LensFolderError: one line naming the file, what is wrong and the fix.
    """
    path = lens_folder(path, model.name)
    if path is None:
        raise LensFolderError(f"the tuned lens needs a lens folder (--lens-path); {FIT_HINT}")
    path = Path(path)
    if not path.is_dir():
        raise LensFolderError(f"{path}: no such lens folder; {FIT_HINT}")
    meta = _read_json(path / META) if (path / META).is_file() else None
    fmt = meta.get("format", "ipl") if meta else "tuned-lens"
    if fmt == "ipl":
        translators = _read_ipl(path / IPL_FILE, model)
    else:
        translators, meta = _read_tuned_lens(path, model, meta)
    _check_model(path / META if (path / META).is_file() else path / TL_CONFIG, meta, model)
    return translators, meta


def check_lens_path(settings: LensSettings) -> None:
    """Refuse a ``--lens-path`` with a lens that reads no folder, or one that is not a folder.

    Needs no model, so commands call it before loading one.
    """
    if settings.lens_path is None:
        return
    if not lens_kind(settings.lens).needs_folder:
        raise ValueError(
            f"a lens folder ({settings.lens_path}) goes with the {' or '.join(folder_lenses())} "
            f"lens; pass --lens {' or --lens '.join(folder_lenses())}, or leave out --lens-path"
        )
    if not Path(settings.lens_path).is_dir():
        raise LensFolderError(f"{settings.lens_path}: no such lens folder; {FIT_HINT}")


def make_lens(model: PolicyModel, settings: LensSettings) -> Lens:
    """The :class:`Lens` of ``settings``; a folder lens's translators read from its folder.

    Choosing the precision, casting the unembedding and reading the folder happen here: a run
    makes its lens once and passes it to every batch.
    """
    check_lens_path(settings)
    kind = lens_kind(settings.lens)
    if not kind.needs_folder:
        return Lens(model, kind, settings.precision)
    folder = lens_folder(settings.lens_path, model.name)
    translators, _ = read_lens(folder, model)
    return Lens(model, kind, settings.precision, translators, source=folder)


def lens_facts(lens: Lens) -> dict:
    """What ``run.json`` records of a lens: its kind's record, and the folder and its hash."""
    facts = lens.kind.record(lens)
    if lens.source is None:
        return facts
    return {**facts, "path": str(lens.source), "sha256": folder_hash(lens.source)}


def _read_json(file: Path) -> dict:
    try:
        return json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise LensFolderError(f"{file}: not readable JSON ({err}); {FIT_HINT} again") from None


def _need(file: Path) -> Path:
    if not file.is_file():
        raise LensFolderError(f"{file}: missing from the lens folder; {FIT_HINT} again")
    return file


def _read_ipl(file: Path, model: PolicyModel) -> dict[SiteKey, tuple]:
    try:
        tensors = load_file(str(_need(file)))
    except LensFolderError:
        raise
    except Exception as err:  # noqa: BLE001 - safetensors raises several types
        raise LensFolderError(f"{file}: not a safetensors file ({err}); {FIT_HINT} again") from None
    out = {}
    for name in sorted(n for n in tensors if n.endswith(".weight")):
        site, layer, _ = name.rsplit(".", 2)
        bias = tensors.get(f"{site}.{layer}.bias")
        if site not in SITES or not layer.isdigit() or bias is None:
            raise LensFolderError(f"{file}: unexpected tensor '{name}'; {FIT_HINT} again")
        out[site, int(layer)] = _checked(file, name, tensors[name], bias, model)
    return out


def _checked(file, name, weight, bias, model: PolicyModel) -> tuple:
    d = model.d_model
    if tuple(weight.shape) != (d, d) or tuple(bias.shape) != (d,):
        raise LensFolderError(
            f"{file}: translator '{name}' has shapes {tuple(weight.shape)} and "
            f"{tuple(bias.shape)}, the model needs ({d}, {d}) and ({d},); "
            f"the lens is for another model: {FIT_HINT}"
        )
    return weight.float(), bias.float()


def _to_tuned_lens(translators: dict[SiteKey, tuple], facts: dict) -> tuple[dict, dict]:
    """The tuned-lens package's ``params.pt`` state dict and ``config.json``."""
    n = facts["n_layers"]
    order = [("resid_pre", 0)] + [("resid_post", i) for i in range(n - 1)]
    missing = [f"{s}[{i}]" for s, i in order if (s, i) not in translators]
    if missing:
        raise ValueError(
            f"the tuned-lens format needs translators for resid_pre[0] and resid_post[0..{n - 2}]"
            f" (missing {', '.join(missing[:4])}); fit with --sites resid_pre,resid_post"
        )
    state = {}
    for i, key in enumerate(order):
        state[f"{i}.weight"] = translators[key][0].detach().float().clone()
        state[f"{i}.bias"] = translators[key][1].detach().float().clone()
    config = {
        "base_model_name_or_path": facts["name_or_path"],
        "d_model": facts["d_model"],
        "num_hidden_layers": n,
        "bias": True,
        "base_model_revision": None,
        "unembed_hash": None,
        "lens_type": "linear_tuned_lens",
    }
    return state, config


def _read_tuned_lens(path: Path, model: PolicyModel, meta: dict | None):
    config = _read_json(_need(path / TL_CONFIG))
    params = _need(path / TL_PARAMS)
    try:
        state = torch.load(params, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch.load raises several types
        raise LensFolderError(f"{params}: not a torch state dict ({err}); {FIT_HINT}") from None
    # Older releases saved the whole lens: keys carry a "layer_translators." prefix.
    state = {k.removeprefix("layer_translators."): v for k, v in state.items()}
    n = config.get("num_hidden_layers")
    if n != model.n_layers or config.get("d_model") != model.d_model:
        raise LensFolderError(
            f"{path / TL_CONFIG}: the lens is for {config.get('base_model_name_or_path')!r} "
            f"({n} layers, d_model {config.get('d_model')}), not for {model.name!r} "
            f"({model.n_layers} layers, d_model {model.d_model}); {FIT_HINT}"
        )
    out = {}
    for i in range(n):
        key = ("resid_pre", 0) if i == 0 else ("resid_post", i - 1)
        weight, bias = state.get(f"{i}.weight"), state.get(f"{i}.bias")
        if weight is None:
            raise LensFolderError(f"{params}: no translator {i} ('{i}.weight'); {FIT_HINT}")
        if bias is None:
            bias = torch.zeros(model.d_model, device="cpu")  # as the file's tensors
        out[key] = _checked(params, f"{i}.weight", weight, bias, model)
    out.update(zero_translators([("resid_post", n - 1)], model.d_model))  # the package's identity
    if meta is None:
        meta = {
            "format": "tuned-lens",
            "model": {"name_or_path": config.get("base_model_name_or_path")},
            "sites": ["resid_pre", "resid_post"],
        }
    return out, meta


def _check_model(file: Path, meta: dict, model: PolicyModel) -> None:
    want = meta.get("model", {})
    have = model_facts(model)
    known = (have["config_hash"], config_hash(model, legacy=True))
    if "config_hash" in want and want["config_hash"] not in known:
        raise LensFolderError(
            f"{file}: the lens was fitted for {want.get('name_or_path')!r} (config hash "
            f"{want['config_hash'][:12]}), not for {model.name!r} (config hash "
            f"{have['config_hash'][:12]}); {FIT_HINT} for this model"
        )
