"""BuPO on TRL's distributed GRPO trainer (``pip install internal-policy-lens[trl]``).

:class:`BupoGRPOTrainer` is TRL's ``GRPOTrainer`` whose per-token log-probabilities (old,
reference and current) come from the internal layer policy pi^k for the first
``iterative_steps`` rollout steps (Internal Policy Alignment, paper Eq. 9), then from the full
policy (Eq. 10). Rollouts always come from the full model, through TRL (transformers or vLLM).

pi^k is computed *inside the model's own forward*: while :func:`internal_policy` is active the
decoder stops after layer k and its final norm is replaced by the lens kind's module form
(:meth:`~internal_policy_lens.lens_kinds.LensKind.module`: nothing under the raw lens, the final
norm itself under the norm lens), so the LM head projects ``resid_post[k]`` exactly as
:class:`~internal_policy_lens.lens.unembed.Lens` does. Keeping it
inside the forward is what DDP, DeepSpeed and FSDP need (they track the parameters a forward
uses), and it keeps TRL's fused LM head (log-probs without materialising the logits). Layers above
k and the final norm then take no part in the IPA forward and get no gradient; see
docs/scale-out.md for how each distributed backend is configured for that. The ``ipl train-bupo
--engine trl`` runner is :mod:`~internal_policy_lens.integrations.trl.run`.
"""

from __future__ import annotations

import inspect
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from trl import GRPOConfig, GRPOTrainer

from ...config import BupoConfig
from ...data.answers import math_reward
from ...data.encode import prompt_text
from ...lens_kinds import LensKind, model_lens
from ...model.families import family_of

# The TRL releases this module is tested with (pyproject's ``[trl]`` extra pins the same range).
TESTED_TRL = ("1.16", "1.17")
# Leading parameters of GRPOTrainer._get_per_token_logps_and_entropies, the method overridden.
CONTRACT = ("model", "input_ids", "attention_mask", "logits_to_keep", "batch_size")
# BupoConfig.aggregation -> GRPOConfig.loss_type: bnpo is the token mean of each mini-batch,
# grpo the mean over responses of each response's token mean.
LOSS_TYPES = {"token": "bnpo", "sequence": "grpo"}


def check_trl_contract() -> None:
    """Fail loudly when the installed TRL no longer has what :class:`BupoGRPOTrainer` relies on.

    Raises:
        RuntimeError: naming what changed and the tested TRL range.
    """
    import trl

    method = getattr(GRPOTrainer, "_get_per_token_logps_and_entropies", None)
    found = list(inspect.signature(method).parameters)[1 : len(CONTRACT) + 1] if method else []
    fields = GRPOConfig.__dataclass_fields__
    missing = [
        f
        for f in ("vllm_importance_sampling_correction", "steps_per_generation")
        if f not in fields
    ]
    if found != list(CONTRACT) or missing:
        raise RuntimeError(
            f"TRL {trl.__version__} changed what BuPO overrides: "
            f"GRPOTrainer._get_per_token_logps_and_entropies takes {found or 'nothing'} "
            f"(expected {list(CONTRACT)}), missing GRPOConfig fields {missing}. Install a tested "
            f"release: pip install 'trl>={TESTED_TRL[0]},<{TESTED_TRL[1]}'"
        )
    version = tuple(int(x) for x in trl.__version__.split(".")[:2])
    low, high = (tuple(int(x) for x in v.split(".")) for v in TESTED_TRL)
    if not low <= version < high:
        warnings.warn(
            f"TRL {trl.__version__} is outside the tested range >={TESTED_TRL[0]},<{TESTED_TRL[1]}",
            stacklevel=2,
        )


