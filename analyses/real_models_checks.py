"""The identities the tests check on random models, measured on a real GGUF model (max errors).

The reference is tests/reference.py: a plain transformers model in float64 (loaded from the same
file by transformers itself, not through the package) with torch hooks on its own modules.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from reference import entropy, naive_logits, naive_sites  # noqa: E402

from internal_policy_lens import capture, entropy_table, load_model  # noqa: E402

TEXT = (
    "Convert the point $(0,3)$ in rectangular coordinates to polar coordinates. "
    "The radius is $r = \\sqrt{0^2 + 3^2} = 3$, so the answer is $\\boxed{(3, \\pi/2)}$."
)
BRANCHES = ("attn_in", "attn_out", "resid_mid", "mlp_in", "mlp_out")


def _reference(path: Path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float64, attn_implementation="eager"
    )
    return model.eval()


def _site_errors(acts, naive, n_layers: int) -> dict[str, float]:
    """Largest |ours - reference| of each site over layers and positions, relative to the site's
    largest reference value (the residual stream grows to hundreds on these models)."""
    errors = {}
    for site in ("resid_pre", *BRANCHES, "resid_post"):
        worst = 0.0
        for layer in range(n_layers):
            ours, theirs = acts[site, layer][0].double(), naive[site, layer]
            worst = max(worst, float((ours - theirs).abs().max() / theirs.abs().max()))
        errors[site] = worst
    return errors


def _residual_errors(acts, n_layers: int) -> dict[str, float]:
    sums, chain, scale = 0.0, 0.0, 0.0
    for layer in range(n_layers):
        a = {site: acts[site, layer][0].double() for site in ("resid_pre", "attn_out", "mlp_out")}
        post = acts["resid_post", layer][0].double()
        sums = max(sums, float((post - a["resid_pre"] - a["attn_out"] - a["mlp_out"]).abs().max()))
        scale = max(scale, float(post.abs().max()))
        if layer + 1 < n_layers:
            chain = max(chain, float((acts["resid_pre", layer + 1][0] - post).abs().max()))
    return {
        "resid_post - (resid_pre + attn_out + mlp_out)": sums,
        "resid_pre[l+1] - resid_post[l]": chain,
        "largest |resid_post| entry (the scale of the errors above)": scale,
    }


def _raw_error(model, reference, naive) -> float:
    """Largest |ipl's raw-lens entropy - float64 reference| over every site of three layers (all
    layers cost minutes of float64 products over the whole vocabulary on a CPU)."""
    layers = sorted({0, model.n_layers // 2, model.n_layers - 1})
    raw = entropy_table(model, [TEXT], lens="raw", layers=layers)
    worst = 0.0
    for (site, layer), rows in raw.groupby(["site", "layer"], observed=True):
        expected = entropy(naive_logits(reference, naive[site, layer], site, "raw"))
        got = torch.tensor(rows.sort_values("position")["entropy"].to_numpy(), dtype=torch.float64)
        worst = max(worst, float((got - expected[: len(got)]).abs().max()))
    return worst


def _lens_errors(model, reference, naive, ref_logits) -> dict[str, float]:
    last = model.n_layers - 1
    norm = entropy_table(model, [TEXT], lens="norm", sites=["resid_post", "final"], layers=[last])
    by_site = norm.pivot_table(index="position", columns="site", values="entropy", observed=True)
    final = torch.tensor(by_site["final"].to_numpy())
    return {
        "norm lens H(resid_post[L-1]) - H(final) (nats)": float(
            (torch.tensor(by_site["resid_post"].to_numpy()) - final).abs().max()
        ),
        "H(final) - H(reference logits) (nats)": float((final - entropy(ref_logits)).abs().max()),
        "raw lens entropy, every site of layers 0, L/2, L-1, vs float64 reference (nats)": (
            _raw_error(model, reference, naive)
        ),
    }


def print_identities(path: Path, key: str, out: Path | None = None) -> dict:
    """Measure and print the identities on one model; write them to ``out`` as JSON."""
    model = load_model(path, dtype="float32", device="cpu", progress=False)
    reference = _reference(path)
    ids = model.tokenizer(TEXT)["input_ids"]
    naive, ref_logits = naive_sites(reference, ids)
    batch = torch.tensor([ids])
    with torch.no_grad(), capture(model) as acts:
        model.forward(batch, torch.ones_like(batch))
    with torch.no_grad():
        logits = model(batch)[0].double()
    errors = {
        "tokens": len(ids),
        "site vs reference hooks (max relative error)": _site_errors(acts, naive, model.n_layers),
        "residual identities (max abs error)": _residual_errors(acts, model.n_layers),
        "final logits vs reference (max abs)": float((logits - ref_logits).abs().max()),
        **_lens_errors(model, reference, naive, ref_logits),
    }
    print(f"{key}: identities on {len(ids)} tokens (float32 model vs float64 reference)")
    print(json.dumps(errors, indent=2), flush=True)
    if out is not None:
        out.write_text(json.dumps(errors, indent=2) + "\n")
    return errors
