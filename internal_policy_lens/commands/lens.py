"""``ipl fit-lens`` and ``ipl eval-lens``: files in, lens folder or table out, and what they say."""

from __future__ import annotations

import logging
import shutil
import warnings
from dataclasses import asdict
from pathlib import Path

import pandas as pd

from ..config import LENSES, EvalLensConfig, FitLensConfig
from ..data.records import read_records
from ..folders import Folder, FolderState, sha256
from ..lens.fit import check_fit_config, collect_rows, fit_lens, fit_state, lens_metrics
from ..lens.sites import SITES
from ..lens.tuned import FIT_HINT, LensFolderError, folder_hash, lens_folder, read_lens
from ..lens.unembed import Lens
from ..model.load import load_model
from ..statistics import LENS_EVAL_RENAMES, renamed_columns
from .entropy import ensure_responses

EVAL_COLUMNS = ("layer", "site", "lens", "kl_final_internal", "next_token_ce", "top1_agrees")
EVAL_META = "lens_eval.json"
"""Beside lens_eval.csv: the settings and hashes it was computed from."""
_log = logging.getLogger(__name__)


def run_fit_lens(cfg: FitLensConfig, *, progress: bool = True) -> dict:
    """Read the data, generate missing responses (OUT/responses.jsonl), fit, write the lens.

    Rerunning a killed fit continues from its last saved translators; rerunning a finished
    one returns its lens.json with ``"reused": True`` and changes nothing (``cfg.force``: fit
    again).
    """
    check_fit_config(cfg)
    out = Path(cfg.out)
    folder = Folder(out).check_writable()  # before any work
    state, old = fit_state(folder, cfg)  # another fit's folder is refused before any work
    if state is FolderState.COMPLETE:
        return {**old, "reused": True}
    records = read_records(cfg.data, max_samples=cfg.max_samples)
    model = load_model(cfg.model, dtype=cfg.dtype, device=cfg.device)
    with folder.lock():  # one writer per lens folder
        records = ensure_responses(model, records, cfg, out, progress, None)
        meta = fit_lens(model, records, cfg, data_sha256=sha256(cfg.data), progress=progress)
        shutil.rmtree(out / "generation", ignore_errors=True)
    return meta


def kl_text(table: pd.DataFrame) -> str:
    """``ipl eval-lens``'s table: KL to the final policy per (site, layer), a column per lens.

    Rounding error just below zero prints as 0.0000, not -0.0000.
    """
    wide = table.pivot_table(index=["site", "layer"], columns="lens", values="kl_final_internal")
    wide = wide[[lens for lens in LENSES if lens in wide.columns]]
    return wide.to_string(float_format=lambda v: f"{v:.4f}".replace("-0.0000", "0.0000"))


def run_eval_lens(cfg: EvalLensConfig) -> pd.DataFrame:
    """Every registered lens (raw, norm, tuned...) on the same held-out tokens; ``EVAL_COLUMNS``.

    One row per (layer, site, lens); the lenses that read a folder use ``cfg.lens_path``'s.

    Writes ``lens_eval.csv`` and ``lens_eval.png``/``.pdf`` to ``cfg.out`` when it is given.
    """
    folder = None if cfg.out is None else Folder(cfg.out).check_writable()  # before any work
    if cfg.lens_path is not None and not Path(cfg.lens_path).is_dir():
        raise LensFolderError(f"{cfg.lens_path}: no such lens folder; {FIT_HINT}")
    identity = None if folder is None else _eval_identity(cfg)
    if identity is not None and not cfg.force and _holds(folder, identity):
        _log.info(
            "nothing to do: %s/ holds this evaluation, complete (same model, lens and data); "
            "nothing was changed, pass --force to evaluate again",
            cfg.out,
        )
        return renamed_columns(pd.read_csv(folder.path / "lens_eval.csv"), LENS_EVAL_RENAMES)
    model = load_model(cfg.model, dtype="float32", device=cfg.device)
    lens_path = lens_folder(cfg.lens_path, model.name)
    translators, meta = read_lens(lens_path, model)  # refuses a missing folder
    held = set(meta.get("heldout", {}).get("samples", []))
    data = cfg.data
    if data is None:
        data = Path(lens_path) / "responses.jsonl"
        if not data.is_file():
            raise FileNotFoundError(f"{data}: missing; pass --data with records and responses")
    records = read_records(data, max_samples=cfg.max_samples)
    if cfg.data is None or sha256(data) == meta.get("data_sha256"):
        records = [r for r in records if r["sample_id"] in held]  # never fitted on
    if not records or any(r["response"] is None for r in records):
        raise ValueError(
            f"{data}: eval-lens needs records with responses (none held out, or some without "
            "a response); pass --data with responses, e.g. an ipl entropy run's responses.jsonl"
        )
    keys = [key for key in translators if key != ("resid_post", model.n_layers - 1)]
    keys.append(("resid_post", model.n_layers - 1))
    rows = collect_rows(model, records, keys, cfg.batch_size)
    lenses = [
        Lens(model, kind, "exact", translators if kind.needs_folder else None)
        for kind in LENSES.values()
    ]
    table = pd.concat([lens_metrics(lens, rows) for lens in lenses], ignore_index=True)
    table["site"] = pd.Categorical(table["site"], categories=SITES)
    table = table.sort_values(["site", "layer"], kind="stable").reset_index(drop=True)
    table["site"] = table["site"].astype(str)
    table = table[list(EVAL_COLUMNS)]
    if folder is not None:
        from ..analysis.figures import save_figure
        from ..analysis.plots import lens_quality

        with folder.lock():  # one writer per output folder
            folder.write_csv("lens_eval.csv", table)
            save_figure(lens_quality(table), folder.path / "lens_eval")
            if identity is not None:
                folder.write_json(EVAL_META, identity)
    return table


