"""One IPA update (ratio on pi^k, forward stopped after layer k) vs one GRPO update, same batch.

    nice -n 10 python analyses/bench_bupo_update.py [--model ipl-tiny-qwen2] [--layers-k 1 3 5]
    nice -n 10 python analyses/bench_bupo_update.py --qwen-dims 24 --layers-k 5 11 17 \
        --sequences 8 --tokens 64

Each update is the trainer's own `update_policy` (one mini-batch, one AdamW step: the policy's
per-token log-probs with gradients, the PPO-clip loss, backward, clipping, the step) on the same
fixed batch of random token sequences (half prompt, half response) with fixed advantages. Modes
alternate within each repeat (GRPO, then IPA at each k); times are medians. The ratio IPA/GRPO is
printed beside (k+1)/L, the share of the decoder layers an IPA update runs; the embedding and the
unembedding (forward and backward) are paid by both, so the measured ratio sits above (k+1)/L, the
more so the larger the vocabulary is relative to the layers' width.

`--qwen-dims L` builds a random model with Qwen2.5-0.5B's dimensions and L layers (as
bench_entropy.py does, no download) instead of loading `--model`.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from internal_policy_lens import load_model  # noqa: E402
from internal_policy_lens.config import BupoConfig  # noqa: E402
from internal_policy_lens.train.loop import update_policy  # noqa: E402
from internal_policy_lens.train.rollout import RolloutBatch, token_logprobs  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_entropy import build_model  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--model", default="ipl-tiny-qwen2")
parser.add_argument("--qwen-dims", type=int, default=None, metavar="L")
parser.add_argument("--layers-k", type=int, nargs="+", default=[1, 3, 5])
parser.add_argument("--sequences", type=int, default=32)
parser.add_argument("--tokens", type=int, default=96)
parser.add_argument("--repeats", type=int, default=5)
args = parser.parse_args()


def fixed_batch(model) -> RolloutBatch:
    gen = torch.Generator().manual_seed(0)
    n, t = args.sequences, args.tokens
    ids = torch.randint(5, min(model.vocab_size, 100), (n, t), generator=gen)
    response = torch.zeros(n, t - 1, dtype=torch.long)
    response[:, t // 2 :] = 1  # the second half of each sequence is the response
    advantages = torch.randn(n, generator=gen)
    lengths = torch.full((n,), t - t // 2)
    texts = [""] * n
    return RolloutBatch(ids, torch.ones_like(ids), response, advantages, advantages, lengths, texts)


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="bench_bupo_") as folder:
        if args.qwen_dims:
            model = build_model(folder, args.qwen_dims)
        else:
            model = load_model(args.model, dtype="float32", device="cpu")
    cfg = BupoConfig(mini_batch_size=args.sequences, updates_per_step=1, lr=1e-6)
    batch = fixed_batch(model)
    params = [p for p in model.bridge.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0)
    modes = {"grpo": None} | {f"ipa k={k}": k for k in args.layers_k}
    with torch.no_grad():
        old = {
            name: token_logprobs(model, batch.input_ids, batch.attention_mask, layer=k)[0]
            for name, k in modes.items()
        }

    def update(name):
        k = modes[name]
        start = time.perf_counter()
        model.bridge.train()
        update_policy(model, opt, sched, batch, old[name], None, k, cfg, 0)
        return time.perf_counter() - start

    for name in modes:  # warm-up (allocator, AdamW state)
        update(name)
    times = {name: [] for name in modes}
    for _ in range(args.repeats):
        for name in modes:
            times[name].append(update(name))
    median = {name: statistics.median(v) for name, v in times.items()}
    L = model.n_layers
    print(
        f"model: {model.architecture}, {L} layers, d_model {model.d_model}, vocab "
        f"{model.vocab_size}, float32; batch {args.sequences} x {args.tokens} tokens; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.repeats} repeats"
    )
    print(f"{'mode':10} {'median s':>9} {'vs grpo':>8} {'(k+1)/L':>8}")
    for name, t in median.items():
        k = modes[name]
        share = 1.0 if k is None else (k + 1) / L
        print(f"{name:10} {t:9.3f} {t / median['grpo']:8.2f} {share:8.2f}")
    print("all times (s):", {name: [round(v, 3) for v in vals] for name, vals in times.items()})
    print(
        "ratios: "
        + ", ".join(
            f"IPA at k={modes[n]} takes {median[n] / median['grpo']:.2f} of a GRPO update "
            f"((k+1)/L = {(modes[n] + 1) / L:.2f})"
            for n in modes
            if modes[n] is not None
        )
    )


if __name__ == "__main__":
    main()
