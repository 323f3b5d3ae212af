"""``ipl entropy`` as a library call: data -> responses -> tables, in a resumable run folder.

Layout of a run folder::

    run.json            how the run was made (config, model facts, versions, times, status)
    responses.jsonl     the records analysed, responses included (usable as --data)
    generation/         per-batch generated responses while generation is under way
    parts/              per-batch token tables while the analysis is under way
    tokens.parquet      entropy_table + token text
    topk.parquet        with --topk K: K most probable tokens of every policy, + token text
    deltas.parquet      delta_table
    summary.csv         summary_table

Every file is written under a temporary name and renamed, so an interrupted run never leaves a
half-written file under a final name; rerunning the same command skips the finished batches.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
from tqdm.auto import tqdm

from ..config import ConvergenceConfig, EntropyConfig
from ..data.encode import Encoded, encode_inputs, encode_prompt, unknown_tokens
from ..data.records import read_records, write_records_jsonl
from ..folders import Folder, FolderState, folder_state, now, sha256, versions
from ..lens.capture import site_keys
from ..lens.sites import parse_layers, resolve_layers, resolve_sites
from ..lens.tuned import check_lens_path, lens_facts, make_lens
from ..lens.unembed import Lens
from ..model.files import check_out_outside_model, config_layers, config_vocab
from ..model.generate import SEEDING, GenerationBar, generate_texts, response_seed
from ..model.load import PolicyModel, load_model
from ..runs.io import RunFolder
from ..runs.shard import (
    MERGING,
    Shard,
    missing_parts,
    owns,
    part_path,
    read_meta,
    resolve_shard,
    shard_device,
    work_order,
    write_meta,
)
from ..runs.writer import finish, start_folder, write_batch
from ..statistics import statistic_facts
from ..tables.compute import batch_columns, decode_tokens

if TYPE_CHECKING:
    from ..analysis.figures import FigureReport


@dataclass
class EntropyRun:
    """A finished run: where it was written, its summary, and its tables read when asked for.

    ``tokens``, ``deltas`` and ``topk`` are read from the folder on first use (a big run's
    tables are never held by the run itself; :class:`~internal_policy_lens.runs.io.RunFolder`
    reads parts of them).
    """

    out: Path
    info: dict
    summary: pd.DataFrame
    figures: FigureReport | None = None
    """The figures written (and skipped, with why) at the end of the run."""
    reused: bool = False
    """The folder already held this run, complete: nothing was computed or written."""

    @functools.cached_property
    def tokens(self) -> pd.DataFrame:
        """``tokens.parquet``, whole."""
        return RunFolder(self.out).tokens()

    @functools.cached_property
    def deltas(self) -> pd.DataFrame:
        """``deltas.parquet``, whole."""
        return RunFolder(self.out).deltas()

    @functools.cached_property
    def topk(self) -> pd.DataFrame | None:
        """``topk.parquet`` (None when the run has no top-k)."""
        return RunFolder(self.out).topk()


def run_entropy(cfg: EntropyConfig, *, progress: bool = True) -> EntropyRun | None:
    """Run (or resume) an entropy analysis and write its run folder; return the tables.

    As one shard of several (``cfg.shard``, or under ``accelerate launch``) only this process's
    batches are analysed (see :mod:`~internal_policy_lens.runs.shard`); the shard that completes the
    last part merges and returns the tables, the others return None.
    """
    # Every option is checked before anything is written or loaded (the layer range against
    # the model's config.json alone, when it is at hand without the network).
    cfg.settings.check()
    cfg.request  # noqa: B018 - unknown statistics fail here
    resolve_sites(cfg.sites)
    check_lens_path(cfg.settings)
    n_layers = config_layers(cfg.model, cfg.revision)
    if n_layers is not None:
        resolve_layers(cfg.layers, n_layers)
    elif isinstance(cfg.layers, str):
        parse_layers(cfg.layers)
    cfg = fit_topk(cfg, config_vocab(cfg.model, cfg.revision) or _recorded_vocab(cfg))
    shard = resolve_shard(cfg.shard)
    check_out_outside_model(cfg.out, cfg.model)
    folder = RunFolder(cfg.out).check_writable()
    records = read_records(cfg.data, max_samples=cfg.max_samples)
    data_sha256 = sha256(cfg.data)
    identity = {**cfg.identity(), "data_sha256": data_sha256}
    state, old = _folder_state(cfg, identity)  # another configuration's run is refused here
    if state is FolderState.COMPLETE:
        return _reused(folder, old)
    model = load_model(
        cfg.model,
        dtype=cfg.dtype,
        device=shard_device(cfg.device, shard),
        revision=cfg.revision,
        device_map=cfg.device_map,
        progress=progress,
        gguf_file=cfg.gguf_file,
    )
    if cfg.topk > model.vocab_size:  # no config.json was at hand (a GGUF file, a hub name)
        cfg = fit_topk(cfg, model.vocab_size)
        identity = {**cfg.identity(), "data_sha256": data_sha256}
        state, old = _folder_state(cfg, identity)
        if state is FolderState.COMPLETE:
            return _reused(folder, old)
    keys = site_keys(model, cfg.sites, cfg.layers)
    # The run's one lens: its precision, unembedding cast and lens folder serve every batch.
    lens = make_lens(model, cfg.settings)
    lens.check(keys)  # a bad lens folder fails before any work
    out = Path(cfg.out)
    facts = _facts(cfg, model, lens, identity)
    # The responses generated here: the report says whether the generation settings apply.
    facts["generated"] = sum(r["response"] is None for r in records) * (
        cfg.generation.samples_per_prompt
    )
    with writer_lock(folder, shard):
        info = start_folder(out, state, facts, shard)
        records = ensure_responses(model, records, cfg, out, progress, shard)
        batches, truncated, passes = _analyse(model, lens, records, cfg, out, progress, shard)
        if shard is not None:
            return merge_when_complete(out)
        # The decoder's forward passes of each batch this process analysed.
        info.update(samples=len(records), truncated=truncated, forward_passes=passes)
        return finish_run(out, info, batches, cfg.topk > 0)


def fit_topk(cfg: EntropyConfig, vocab_size: int | None) -> EntropyConfig:
    """``cfg`` with ``topk`` at most the vocabulary (run.json records the K used), said once."""
    if vocab_size is None or cfg.topk <= vocab_size:
        return cfg
    warnings.warn(
        f"--topk {cfg.topk} is more than the model's {vocab_size}-token vocabulary; "
        f"using --topk {vocab_size}",
        stacklevel=2,
    )
    return replace(cfg, topk=vocab_size)


@contextlib.contextmanager
def writer_lock(folder: Folder, shard: Shard | None):
    """The folder's lock for the block: exclusive for a whole run.

    A shard shares the folder's lock with the run's other shards (so no whole run can start
    beside them) and holds an exclusive lock of its own.
    """
    if shard is None:
        with folder.lock():
            yield
        return
    with folder.lock(shared=True), folder.lock(f".lock-shard-{shard[0]}-of-{shard[1]}"):
        yield


def finish_run(out: Path, info: dict, batches: int, topk: bool) -> EntropyRun:
    """Stream the parts into the run's tables, draw its figures and report, mark it complete."""
    figures = finish(out, info, batches, topk, draw_run)
    return EntropyRun(out, info, RunFolder(out).summary(), figures=figures)