@contextmanager
def internal_policy(
    model: nn.Module, layer: int, lens: str | LensKind | type[LensKind] = "raw"
) -> Iterator[nn.Module]:
    """While active, ``model``'s forward computes the internal layer policy pi^k.

    The decoder keeps only layers ``0..layer`` (the forward stops after layer k) and its final
    norm is replaced by the lens's module form, so the LM head reads what
    :meth:`~internal_policy_lens.lens.unembed.Lens.inputs` gives for ``resid_post[layer]``
    (``raw``: the vector itself; ``norm``: the final norm is kept, the logit lens). ``model`` is
    a transformers causal LM of a supported architecture, or a PEFT model around one. Restored
    on exit, also on errors.

    Raises:
        ValueError: for a lens not made of the model's weights only, an unsupported
            architecture or a layer out of range.
    """
    kind = model_lens(lens)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        family = family_of(type(base).__name__)
    except KeyError:
        raise ValueError(f"{type(base).__name__} is not a supported architecture") from None
    decoder = base.get_decoder()  # [batch, pos, d_model] out of the final norm, into the LM head
    names = family.layers_attr, family.norm_attr
    layers, norm = (getattr(decoder, name) for name in names)
    if not 0 <= layer < len(layers):
        raise ValueError(f"layer {layer} is out of range (0..{len(layers) - 1})")
    setattr(decoder, names[0], layers[: layer + 1])
    setattr(decoder, names[1], kind.module(norm))
    try:
        yield model
    finally:
        setattr(decoder, names[0], layers)
        setattr(decoder, names[1], norm)


class BupoGRPOTrainer(GRPOTrainer):
    """TRL's GRPOTrainer with BuPO's phases: IPA on layer k, then GRPO.

    Args:
        layer: internal layer k (0-based); None when ``iterative_steps`` is 0 (plain GRPO).
        iterative_steps: s_inter, in rollout steps (generations), as in the built-in loop. The
            IPA phase lasts ``iterative_steps * steps_per_rollout`` optimiser steps, where
            ``steps_per_rollout = steps_per_generation * num_iterations /
            gradient_accumulation_steps``.
        lens: lens of pi^k, ``raw`` (the paper), ``norm`` or another registered lens made of
            the model's weights only.
        *args, **kwargs: as for ``trl.GRPOTrainer``.
    """

    def __init__(
        self, *args, layer: int | None, iterative_steps: int, lens: str | LensKind = "raw", **kwargs
    ):
        check_trl_contract()
        self.layer, self.iterative_steps, self.lens = layer, iterative_steps, lens
        super().__init__(*args, **kwargs)
        window = self.args.steps_per_generation * self.args.num_iterations
        if window % self.args.gradient_accumulation_steps:
            raise ValueError(
                "steps_per_generation * num_iterations must be a multiple of "
                "gradient_accumulation_steps, so that a phase never changes within a generation"
            )
        self.steps_per_rollout = window // self.args.gradient_accumulation_steps
        if iterative_steps and self.args.off_policy_mask_threshold is not None:
            raise ValueError("off_policy_mask_threshold compares with the sampler; off for IPA")
        if iterative_steps:
            with internal_policy(self.accelerator.unwrap_model(self.model), layer, lens):
                pass  # checks the architecture and the layer before any step

    @property
    def in_ipa(self) -> bool:
        """Whether the current optimiser step belongs to the IPA phase."""
        per_rollout = getattr(self, "steps_per_rollout", None)
        if per_rollout is None:  # still in GRPOTrainer.__init__
            return False
        return self.state.global_step < self.iterative_steps * per_rollout

    @property
    def vllm_importance_sampling_correction(self) -> bool:
        """TRL's vLLM sampler correction: it assumes the sampler is pi_theta, so off during IPA."""
        return self._vllm_is_correction and not self.in_ipa

    @vllm_importance_sampling_correction.setter
    def vllm_importance_sampling_correction(self, value: bool) -> None:
        self._vllm_is_correction = value

    def _get_per_token_logps_and_entropies(
        self, model, input_ids, attention_mask, logits_to_keep, *args, **kwargs
    ):
        parent = super()._get_per_token_logps_and_entropies
        if not self.in_ipa:
            return parent(model, input_ids, attention_mask, logits_to_keep, *args, **kwargs)
        with internal_policy(self.accelerator.unwrap_model(model), self.layer, self.lens):
            return parent(model, input_ids, attention_mask, logits_to_keep, *args, **kwargs)


