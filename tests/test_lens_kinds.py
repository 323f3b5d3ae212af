"""The lens registry: the kinds it ships, and a new lens made of one class and its registration."""

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import TEXTS
from reference import entropy, hf_model, naive_logits, naive_sites
from torch import nn

from internal_policy_lens import entropy_table
from internal_policy_lens.analysis.plots import lens_quality
from internal_policy_lens.commands.options import offered
from internal_policy_lens.config import BupoConfig, EntropyConfig, LensSettings
from internal_policy_lens.integrations.trl.trainer import internal_policy
from internal_policy_lens.lens.tuned import lens_facts
from internal_policy_lens.lens.unembed import Lens
from internal_policy_lens.lens_kinds import (
    LENSES,
    LensKind,
    folder_lenses,
    lens_kind,
    model_lens,
    model_lenses,
    register,
)
from internal_policy_lens.model.load import load_causal_lm
from internal_policy_lens.train.rollout import token_logprobs


class Doubled(nn.Module):
    """``2 x``: the scaled lens's module form."""

    def forward(self, x):
        return 2 * x


class Scaled(LensKind):
    """A lens made for this test only: the site vector times 2 (the raw lens at temperature 1/2)."""

    name = "scaled"
    description = "the site vector times 2 (a test lens)"

    def inputs(self, lens, x, site, layer):
        return 2 * x

    def record(self, lens):
        return {"name": self.name, "factor": 2}

    def module(self, norm):
        return Doubled()


@pytest.fixture
def scaled():
    register(Scaled)
    try:
        yield Scaled
    finally:
        del LENSES[Scaled.name]


def _help(cls, field: str, **kw) -> str:
    (found,) = [o for o in offered(cls, **kw) if o.path == (field,)]
    return found.parameter.annotation.__metadata__[0].help


def test_the_registry_holds_raw_norm_and_tuned():
    assert list(LENSES) == ["raw", "norm", "tuned"]
    assert model_lenses() == ["raw", "norm"] and folder_lenses() == ["tuned"]
    for name in LENSES:
        assert LensSettings(lens=name).check().lens == name
        assert lens_kind(name).name == name == str(lens_kind(LENSES[name]))
    with pytest.raises(ValueError, match="unknown lens 'scaled'; use one of raw, norm, tuned"):
        LensSettings(lens="scaled").check()
    with pytest.raises(ValueError, match=r"lens 'tuned' cannot train pi\^k .*; use raw or norm"):
        model_lens("tuned")


def test_a_name_is_registered_once():
    class Other(LensKind):
        name = "raw"

    with pytest.raises(ValueError, match="the lens name 'raw' is taken by"):
        register(Other)
    assert LENSES["raw"] is not Other


def test_a_new_lens_is_one_class_and_its_registration(scaled, models, tiny_dirs):
    # The configs and the command line accept it and describe it.
    assert LensSettings(lens="scaled").check().lens == "scaled"
    assert "scaled: the site vector times 2" in _help(EntropyConfig, "lens", docs_from=LensSettings)
    assert "scaled: the site vector times 2" in _help(BupoConfig, "lens")  # BuPO trains through it
    # Lens and the tables read it: its entropies are those of twice the raw logits, by hand.
    model = models("qwen2")
    lens = Lens(model, "scaled")
    assert lens.kind.name == lens.name == "scaled" and lens_facts(lens) == scaled().record(lens)
    table = entropy_table(model, TEXTS[:2], lens="scaled", sites=["resid_post", "final"])
    hf = hf_model(tiny_dirs["qwen2"])
    err = []
    for sample, text in enumerate(TEXTS[:2]):
        sites, _ = naive_sites(hf, model.tokenizer(text)["input_ids"])
        rows = table[table["sample_id"] == table["sample_id"].unique()[sample]]
        for (site, layer), x in sites.items():
            if site not in ("resid_post", "final"):
                continue
            want = entropy(naive_logits(hf, x if site == "final" else 2 * x, site, "raw"))
            got = rows[(rows["site"] == site) & (rows["layer"] == layer)]["entropy"]
            assert len(got) == len(want)
            err.append(np.abs(got.to_numpy() - want.numpy()).max())
    assert len(err) == 8 and max(err) < 1e-4  # 3 layers and final, 2 texts; float32 vs float64
    raw = entropy_table(model, TEXTS[:2], lens="raw", sites=["resid_post"])
    assert not np.allclose(raw["entropy"], table[table["site"] == "resid_post"]["entropy"])
    # The plots order it after the lenses registered before it.
    names = ["scaled", "x", "tuned", "raw"]
    frame = pd.DataFrame({"layer": 0, "site": "resid_post", "lens": names})
    frame["kl_final_internal"] = 1.0
    drawn = [line.get_label() for line in lens_quality(frame).axes[0].get_lines()]
    assert drawn == ["raw", "tuned", "scaled", "x"]


def test_a_new_lens_trains_pi_k_in_the_trl_forward(scaled, models, tiny_dirs):
    """The TRL trainer's forward reads the kind's module form: the same pi^k as the lens's."""
    hf, tokenizer = load_causal_lm(tiny_dirs["qwen2"])
    ids = torch.tensor([tokenizer("Let x=5; x*x=25 and 25+1=26.")["input_ids"]])
    with torch.no_grad(), internal_policy(hf, 1, "scaled"):
        logp = torch.log_softmax(hf(ids).logits[0, :-1].float(), -1)
    ours, _ = token_logprobs(
        models("qwen2"), ids, torch.ones_like(ids), layer=1, lens_name="scaled"
    )
    expected = logp.gather(-1, ids[0, 1:, None])[:, 0]
    torch.testing.assert_close(ours[0], expected, atol=2e-5, rtol=0)
    raw, _ = token_logprobs(models("qwen2"), ids, torch.ones_like(ids), layer=1)
    assert not torch.allclose(raw[0], expected, atol=1e-3)
