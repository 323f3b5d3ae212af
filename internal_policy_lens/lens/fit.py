"""Fitting a tuned lens, and measuring how well any lens predicts the model's own policy.

:func:`fit_lens` trains one translator per (site, layer) (see :mod:`.tuned`) to minimise
KL(final || translated), the model frozen, on the response tokens of a set of records, and
writes the lens folder with its held-out evaluation. The optimiser is the tuned-lens package's
(:class:`~internal_policy_lens.config.FitLensConfig`). Every translator sees the same token
batch; the loss is the sum of their mean KLs, and since SGD updates each parameter from its own
gradient, the translators train independently, as in the package.

The site vectors of all fit tokens are collected once (one forward pass per batch of records)
and held in memory: on the bundled models 400 records are ~16k tokens, ~50 MB per 25 sites.
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..config import FitLensConfig, derive_seed
from ..data.encode import encode_inputs
from ..folders import Folder, FolderState, folder_state, now, versions
from ..lens_kinds import Norm, Tuned
from ..model.batch import pad
from ..model.load import PolicyModel
from ..statistics import Request
from .capture import capture
from .logprob import lens_logprobs
from .reduce import site_stats
from .sites import SiteKey, resolve_sites
from .stats import kept_positions
from .tuned import LENS_FORMATS, META, fitted_keys, model_facts, write_lens, zero_translators
from .unembed import Lens

CHECKPOINT, CHECKPOINT_META = "checkpoint.safetensors", "checkpoint.json"


@dataclass
class Rows:
    """Response-token rows of a set of records: site vectors and what the lens is measured on."""

    acts: dict[SiteKey, torch.Tensor]  # key -> [rows, d_model]
    final: torch.Tensor  # [rows, d_model] the final norm's output (the model's own policy)
    next_ids: torch.Tensor  # [rows] the actual next token
    samples: list  # sample ids of the records

    def __len__(self) -> int:
        return len(self.next_ids)


@torch.no_grad()
def collect_rows(
    model: PolicyModel, records: Sequence[dict], keys: Sequence[SiteKey], batch_size: int = 16
) -> Rows:
    """Site vectors of ``keys`` (float32) at the positions that predict response tokens."""
    final_key = ("final", model.n_layers - 1)
    wanted = [*keys, final_key]
    encoded = encode_inputs(model.tokenizer, list(records))
    parts: dict[SiteKey, list] = {key: [] for key in wanted}
    nexts = []
    for start in range(0, len(encoded), batch_size):
        batch = encoded[start : start + batch_size]
        ids, mask = pad(
            [e.input_ids for e in batch], model.tokenizer.pad_token_id, model.device, side="right"
        )
        rows_b, rows_t = kept_positions(batch, mask, True).nonzero(as_tuple=True)
        with capture(model, keys=wanted) as acts:
            model.forward(ids, mask)
        for key in wanted:
            parts[key].append(acts[key][rows_b, rows_t].float().cpu())
        nexts.append(ids[rows_b, rows_t + 1].cpu())
    vectors = {key: torch.cat(parts[key]) for key in wanted}
    final = vectors.pop(final_key)
    return Rows(vectors, final, torch.cat(nexts), [e.sample_id for e in encoded])


def kl_final_internal(
    lens: Lens, x: torch.Tensor, key: SiteKey, target: torch.Tensor
) -> torch.Tensor:
    """KL(final || lens) per row ``[rows]`` (nats), ``target`` the final log-probabilities."""
    logp = lens_logprobs(lens, x, *key).all  # [rows, vocab]
    return (target.exp() * (target - logp)).sum(-1)


@torch.no_grad()
def lens_metrics(lens: Lens, rows: Rows, chunk: int = 4096) -> pd.DataFrame:
    """Per (layer, site): mean KL(final || lens), next-token cross-entropy, top-1 agreement.

    Through the reduction dispatcher, ``chunk`` logits rows at once (every site's and the final
    policy's).
    """
    n = len(rows)
    # The final site's layer plays no part in its logits (it is the final norm's output).
    final = ("final", max((layer for _, layer in rows.acts), default=0))
    acts = {key: x[None] for key, x in [*rows.acts.items(), (final, rows.final)]}  # [1, n, d]
    place = {"dtype": torch.long, "device": rows.final.device}
    index = (torch.zeros(n, **place), torch.arange(n, **place))
    request = Request(("kl_final_internal", "next_token_logprob", "top1_agrees"))
    stats = site_stats(
        lens, acts, list(acts), index, request, next_ids=rows.next_ids, chunk_tokens=chunk
    )
    out = []
    for key in rows.acts:
        columns = stats[key]
        site, layer = key
        out.append(
            dict(
                layer=layer,
                site=site,
                lens=lens.name,
                kl_final_internal=_mean(columns["kl_final_internal"], n),
                next_token_ce=-_mean(columns["next_token_logprob"], n),
                top1_agrees=_mean(columns["top1_agrees"], n),
            )
        )
    return pd.DataFrame(out)


def _mean(values: np.ndarray, n: int) -> float:
    return float(values.sum(dtype=np.float64)) / max(n, 1)


def split_records(records: Sequence[dict], share: float, seed: int) -> tuple[list, list]:
    """``(fit, held_out)``: a seeded share of the records (at least one) is held out."""
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_held = max(1, round(share * len(records))) if len(records) > 1 else 0
    held = set(order[:n_held])
    return (
        [r for i, r in enumerate(records) if i not in held],
        [r for i, r in enumerate(records) if i in held],
    )


def check_fit_config(cfg: FitLensConfig) -> tuple[str, ...]:
    """Validate the sites and format before any work; return the sites in canonical order."""
    sites = resolve_sites(cfg.sites)
    if "final" in sites:
        raise ValueError("the final site is the model's own policy: it has no translator")
    if cfg.format not in LENS_FORMATS:
        raise ValueError(
            f"unknown lens format '{cfg.format}'; use one of {', '.join(LENS_FORMATS)}"
        )
    if cfg.format == "tuned-lens" and sites != ("resid_pre", "resid_post"):
        raise ValueError(
            "the tuned-lens format holds resid_pre[0] and resid_post translators only; "
            "use --sites resid_pre,resid_post with it, or --format ipl"
        )
    return sites


def fit_lens(
    model: PolicyModel,
    records: Sequence[dict],
    cfg: FitLensConfig | None = None,
    *,
    data_sha256: str | None = None,
    progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
) -> dict:
    """Fit (or resume fitting) a tuned lens on ``records`` (with responses); write ``cfg.out``.

    Args:
        model: the model, frozen during the fit (its parameters' ``requires_grad`` restored).
        records: records with a ``response``; a seeded ``cfg.heldout`` share is held out.
        cfg: the fit's settings (default :class:`FitLensConfig`); ``cfg.out`` is the folder.
        data_sha256: recorded in lens.json (the data file's hash).
        progress: show a progress bar with the current mean KL.
        on_step: called as ``on_step(step, mean_kl)`` after every optimiser step.

    Returns:
        The lens folder's ``lens.json`` content (with the held-out evaluation).
    """
    cfg = cfg or FitLensConfig()
    if any(r.get("response") is None for r in records):
        raise ValueError("fit_lens needs records with responses (ipl fit-lens generates them)")
    if len(records) < 2:
        raise ValueError(f"{cfg.data}: a fit needs at least 2 records (one is held out)")
    sites = check_fit_config(cfg)
    keys = fitted_keys(sites, model.n_layers)
    out = Folder(cfg.out).create()
    done = _start_folder(out, cfg)
    if done is not None:
        return done
    fit, held = split_records(records, cfg.heldout, cfg.seed)
    started = time.perf_counter()
    with _frozen(model):
        rows = collect_rows(model, fit, keys, cfg.batch_size)
        translators = _train(model, rows, keys, cfg, out, progress, on_step)
        heldout = collect_rows(model, held, keys, cfg.batch_size)
        lenses = [Lens(model, Norm), Lens(model, Tuned, translators=translators)]
        evaluation = pd.concat([lens_metrics(lens, heldout) for lens in lenses])
    meta = {
        "model": model_facts(model),
        "sites": list(sites),
        "layers": sorted({layer for _, layer in keys}),
        "translators": [f"{s}.{i}" for s, i in keys],
        "data": cfg.data,
        "data_sha256": data_sha256,
        "config": cfg.identity(),
        "heldout": {
            "samples": [r["sample_id"] for r in held],
            "tokens": len(heldout),
            "evaluation": evaluation.to_dict("records"),
        },
        "fit_tokens": len(rows),
        "fit_seconds": round(time.perf_counter() - started, 1),
        "finished": now(),
        "versions": versions(),
    }
    write_lens(out.path, translators, meta, cfg.format)
    for name in (CHECKPOINT, CHECKPOINT_META):
        (out.path / name).unlink(missing_ok=True)
    return out.read_json(META)


def _train(model, rows: Rows, keys, cfg: FitLensConfig, out: Folder, progress, on_step):
    """SGD with Nesterov momentum over ``cfg.steps`` steps; checkpoints every ``save_every``."""
    translators = zero_translators(keys, model.d_model, device=model.device)
    params = [t for key in keys for t in translators[key]]
    for p in params:
        p.requires_grad_(True)
    base_lr = cfg.lr * (1 - cfg.momentum)
    opt = torch.optim.SGD(
        params, lr=base_lr, momentum=cfg.momentum, nesterov=True, weight_decay=cfg.weight_decay
    )
    start = _resume(out, cfg, keys, translators, opt)
    lens = Lens(model, Tuned, "exact", translators)
    lens.translators = translators  # the trained tensors themselves, not copies
    bar = tqdm(total=cfg.steps, initial=start, desc="fit-lens", unit="step", disable=not progress)
    for step in range(start, cfg.steps):
        # One batch of token rows, the same for every translator; seeded by the step.
        gen = torch.Generator().manual_seed(derive_seed(cfg.seed, step))
        batch = torch.randperm(len(rows), generator=gen)[: cfg.batch_tokens]
        with torch.no_grad():  # the rows wait on the host; a batch of them goes to the model
            target = lens_logprobs(lens, rows.final[batch].to(model.device), "final").all
        loss = sum(
            kl_final_internal(lens, rows.acts[key][batch].to(model.device), key, target).mean()
            for key in keys
        )
        for group in opt.param_groups:  # linear decay to zero, no warm-up
            group["lr"] = base_lr * (1 - step / cfg.steps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        mean_kl = float(loss.detach()) / len(keys)
        bar.update(1)
        bar.set_postfix(kl=f"{mean_kl:.4f}")
        if (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
            _save_checkpoint(out, cfg, keys, translators, opt, step + 1)
        if on_step is not None:
            on_step(step + 1, mean_kl)
    bar.close()
    return {key: (a.detach(), b.detach()) for key, (a, b) in translators.items()}


def fit_state(out: Folder, cfg: FitLensConfig) -> tuple[FolderState, dict | None]:
    """What a fit does with its folder, and the finished lens's lens.json (or the checkpoint's).

    A finished lens (lens.json) is complete; a checkpoint alone is a fit to resume.

    Raises:
        FolderConfigError: the folder holds a lens fitted with another configuration and
            ``cfg.overwrite`` is not set.
    """
    record = next((out.path / n for n in (META, CHECKPOINT_META) if (out.path / n).is_file()), None)
    old = None if record is None else out.read_json(record.name)
    state = folder_state(
        record,
        None if old is None else old.get("config", {}),
        cfg.identity(),
        complete=record is not None and record.name == META,
        overwrite=cfg.overwrite,
        force=cfg.force,
        holds="the folder holds a lens fitted",
    )
    return state, old


def _start_folder(out: Folder, cfg: FitLensConfig) -> dict | None:
    """The finished lens's lens.json if this fit is done already; refuse another fit's folder.

    With ``cfg.force`` a fit of the same configuration starts over, finished or not.
    """
    state, old = fit_state(out, cfg)
    if state is FolderState.COMPLETE:
        return old
    if state is FolderState.REDO:
        for stale in (META, CHECKPOINT, CHECKPOINT_META):
            (out.path / stale).unlink(missing_ok=True)
    return None


def _save_checkpoint(out: Folder, cfg, keys, translators, opt, step: int) -> None:
    tensors = {}
    for key in keys:
        for name, param in zip(("weight", "bias"), translators[key]):
            tensors[f"{key[0]}.{key[1]}.{name}"] = param.detach().clone()
            tensors[f"{key[0]}.{key[1]}.{name}.momentum"] = opt.state[param]["momentum_buffer"]
    with out.atomic(CHECKPOINT) as tmp:
        save_file(tensors, str(tmp))
    out.write_json(CHECKPOINT_META, {"step": step, "config": cfg.identity()})


def _resume(out: Folder, cfg, keys, translators, opt) -> int:
    """Load the last checkpoint into ``translators`` and ``opt``; return its step (0 if none)."""
    path = out.path / CHECKPOINT_META
    if not path.is_file() or not (out.path / CHECKPOINT).is_file():
        return 0
    saved = out.read_json(CHECKPOINT_META)
    tensors = load_file(str(out.path / CHECKPOINT))
    with torch.no_grad():
        for key in keys:
            for name, param in zip(("weight", "bias"), translators[key]):
                param.copy_(tensors[f"{key[0]}.{key[1]}.{name}"])
                momentum = tensors[f"{key[0]}.{key[1]}.{name}.momentum"]
                opt.state[param]["momentum_buffer"] = momentum.to(param.device)
    return int(saved["step"])


@contextlib.contextmanager
def _frozen(model: PolicyModel):
    """No gradients into the model's parameters (their flags restored afterwards)."""
    params = list(model.bridge.parameters())
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
