"""Benchmark of the entropy engine on a model with Qwen2.5-0.5B's dimensions (random weights).

    nice -n 10 python analyses/bench_entropy.py [--tokens 256] [--samples 1] [--layers 24] \\
        [--repeats 3]
    nice -n 10 python analyses/bench_entropy.py --memory-tokens 4096 [--memory-dtype bfloat16]

d_model 896, vocabulary 151936, 14 heads, 2 KV heads, intermediate 4864, `--layers` decoder
layers (24 in the real model), built from a Qwen2Config with random weights (no download) and a
character tokenizer, saved to a temporary folder and loaded with `load_model` in float32. The
unembedding is scaled so that the policies range from peaked to near uniform (raw lens).

All modes read the same captured site vectors of `--samples` sequences of `--tokens` tokens;
each turns every (site, layer) of the table (7 sites x L layers + final) into per-token entropies:

  naive       the paper authors' method, written here: per (site, layer), float32 logits of all
              tokens, softmax and log-softmax materialised, -sum p log p (resid_pre recomputed)
  exact       engine.site_stats, precision exact (float32 products, float32 reductions)
  exact64     exact's float32 products with float64 reductions (what float64 reductions cost)
  fast        engine.site_stats, precision fast for this float32 model (bf16 products where
              the CPU has native bf16, else float32; float32 reductions)
  auto        engine.site_stats, precision auto as it resolves for a bf16 checkpoint (the dtype
              Qwen2.5-0.5B ships in) on this CPU, applied to the same vectors
  auto+compile
              auto with the tiles' reductions compiled by torch.compile (what a run of more than
              TILED_COMPILE_MIN_ELEMENTS logits does; here after the one-time compile, which the
              warm-up takes, about 5 s)
  floor-fp32  the bare unembedding products of the rows the engine projects (resid_pre[l > 0]
              is resid_post[l - 1]: 7L + 1 - (L - 1) distinct vectors of the 7L + 1 pairs that
              naive projects), float32, in blocks of 1024 rows
  floor-bf16  the same in bfloat16 (both into one reused output buffer, as the engine does)
  exact+topK, fast+topK
              exact / fast with the K most probable tokens of every policy kept in the same pass
              (``--topk``, default 5 and 20): the cost of ``ipl entropy --topk K``
  norm        fast with the norm lens (the final RMSNorm before the unembedding)
  tuned       fast with the tuned lens: a random d x d translator per (site, layer), then as norm
  fast+varentropy
              fast with --stats varentropy (the tiles backend, both statistics in one pass)
  fast-rows, fast-rows+nucleus
              fast on the rows backend, without and with --stats nucleus_size (which only rows
              computes: it sorts each row)

The CPU's kernels (torch.backends.cpu.get_cpu_capability(), lowered by ATEN_CPU_CAPABILITY=avx2;
ONEDNN_MAX_CPU_ISA=AVX2 lowers oneDNN's, which run the bf16 products) and its bf16 flags are
printed first. Modes alternate within each repeat; times are medians (OMP_WAIT_POLICY=PASSIVE
unless set); "vs floor" is against the faster floor. Peak memory: each mode runs once more in a
fresh process (allocators such as MKL's keep buffers across calls); the peak resident set size
(VmHWM, reset through /proc/self/clear_refs after a warm-up) during that run, minus the resident
set before it. The lenses (and so fast's and auto's bf16 copy of the float32 unembedding,
0.27 GB, which a bf16 checkpoint does not need) are made before it. Errors are against a float64
computation on the first `--ref-tokens` rows.
`--memory-tokens N` instead measures the peak extra memory of a whole `entropy_table` call (model
forward pass and captures included) on one N-token sequence, with the model in `--memory-dtype`.
"""

import argparse
import gc
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

# Set before torch starts OpenMP: with 2 threads and another busy process, small parallel ops
# otherwise spin at barriers and run up to 10x slower (SPEC, section 9).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from internal_policy_lens import entropy_table, load_model  # noqa: E402
from internal_policy_lens.lens.capture import capture, site_keys  # noqa: E402
from internal_policy_lens.lens.reduce import site_stats  # noqa: E402
from internal_policy_lens.lens.unembed import Lens, Precision, choose_precision  # noqa: E402
from internal_policy_lens.model.hardware import cpu_capability, cpu_flags  # noqa: E402
from internal_policy_lens.model.tiny import char_tokenizer  # noqa: E402
from internal_policy_lens.statistics import Request  # noqa: E402

