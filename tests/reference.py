"""Independent float64 reference: a plain transformers model with torch hooks, no chunking.

Shares no code with the package: sites are read from the Hugging Face modules themselves and
every formula is written out here.
"""

import torch
from transformers import AutoModelForCausalLM


def hf_model(folder, dtype=torch.float64):
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="eager")
    return model.eval()


@torch.no_grad()
def naive_sites(model, input_ids):
    """All sites for one unpadded sequence: {(site, layer): [pos, d_model]} and logits."""
    store, handles = {}, []

    def keep(key, pre=False):
        def hook(module, args, kwargs_or_out, *rest):
            if pre:  # forward pre-hook with kwargs: (module, args, kwargs)
                x = args[0] if args else kwargs_or_out["hidden_states"]
            else:
                x = kwargs_or_out[0] if isinstance(kwargs_or_out, tuple) else kwargs_or_out
            store[key] = x[0].clone()

        return hook

    layers = model.model.layers
    for i, block in enumerate(layers):
        handles += [
            block.register_forward_pre_hook(keep(("resid_pre", i), pre=True), with_kwargs=True),
            block.input_layernorm.register_forward_hook(keep(("attn_in", i))),
            block.self_attn.register_forward_hook(keep(("attn_out", i))),
            block.post_attention_layernorm.register_forward_pre_hook(
                keep(("resid_mid", i), pre=True), with_kwargs=True
            ),
            block.post_attention_layernorm.register_forward_hook(keep(("mlp_in", i))),
            block.mlp.register_forward_hook(keep(("mlp_out", i))),
            block.register_forward_hook(keep(("resid_post", i))),
        ]
    handles.append(model.model.norm.register_forward_hook(keep(("final", len(layers) - 1))))
    try:
        logits = model(torch.tensor([input_ids])).logits[0]
    finally:
        for h in handles:
            h.remove()
    return store, logits


@torch.no_grad()
def rms_norm(x, norm_module):
    x = x.double()
    eps = norm_module.variance_epsilon
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * norm_module.weight.double()


@torch.no_grad()
def naive_logits(model, x, site, lens):
    if lens == "norm" and site != "final":
        x = rms_norm(x, model.model.norm)
    W = model.lm_head.weight.double()
    b = model.lm_head.bias
    out = x.double() @ W.T
    return out if b is None else out + b.double()


def entropy(logits):
    logp = torch.log_softmax(logits.double(), -1)
    return -(logp.exp() * logp).sum(-1)


@torch.no_grad()
def naive_tuned_logits(model, x, weight, bias):
    """Tuned lens by hand: translator x + A x + b, then the final RMSNorm and the unembedding."""
    x = x.double()
    translated = x + x @ weight.double().T + bias.double()
    return naive_logits(model, translated, "resid_post", "norm")
