import json
from math import comb

import pandas as pd
import pytest
from helpers import parity_reward, write_problems
from typer.testing import CliRunner

from internal_policy_lens.cli import app
from internal_policy_lens.config import EvalConfig
from internal_policy_lens.train.evaluate import evaluate
from internal_policy_lens.train.folder import training_summary

runner = CliRunner()


@pytest.fixture
def problems(tmp_path):
    return write_problems(tmp_path / "p.jsonl", 6)


def test_eval_pass_at_k_by_hand(tiny_dirs, problems, tmp_path):
    # The library call takes a reward with variance (a random model never boxes the answer);
    # the command line runs the real reward and prints the same columns.
    out = tmp_path / "eval"
    cfg = EvalConfig(
        model=str(tiny_dirs["qwen2"]), data=str(problems), out=str(out), samples=6, max_new_tokens=6
    )
    evaluate(cfg, reward=parity_reward)
    args = ["eval", "--model", str(tiny_dirs["qwen2"]), "--data", str(problems)]
    args += ["--out", str(tmp_path / "cli"), "--samples", "6", "--max-new-tokens", "6"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    table = pd.read_csv(out / "results.csv")
    assert list(table.columns) == [
        "sample_id",
        "answer",
        "n",
        "correct",
        "avg@6",
        "pass@1",
        "pass@2",
        "pass@4",
        "pass@6",
    ]
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 36
    for row in table.itertuples():
        c = int(sum(s["reward"] for s in samples if s["sample_id"] == row.sample_id))
        assert row.correct == c
        # Hand computation: pass@k = 1 - C(6-c, k) / C(6, k); pass@1 = c / 6.
        assert row._6 == pytest.approx(c / 6)  # pass@1
        assert row._7 == pytest.approx(1 - comb(6 - c, 2) / comb(6, 2))
        assert row._9 == (1.0 if c else 0.0)
    assert table["correct"].nunique() > 1
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    assert metrics["pass@2"] == pytest.approx(table["pass@2"].mean())
    assert "avg@6" in result.output and "pass@4" in result.output


def test_train_bupo_cli_with_toml(tiny_dirs, problems, tmp_path):
    config = tmp_path / "bupo.toml"
    config.write_text(
        f'model = "{tiny_dirs["llama"]}"\ndata = "{problems}"\nlayer = 0\n'
        "iterative_steps = 1\nsteps = 2\ngroup_size = 3\nprompts_per_step = 2\n"
        "mini_batch_size = 3\nmax_new_tokens = 6\n"
    )
    out = tmp_path / "run"
    result = runner.invoke(
        app, ["train-bupo", "--config", str(config), "--out", str(out), "--lr", "0.001", "--quiet"]
    )
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "config.json").read_text())
    assert saved["lr"] == 0.001 and saved["layer"] == 0 and saved["steps"] == 2
    assert (out / "checkpoints/step-2/model.safetensors").is_file()
    assert (out / "checkpoints/step-2/trainer_state.pt").is_file()
    again = runner.invoke(app, ["train-bupo", "--config", str(config), "--out", str(out)])
    assert again.exit_code == 2 and "--resume" in again.output
    plot = runner.invoke(app, ["plot-train", str(out), str(out), "--out", str(tmp_path / "f")])
    assert plot.exit_code == 0, plot.output
    assert (tmp_path / "f/training.png").stat().st_size > 10_000
    bad = tmp_path / "bad.toml"
    bad.write_text("stepz = 3\n")
    result = runner.invoke(app, ["train-bupo", "--config", str(bad), "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "unknown field(s) stepz" in result.output
    result = runner.invoke(
        app, ["train-bupo", "--config", str(config), "--layer", "9", "--out", str(tmp_path / "y")]
    )
    assert result.exit_code == 2 and "--layer 9 is out of range" in result.output


def test_grpo_baseline_trains_no_layer_and_says_what_ran(tiny_dirs, data_file, tmp_path):
    # --iterative-steps 0 with --layer auto: no entropy pass, no layer recorded (before: the
    # pass ran and its layer went into config.json); the bar is labelled grpo, not bupo, and
    # the run ends with its reward and accuracy.
    out = tmp_path / "grpo"
    args = ["train-bupo", "--model", tiny_dirs["qwen2"], "--data", data_file, "--out", out]
    args += ["--iterative-steps", "0", "--steps", "2", "--group-size", "2"]
    args += ["--prompts-per-step", "2", "--mini-batch-size", "4", "--max-new-tokens", "4"]
    result = runner.invoke(app, list(map(str, args)))
    assert result.exit_code == 0, result.output
    assert json.loads((out / "config.json").read_text())["layer"] is None
    assert "--layer auto" not in result.output
    bars = [line for line in result.output.replace("\r", "\n").splitlines() if "step" in line]
    assert any(line.startswith("grpo: ") for line in bars)
    assert not any(line.startswith("bupo") for line in bars)
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["entropy_internal"] for m in metrics] == [None, None]
    reward = [m["reward_mean"] for m in metrics]
    accuracy = [m["accuracy"] for m in metrics]
    assert (
        f"reward {reward[0]:.3f} -> {reward[1]:.3f}, accuracy {accuracy[0]:.3f} -> "
        f"{accuracy[1]:.3f} (step 0 -> step 1; 2 GRPO steps)"
    ) in result.output
    again = runner.invoke(app, list(map(str, args)))  # complete: nothing to do, same summary
    assert again.exit_code == 0 and "nothing to do" in again.output, again.output
    assert "2 GRPO steps" in again.output


def test_layer_auto_says_what_it_does_before_it_does_it(tiny_dirs, data_file, tmp_path):
    out = tmp_path / "bupo"
    args = ["train-bupo", "--model", tiny_dirs["qwen2"], "--data", data_file, "--out", out]
    args += ["--iterative-steps", "1", "--steps", "2", "--group-size", "2"]
    args += ["--prompts-per-step", "2", "--mini-batch-size", "4", "--max-new-tokens", "4"]
    # Whether this random model has a layer to choose does not matter here: what is said first.
    lines = runner.invoke(app, list(map(str, args))).output.replace("\r", "\n").splitlines()
    said = [line for line in lines if line.startswith("--layer auto")]
    assert said[0] == (
        "--layer auto: choosing layer k by the paper's rule: greedy responses (up to 4 tokens) "
        "to the first 12 training prompts, then their FFN entropy change per layer (--layer K "
        "skips this)"
    )
    assert any(line.startswith("layer auto: 100%") and "12/12" in line for line in lines)


def test_eval_bar_is_labelled_and_counts_agree(tiny_dirs, problems, tmp_path):
    args = ["eval", "--model", tiny_dirs["qwen2"], "--data", problems, "--out", tmp_path / "e"]
    args += ["--samples", "1", "--max-samples", "1", "--max-new-tokens", "4"]
    result = runner.invoke(app, list(map(str, args)))
    assert result.exit_code == 0, result.output
    assert "1 problem, 1 sample each" in result.output
    bars = result.output.replace("\r", "\n").splitlines()
    assert any(line.startswith("eval: ") and "resp" in line for line in bars)


def test_training_summary_of_a_bupo_run(tmp_path):
    # Means over the first and the last quarter of the steps (2 of 8): hand-worked below.
    rewards = [0.1, 0.3, 0.2, 0.4, 0.5, 0.5, 0.6, 0.8]
    accuracies = [0.0, 0.2, 0.1, 0.3, 0.4, 0.4, 0.5, 0.7]
    rows = [
        {"step": s, "phase": "ipa" if s < 3 else "grpo", "layer": 5 if s < 3 else None}
        | {"reward_mean": r, "accuracy": a}
        for s, (r, a) in enumerate(zip(rewards, accuracies))
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    # reward (0.1 + 0.3) / 2 = 0.2 -> (0.6 + 0.8) / 2 = 0.7; accuracy 0.1 -> 0.6
    assert training_summary(tmp_path) == (
        "reward 0.200 -> 0.700, accuracy 0.100 -> 0.600 (means of steps 0-1 -> steps 6-7; "
        "3 IPA steps on layer 5, then 5 GRPO steps)"
    )
    assert training_summary(tmp_path / "none") is None
