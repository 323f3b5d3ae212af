import pytest
import torch

from internal_policy_lens import entropy_table, load_model
from internal_policy_lens.bundled import BUNDLED_MODELS, bundled_model_path
from internal_policy_lens.data.answers import math_reward
from internal_policy_lens.data.records import read_records
from internal_policy_lens.lens.sites import SITES
from internal_policy_lens.model.generate import sample
from internal_policy_lens.statistics import LENS_EVAL_RENAMES, renamed_columns

# Regression guard, not a benchmark: greedy accuracy on the first 40 held-out problems. The
# model cards give the full held-out numbers; these floors sit well below them.
MIN_GREEDY = 0.25


def _correct(response, answer):
    return math_reward(response, answer) == 1.0


def test_the_locator_finds_each_bundled_model_and_names_a_missing_one():
    for name in BUNDLED_MODELS:
        assert (bundled_model_path(name) / "config.json").is_file()
        assert bundled_model_path(name).name == name
    with pytest.raises(FileNotFoundError, match="bundled model 'ipl-tiny-gone' is missing from"):
        bundled_model_path("ipl-tiny-gone")


@pytest.fixture(scope="module", params=BUNDLED_MODELS)
def bundled(request):
    return load_model(request.param)


def test_bundled_models_load_offline_and_keep_identities(bundled):
    assert bundled.n_layers >= 8
    assert bundled.architecture in ("Qwen2ForCausalLM", "LlamaForCausalLM")
    ids = torch.tensor([bundled.tokenizer("Start with 5. Add 3. What is the result?")["input_ids"]])
    from internal_policy_lens import capture

    with torch.no_grad(), capture(bundled) as acts:
        bundled.forward(ids, torch.ones_like(ids))
        logits = bundled.bridge(ids)
    for layer in range(bundled.n_layers):
        torch.testing.assert_close(
            acts["resid_post", layer],
            acts["resid_pre", layer] + acts["attn_out", layer] + acts["mlp_out", layer],
            atol=1e-4,
            rtol=1e-5,
        )
    torch.testing.assert_close(
        bundled.unembed(acts["final", bundled.n_layers - 1]), logits, atol=1e-4, rtol=1e-5
    )
    table = entropy_table(bundled, ids.tolist(), sites=SITES)
    assert table["entropy"].notna().all()


def test_bundled_models_solve_heldout_problems(bundled):
    from internal_policy_lens.bundled import bundled_data

    records = read_records(bundled_data("arith_heldout.jsonl"), max_samples=40)
    responses = sample(
        bundled, [r["prompt"] for r in records], samples=1, temperature=0.0, max_new_tokens=96
    )
    accuracy = sum(_correct(r[0], rec["answer"]) for r, rec in zip(responses, records)) / 40
    assert accuracy >= MIN_GREEDY, accuracy


def test_bundled_tuned_lens_ships_and_beats_the_norm_lens(bundled):
    import json

    import pandas as pd

    from internal_policy_lens.lens.tuned import lens_folder, read_lens

    translators, meta = read_lens(None, bundled)  # the shipped lens is the default
    assert len(translators) == 6 * bundled.n_layers + 1  # every site but final; resid_pre[0]
    assert meta["model"]["name_or_path"] == bundled.name
    folder = lens_folder(None, bundled.name)
    assert json.loads((folder / "lens.json").read_text())["data_sha256"]
    # Held out at fit time: the tuned lens is closer to the output policy wherever it matters.
    evaluation = pd.DataFrame(meta["heldout"]["evaluation"])
    evaluation = renamed_columns(evaluation, LENS_EVAL_RENAMES)  # lens.json from before
    wide = evaluation.pivot_table(
        index=["site", "layer"], columns="lens", values="kl_final_internal"
    )
    relevant = ~((wide["norm"] < 0.01) & (wide["tuned"] < 0.01))
    assert (wide.loc[relevant, "tuned"] < wide.loc[relevant, "norm"]).all()
    table = entropy_table(bundled, ["Start with 5. Add 3. What is the result?"], lens="tuned")
    assert set(table["site"].astype(str)) == set(SITES)
