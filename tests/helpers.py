"""Shared test helpers: inputs, reference tables, tiny configs and the checks several tests make.

Imported by name from the test files (``from helpers import ...``); fixtures live in conftest.py.
"""

import contextlib
import json
import os
import random
import sys

import torch
from reference import entropy, hf_model, naive_logits, naive_sites, naive_tuned_logits

from internal_policy_lens.model.families import TINY_ARCHITECTURES

# Real architecture configs at tiny sizes: Qwen2 (q/k/v biases), Qwen3 (q/k norm), Llama with
# untied and tied embeddings. Hidden and vocabulary sizes are not powers of two.
ARCHS = {
    "qwen2": dict(arch="qwen2"),
    "qwen3": dict(arch="qwen3"),
    "llama": dict(arch="llama", tie_embeddings=False),
    "llama_tied": dict(arch="llama", tie_embeddings=True, d_model=60, n_heads=5, n_kv_heads=5),
}

# One tiny model per further family of the registry, each with its distinctive features switched
# on (see its module in internal_policy_lens.model.families). Smaller than ARCHS: there are many.
FAMILY_ARCHS = tuple(a for a in TINY_ARCHITECTURES if a not in ("qwen2", "qwen3", "llama"))
FAMILY_SIZES = dict(n_layers=3, d_model=48, n_heads=4, n_kv_heads=2, d_mlp=64)

TEXTS = [
    "Solve 12+7*3. First 7*3=21, then 12+21=33. \\boxed{33}",
    "What is 9-4?",
    "Let x=5; x*x=25 and 25+1=26.",
]


def naive_table(folder, tokenizer, texts, lens, translators=None):
    """Reference entropies {(sample, position, layer, site): nats} in float64.

    ``lens="tuned"`` applies ``translators`` ``{(site, layer): (A, b)}`` by hand (``resid_pre``
    of layer l > 0 reads the translator of ``resid_post`` l - 1, as the lens folders store it).
    """
    model = hf_model(folder)
    out = {}
    for sample, text in enumerate(texts):
        acts, _ = naive_sites(model, tokenizer(text)["input_ids"])
        for (site, layer), x in acts.items():
            if lens == "tuned" and site != "final":
                shared = site == "resid_pre" and layer > 0
                a, b = translators[("resid_post", layer - 1) if shared else (site, layer)]
                h = entropy(naive_tuned_logits(model, x, a, b))
            else:
                h = entropy(naive_logits(model, x, site, lens))
            for pos, value in enumerate(h.tolist()):
                out[sample, pos, layer, site] = value
    return out


def lens_folder(model, folder, translators, fmt="ipl"):
    """``translators`` written as a lens folder for ``model`` (``ipl`` or ``tuned-lens`` format)."""
    from internal_policy_lens.lens.tuned import model_facts, write_lens

    meta = {"model": model_facts(model), "sites": sorted({s for s, _ in translators})}
    write_lens(folder, translators, meta, fmt)
    return folder


def random_translators(model, keys, scale=0.05, seed=0):
    """Small random translators ``(A, b)`` for ``keys``: a tuned lens unlike the norm lens."""
    gen = torch.Generator().manual_seed(seed)
    d = model.d_model
    return {
        key: (scale * torch.randn(d, d, generator=gen), scale * torch.randn(d, generator=gen))
        for key in keys
    }


