"""internal-policy-lens: internal layer and modular policies of LLMs.

The package is built in floors, one job a room; a module imports from its own floor or the ones
below it, never from above (``tests/test_package.py`` reads this list and checks every import):

    0  folders, config, bundled, statistics, lens_kinds: files, locks; configs; shipped; registries
    1  data: record files -> records -> token ids; answer checking
    2  model: families, loading (hub, folders, GGUF), devices, generation
    3  lens: sites, capture, unembedding, the reductions (CPU tiles, rows, GPU kernel), fitting
    4  tables: tidy pandas tables of entropies and their changes
    5  runs: run folders: writing, resuming, reading finished runs
    6  analysis: convergence measures, plots, figures and the report (no torch)
    7  train: BuPO (rollouts, the loss, the loop, probes, checkpoints)
    8  integrations: TRL
    9  commands: what each ipl command does, calling down the floors
    10 cli: the ipl command line (options read from the configs)

The names below are imported lazily (PEP 562): ``from internal_policy_lens import plots`` loads
matplotlib but not torch; ``load_model`` loads torch when first used.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> (module, attribute); attribute None means the module itself
_EXPORTS: dict[str, tuple[str, str | None]] = {
    "BupoConfig": ("config", "BupoConfig"),
    "CompareConfig": ("config", "CompareConfig"),
    "ConvergenceConfig": ("config", "ConvergenceConfig"),
    "DataError": ("data.records", "DataError"),
    "EntropyConfig": ("config", "EntropyConfig"),
    "EntropyRun": ("commands.entropy", "EntropyRun"),
    "EvalConfig": ("config", "EvalConfig"),
    "GenerationConfig": ("config", "GenerationConfig"),
    "LENSES": ("config", "LENSES"),
    "LensSettings": ("config", "LensSettings"),
    "MODULES": ("lens.sites", "MODULES"),
    "Request": ("statistics", "Request"),
    "STATISTICS": ("statistics", "STATISTICS"),
    "ModelLoadError": ("model.load", "ModelLoadError"),
    "PolicyModel": ("model.load", "PolicyModel"),
    "RunFolder": ("runs.io", "RunFolder"),
    "SITES": ("lens.sites", "SITES"),
    "SUPPORTED_ARCHITECTURES": ("model.families", "SUPPORTED_ARCHITECTURES"),
    "FAMILIES": ("model.families", "FAMILIES"),
    "capture": ("lens.capture", "capture"),
    "convergence": ("analysis.convergence", None),
    "convergence_summary": ("analysis.convergence", "convergence_summary"),
    "delta_table": ("tables", "delta_table"),
    "entropy_table": ("tables", "entropy_table"),
    "load_model": ("model.load", "load_model"),
    "open_run": ("runs.io", "open_run"),
    "plots": ("analysis.plots", None),
    "read_records": ("data.records", "read_records"),
    "run_entropy": ("commands.entropy", "run_entropy"),
    "run_with_cache": ("lens.capture", "run_with_cache"),
    "suggest_layer": ("analysis.convergence", "suggest_layer"),
    "summary_table": ("tables", "summary_table"),
    "train_bupo": ("train.loop", "train_bupo"),
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, attribute = _EXPORTS[name]
    value = importlib.import_module(f"{__name__}.{module}")
    if attribute is not None:
        value = getattr(value, attribute)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
