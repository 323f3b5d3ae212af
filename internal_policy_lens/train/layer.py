"""Which internal layer k BuPO optimises: given, or the paper's rule on a quick entropy pass."""

from __future__ import annotations

import logging

from ..analysis.convergence import LayerSuggestion, suggest_layer
from ..config import BupoConfig
from ..data.records import read_records
from ..model.files import config_layers
from ..model.generate import sample
from ..model.load import PolicyModel
from ..tables import entropy_table, summary_table

_log = logging.getLogger(__name__)


def check_layer(cfg: BupoConfig) -> None:
    """``--layer K`` against the model's config.json alone, before the model loads."""
    n_layers = config_layers(cfg.model)
    if isinstance(cfg.layer, int) and n_layers is not None and not 0 <= cfg.layer < n_layers:
        raise ValueError(f"--layer {cfg.layer} is out of range (0..{n_layers - 1})")


def reads_layer(cfg: BupoConfig) -> bool:
    """Whether the run reads an internal layer: its IPA steps train one, its probes read one.

    Plain GRPO (``iterative_steps=0``) without probes reads none.
    """
    return cfg.iterative_steps > 0 or cfg.probe_every > 0


def resolve_layer(cfg: BupoConfig, model: PolicyModel, *, progress: bool = False) -> int | None:
    """``cfg.layer`` checked against the model, or :func:`auto_layer` for ``auto``.

    None when the run reads no layer (see :func:`reads_layer`): no entropy pass is run then.
    """
    if not reads_layer(cfg):
        if cfg.layer != "auto":
            _log.info("--layer %s is not used: --iterative-steps 0 trains no layer", cfg.layer)
        return None
    if cfg.layer != "auto":
        layer = int(cfg.layer)
        if not 0 <= layer < model.n_layers:
            raise ValueError(f"--layer {layer} is out of range (0..{model.n_layers - 1})")
        return layer
    return auto_layer(cfg, model, progress=progress)


def auto_layer(cfg: BupoConfig, model: PolicyModel, n: int = 16, *, progress: bool = False) -> int:
    """The paper's layer rule on a quick entropy pass over the first ``n`` training prompts.

    See :func:`suggested_layer`; raises ValueError naming ``--layer`` when no layer is found.
    """
    records = read_records(cfg.data, max_samples=n)
    _log.info(
        "--layer auto: choosing layer k by the paper's rule: greedy responses (up to %d tokens) "
        "to the first %d training prompts, then their FFN entropy change per layer (--layer K "
        "skips this)",
        cfg.max_new_tokens,
        len(records),
    )
    suggestion = layer_suggestion(
        model, records, max_new_tokens=cfg.max_new_tokens, lens=cfg.lens, progress=progress
    )
    if suggestion.layer is None:
        raise ValueError(f"--layer auto: {suggestion.reason}; pass --layer K instead")
    _log.info(
        "--layer auto: layer %d (0-based), the %s lens's %s, on greedy responses to the first "
        "%d training prompts",
        suggestion.layer,
        cfg.lens,
        suggestion.reason,
        len(records),
    )
    return suggestion.layer


def suggested_layer(
    model: PolicyModel, records: list[dict], *, max_new_tokens: int, lens: str
) -> int:
    """The paper's layer rule on greedy responses to the ``records``' prompts.

    The mean FFN entropy change per layer picks the last layer of the FFN exploration stage (see
    :func:`~internal_policy_lens.analysis.convergence.suggest_layer`).

    Raises:
        ValueError: with the reason when the entropies suggest no layer.
    """
    suggestion = layer_suggestion(model, records, max_new_tokens=max_new_tokens, lens=lens)
    if suggestion.layer is None:
        raise ValueError(suggestion.reason)
    return suggestion.layer


def layer_suggestion(
    model: PolicyModel,
    records: list[dict],
    *,
    max_new_tokens: int,
    lens: str,
    progress: bool = False,
) -> LayerSuggestion:
    """The layer rule's answer on greedy responses to the ``records``' prompts, with why."""
    prompts = [r["prompt"] for r in records]
    responses = sample(
        model,
        prompts,
        samples=1,
        temperature=0.0,
        max_new_tokens=max_new_tokens,
        progress=progress,
        desc="layer auto",
    )
    inputs = [{**r, "response": text[0]} for r, text in zip(records, responses)]
    table = entropy_table(model, inputs, lens=lens, sites=["mlp_in", "mlp_out"], response_only=True)
    return suggest_layer(summary_table(table))
