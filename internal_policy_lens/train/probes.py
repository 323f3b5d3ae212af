"""Training probes: the internal policies of a fixed probe set, measured while a model trains.

At step 0 a seeded set of probe prompts is drawn and one response per prompt is sampled from
the starting model; both are kept in ``RUN/probe_set.jsonl`` (a resumed run reuses them). Every
probe then reads the same (prompt, response) tokens, without gradients, and appends long rows to
``RUN/probes.parquet`` (:data:`PROBE_COLUMNS`). Every quantity is a mean over the response
tokens (the positions that predict a response token), pooled over the probe set:

- ``entropy_resid_post``, ``entropy_attn_out``, ``entropy_mlp_out``: entropy (nats) of each
  layer's policy at that site, through :func:`~internal_policy_lens.tables.entropy_table`;
- ``delta_layer``, ``delta_attn``, ``delta_ffn``: the entropy change of each layer and module
  (:func:`~internal_policy_lens.tables.delta_table`);
- ``cos_hidden``: cos(H^k, H^j) of the ``resid_post`` vectors, k the trained layer, j > k
  (``layer`` = k, ``other_layer`` = j);
- ``kl_layer_other``: KL(pi^k || pi^j) = sum_v pi^k(v) (log pi^k(v) - log pi^j(v)), nats, the
  policies read through the run's lens (the same :class:`~internal_policy_lens.lens.unembed.Lens`
  as the tables), reduced by the dispatcher (:func:`~internal_policy_lens.lens.reduce.site_stats`);
- ``perplexity``: exp of the mean negative log-likelihood of the response tokens under the
  model's own policy pi_theta (``layer`` empty).

A probe's step is the number of optimiser steps taken (the checkpoint ``step-N`` holds the
weights it read). Torch's random state is restored after each probe, so training is unchanged.
The built-in loop probes through :class:`Prober`; so does the TRL callback
(:class:`~internal_policy_lens.integrations.trl.InternalPolicyCallback`), over a
:func:`~internal_policy_lens.model.load.policy_view` of the trainer's live weights.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from ..config import BupoConfig, LensSettings, derive_seed
from ..data.encode import encode_inputs
from ..data.records import read_records
from ..folders import Folder
from ..lens.capture import capture
from ..lens.reduce import site_stats
from ..lens.stats import kept_positions
from ..lens.tuned import make_lens
from ..model.batch import pad
from ..model.generate import sample
from ..model.load import PolicyModel
from ..statistics import PROBE_RENAMES, Request, renamed_values
from ..tables import delta_table, entropy_table

PROBES = "probes.parquet"
PROBE_SET = "probe_set.jsonl"
PROBE_COLUMNS: tuple[str, ...] = ("step", "quantity", "layer", "other_layer", "value")
_PROBE_SEED = -1  # derive_seed index of the probe set (training steps use 0, 1, ...)
_ENTROPY_SITES = ("resid_post", "attn_out", "mlp_out")


@dataclass(frozen=True)
class ProbePlan:
    """What a run probes and how its probe set is drawn."""

    every: int
    """Probe at step 0 and every ``every`` steps."""
    data: str | list[dict]
    """A records file, or records (dicts with a ``prompt``), the probe prompts are drawn from."""
    samples: int
    """Probe prompts drawn."""
    seed: int
    """The run's seed (the draw and the sampling use :func:`derive_seed` of it)."""
    temperature: float
    """Sampling temperature of the probe responses."""
    max_new_tokens: int
    """Longest probe response."""
    lens: str
    """Lens of the internal policies."""

    @classmethod
    def of(cls, cfg: BupoConfig) -> ProbePlan:
        """The probes of an ``ipl train-bupo`` run (the training data by default)."""
        return cls(
            every=cfg.probe_every,
            data=cfg.probe_data or cfg.data,
            samples=cfg.probe_samples,
            seed=cfg.seed,
            temperature=cfg.temperature,
            max_new_tokens=cfg.max_new_tokens,
            lens=cfg.lens,
        )


