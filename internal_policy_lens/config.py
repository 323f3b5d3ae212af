"""Configuration dataclasses, one per command; the only copy of the defaults.

The CLI's options default to None and replace only the fields the user gave, so every default
lives here. Nothing here imports torch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace

from .bundled import DEFAULT_MODEL, bundled_data

LENSES: tuple[str, ...] = ("raw", "norm")
"""How a site vector becomes logits (see :class:`~internal_policy_lens.lens.unembed.Lens`)."""
PRECISIONS: tuple[str, ...] = ("auto", "exact", "fast")
"""Precision of the products and reductions (see :class:`LensSettings`)."""


def derive_seed(seed: int, index: int) -> int:
    """The seed of item ``index`` (a step, a generation batch) of a run seeded with ``seed``."""
    return seed * 1_000_003 + index


@dataclass(frozen=True)
class LensSettings:
    """How site vectors become statistics; travels as one object from a run to the reductions."""

    lens: str = "raw"
    """``raw`` (the paper's definition, no final norm) or ``norm`` (logit lens)."""
    precision: str = "auto"
    """``exact`` (float32 products and reductions; float64 for a float64 model), ``fast``
    (products in bf16, or the model's fp16, where the device runs them natively, else in
    float32; reductions in float32; several times faster on CPUs with bf16 instructions, errors
    of a few hundredths of a nat) or ``auto`` (``fast`` for a bf16/fp16 model, else ``exact``).
    ``run.json`` records the dtypes chosen and why."""
    chunk_tokens: int = 1024
    """Logits rows formed at once (the rows of every site of a chunk of tokens, stacked)."""
    capture_mb: float = 512
    """Bound (MiB) on the captured site vectors held at once; above it the layers are taken in
    groups, one forward pass per group (same tables, more forward passes)."""
    attention_mb: float = 256
    """Bound (MiB, float32) on one layer's attention scores; above it the decoder runs over blocks
    of positions with a key/value cache (same tables up to float rounding)."""

    def update(self, **given) -> LensSettings:
        """A copy with the fields that are given (not None) replaced."""
        return replace(self, **{k: v for k, v in given.items() if v is not None})

    def check(self) -> LensSettings:
        """Raise ValueError naming the first unusable field and its valid values; return self."""
        if self.lens not in LENSES:
            raise ValueError(f"unknown lens '{self.lens}'; use one of {', '.join(LENSES)}")
        if self.precision not in PRECISIONS:
            raise ValueError(
                f"unknown precision '{self.precision}'; use one of {', '.join(PRECISIONS)}"
            )
        for name in ("chunk_tokens", "capture_mb", "attention_mb"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, not {getattr(self, name)}")
        return self


@dataclass
class GenerationConfig:
    """How responses are generated for records that have none."""

    max_new_tokens: int = 256
    """Longest response, in tokens."""
    temperature: float = 1.0
    """Sampling temperature; 0 means greedy decoding."""
    top_p: float = 1.0
    """Nucleus sampling mass (1.0 keeps the whole distribution)."""
    samples_per_prompt: int = 1
    """Responses per prompt; with more than one, sample ids become '<id>:<k>'."""
    seed: int = 0
    """Seed of the sampler; each generation batch is seeded from it and its index."""
    batch_size: int = 32
    """Prompts per generation batch."""


@dataclass
class EntropyConfig:
    """One ``ipl entropy`` run: which model, which data, which policies, where to write."""

    model: str = DEFAULT_MODEL
    """Hub name, local folder or bundled model (default: the bundled ipl-tiny-qwen2)."""
    data: str = field(default_factory=lambda: str(bundled_data()))
    """JSONL, Parquet or CSV records (default: 100 bundled held-out arithmetic problems)."""
    out: str = "runs/entropy"
    """Run folder."""
    lens: str = LensSettings.lens
    """``raw`` (the paper's definition, no final norm) or ``norm`` (logit lens)."""
    sites: list[str] | None = None
    """Sites to analyse (default: all eight)."""
    layers: str | None = None
    """Layers, e.g. '0,3,5-7' (default: all)."""
    dtype: str = "auto"
    """Model dtype: auto, float32, bfloat16, float16."""
    device: str = "auto"
    """auto, cpu, cuda, cuda:N."""
    revision: str | None = None
    """Hub revision of the model."""
    batch_size: int = 4
    """Sequences per forward pass of the analysis."""
    chunk_tokens: int = LensSettings.chunk_tokens
    """Logits rows formed at once (see :class:`LensSettings`)."""
    capture_mb: float = LensSettings.capture_mb
    """Bound (MiB) on the captured site vectors held at once (see :class:`LensSettings`)."""
    attention_mb: float = LensSettings.attention_mb
    """Bound (MiB) on one layer's attention scores (see :class:`LensSettings`)."""
    precision: str = LensSettings.precision
    """Precision of the products and reductions (see :class:`LensSettings`)."""
    max_samples: int | None = None
    """Analyse only the first N records."""
    max_length: int | None = None
    """Truncate sequences to this many tokens (default: the model's context length)."""
    response_only: bool = True
    """Keep only positions that predict response tokens (the paper averages over those)."""
    extras: bool = False
    """Add next-token log-prob and rank, KL to the final policy and top-1 agreement."""
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    """Settings for records without a response."""
    overwrite: bool = False
    """Start over in a run folder that holds a run with a different configuration."""
    device_map: str | None = None
    """Split a model larger than one device over the visible devices ('auto', 'balanced')."""
    shard: str | None = None
    """'i/n': analyse only batches b with b % n == i (data parallel; the last shard to finish
    merges). Default: from accelerate's RANK/WORLD_SIZE under ``accelerate launch``, else all."""

    @property
    def settings(self) -> LensSettings:
        """The lens settings of this run, as the one object the analysis takes."""
        return LensSettings(**{f.name: getattr(self, f.name) for f in fields(LensSettings)})

    def identity(self) -> dict:
        """The fields that define the results; a resumed run must match them."""
        out = asdict(self)
        for name in ("overwrite", "out", "device_map", "shard"):
            out.pop(name)
        return out


@dataclass
class ConvergenceConfig:
    """Thresholds of the convergence summary (see ``internal_policy_lens.convergence``)."""

    tau: float = 0.1
    """Half-width (nats) of the integration band: a layer's mean FFN entropy change d is
    exploration when d > tau, convergence when d < -tau, integration otherwise. 0.1 nats is under
    1% of the entropy of a uniform policy over a 150k vocabulary (11.9 nats) and above the
    sampling noise of a layer mean over a few thousand tokens."""
    late_depth: float = 0.9
    """Relative depth from which the entropy drop counts as late (0.9: the last 10% of depth)."""
    abrupt_share: float = 0.5
    """Label a model ``abrupt`` when at least this share of its entropy drop is late."""


@dataclass
class PlotConfig:
    """One ``ipl plot`` call: the figures of a run folder, written to ``RUN/figures/``."""

    run: str
    """Run folder written by ``ipl entropy``."""
    sample: str | None = None
    """Sample id for the token heatmap (default: the run's first sample)."""
    site: str | None = None
    """Site of the token heatmap (default: resid_post, else the first site analysed)."""
    convergence: ConvergenceConfig = field(default_factory=ConvergenceConfig)
    """Thresholds of the stages shaded in the entropy-change figure."""


@dataclass
class CompareConfig:
    """One ``ipl compare`` call: several runs on a relative-depth axis."""

    runs: list[str]
    """Run folders written by ``ipl entropy`` (one model each)."""
    out: str
    """Folder for the comparison figures and ``convergence.csv``."""
    convergence: ConvergenceConfig = field(default_factory=ConvergenceConfig)
    """Thresholds of the convergence summary."""


@dataclass
class BupoConfig:
    """One ``ipl train-bupo`` run (paper Eq. 10). ``iterative_steps=0`` is plain GRPO."""

    model: str = DEFAULT_MODEL
    """Hub name, local folder or bundled model to start from."""
    data: str = field(default_factory=lambda: str(bundled_data("arith_train.jsonl")))
    """Training records with answers (JSONL, Parquet or CSV)."""
    out: str = "runs/bupo"
    """Run folder: metrics.jsonl, checkpoints/, config.json."""
    layer: int | str = "auto"
    """Internal layer k (0-based) for IPA, or 'auto' (the paper's rule on a quick entropy pass)."""
    iterative_steps: int = 5
    """s_inter: steps of Internal Policy Alignment on layer k before plain GRPO."""
    steps: int = 40
    """Total optimisation steps (rollout + updates)."""
    group_size: int = 8
    """G: responses per prompt."""
    prompts_per_step: int = 16
    """Prompts per step."""
    mini_batch_size: int = 32
    """Responses per optimiser step."""
    updates_per_step: int = 1
    """Passes over a step's rollouts."""
    lr: float = 1e-4
    """AdamW learning rate (constant after warm-up)."""
    warmup_steps: int = 0
    """Linear learning-rate warm-up, in optimiser steps."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """Gradient-norm clip."""
    clip_low: float = 0.2
    """eps_low of the ratio clip."""
    clip_high: float = 0.2
    """eps_high of the ratio clip."""
    temperature: float = 1.0
    """Sampling temperature of the rollouts (log-probs use the same temperature)."""
    max_new_tokens: int = 96
    """Longest response."""
    aggregation: str = "token"
    """Loss aggregation: token (the paper's code) or sequence."""
    kl_coef: float = 0.0
    """beta of the KL penalty to the initial model (0 = none, the paper's default)."""
    lens: str = LensSettings.lens
    """Lens of the internal policy during IPA."""
    seed: int = 0
    """Seed of prompt order, sampling and mini-batch order."""
    dtype: str = "float32"
    """Dtype of the trained weights: float32, bfloat16, float16 (auto: float32 on the CPU)."""
    device: str = "auto"
    """auto, cpu, cuda, cuda:N."""
    save_every: int = 10
    """Checkpoint every N steps (and at the end)."""
    resume: bool = False
    """Continue from the latest checkpoint in ``out``."""


@dataclass
class EvalConfig:
    """One ``ipl eval`` run: K samples per problem, Avg@K and unbiased Pass@k."""

    model: str = DEFAULT_MODEL
    """Hub name, local folder, bundled model or a checkpoint folder of ``ipl train-bupo``."""
    data: str = field(default_factory=lambda: str(bundled_data("arith_heldout.jsonl")))
    """Problems with answers (JSONL, Parquet or CSV)."""
    out: str = "runs/eval"
    """Folder for results.csv (per problem), samples.jsonl and metrics.json."""
    samples: int = 8
    """K: samples per problem."""
    temperature: float = 1.0
    """Sampling temperature (0 = greedy; then K should be 1)."""
    top_p: float = 1.0
    """Nucleus sampling mass."""
    max_new_tokens: int = 96
    """Longest response."""
    batch_size: int = 64
    """Responses generated per batch."""
    max_samples: int | None = None
    """Evaluate only the first N problems."""
    seed: int = 0
    """Sampling seed."""
    dtype: str = "auto"
    """Model dtype: auto, float32, bfloat16, float16."""
    device: str = "auto"
    """auto, cpu, cuda, cuda:N."""


STEPS = {"qwen2": 1600, "llama": 1000}
"""Steps of the bundled models: llama learns the task faster, and both should stay in the 30-80%
greedy band that leaves room for RL."""


@dataclass
class PretrainConfig:
    """One training run of a bundled model."""

    out: str
    """Folder to write the model into."""
    arch: str = "qwen2"
    """qwen2 or llama (qwen3 works too)."""
    n_layers: int = 8
    """Decoder layers."""
    d_model: int = 128
    """Residual width."""
    n_heads: int = 4
    """Attention heads."""
    n_kv_heads: int = 2
    """Key/value heads (grouped-query attention)."""
    d_mlp: int = 512
    """SwiGLU hidden width."""
    steps: int = STEPS["qwen2"]
    """Optimizer steps (the bundled models' steps per arch are STEPS)."""
    batch_tokens: int = 4096
    """Tokens per batch (whole problems, padded)."""
    lr: float = 3e-3
    """Peak learning rate (cosine decay to 10%)."""
    warmup: int = 100
    """Linear warm-up steps."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    max_ops: int = 6
    """Hardest difficulty (operations per problem)."""
    max_value: int = 200
    """Bound on every intermediate value."""
    seed: int = 0
    """Seed of the weights and the training problems."""
    heldout: int = 420
    """Held-out problems for the evaluation (drawn with seed 10_000, never trained on)."""
    pass_k: int = 8
    """Samples per problem for pass@k at temperature 1."""
    bf16: bool = True
    """bfloat16 autocast (about 10x faster on CPU)."""