def draw_run(out: Path, info: dict) -> FigureReport:
    """The figures and the report of a run whose tables are written, from a bounded read.

    They read the first samples up to :data:`~..runs.io.FIGURE_ROWS` token rows (whole
    samples); the report says which (``ipl report RUN --samples ...`` chooses others).
    """
    from ..analysis.figures import write_run_figures  # matplotlib loads once a run is done
    from ..analysis.report import write_run_report

    folder = RunFolder(out, info)
    samples = folder.shown_samples()
    tokens, deltas = folder.tokens(samples=samples), folder.deltas(samples=samples)
    summary = folder.summary()
    figures = write_run_figures(out, tokens, deltas, summary, info)
    topk = folder.topk(samples=samples)
    write_run_report(out, tokens=tokens, summary=summary, deltas=deltas, topk=topk, info=info)
    return figures


def describe(run: EntropyRun) -> str:
    """The one-paragraph summary printed at the end of a run."""
    if run.reused:
        return (
            f"Nothing to do: {run.out}/ holds this run, complete (same configuration and data, "
            f"finished {run.info.get('finished')}); nothing was changed. Pass --force to redo it."
        )
    summary = run.summary
    final = summary[(summary.quantity == "entropy") & (summary.name == "final")]["mean"]
    ffn = summary[(summary.quantity == "delta") & (summary.name == "ffn")]
    tau = ConvergenceConfig().tau  # the stages' and ipl suggest-layer's threshold
    widening = ffn[ffn["mean"] > tau]["layer"].tolist()
    final_text = f"{final.iloc[0]:.3f} nats" if len(final) else "n/a (site not analysed)"
    samples = f"{run.info['samples']} sample{'s' if run.info['samples'] != 1 else ''}"
    text = (
        f"Wrote {run.info['rows']:,} rows for {samples} to {run.out}/ "
        f"({'topk.parquet, ' if run.info['config'].get('topk') else ''}tokens.parquet, "
        "deltas.parquet, "
        f"summary.csv, responses.jsonl, run.json, report.html). "
        f"Lens: {run.info['config']['lens']}. Mean final entropy: {final_text}. "
        f"Layers with mean FFN entropy change > tau = {tau:g} nats (exploration): "
        f"{widening if len(ffn) else 'n/a'}."
    )
    if run.figures is not None:
        drawn = sorted({path.stem for path in run.figures.written})
        text += f"\nFigures in {run.out}/figures/: {', '.join(drawn) or 'none'}."
        for name, why in run.figures.skipped.items():
            text += f"\nSkipped figure {name}: {why}"
    return text


