"""Verifier for the synthetic multi-step arithmetic task (outcome AND process).

A solution is a sequence of step segments followed by an answer segment, separated by ";":

    "23*3=69 ; 69-17=52 ; answer 52"

Each step is ``<int><op><int>=<int>`` (spaces around tokens are tolerated) with op in ``+ - * /`` (``/`` is exact integer
division). The verifier reports

- ``outcome``: the last segment is ``answer N`` and N equals the gold answer (what an ordinary
  outcome-only verifier would check; the steps are not looked at);
- ``process``: the whole text parses, there is at least one step, every step's arithmetic is
  right, every operand is one of the problem's quantities or the result of an earlier step of
  this solution (distractor numbers are not valid operands), and the answer equals the last
  step's result;
- ``lucky``: ``outcome and not process`` (right answer, reached the wrong way);
- ``parse_ok``: the whole text is in the format above.

The problem arrives as a compact JSON string (the dataset row's ``ground_truth``)::

    {"q": [23, 3, 17], "d": [41], "a": 52}

q = problem quantities in order of appearance, d = distractor numbers, a = gold answer. A
``clipo_jax.data.synthetic.Problem`` (anything with ``to_ground_truth()``) or the decoded dict
are accepted as well. This module does not import the data module (the data module imports it).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

__all__ = [
    "SyntheticMetaError",
    "ParsedSolution",
    "SyntheticMeta",
    "parse_solution",
    "parse_meta",
    "check_solution",
    "grade_rates",
    "synthetic_reward",
    "synthetic_process_reward",
    "REWARDS",
]

# Numbers are capped at 18 digits: Python refuses int() on >4300 digits, and no task value is
# anywhere near that, so a longer digit run is simply a malformed solution.
_INT = r"-?\d{1,18}"
_STEP_RE = re.compile(rf"\s*({_INT})\s*([-+*/])\s*({_INT})\s*=\s*({_INT})\s*")
_ANSWER_RE = re.compile(rf"\s*answer\s*({_INT})\s*")
STEP_SEPARATOR = ";"


class SyntheticMetaError(ValueError):
    """The ground-truth / meta for a synthetic problem is malformed."""


@dataclass(frozen=True)
class SyntheticMeta:
    """What the verifier needs to know about a problem."""

    quantities: tuple[int, ...]
    distractors: tuple[int, ...]
    answer: int


@dataclass(frozen=True)
class ParsedSolution:
    """A solution split into steps; ``answer`` is None when the last segment is not an answer."""

    steps: tuple[tuple[int, str, int, int], ...]  # (left, op, right, claimed result)
    answer: int | None
    parse_ok: bool


def _as_int_list(value: Any, field: str) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise SyntheticMetaError(f"synthetic ground_truth field {field!r} must be a list of ints, got {value!r}")
    return tuple(value)


def parse_meta(problem_or_meta: Any) -> SyntheticMeta:
    """Problem / JSON string / dict -> SyntheticMeta. Raises SyntheticMetaError naming the field."""
    if isinstance(problem_or_meta, SyntheticMeta):
        return problem_or_meta
    if hasattr(problem_or_meta, "to_ground_truth"):
        problem_or_meta = problem_or_meta.to_ground_truth()
    if isinstance(problem_or_meta, (str, bytes)):
        try:
            problem_or_meta = json.loads(problem_or_meta)
        except json.JSONDecodeError as e:
            raise SyntheticMetaError(
                f"synthetic ground_truth is not JSON ({e.msg}): {problem_or_meta[:80]!r}"
            ) from None
    if not isinstance(problem_or_meta, Mapping):
        raise SyntheticMetaError(f"synthetic ground_truth must be a JSON object, got {type(problem_or_meta).__name__}")
    for field in ("q", "a"):
        if field not in problem_or_meta:
            raise SyntheticMetaError(f"synthetic ground_truth is missing field {field!r}")
    answer = problem_or_meta["a"]
    if not isinstance(answer, int) or isinstance(answer, bool):
        raise SyntheticMetaError(f"synthetic ground_truth field 'a' must be an int, got {answer!r}")
    return SyntheticMeta(
        quantities=_as_int_list(problem_or_meta["q"], "q"),
        distractors=_as_int_list(problem_or_meta.get("d", []), "d"),
        answer=answer,
    )


def parse_solution(text: str) -> ParsedSolution:
    """Split a completion into steps and the answer. Never raises on any string."""
    if not isinstance(text, str):
        return ParsedSolution(steps=(), answer=None, parse_ok=False)
    segments = text.split(STEP_SEPARATOR)
    answer_match = _ANSWER_RE.fullmatch(segments[-1])
    answer = int(answer_match.group(1)) if answer_match else None
    steps = []
    parse_ok = answer is not None
    for seg in segments[:-1]:
        m = _STEP_RE.fullmatch(seg)
        if m is None:
            parse_ok = False
            continue
        steps.append((int(m.group(1)), m.group(2), int(m.group(3)), int(m.group(4))))
    return ParsedSolution(steps=tuple(steps), answer=answer, parse_ok=parse_ok)


def apply_op(left: int, op: str, right: int) -> int | None:
    """The true result of ``left op right``; None when undefined (inexact or zero division)."""
    if op == "+":
        return left + right
    if op == "-":
        return left - right
    if op == "*":
        return left * right
    if op == "/":
        if right == 0 or left % right != 0:
            return None
        return left // right
    raise ValueError(f"unknown op {op!r}")


def check_solution(problem_or_meta: Any, completion: str) -> dict[str, bool]:
    """Grade one completion: {"outcome", "process", "lucky", "parse_ok"} (all bools)."""
    meta = parse_meta(problem_or_meta)
    parsed = parse_solution(completion)
    outcome = parsed.answer is not None and parsed.answer == meta.answer
    process = parsed.parse_ok and len(parsed.steps) > 0
    if process:
        # Values a step may use: the problem's own quantities, then each earlier step's result.
        # Distractor numbers are excluded by construction (the generator never lets a distractor
        # equal a quantity or a gold intermediate result).
        available = set(meta.quantities)
        for left, op, right, claimed in parsed.steps:
            if left not in available or right not in available or apply_op(left, op, right) != claimed:
                process = False
                break
            available.add(claimed)
        process = process and parsed.answer == parsed.steps[-1][3]
    return {
        "outcome": bool(outcome),
        "process": bool(process),
        "lucky": bool(outcome and not process),
        "parse_ok": bool(parsed.parse_ok),
    }


def grade_rates(ground_truths: Sequence[Any], completions: Sequence[str]) -> dict[str, float]:
    """Mean of each ``check_solution`` flag over a set: outcome / process accuracy, lucky rate,
    parse rate. ``ground_truths[i]`` grades ``completions[i]``."""
    if len(ground_truths) != len(completions):
        raise ValueError(f"grade_rates: {len(ground_truths)} ground truths but {len(completions)} completions")
    keys = ("outcome", "process", "lucky", "parse_ok")
    if not completions:
        return {k: 0.0 for k in keys}
    totals = dict.fromkeys(keys, 0)
    for gt, text in zip(ground_truths, completions):
        graded = check_solution(gt, text)
        for k in keys:
            totals[k] += graded[k]
    return {k: totals[k] / len(completions) for k in keys}


def synthetic_reward(response: str, ground_truth: str, **meta: Any) -> float:
    """Outcome reward: 1.0 when the final ``answer N`` is right, else 0.0.

    ``ground_truth`` is the JSON string from ``Problem.to_ground_truth()``; extra row fields
    (``meta``) are accepted and ignored so the trainer can pass a generic row.
    """
    del meta
    return 1.0 if check_solution(ground_truth, response)["outcome"] else 0.0


def synthetic_process_reward(response: str, ground_truth: str, **meta: Any) -> float:
    """Outcome AND process: 1.0 only when the answer is right and every step checks out."""
    del meta
    graded = check_solution(ground_truth, response)
    return 1.0 if graded["outcome"] and graded["process"] else 0.0


# Name -> reward fn. The shared registry in clipo_jax/rewards/__init__.py registers these
# entries (this module does not import the package __init__, which would be circular).
REWARDS: dict[str, Callable[..., float]] = {
    "synthetic": synthetic_reward,
    "synthetic_process": synthetic_process_reward,
}
