"""The ``ipl`` command line: each command builds a config and calls one library function."""

from __future__ import annotations

import contextlib
import logging
import sys
import warnings
from dataclasses import MISSING, fields
from functools import partial
from pathlib import Path
from typing import Annotated

import typer
import typer.core

from .config import (
    BupoConfig,
    CompareConfig,
    ConvergenceConfig,
    EntropyConfig,
    EvalConfig,
    EvalLensConfig,
    FitLensConfig,
    GenerationConfig,
    PlotConfig,
    ReportConfig,
)
from .model.families import TINY_ARCHITECTURES


class _Commands(typer.core.TyperGroup):
    """The command group: option values that fail their checks give one line, not a usage block."""

    def invoke(self, ctx: typer.Context):
        try:
            return super().invoke(ctx)
        except typer.BadParameter as err:
            command = f"ipl {ctx.invoked_subcommand}" if ctx.invoked_subcommand else "ipl"
            message = err.format_message().rstrip(".")
            message = message[:1].lower() + message[1:]  # "error: invalid value for ..."
            typer.echo(f"error: {message}; see `{command} --help`", err=True)
            raise typer.Exit(2) from None


app = typer.Typer(
    cls=_Commands,
    help="Internal policies of LLMs: per-layer and per-module entropy of the residual stream.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help text is plain: "[trl]" and "[default: ...]" stay as written
)


class _Stderr(logging.Handler):
    """Log records as plain lines on the current ``sys.stderr``."""

    def emit(self, record: logging.LogRecord) -> None:
        print(record.getMessage(), file=sys.stderr)


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"ipl (internal-policy-lens) {version('internal-policy-lens')}")
        raise typer.Exit()


