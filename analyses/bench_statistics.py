"""What each opt-in statistic costs on the CPU, measured side by side with the run it joins.

    nice -n 10 python analyses/bench_statistics.py [--tokens 128] [--layers 6] [--repeats 5]

The model and captured vectors of ``bench_entropy.py`` (Qwen2.5-0.5B's widths, vocabulary
151,936, random weights), precision fast (bf16 products where the CPU has them), every
(site, layer) of the table. Four modes, alternating within each repeat (medians):

  entropy                 the default request, on the backend the dispatcher picks (tiles)
  entropy+varentropy      --stats varentropy (tiles: both in one pass over each tile)
  entropy on rows         the default request forced onto whole logits rows
  entropy+nucleus_size    --stats nucleus_size (rows only: each row is sorted)

Printed: each mode's median time, and the ratios varentropy / entropy and nucleus / entropy on
rows (the backend a nucleus size must run on) and / entropy (what a run pays for asking).
"""

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from bench_entropy import build_model, capture_sites, engine, measure, unique_keys  # noqa: E402

from internal_policy_lens.lens.reduce import choose_backend  # noqa: E402
from internal_policy_lens.lens.unembed import Lens  # noqa: E402
from internal_policy_lens.statistics import Request  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_statistics_") as folder:
        model = build_model(folder, args.layers)
        acts = capture_sites(model, args.tokens, 1)
        keys, rows, lens = unique_keys(acts), args.tokens, Lens(model, "raw", "fast")
        modes = {
            "entropy": lambda: engine(lens, acts, keys, rows),
            "entropy+varentropy": lambda: engine(lens, acts, keys, rows, stats=("varentropy",)),
            "entropy on rows": lambda: engine(lens, acts, keys, rows, backend="rows"),
            "entropy+nucleus_size": lambda: engine(lens, acts, keys, rows, stats=("nucleus_size",)),
        }
        for fn in modes.values():
            fn()  # warm-up
        times = {name: [] for name in modes}
        for _ in range(args.repeats):
            for name, fn in modes.items():
                times[name].append(measure(fn)[0])
    median = {name: statistics.median(values) for name, values in times.items()}
    backends = {
        "entropy": choose_backend(model.device, Request(), dtype=lens.reduce_dtype),
        "entropy+varentropy": choose_backend(model.device, Request(("varentropy",))),
        "entropy on rows": "rows",
        "entropy+nucleus_size": choose_backend(model.device, Request(("nucleus_size",))),
    }
    print(
        f"model: d_model {model.d_model}, vocab {model.vocab_size}, {model.n_layers} layers; "
        f"{rows} tokens x {len(keys)} distinct vectors; precision fast ({lens.chosen.reason}); "
        f"{args.repeats} repeats"
    )
    print(f"{'mode':22} {'backend':8} {'median s':>9}  all (s)")
    for name, value in median.items():
        shown = ", ".join(f"{t:.2f}" for t in times[name])
        print(f"{name:22} {backends[name]:8} {value:9.2f}  {shown}")
    base, rows_base = median["entropy"], median["entropy on rows"]
    print(f"varentropy: {median['entropy+varentropy'] / base:.2f}x the entropy alone")
    print(
        f"nucleus size: {median['entropy+nucleus_size'] / rows_base:.2f}x the entropy on rows, "
        f"{median['entropy+nucleus_size'] / base:.2f}x the entropy alone (tiles)"
    )


if __name__ == "__main__":
    main()