CHUNK = 1024  # logits rows per product, the entropy_table default


def build_model(folder, layers, dtype="float32"):
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=layers,
        num_attention_heads=14,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        tie_word_embeddings=False,
        rms_norm_eps=1e-6,
        pad_token_id=0,
        eos_token_id=4,
        bos_token_id=None,
        architectures=["Qwen2ForCausalLM"],
    )
    torch.manual_seed(0)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02)
        model.lm_head.weight.mul_(8.0)  # logits of normed vectors: std ~5, max ~20 nats
    model.save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    return load_model(folder, dtype=dtype, device="cpu")


def capture_sites(model, tokens, samples):
    """Site vectors of ``samples`` sequences, their rows laid end to end: ``[1, rows, d]``."""
    shape = (samples, tokens)
    ids = torch.randint(5, 100, shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), capture(model, keys=site_keys(model)) as acts:
        model.forward(ids, torch.ones_like(ids))
    return {key: value.reshape(1, samples * tokens, -1) for key, value in acts.items()}


def unique_keys(acts):
    # What entropy_table projects: resid_pre[l] is resid_post[l-1] for l > 0.
    return [k for k in acts if not (k[0] == "resid_pre" and k[1] > 0)]


def naive(model, acts, keys, rows):
    out = {}
    W, b = model.unembed.weight.float(), model.unembed.bias
    for key in keys:
        logits = F.linear(acts[key][0, :rows].float(), W, b)  # [tokens, vocab]
        p, logp = torch.softmax(logits, -1), torch.log_softmax(logits, -1)
        out[key] = -(p * logp).sum(-1)
    return out


def engine(lens, acts, keys, rows, topk=0, compiled=None, stats=(), backend=None):
    index = (torch.zeros(rows, dtype=torch.long), torch.arange(rows))
    request = Request(("entropy", *stats), topk=topk)
    stats = site_stats(
        lens, acts, keys, index, request, chunk_tokens=CHUNK, compiled=compiled, backend=backend
    )  # compiled=None: as it decides
    return {key: torch.from_numpy(cols["entropy"]) for key, cols in stats.items()}


def floor(weight, stacked, rows):
    stacked = stacked[:, :rows].flatten(0, 1)  # [sites * tokens, d_model]
    out = torch.empty(CHUNK, weight.shape[0], dtype=weight.dtype)  # reused, as by the engine
    for start in range(0, len(stacked), CHUNK):
        x = stacked[start : start + CHUNK]
        torch.mm(x, weight.t(), out=out[: len(x)])


def reference(model, acts, keys, rows):
    W = model.unembed.weight.double()
    out = {}
    for key in keys:
        logp = torch.log_softmax(acts[key][0, :rows].double() @ W.T, -1)
        out[key] = -(logp.exp() * logp).sum(-1)
    return out


def proc_gb(field):
    text = open("/proc/self/status").read()
    return int(re.search(rf"{field}:\s+(\d+) kB", text).group(1)) / 1e6


def measure(fn):
    """Seconds, peak extra resident memory (GB) and result of one call of ``fn``."""
    gc.collect()  # garbage freed during the call would hide the call's own allocations
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # resets VmHWM to the current resident set
    before = proc_gb("VmRSS")
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, proc_gb("VmHWM") - before, result


def errors(got, ref):
    err = torch.cat([(got[k][: len(ref[k])].double() - ref[k]).abs() for k in ref])
    return err.max().item(), err.mean().item()


def auto_precision(model):
    """What ``auto`` runs on this CPU for a bf16 checkpoint of the model's widths."""
    return choose_precision("auto", torch.bfloat16, "cpu", model.d_model)