@app.callback()
def _messages(
    version: Annotated[
        bool,
        typer.Option(
            "--version", is_eager=True, callback=_print_version, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """Show the package's notes and warnings as plain lines on stderr (no source lines)."""
    log = logging.getLogger("internal_policy_lens")
    log.handlers = [_Stderr()]
    log.setLevel(logging.INFO)
    log.propagate = False

    def one_line(message, category, filename, lineno, line=None):
        return f"warning: {message}\n"

    warnings.formatwarning = one_line


def _default(cls, name: str) -> str:
    """The default of a config field, as the help shows it (the dataclass is its only copy)."""
    field = next(f for f in fields(cls) if f.name == name)
    value = field.default if field.default is not MISSING else field.default_factory()
    return str(value)


def _opt(cls, name: str, help: str, *decls: str, **kw):
    """An option whose help shows the default of ``cls``'s field ``name`` (given: None)."""
    return typer.Option(*decls, help=f"{help}  [default: {_default(cls, name)}]", **kw)


def _config(cls, given: dict, **fixed):
    """``cls`` with its defaults, replaced by the options the user gave (those not None).

    Paths become strings, as the configs (and run.json) hold them.
    """
    given = {k: str(v) if isinstance(v, Path) else v for k, v in given.items() if v is not None}
    return cls(**fixed, **given)


@contextlib.contextmanager
def _user_errors(resume_hint: str | None = None):
    """Turn the errors a user can fix into one line on stderr and exit code 2.

    Ctrl-C exits with code 130 and says what was kept (``resume_hint``) when the command resumes.
    """
    from .data.records import DataError
    from .folders import FolderError
    from .model.load import ModelLoadError

    try:
        yield
    except (DataError, ModelLoadError, FolderError, ValueError, FileNotFoundError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        typer.echo(f"interrupted{'; ' + resume_hint if resume_hint else ''}", err=True)
        raise typer.Exit(130) from None


def _check_device(device: str) -> None:
    """Stop with one line, before anything is read or loaded, if this machine lacks ``device``."""
    from .model.device import check_device

    with _user_errors():
        check_device(device)


@app.command()
def entropy(
    model: Annotated[
        str | None,
        _opt(EntropyConfig, "model", "Hub name, folder, .gguf file or bundled model (ipl models)."),
    ] = None,
    data: Annotated[
        Path | None,
        typer.Option(help="JSONL, Parquet or CSV records (default: 100 bundled problems)."),
    ] = None,
    out: Annotated[Path | None, _opt(EntropyConfig, "out", "Run folder.")] = None,
    lens: Annotated[
        str | None,
        _opt(EntropyConfig, "lens", "raw (paper, no final norm), norm (logit lens) or tuned."),
    ] = None,
    lens_path: Annotated[
        str | None,
        typer.Option(help="Tuned lens folder (ipl fit-lens) [default: a bundled model's own]."),
    ] = None,
    sites: Annotated[str | None, typer.Option(help="Comma-separated sites (default all).")] = None,
    layers: Annotated[
        str | None, typer.Option(help="Layers, e.g. '0,3,5-7' (default all).")
    ] = None,
    dtype: Annotated[
        str | None, _opt(EntropyConfig, "dtype", "auto, float32, bfloat16, float16.")
    ] = None,
    device: Annotated[str | None, _opt(EntropyConfig, "device", "auto, cpu, cuda, cuda:N.")] = None,
    revision: Annotated[str | None, typer.Option(help="Hub revision of the model.")] = None,
    gguf_file: Annotated[
        str | None,
        typer.Option(help="A GGUF file in the --model folder (needs the [gguf] extra)."),
    ] = None,
    batch_size: Annotated[
        int | None, _opt(EntropyConfig, "batch_size", "Sequences per forward pass.", min=1)
    ] = None,
    chunk_tokens: Annotated[
        int | None, _opt(EntropyConfig, "chunk_tokens", "Rows of logits held at once.", min=1)
    ] = None,
    capture_mb: Annotated[
        float | None,
        _opt(
            EntropyConfig,
            "capture_mb",
            "MiB of captured site vectors held at once (layer groups).",
            min=0.0,
        ),
    ] = None,
    attention_mb: Annotated[
        float | None,
        _opt(
            EntropyConfig,
            "attention_mb",
            "MiB of one layer's attention scores (longer: blocks of positions).",
            min=0.0,
        ),
    ] = None,
    precision: Annotated[
        str | None,
        _opt(
            EntropyConfig,
            "precision",
            "exact (float32 products and sums), fast (bf16/model-dtype products where the "
            "hardware has them natively, else float32; float32 sums) or auto (fast for "
            "bf16/fp16 models).",
        ),
    ] = None,
    max_samples: Annotated[int | None, typer.Option(min=1, help="First N records only.")] = None,
    max_length: Annotated[
        int | None, typer.Option(min=2, help="Truncate sequences (default: model context).")
    ] = None,
    response_only: Annotated[
        bool | None,
        typer.Option(
            "--response-only/--all-tokens",
            help="Positions that predict response tokens, or all.  [default: --response-only]",
        ),
    ] = None,
    extras: Annotated[
        bool | None,
        _opt(
            EntropyConfig,
            "extras",
            "Next-token log-prob/rank, KL to final, top-1 agreement, residual cosines.",
        ),
    ] = None,
    topk: Annotated[
        int | None,
        _opt(
            EntropyConfig,
            "topk",
            "K most probable tokens of each policy (topk.parquet); 0: none.",
            min=0,
        ),
    ] = None,
    max_new_tokens: Annotated[
        int | None, _opt(GenerationConfig, "max_new_tokens", "Longest generated response.", min=1)
    ] = None,
    temperature: Annotated[
        float | None, _opt(GenerationConfig, "temperature", "0 = greedy.", min=0.0)
    ] = None,
    top_p: Annotated[
        float | None, _opt(GenerationConfig, "top_p", "Nucleus sampling mass.", min=0.0, max=1.0)
    ] = None,
    seed: Annotated[int | None, _opt(GenerationConfig, "seed", "Sampling seed.")] = None,
    samples_per_prompt: Annotated[
        int | None,
        _opt(
            GenerationConfig,
            "samples_per_prompt",
            "Responses per prompt.",
            "-n",
            "--samples-per-prompt",
            min=1,
        ),
    ] = None,
    gen_batch_size: Annotated[
        int | None,
        _opt(GenerationConfig, "batch_size", "Prompts per generation batch.", min=1),
    ] = None,
    overwrite: Annotated[
        bool | None,
        _opt(
            EntropyConfig,
            "overwrite",
            "Start over in a folder holding a run of another configuration (without it: refused).",
        ),
    ] = None,
    force: Annotated[
        bool | None,
        _opt(
            EntropyConfig,
            "force",
            "Redo this run from scratch (without it a rerun resumes an unfinished run and "
            "leaves a complete one as it is).",
        ),
    ] = None,
    quiet: Annotated[bool, typer.Option(help="No progress bars.")] = False,
    shard: Annotated[
        str | None,
        typer.Option(help="i/n: this process's share of the batches (default: accelerate's)."),
    ] = None,
    device_map: Annotated[
        str | None, typer.Option(help="Split a large model over the devices: auto, balanced.")
    ] = None,
) -> None:
    """Entropy of every layer's and module's internal policy, per token, into a run folder.

    Records without a response get one generated by the model first (written to
    OUT/responses.jsonl). Rerunning the same command resumes an interrupted run and leaves a
    complete one as it is (--force redoes it; --overwrite replaces a run of another
    configuration). With --shard
    i/n, or under `accelerate launch -m internal_policy_lens.cli entropy ...`, each process
    analyses every n-th batch and the last to finish merges (else: ipl merge OUT).
    """
    given = dict(locals())  # first line: only the options
    from .runs.entropy import describe, run_entropy

    names = {f.name for f in fields(GenerationConfig)}
    generation = {k: given.pop(k) for k in names - {"batch_size"}}
    generation["batch_size"] = given.pop("gen_batch_size")
    given.pop("quiet")
    given.update(
        sites=sites.split(",") if sites else None,
        generation=_config(GenerationConfig, generation),
    )
    cfg = _config(EntropyConfig, given)
    _check_device(cfg.device)
    hint = f"finished batches are kept in {cfg.out}/: rerun the same command to resume"
    with _user_errors(hint):
        result = run_entropy(cfg, progress=not quiet)
    if result is None:
        typer.echo(f"shard done: its batches are in {cfg.out}/parts/; the last shard merges")
        return
    typer.echo(describe(result))


@app.command()
def merge(out: Annotated[Path, typer.Argument(help="Run folder of sharded ipl entropy.")]) -> None:
    """Join the parts written by `ipl entropy --shard i/n` processes into the run's tables."""
    from .runs.entropy import describe, merge_run

    with _user_errors():
        result = merge_run(out)
    typer.echo(describe(result))


@app.command("fit-lens")
def fit_lens(
    model: Annotated[
        str | None, _opt(FitLensConfig, "model", "Hub name, local folder or bundled model.")
    ] = None,
    data: Annotated[
        str | None,
        typer.Option(help="Records; missing responses are generated (default: bundled train set)."),
    ] = None,
    out: Annotated[str | None, _opt(FitLensConfig, "out", "Lens folder.")] = None,
    sites: Annotated[
        str | None,
        _opt(FitLensConfig, "sites", "Comma-separated sites with a translator per layer."),
    ] = None,
    steps: Annotated[
        int | None, _opt(FitLensConfig, "steps", "SGD steps (0: zero translators).", min=0)
    ] = None,
    max_samples: Annotated[
        int | None, _opt(FitLensConfig, "max_samples", "First N records.", min=2)
    ] = None,
    batch_tokens: Annotated[
        int | None, _opt(FitLensConfig, "batch_tokens", "Token rows per step.", min=1)
    ] = None,
    lr: Annotated[
        float | None, _opt(FitLensConfig, "lr", "LR scale (step lr * (1 - momentum)).")
    ] = None,
    heldout: Annotated[
        float | None, _opt(FitLensConfig, "heldout", "Share of records held out.", min=0.0, max=0.9)
    ] = None,
    seed: Annotated[
        int | None, _opt(FitLensConfig, "seed", "Seed of the split and the batches.")
    ] = None,
    save_every: Annotated[
        int | None, _opt(FitLensConfig, "save_every", "Save the state every N steps.", min=1)
    ] = None,
    format: Annotated[str | None, _opt(FitLensConfig, "format", "ipl or tuned-lens.")] = None,
    max_new_tokens: Annotated[
        int | None, _opt(GenerationConfig, "max_new_tokens", "Longest generated response.", min=1)
    ] = None,
    device: Annotated[str | None, _opt(FitLensConfig, "device", "auto, cpu, cuda, cuda:N.")] = None,
    overwrite: Annotated[
        bool | None,
        _opt(
            FitLensConfig,
            "overwrite",
            "Start over in a folder holding another configuration's fit.",
        ),
    ] = None,
    force: Annotated[
        bool | None,
        _opt(
            FitLensConfig,
            "force",
            "Fit again from scratch (without it a rerun resumes an unfinished fit and leaves a "
            "complete one as it is).",
        ),
    ] = None,
    quiet: Annotated[bool, typer.Option(help="No progress bars.")] = False,
) -> None:
    """Fit a tuned lens: one affine translator per layer and site, trained on KL(final || lens).

    Rerunning the same command resumes a killed fit from its last saved translators.
    """
    given = dict(locals())  # first line: only the options
    from .runs.lens import run_fit_lens

    given.pop("quiet")
    given["sites"] = sites.split(",") if sites else None
    given["generation"] = _config(GenerationConfig, {"max_new_tokens": given.pop("max_new_tokens")})
    cfg = _config(FitLensConfig, given)
    _check_device(cfg.device)
    with _user_errors():
        meta = run_fit_lens(cfg, progress=not quiet)
    if meta.get("reused"):
        typer.echo(
            f"Nothing to do: {cfg.out}/ holds this lens, complete (same configuration, finished "
            f"{meta.get('finished')}); nothing was changed. Pass --force to fit it again."
        )
    evaluation = meta["heldout"]["evaluation"]
    kl = {
        lens: [r["kl_to_final"] for r in evaluation if r["lens"] == lens]
        for lens in ("norm", "tuned")
    }
    typer.echo(
        f"{'has' if meta.get('reused') else 'wrote'} {len(meta['translators'])} translators "
        f"{'in' if meta.get('reused') else 'to'} {cfg.out}/ ({meta['fit_seconds']} s); "
        f"held-out mean KL(final || lens) over them: norm {sum(kl['norm']) / len(kl['norm']):.4f}, "
        f"tuned {sum(kl['tuned']) / len(kl['tuned']):.4f} nats"
    )


@app.command("eval-lens")
def eval_lens(
    model: Annotated[str | None, typer.Option(help="The lens's model [default: bundled].")] = None,
    lens_path: Annotated[
        str | None, typer.Option(help="Lens folder [default: a bundled model's own].")
    ] = None,
    data: Annotated[
        str | None,
        typer.Option(help="Records with responses [default: the lens's held-out records]."),
    ] = None,
    out: Annotated[
        str | None, typer.Option(help="Folder for lens_eval.csv and lens_eval.png/.pdf.")
    ] = None,
    max_samples: Annotated[int | None, typer.Option(min=1, help="First N records.")] = None,
    device: Annotated[
        str | None, _opt(EvalLensConfig, "device", "auto, cpu, cuda, cuda:N.")
    ] = None,
    force: Annotated[
        bool | None,
        _opt(
            EvalLensConfig,
            "force",
            "Evaluate again (without it a rerun into a complete --out changes nothing).",
        ),
    ] = None,
) -> None:
    """KL to the final policy, next-token cross-entropy and top-1 agreement of raw, norm, tuned."""
    given = dict(locals())  # first line: only the options
    from .runs.lens import kl_text, run_eval_lens

    cfg = _config(EvalLensConfig, given)
    _check_device(cfg.device)
    with _user_errors():
        table = run_eval_lens(cfg)
    typer.echo("KL(final || lens), nats, per site and layer:")
    typer.echo(kl_text(table))
    if out is not None:
        typer.echo(f"results in {out}/: lens_eval.csv and lens_eval.png/.pdf")


@app.command("make-tiny")
def make_tiny(
    out: Annotated[Path, typer.Option(help="Folder to write the model into.")],
    arch: Annotated[
        str,
        typer.Option(
            help=f"{', '.join(TINY_ARCHITECTURES)}: one per family that `ipl models` lists."
        ),
    ] = "qwen2",
    layers: Annotated[int, typer.Option(min=1, help="Decoder layers.")] = 8,
    seed: Annotated[int, typer.Option(help="Initialisation seed.")] = 0,
) -> None:
    """Write a tiny randomly initialised model (real architecture config, character tokenizer)."""
    from .model.tiny import make_tiny_model

    with _user_errors():
        folder = make_tiny_model(arch, out, seed=seed, n_layers=layers)
    typer.echo(f"wrote a random {arch} model with {layers} layers to {folder}/")


_TAU_HELP = "Integration band (nats): FFN ΔH > tau is exploration, < -tau convergence."


def _convergence_config(**given) -> ConvergenceConfig:
    return _config(ConvergenceConfig, given)


@app.command()
def plot(
    run: Annotated[Path, typer.Argument(help="Run folder written by ipl entropy.")],
    sample: Annotated[
        str | None, typer.Option(help="Sample id of the token heatmap [default: the smallest].")
    ] = None,
    site: Annotated[
        str | None, typer.Option(help="Site of the token heatmap [default: resid_post].")
    ] = None,
    tau: Annotated[float | None, _opt(ConvergenceConfig, "tau", _TAU_HELP, min=0.0)] = None,
) -> None:
    """Write a run's figures to RUN/figures/ as PNG and PDF (figures without data are skipped)."""
    from .analysis.figures import plot_run

    cfg = PlotConfig(
        run=str(run), sample=sample, site=site, convergence=_convergence_config(tau=tau)
    )
    with _user_errors():
        report = plot_run(cfg)
    typer.echo(str(report))


@app.command()
def report(
    run: Annotated[Path, typer.Argument(help="Run folder written by ipl entropy.")],
    open_page: Annotated[
        bool, typer.Option("--open", help="Open the page in the default browser.")
    ] = False,
    max_samples: Annotated[
        int | None,
        _opt(ReportConfig, "max_samples", "Samples embedded in the token explorer.", min=1),
    ] = None,
    max_values: Annotated[
        int | None,
        _opt(
            ReportConfig,
            "max_values",
            "Numbers embedded in the token explorer (bounds the page's size).",
            min=1,
        ),
    ] = None,
    site: Annotated[
        str | None,
        typer.Option(
            help="Site colouring the tokens at first [default: resid_post, else the first]."
        ),
    ] = None,
    tau: Annotated[float | None, _opt(ConvergenceConfig, "tau", _TAU_HELP, min=0.0)] = None,
) -> None:
    """Write RUN/report.html: one self-contained interactive page (charts, token explorer)."""
    from .analysis.report import report_run

    given = dict(max_samples=max_samples, max_values=max_values, site=site)
    cfg = _config(ReportConfig, given, run=str(run), convergence=_convergence_config(tau=tau))
    with _user_errors():
        path = report_run(cfg)
    typer.echo(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    if open_page:
        import webbrowser

        webbrowser.open(path.resolve().as_uri())


@app.command()
def compare(
    runs: Annotated[list[Path], typer.Argument(help="Run folders written by ipl entropy.")],
    out: Annotated[Path, typer.Option(help="Folder for the figures and convergence.csv.")],
    tau: Annotated[float | None, _opt(ConvergenceConfig, "tau", _TAU_HELP, min=0.0)] = None,
    abrupt_share: Annotated[
        float | None,
        _opt(
            ConvergenceConfig,
            "abrupt_share",
            "Label abrupt from this share of late entropy drop.",
            min=0.0,
            max=1.0,
        ),
    ] = None,
) -> None:
    """Overlay runs on relative depth; write comparison.png/.pdf, report.html, convergence.csv."""
    from .analysis.figures import compare as compare_runs

    cfg = CompareConfig(
        runs=[str(r) for r in runs],
        out=str(out),
        convergence=_convergence_config(tau=tau, abrupt_share=abrupt_share),
    )
    with _user_errors():
        report, table = compare_runs(cfg)
    typer.echo(str(report))
    typer.echo(table.to_string(index=False))


@app.command("suggest-layer")
def suggest_layer(
    run: Annotated[Path, typer.Argument(help="Run folder written by ipl entropy.")],
    tau: Annotated[float | None, _opt(ConvergenceConfig, "tau", _TAU_HELP, min=0.0)] = None,
) -> None:
    """Print the BuPO layer of the paper's rule (last FFN exploration layer), with the evidence.

    Exits with code 1 when no layer qualifies (the run has no FFN exploration stage).
    """
    from .analysis.figures import suggest_run_layer

    with _user_errors():
        folder, suggestion = suggest_run_layer(run, _convergence_config(tau=tau))
    typer.echo(f"{folder.name}: {folder.n_layers} layers, {folder.lens} lens")
    if folder.lens != "raw":
        typer.echo(
            f"note: the paper's rule reads the raw lens; this run used the {folder.lens} lens"
        )
    typer.echo(str(suggestion))
    if suggestion.layer is None:
        raise typer.Exit(1)


def _bupo_config(config_file: Path | None, given: dict):
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
    values.update({k: v for k, v in given.items() if v is not None})
    return _config(BupoConfig, values)


@app.command("train-bupo")
def train_bupo(
    model: Annotated[str | None, _opt(BupoConfig, "model", "Start model.")] = None,
    data: Annotated[
        str | None,
        typer.Option(help="Training records with answers (default: bundled arith_train.jsonl)."),
    ] = None,
    out: Annotated[str | None, _opt(BupoConfig, "out", "Run folder.")] = None,
    layer: Annotated[
        str | None, _opt(BupoConfig, "layer", "Internal layer k (0-based) or auto.")
    ] = None,
    iterative_steps: Annotated[
        int | None,
        _opt(
            BupoConfig, "iterative_steps", "s_inter: IPA steps before GRPO (0 = plain GRPO).", min=0
        ),
    ] = None,
    steps: Annotated[int | None, _opt(BupoConfig, "steps", "Total steps.", min=1)] = None,
    group_size: Annotated[
        int | None, _opt(BupoConfig, "group_size", "G: responses per prompt.", min=2)
    ] = None,
    prompts_per_step: Annotated[
        int | None, _opt(BupoConfig, "prompts_per_step", "Prompts per step.", min=1)
    ] = None,
    mini_batch_size: Annotated[
        int | None, _opt(BupoConfig, "mini_batch_size", "Responses per optimiser step.", min=1)
    ] = None,
    updates_per_step: Annotated[
        int | None, _opt(BupoConfig, "updates_per_step", "Passes over a step's rollouts.", min=1)
    ] = None,
    lr: Annotated[float | None, _opt(BupoConfig, "lr", "AdamW learning rate.")] = None,
    weight_decay: Annotated[
        float | None, _opt(BupoConfig, "weight_decay", "AdamW weight decay.", min=0.0)
    ] = None,
    grad_clip: Annotated[
        float | None, _opt(BupoConfig, "grad_clip", "Gradient-norm clip.", min=0.0)
    ] = None,
    clip_low: Annotated[float | None, _opt(BupoConfig, "clip_low", "eps_low.", min=0.0)] = None,
    clip_high: Annotated[float | None, _opt(BupoConfig, "clip_high", "eps_high.", min=0.0)] = None,
    temperature: Annotated[
        float | None,
        _opt(BupoConfig, "temperature", "Sampling temperature of the rollouts.", min=0.0),
    ] = None,
    max_new_tokens: Annotated[
        int | None, _opt(BupoConfig, "max_new_tokens", "Longest response.", min=1)
    ] = None,
    aggregation: Annotated[
        str | None, _opt(BupoConfig, "aggregation", "Loss aggregation: token or sequence.")
    ] = None,
    kl_coef: Annotated[float | None, _opt(BupoConfig, "kl_coef", "KL beta.", min=0.0)] = None,
    lens: Annotated[str | None, _opt(BupoConfig, "lens", "Lens of pi^k: raw or norm.")] = None,
    seed: Annotated[
        int | None, _opt(BupoConfig, "seed", "Seed of prompts, sampling, mini-batches.")
    ] = None,
    dtype: Annotated[
        str | None, _opt(BupoConfig, "dtype", "Dtype of the trained weights: float32, bfloat16.")
    ] = None,
    device: Annotated[str | None, _opt(BupoConfig, "device", "auto, cpu, cuda, cuda:N.")] = None,
    save_every: Annotated[
        int | None, _opt(BupoConfig, "save_every", "Checkpoint every N steps.", min=1)
    ] = None,
    resume: Annotated[bool, typer.Option(help="Continue from the latest checkpoint.")] = False,
    probe_every: Annotated[
        int | None,
        _opt(BupoConfig, "probe_every", "Probe at step 0 and every N steps (0: off).", min=0),
    ] = None,
    probe_data: Annotated[
        str | None, _opt(BupoConfig, "probe_data", "Probe prompts (default: the training data).")
    ] = None,
    probe_samples: Annotated[
        int | None, _opt(BupoConfig, "probe_samples", "Probe prompts drawn.", min=1)
    ] = None,
    config: Annotated[Path | None, typer.Option(help="TOML file with the same fields.")] = None,
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
    engine: Annotated[
        str,
        typer.Option(help="builtin (this package's loop) or trl (TRL's GRPOTrainer, [trl] extra)."),
    ] = "builtin",
    trl_option: Annotated[
        list[str] | None,
        typer.Option(help="KEY=VALUE GRPOConfig field for --engine trl, e.g. use_vllm=true."),
    ] = None,
) -> None:
    """Bottom-up Policy Optimization: IPA on layer k for S steps, then GRPO (paper Eq. 10).

    The same command on a complete run (its last step's checkpoint written) says so and changes
    nothing. With --engine trl the same fields drive TRL's GRPOTrainer; run it under
    `accelerate launch -m internal_policy_lens.cli train-bupo --engine trl ...` for several
    processes or GPUs.
    """
    given = dict(locals())  # first line: only the options
    for name in ("config", "quiet", "engine", "trl_option"):
        given.pop(name)
    given["resume"] = resume or None
    if layer not in (None, "auto"):
        given["layer"] = int(layer) if layer.lstrip("-").isdigit() else layer
    with _user_errors():
        cfg = _bupo_config(config, given)
        run = _trainer(engine, trl_option or [])
    _check_device(cfg.device)
    hint = f"checkpoints are kept in {cfg.out}/checkpoints/: rerun with --resume to continue"
    with _user_errors(hint):
        folder = run(cfg, progress=not quiet)
    typer.echo(f"training run in {folder}/ (metrics.jsonl, checkpoints/)")


def _trainer(engine: str, trl_options: list[str]):
    """The training function of ``--engine``: the built-in loop or the TRL runner."""
    if engine == "builtin" and not trl_options:
        from .train.loop import train_bupo

        return train_bupo
    if engine != "trl":
        raise ValueError(f"unknown engine '{engine}' (or --trl-option without --engine trl)")
    try:
        from .integrations.trl.run import parse_overrides, train_bupo_trl
    except ModuleNotFoundError as err:
        raise ValueError(
            f"--engine trl needs TRL ({err}); pip install 'internal-policy-lens[trl]'"
        ) from None
    return partial(train_bupo_trl, overrides=parse_overrides(trl_options))


@app.command("eval")
def eval_cmd(
    model: Annotated[str | None, _opt(EvalConfig, "model", "Model or checkpoint folder.")] = None,
    data: Annotated[
        Path | None, typer.Option(help="Problems with answers (default: bundled held-out set).")
    ] = None,
    out: Annotated[Path | None, _opt(EvalConfig, "out", "Results folder.")] = None,
    samples: Annotated[
        int | None, _opt(EvalConfig, "samples", "K: samples per problem.", min=1)
    ] = None,
    temperature: Annotated[
        float | None, _opt(EvalConfig, "temperature", "Sampling temperature (0 = greedy).", min=0.0)
    ] = None,
    top_p: Annotated[
        float | None, _opt(EvalConfig, "top_p", "Nucleus sampling mass.", min=0.0, max=1.0)
    ] = None,
    max_new_tokens: Annotated[
        int | None, _opt(EvalConfig, "max_new_tokens", "Longest response.", min=1)
    ] = None,
    max_samples: Annotated[int | None, typer.Option(min=1, help="First N problems.")] = None,
    seed: Annotated[int | None, _opt(EvalConfig, "seed", "Sampling seed.")] = None,
    dtype: Annotated[
        str | None, _opt(EvalConfig, "dtype", "auto, float32, bfloat16, float16.")
    ] = None,
    device: Annotated[str | None, _opt(EvalConfig, "device", "auto, cpu, cuda, cuda:N.")] = None,
    force: Annotated[
        bool | None,
        _opt(
            EvalConfig,
            "force",
            "Evaluate again (without it a rerun on a complete evaluation changes nothing).",
        ),
    ] = None,
) -> None:
    """Sample K responses per problem; print Avg@K and unbiased Pass@k for k = 1, 2, 4, ..., K.

    The same command on a complete evaluation says so and prints its results unchanged.
    """
    given = dict(locals())  # first line: only the options
    from .train.evaluate import evaluate

    cfg = _config(EvalConfig, given)
    _check_device(cfg.device)
    with _user_errors():
        table, metrics = evaluate(cfg)
    typer.echo(
        f"{len(table)} problems, {cfg.samples} samples each ({cfg.out}/results.csv, metrics.json)"
    )
    for name, value in metrics.items():
        typer.echo(f"{name:>10}  {value:.4f}")


@app.command("plot-train")
def plot_train(
    runs: Annotated[list[Path], typer.Argument(help="Run folders of ipl train-bupo.")],
    out: Annotated[Path, typer.Option(help="Where to write training.png/.pdf.")] = Path("figures"),
) -> None:
    """Reward, accuracy, entropy and response length against step, for one or several runs.

    Runs trained with --probe-every also get probes.png/.pdf: cos(H^k, H^j), the FFN entropy
    change of layer k, the perplexity and KL(pi^k || pi^j) over steps, and a layer x step map of
    the internal entropy.
    """
    from .analysis.figures import save_figure
    from .analysis.plots import probe_panels, training_curves
    from .train.folder import read_metrics, read_probes

    with _user_errors():
        frames = {str(r): read_metrics(r) for r in runs}
        probes = {str(r): read_probes(r) for r in runs}
        probes = {name: found for name, found in probes.items() if found is not None}
        figure = None
        if probes:
            tables = {name: table for name, (table, _) in probes.items()}
            figure = probe_panels(tables, {name: k for name, (_, k) in probes.items()})
    save_figure(training_curves(frames), out / "training")
    typer.echo(f"wrote {out}/training.png and training.pdf")
    if figure is None:
        typer.echo("no probes.png: no run has probes (train with --probe-every N)")
        return
    save_figure(figure, out / "probes")
    typer.echo(f"wrote {out}/probes.png and probes.pdf ({len(probes)} of {len(runs)} runs probed)")


@app.command()
def models() -> None:
    """List the bundled models (usable as --model NAME offline) and the supported families."""
    from .bundled import BUNDLED_MODELS, bundled_model_path
    from .model.families import FAMILIES

    typer.echo("bundled models:")
    for name in BUNDLED_MODELS:
        with _user_errors():
            typer.echo(f"  {name}\t{bundled_model_path(name)}")
    typer.echo("supported families (transformers class, ipl make-tiny --arch):")
    for family in FAMILIES:
        typer.echo(f"  {family.name}\t{family.hf_class}\t{family.arch}")
        typer.echo(f"      attn_out: {family.attn_out}; mlp_out: {family.mlp_out}")
        typer.echo(f"      lens {family.lens}")


if __name__ == "__main__":  # accelerate launch -m internal_policy_lens.cli ...
    app()
