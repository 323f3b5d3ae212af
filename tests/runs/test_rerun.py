"""A rerun of a finished command says that it is complete and changes nothing; --force redoes."""

import hashlib
import json

import pytest
from helpers import write_problems
from typer.testing import CliRunner

from internal_policy_lens.cli import app

runner = CliRunner()


def _state(folder):
    """Every file under ``folder`` with its modification time and content hash."""
    return {
        str(p.relative_to(folder)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).digest())
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def _data(tmp_path, answered=True):
    data = tmp_path / "d.jsonl"
    rows = [
        {"question": f"What is {a}+1?", **({"response": f"{a + 1}"} if answered else {})}
        for a in range(4)
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return data


@pytest.mark.slow
def test_entropy_rerun_of_a_complete_run(tiny_dirs, tmp_path):
    out = tmp_path / "run"
    common = ["entropy", "--model", tiny_dirs["qwen2"], "--data", _data(tmp_path), "--quiet"]
    result = _cli(*common, "--out", out)
    assert result.exit_code == 0 and "Wrote " in result.output, result.output
    before = _state(out)
    again = _cli(*common, "--out", out)
    assert again.exit_code == 0, again.output
    assert "Nothing to do" in again.output and "complete" in again.output
    assert "--force" in again.output and "Wrote " not in again.output
    assert _state(out) == before  # not a byte, not a time stamp
    first = json.loads((out / "run.json").read_text())
    forced = _cli(*common, "--out", out, "--force")
    assert forced.exit_code == 0 and "Wrote " in forced.output, forced.output
    info = json.loads((out / "run.json").read_text())
    # run.json's times are whole seconds (a fast run starts again within the same one); the
    # tables' modification times (nanoseconds) show that the run was redone.
    assert info["status"] == "complete" and info["started"] >= first["started"]
    assert _state(out)["tokens.parquet"][0] > before["tokens.parquet"][0]
    # Another configuration is still refused without --overwrite, --force or not.
    other = _cli(*common, "--out", out, "--topk", "3", "--force")
    assert other.exit_code == 2 and "--overwrite" in other.output


@pytest.mark.slow
def test_fit_lens_rerun_of_a_complete_fit(tiny_dirs, tmp_path):
    lens = tmp_path / "lens"
    common = ["fit-lens", "--model", tiny_dirs["llama"], "--data", _data(tmp_path), "--quiet"]
    common += ["--steps", "2", "--heldout", "0.25", "--out", lens]
    result = _cli(*common)
    assert result.exit_code == 0 and "wrote " in result.output, result.output
    before = _state(lens)
    again = _cli(*common)
    assert again.exit_code == 0, again.output
    assert "Nothing to do" in again.output and "--force" in again.output
    assert "wrote " not in again.output
    assert _state(lens) == before
    forced = _cli(*common, "--force")
    assert forced.exit_code == 0 and "wrote " in forced.output, forced.output
    assert _state(lens)["lens.json"][0] > before["lens.json"][0]


def test_eval_rerun_of_a_complete_evaluation(tiny_dirs, tmp_path):
    data = write_problems(tmp_path / "p.jsonl", 3)
    out = tmp_path / "eval"
    common = ["eval", "--model", tiny_dirs["qwen2"], "--data", data, "--out", out]
    common += ["--samples", "2", "--max-new-tokens", "4"]
    result = _cli(*common)
    assert result.exit_code == 0 and "avg@2" in result.output, result.output
    before = _state(out)
    again = _cli(*common)
    assert again.exit_code == 0 and "nothing to do" in again.output, again.output
    metrics = [
        line for line in result.output.splitlines() if line.strip().startswith(("avg", "pass"))
    ]
    assert metrics and metrics == [
        line for line in again.output.splitlines() if line.strip().startswith(("avg", "pass"))
    ]  # the same results, printed again
    assert _state(out) == before
    forced = _cli(*common, "--force")
    assert forced.exit_code == 0 and "nothing to do" not in forced.output, forced.output
    assert _state(out)["metrics.json"][0] > before["metrics.json"][0]
    # Another data file under the same name is another evaluation.
    write_problems(data, 2)
    changed = _cli(*common)
    assert changed.exit_code == 0 and "nothing to do" not in changed.output


def test_train_bupo_rerun_of_a_complete_run(tiny_dirs, tmp_path):
    data = write_problems(tmp_path / "p.jsonl", 4)
    out = tmp_path / "run"
    common = ["train-bupo", "--model", tiny_dirs["llama"], "--data", data, "--out", out, "--quiet"]
    common += ["--layer", "0", "--iterative-steps", "1", "--steps", "1", "--group-size", "2"]
    common += ["--prompts-per-step", "1", "--mini-batch-size", "2", "--max-new-tokens", "4"]
    result = _cli(*common)
    assert result.exit_code == 0, result.output
    before = _state(out)
    for extra in ([], ["--resume"]):
        again = _cli(*common, *extra)
        assert again.exit_code == 0 and "nothing to do" in again.output, again.output
        assert "complete (1 steps" in again.output
        assert _state(out) == before


@pytest.mark.slow
def test_eval_lens_rerun_of_a_complete_evaluation(tmp_path):
    out = tmp_path / "eval"
    common = ["eval-lens", "--model", "ipl-tiny-qwen2", "--max-samples", "20", "--out", out]
    result = _cli(*common)
    assert result.exit_code == 0 and "nothing to do" not in result.output, result.output
    before = _state(out)
    again = _cli(*common)
    assert again.exit_code == 0 and "nothing to do" in again.output, again.output
    said = [line for line in again.output.splitlines() if "nothing to do" not in line]
    assert said == result.output.splitlines()  # the same numbers
    assert _state(out) == before
    forced = _cli(*common, "--force")
    assert forced.exit_code == 0 and "nothing to do" not in forced.output, forced.output
    assert _state(out)["lens_eval.csv"][0] > before["lens_eval.csv"][0]
    other = _cli(*common[:-4], "--max-samples", "30", "--out", out)
    assert other.exit_code == 0 and "nothing to do" not in other.output
