"""Independent float64 reference: a plain transformers model with torch hooks, no chunking.

Shares no code with the package: sites are read from the Hugging Face modules themselves and
every formula is written out here. Each family's layout (which module carries which site) is
written out below from the transformers source of its decoder layer.
"""

import torch
from torch import nn
from transformers import AutoModelForCausalLM

# site -> (submodule of the decoder layer, "in" or "out"). attn_in / mlp_in are the inputs the
# attention and MLP modules receive; attn_out / mlp_out what each branch adds to the residual.
LLAMA_LIKE = {
    "attn_in": ("self_attn", "in"),
    "attn_out": ("self_attn", "out"),
    "resid_mid": ("post_attention_layernorm", "in"),
    "mlp_in": ("mlp", "in"),
    "mlp_out": ("mlp", "out"),
}
GEMMA = {  # pre and post norms around each branch
    "attn_in": ("self_attn", "in"),
    "attn_out": ("post_attention_layernorm", "out"),
    "resid_mid": ("pre_feedforward_layernorm", "in"),
    "mlp_in": ("mlp", "in"),
    "mlp_out": ("post_feedforward_layernorm", "out"),
}
OLMO2 = {  # norms after each branch only
    "attn_in": ("self_attn", "in"),
    "attn_out": ("post_attention_layernorm", "out"),
    "resid_mid": ("mlp", "in"),
    "mlp_in": ("mlp", "in"),
    "mlp_out": ("post_feedforward_layernorm", "out"),
}
GPT2 = {
    "attn_in": ("attn", "in"),
    "attn_out": ("attn", "out"),
    "resid_mid": ("ln_2", "in"),
    "mlp_in": ("mlp", "in"),
    "mlp_out": ("mlp", "out"),
}
NEOX_PARALLEL = {  # both branches read the layer input: no resid_mid
    "attn_in": ("attention", "in"),
    "attn_out": ("attention", "out"),
    "mlp_in": ("mlp", "in"),
    "mlp_out": ("mlp", "out"),
}
# Every supported family, written out here (tests/model/test_registry.py checks that this list and
# the package's registry name the same classes, without this file reading the registry).
LAYOUTS = {
    "Qwen2ForCausalLM": LLAMA_LIKE,
    "Qwen3ForCausalLM": LLAMA_LIKE,
    "LlamaForCausalLM": LLAMA_LIKE,
    "MistralForCausalLM": LLAMA_LIKE,
    "MixtralForCausalLM": LLAMA_LIKE,
    "Qwen2MoeForCausalLM": LLAMA_LIKE,
    "Qwen3MoeForCausalLM": LLAMA_LIKE,
    "SmolLM3ForCausalLM": LLAMA_LIKE,
    "DeepseekV3ForCausalLM": LLAMA_LIKE,
    "GptOssForCausalLM": LLAMA_LIKE,
    "Phi3ForCausalLM": LLAMA_LIKE,
    "GraniteForCausalLM": LLAMA_LIKE,
    "Gemma2ForCausalLM": GEMMA,
    "Gemma3ForCausalLM": GEMMA,
    "Olmo2ForCausalLM": OLMO2,
    "Olmo3ForCausalLM": OLMO2,
    "GPT2LMHeadModel": GPT2,
    "GPTNeoXForCausalLM": NEOX_PARALLEL,
}


def hf_model(folder, dtype=torch.float64):
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="eager")
    if model._can_set_experts_implementation():  # grouped_mm experts take no float64
        model.set_experts_implementation("eager")
    return model.eval()


def decoder(model):
    """(decoder layers, final norm) of a plain transformers model."""
    if hasattr(model, "transformer"):  # GPT-2
        return model.transformer.h, model.transformer.ln_f
    if hasattr(model, "gpt_neox"):
        return model.gpt_neox.layers, model.gpt_neox.final_layer_norm
    return model.model.layers, model.model.norm


def branch_scale(model):
    """Granite multiplies each branch's output by its residual multiplier before the add."""
    return getattr(model.config, "residual_multiplier", 1.0)


@torch.no_grad()
def naive_sites(model, input_ids):
    """All sites for one unpadded sequence: {(site, layer): [pos, d_model]} and logits."""
    store, handles = {}, []
    layout = LAYOUTS[type(model).__name__]
    scale = branch_scale(model)

    def keep(key, pre=False, factor=1.0):
        def hook(module, args, kwargs_or_out, *rest):
            if pre:  # forward pre-hook with kwargs: (module, args, kwargs)
                x = args[0] if args else kwargs_or_out["hidden_states"]
            else:
                x = kwargs_or_out[0] if isinstance(kwargs_or_out, tuple) else kwargs_or_out
            store[key] = x[0].clone() * factor

        return hook

    layers, norm = decoder(model)
    for i, block in enumerate(layers):
        handles += [
            block.register_forward_pre_hook(keep(("resid_pre", i), pre=True), with_kwargs=True),
            block.register_forward_hook(keep(("resid_post", i))),
        ]
        for site, (name, where) in layout.items():
            module = block.get_submodule(name)
            if where == "in":
                hook = keep((site, i), pre=True)
                handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
            else:
                factor = scale if site in ("attn_out", "mlp_out") and layout is LLAMA_LIKE else 1.0
                handles.append(module.register_forward_hook(keep((site, i), factor=factor)))
    handles.append(norm.register_forward_hook(keep(("final", len(layers) - 1))))
    try:
        logits = model(torch.tensor([input_ids])).logits[0]
    finally:
        for h in handles:
            h.remove()
    return store, logits


@torch.no_grad()
def rms_norm(x, norm_module):
    x = x.double()
    eps = getattr(norm_module, "variance_epsilon", getattr(norm_module, "eps", None))
    weight = norm_module.weight.double()
    if type(norm_module).__name__.startswith("Gemma"):  # Gemma scales by (1 + w)
        weight = 1.0 + weight
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * weight


@torch.no_grad()
def layer_norm(x, norm_module):
    x = x.double()
    centred = x - x.mean(-1, keepdim=True)
    var = (centred * centred).mean(-1, keepdim=True)
    out = centred / torch.sqrt(var + norm_module.eps) * norm_module.weight.double()
    return out + norm_module.bias.double()


@torch.no_grad()
def head(model, logits):
    """The model's own transformation of its logits: Granite's scaling, Gemma's soft-capping."""
    logits = logits / getattr(model.config, "logits_scaling", 1.0)
    cap = getattr(model.config, "final_logit_softcapping", None)
    return logits if cap is None else torch.tanh(logits / cap) * cap


@torch.no_grad()
def naive_logits(model, x, site, lens):
    if lens == "norm" and site != "final":
        norm = decoder(model)[1]
        x = layer_norm(x, norm) if isinstance(norm, nn.LayerNorm) else rms_norm(x, norm)
    unembed = model.get_output_embeddings()
    W = unembed.weight.double()
    b = unembed.bias
    out = x.double() @ W.T
    return head(model, out if b is None else out + b.double())


def entropy(logits):
    logp = torch.log_softmax(logits.double(), -1)
    return -(logp.exp() * logp).sum(-1)


@torch.no_grad()
def naive_tuned_logits(model, x, weight, bias):
    """Tuned lens by hand: translator x + A x + b, then the final RMSNorm and the unembedding."""
    x = x.double()
    translated = x + x @ weight.double().T + bias.double()
    return naive_logits(model, translated, "resid_post", "norm")
