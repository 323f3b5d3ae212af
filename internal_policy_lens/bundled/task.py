r"""A verifiable multi-step arithmetic task: seeded problems, worked solutions, an exact checker.

A problem is a chain of operations applied left to right to a start value::

    Start with 12. Add 7. Multiply by 3. Subtract 5. What is the result?

and its worked solution writes one step per operation, then the boxed answer::

    12+7=19. 19*3=57. 57-5=52. \boxed{52}

Difficulty = the number of operations (1 to 6). Additions and subtractions take operands of one or
two digits, multiplications a single digit from 2 to 9; every intermediate value stays in
[0, ``max_value``], so no step needs more than three digits. Responses are scored by the same
checker as every other task, :func:`internal_policy_lens.data.answers.math_reward`.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

OPS = {"+": "Add {}.", "-": "Subtract {}.", "*": "Multiply by {}."}


@dataclass(frozen=True)
class Problem:
    """One problem, its worked solution and answer."""

    question: str
    solution: str
    answer: int
    difficulty: int


def make_problem(rng: random.Random, n_ops: int, max_value: int = 200) -> Problem:
    """Draw one problem with ``n_ops`` operations."""
    value = rng.randint(1, 30)
    text, steps = [f"Start with {value}."], []
    for _ in range(n_ops):
        op, operand = _draw_step(rng, value, max_value)
        result = _apply(op, value, operand)
        text.append(OPS[op].format(operand))
        steps.append(f"{value}{op}{operand}={result}.")
        value = result
    text.append("What is the result?")
    solution = " ".join(steps) + f" \\boxed{{{value}}}"
    return Problem(" ".join(text), solution, value, n_ops)


def _draw_step(rng: random.Random, value: int, max_value: int) -> tuple[str, int]:
    while True:
        op = rng.choice("+-*")
        operand = rng.randint(2, 9) if op == "*" else rng.randint(1, 99)
        if 0 <= _apply(op, value, operand) <= max_value:
            return op, operand


def _apply(op: str, a: int, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def make_problems(n: int, *, seed: int, max_ops: int = 6, max_value: int = 200) -> list[Problem]:
    """``n`` problems with difficulties cycling 1..max_ops, reproducible from ``seed``."""
    rng = random.Random(seed)
    return [make_problem(rng, 1 + i % max_ops, max_value) for i in range(n)]


def to_record(problem: Problem, index: int) -> dict:
    """A record in the layout of the benchmark files (chat-message prompt, reward_model)."""
    return {
        "data_source": "ipl_arithmetic",
        "prompt": [{"role": "user", "content": problem.question}],
        "ability": "arithmetic",
        "reward_model": {"ground_truth": str(problem.answer), "style": "rule"},
        "extra_info": {
            "index": index,
            "difficulty": problem.difficulty,
            "solution": problem.solution,
        },
    }


def write_jsonl(problems: list[Problem], path: str | os.PathLike) -> Path:
    """Write problems as JSON Lines in the benchmark layout."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        for index, problem in enumerate(problems):
            fh.write(json.dumps(to_record(problem, index)) + "\n")
    return path
