import json
import shutil

import pytest
import torch
from reference import hf_model

from internal_policy_lens import SUPPORTED_ARCHITECTURES, ModelLoadError, load_model


def test_load_local_folder_offline(arch, tiny_dirs):
    model = load_model(tiny_dirs[arch], device="cpu")
    config = json.loads((tiny_dirs[arch] / "config.json").read_text())
    assert model.architecture == config["architectures"][0]
    assert model.architecture in SUPPORTED_ARCHITECTURES
    assert model.n_layers == config["num_hidden_layers"] == 3
    assert model.d_model == config["hidden_size"]
    assert model.vocab_size == config["vocab_size"] != len(model.tokenizer)
    assert model.tokenizer("1+2", add_special_tokens=False)["input_ids"]
    assert model.dtype == torch.float32 and model.device.type == "cpu"
    assert load_model(tiny_dirs[arch], dtype="bfloat16").dtype == torch.bfloat16


def test_missing_path(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist.*folder saved by transformers"):
        load_model(tmp_path / "no-such-model")
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model("./models/nothing/here")


def test_folder_without_tokenizer(tiny_dirs, tmp_path):
    folder = tmp_path / "no-tok"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_dirs["qwen2"] / name, folder / name)
    with pytest.raises(ModelLoadError, match="has no tokenizer files.*tokenizer.save_pretrained"):
        load_model(folder)


def test_folder_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(tmp_path)


def test_unsupported_architecture(tiny_dirs, tmp_path):
    folder = tmp_path / "falconish"
    shutil.copytree(tiny_dirs["qwen2"], folder)
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["FalconForCausalLM"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="FalconForCausalLM.*not supported.*Qwen2ForCausalLM"):
        load_model(folder)


def test_unknown_model_type_is_one_line_naming_the_file(tiny_dirs, tmp_path):
    folder = tmp_path / "foobar"
    shutil.copytree(tiny_dirs["qwen2"], folder)
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "foobar"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError) as err:
        load_model(folder)
    message = str(err.value)
    assert message.startswith(f"{folder / 'config.json'}: model_type 'foobar' is not a model type")
    assert "`ipl models`" in message
    assert "\n" not in message and "pip install" not in message


def test_hub_name_while_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="not a local folder.*Pass a local folder"):
        load_model("Qwen/Qwen2.5-7B")


def test_bad_dtype(tiny_dirs):
    with pytest.raises(ModelLoadError, match="unknown dtype 'int8'"):
        load_model(tiny_dirs["qwen2"], dtype="int8")


def _greedy_without_cache(model, ids, steps):
    """Greedy decoding by full forward passes (no KV cache); returns tokens and step logits."""
    out, scores = ids, []
    for _ in range(steps):
        with torch.no_grad():
            logits = model(out, use_cache=False).logits[:, -1]
        scores.append(logits)
        out = torch.cat([out, logits.argmax(-1, keepdim=True)], dim=1)
    return out, torch.stack(scores, 1)


def test_cached_greedy_generation_matches_transformers(arch, models, tiny_dirs):
    """Guards against transformers releases that break the bridge's KV cache are caught here.

    Random tiny models often repeat one token greedily, so the step logits are compared too: a
    broken cache changes them even where the argmax survives.
    """
    model = models(arch)
    reference = hf_model(tiny_dirs[arch], dtype=torch.float32)
    prompt = torch.tensor([model.tokenizer("Compute 17*3+4 step by step.")["input_ids"]])
    steps = 16
    expected, expected_scores = _greedy_without_cache(reference, prompt, steps)
    kwargs = dict(max_new_tokens=steps, do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        wrapped = model.hf_model.generate(
            prompt, use_cache=True, output_scores=True, return_dict_in_generate=True, **kwargs
        )
        bridge = model.bridge.generate(
            prompt,
            max_new_tokens=steps,
            do_sample=False,
            use_past_kv_cache=True,
            stop_at_eos=False,
            verbose=False,
        )
    assert wrapped.sequences.tolist() == expected.tolist()
    torch.testing.assert_close(
        torch.stack(wrapped.scores, 1), expected_scores, atol=1e-4, rtol=1e-4
    )
    assert torch.as_tensor(bridge).tolist() == expected.tolist()


def test_save_model_round_trip(arch, models, tmp_path):
    from internal_policy_lens.model.load import save_model

    model = models(arch)
    folder = save_model(model, tmp_path / "saved")
    again = load_model(folder)
    plain = hf_model(folder, dtype=torch.float32)
    ids = torch.tensor([model.tokenizer("12+7=19")["input_ids"]])
    with torch.no_grad():
        expected = model.bridge(ids)
        torch.testing.assert_close(again.bridge(ids), expected, atol=0, rtol=0)
        torch.testing.assert_close(plain(ids).logits, expected, atol=1e-5, rtol=1e-5)
    assert plain.config.tie_word_embeddings == model.config.tie_word_embeddings


def test_tokenizer_is_the_saved_one(arch, models, tiny_dirs):
    """AutoTokenizer rebuilds a Qwen2 folder's pre-tokenizer; load_model must keep the saved one."""
    from tokenizers import Tokenizer

    text = "Start with 12. Add 7.\nWhat is the result? 12+7=19."
    saved = Tokenizer.from_file(str(tiny_dirs[arch] / "tokenizer.json"))
    tokenizer = models(arch).tokenizer
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == saved.encode(text).ids
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text