def write_questions(path, n):
    """``n`` records ``{"question": "What is i+3i?"}`` without responses (generation needed)."""
    rows = [{"question": f"What is {i}+{i * 3}?"} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_problems(path, n):
    """``n`` records ``{"question": "What is i+i?", "answer": "2i"}`` as JSON Lines at ``path``."""
    rows = [{"question": f"What is {i}+{i}?", "answer": str(2 * i)} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def tiny_bupo_config(tiny_dirs, data_file, out, **kw):
    """A two-step BuPO config (one IPA step at layer 1, then GRPO) on the tiny qwen2 model."""
    from internal_policy_lens.config import BupoConfig

    base = dict(
        model=str(tiny_dirs["qwen2"]),
        data=str(data_file),
        out=str(out),
        layer=1,
        iterative_steps=1,
        steps=2,
        group_size=4,
        prompts_per_step=3,
        mini_batch_size=6,
        max_new_tokens=12,
        lr=1e-2,
        save_every=1,
    )
    return BupoConfig(**{**base, **kw})


def assert_ipa_then_grpo_updates(start: dict, ipa: dict, grpo: dict) -> None:
    """State dicts of the tiny 3-layer model before, after one IPA step at layer 1, after GRPO.

    IPA leaves layer 2 and the final norm bit-identical and changes layers 0-1 and the LM head;
    the GRPO step changes every layer. A key bias shifts every attention score of a head
    equally: softmax ignores it, so its gradient is zero up to rounding, which Adam may or may
    not turn into a step; it is left out.
    """
    keys = [k for k in start if not k.endswith("k_proj.bias")]
    above = [k for k in keys if k.startswith("model.layers.2.")] + ["model.norm.weight"]
    below = [k for k in keys if k.startswith(("model.layers.0.", "model.layers.1."))]
    assert [k for k in above if not torch.equal(start[k], ipa[k])] == []
    assert [k for k in below + ["lm_head.weight"] if torch.equal(start[k], ipa[k])] == []
    assert [k for k in above + below if torch.equal(ipa[k], grpo[k])] == []


def parity_reward(text, answer):
    """A reward that varies with the text, so groups of random-model responses have variance."""
    return float(sum(map(ord, text)) % 2 == 0)


def alternating_reward():
    """A reward function giving 1, 0, 1, 0... over its calls: every group has variance."""
    calls = iter(range(1 << 62))
    return lambda text, answer: float(next(calls) % 2 == 0)


def seed_everything(seed: int = 0) -> None:
    """Seed Python's, NumPy's and torch's generators."""
    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def trl_rewards():
    """TRL reward functions (batches of completions) giving 1, 0, 1, 0...: every group varies."""
    reward = alternating_reward()
    return [lambda completions, **kwargs: [reward(c, None) for c in completions]]


def trl_trainer(cfg, layer: int, lens: str = "raw"):
    """A BupoGRPOTrainer on ``cfg.model`` with four copies of one prompt, ready to step."""
    from internal_policy_lens.integrations.trl import trainer as bupo_trl
    from internal_policy_lens.model.load import load_causal_lm

    model, tokenizer = load_causal_lm(cfg.model)
    trainer = bupo_trl.BupoGRPOTrainer(
        model=model,
        args=bupo_trl.grpo_config(cfg, disable_tqdm=True),
        reward_funcs=trl_rewards(),
        train_dataset=bupo_trl.prompt_dataset([{"prompt": "1+1?", "answer": "2"}] * 4, tokenizer),
        processing_class=tokenizer,
        layer=layer,
        iterative_steps=cfg.iterative_steps,
        lens=lens,
    )
    trainer.current_gradient_accumulation_steps = 1
    return trainer


def ipl_command(*args) -> list[str]:
    """The command line of ``ipl ARGS...`` run by this Python (a subprocess of the tests)."""
    return [sys.executable, "-m", "internal_policy_lens.cli", *map(str, args)]


def one_thread_env(**extra) -> dict:
    """The environment for a subprocess of the tests: one thread each (they share 2 cores)."""
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra}


def trl_batch(tokenizer, prompts, completions):
    """Prompts left-padded, completions right-padded (TRL's layout): ids, mask ``[N, P + C]``,
    P and C."""
    prompts = [tokenizer(t)["input_ids"] for t in prompts]
    completions = [tokenizer(t)["input_ids"] for t in completions]
    p, c = max(map(len, prompts)), max(map(len, completions))
    ids = torch.full((len(prompts), p + c), tokenizer.pad_token_id)
    mask = torch.zeros_like(ids)
    for row, (a, b) in enumerate(zip(prompts, completions)):
        ids[row, p - len(a) : p + len(b)] = torch.tensor(a + b)
        mask[row, p - len(a) : p + len(b)] = 1
    return ids, mask, p, c


def assert_trl_logprobs_are_ours(trainer, policy, batch, layer_k: int, lens: str) -> None:
    """TRL's per-token log-probs and entropies, in IPA (layer k) and GRPO, equal the package's
    ``token_logprobs`` on the completion tokens (2e-5)."""
    from internal_policy_lens.train.rollout import token_logprobs

    ids, mask, p, c = batch
    target = mask[:, p:].bool()
    with torch.no_grad():
        for layer in (layer_k, None):  # IPA at step 0, GRPO from the first step after s_inter
            trainer.state.global_step = 0 if layer is not None else trainer.steps_per_rollout
            assert trainer.in_ipa == (layer is not None)
            logp, entropy, _ = trainer._get_per_token_logps_and_entropies(
                trainer.model, ids, mask, c, compute_entropy=True
            )
            ours, ours_h = token_logprobs(policy, ids, mask, layer=layer, lens_name=lens)
            torch.testing.assert_close(logp[target], ours[:, p - 1 :][target], atol=2e-5, rtol=0)
            torch.testing.assert_close(
                entropy[target], ours_h[:, p - 1 :][target], atol=2e-5, rtol=0
            )


def independent_probes(folder, records, k):
    """Every training-probe quantity of the model in ``folder`` on the probe ``records``, as
    ``{(quantity, layer, other_layer): value}``, computed apart from the probe code."""
    from internal_policy_lens import entropy_table, load_model
    from internal_policy_lens.data.encode import encode_inputs

    model = load_model(folder, dtype="float32", device="cpu")
    tokens = entropy_table(model, records, response_only=True, extras=False)
    site = tokens["site"].astype(str)
    out = {}
    for name in ("resid_post", "attn_out", "mlp_out"):
        for layer, value in tokens[site == name].groupby("layer")["entropy"].mean().items():
            out["entropy_" + name, layer, None] = value
    wide = tokens[site != "final"].pivot(
        index=["sample_id", "position", "layer"], columns="site", values="entropy"
    )
    for module, (a, b) in {
        "layer": ("resid_pre", "resid_post"),
        "attn": ("attn_in", "attn_out"),
        "ffn": ("mlp_in", "mlp_out"),
    }.items():
        for layer, value in (wide[b] - wide[a]).groupby("layer").mean().items():
            out["delta_" + module, layer, None] = value
    # By hand, float64: cosines, KL(pi^k || pi^j) under the raw lens, and perplexity.
    reference = hf_model(folder, dtype=torch.float32)
    kept = tokens[(site == "final")].groupby("sample_id")["position"].apply(list)
    ids = {e.sample_id: e.input_ids for e in encode_inputs(model.tokenizer, records)}
    cos, kl, nll = {}, {}, []
    for sample_id, positions in kept.items():
        acts, logits = naive_sites(reference, ids[sample_id])
        h = {j: acts["resid_post", j][positions].double() for j in range(model.n_layers)}
        logp = {
            j: torch.log_softmax(naive_logits(reference, h[j], "resid_post", "raw"), -1) for j in h
        }
        for j in range(k + 1, model.n_layers):
            cos.setdefault(j, []).append(
                (h[k] * h[j]).sum(-1) / h[k].norm(dim=-1) / h[j].norm(dim=-1)
            )
            kl.setdefault(j, []).append((logp[k].exp() * (logp[k] - logp[j])).sum(-1))
        final = torch.log_softmax(logits.double(), -1)[positions]
        nxt = torch.tensor(ids[sample_id])[[p + 1 for p in positions]]
        nll.append(-final.gather(-1, nxt[:, None])[:, 0])
    for j in cos:
        out["cos_hidden", k, j] = torch.cat(cos[j]).mean().item()
        out["kl_layer_other", k, j] = torch.cat(kl[j]).mean().item()
    out["perplexity", None, None] = torch.cat(nll).mean().exp().item()
    return out


def assert_probes_match(rows, expected: dict, step) -> None:
    """One probe's rows of ``probes.parquet`` hold exactly ``expected``'s keys and values (1e-5)."""
    import pandas as pd
    import pytest

    got = {
        (
            r.quantity,
            None if pd.isna(r.layer) else int(r.layer),
            None if pd.isna(r.other_layer) else int(r.other_layer),
        ): r.value
        for r in rows.itertuples()
    }
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-5, rel=1e-5), (step, key)