def _folder_state(cfg: EntropyConfig, identity: dict) -> tuple[FolderState, dict | None]:
    """What the run does with ``cfg.out`` (see :func:`folder_state`), and its run.json if any."""
    record = Path(cfg.out) / "run.json"
    old = json.loads(record.read_text()) if record.is_file() else None
    state = folder_state(
        record,
        None if old is None else old.get("config", {}),
        identity,
        complete=old is not None and old.get("status") == "complete",
        overwrite=cfg.overwrite,
        force=cfg.force,
    )
    return state, old


def _recorded_vocab(cfg: EntropyConfig) -> int | None:
    """The vocabulary size that ``cfg.out``'s run.json records for the same model, if any.

    A GGUF file or a hub name has no config.json to read it from before the model loads.
    """
    record = Path(cfg.out) / "run.json"
    model = json.loads(record.read_text()).get("model", {}) if record.is_file() else {}
    return model.get("vocab_size") if model.get("name_or_path") == cfg.model else None


def _reused(folder: RunFolder, info: dict) -> EntropyRun:
    """The folder's complete run of this configuration, read, not recomputed."""
    return EntropyRun(folder.path, info, folder.summary(), reused=True)


def _facts(cfg: EntropyConfig, model: PolicyModel, lens: Lens, identity: dict) -> dict:
    """run.json of a run that starts (or resumes): config, model facts, precision, versions."""
    return {
        "config": identity,
        "status": "running",
        "started": now(),
        "command": sys.argv,
        "cwd": os.getcwd(),  # where the command's relative paths are
        "model": {
            "name_or_path": cfg.model,
            "revision": cfg.revision,
            "architecture": model.architecture,
            "family": model.family.name,
            # A parallel block (GPT-NeoX) has no resid_mid: those rows are absent, not NaN.
            "parallel_block": model.parallel,
            "absent_sites": ["resid_mid"] if model.parallel else [],
            "n_layers": model.n_layers,
            "d_model": model.d_model,
            "vocab_size": model.vocab_size,
            "dtype": str(model.dtype).removeprefix("torch."),
            "device": str(model.device),
            "attention": model.attention,
            **({"gguf": model.gguf} if model.gguf else {}),
        },
        # What the precision runs for this model on its device (the mode, dtypes and why).
        "precision": lens.chosen.record(),
        "lens": lens_facts(lens),
        # Every statistic the tables hold: its unit and definition.
        "statistics": statistic_facts(cfg.request),
        # How records without a response get one (cfg.generation holds the settings).
        "seeding": SEEDING,
        "versions": versions(),
    }