class Prober:
    """The probes of one training run: the probe set, the rows so far, and when to probe.

    ``model`` may be replaced between probes (the TRL callback sets a fresh view when the
    trainer's parameters change); rows of steps at or after ``start`` are dropped (redone).
    """

    def __init__(self, plan: ProbePlan, model: PolicyModel, layer: int, out: Path, start: int):
        self.plan, self.model, self.layer, self.folder = plan, model, layer, Folder(out)
        self.settings = LensSettings(lens=plan.lens)
        self.records: list[dict] | None = None  # read or sampled by the first probe (timed)
        rows = None
        if (self.folder.path / PROBES).is_file():
            rows = pd.read_parquet(self.folder.path / PROBES)
            rows = renamed_values(rows, "quantity", PROBE_RENAMES)
            rows = rows[rows["step"] < start]  # later probes are redone, as their steps are
        self.rows = rows if rows is not None else pd.DataFrame(columns=list(PROBE_COLUMNS))

    def due(self, step: int) -> bool:
        """Whether a probe runs at ``step`` (0 and every ``plan.every`` steps)."""
        return step % self.plan.every == 0

    def __call__(self, step: int) -> float:
        """Probe the model at ``step``, write ``probes.parquet``; return the seconds it took."""
        t0 = time.perf_counter()
        if self.records is None:
            self.records = probe_set(self.model, self.plan, self.folder)
        devices = [self.model.device] if self.model.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            rows = probe_rows(self.model, self.records, self.layer, self.settings)
        rows.insert(0, "step", step)
        self.rows = pd.concat([self.rows, rows], ignore_index=True) if len(self.rows) else rows
        self.folder.create().write_parquet(PROBES, self.rows)
        return time.perf_counter() - t0


def probe_set(model: PolicyModel, plan: ProbePlan, folder: Folder) -> list[dict]:
    """The run's probe records ``{sample_id, prompt, response}``: read back, or drawn and sampled.

    ``plan.samples`` records of ``plan.data``, drawn with the run's seed; one response each,
    sampled from ``model`` at the plan's temperature.
    """
    if (folder.path / PROBE_SET).is_file():
        return folder.read_lines(PROBE_SET)
    source = plan.data
    records = read_records(source) if isinstance(source, (str, Path)) else list(source)
    if not records:
        raise ValueError(f"{_name(source)}: no record to probe with")
    if not all(isinstance(r, dict) and "prompt" in r for r in records):
        raise ValueError(f"{_name(source)}: every probe record needs a 'prompt'")
    rng = random.Random(derive_seed(plan.seed, _PROBE_SEED))
    chosen = rng.sample(records, min(plan.samples, len(records)))
    with torch.random.fork_rng(devices=[model.device] if model.device.type == "cuda" else []):
        responses = sample(
            model,
            [r["prompt"] for r in chosen],
            samples=1,
            temperature=plan.temperature,
            max_new_tokens=plan.max_new_tokens,
            seed=derive_seed(plan.seed, _PROBE_SEED),
        )
    out = [
        {"sample_id": f"probe-{i}", "prompt": r["prompt"], "response": text[0]}
        for i, (r, text) in enumerate(zip(chosen, responses))
    ]
    folder.create().write_text(PROBE_SET, "".join(_json_line(r) for r in out))
    return out


