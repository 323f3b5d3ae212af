import random

import pytest

from internal_policy_lens.bundled.task import make_problems, write_jsonl
from internal_policy_lens.data.answers import extract_boxed, math_reward
from internal_policy_lens.data.records import read_records
from internal_policy_lens.train.evaluate import pass_at_k


def _correct(response, answer):
    return math_reward(response, answer) == 1.0


def test_checker_accepts_every_solution_and_rejects_perturbed():
    problems = make_problems(2000, seed=1)
    rng = random.Random(0)
    for p in problems:
        assert _correct(p.solution, p.answer)
        assert not _correct(
            p.solution.replace(f"{{{p.answer}}}", f"{{{p.answer + rng.choice([-1, 1, 10])}}}"),
            p.answer,
        )
        assert not _correct(p.solution.replace("\\boxed", "\\fbox"), p.answer)
    assert {p.difficulty for p in problems} == {1, 2, 3, 4, 5, 6}


def test_solutions_are_correct_arithmetic():
    for p in make_problems(500, seed=2):
        steps = p.solution.split(" \\boxed")[0].rstrip(".").split(". ")
        assert len(steps) == p.difficulty
        for step in steps:
            lhs, rhs = step.split("=")
            assert eval(lhs) == int(rhs) and 0 <= int(rhs) <= 200  # noqa: S307 - digits and +-* only
        assert int(steps[-1].split("=")[1]) == p.answer


def test_problems_are_seeded():
    assert make_problems(50, seed=3) == make_problems(50, seed=3)
    assert make_problems(50, seed=3) != make_problems(50, seed=4)


def test_extract_boxed_takes_the_last():
    assert extract_boxed("\\boxed{1} then \\boxed{ 23 }") == "23"
    assert extract_boxed("no box") is None
    assert not _correct("\\boxed{abc}", 3)


def test_task_file_reads_like_a_benchmark(tmp_path):
    problems = make_problems(20, seed=5)
    records = read_records(write_jsonl(problems, tmp_path / "arith.jsonl"))
    assert len(records) == 20
    assert records[3]["prompt"] == [{"role": "user", "content": problems[3].question}]
    assert records[3]["answer"] == str(problems[3].answer)
    assert [r["sample_id"] for r in records] == list(range(20))


@pytest.mark.parametrize(
    "n,c,k,expected",
    [
        (8, 0, 1, 0.0),
        (8, 8, 8, 1.0),
        (8, 2, 1, 0.25),  # c / n
        (4, 1, 2, 0.5),  # 1 - C(3,2)/C(4,2) = 1 - 3/6
        (5, 2, 2, 0.7),  # 1 - C(3,2)/C(5,2) = 1 - 3/10
        (8, 1, 8, 1.0),  # n - c < k
    ],
)
def test_pass_at_k_hand_worked(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected)


def test_pass_at_k_rejects_bad_k():
    with pytest.raises(ValueError, match="k=9"):
        pass_at_k(8, 1, 9)
