import pytest
import torch
from helpers import TEXTS
from reference import hf_model

from internal_policy_lens import SITES, capture


def _ids(model, texts, side):
    seqs = [model.tokenizer(t)["input_ids"] for t in texts]
    length = max(map(len, seqs))
    ids = torch.zeros((len(seqs), length), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        span = slice(length - len(s), length) if side == "left" else slice(0, len(s))
        ids[i, span] = torch.tensor(s)
        mask[i, span] = 1
    return ids, mask


def _hook_counts(model):
    # The bridge keeps some hooks of its own; ours must come and go without touching them.
    return {
        name: (len(m._forward_hooks), len(m._forward_pre_hooks))
        for name, m in model.bridge.named_modules()
    }


def test_residual_identities_and_final_logits(arch, models, tiny_dirs):
    model = models(arch)
    ids, mask = _ids(model, TEXTS, "right")
    with torch.no_grad(), capture(model) as acts:
        model.forward(ids, mask)
    L = model.n_layers
    assert set(acts) == {(s, i) for s in SITES if s != "final" for i in range(L)} | {
        ("final", L - 1)
    }
    for layer in range(L):
        a = {s: acts[s, layer] for s in SITES if s != "final"}
        torch.testing.assert_close(
            a["resid_post"], a["resid_pre"] + a["attn_out"] + a["mlp_out"], atol=1e-5, rtol=1e-5
        )
        torch.testing.assert_close(
            a["resid_mid"], a["resid_pre"] + a["attn_out"], atol=1e-5, rtol=1e-5
        )
        if layer + 1 < L:
            torch.testing.assert_close(acts["resid_pre", layer + 1], a["resid_post"])
    # final projected through the unembedding is the plain transformers model's logits.
    reference = hf_model(tiny_dirs[arch], dtype=torch.float32)
    with torch.no_grad():
        logits = reference(ids, attention_mask=mask).logits
        ours = model.unembed(acts["final", L - 1])
    valid = mask.bool()
    torch.testing.assert_close(ours[valid], logits[valid], atol=1e-4, rtol=1e-4)
    # The norm modules the sites name are the model's own pre-attention / pre-MLP norms.
    block = model.hf_model.model.layers[0]
    with torch.no_grad():
        attn_in = block.input_layernorm.original_component(acts["resid_pre", 0])
    torch.testing.assert_close(attn_in, acts["attn_in", 0])


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_capture_equals_each_sequence(models, side):
    model = models("qwen3")
    ids, mask = _ids(model, TEXTS, side)
    with torch.no_grad(), capture(model, ["mlp_out", "resid_post"], [1]) as batch:
        model.forward(ids, mask)
    for i, text in enumerate(TEXTS):
        one = torch.tensor([model.tokenizer(text)["input_ids"]])
        with torch.no_grad(), capture(model, ["mlp_out", "resid_post"], [1]) as alone:
            model.forward(one, torch.ones_like(one))
        for key, value in alone.items():
            torch.testing.assert_close(
                batch[key][i][mask[i].bool()], value[0], atol=1e-5, rtol=1e-5
            )


def test_hooks_removed_even_when_body_raises(models):
    model = models("llama")
    ids, mask = _ids(model, TEXTS, "right")
    with torch.no_grad():  # transformers adds hooks of its own on a model's first forward
        model.forward(ids, mask)
    before = _hook_counts(model)
    with pytest.raises(RuntimeError, match="boom"):
        with capture(model) as acts:
            point = model.bridge.get_submodule("blocks.1.hook_mlp_out")
            assert len(point._forward_hooks) == 1
            model.forward(ids, mask)
            assert acts
            raise RuntimeError("boom")
    assert _hook_counts(model) == before
    assert not model.bridge.get_submodule("blocks.1.hook_mlp_out")._forward_hooks
    with pytest.raises(ValueError, match="unknown site"), capture(model, ["nope"]):
        pass
    assert _hook_counts(model) == before


def test_gradients_flow_through_captured_sites(models):
    model = models("qwen2")
    ids, mask = _ids(model, TEXTS[:2], "left")
    model.bridge.zero_grad(set_to_none=True)
    k = 1
    with capture(model, ["resid_post"], [k]) as acts:
        model.forward(ids, mask, stop_at_layer=k + 1)
    logits = model.unembed(acts["resid_post", k])
    loss = torch.log_softmax(logits, -1)[mask.bool()].mean()
    loss.backward()
    hf = model.hf_model
    assert hf.model.embed_tokens.weight.grad.abs().sum() > 0
    assert model.unembed.weight.grad.abs().sum() > 0
    for i, block in enumerate(hf.model.layers):
        grads = [p.grad for p in block.parameters()]
        if i <= k:
            assert all(g is not None and g.abs().sum() > 0 for g in grads)
        else:  # the forward pass stopped after layer k
            assert all(g is None for g in grads)
    assert all(p.grad is None for p in model.final_norm.parameters())
    model.bridge.zero_grad(set_to_none=True)
