import pytest
import torch
from helpers import TEXTS

from internal_policy_lens import load_model
from internal_policy_lens.model.generate import generate


def _greedy_no_cache(model, prompt, steps):
    ids = torch.tensor([prompt], device=model.device)
    eos = model.tokenizer.eos_token_id
    out = []
    for _ in range(steps):
        with torch.no_grad():
            logits = model.hf_model(ids, use_cache=False).logits[0, -1]
        token = int(logits.argmax())
        out.append(token)
        if token == eos:
            break
        ids = torch.cat([ids, torch.tensor([[token]], device=model.device)], dim=1)
    return out


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("name", ["qwen2", "qwen3", "llama"])
def test_cached_greedy_equals_uncached_and_batching_changes_nothing(
    models, tiny_dirs, name, device
):
    if device == "cpu":
        model = models(name)
    else:
        model = load_model(tiny_dirs[name], dtype="float32", device=device)
    prompts = [model.tokenizer(t)["input_ids"] for t in TEXTS]
    batched = generate(model, prompts, max_new_tokens=12, temperature=0)
    for prompt, got in zip(prompts, batched, strict=True):
        alone = generate(model, [prompt], max_new_tokens=12, temperature=0)[0]
        assert got == alone == _greedy_no_cache(model, prompt, 12)


def test_sampling_is_seeded(models):
    model = models("llama")
    prompts = [model.tokenizer(t)["input_ids"] for t in TEXTS]
    a = generate(model, prompts, max_new_tokens=10, temperature=1.0, seed=3)
    b = generate(model, prompts, max_new_tokens=10, temperature=1.0, seed=3)
    c = generate(model, prompts, max_new_tokens=10, temperature=1.0, seed=4)
    assert a == b and a != c
    assert all(len(r) <= 10 for r in a)
