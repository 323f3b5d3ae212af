"""Reading the sites from a forward pass: the hooks, and the memory-bounded forward.

:func:`capture` is the one context manager that registers hooks; they are always removed.
:func:`captured_blocks` runs the decoder so that what it holds at once stays within the lens
settings' budgets: the captured vectors (``capture_mb``: layers in groups, one forward pass per
group, each stopped after its last layer) and one layer's attention scores (``attention_mb``:
blocks of positions with a key/value cache).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch

from ..config import LensSettings
from ..model.families import Tap
from ..model.load import PolicyModel
from .sites import SiteKey, resolve_layers, resolve_sites


def site_keys(
    model: PolicyModel,
    sites: Iterable[str] | str | None = None,
    layers: Iterable[int] | str | None = None,
) -> list[SiteKey]:
    """Return the (site, layer) pairs for the given subsets, in canonical order (final at L-1).

    ``resid_mid`` is left out in a parallel block, where it does not exist.
    """
    layer_list = resolve_layers(layers, model.n_layers)
    absent = {"final"} | ({"resid_mid"} if model.parallel else set())
    keys = []
    for layer in layer_list:
        keys.extend((s, layer) for s in resolve_sites(sites) if s not in absent)
    if "final" in resolve_sites(sites):
        keys.append(("final", model.n_layers - 1))
    return keys


@contextmanager
def capture(
    model: PolicyModel,
    sites: Iterable[str] | str | None = None,
    layers: Iterable[int] | str | None = None,
    *,
    keys: Iterable[SiteKey] | None = None,
) -> Iterator[dict[SiteKey, torch.Tensor]]:
    """Capture sites during the forward passes run inside the block.

    Yields a dict filled by the hooks with ``(site, layer) -> [batch, pos, d_model]`` tensors.
    The tensors are not detached: under ``torch.no_grad()`` they carry no graph, and with
    gradients enabled a loss built on them backpropagates into the model (the trainer relies on
    this). ``final`` is keyed with layer L-1. Hooks are removed on exit, also when the body
    raises. Each site is read where its family's entry says
    (:meth:`~internal_policy_lens.model.families.Family.source`): a bridge hook point or a hook
    on a module of the wrapped Hugging Face model.

    Example:
        >>> with torch.no_grad(), capture(model, ["attn_out", "mlp_out"], [0, 5]) as acts:
        ...     model.forward(input_ids, attention_mask)
        >>> acts["mlp_out", 5].shape
    """
    wanted = list(keys) if keys is not None else site_keys(model, sites, layers)
    store: dict[SiteKey, torch.Tensor] = {}
    handles = []
    try:
        for key in wanted:
            handles.append(_register(model, key, store))
        yield store
    finally:
        for handle in handles:
            handle.remove()


def run_with_cache(
    model: PolicyModel,
    inputs,
    sites: Iterable[str] | str | None = None,
    layers: Iterable[int] | str | None = None,
    *,
    attention_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[SiteKey, torch.Tensor]]:
    """The model's logits and the captured sites, like TransformerLens' ``run_with_cache``.

    ``inputs`` as in :meth:`~internal_policy_lens.model.load.PolicyModel.to_tokens`. Returns
    logits ``[batch, pos, vocab]`` and ``(site, layer) -> [batch, pos, d_model]`` (all sites of
    all layers by default). Runs without gradients.
    """
    with torch.no_grad(), capture(model, sites, layers) as acts:
        logits = model(inputs, attention_mask)
    return logits, dict(acts)


def _register(model: PolicyModel, key: SiteKey, store: dict[SiteKey, torch.Tensor]):
    site, layer = key
    where = model.family.source(site, layer, model.config)
    if where is None:
        raise ValueError(
            f"{model.architecture} has no {site}: its attention and MLP both read the layer input"
        )
    if not isinstance(where, Tap):
        return model.bridge.get_submodule(where).register_forward_hook(_saver(store, key))
    module = model.hf_model.get_submodule(where.module)
    scale = getattr(model.config, where.scale) if where.scale else None
    if where.where == "in":
        return module.register_forward_pre_hook(_input_saver(store, key), with_kwargs=True)
    return module.register_forward_hook(_saver(store, key, scale))


def _saver(store: dict[SiteKey, torch.Tensor], key: SiteKey, scale: float | None = None):
    def hook(module, inputs, output):
        output = output[0] if isinstance(output, tuple) else output
        store[key] = output if scale is None else output * scale

    return hook


def _input_saver(store: dict[SiteKey, torch.Tensor], key: SiteKey):
    def hook(module, args, kwargs):
        store[key] = args[0] if args else kwargs["hidden_states"]

    return hook


@torch.no_grad()
def captured_blocks(
    model: PolicyModel,
    ids: torch.Tensor,
    mask: torch.Tensor,
    keys: list[SiteKey],
    settings: LensSettings,
    *,
    length: int,
    shared: SiteKey | None = None,
) -> Iterator[tuple[list[SiteKey], dict[SiteKey, torch.Tensor], int]]:
    """Run the decoder over ``ids`` ``[batch, pos]`` within the settings' memory budgets.

    Yields ``(group, acts, start)``: the keys of one layer group, their captured vectors
    ``[batch, block, d_model]`` for the block of positions that begins at ``start``. Only the
    first ``length`` positions run (later ones cannot change them: attention is causal).
    ``shared`` (the final site, when every site needs it) joins every group.
    """
    heads = model.config.num_attention_heads
    span = position_block(len(ids), heads, length, settings.attention_mb * 2**20)
    per_key = len(ids) * span * model.d_model * torch.finfo(model.dtype).bits // 8
    for group in layer_groups(keys, per_key, settings.capture_mb * 2**20, shared):
        final = any(site == "final" for site, _ in group)  # the final norm runs after every layer
        stop = None if final else max(layer for _, layer in group) + 1
        past = model.new_cache() if span < length else None
        for start in range(0, length, span):
            end = min(start + span, length)
            with capture(model, keys=group) as acts:
                model.forward(ids[:, start:end], mask[:, :end], stop_at_layer=stop, past=past)
            yield group, acts, start


def position_block(batch: int, heads: int, length: int, budget: float) -> int:
    """Positions per block so that one layer's float32 attention scores fit ``budget`` bytes.

    The scores of a block are [batch, heads, block, length] at most; ``length`` when they fit.
    """
    return max(1, min(length, int(budget // (batch * heads * length * 4))))


def layer_groups(
    keys: list[SiteKey], per_key: int, budget: float, shared: SiteKey | None = None
) -> list[list[SiteKey]]:
    """``keys`` in groups of consecutive layers, each capturing at most ``budget`` bytes.

    A group holds at least one layer's keys. ``shared`` joins every group (last).
    """
    by_layer: dict[int, list[SiteKey]] = {}
    for key in sorted((k for k in keys if k != shared), key=lambda k: k[1]):
        by_layer.setdefault(key[1], []).append(key)
    groups: list[list[SiteKey]] = []
    current: list[SiteKey] = []
    extra = [shared] if shared is not None else []
    for layer_keys in by_layer.values():
        if current and (len(current) + len(layer_keys) + len(extra)) * per_key > budget:
            groups.append(current + extra)
            current = []
        current += layer_keys
    if current or not groups:
        groups.append(current + extra)
    return groups