def make_modes(model, acts, topks=()):
    table_keys, keys = list(acts), unique_keys(acts)
    d = model.d_model
    gen = torch.Generator().manual_seed(0)
    translators = {
        k: (0.01 * torch.randn(d, d, generator=gen), 0.01 * torch.randn(d, generator=gen))
        for k in keys
        if k[0] != "final"
    }
    lenses = {
        "exact": Lens(model, "raw", "exact"),
        "exact64": Lens(model, "raw", Precision("exact", torch.float32, torch.float64, "bench")),
        "fast": Lens(model, "raw", "fast"),
        "auto": Lens(model, "raw", auto_precision(model)),
        "norm": Lens(model, "norm", "fast"),
        "tuned": Lens(model, "tuned", "fast", translators),
    }
    weight = model.unembed.weight
    stacked = torch.stack([acts[k][0] for k in keys])  # [sites, rows, d]
    floors = {
        f"floor-{name}": (weight.to(dtype), stacked.to(dtype))
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))
    }
    modes = {"naive": lambda rows: naive(model, acts, table_keys, rows)}
    for name, lens in lenses.items():
        modes[name] = lambda rows, lens=lens: engine(lens, acts, keys, rows)
    modes["auto+compile"] = lambda rows: engine(lenses["auto"], acts, keys, rows, compiled=True)
    for name in ("exact", "fast"):
        for k in topks:
            modes[f"{name}+top{k}"] = lambda rows, lens=lenses[name], k=k: engine(
                lens, acts, keys, rows, k
            )
    # The opt-in statistics' cost: varentropy beside the entropy on the tiles; the nucleus size
    # on rows, against the entropy alone on rows (the backend it must run on).
    fast = lenses["fast"]
    modes["fast+varentropy"] = lambda rows: engine(fast, acts, keys, rows, stats=("varentropy",))
    modes["fast-rows"] = lambda rows: engine(fast, acts, keys, rows, backend="rows")
    modes["fast-rows+nucleus"] = lambda rows: engine(
        fast, acts, keys, rows, stats=("nucleus_size",)
    )
    for name, (w, x) in floors.items():
        modes[name] = lambda rows, w=w, x=x: floor(w, x, rows)
    return modes


def child_memory(args):
    """One mode in a fresh process: peak extra memory of one run (allocators cache across modes)."""
    model = load_model(args.folder, dtype="float32", device="cpu")
    acts = capture_sites(model, args.tokens, args.samples)
    fn = make_modes(model, acts, topk_list(args.topk))[args.child]
    fn(8)  # compiles, pages the weights in
    print(json.dumps(measure(lambda: fn(args.tokens * args.samples))[1]))


def benchmark(args):
    with tempfile.TemporaryDirectory(prefix="bench_entropy_") as folder:
        model = build_model(folder, args.layers)
        acts, T = capture_sites(model, args.tokens, args.samples), args.tokens * args.samples
        modes = make_modes(model, acts, topk_list(args.topk))
        warm = {name: measure(lambda f=fn: f(8))[0] for name, fn in modes.items()}
        times, results = {name: [] for name in modes}, {}
        for _ in range(args.repeats):
            for name, fn in modes.items():
                seconds, _, results[name] = measure(lambda f=fn: f(T))
                times[name].append(seconds)
        memory = {name: memory_of(name, folder, args) for name in modes}
    keys = unique_keys(acts)
    ref = reference(model, acts, keys, min(args.ref_tokens, T))
    spread = torch.cat(list(ref.values()))
    bf16_flags = sorted(f for f in cpu_flags() if f.endswith(("_bf16", "_fp16")))
    print(
        f"CPU: {cpu_name()}; ATen kernels {cpu_capability()}; flags {bf16_flags or 'no bf16'}; "
        f"ATEN_CPU_CAPABILITY={os.environ.get('ATEN_CPU_CAPABILITY', '')} "
        f"ONEDNN_MAX_CPU_ISA={os.environ.get('ONEDNN_MAX_CPU_ISA', '')}"
    )
    for name, precision in (("auto (bf16 model)", auto_precision(model)),):
        print(f"{name}: {precision.record()}")
    for mode in ("exact", "fast"):
        print(f"{mode} (this float32 model): {choose_precision(mode, torch.float32).record()}")
    print(
        f"model: Qwen2 d_model 896, vocab 151936, {model.n_layers} layers, float32, random "
        f"weights; {args.samples} x {args.tokens} tokens; {len(acts)} (site, layer) per token, "
        f"{len(keys)} distinct vectors; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    print(
        f"float64 entropies of the first {len(spread) // len(keys)} tokens: min "
        f"{spread.min():.2f}, median {spread.median():.2f}, max {spread.max():.2f} nats"
    )
    report(times, warm, memory, results, ref, T)


def cpu_name():
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def topk_list(text):
    return [int(k) for k in text.split(",") if k.strip()]


