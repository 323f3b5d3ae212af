"""The family registry is the one list: every family has a module, a tiny model and a reference.

The reference's layouts (tests/reference.py) are written out independently of the package; these
tests compare the two lists, so that neither can gain or lose a family alone.
"""

import json
import pkgutil

import pytest
from reference import LAYOUTS
from typer.testing import CliRunner

from internal_policy_lens.cli import app
from internal_policy_lens.model import families
from internal_policy_lens.model.families import (
    FAMILIES,
    SUPPORTED_ARCHITECTURES,
    TINY_ARCHITECTURES,
    family_of_arch,
)
from internal_policy_lens.model.tiny import tiny_config


def test_every_family_module_is_registered_under_its_own_name():
    modules = {m.name for m in pkgutil.iter_modules(families.__path__)} - {"base"}
    assert modules == set(TINY_ARCHITECTURES)
    for family in FAMILIES:
        assert family.tiny.__module__ == f"{families.__name__}.{family.arch}"
    assert len(set(SUPPORTED_ARCHITECTURES)) == len(TINY_ARCHITECTURES) == len(FAMILIES)


def test_every_family_has_a_tiny_config_of_its_own_class():
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    built = {
        family.hf_class: MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[
            tiny_config(family.arch, vocab_size=64).model_type
        ]
        for family in FAMILIES
    }
    assert built == {c: c for c in SUPPORTED_ARCHITECTURES}


def test_the_reference_lays_out_exactly_the_registered_families():
    missing = sorted(set(SUPPORTED_ARCHITECTURES) - set(LAYOUTS))
    extra = sorted(set(LAYOUTS) - set(SUPPORTED_ARCHITECTURES))
    assert (missing, extra) == ([], []), "tests/reference.py LAYOUTS and the registry differ"


def test_an_unknown_arch_names_the_known_ones():
    with pytest.raises(ValueError, match="unknown architecture 'bert'; choose one of qwen2, "):
        family_of_arch("bert")
    result = CliRunner().invoke(app, ["make-tiny", "--arch", "bert", "--out", "unused"])
    assert result.exit_code == 2 and "error: unknown architecture 'bert'" in result.output


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_make_tiny_builds_every_registered_family(arch, tmp_path):
    out = tmp_path / arch
    result = CliRunner().invoke(app, ["make-tiny", "--arch", arch, "--layers", "2", "--out", out])
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [family_of_arch(arch).hf_class]
