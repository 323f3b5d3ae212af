"""Reading the sites from a forward pass: the hooks, and the streamed forward.

:func:`capture` is the one context manager that registers hooks; they are always removed.
:func:`streamed_rows` runs the decoder once and hands each site's kept rows on as its layer
computes them, so that no site's whole tensor outlives its hook; with eager attention (a family
that needs it) one layer's attention scores stay within ``attention_mb`` (blocks of positions
with a key/value cache).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
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
    with _hooks(model, wanted, store.__setitem__):
        yield store


@contextmanager
def _hooks(
    model: PolicyModel, keys: Iterable[SiteKey], sink: Callable[[SiteKey, torch.Tensor], None]
) -> Iterator[None]:
    """Hooks that call ``sink(key, vector)`` for each of ``keys``; removed on exit, always."""
    handles = []
    try:
        for key in keys:
            handles.append(_register(model, key, sink))
        yield
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


def _register(model: PolicyModel, key: SiteKey, sink: Callable[[SiteKey, torch.Tensor], None]):
    site, layer = key
    where = model.family.source(site, layer, model.config)
    if where is None:
        raise ValueError(
            f"{model.architecture} has no {site}: its attention and MLP both read the layer input"
        )
    if not isinstance(where, Tap):
        return model.bridge.get_submodule(where).register_forward_hook(_saver(sink, key))
    module = model.hf_model.get_submodule(where.module)
    scale = getattr(model.config, where.scale) if where.scale else None
    if where.where == "in":
        return module.register_forward_pre_hook(_input_saver(sink, key), with_kwargs=True)
    return module.register_forward_hook(_saver(sink, key, scale))


def _saver(sink, key: SiteKey, scale: float | None = None):
    def hook(module, inputs, output):
        output = output[0] if isinstance(output, tuple) else output
        sink(key, output if scale is None else output * scale)

    return hook


def _input_saver(sink, key: SiteKey):
    def hook(module, args, kwargs):
        sink(key, args[0] if args else kwargs["hidden_states"])

    return hook


@torch.no_grad()
def streamed_rows(
    model: PolicyModel,
    ids: torch.Tensor,
    mask: torch.Tensor,
    keys: list[SiteKey],
    rows: tuple[torch.Tensor, torch.Tensor],
    settings: LensSettings,
    on_rows: Callable[[SiteKey, torch.Tensor, torch.Tensor], None],
    on_block: Callable[[torch.Tensor], None] | None = None,
) -> int:
    """One forward pass over ``ids`` ``[batch, pos]`` that hands each site's kept rows on.

    As each site of ``keys`` is computed, its rows at ``rows`` (``(batch_rows, positions)``,
    ``[n]`` each) go to ``on_rows(key, vectors [m, d_model], at [m])`` (``at``: their indices
    in ``rows``) and the whole ``[batch, pos, d_model]`` tensor is let go: what the pass
    holds is the model's own working memory plus what ``on_rows`` keeps. Only the positions up
    to the last kept one run (later ones cannot change them: attention is causal), and the
    decoder stops after the last layer of ``keys`` unless ``final`` is among them.

    Eager attention (a family that needs it) forms [heads, positions, positions] scores: there
    the positions run in blocks with a key/value cache within ``settings.attention_mb``, each
    block handing on its own rows, then ``on_block(at)`` is called with the rows it held. With
    sdpa no scores are formed and the pass is one block. Returns the number of blocks.
    """
    rows_b, rows_t = rows
    length = int(rows_t.max()) + 1
    span = length
    if model.attention == "eager":
        heads = model.config.num_attention_heads
        span = position_block(len(ids), heads, length, settings.attention_mb * 2**20)
    final = any(site == "final" for site, _ in keys)
    stop = None if final else max(layer for _, layer in keys) + 1
    past = model.new_cache() if span < length else None
    blocks = 0
    for start in range(0, length, span):
        end = min(start + span, length)
        at = ((rows_t >= start) & (rows_t < end)).nonzero().squeeze(1)
        picked = (rows_b[at], rows_t[at] - start)

        def pick(key: SiteKey, x: torch.Tensor, at=at, picked=picked) -> None:
            if len(at):
                on_rows(key, x[picked[0].to(x.device), picked[1].to(x.device)], at)

        with _hooks(model, keys, pick):
            model.forward(ids[:, start:end], mask[:, :end], stop_at_layer=stop, past=past)
        blocks += 1
        if on_block is not None:
            on_block(at)
    return blocks


def position_block(batch: int, heads: int, length: int, budget: float) -> int:
    """Positions per block so that one layer's float32 attention scores fit ``budget`` bytes.

    The scores of a block are [batch, heads, block, length] at most; ``length`` when they fit.
    """
    return max(1, min(length, int(budget // (batch * heads * length * 4))))