PROBE_QUANTITIES = {  # the quantities every probe writes (the training-probe specification)
    "entropy_resid_post",
    "entropy_attn_out",
    "entropy_mlp_out",
    "delta_layer",
    "delta_attn",
    "delta_ffn",
    "cos_hidden",
    "kl_layer_other",
    "perplexity",
}


def assert_probes_follow_the_weights(table, probed: dict, records, k) -> None:
    """Each probe step's rows equal an independent computation on the weights of that step
    (``probed``: step -> model folder), and the first and last probes differ (so the
    comparison is not between constants)."""
    for step, folder in probed.items():
        rows = table[table["step"] == step]
        assert_probes_match(rows, independent_probes(folder, records, k), step)
    first, last = (
        table[table.step == s].set_index(["quantity", "layer", "other_layer"])
        for s in (min(probed), max(probed))
    )
    assert (first["value"] - last["value"]).abs().max() > 1e-4


def assert_resumed_probes_match(full, resumed, steps) -> None:
    """A resumed run's probe table has exactly one row set per probed step (``steps``), no
    duplicate row, and the uninterrupted run's values (1e-6)."""
    import numpy as np

    per_step = resumed.groupby("step").size()
    assert per_step.index.tolist() == steps
    assert (per_step == len(full[full.step == 0])).all()  # exactly one row set per probed step
    keys = ["step", "quantity", "layer", "other_layer"]
    assert not resumed.duplicated(keys).any()
    merged = full.merge(resumed, on=keys, suffixes=("_full", "_resumed"))
    assert len(merged) == len(full) == len(resumed)
    np.testing.assert_allclose(merged["value_full"], merged["value_resumed"], atol=1e-6, rtol=1e-6)


CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@contextlib.contextmanager
def browser_page(path, width: int = 1300, height: int = 900):
    """``path`` (an HTML file) open in headless Chromium, every other request blocked.

    Yields ``(page, errors, requests)``: console errors and page errors, and the URLs asked for
    that were not the file itself. Skips loudly without Playwright or Debian's chromium.
    """
    import shutil

    import pytest

    playwright = pytest.importorskip(
        "playwright.sync_api", reason="SKIPPED BROWSER TEST: playwright is not installed"
    )
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("SKIPPED BROWSER TEST: no chromium; install it with apt-get install chromium")
    errors, requests = [], []

    def route(r):
        if r.request.url.startswith("file://"):
            return r.continue_()
        requests.append(r.request.url)
        return r.abort()

    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda err: errors.append(str(err)))
            page.route("**/*", route)
            page.goto(path.resolve().as_uri())
            yield page, errors, requests
        finally:
            browser.close()


@contextlib.contextmanager
def eager_attention(model):
    """``model`` runs eager attention in the block (position blocks run only there), then auto."""
    model.set_attention("eager")
    try:
        yield model
    finally:
        model.set_attention("auto")
