"""Run folders defend themselves: one writer, unusable --out refused before work, no space left."""

import errno
import json
import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pandas as pd
import pyarrow.feather as feather
import pytest
from helpers import ipl_command, one_thread_env, write_problems, write_questions
from typer.testing import CliRunner

from internal_policy_lens.cli import app
from internal_policy_lens.folders import Folder, FolderError
from internal_policy_lens.runs.io import rerun_command

runner = CliRunner()


def _data(tmp_path, n=3):
    rows = [{"problem": f"Compute {a}*7.", "response": f"{a}*7 = {a * 7}."} for a in range(n)]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _commands(tiny_dirs, tmp_path, out):
    """Every command that writes a folder, writing into ``out``."""
    model, data = str(tiny_dirs["qwen2"]), str(_data(tmp_path))
    problems = str(write_problems(tmp_path / "p.jsonl", 2))
    run = tmp_path / "finished"
    if not run.exists():
        done = runner.invoke(app, ["entropy", "--model", model, "--data", data, "--out", str(run)])
        assert done.exit_code == 0, done.output
    return {
        "entropy": ["entropy", "--model", model, "--data", data, "--out", str(out)],
        "train-bupo": ["train-bupo", "--model", model, "--data", problems, "--out", str(out)],
        "eval": ["eval", "--model", model, "--data", problems, "--out", str(out)],
        "compare": ["compare", str(run), "--out", str(out)],
        "merge": ["merge", str(out)],
        "fit-lens": ["fit-lens", "--model", model, "--data", data, "--out", str(out), "--quiet"],
        "eval-lens": ["eval-lens", "--out", str(out)],
    }


def _after(tmp_path):
    return sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))


@pytest.mark.parametrize("case", ["file", "under-file"])
def test_out_that_is_or_lies_under_a_file(tiny_dirs, tmp_path, case):
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    out = afile if case == "file" else afile / "run"
    expected = "is a file, not a folder" if case == "file" else f"lies under a file ({afile})"
    for name, args in _commands(tiny_dirs, tmp_path, out).items():
        before = _after(tmp_path)
        result = runner.invoke(app, [*args, "--quiet"] if name in ("entropy",) else args)
        assert result.exit_code == 2, (name, result.output)
        assert f"error: {out}: {expected}; choose a folder path for --out" in result.output, name
        assert "Traceback" not in result.output
        assert _after(tmp_path) == before, name  # nothing written
        assert afile.read_text() == "not a folder"


def test_read_only_file_system(tiny_dirs, tmp_path):
    mount = Path(tempfile.mkdtemp(prefix="ipl-ro-"))
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        mount.rmdir()
        pytest.skip(f"cannot mount a read-only tmpfs here: {done.stderr.decode().strip()}")
    try:
        for name, args in _commands(tiny_dirs, tmp_path, mount / "run").items():
            if name == "merge":
                continue  # merge reads a run that exists; a read-only one is refused the same way
            result = runner.invoke(app, args)
            assert result.exit_code == 2, (name, result.output)
            assert f"error: {mount / 'run'}: cannot write in {mount} (a read-only file" in (
                result.output
            ), name
        assert list(mount.iterdir()) == []
    finally:
        subprocess.run(["umount", str(mount)], check=True)
        mount.rmdir()


def test_no_permission(tiny_dirs, tmp_path):
    base = Path(tempfile.mkdtemp(prefix="ipl-perm-"))
    try:
        os.chmod(base, 0o755)
        locked = base / "locked"
        locked.mkdir(mode=0o555)
        locked.chmod(0o555)
        command = ipl_command("entropy", "--out", locked / "run", "--quiet")
        if os.geteuid() == 0:  # root ignores permission bits: run as an unprivileged user
            if shutil.which("setpriv") is None:
                pytest.skip("running as root and setpriv is missing: root bypasses permissions")
            command = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *command]
        env = {**os.environ, "HOME": str(base)}
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
        assert done.returncode == 2, done.stderr
        assert done.stderr.strip() == (
            f"error: {locked / 'run'}: cannot write in {locked} (no permission to write); "
            "choose a --out where you can write"
        )
        assert list(locked.iterdir()) == []
    finally:
        os.chmod(base / "locked", 0o755)
        shutil.rmtree(base)