def math_reward_func(completions, answer, **kwargs) -> list[float]:
    r"""TRL reward function: :func:`~internal_policy_lens.data.answers.math_reward` per row."""
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [math_reward(text, a) for text, a in zip(texts, answer)]


def prompt_dataset(records: list[dict], tokenizer):
    """Records -> a ``datasets.Dataset`` with ``prompt`` and ``answer``, rendered as we do.

    With a chat template the prompt stays a list of messages (TRL applies the template, adds the
    generation prompt and no other special token, like ``encode_prompt``); without one it is the
    rendered text (TRL tokenizes it with the tokenizer's special tokens, like ``encode_prompt``).
    """
    from datasets import Dataset

    def trl_prompt(prompt):
        if not getattr(tokenizer, "chat_template", None):
            return prompt_text(tokenizer, prompt)
        return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)

    return Dataset.from_list(
        [{"prompt": trl_prompt(r["prompt"]), "answer": str(r["answer"])} for r in records]
    )


def grpo_config(cfg: BupoConfig, *, world_size: int | None = None, **overrides) -> GRPOConfig:
    """The GRPOConfig that trains like the built-in loop with ``cfg`` on ``world_size`` processes.

    A rollout step generates ``prompts_per_step * group_size`` responses and takes
    ``updates_per_step`` passes over them in mini-batches of ``mini_batch_size`` (split evenly
    over the processes), one optimiser step each. ``overrides`` are GRPOConfig fields.
    """
    world = world_size or int(os.environ.get("WORLD_SIZE", "1"))
    responses = cfg.prompts_per_step * cfg.group_size
    if responses % cfg.mini_batch_size or cfg.mini_batch_size % world:
        raise ValueError(
            f"prompts_per_step * group_size ({responses}) must be a multiple of mini_batch_size "
            f"({cfg.mini_batch_size}), itself a multiple of the number of processes ({world})"
        )
    if cfg.aggregation not in LOSS_TYPES:
        raise ValueError(f"unknown aggregation '{cfg.aggregation}'; use token or sequence")
    per_rollout = responses // cfg.mini_batch_size * cfg.updates_per_step
    use_cpu = cfg.device == "cpu" or not torch.cuda.is_available()
    values = dict(
        output_dir=cfg.out,
        max_steps=cfg.steps * per_rollout,
        per_device_train_batch_size=cfg.mini_batch_size // world,
        gradient_accumulation_steps=1,
        generation_batch_size=responses,
        num_iterations=cfg.updates_per_step,
        num_generations=cfg.group_size,
        max_completion_length=cfg.max_new_tokens,
        temperature=cfg.temperature,
        learning_rate=cfg.lr,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=cfg.warmup_steps,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.grad_clip,
        epsilon=cfg.clip_low,
        epsilon_high=cfg.clip_high,
        loss_type=LOSS_TYPES[cfg.aggregation],
        beta=cfg.kl_coef,
        use_bias_correction_kl=False,  # the built-in KL term is the plain k3 estimator
        scale_rewards="group",
        seed=cfg.seed,
        logging_steps=per_rollout,
        save_strategy="steps",
        save_steps=cfg.save_every * per_rollout,
        report_to="none",
        use_cpu=use_cpu,
        bf16=not use_cpu and torch.cuda.is_bf16_supported(),  # autocast on the GPU only
        # IPA leaves layers above k out of the forward: DDP must look for unused parameters.
        ddp_find_unused_parameters=True if cfg.iterative_steps > 0 else None,
    )
    values.update(overrides)
    return GRPOConfig(**values)
