r"""Answer checking (the reward): the last ``\boxed{...}`` of a response against the answer."""

from __future__ import annotations

import re

_STRIP = re.compile(r"\\left|\\right|\\!|\\,|\\;|\$|\s")
_TEXT = re.compile(r"\\(?:text|mathrm|textbf)\{([^{}]*)\}")


def extract_boxed(text: str) -> str | None:
    r"""The content of the last ``\boxed{...}`` in ``text``, or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, begin = 0, start + len("\\boxed{")
    for i in range(begin, len(text)):  # match braces, so \boxed{\frac{1}{2}} is whole
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth < 0:
            return text[begin:i].strip()
    return None


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