def probe_rows(
    model: PolicyModel, records: list[dict], layer: int, settings: LensSettings
) -> pd.DataFrame:
    """One probe: rows ``quantity, layer, other_layer, value`` (see the module docstring)."""
    was_training = model.bridge.training
    model.bridge.eval()
    try:
        tokens = entropy_table(
            model, records, response_only=True, extras=True, settings=settings, batch_size=8
        )
        pairs = pairwise(model, records, layer, settings)
    finally:
        model.bridge.train(was_training)
    parts = []
    site = tokens["site"].astype(str)
    for name in _ENTROPY_SITES:
        means = tokens[site == name].groupby("layer")["entropy"].mean()
        parts.append(_long(f"entropy_{name}", means))
    deltas = delta_table(tokens)
    for module in ("layer", "attn", "ffn"):
        rows = deltas[deltas["module"].astype(str) == module]
        parts.append(_long(f"delta_{module}", rows.groupby("layer")["delta"].mean()))
    for quantity, values in pairs.items():
        parts.append(
            pd.DataFrame(
                {
                    "quantity": quantity,
                    "layer": layer,
                    "other_layer": list(values),
                    "value": list(values.values()),
                }
            )
        )
    logprob = tokens.loc[site == "final", "next_token_logprob"]
    parts.append(pd.DataFrame({"quantity": ["perplexity"], "value": [np.exp(-logprob.mean())]}))
    out = pd.concat(parts, ignore_index=True)
    for column in ("layer", "other_layer"):
        out[column] = out[column].astype("Int16")
    return out[list(PROBE_COLUMNS[1:])]


@torch.no_grad()
def pairwise(
    model: PolicyModel, records: list[dict], layer: int, settings: LensSettings
) -> dict[str, dict[int, float]]:
    """``cos_hidden`` and ``kl_layer_other`` of ``layer`` with every later layer, token means.

    The ``resid_post`` vectors of the response positions are captured in one forward pass per
    batch; KL(pi^layer || pi^j) is reduced by the dispatcher through the run's lens.
    """
    lens = make_lens(model, settings)
    later = range(layer + 1, model.n_layers)
    keys = [("resid_post", j) for j in range(layer, model.n_layers)]
    # [later layers] cosine sums, kept on the device and copied to the host once
    cos_sums = torch.zeros(len(later), dtype=torch.float64, device=lens.weight.device)
    kl_sums = np.zeros(len(later))
    count = 0
    encoded = encode_inputs(model.tokenizer, records)
    for start in range(0, len(encoded), 8):
        batch = encoded[start : start + 8]
        ids, mask = pad(
            [e.input_ids for e in batch], model.tokenizer.pad_token_id, model.device, side="right"
        )
        index = kept_positions(batch, mask, True).nonzero(as_tuple=True)  # [n] each
        if len(index[0]) == 0:
            continue
        with capture(model, keys=keys) as acts:
            model.forward(ids, mask)
        # KL(pi^layer || pi^j): the reference's side of the KL, "final" in the registry's name.
        request = Request(("kl_final_internal",), reference=keys[0])
        stats = site_stats(lens, acts, keys, index, request)
        base = _rows(acts, keys[0], index, cos_sums.device)
        for i, key in enumerate(keys[1:]):
            cos_sums[i] += F.cosine_similarity(base, _rows(acts, key, index, base.device)).sum()
            kl_sums[i] += stats[key]["kl_final_internal"].sum(dtype=np.float64)
        count += len(index[0])
    sums = [cos_sums.tolist(), kl_sums.tolist()]
    return {
        name: {j: total / max(count, 1) for j, total in zip(later, row)}
        for name, row in zip(("cos_hidden", "kl_layer_other"), sums)
    }


def _rows(acts, key, index, device: torch.device) -> torch.Tensor:
    """The float64 rows ``[n, d_model]`` of ``key`` picked by ``index``, on ``device``."""
    x = acts[key]  # [batch, pos, d_model]
    return x[index[0].to(x.device), index[1].to(x.device)].to(device).double()


def _long(quantity: str, means: pd.Series) -> pd.DataFrame:
    return pd.DataFrame(
        {"quantity": quantity, "layer": means.index.astype(int), "value": means.to_numpy()}
    )


def _name(source) -> str:
    return str(source) if isinstance(source, (str, Path)) else "probe_data"


def _json_line(record: dict) -> str:
    return json.dumps(record, ensure_ascii=False) + "\n"