def test_no_space_left_while_writing_a_part(tiny_dirs, tmp_path, monkeypatch):
    data = _data(tmp_path, n=4)
    args = ["entropy", "--model", str(tiny_dirs["qwen2"]), "--data", str(data), "--quiet"]
    args += ["--batch-size", "1"]
    lone = runner.invoke(app, [*args, "--out", str(tmp_path / "lone")])
    assert lone.exit_code == 0, lone.output
    original, calls = feather.write_feather, []

    def full_disk(table, path, *a, **k):
        calls.append(str(path))
        if "tokens-00002" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return original(table, path, *a, **k)

    monkeypatch.setattr(feather, "write_feather", full_disk)
    out = tmp_path / "run"
    result = runner.invoke(app, [*args, "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert f"error: {out / 'parts'}: No space left on device" in result.output
    assert "nothing was written to tokens-00002.arrow" in result.output
    assert "free some space, then rerun the same command (finished work is kept)" in result.output
    assert "Traceback" not in result.output
    parts = sorted(p.name for p in (out / "parts").iterdir())
    assert [p for p in parts if p.startswith("tokens-")] == [
        "tokens-00000.arrow",
        "tokens-00001.arrow",
    ]
    assert not [p for p in parts if p.startswith(".")]  # no temporary left
    monkeypatch.setattr(feather, "write_feather", original)
    again = runner.invoke(app, [*args, "--out", str(out)])
    assert again.exit_code == 0, again.output
    for name in ("tokens.parquet", "deltas.parquet"):
        pd.testing.assert_frame_equal(
            pd.read_parquet(out / name), pd.read_parquet(tmp_path / "lone" / name)
        )


def test_second_lock_names_the_holder(tmp_path):
    folder = Folder(tmp_path / "run")
    with folder.lock():
        with pytest.raises(FolderError, match=rf"pid {os.getpid()}\) is writing this folder"):
            with folder.lock():
                pass
        with folder.lock(if_free=True) as mine:
            assert mine is False
    with folder.lock(shared=True), folder.lock(shared=True):  # shards share the folder
        with pytest.raises(FolderError, match="wait for it to finish, or choose another"):
            with folder.lock():
                pass
    with folder.lock() as mine:  # released on exit
        assert mine is True


def _entropy(args):
    return subprocess.Popen(
        ipl_command("entropy", *args),
        env=one_thread_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(condition, seconds=120):
    deadline = time.time() + seconds
    while time.time() < deadline and not condition():
        time.sleep(0.05)
    assert condition()


@pytest.mark.slow
def test_two_concurrent_runs_one_writer(tiny_dirs, tmp_path):
    # Enough generation batches (one response each) that the first run outlasts the second's
    # start-up by several seconds.
    data = write_questions(tmp_path / "q.jsonl", 40)
    common = ["--model", tiny_dirs["qwen3"], "--data", data, "--max-new-tokens", 64]
    common += ["--batch-size", 4, "--gen-batch-size", 1, "--seed", 7, "--quiet"]
    out = tmp_path / "run"
    first = _entropy([*common, "--out", out])
    _wait_for(lambda: (out / "run.json").is_file())  # the first holds the lock
    second = _entropy([*common, "--out", out])
    assert second.wait() == 2
    assert first.poll() is None  # refused while the first was still running
    message = second.stderr.read().strip().splitlines()
    assert message == [
        f"error: {out}: another ipl process (pid {first.pid}) is writing this folder; wait for "
        "it to finish, or choose another --out"
    ]
    assert first.wait() == 0, first.stderr.read()
    # kill -9 of a holder leaves no stale lock: the next run takes it and resumes
    killed = tmp_path / "killed"
    holder = _entropy([*common, "--out", killed])
    _wait_for(lambda: len(list((killed / "generation").glob("part-*.json"))) >= 5)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    rerun = _entropy([*common, "--out", killed])
    assert rerun.wait() == 0, rerun.stderr.read()
    assert "resuming the unfinished run" in rerun.stderr.read()
    # Both equal: the run that kept the folder to itself, and the killed-then-resumed one.
    for name in ("tokens.parquet", "deltas.parquet"):
        pd.testing.assert_frame_equal(pd.read_parquet(killed / name), pd.read_parquet(out / name))
    assert (killed / "responses.jsonl").read_text() == (out / "responses.jsonl").read_text()


READERS = {
    "report": ["report", "{run}"],
    "plot": ["plot", "{run}"],
    "suggest-layer": ["suggest-layer", "{run}"],
    "compare": ["compare", "{run}", "--out", "{tmp}/cmp"],
}


def _read(args, run, tmp_path):
    result = runner.invoke(app, [a.format(run=run, tmp=tmp_path) for a in args])
    assert result.exit_code == 2, result.output
    assert len(result.output.strip().splitlines()) == 1
    return result.output


@pytest.mark.slow
def test_unfinished_run_says_the_command_that_finishes_it(tiny_dirs, tmp_path):
    out = tmp_path / "run"
    args = ["--model", tiny_dirs["qwen2"], "--data", _data(tmp_path), "--out", out, "--quiet"]
    killed = subprocess.run(
        ipl_command("entropy", *args),
        env=one_thread_env(IPL_KILL_BEFORE_PUBLISH="tokens.parquet"),
        capture_output=True,
    )
    assert killed.returncode == -signal.SIGKILL
    command = shlex.join(["ipl", "entropy", *map(str, args)])  # as run.json recorded it
    assert json.loads((out / "run.json").read_text())["cwd"] == os.getcwd()
    for name, reader in READERS.items():
        said = _read(reader, out, tmp_path)
        assert f"error: {out}: unfinished run (status 'running', started " in said, name
        assert f"rerun `{command}` to finish it (its finished batches are kept)" in said, name
        assert "--overwrite" not in said
    # The command given finishes the run, and the readers read it.
    given = shlex.split(said.split("`")[1])
    assert given[0] == "ipl"
    done = subprocess.run(ipl_command(*given[1:]), env=one_thread_env(), capture_output=True)
    assert done.returncode == 0, done.stderr
    assert runner.invoke(app, ["suggest-layer", str(out)]).exit_code in (0, 1)


def test_rerun_command_finishes_the_folder_where_it_is(tmp_path, monkeypatch):
    info = {"command": ["/venv/bin/ipl", "entropy", "--data", "d.jsonl", "--out", "runs/a"]}
    monkeypatch.chdir(tmp_path)
    moved = Path("runs/b")
    assert rerun_command(info, moved) == "`ipl entropy --data d.jsonl --out runs/b`"
    assert rerun_command(info, moved, "--force").endswith("--out runs/b --force`")
    # Run from elsewhere: its relative paths need its folder, so the out is absolute.
    elsewhere = {**info, "cwd": "/home/me/project"}
    assert rerun_command(elsewhere, moved) == (
        f"`ipl entropy --data d.jsonl --out {tmp_path / 'runs/b'}` in /home/me/project"
    )
    assert (
        rerun_command({}, moved) == "the `ipl entropy` command that wrote the folder (--out runs/b)"
    )


def test_complete_run_with_a_table_missing_says_force(tiny_dirs, tmp_path):
    _commands(tiny_dirs, tmp_path, tmp_path / "unused")  # writes tmp_path/finished
    run = tmp_path / "finished"
    (run / "summary.csv").unlink()
    said = _read(READERS["report"], run, tmp_path)
    assert f"{run}: a complete run whose summary.csv is missing; rerun `ipl " in said
    assert f"--out {run}" in said and "--force` to redo it" in said


def test_training_folder_is_named_and_its_checkpoints_offered(tiny_dirs, tmp_path):
    out = tmp_path / "train"
    args = ["train-bupo", "--model", tiny_dirs["llama"], "--out", out, "--quiet"]
    args += ["--data", write_problems(tmp_path / "p.jsonl", 4), "--layer", "0"]
    args += ["--iterative-steps", "1", "--steps", "1", "--group-size", "2"]
    args += ["--prompts-per-step", "1", "--mini-batch-size", "2", "--max-new-tokens", "4"]
    result = runner.invoke(app, list(map(str, args)))
    assert result.exit_code == 0, result.output
    (checkpoint,) = (out / "checkpoints").iterdir()
    for name, reader in READERS.items():
        said = _read(reader, out, tmp_path)
        assert f"error: {out}: a training run of `ipl train-bupo`, not an `ipl entropy` run" in said
        assert f"`ipl plot-train {out}`" in said, name
        assert f"`ipl entropy --model {checkpoint} --out RUN`" in said, name
        assert "--out " + str(out) not in said
