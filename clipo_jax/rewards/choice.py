"""Multiple-choice reward: the option letter of a response against the gold letter.

Recognised answer forms, in order of preference (only text after ``</think>`` counts):
``\\boxed{B}`` / ``\\boxed{(B)}`` / ``\\boxed{B. bank}`` / ``\\boxed{\\text{B}}``, then a letter
written five times (``BBBBB``, the JudgeBench / MMLU-Pro format), then "the answer is (B)" /
"Answer: B" / "**Answer**: B", then a last line that is only ``B`` / ``(B)`` / ``B.``.  This is
the one letter reader of the project: the ``choice`` reward and OpenRS's pointwise ground-truth
check (``rubrics.pvr``) both use it.

Letters are upper case in prose ("the answer is a bit unclear" names no option); a lower-case
letter counts only where it can be nothing else: alone in a box (``\\boxed{b}``, ``\\boxed{(b)}``,
``\\boxed{b) bank}``) or alone after an explicit label (``Answer: (c)``, ``the answer is: d.``).
A hedge that names two or more different letters as the final answer (``\\boxed{A or B}``, "the
answer is A/B", "B and/or C", "A, B or C", ``\\boxed{A} or \\boxed{B}``) names none.
"""

from __future__ import annotations

import re

from clipo_jax.rewards.math import _FAST, _NO_ANSWER, MAX_BOX_CHARS, _record, clean_answer, last_boxed, strip_thinking

# Letter at the start of the box content: "B", "(B)", "B.", "B)", "B: text", "B text".
_BOX_LETTER_RE = re.compile(r"^\(?\s*([A-Z])\s*(?:\)|\.|:|\s|$)")
# A lower-case letter in a box: alone ("b", "(b)", "b."), or as a label before text ("b) bank",
# "(b) bank", "b. bank", "b: bank"); not an article or a word ("a bank", "i.e. ...").
_BOX_LOWER_RE = re.compile(r"^(?:\(\s*([a-z])\s*\)|([a-z])\s*(?:[).:](?![a-z])|$))")
# "answer is (B)", "Answer: **B**", "answer is option B", "answer: $\boxed{B": group 1 is the
# separator (a colon marks an explicit label), group 2 the letter.  Character classes instead of
# runs of optional spaces between optional marks: those backtracked polynomially on a long run of
# spaces (100 spaces after "answer is" took 25 s).
_ANSWER_IS_RE = re.compile(
    r"answer(?:\s+is)?(?:\s*option)?\**(\s*:|\s)[\s*($]*(?:\\boxed\{[\s(]*)?([A-Z])\b(?![',])", re.IGNORECASE
)
# After a lower-case letter that follows "Answer:": nothing else on the line but closing marks.
_LOWER_LINE_END_RE = re.compile(r"[ \t\r$).*}]*(?:\n|$)")
_LINE_LETTER_RE = re.compile(r"^\**\(?\s*([A-Z])\s*\)?\.?\**$")
# Hedges: a letter joined to further letters by "or" / "and" / "/" / "&" / "," ("A or B", "(A)/(C)"),
# read one joint at a time (a repeated group over optional spaces backtracks exponentially).
_CONNECTOR = r"(?:\band\s*/\s*or\b|\bor\b|\band\b|/|\\?&|,|\\lor\b|\\vee\b)"
_HEDGE_STEP_RE = re.compile(r"[\s*]*" + _CONNECTOR + r"[\s*($]*([A-Za-z])(?![A-Za-z])[\s$)]*", re.IGNORECASE)
_CLAUSE_END_RE = re.compile(r"[\s*]*(?:[.,;:!?)\]}]|\n|$)")
# A box holding one letter: \boxed{A}, \boxed{(a)}, \boxed{\text{B}} (character classes, no
# adjacent optional spaces: this runs over the whole tail).
_SINGLE_BOX_RE = re.compile(
    r"(?:\\boxed|\\fbox)\s*\{(?:\s*\\text\s*\{[\s(]*([A-Za-z])[\s)]*\}\s*|[\s(]*([A-Za-z])[\s)]*)\}"
)
# A letter written five times as a word ("BBBBB"): how JudgeBench and MMLU-Pro (options A-J) ask
# for the answer.
_FIVEFOLD_RE = re.compile(r"\b([A-J])\1{4}\b")
_BOX_JOIN_RE = re.compile(r"[\s$]*" + _CONNECTOR + r"[\s$]*", re.IGNORECASE)


