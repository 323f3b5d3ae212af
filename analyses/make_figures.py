"""Regenerate the README's figures from run folders written by `ipl entropy`.

    python analyses/make_figures.py runs/qwen2-raw runs/llama-raw [--out figures]

Writes, into --out (default: the repository's figures/ folder):
    comparison.png/.pdf     the runs on a relative-depth axis (entropy, FFN and attention change)
    convergence.csv         one row per run: FFN stages, abruptness, label, suggested BuPO layer
    <run>-entropy_flow, <run>-entropy_change, <run>-token_heatmap, <run>-next_token (.png/.pdf)
        per run folder (named after the folder); next_token only for runs made with --extras
"""

import argparse
from pathlib import Path

from internal_policy_lens.analysis.figures import compare, write_run_figures
from internal_policy_lens.config import CompareConfig
from internal_policy_lens.runs.io import open_run

FIGURES = Path(__file__).resolve().parents[1] / "figures"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run folders written by ipl entropy")
    parser.add_argument("--out", type=Path, default=FIGURES, help="output folder")
    args = parser.parse_args(argv)
    runs = [str(r) for r in args.runs]
    report, table = compare(CompareConfig(runs=runs, out=str(args.out), report=False))
    print(report)
    for path in args.runs:
        run = open_run(path)
        tables = (run.tokens(), run.deltas(), run.summary())
        print(
            write_run_figures(
                run.path, *tables, run.info, folder=args.out, prefix=f"{run.path.name}-"
            )
        )
    print(table.to_string(index=False))


if __name__ == "__main__":
    main()
