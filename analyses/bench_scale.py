"""Paper-shaped runs of `ipl entropy` against the model's own forward pass, side by side.

    nice -n 10 python analyses/bench_scale.py                       # the default cases
    python analyses/bench_scale.py --case 28:16x1600 --case 28:4x1600 --case 36:4x8000
    python analyses/bench_scale.py --vocab-case 300                 # 152k vocabulary, 300 tokens

Each case `L:NxT` is a random Qwen2 of L layers (`ipl make-tiny --arch qwen2`, tiny width and a
character vocabulary, context raised to fit) reading N responses of about T tokens (random
arithmetic text). For each case, in one run on the same inputs:

  ipl entropy   the whole command in a fresh process (`--topk 5`, start-up, figures and report
                included), its wall time and peak RSS (`resource.getrusage` of the child)
  forward       a plain transformers forward of the same sequences (sdpa,
                `output_hidden_states=True`, batches of `--batch-size`), its time alone
  ratio         ipl entropy / forward
  passes        the decoder's forward passes per batch (run.json `forward_passes`)
  rows/s        token-table rows written per second of `ipl entropy`
  report        report.html's bytes

The vocabulary case (`--vocab-case T`) gives the same model a 151,936-row unembedding and reads
4 responses of T tokens: there the products dominate, as they should. Memory growth: compare the
peak RSS of two cases that differ only in N (e.g. 28:4x1600 and 28:16x1600).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

IPL = [sys.executable, "-m", "internal_policy_lens.cli"]
DEFAULT_CASES = ["28:4x1600", "28:16x1600"]


def make_model(folder: Path, layers: int, vocab: int | None) -> Path:
    """A random qwen2 of ``layers`` layers; ``vocab`` rows of unembedding when given."""
    path = folder / f"qwen2-{layers}-{vocab or 'tiny'}"
    if path.is_dir():
        return path
    subprocess.run(
        [*IPL, "make-tiny", "--arch", "qwen2", "--layers", str(layers), "--out", str(path)],
        check=True,
    )
    config = json.loads((path / "config.json").read_text())
    config["max_position_embeddings"] = 16384
    (path / "config.json").write_text(json.dumps(config, indent=2))
    if vocab:
        widen_vocabulary(path, vocab)
    return path


def widen_vocabulary(path: Path, vocab: int) -> None:
    """Give the model ``vocab`` embedding and unembedding rows (the tokenizer uses the first)."""
    import torch
    from safetensors.torch import load_file, save_file

    weights = load_file(path / "model.safetensors")
    generator = torch.Generator().manual_seed(0)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        if name in weights:
            old = weights[name]
            new = torch.randn(vocab, old.shape[1], generator=generator) * old.std()
            new[: len(old)] = old
            weights[name] = new.contiguous()
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    config["vocab_size"] = vocab
    (path / "config.json").write_text(json.dumps(config, indent=2))


def make_data(folder: Path, samples: int, tokens: int, seed: int = 0) -> Path:
    """``samples`` records whose responses are about ``tokens`` characters of arithmetic."""
    path = folder / f"data-{samples}x{tokens}.jsonl"
    rng = np.random.default_rng(seed)
    with path.open("w") as f:
        for i in range(samples):
            words = []
            while sum(len(w) + 1 for w in words) < tokens:
                a, b = rng.integers(1, 99, 2)
                words.append(f"{a} + {b} = {a + b}.")
            text = " ".join(words)[:tokens]
            record = {"problem": f"Problem {i}: add the numbers.", "response": text}
            f.write(json.dumps(record) + "\n")
    return path


def run_ipl(model: Path, data: Path, out: Path, batch_size: int) -> dict:
    """``ipl entropy`` in a child process: wall seconds, peak RSS, run.json facts."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    started = time.perf_counter()
    subprocess.run(
        [
            *IPL,
            "entropy",
            "--model",
            str(model),
            "--data",
            str(data),
            "--out",
            str(out),
            "--topk",
            "5",
            "--batch-size",
            str(batch_size),
            "--quiet",
            "--force",
            "--overwrite",
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    info = json.loads((out / "run.json").read_text())
    return {
        "seconds": seconds,
        # ru_maxrss of the children is the largest child so far: only a rise is this run's.
        "peak_gb": peak / 2**20 if peak > before else float("nan"),
        "passes": sorted(set(info.get("forward_passes") or [])),
        "rows": info["rows"],
        "report_mb": (out / "report.html").stat().st_size / 2**20,
    }


def plain_forward(model: Path, data: Path, batch_size: int) -> float:
    """Seconds of a plain transformers sdpa forward of the run's sequences (load excluded)."""
    import torch
    from transformers import AutoModelForCausalLM

    from internal_policy_lens.data.encode import encode_inputs
    from internal_policy_lens.data.records import read_records
    from internal_policy_lens.model.batch import pad
    from internal_policy_lens.model.load import _load_tokenizer

    tokenizer = _load_tokenizer(str(model), None)
    hf = AutoModelForCausalLM.from_pretrained(
        model, dtype=torch.float32, attn_implementation="sdpa"
    )
    encoded = encode_inputs(tokenizer, read_records(data))
    started = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(encoded), batch_size):
            batch = [e.input_ids for e in encoded[i : i + batch_size]]
            ids, mask = pad(batch, tokenizer.pad_token_id, "cpu", side="right")
            hf(input_ids=ids, attention_mask=mask, output_hidden_states=True, logits_to_keep=1)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", action="append", help=f"L:NxT (default: {DEFAULT_CASES})")
    parser.add_argument("--vocab-case", type=int, help="tokens of the 152k-vocabulary case")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--workdir", type=Path)
    args = parser.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    cases = [(c, None) for c in (args.case or DEFAULT_CASES)]
    if args.vocab_case:
        cases.append((f"28:4x{args.vocab_case}", 151_936))
    print(
        f"{'case':>16} {'vocab':>7} {'ipl s':>8} {'fwd s':>7} {'ratio':>6} {'passes':>7} "
        f"{'rows':>11} {'rows/s':>9} {'peak GB':>8} {'report MB':>9}"
    )
    for case, vocab in cases:
        layers, shape = case.split(":")
        samples, tokens = (int(x) for x in shape.split("x"))
        model = make_model(work, int(layers), vocab)
        data = make_data(work, samples, tokens)
        forward = plain_forward(model, data, args.batch_size)
        run = run_ipl(model, data, work / f"run-{case.replace(':', '-')}-{vocab}", args.batch_size)
        print(
            f"{case:>16} {vocab or 'tiny':>7} {run['seconds']:8.1f} {forward:7.1f} "
            f"{run['seconds'] / forward:6.1f} {str(run['passes']):>7} {run['rows']:11,} "
            f"{run['rows'] / run['seconds']:9,.0f} {run['peak_gb']:8.2f} {run['report_mb']:9.1f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