def _holds(folder: Folder, identity: dict) -> bool:
    """Whether ``folder`` holds a finished evaluation of ``identity``."""
    files = (folder.path / "lens_eval.csv", folder.path / EVAL_META)
    return all(f.is_file() for f in files) and folder.read_json(EVAL_META) == identity


def _eval_identity(cfg: EvalLensConfig) -> dict | None:
    """What defines an evaluation: its settings and the hashes of the lens folder and data.

    None where the lens folder is not known before the model loads (a hub model's default).
    """
    lens_path = lens_folder(cfg.lens_path, cfg.model)
    if lens_path is None:
        return None
    data = Path(cfg.data) if cfg.data else Path(lens_path) / "responses.jsonl"
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("out", "device", "force")}
    return {
        "config": settings,
        "lens_sha256": folder_hash(lens_path),
        "data_sha256": sha256(data) if data.is_file() else None,
    }


def fit(cfg: FitLensConfig, progress: bool) -> str:
    """Fit (or find complete) the lens; say where it is and its held-out KL against norm."""
    meta = run_fit_lens(cfg, progress=progress)
    reused = bool(meta.get("reused"))
    lines = []
    if reused:
        lines.append(
            f"Nothing to do: {cfg.out}/ holds this lens, complete (same configuration, finished "
            f"{meta.get('finished')}); nothing was changed. Pass --force to fit it again."
        )
    rows = meta["heldout"]["evaluation"]
    kl = {
        # lens.json files written before the KL was named by direction call it kl_to_final
        lens: [r.get("kl_final_internal", r.get("kl_to_final")) for r in rows if r["lens"] == lens]
        for lens in ("norm", "tuned")
    }
    mean = {lens: sum(values) / len(values) for lens, values in kl.items()}
    lines.append(
        f"{'has' if reused else 'wrote'} {len(meta['translators'])} translators "
        f"{'in' if reused else 'to'} {cfg.out}/ ({meta['fit_seconds']} s); "
        f"held-out mean KL(final || lens) over them: norm {mean['norm']:.4f}, "
        f"tuned {mean['tuned']:.4f} nats"
    )
    if mean["tuned"] > mean["norm"]:
        _warn_worse(kl, mean)
    return "\n".join(lines)


def _warn_worse(kl: dict[str, list[float]], mean: dict[str, float]) -> None:
    """Warn that the fitted translators read the held-out tokens worse than the norm lens does.

    Translators start at the identity (the norm lens), so a worse tuned lens was fitted on too
    few tokens or steps, or with too large a step.
    """
    worse = sum(t > n for n, t in zip(kl["norm"], kl["tuned"]))
    warnings.warn(
        f"on the held-out records the tuned lens is further from the final policy than the "
        f"norm lens (mean KL {mean['tuned']:.4f} > {mean['norm']:.4f} nats; worse at {worse} of "
        f"{len(kl['norm'])} translators): fit on more records or steps, or lower --lr",
        stacklevel=2,
    )


def evaluate(cfg: EvalLensConfig) -> str:
    """Evaluate the lenses; the KL table, and where the results went."""
    table = run_eval_lens(cfg)
    lines = ["KL(final || lens), nats, per site and layer:", kl_text(table)]
    if cfg.out is not None:
        lines.append(f"results in {cfg.out}/: lens_eval.csv and lens_eval.png/.pdf")
    return "\n".join(lines)
