"""GGUF files as a model source, on tiny files the tests write themselves (no download)."""

import hashlib
import json
import sys
import tracemalloc
from collections import Counter

import gguf
import pytest
import torch
from helpers import naive_table, write_problems
from tiny_gguf import expected_model, random_model, write_gguf, write_raw
from transformers import AutoConfig, AutoModelForCausalLM
from typer.testing import CliRunner

from internal_policy_lens import entropy_table, load_model
from internal_policy_lens.cli import app
from internal_policy_lens.model.gguf import default_dtype
from internal_policy_lens.model.gguf_weights import (
    empty_model,
    fill_from_gguf,
    stored_tensors,
    tensor_names,
)
from internal_policy_lens.model.hardware import half_support
from internal_policy_lens.model.load import ModelLoadError, load_causal_lm

TEXTS = ["Start with the 12. Add 7.", "in the re on"]


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def written(request, tmp_path_factory):
    """(arch, GGUF path, tensor types written, the float model the file should load as)."""
    arch = request.param
    folder = tmp_path_factory.mktemp(f"gguf-{arch}")
    model = random_model(arch)
    path = folder / f"tiny-{arch}.Q8_0.gguf"
    types = write_gguf(model, path, arch)
    return arch, path, types, expected_model(model)


def test_gguf_loads_as_its_dequantized_float_model(written, capfd):
    arch, path, types, expected = written
    model = load_model(path, dtype="float32", device="cpu", progress=False)
    assert "de-quantizing" not in capfd.readouterr().err  # transformers' own bar, off too
    assert model.architecture == type(expected).__name__
    assert model.n_layers == expected.config.num_hidden_layers
    ids = model.tokenizer(TEXTS[0], return_tensors="pt").input_ids
    with torch.no_grad():
        ours = model(ids)
        theirs = expected(ids).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    facts = model.gguf
    assert facts["file"] == str(path.resolve())
    assert facts["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert facts["tensor_types"] == dict(Counter(types.values()))
    assert facts["architecture"] == arch


def test_gguf_entropies_match_the_float64_reference(written, tmp_path):
    arch, path, _, expected = written
    model = load_model(path, dtype="float64", device="cpu", progress=False)
    expected.save_pretrained(tmp_path)  # the reference reads a plain transformers folder
    reference = naive_table(tmp_path, model.tokenizer, TEXTS, "raw")
    table = entropy_table(model, TEXTS, lens="raw")
    got = {(r.sample_id, r.position, r.layer, r.site): r.entropy for r in table.itertuples()}
    assert got.keys() == reference.keys()
    assert max(abs(got[k] - reference[k]) for k in reference) < 1e-6


def test_gguf_tokenizer_comes_from_the_file(written):
    _, path, _, _ = written
    tokenizer = load_model(path, dtype="float32", device="cpu", progress=False).tokenizer
    ids = tokenizer(TEXTS[0], add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == TEXTS[0]
    assert tokenizer.convert_ids_to_tokens(ids).count("Ġthe") == 1  # a merge from the file
    assert tokenizer.eos_token == "<|im_end|>"
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_cli_entropy_on_a_gguf_in_a_folder_records_the_file(written, tmp_path):
    _, path, types, _ = written
    out = tmp_path / "run"
    data = write_problems(tmp_path / "problems.jsonl", 2)
    args = ["entropy", "--model", str(path.parent), "--gguf-file", path.name, "--data", str(data)]
    args += ["--out", str(out), "--max-new-tokens", "4", "--quiet", "--topk", "0"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    info = json.loads((out / "run.json").read_text())
    assert info["config"]["gguf_file"] == path.name
    recorded = info["model"]["gguf"]
    assert recorded["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert recorded["tensor_types"] == dict(Counter(types.values()))
    assert (out / "tokens.parquet").is_file()


def test_cli_error_for_a_missing_gguf_file(tmp_path):
    result = CliRunner().invoke(
        app, ["entropy", "--model", str(tmp_path / "nope.gguf"), "--out", str(tmp_path / "x")]
    )
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        f"error: GGUF file '{tmp_path / 'nope.gguf'}' does not exist; pass the path of a .gguf file"
    ]


def test_gguf_file_must_be_a_name_in_the_folder(tmp_path):
    with pytest.raises(ModelLoadError, match="must be a file name inside the --model folder"):
        load_model(tmp_path, gguf_file="sub/x.gguf")


def test_missing_gguf_package_names_the_extra(written, monkeypatch):
    _, path, _, _ = written
    monkeypatch.setitem(sys.modules, "gguf", None)  # what `import gguf` sees when not installed
    with pytest.raises(
        ModelLoadError,
        match=r"needs the gguf package: pip install "
        r"'internal-policy-lens\[gguf\]'",
    ):
        load_model(path, device="cpu")


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"not a gguf file at all")
    with pytest.raises(ModelLoadError, match="is not a readable GGUF file"):
        load_model(path, device="cpu")


def test_architecture_transformers_cannot_read(tmp_path):
    path = tmp_path / "rwkv.gguf"
    write_raw(path, "rwkv6", gguf.GGMLQuantizationType.F32)
    with pytest.raises(ModelLoadError, match="transformers cannot load this file: .*rwkv6"):
        load_model(path, device="cpu")


def test_architecture_the_package_does_not_support(tmp_path):
    path = tmp_path / "starcoder2.gguf"
    write_raw(path, "starcoder2", gguf.GGMLQuantizationType.F32)
    with pytest.raises(ModelLoadError, match="'Starcoder2ForCausalLM' .* is not supported"):
        load_model(path, device="cpu")


def test_quantization_type_gguf_cannot_dequantize(tmp_path):
    path = tmp_path / "q8k.gguf"
    write_raw(path, "llama", gguf.GGMLQuantizationType.Q8_K)
    with pytest.raises(ModelLoadError, match="quantization type Q8_K, which the gguf package"):
        load_model(path, device="cpu")


def test_plain_causal_lm_from_a_gguf_is_the_dequantized_model(written):
    """The TRL engine's loader takes a .gguf file too: the same weights as ``load_model``."""
    _, path, _, expected = written
    model, tokenizer = load_causal_lm(path, dtype="float32")
    assert type(model) is type(expected) and not hasattr(model.config, "quantization_config")
    ids = tokenizer(TEXTS[0], return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected(ids).logits, atol=1e-4, rtol=1e-4)


def _tensors(model) -> dict[str, torch.Tensor]:
    named = model.named_parameters(remove_duplicate=False)
    return dict(named) | dict(model.named_buffers(remove_duplicate=False))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gguf_weights_are_those_transformers_loads(written, dtype):
    """Tensor by tensor into a weightless model: bit for bit transformers' whole-file loading."""
    _, path, _, _ = written
    ours, _ = load_causal_lm(path, dtype=dtype)
    theirs = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    ours_tensors, their_tensors = _tensors(ours), _tensors(theirs)
    assert ours_tensors.keys() == their_tensors.keys()
    for name, tensor in their_tensors.items():
        assert ours_tensors[name].dtype == tensor.dtype, name
        assert torch.equal(ours_tensors[name], tensor), name
    tied = ours.lm_head.weight is ours.model.embed_tokens.weight
    assert (
        tied
        == theirs.config.tie_word_embeddings
        == (theirs.lm_head.weight is theirs.model.embed_tokens.weight)
    )
    assert (
        not ours.training and ours.config._attn_implementation == theirs.config._attn_implementation
    )


def test_gguf_tensors_never_whole_in_float32(written):
    """Blocks of rows go straight into the parameters: no float32 copy of the state dict.

    numpy's buffers count in tracemalloc, torch's parameters do not: what is traced while the
    file is read is what the loader holds besides the model. A whole-file loader holds every
    tensor in float32 (the state dict's size); here it stays under a quarter of that, with blocks
    of 256 elements (only tensors that transformers fixes up, Llama's q/k rows, are dequantized
    whole). The small blocks cross many block boundaries: the weights are still transformers'.
    """
    arch, path, _, _ = written
    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    model = empty_model(config, torch.float32, "cpu")
    tensors, names = stored_tensors(gguf.GGUFReader(path)), tensor_names(model, arch)
    fill_from_gguf(model, path, tensors, names)  # once untraced: first-call caches of numpy/gguf
    tracemalloc.start()
    try:
        fill_from_gguf(model, path, tensors, names, chunk_elements=256)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    state_dict_bytes = sum(p.numel() * 4 for p in model.parameters())
    assert peak < state_dict_bytes / 4
    reference, _ = load_causal_lm(path, dtype=torch.float32)
    for name, tensor in _tensors(reference).items():
        assert torch.equal(_tensors(model)[name], tensor), name


def test_gguf_dtype_auto_is_bfloat16_only_where_it_is_native(written):
    native = lambda device, dtype: (True, "CPU AVX512 with amx_bf16")  # noqa: E731
    emulated = lambda device, dtype: (False, "CPU AVX2 without avx512_bf16 or amx_bf16")  # noqa: E731
    assert default_dtype("cpu", native) == (torch.bfloat16, "CPU AVX512 with amx_bf16")
    assert default_dtype("cpu", emulated)[0] == torch.float32
    _, path, _, _ = written
    expected, why = half_support(torch.device("cpu"), torch.bfloat16)
    model = load_model(path, device="cpu", progress=False)
    assert model.dtype == (torch.bfloat16 if expected else torch.float32)
    assert model.gguf["dtype"] == str(model.dtype).removeprefix("torch.")
    assert model.gguf["dtype_why"] == why
    asked = load_model(path, dtype="float32", device="cpu", progress=False).gguf
    assert (asked["dtype"], asked["dtype_why"]) == ("float32", "asked for")
