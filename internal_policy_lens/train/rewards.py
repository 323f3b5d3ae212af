r"""Verifiable rewards: the last ``\boxed{...}`` of a response against the reference answer."""

from __future__ import annotations

import re

from ..task import extract_boxed

_STRIP = re.compile(r"\\left|\\right|\\!|\\,|\\;|\$|\s")
_TEXT = re.compile(r"\\(?:text|mathrm|textbf)\{([^{}]*)\}")


def normalize(answer: str) -> str:
    r"""Canonical form: no spaces, ``$``, ``\left``, ``\right`` or ``\text{}``; ``1.0`` -> ``1``."""
    text = _STRIP.sub("", _TEXT.sub(r"\1", answer)).rstrip(".")
    text = text.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    try:
        number = float(text.replace(",", ""))
    except ValueError:
        return text
    return str(int(number)) if number.is_integer() else repr(number)


def math_reward(response: str, answer: str | int) -> float:
    r"""1.0 if the last ``\boxed{}`` of ``response`` matches ``answer``, else 0.0.

    Answers are compared after :func:`normalize`; when the ``math-verify`` package is installed, a
    string mismatch is checked again with it (gold first, no timeout: it only works in the main
    thread).
    """
    predicted = extract_boxed(response)
    if predicted is None:
        return 0.0
    if normalize(predicted) == normalize(str(answer)):
        return 1.0
    try:
        from math_verify import parse, verify
    except ImportError:
        return 0.0
    try:
        gold = parse(f"\\boxed{{{answer}}}", parsing_timeout=None)
        pred = parse(f"\\boxed{{{predicted}}}", parsing_timeout=None)
        return float(verify(gold, pred, timeout_seconds=None))
    except Exception:  # noqa: BLE001 - a parser failure is a wrong answer, not a crash
        return 0.0