def _gold_letter(letter: str) -> str | None:
    m = re.fullmatch(r"\(?\s*([A-Za-z])\s*\)?\.?", clean_answer(str(letter)).strip())
    return m.group(1).upper() if m else None


def _hedged_after(text: str, first: str, in_box: bool = False) -> bool:
    """True when ``text`` (what follows the letter ``first``) joins it to a different letter
    ("A or B", "A/B", "(A) and (C)") that ends the clause ("A or B.", "A or B, as both"): "the
    answer is B and C is wrong" names B.  In a box, capital letters need no clause end
    (``\\boxed{A or B q}``), but "B, a bank" is an option with its text, not a hedge."""
    m = re.match(r"[\s$*]*\)?", text)
    pos, letters, capitals = m.end(), {first}, True
    while (m := _HEDGE_STEP_RE.match(text, pos)) is not None:
        letters.add(m.group(1).upper())
        capitals = capitals and m.group(1).isupper()
        pos = m.end()
    if len(letters) < 2:
        return False
    return _CLAUSE_END_RE.match(text, pos) is not None or (in_box and capitals)


def _box_letter(box: str) -> str | None:
    """The option letter a box's content names (``B``, ``(b)``, ``B. bank``), None for a hedge."""
    content = clean_answer(box)
    m = _BOX_LETTER_RE.match(content + " ")
    letter = m.group(1) if m else None
    if letter is None:
        m = _BOX_LOWER_RE.match(content)
        letter = (m.group(1) or m.group(2)).upper() if m else None
    if letter is None:
        return None
    after = re.match(r"\(?\s*[A-Za-z]", content).end()
    return None if _hedged_after(content[after:], letter, in_box=True) else letter


def _boxes_hedged(text: str, letter: str) -> bool:
    """True when the last box is one of several single-letter boxes joined as alternatives
    (``\\boxed{A} or \\boxed{B}``) that name a letter other than ``letter``."""
    boxes = list(_SINGLE_BOX_RE.finditer(text))
    last_cmd = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if not boxes or boxes[-1].start() != last_cmd:
        return False
    letters = {(boxes[-1].group(1) or boxes[-1].group(2)).upper()}
    for prev, nxt in zip(reversed(boxes[:-1]), reversed(boxes[1:])):
        if not _BOX_JOIN_RE.fullmatch(text, prev.end(), nxt.start()):
            break
        letters.add((prev.group(1) or prev.group(2)).upper())
    return bool(letters - {letter})


def _fivefold_letter(tail: str, matches: list) -> str | None:
    """The last five-fold letter, or None when it ends a hedge of five-fold letters ("AAAAA or
    BBBBB") or of it and single letters ("AAAAA or B.")."""
    letters, k = {matches[-1].group(1)}, len(matches) - 1
    while k > 0 and _BOX_JOIN_RE.fullmatch(tail, matches[k - 1].end(), matches[k].start()):
        letters.add(matches[k - 1].group(1))
        k -= 1
    letter = matches[-1].group(1)
    if len(letters) > 1 and _CLAUSE_END_RE.match(tail, matches[-1].end()):
        return None
    return None if _hedged_after(tail[matches[-1].end() :], letter) else letter


def extract_choice(response: str) -> str | None:
    """The option letter a response commits to (``A``..``Z``), or None (no letter, or a hedge)."""
    text = strip_thinking(response)
    if text is None:
        return None
    box = last_boxed(text)
    if box is not None:
        letter = _box_letter(box)
        if letter is None or _boxes_hedged(text[-MAX_BOX_CHARS:], letter):
            return None
        return letter
    tail = text[-MAX_BOX_CHARS:]
    # "answer is" requires a capital letter ("the answer is a cat" must not read as option A),
    # except for a letter alone on its line after an explicit label ("Answer: (c)").
    last = None
    for m in _ANSWER_IS_RE.finditer(tail):
        letter = m.group(2)
        if letter.isupper() or (m.group(1).endswith(":") and _LOWER_LINE_END_RE.match(tail, m.end())):
            last = m
    fivefold = list(_FIVEFOLD_RE.finditer(tail))
    # the later of a five-fold letter and an answer label is the final answer
    if fivefold and (last is None or fivefold[-1].start() > last.start()):
        return _fivefold_letter(tail, fivefold)
    if last is not None:
        letter = last.group(2).upper()
        return None if _hedged_after(tail[last.end() :], letter) else letter
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
