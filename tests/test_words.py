"""What the commands print and the figures say agrees with the numbers behind them."""

import inspect
import re
from pathlib import Path

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

import internal_policy_lens
from internal_policy_lens.analysis import charts, plots
from internal_policy_lens.cli import app
from internal_policy_lens.commands.entropy import EntropyRun, describe
from internal_policy_lens.commands.lens import kl_text
from internal_policy_lens.config import BupoConfig, ConvergenceConfig, EntropyConfig
from internal_policy_lens.data.records import DataError, read_records
from internal_policy_lens.model.families import FAMILIES, TINY_ARCHITECTURES
from internal_policy_lens.model.load import load_model
from internal_policy_lens.tables import entropy_table
from internal_policy_lens.train.layer import auto_layer
from internal_policy_lens.train.loop import warn_if_no_signal

runner = CliRunner()


def test_end_of_run_exploration_layers_use_the_stages_tau():
    tau = ConvergenceConfig().tau
    summary = pd.DataFrame(
        {
            "quantity": ["delta"] * 3 + ["entropy"],
            "layer": [0, 1, 2, 2],
            "name": ["ffn", "ffn", "ffn", "final"],
            "mean": [tau / 2, tau * 3, -tau, 0.5],
        }
    )
    info = {"samples": 1, "rows": 1, "config": {"lens": "raw"}}
    text = describe(EntropyRun(Path("o"), info, summary))
    assert f"> tau = {tau:g} nats (exploration): [1]." in text  # not layer 0 (0 < d < tau)


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"ipl (internal-policy-lens) {internal_policy_lens.__version__}"


def test_eval_lens_table_orders_lenses_and_prints_no_negative_zero():
    table = pd.DataFrame(
        {
            "site": ["resid_post"] * 3,
            "layer": [1] * 3,
            "lens": ["tuned", "norm", "raw"],
            "kl_final_internal": [0.25, -3e-7, 4.0],
        }
    )
    text = kl_text(table)
    assert re.search(r"raw\s+norm\s+tuned", text)
    assert "-0.0000" not in text and re.search(r"4\.0000\s+0\.0000\s+0\.2500", text)


def test_identical_rewards_warning_counts_groups():
    rewards = torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0])  # 4 groups of 2
    with pytest.warns(
        UserWarning, match=r"4 of 4 groups have identical rewards \(rewards \[0.0, 1.0\]\)"
    ):
        warn_if_no_signal(rewards, 2, 3)


def test_training_figure_steps_are_whole_numbers():
    frame = pd.DataFrame(
        {
            "step": [0, 1, 2],
            "phase": ["ipa", "grpo", "grpo"],
            **{column: [0.1, 0.2, 0.3] for column, _ in plots.PANELS},
        }
    )
    fig = plots.training_curves({"run": frame})
    fig.canvas.draw()
    for ax in fig.axes[:-1]:
        ticks = [t for t in ax.get_xticks() if -0.5 <= t <= 2.5]
        assert ticks and all(float(t).is_integer() for t in ticks)


def test_stage_legends_name_tau():
    deltas = pd.DataFrame(
        {"sample_id": 0, "position": 0, "layer": [0, 1], "module": "ffn", "delta": [0.5, -0.5]}
    )
    stages = {"exploration": (0, 0), "integration": None, "convergence": (1, 1)}
    fig = plots.entropy_change(deltas, stages=stages, tau=0.1)
    labels = fig.axes[0].get_legend_handles_labels()[1]
    assert any("ΔH > tau = 0.1 nats" in label for label in labels)
    page = charts.change_chart(deltas, stages, 0.1)
    notes = [a.text for a in page.layout.annotations]
    assert any("ΔH > tau = 0.1 nats" in n for n in notes)


def test_a_data_directory_says_so(tmp_path):
    (tmp_path / "problems.jsonl").write_text("{}\n")
    with pytest.raises(DataError, match=r"is a directory; check the path: .*problems\.jsonl"):
        read_records(tmp_path)


@pytest.mark.slow
def test_layer_auto_says_which_layer_and_why(caplog):
    model = load_model("ipl-tiny-qwen2", dtype="float32", device="cpu", progress=False)
    cfg = BupoConfig(model="ipl-tiny-qwen2", max_new_tokens=24)
    caplog.set_level("INFO", logger="internal_policy_lens")
    layer = auto_layer(cfg, model, n=4)
    said = [r.getMessage() for r in caplog.records if "--layer auto" in r.getMessage()]
    assert len(said) == 2 and said[0].startswith("--layer auto: choosing layer k")  # before
    assert said[1].startswith(f"--layer auto: layer {layer} (0-based)")
    assert "FFN entropy change > tau" in said[1] and "first 4 training prompts" in said[1]


def test_position_defaults_of_entropy_table_and_ipl_entropy_are_explained():
    default = inspect.signature(entropy_table).parameters["response_only"].default
    assert default is False and EntropyConfig().response_only is True  # they differ...
    doc = " ".join(entropy_table.__doc__.split())
    assert "Default False here, True in ``ipl entropy``" in doc  # ...and the docstring says why
    assert "Pass ``response_only=True`` for the rows of an ``ipl entropy`` run's" in doc


def test_make_tiny_lists_exactly_the_families_of_ipl_models():
    help_text = " ".join(runner.invoke(app, ["make-tiny", "--help"]).output.split())
    listed = re.search(r"--arch <str> (.*?): one per family", help_text).group(1).split(", ")
    assert listed == list(TINY_ARCHITECTURES)
    models = runner.invoke(app, ["models"]).output.splitlines()
    rows = [line.split("\t") for line in models if line.startswith("  ") and "\t" in line]
    families = [row for row in rows if len(row) == 3]
    assert [row[0].strip() for row in families] == [f.name for f in FAMILIES]
    assert sorted(row[2] for row in families) == sorted(listed)  # one each, none left over


def test_the_readme_names_the_default_run_folder_of_ipl_entropy():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    main_job = r"`ipl entropy` with no `--model` or `--data`.*?writes\s+`([^`]+)/`"
    said = re.search(main_job, readme, re.S)
    assert said is not None
    assert said.group(1) == EntropyConfig().out
    makefile = (Path(__file__).parents[1] / "Makefile").read_text()
    run = re.search(r"^run:.*\n\t(.*)$", makefile, re.M).group(1)
    assert run.split() == ["$(VENV)/bin/ipl", "entropy"]  # make run writes that same folder


def test_make_test_uses_both_cores_and_test_quick_skips_the_slow_tests():
    makefile = (Path(__file__).parents[1] / "Makefile").read_text()
    pytest_lines = {
        target: re.search(rf"^{target}:.*\n(?:\t.*\n)*?\t(.*pytest.*)$", makefile, re.M).group(1)
        for target in ("test", "test-quick")
    }
    assert pytest_lines["test"].split()[1:] == ["-q", "-n", "2"]
    assert pytest_lines["test-quick"].split()[1:] == ["-q", "-n", "2", "-m", '"not', 'slow"']
