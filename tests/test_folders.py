"""The rerun rule in one place: what a command does with a folder that holds earlier work."""

from pathlib import Path

import pytest

from internal_policy_lens.folders import FolderConfigError, FolderState, folder_state

RECORD = Path("out/run.json")
CONFIG = {"lens": "raw", "topk": 5, "data_sha256": "ab"}


@pytest.mark.parametrize(
    ("saved", "complete", "overwrite", "force", "state"),
    [
        (None, False, False, False, "new"),
        (None, False, True, True, "new"),
        (CONFIG, False, False, False, "resume"),
        (CONFIG, True, False, False, "complete"),
        (CONFIG, True, False, True, "redo"),
        (CONFIG, False, False, True, "redo"),
        (CONFIG, True, True, False, "complete"),  # --overwrite alone never redoes the same work
        ({**CONFIG, "topk": 3}, True, True, False, "redo"),
        ({**CONFIG, "topk": 3}, False, True, True, "redo"),
    ],
)
def test_each_case(saved, complete, overwrite, force, state):
    got = folder_state(
        RECORD, saved, dict(CONFIG), complete=complete, overwrite=overwrite, force=force
    )
    assert got == state and isinstance(got, FolderState)


@pytest.mark.parametrize("force", [False, True])
def test_another_configuration_is_refused_naming_the_file_the_fields_and_the_fix(force):
    saved = {**CONFIG, "topk": 3, "lens": "norm"}
    with pytest.raises(FolderConfigError) as err:
        folder_state(RECORD, saved, CONFIG, complete=True, force=force)
    assert str(err.value) == (
        f"{RECORD}: the folder holds a run with another configuration (differs in lens, topk); "
        "pass --overwrite to start over or choose another --out"
    )
    assert isinstance(err.value, ValueError)  # the CLI's one-line error, exit code 2


def test_a_field_missing_from_the_record_differs_and_the_words_are_the_callers():
    with pytest.raises(FolderConfigError, match=r"^cfg.json: --resume with another configuration"):
        folder_state(
            Path("cfg.json"),
            {"lens": "raw"},
            CONFIG,
            complete=False,
            holds="--resume",
            fix="resume with the options it was started with",
        )
    with pytest.raises(FolderConfigError, match=r"\(differs in data_sha256, topk\); resume with"):
        folder_state(Path("x"), {"lens": "raw"}, CONFIG, complete=False, fix="resume with")
