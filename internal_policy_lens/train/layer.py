"""Which internal layer k BuPO optimises: given, or the paper's rule on a quick entropy pass."""

from __future__ import annotations

from ..analysis.convergence import suggest_layer
from ..config import BupoConfig
from ..data.records import read_records
from ..model.generate import sample
from ..model.load import PolicyModel
from ..tables import entropy_table, summary_table


def resolve_layer(cfg: BupoConfig, model: PolicyModel) -> int:
    """``cfg.layer`` checked against the model, or :func:`auto_layer` for ``auto``."""
    if cfg.layer != "auto":
        layer = int(cfg.layer)
        if not 0 <= layer < model.n_layers:
            raise ValueError(f"--layer {layer} is out of range (0..{model.n_layers - 1})")
        return layer
    return auto_layer(cfg, model)


def auto_layer(cfg: BupoConfig, model: PolicyModel, n: int = 16) -> int:
    """The paper's layer rule on a quick entropy pass over the first ``n`` training prompts.

    Greedy responses to the prompts, then the mean FFN entropy change per layer: the last layer
    of the FFN exploration stage (see
    :func:`~internal_policy_lens.analysis.convergence.suggest_layer`).
    """
    records = read_records(cfg.data, max_samples=n)
    responses = sample(
        model,
        [r["prompt"] for r in records],
        samples=1,
        temperature=0.0,
        max_new_tokens=cfg.max_new_tokens,
    )
    inputs = [{**r, "response": text[0]} for r, text in zip(records, responses)]
    table = entropy_table(
        model, inputs, lens=cfg.lens, sites=["mlp_in", "mlp_out"], response_only=True
    )
    suggestion = suggest_layer(summary_table(table))
    if suggestion.layer is None:
        raise ValueError(f"--layer auto: {suggestion.reason}; pass --layer K instead")
    return suggestion.layer
