"""The one context manager that captures sites; its hooks are always removed."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch

from .models import PolicyModel
from .sites import hook_name, resolve_layers, resolve_sites

SiteKey = tuple[str, int]


def site_keys(
    model: PolicyModel,
    sites: Iterable[str] | str | None = None,
    layers: Iterable[int] | str | None = None,
) -> list[SiteKey]:
    """Return the (site, layer) pairs for the given subsets, in canonical order (final at L-1)."""
    layer_list = resolve_layers(layers, model.n_layers)
    keys = []
    for layer in layer_list:
        keys.extend((s, layer) for s in resolve_sites(sites) if s != "final")
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
    raises.

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
            site, layer = key
            point = model.bridge.get_submodule(hook_name(site, layer))
            handles.append(point.register_forward_hook(_saver(store, key)))
        yield store
    finally:
        for handle in handles:
            handle.remove()


def _saver(store: dict[SiteKey, torch.Tensor], key: SiteKey):
    def hook(module, inputs, output):
        store[key] = output

    return hook