def memory_of(mode, folder, args):
    command = [sys.executable, __file__, "--child", mode, "--folder", folder]
    sizes = ["--tokens", str(args.tokens), "--samples", str(args.samples), "--topk", args.topk]
    done = subprocess.run([*command, *sizes], capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def report(times, warm, memory, results, ref, tokens):
    median = {name: statistics.median(values) for name, values in times.items()}
    floor_t = min(median["floor-fp32"], median["floor-bf16"])
    print(
        f"{'mode':10} {'median s':>9} {'tokens/s':>9} {'vs naive':>9} {'vs floor':>9} "
        f"{'warm-up s':>9} {'peak GB':>8} {'max err':>9} {'mean err':>9}"
    )
    for name, t in median.items():
        raw = results[name] is not None and name not in ("norm", "tuned")  # ref is the raw lens
        err = errors(results[name], ref) if raw else (np.nan, np.nan)
        print(
            f"{name:10} {t:9.2f} {tokens / t:9.1f} {median['naive'] / t:8.2f}x "
            f"{t / floor_t:8.2f}x {warm[name]:9.2f} {memory[name]:8.2f} "
            f"{err[0]:9.2e} {err[1]:9.2e}"
        )
    print("all times (s):", {name: [round(v, 2) for v in values] for name, values in times.items()})
    ratio = median["floor-fp32"] / median["floor-bf16"]
    fastest = "bf16" if ratio > 1 else "fp32"
    native = auto_precision_products() == "bfloat16"
    goal = 6 if native else 2
    exact_err = errors(results["exact"], ref)[0]
    checks = [
        (f"bf16 products are {ratio:.2f}x float32's speed (floor-fp32 / floor-bf16)", None),
        (
            f"auto is {median['auto'] / floor_t:.2f}x the floor of the fastest product ({fastest})",
            median["auto"] / floor_t <= 1.15,
        ),
        (
            f"auto+compile is {median['auto+compile'] / floor_t:.2f}x the floor of the fastest "
            f"product ({fastest})",
            None,
        ),
        (
            f"auto is {median['naive'] / median['auto']:.2f}x faster than naive "
            f"(target >= {goal}x)",
            median["naive"] / median["auto"] >= goal,
        ),
        (
            f"peak extra memory: auto {memory['auto']:.2f} GB, exact {memory['exact']:.2f} GB, "
            f"naive {memory['naive']:.2f} GB",
            max(memory["auto"], memory["exact"]) <= memory["naive"],
        ),
        (f"exact max error {exact_err:.1e} nats (target <= 1e-4)", exact_err <= 1e-4),
        (
            f"float64 reductions cost {median['exact64'] / median['exact']:.2f}x float32's "
            f"(exact64 / exact)",
            None,
        ),
    ]
    for text, met in checks:
        print(text + ("" if met is None else (": met" if met else ": NOT met")))


def auto_precision_products():
    return str(choose_precision("auto", torch.bfloat16).products).removeprefix("torch.")


def memory_run(args):
    with tempfile.TemporaryDirectory(prefix="bench_entropy_") as folder:
        model = build_model(folder, args.layers, args.memory_dtype)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 100, (args.memory_tokens,), generator=generator).tolist()
    entropy_table(model, [ids[:32]])  # warm-up: pages the weights in
    seconds, peak, table = measure(
        lambda: entropy_table(model, [ids], attention_mb=args.attention_mb)
    )
    print(
        f"entropy_table on one {args.memory_tokens}-token sequence, {model.n_layers} layers, "
        f"model {args.memory_dtype} (precision auto), chunk_tokens 1024, capture_mb 512, "
        f"attention_mb {args.attention_mb:g}: {len(table):,} rows in {seconds:.0f} s; "
        f"peak extra memory {peak:.2f} GB (VmHWM - VmRSS before the call)"
    )


if __name__ == "__main__":
    torch.set_grad_enabled(False)  # the weights are parameters: no autograd graphs here
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--samples", type=int, default=1)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ref-tokens", type=int, default=64)
    parser.add_argument("--topk", default="5,20", help="K of the top-k modes (comma-separated)")
    parser.add_argument("--memory-tokens", type=int, default=0)
    parser.add_argument("--memory-dtype", default="bfloat16")
    parser.add_argument(
        "--attention-mb", type=float, default=256, help="entropy_table's attention_mb (memory run)"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_memory(args)
    elif args.memory_tokens:
        memory_run(args)
    else:
        benchmark(args)
