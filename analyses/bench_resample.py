"""Time the resampled intervals of a finished run: the split once, then ``resample`` per split.

    python analyses/bench_resample.py RUN [--resamples 1000] [--repeat 3]

Prints one row per split: responses, groups, the best of ``--repeat`` timings of ``resample``
(seconds) and the time per 1000 resamples per group.
"""

import argparse
import time

from internal_policy_lens.analysis.splits import split_run
from internal_policy_lens.analysis.uncertainty import resample
from internal_policy_lens.runs.io import open_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    run = open_run(args.run)
    print("| split | responses | groups | resamples | seconds | s per 1000 resamples per group |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name in ("forking", "correctness", "position"):
        split = split_run(run, name)
        times = []
        for _ in range(args.repeat):
            begin = time.perf_counter()
            resample(split, run.n_layers, resamples=args.resamples)
            times.append(time.perf_counter() - begin)
        best, groups = min(times), len(split.groups)
        per = best / groups * 1000 / args.resamples
        responses = split.samples["sample_id"].nunique()
        print(f"| {name} | {responses} | {groups} | {args.resamples} | {best:.3f} | {per:.3f} |")


if __name__ == "__main__":
    main()
