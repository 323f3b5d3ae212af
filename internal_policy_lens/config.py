"""Configuration dataclasses, one per command; the only copy of the defaults.

The CLI's options default to None and replace only the fields the user gave, so every default
lives here; each field's docstring is its option's help, and :func:`option` records its limits
and flags. Nothing here imports torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import MISSING, asdict, dataclass, field, fields, replace

from .bundled import DEFAULT_MODEL, bundled_data
from .lens_kinds import LENSES, lens_descriptions, model_lens_descriptions
from .statistics import Request

PRECISIONS: tuple[str, ...] = ("auto", "exact", "fast")
"""Precision of the products and reductions (see :class:`LensSettings`)."""


def option(
    default=MISSING,
    *,
    factory=MISSING,
    flags: tuple[str, ...] = (),
    min: float | None = None,
    max: float | None = None,
    sep: str | None = None,
    path: bool = False,
    argument: bool = False,
    parameters: bool = False,
    choices: Callable[[], dict[str, str]] | None = None,
):
    """A field and how the command line offers it (its help is the field's docstring).

    Args:
        default: The field's default.
        factory: A function making the default (as ``default_factory``).
        flags: The flags where they differ from ``--field-name`` (e.g. ``("-n", "--samples")``,
            or ``("--on/--off",)`` for a boolean).
        min: Smallest value the command line accepts.
        max: Largest value the command line accepts.
        sep: A list field written as one string, its items separated by ``sep``.
        path: A file or folder (held as the text of the normalised path: ``runs/a/`` -> ``runs/a``).
        argument: Given by position, not by a flag.
        parameters: A dict of the statistics' parameters: one option per parameter that the
            statistics registry declares (``--nucleus-p``), not one for the field.
        choices: The values and a line on each, read when the help is shown (registered lenses).
    """
    given = {
        "flags": flags,
        "min": min,
        "max": max,
        "sep": sep,
        "path": path,
        "argument": argument,
        "parameters": parameters,
        "choices": choices,
    }
    # `is not False`, not `!=`: min=0 is a limit (0 == False)
    metadata = {k: v for k, v in given.items() if v is not None and v is not False and v != ()}
    return field(default=default, default_factory=factory, metadata=metadata)


def derive_seed(seed: int, index: int) -> int:
    """The seed of item ``index`` (a step, a generation batch) of a run seeded with ``seed``."""
    return seed * 1_000_003 + index


@dataclass(frozen=True)
class LensSettings:
    """How site vectors become statistics; travels as one object from a run to the reductions."""

    lens: str = option("raw", choices=lens_descriptions)
    """How a site vector becomes a policy (a lens that reads translators: see ``lens_path``)."""
    lens_path: str | None = None
    """Folder of the tuned lens (written by ``ipl fit-lens``, or the tuned-lens package's
    ``config.json`` + ``params.pt``); default for a bundled model: the lens shipped with it."""
    precision: str = "auto"
    """``exact`` (float32 products and reductions; float64 for a float64 model), ``fast``
    (products in bf16, or the model's fp16, where the device runs them natively, else in
    float32; reductions in float32; faster where bf16 is native, as measured in the README's
    Performance of the reductions; errors of a few hundredths of a nat) or ``auto`` (``fast``
    for a bf16/fp16 model, else ``exact``). ``run.json`` records the dtypes chosen and why."""
    chunk_tokens: int = option(1024, min=1)
    """Logits rows formed at once (the rows of every site of a chunk of tokens, stacked)."""
    capture_mb: float = option(512, min=0.0)
    """Bound (MiB) on the captured site rows held at once: they are reduced whenever they reach
    it, during the one forward pass (same tables whatever the bound)."""
    attention_mb: float = option(256, min=0.0)
    """Bound (MiB, float32) on one layer's attention scores under eager attention; above it the
    decoder runs over blocks of positions with a key/value cache (same tables up to float
    rounding). sdpa attention forms no scores and ignores it."""

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

    max_new_tokens: int = option(256, min=1)
    """Longest response, in tokens."""
    temperature: float = option(1.0, min=0.0)
    """Sampling temperature; 0 means greedy decoding."""
    top_p: float = option(1.0, min=0.0, max=1.0)
    """Nucleus sampling mass (1.0 keeps the whole distribution)."""
    samples_per_prompt: int = option(1, flags=("-n", "--samples-per-prompt"), min=1)
    """Responses per prompt; with more than one, sample ids become '<id>:<k>'."""
    seed: int = 0
    """Seed of the sampler; each response is seeded from it, its record's id and its sample
    number, so it does not depend on the batch it is generated in."""
    batch_size: int = option(32, flags=("--gen-batch-size",), min=1)
    """Prompts per generation batch."""


@dataclass
class EntropyConfig:
    """One ``ipl entropy`` run: which model, which data, which policies, where to write."""

    model: str = DEFAULT_MODEL
    """Hub name, local folder, .gguf file or bundled model (``ipl models`` lists them)."""
    data: str = option(factory=lambda: str(bundled_data()), path=True)
    """JSONL, Parquet or CSV records (default: 100 bundled held-out arithmetic problems)."""
    out: str = option("runs/demo", path=True)
    """Run folder."""
    lens: str = option(LensSettings.lens, choices=lens_descriptions)
    """How a site vector becomes a policy."""
    lens_path: str | None = LensSettings.lens_path
    """Folder of the tuned lens (see :class:`LensSettings`)."""
    sites: list[str] | None = option(None, sep=",")
    """Comma-separated sites to analyse (default: all eight)."""
    layers: str | None = None
    """Layers, e.g. '0,3,5-7' (default: all)."""
    dtype: str = "auto"
    """Model dtype: auto, float32, bfloat16, float16."""
    device: str = "auto"
    """auto, cpu, cuda, cuda:N."""
    revision: str | None = None
    """Hub revision of the model."""
    gguf_file: str | None = None
    """Name of a GGUF file inside the ``model`` folder (not needed when ``model`` is the file)."""
    batch_size: int = option(4, min=1)
    """Sequences per forward pass of the analysis."""
    chunk_tokens: int = LensSettings.chunk_tokens
    """Logits rows formed at once (see :class:`LensSettings`)."""
    capture_mb: float = LensSettings.capture_mb
    """Bound (MiB) on the captured site vectors held at once (see :class:`LensSettings`)."""
    attention_mb: float = LensSettings.attention_mb
    """Bound (MiB) on one layer's attention scores (see :class:`LensSettings`)."""
    precision: str = LensSettings.precision
    """Precision of the products and reductions (see :class:`LensSettings`)."""
    max_samples: int | None = option(None, min=1)
    """Analyse only the first N records."""
    max_length: int | None = option(None, min=2)
    """Truncate sequences to this many tokens (default: the model's context length)."""
    response_only: bool = option(True, flags=("--response-only/--all-tokens",))
    """Keep only positions that predict response tokens (the paper averages over those)."""
    extras: bool = False
    """Add next-token log-prob and rank, KL(internal ‖ final), top-1 agreement and the
    residual cosines ``cos_attn`` and ``cos_ffn`` of each layer."""
    stats: list[str] | None = option(None, sep=",")
    """Opt-in per-token statistics, comma-separated, one column each (the README's table of
    statistics lists them)."""
    parameters: dict[str, float] = option(factory=dict, parameters=True)
    """The opt-in statistics' parameters by name (each its own option)."""
    topk: int = option(5, min=0)
    """K most probable tokens of every policy into ``topk.parquet`` (0: none). Computed in the
    same pass as the entropies; 5 gives the report's logit-lens table."""
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    """Settings for records without a response."""
    overwrite: bool = False
    """Start over in a run folder that holds a run with a different configuration."""
    force: bool = False
    """Redo a run that is complete with the same configuration (a rerun without it says that
    the run is complete and changes nothing)."""
    device_map: str | None = None
    """Split a model larger than one device over the visible devices ('auto', 'balanced')."""
    shard: str | None = None
    """'i/n': analyse only batches b with b % n == i (data parallel; the last shard to finish
    merges). Default: from accelerate's RANK/WORLD_SIZE under ``accelerate launch``, else all."""

    @property
    def settings(self) -> LensSettings:
        """The lens settings of this run, as the one object the analysis takes."""
        return LensSettings(**{f.name: getattr(self, f.name) for f in fields(LensSettings)})

    @property
    def request(self) -> Request:
        """The statistics of this run, as the reductions take them."""
        return Request.of(self.extras, self.stats, self.topk, **self.parameters)

    def identity(self) -> dict:
        """The fields that define the results; a resumed run must match them."""
        out = asdict(self)
        for name in ("overwrite", "force", "out", "device_map", "shard"):
            out.pop(name)
        for name in ("stats", "parameters"):  # as a run recorded before they existed
            if not out[name]:
                out.pop(name)
        return out


@dataclass
class FitLensConfig:
    """One ``ipl fit-lens`` run: a tuned lens (Belrose et al. 2023) for one model.

    The optimiser follows the tuned-lens package's defaults for its published lenses: SGD with
    Nesterov momentum 0.9, learning rate ``lr * (1 - momentum)`` (PyTorch's momentum scales the
    step by 1 / (1 - momentum); undone so that ``lr = 1`` is the natural scale), weight decay
    1e-3 (towards the identity translator, since translators add to their input), no warm-up,
    linear decay to zero over 250 steps. The package samples 2^18 tokens per step from a large
    corpus; here a step samples ``batch_tokens`` of the fit tokens.
    """

    model: str = DEFAULT_MODEL
    """Hub name, local folder or bundled model."""
    data: str = field(default_factory=lambda: str(bundled_data("arith_train.jsonl")))
    """Records (JSONL, Parquet or CSV); those without a response get one generated first
    (default: the bundled arith_train.jsonl)."""
    out: str = "lenses/tuned"
    """Lens folder."""
    sites: list[str] = option(factory=lambda: ["resid_pre", "resid_post"], sep=",")
    """Sites to fit a translator for at every layer (``resid_pre`` only needs layer 0: at layer
    l > 0 it is ``resid_post[l-1]`` and shares its translator); not ``final``."""
    steps: int = option(250, min=0)
    """Optimiser steps (0 writes the zero translators: the tuned lens is then the norm lens)."""
    lr: float = 1.0
    """Learning-rate scale; the SGD step is ``lr * (1 - momentum)``, decayed linearly to 0."""
    momentum: float = 0.9
    """Nesterov momentum of SGD."""
    weight_decay: float = 1e-3
    """Weight decay (pulls each translator towards the identity)."""
    batch_tokens: int = option(4096, min=1)
    """Token rows per step, drawn without replacement from the fit tokens (all if fewer)."""
    max_samples: int | None = option(400, min=2)
    """Use only the first N records (the activations of all fit tokens are held in memory)."""
    heldout: float = option(0.1, min=0.0, max=0.9)
    """Share of the records (at least one) held out for the evaluation, drawn with the seed."""
    seed: int = 0
    """Seed of the held-out split and of the token batches."""
    save_every: int = option(25, min=1)
    """Save the translators and optimiser state every N steps (a killed run resumes there)."""
    format: str = "ipl"
    """``ipl`` (translators.safetensors + lens.json) or ``tuned-lens`` (the tuned-lens
    package's config.json + params.pt, plus lens.json)."""
    batch_size: int = 16
    """Sequences per forward pass when the activations are collected."""
    dtype: str = "float32"
    """Model dtype while fitting."""
    device: str = "auto"
    """auto, cpu, cuda, cuda:N."""
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    """Settings for records without a response."""
    overwrite: bool = False
    """Start over in a folder that holds a lens fitted with another configuration."""
    force: bool = False
    """Refit a lens that is complete with the same configuration (a rerun without it says that
    the lens is complete and changes nothing)."""

    def identity(self) -> dict:
        """The fields that define the lens; a resumed fit must match them."""
        out = asdict(self)
        for name in ("overwrite", "force", "out", "device", "save_every"):
            out.pop(name)
        return out


@dataclass
class EvalLensConfig:
    """One ``ipl eval-lens`` run: raw, norm and tuned lenses on the same held-out tokens."""

    model: str = DEFAULT_MODEL
    """The model the lens was fitted for."""
    lens_path: str | None = None
    """Lens folder (default for a bundled model: the lens shipped with it)."""
    data: str | None = None
    """Records with responses; default: the lens folder's responses.jsonl, held-out part only.
    Another file is used whole (none of it was fitted on, unless it is the fit's data)."""
    out: str | None = None
    """Folder for lens_eval.csv and lens_eval.png/.pdf (default: print only)."""
    max_samples: int | None = option(None, min=1)
    """Evaluate only the first N records."""
    batch_size: int = 16
    """Sequences per forward pass."""
    device: str = "auto"
    """auto, cpu, cuda, cuda:N."""
    force: bool = False
    """Evaluate again when ``out`` holds this evaluation, complete (else: nothing to do)."""


@dataclass
class ConvergenceConfig:
    """Thresholds of the convergence summary (see ``internal_policy_lens.analysis.convergence``)."""

    tau: float = option(0.1, min=0.0)
    """Half-width (nats) of the integration band: a layer's mean FFN entropy change d is
    exploration when d > tau, convergence when d < -tau, integration otherwise. 0.1 nats is under
    1% of the entropy of a uniform policy over a 150k vocabulary (11.9 nats) and above the
    sampling noise of a layer mean over a few thousand tokens."""
    late_depth: float = 0.9
    """Relative depth from which the entropy drop counts as late (0.9: the last 10% of depth)."""
    abrupt_share: float = option(0.5, min=0.0, max=1.0)
    """Label a model ``abrupt`` when at least this share of its entropy drop is late."""
    progressive_spread: float = 0.5
    """Shape ``progressive`` when the middle 80% of the entropy drop spans at least this share of
    the depth (the drop depths x90 - x10), else abrupt."""


@dataclass
class SplitConfig:
    """A split of the run's tokens and the resampling of its responses (``analysis.splits``)."""

    split: str | None = None
    """forking (final-policy entropy in the run's top q), correctness (right/wrong answers) or
    position (quarters of the response); every group is a line and a table value [default:
    no split]."""
    q: float = option(0.2, min=0.0, max=1.0)
    """Share of the run's tokens that the forking split calls forking (highest final entropy)."""
    resamples: int = option(1000, min=1)
    """Bootstrap resamples of the responses behind the 95% intervals."""
    resample_seed: int = 0
    """Seed of the resampling (recorded in the outputs)."""


@dataclass
class SplitRunConfig:
    """One ``ipl split`` call: a finished run's summary by group, with 95% intervals."""

    run: str = option(path=True, argument=True)
    """Run folder written by ``ipl entropy``."""
    splits: SplitConfig = field(default_factory=SplitConfig)
    """The split and the resampling."""
    convergence: ConvergenceConfig = field(default_factory=ConvergenceConfig)
    """Thresholds of the convergence measures."""


@dataclass
class DiffConfig:
    """One ``ipl diff`` call: two checkpoints of one model read the same responses."""

    model: str = option()
    """Model A (e.g. the base model): bundled name, hub id or folder."""
    model_b: str = option()
    """Model B (e.g. its BuPO checkpoint); it must read the data as the same token ids."""
    data: str = option(factory=lambda: str(bundled_data()), path=True)
    """Records with responses (JSONL/Parquet/CSV; an ``ipl entropy`` run's responses.jsonl)."""
    out: str = option("runs/diff", path=True)
    """Folder for tokens.parquet, diff.csv, overlap.csv, diff.png/.pdf and report.html."""
    lens: str = "raw"
    """raw or norm: how both models' site vectors become policies."""
    sites: list[str] | None = option(None, sep=",")
    """Sites to compare, comma-separated [default: all]."""
    layers: str | None = None
    """Layers to compare, e.g. 0-5,10 [default: all]."""
    q: float = option(0.2, min=0.0, max=1.0)
    """Share of highest-entropy positions whose overlap between the models is measured."""
    batch_size: int = option(4, min=1)
    """Sequences per forward pass."""
    max_samples: int | None = option(None, min=1)
    """Read only the first N records."""
    response_only: bool = option(True, flags=("--response-only/--all-tokens",))
    """Compare only the positions that predict a response token."""
    dtype: str = "auto"
    """Weights' dtype for both models (auto, float32, bfloat16, float64)."""
    device: str = "auto"
    """cpu, cuda, mps or auto."""


@dataclass
class PlotConfig:
    """One ``ipl plot`` call: the figures of a run folder, written to ``RUN/figures/``."""

    run: str = option(path=True, argument=True)
    """Run folder written by ``ipl entropy``."""
    sample: str | None = None
    """Sample id of the token heatmap [default: the smallest]."""
    site: str | None = None
    """Site of the token heatmap (default: resid_post, else the first site analysed)."""
    samples: str | None = None
    """Sample ids the figures read, comma-separated [default: the first samples up to 1,000,000
    token rows; the summary behind the stages covers every token]."""
    convergence: ConvergenceConfig = field(default_factory=ConvergenceConfig)
    """Thresholds of the stages shaded in the entropy-change figure."""
    splits: SplitConfig = field(default_factory=SplitConfig)
    """A split of the run's tokens: the flow and change figures again, one line per group, with
    95% intervals over resampled responses (entropy_flow_SPLIT, entropy_change_SPLIT)."""


@dataclass
class CompareConfig:
    """One ``ipl compare`` call: several runs on a relative-depth axis."""

    runs: list[str] = option(path=True, argument=True)
    """Run folders written by ``ipl entropy`` (one model each)."""
    out: str = option(path=True)
    """Folder for the comparison figures and ``convergence.csv``."""
    convergence: ConvergenceConfig = field(default_factory=ConvergenceConfig)
    """Thresholds of the convergence summary."""
    splits: SplitConfig = field(default_factory=SplitConfig)
    """A split of each run, and the resampling behind the intervals of the differences."""
    report: bool = True
    """Also write ``OUT/report.html``, the interactive page of the runs."""


@dataclass
class ReportConfig:
    """One ``ipl report`` call: a run's self-contained interactive page, ``RUN/report.html``.

    The page embeds the token explorer's data for the first samples (by id) only: at most
    ``max_samples`` samples and ``max_values`` numbers (entropies plus top-k probabilities and
    ids), so its size is bounded (about 10 bytes a number plus 4.6 MB of plotly.js).
    """

    run: str = option(path=True, argument=True)
    """Run folder written by ``ipl entropy``."""
    max_samples: int = option(20, min=1)
    """Samples embedded in the token explorer."""
    max_values: int = option(1_000_000, min=1)
    """Numbers embedded in the token explorer; samples are added in id order while they fit
    (the first sample is cut to its first positions if it alone does not)."""
    site: str | None = None
    """Site whose entropy colours the tokens when the page opens (default: resid_post, else the
    first analysed; a site the run lacks is an error)."""
    samples: str | None = None
    """Sample ids the page's charts and explorer read, comma-separated [default: the first
    samples up to 1,000,000 token rows]."""
    convergence: ConvergenceConfig = field(default_factory=ConvergenceConfig)
    """Thresholds of the stages and the layer rule shown in the page."""
    splits: SplitConfig = field(default_factory=SplitConfig)
    """A split of the run's tokens: the flow and change charts by group, with 95% intervals
    over resampled responses, and a table of each group's measures with their intervals."""


@dataclass
class BupoConfig:
    """One ``ipl train-bupo`` run (paper Eq. 10). ``iterative_steps=0`` is plain GRPO."""

    model: str = DEFAULT_MODEL
    """Hub name, local folder or bundled model to start from."""
    data: str = field(default_factory=lambda: str(bundled_data("arith_train.jsonl")))
    """Training records with answers (JSONL, Parquet or CSV; default: the bundled
    arith_train.jsonl)."""
    out: str = "runs/bupo"
    """Run folder: metrics.jsonl, checkpoints/, config.json."""
    layer: int | str = "auto"
    """Internal layer k (0-based) for IPA, or 'auto' (the paper's rule on a quick entropy pass)."""
    iterative_steps: int = option(5, min=0)
    """s_inter: steps of Internal Policy Alignment on layer k before plain GRPO."""
    steps: int = option(40, min=1)
    """Total optimisation steps (rollout + updates)."""
    group_size: int = option(8, min=2)
    """G: responses per prompt."""
    prompts_per_step: int = option(16, min=1)
    """Prompts per step."""
    mini_batch_size: int = option(32, min=1)
    """Responses per optimiser step."""
    updates_per_step: int = option(1, min=1)
    """Passes over a step's rollouts."""
    lr: float = 1e-4
    """AdamW learning rate (constant after warm-up)."""
    warmup_steps: int = 0
    """Linear learning-rate warm-up, in optimiser steps."""
    weight_decay: float = option(0.01, min=0.0)
    """AdamW weight decay."""
    grad_clip: float = option(1.0, min=0.0)
    """Gradient-norm clip."""
    clip_low: float = option(0.2, min=0.0)
    """eps_low of the ratio clip."""
    clip_high: float = option(0.2, min=0.0)
    """eps_high of the ratio clip."""
    temperature: float = option(1.0, min=0.0)
    """Sampling temperature of the rollouts (log-probs use the same temperature)."""
    max_new_tokens: int = option(96, min=1)
    """Longest response."""
    aggregation: str = "token"
    """Loss aggregation: token (the paper's code) or sequence."""
    kl_coef: float = option(0.0, min=0.0)
    """beta of the KL penalty to the initial model (0 = none, the paper's default)."""
    lens: str = option(LensSettings.lens, choices=model_lens_descriptions)
    """Lens of the internal policy during IPA (made of the model's weights only)."""
    seed: int = 0
    """Seed of prompt order, sampling and mini-batch order."""
    dtype: str = "float32"
    """Dtype of the trained weights: float32, bfloat16, float16 (auto: float32 on the CPU)."""
    device: str = "auto"
    """auto, cpu, cuda, cuda:N."""
    save_every: int = option(10, min=1)
    """Checkpoint every N steps (and at the end)."""
    resume: bool = False
    """Continue from the latest checkpoint in ``out``."""
    probe_every: int = option(0, min=0)
    """Probe the internal policies at step 0 and every N steps into ``probes.parquet`` (0: off,
    the default: a probe adds a generation at step 0 and two forward passes with every layer's
    unembedding per probe, which a plain training run should not pay for)."""
    probe_data: str | None = None
    """Records whose prompts the probes read (default: the training data)."""
    probe_samples: int = option(8, min=1)
    """Probe prompts (one response each, sampled at step 0 and kept)."""


@dataclass
class ProbeSettings:
    """The defaults of the TRL callback's training probes (any GRPOTrainer).

    ``ipl train-bupo`` takes its probes from :class:`BupoConfig`; these serve
    :class:`~internal_policy_lens.integrations.trl.InternalPolicyCallback`.
    """

    probe_every: int = 50
    """Probe at step 0 and every N steps (optimiser steps of the trainer)."""
    probe_samples: int = 16
    """Probe prompts (one response each, sampled at the first probe and kept)."""
    lens: str = LensSettings.lens
    """Lens of the internal policies of ``kl_layer_other`` and of the entropies."""


@dataclass
class EvalConfig:
    """One ``ipl eval`` run: K samples per problem, Avg@K and unbiased Pass@k."""

    model: str = DEFAULT_MODEL
    """Hub name, local folder, bundled model or a checkpoint folder of ``ipl train-bupo``."""
    data: str = option(factory=lambda: str(bundled_data("arith_heldout.jsonl")), path=True)
    """Problems with answers (JSONL, Parquet or CSV; default: the bundled held-out set,
    arith_heldout.jsonl)."""
    out: str = option("runs/eval", path=True)
    """Folder for results.csv (per problem), samples.jsonl and metrics.json."""
    samples: int = option(8, min=1)
    """K: samples per problem."""
    temperature: float = option(1.0, min=0.0)
    """Sampling temperature (0 = greedy; then K should be 1)."""
    top_p: float = option(1.0, min=0.0, max=1.0)
    """Nucleus sampling mass."""
    max_new_tokens: int = option(96, min=1)
    """Longest response."""
    batch_size: int = 64
    """Responses generated per batch."""
    max_samples: int | None = option(None, min=1)
    """Evaluate only the first N problems."""
    seed: int = 0
    """Sampling seed."""
    dtype: str = "auto"
    """Model dtype: auto, float32, bfloat16, float16."""
    device: str = "auto"
    """auto, cpu, cuda, cuda:N."""
    force: bool = False
    """Evaluate again when ``out`` holds this evaluation, complete (else: nothing to do)."""

    def identity(self) -> dict:
        """The fields that define the results (``metrics.json``'s ``config``)."""
        out = asdict(self)
        out.pop("force")
        return out


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
