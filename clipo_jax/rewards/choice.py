"""Multiple-choice reward: the option letter of a response against the gold letter.

Recognised answer forms, in order of preference (only text after ``</think>`` counts):
``\\boxed{B}`` / ``\\boxed{(B)}`` / ``\\boxed{B. bank}`` / ``\\boxed{\\text{B}}``, then
"the answer is (B)" / "Answer: B", then a last line that is only ``B`` / ``(B)`` / ``B.``.
"""

from __future__ import annotations

import re

from clipo_jax.rewards.math import _FAST, _NO_ANSWER, MAX_BOX_CHARS, _record, clean_answer, last_boxed, strip_thinking

# Letter at the start of the box content: "B", "(B)", "B.", "B)", "B: text", "B text".
_BOX_LETTER_RE = re.compile(r"^\(?\s*([A-Z])\s*(?:\)|\.|:|\s|$)")
_ANSWER_IS_RE = re.compile(
    r"answer(?:\s+is)?\s*(?:option\s*)?[:\s]\s*\**\s*\(?\s*\$?\s*(?:\\boxed\{)?\s*([A-Z])\b(?![',])", re.IGNORECASE
)
_LINE_LETTER_RE = re.compile(r"^\**\(?\s*([A-Z])\s*\)?\.?\**$")


def _gold_letter(letter: str) -> str | None:
    m = re.fullmatch(r"\(?\s*([A-Za-z])\s*\)?\.?", clean_answer(str(letter)).strip())
    return m.group(1).upper() if m else None


def extract_choice(response: str) -> str | None:
    """The option letter a response commits to (``A``..``Z``), or None."""
    text = strip_thinking(response)
    if text is None:
        return None
    box = last_boxed(text)
    if box is not None:
        m = _BOX_LETTER_RE.match(clean_answer(box) + " ")
        return m.group(1) if m else None
    tail = text[-MAX_BOX_CHARS:]
    # "answer is" requires a capital letter: "the answer is a cat" must not read as option A.
    hits = [m.group(1) for m in _ANSWER_IS_RE.finditer(tail) if m.group(1).isupper()]
    if hits:
        return hits[-1]
    lines = [ln.strip() for ln in tail.strip().splitlines() if ln.strip()]
    if lines:
        m = _LINE_LETTER_RE.match(lines[-1])
        if m:
            return m.group(1)
    return None


def choice_reward(response: str, letter: str, **row) -> float:
    """1.0 if the response's option letter equals ``letter`` (``"B"``, ``"(B)"``), else 0.0."""
    gold = _gold_letter(letter)
    pred = extract_choice(response)
    if pred is None or gold is None:
        _record(_NO_ANSWER)
        return 0.0
    _record(_FAST)
    return float(pred == gold)


__all__ = ["choice_reward", "extract_choice"]
