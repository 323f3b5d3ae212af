"""The training commands: train-bupo (its config file and engine) and eval."""

from __future__ import annotations

from dataclasses import fields
from functools import partial
from pathlib import Path

from ..config import BupoConfig, EvalConfig
from .options import make


def bupo_config(config_file: Path | None, given: dict) -> BupoConfig:
    """BupoConfig from the TOML file (if any), then the options given on the command line."""
    values = {}
    if config_file is not None:
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            import tomli as tomllib
        if not config_file.is_file():
            raise ValueError(f"{config_file}: no such config file")
        with open(config_file, "rb") as fh:
            values = tomllib.load(fh)
        known = {f.name for f in fields(BupoConfig)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(
                f"{config_file}: unknown field(s) {', '.join(unknown)}; "
                f"known: {', '.join(sorted(known))}"
            )
    return make(BupoConfig, {**values, **given})


def trainer(engine: str, trl_options: list[str]):
    """The training function of ``--engine``: the built-in loop or the TRL runner."""
    if engine == "builtin" and not trl_options:
        from ..train.loop import train_bupo

        return train_bupo
    if engine != "trl":
        raise ValueError(f"unknown engine '{engine}' (or --trl-option without --engine trl)")
    try:
        from ..integrations.trl.run import parse_overrides, train_bupo_trl
    except ModuleNotFoundError as err:
        raise ValueError(
            f"--engine trl needs TRL ({err}); pip install 'internal-policy-lens[trl]'"
        ) from None
    return partial(train_bupo_trl, overrides=parse_overrides(trl_options))


def evaluate(cfg: EvalConfig) -> str:
    """Sample and score; the table's size and where it went, then one line per metric."""
    from ..train.evaluate import evaluate as evaluate_model

    table, metrics = evaluate_model(cfg)
    problems = f"{len(table)} problem{'s' if len(table) != 1 else ''}"
    samples = f"{cfg.samples} sample{'s' if cfg.samples != 1 else ''}"
    lines = [f"{problems}, {samples} each ({cfg.out}/results.csv, metrics.json)"]
    lines += [f"{name:>10}  {value:.4f}" for name, value in metrics.items()]
    return "\n".join(lines)
