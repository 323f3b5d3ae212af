"""Options read from the configs: help from docstrings, limits, flags, values into the config."""

import dataclasses
import inspect

import pytest
from typer.main import get_command
from typer.testing import CliRunner

from internal_policy_lens import config
from internal_policy_lens.cli import app
from internal_policy_lens.commands.options import field_docs, make, offered, offers
from internal_policy_lens.config import (
    BupoConfig,
    EntropyConfig,
    GenerationConfig,
    LensSettings,
)

runner = CliRunner()
CONFIGS = [
    obj
    for obj in vars(config).values()
    if inspect.isclass(obj) and dataclasses.is_dataclass(obj) and obj.__module__ == config.__name__
]


def test_every_config_field_has_a_docstring_that_reads_as_plain_help():
    assert len(CONFIGS) >= 12
    for cls in CONFIGS:
        docs = field_docs(cls)
        assert sorted(docs) == sorted(f.name for f in dataclasses.fields(cls)), cls.__name__
        for name, doc in docs.items():
            assert doc and "``" not in doc and ":class:" not in doc, (cls.__name__, name, doc)
            assert "\n" not in doc and "  " not in doc


def test_help_is_the_docstring_of_the_settings_home():
    help_text = " ".join(runner.invoke(app, ["entropy", "--help"]).output.split())
    # EntropyConfig holds LensSettings flattened: its fields' help comes from LensSettings.
    assert " ".join(field_docs(LensSettings)["precision"].split()) in help_text
    assert "see LensSettings" not in help_text
    assert "Sampling temperature; 0 means greedy decoding. [default: 1.0]" in help_text
    assert "-n, --samples-per-prompt" in help_text and "--gen-batch-size" in help_text
    # A field named in a docstring reads as its flag; other literals lose their markup only.
    assert "see --lens-path" in help_text and "not needed when --model is the file" in help_text
    # The lenses' own one-line descriptions follow, read from the registry.
    raw = "One of: raw: the site vector as it is, no final norm (the paper's definition)"
    assert raw in help_text


def _entropy_config(monkeypatch, args):
    from internal_policy_lens.commands import entropy

    seen = []

    def spy(cfg, progress):
        seen.append(cfg)
        raise KeyboardInterrupt

    monkeypatch.setattr(entropy, "run_entropy", spy)
    result = runner.invoke(app, ["entropy", *args])
    assert result.exit_code == 130, result.output
    return seen[0]


def test_no_option_gives_the_config_defaults(monkeypatch):
    cfg = _entropy_config(monkeypatch, [])
    assert cfg == EntropyConfig()  # and so the same run.json as a config made in code
    assert cfg.identity() == EntropyConfig().identity()


def test_options_reach_their_fields_nested_ones_included(monkeypatch, tmp_path):
    args = ["--out", f"{tmp_path}/run/", "--data", "./d.jsonl", "--sites", "attn_out,mlp_out"]
    args += ["--all-tokens", "--lens", "norm", "--chunk-tokens", "7", "--capture-mb", "0.5"]
    args += ["-n", "2", "--gen-batch-size", "3", "--seed", "5", "--batch-size", "6"]
    args += ["--shard", "0/2", "--extras"]
    cfg = _entropy_config(monkeypatch, args)
    expected = EntropyConfig(
        out=f"{tmp_path}/run",  # a path's text, normalised as before (trailing slash dropped)
        data="d.jsonl",
        sites=["attn_out", "mlp_out"],
        response_only=False,
        lens="norm",
        chunk_tokens=7,
        capture_mb=0.5,
        generation=GenerationConfig(samples_per_prompt=2, batch_size=3, seed=5),
        batch_size=6,
        shard="0/2",
        extras=True,
    )
    assert cfg == expected


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["--batch-size", "0"], "--batch-size"),
        (["--top-p", "1.5"], "--top-p"),
        (["--capture-mb", "-1"], "--capture-mb"),
        (["--max-length", "1"], "--max-length"),
    ],
)
def test_limits_come_from_the_fields(args, flag, tmp_path):
    out = tmp_path / "run"
    result = runner.invoke(app, ["entropy", "--out", str(out), *args])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: invalid value for '{flag}'")
    assert not out.exists()


@pytest.mark.parametrize(("given", "layer"), [("3", 3), ("-1", -1), ("auto", "auto")])
def test_an_int_or_str_field_takes_integers_as_integers(given, layer, monkeypatch, tmp_path):
    from internal_policy_lens.train import loop

    seen = []

    def spy(cfg, progress):
        seen.append(cfg)
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "train_bupo", spy)
    args = ["train-bupo", "--layer", given, "--out", str(tmp_path), "--device", "cpu"]
    assert runner.invoke(app, args).exit_code == 130
    assert seen[0] == BupoConfig(layer=layer, out=str(tmp_path), device="cpu")


def test_skipped_fields_are_not_offered_and_unknown_skips_are_refused():
    names = {o.path for o in offered(BupoConfig, skip=("warmup_steps",))}
    assert ("warmup_steps",) not in names and ("lr",) in names
    nested = {o.path for o in offered(EntropyConfig, skip=("generation.seed",))}
    assert ("generation", "seed") not in nested and ("generation", "top_p") in nested
    with pytest.raises(TypeError, match="no field"):
        offered(BupoConfig, skip=("warmup",))
    options = {p.name for p in get_command(app).commands["train-bupo"].params}
    assert "warmup_steps" not in options and "probe_every" in options


def test_an_option_declared_twice_is_refused():
    def command(given: dict, out: str = "x") -> None:
        """A command declaring a config field again."""

    with pytest.raises(TypeError, match=r"\['out'\] are declared twice"):
        offers(EntropyConfig)(command)


def test_make_builds_nested_configs_from_dicts():
    cfg = make(EntropyConfig, {"generation": {"seed": 3}, "topk": 0})
    assert cfg == EntropyConfig(generation=GenerationConfig(seed=3), topk=0)
    assert make(EntropyConfig, {}) == EntropyConfig()


def test_a_nested_field_named_as_its_parents_needs_its_own_flag():
    @dataclasses.dataclass
    class Inner:
        seed: int = 0
        """Inner seed."""

    @dataclasses.dataclass
    class Outer:
        seed: int = 1
        """Outer seed."""
        inner: Inner = dataclasses.field(default_factory=Inner)
        """Nested."""

    def command(given: dict) -> None:
        """A command."""

    with pytest.raises(TypeError, match=r"\['seed'\] are declared twice"):
        offers(Outer)(command)
