"""Training probes on any TRL ``GRPOTrainer``: :class:`InternalPolicyCallback`.

The callback runs the built-in trainer's probes (:mod:`internal_policy_lens.train.probes`) on
the trainer's live weights, through a :func:`~internal_policy_lens.model.load.policy_view`: at
the start of training and every ``probe_every`` optimiser steps it measures the probe set and
rewrites ``output_dir/probes.parquet`` (long rows ``step, quantity, layer, other_layer, value``).
A few headline numbers go through the trainer's own logging (``state.log_history``, the
``on_log`` of the callbacks after this one). Only the main process probes and writes; the probe
is a local forward without gradients that calls no collective, so other processes never wait
on it.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from transformers import TrainerCallback

from ...config import ProbeSettings
from ...folders import Folder
from ...lens_kinds import model_lens
from ...model.load import PolicyModel, policy_view
from ...train.layer import suggested_layer
from ...train.probes import ProbePlan, Prober, probe_set


class InternalPolicyCallback(TrainerCallback):
    """Probe the internal policies of the model a ``trl.GRPOTrainer`` trains.

    Args:
        probe_every: probe at step 0 and every N steps (N >= 1).
        probe_data: a records file (JSONL, Parquet, CSV) or a list of records (dicts with a
            ``prompt``) the probe prompts are drawn from; default: the ``prompt`` column of the
            trainer's training dataset.
        probe_samples: probe prompts drawn (with ``args.seed``), one response each, sampled at
            the first probe with the trainer's ``temperature`` and ``max_completion_length`` and
            kept in ``output_dir/probe_set.jsonl`` (a resumed run reuses it).
        layer: k of ``cos_hidden`` and ``kl_layer_other`` (0-based); default: the layer the paper's
            rule suggests on the probe set (:func:`~internal_policy_lens.train.layer.
            suggested_layer`). When the entropies suggest none, training stops with a
            ValueError asking for ``layer=K``.
        lens: ``raw`` (the paper's) or ``norm``.
        output_dir: where ``probes.parquet`` and ``probe_set.jsonl`` go; default the trainer's
            ``args.output_dir``.
        step_unit: optimiser steps per step of the table: the table's step is ``global_step //
            step_unit`` and ``probe_every`` counts those steps. ``ipl train-bupo --engine trl``
            passes its optimiser steps per rollout step, so its probes' steps match
            ``metrics.jsonl``; 1 (the default) records optimiser steps.

    After a probe at step s >= 1 the trainer logs at that step (``control.should_log``), with
    :data:`HEADLINE` keys added to the step's ``state.log_history`` entry and to the ``logs`` the
    callbacks after this one receive; the step-0 probe gets its own ``state.log_history``
    entry. Transformers puts the ``report_to`` reporters (wandb, tensorboard...) before the
    callbacks a trainer is given: :meth:`attach` adds the callback ahead of them instead.
    ``times`` maps each step this process probed to the probe's seconds.
    """

    def __init__(
        self,
        probe_every: int = ProbeSettings.probe_every,
        probe_data: str | Path | list[dict] | None = None,
        probe_samples: int = ProbeSettings.probe_samples,
        layer: int | None = None,
        lens: str = ProbeSettings.lens,
        *,
        output_dir: str | Path | None = None,
        step_unit: int = 1,
    ):
        if probe_every < 1 or probe_samples < 1 or step_unit < 1:
            raise ValueError("probe_every, probe_samples and step_unit must be at least 1")
        model_lens(lens)  # the probes' lens is the one BuPO trains through
        self.probe_every, self.probe_samples, self.step_unit = probe_every, probe_samples, step_unit
        self.probe_data, self.layer, self.lens, self.output_dir = (
            probe_data,
            layer,
            lens,
            output_dir,
        )
        self.prober: Prober | None = None
        self.pending: dict[str, float] | None = None  # headline values of a probe not logged yet
        self.times: dict[int, float] = {}
        self._view: tuple[frozenset[int], PolicyModel] | None = None

    def attach(self, trainer) -> InternalPolicyCallback:
        """Add this callback to ``trainer`` ahead of its reporters, so they log the keys too."""
        from transformers.trainer_callback import DefaultFlowCallback

        callbacks = trainer.callback_handler.callbacks
        flow = [i for i, c in enumerate(callbacks) if isinstance(c, DefaultFlowCallback)]
        callbacks.insert(flow[-1] + 1 if flow else 0, self)  # after the flow, which logs
        return self

    def due(self, global_step: int) -> bool:
        """Whether the trainer's ``global_step`` is a probe step (the same on every process)."""
        return (
            global_step % self.step_unit == 0
            and (global_step // self.step_unit) % self.probe_every == 0
        )

    def on_train_begin(self, args, state, control, model=None, processing_class=None, **kwargs):
        """Draw the probe set (main process), settle k, probe the starting weights."""
        step = state.global_step  # 0, or the step of the checkpoint a resumed run starts from
        if not state.is_world_process_zero:
            return
        out = Path(self.output_dir or args.output_dir)
        plan = ProbePlan(
            every=self.probe_every,
            data=self.probe_data if self.probe_data is not None else _prompts(kwargs),
            samples=self.probe_samples,
            seed=args.seed,
            temperature=args.temperature,
            max_new_tokens=args.max_completion_length,
            lens=self.lens,
        )
        view = self._policy(model, processing_class)
        if self.layer is None:
            self.layer = _suggest(view, plan, out)
        if not 0 <= self.layer < view.n_layers:
            raise ValueError(f"layer {self.layer} is out of range (0..{view.n_layers - 1})")
        self.prober = Prober(plan, view, self.layer, out, step // self.step_unit)
        if self.due(step):
            values = self._probe(model, processing_class, step)
            if step == 0:  # training has not logged yet: the step-0 numbers get their own entry
                state.log_history.append({**values, "step": 0})

    def on_step_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        """Probe after a probe step's update (main process); make the step a logging step."""
        if not self.due(state.global_step):
            return
        control.should_log = True  # on every process: logging gathers the loss from all of them
        if state.is_world_process_zero and self.prober is not None:
            self.pending = self._probe(model, processing_class, state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        """Add the pending probe's headline values to the step's log."""
        if self.pending is None or logs is None:
            return
        logs.update(self.pending)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(self.pending)
        self.pending = None

    def _probe(self, model, processing_class, global_step: int) -> dict[str, float]:
        step = global_step // self.step_unit
        self.prober.model = self._policy(model, processing_class)
        seconds = self.prober(step)
        self.times[step] = seconds
        rows = self.prober.rows[self.prober.rows["step"] == step]
        return {**headline(rows, self.layer, self.prober.model.n_layers), "ipl/probe_time": seconds}

    def _policy(self, model, processing_class) -> PolicyModel:
        """The view of the trainer's model; made again only if its parameters were replaced."""
        from accelerate.utils import extract_model_from_parallel

        plain = extract_model_from_parallel(model)  # DDP's module: its forward syncs nothing
        params = frozenset(id(p) for p in plain.parameters())
        if self._view is None or self._view[0] != params:
            self._view = params, policy_view(plain, processing_class)
        return self._view[1]


HEADLINE = (
    "ipl/entropy_resid_post/L{k}",
    "ipl/entropy_resid_post/L{last}",
    "ipl/delta_ffn/L{k}",
    "ipl/cos_hidden/{k}->{last}",
    "ipl/kl_layer_other/{k}->{last}",
    "ipl/perplexity",
    "ipl/probe_time",
)
"""The logged keys (k the probed layer, last the top layer L-1): entropies (nats) of pi^k and of
the top layer's policy at ``resid_post``, the FFN entropy change of layer k, cos(H^k, H^last),
KL(pi^k || pi^last), the perplexity of the probe responses and the probe's seconds. The full
table is ``probes.parquet``."""


def headline(rows: pd.DataFrame, k: int, n_layers: int) -> dict[str, float]:
    """The :data:`HEADLINE` values (but ``probe_time``) of one probe's rows."""
    last = n_layers - 1

    def value(quantity: str, layer=None, other=None) -> float:
        hit = rows["quantity"] == quantity
        if layer is not None:
            hit &= rows["layer"] == layer
        if other is not None:
            hit &= rows["other_layer"] == other
        return float(rows.loc[hit, "value"].iloc[0])

    out = {
        f"ipl/entropy_resid_post/L{k}": value("entropy_resid_post", k),
        f"ipl/entropy_resid_post/L{last}": value("entropy_resid_post", last),
        f"ipl/delta_ffn/L{k}": value("delta_ffn", k),
    }
    if k < last:  # the pairwise quantities need a later layer
        out[f"ipl/cos_hidden/{k}->{last}"] = value("cos_hidden", k, last)
        out[f"ipl/kl_layer_other/{k}->{last}"] = value("kl_layer_other", k, last)
    out["ipl/perplexity"] = value("perplexity")
    return out


def _prompts(kwargs) -> list[dict]:
    """The training dataset's prompts, as records (the default probe data)."""
    loader = kwargs.get("train_dataloader")
    dataset = getattr(loader, "dataset", None)
    names = getattr(dataset, "column_names", None) or []
    if "prompt" not in names:
        raise ValueError(
            "InternalPolicyCallback: the training dataset has no 'prompt' column to probe with; "
            "pass probe_data= (a records file or a list of {'prompt': ...} dicts)"
        )
    return [{"prompt": p} for p in dataset["prompt"]]


def _suggest(view: PolicyModel, plan: ProbePlan, out: Path) -> int:
    """The paper's layer on the probe set's prompts, or a ValueError that asks for ``layer``."""
    records = probe_set(view, plan, Folder(out))  # drawn now, or read back
    try:
        return suggested_layer(view, records, max_new_tokens=plan.max_new_tokens, lens=plan.lens)
    except ValueError as err:
        raise ValueError(
            f"InternalPolicyCallback: no layer can be suggested ({err}); pass layer=K"
        ) from None