def ensure_responses(model, records, cfg, out, progress, shard: Shard | None) -> list[dict]:
    """Generate the missing responses batch by batch (a shard's own first); responses.jsonl.

    Response k to a record is seeded from (seed, the record's id, k) (see
    :func:`~internal_policy_lens.model.generate.response_seed`), whatever batch it falls in.
    """
    gen = cfg.generation
    todo = [(r, k) for r in records if r["response"] is None for k in range(gen.samples_per_prompt)]
    done = {}
    if todo:
        folder = out / "generation"
        folder.mkdir(exist_ok=True)
        bar = GenerationBar(len(todo), gen.max_new_tokens, desc="generate", disable=not progress)
        with bar:  # closed (its line ended) however the loop ends, Ctrl-C included
            for number in work_order(-(-len(todo) // gen.batch_size), shard):
                index = number * gen.batch_size
                batch = todo[index : index + gen.batch_size]
                part = folder / f"part-{number:05d}.json"
                if not part.is_file():
                    prompts = [encode_prompt(model.tokenizer, r["prompt"]) for r, _ in batch]
                    texts = generate_texts(
                        model,
                        prompts,
                        max_new_tokens=gen.max_new_tokens,
                        temperature=gen.temperature,
                        top_p=gen.top_p,
                        seeds=[response_seed(gen.seed, r["sample_id"], k) for r, k in batch],
                        on_step=bar.step,
                    )
                    Folder(folder).write_json(part.name, texts)
                for (record, k), text in zip(batch, json.loads(part.read_text())):
                    done[record["sample_id"], k] = text
                bar.done(len(batch))
    result = []
    for r in records:
        if r["response"] is not None:
            result.append(r)
            continue
        for k in range(gen.samples_per_prompt):
            sample_id = r["sample_id"] if gen.samples_per_prompt == 1 else f"{r['sample_id']}:{k}"
            result.append({**r, "sample_id": sample_id, "response": done[r["sample_id"], k]})
    write_records_jsonl(result, out / "responses.jsonl")
    return result


def _analyse(model, lens: Lens, records, cfg, out, progress, shard: Shard | None):
    """Each batch's tables into parts/ (see :func:`~..runs.writer.write_batch`).

    Returns the number of batches, of truncated sequences, and the forward passes of each batch
    analysed here. A shard analyses its own batches only (the merge reads the parts).
    """
    limit = cfg.max_length or model.max_length
    encoded = encode_inputs(model.tokenizer, records)
    unknown, holding = unknown_tokens(model.tokenizer, encoded)
    if unknown:
        warnings.warn(
            f"{unknown} tokens in {holding} of {len(encoded)} sequences are the tokenizer's "
            f"unknown token {model.tokenizer.unk_token!r}: characters its vocabulary lacks, "
            "which the model reads as that one token",
            stacklevel=2,
        )
    truncated = sum(len(e.input_ids) > limit for e in encoded)
    if truncated:
        warnings.warn(
            f"{truncated} of {len(encoded)} sequences are longer than {limit} tokens and were "
            "truncated to it (the tail of their response is not analysed)",
            stacklevel=2,
        )
        encoded = [Encoded(e.sample_id, e.input_ids[:limit], e.response_start) for e in encoded]
    folder = out / "parts"
    folder.mkdir(exist_ok=True)
    keys = site_keys(model, cfg.sites, cfg.layers)
    request = cfg.request
    as_text = any(not isinstance(e.sample_id, int) for e in encoded)  # one type for the run
    n_batches = -(-len(encoded) // cfg.batch_size)
    mine = [b for b in range(n_batches) if owns(shard, b)]
    total = sum(len(encoded[b * cfg.batch_size : (b + 1) * cfg.batch_size]) for b in mine)
    bar = tqdm(total=total, desc="entropy", unit="sample", disable=not progress)
    started, n_tokens, vocab, passes = time.perf_counter(), 0, {}, []
    for number in mine:
        batch = encoded[number * cfg.batch_size : (number + 1) * cfg.batch_size]
        if not part_path(folder, number).is_file():
            cols = batch_columns(
                model, lens, batch, keys, cfg.settings, cfg.response_only, request, cfg.extras
            )
            decode_tokens(model.tokenizer, cols, vocab)
            passes.append(cols.passes)
            write_batch(
                folder,
                number,
                cols,
                topk=cfg.topk,
                vocab=vocab,
                as_text=as_text,
            )
            n_tokens += sum(len(e.input_ids) for e in batch)
        bar.update(len(batch))
        bar.set_postfix(tok_s=f"{n_tokens / max(time.perf_counter() - started, 1e-9):.0f}")
    bar.close()
    if shard is not None:
        write_meta(folder, n_batches, len(records), truncated, cfg.topk > 0)
    return n_batches, truncated, passes


def merge_when_complete(out: Path) -> EntropyRun | None:
    """Merge if every part exists and no other shard is merging (or has merged); else None."""
    parts = Path(out) / "parts"
    meta = read_meta(parts)
    if meta is None or missing_parts(parts, meta["batches"]):
        return None
    with Folder(out).lock(MERGING, if_free=True) as mine:
        if not mine or read_meta(parts) is None:  # another shard merges, or has merged
            return None
        return merge_run(out, lock=False)  # the shards' shared lock keeps whole runs out


def merge_run(out: str | os.PathLike, *, lock: bool = True) -> EntropyRun:
    """Join the shards' parts into the run's tables (tokens, top-k, deltas, summary); return it.

    ``lock``: hold the folder's exclusive lock (refused while shards still run).

    Raises:
        ValueError: when the folder holds no shard parts or some are missing.
        FolderError: another process is writing the folder.
    """
    if lock:
        with Folder(out).lock():
            return merge_run(out, lock=False)
    out = Path(out)
    parts = out / "parts"
    meta = read_meta(parts)
    if meta is None:
        state = "is already merged" if (out / "tokens.parquet").is_file() else "has no shard parts"
        raise ValueError(f"{out}: {state}")
    missing = missing_parts(parts, meta["batches"])
    if missing:
        raise ValueError(
            f"{out}: {len(missing)} of {meta['batches']} batches are not analysed yet "
            f"(first: {missing[:5]}); run the shards that own them, then merge again"
        )
    info = Folder(out).read_json("run.json")
    info.update(samples=meta["samples"], truncated=meta["truncated"])
    return finish_run(out, info, meta["batches"], bool(meta.get("topk")))
