"""Math answer reward: extract the final answer, decide equivalence, never hang.

Pipeline for one (response, ground_truth) pair:

1. ``extract_answer(response)``: text after the last ``</think>`` (an unclosed ``<think>`` means
   no answer), then the last ``\\boxed{..}`` / ``\\fbox{..}`` / ``\\boxed 5`` (brace matching,
   escaped ``\\{`` ignored; the braceless form only for a number / command / option letter),
   else a GSM8K ``#### N`` line (a numeric N only: Markdown ``#### 3. Solve`` headings are not answers).
2. ``reduce_ground_truth(gt)``: a ground truth holding ``\\boxed`` (a full solution, e.g. MATH
   train) or ``#### N`` (GSM8K) is reduced to the answer.
3. A cheap pure-Python fast path decides most pairs without sympy: normalised strings equal,
   both plain numbers (exact unless a decimal is involved; ``025`` = ``25``, ``142.0`` = ``142``,
   ``1,000`` = ``1000`` but ``81, 256`` is a list, ``50\\%`` = ``50``, degrees dropped, unit
   words after a number dropped only when nothing but unit words follows: ``5 dollars`` = ``5``,
   ``12 \\text{ pencils}`` = ``12``, ``2 hours 30 minutes`` is not ``2``), word answers
   (``\\text{Evelyn}``), option letters.  Operator words between two operands are read as
   operators (``2 times 3`` = ``2 \\times 3`` = ``6``, ``6 divided by 2`` = ``3``).
4. Otherwise ``math_verify.parse`` / ``verify`` (sympy) decides, after a pre-filter that rejects
   input sympy would choke on (long strings, deep nesting, exponent towers, huge factorials),
   under a time limit.

Time limits. CPython delivers signals only between bytecodes and only on the main thread, so a
``SIGALRM`` timer cannot stop a C-level big-integer power (``10^{10^{7}}`` takes seconds inside
one C call) and cannot be used from trainer threads at all. We therefore use three layers:

* the pre-filter (``hostile_reason``) catches the known C-level blow-ups before sympy sees them;
* on the main thread, a sub-second ``setitimer`` deadline raises a ``BaseException`` subclass, so
  math-verify's own ``except Exception`` handlers cannot swallow it (math-verify's built-in
  timeouts are integer-second ``signal.alarm`` ones and are switched off);
* by default (``isolate=True``), off the main thread, and always in ``batch_math_reward``, the
  sympy step runs in persistent worker processes (``VerifierPool``: plain ``python -c``
  subprocesses, so nothing re-imports the caller's ``__main__`` and nothing forks a process
  holding JAX threads); each worker enforces the soft deadline itself and the parent kills and
  restarts a worker that overruns ``timeout + hard_grace`` -- this bound holds even for hangs
  inside C code.

Every outcome is counted in the module-level ``STATS`` (``reward_stats()`` returns a dict).
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import logging
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
from fractions import Fraction
from typing import Sequence

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------
# Limits
# ----------------------------------------------------------------------------------------------
DEFAULT_TIMEOUT_S = 1.0  # soft per-pair limit for the sympy step
MAX_BOX_CHARS = 10_000  # a box longer than this is treated as unbalanced / not an answer
MAX_BOX_CANDIDATES = 32  # how many (unbalanced) trailing boxes we try before giving up
MAX_VERIFY_CHARS = 400  # answers longer than this never reach sympy
MAX_NESTING = 24  # bracket depth above this never reaches sympy
MAX_EXPONENT = 10_000  # numeric exponent literal above this never reaches sympy
MAX_FACTORIAL = 2_000
MAX_NUMBER_CHARS = 60  # plain numbers longer than this are compared as strings, not as numbers


# ----------------------------------------------------------------------------------------------
# Stats
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class RewardStats:
    """Counters for every verification outcome (thread-safe increments)."""

    calls: int = 0
    no_answer: int = 0  # no box / #### found, or unclosed <think>
    fast_path: int = 0  # decided without sympy
    verifier_calls: int = 0  # reached math-verify
    prefiltered: int = 0  # rejected as hostile before sympy (reward 0)
    timeouts: int = 0  # soft deadline hit (reward 0)
    hard_kills: int = 0  # a worker process overran the hard deadline and was killed (reward 0)
    parse_failures: int = 0  # math-verify could not parse one side (reward 0)

    def __post_init__(self):
        self._lock = threading.Lock()

    def add(self, field: str, n: int = 1) -> None:
        with self._lock:
            setattr(self, field, getattr(self, field) + n)

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def reset(self) -> None:
        with self._lock:
            for f in dataclasses.fields(self):
                setattr(self, f.name, 0)


STATS = RewardStats()


def reward_stats() -> dict[str, int]:
    """Snapshot of the module counters (calls, timeouts, parse_failures, prefiltered, ...)."""
    return STATS.as_dict()


def reset_reward_stats() -> None:
    STATS.reset()


# Status codes returned by the decision functions; each maps to one STATS field.
_FAST, _VERIFIED, _PREFILTERED, _TIMEOUT, _HARD_KILL, _PARSE_FAIL, _NO_ANSWER = (
    "fast_path",
    "verifier_calls",
    "prefiltered",
    "timeouts",
    "hard_kills",
    "parse_failures",
    "no_answer",
)


def _record(status: str) -> None:
    STATS.add("calls")
    STATS.add(status)
    if status in (_TIMEOUT, _HARD_KILL, _PARSE_FAIL):
        STATS.add("verifier_calls")


# ----------------------------------------------------------------------------------------------
# Extraction
# ----------------------------------------------------------------------------------------------
_BOX_CMDS = ("\\boxed", "\\fbox")


def strip_thinking(text: str) -> str | None:
    """Text after the last ``</think>``; None if a ``<think>`` block was never closed."""
    end = text.rfind("</think>")
    if end >= 0:
        return text[end + len("</think>") :]
    if "<think>" in text:
        return None
    return text


def _match_braces(text: str, open_pos: int) -> int | None:
    """Index of the ``}`` closing the ``{`` at ``open_pos`` (``\\{``/``\\}`` skipped), or None."""
    depth = 0
    i = open_pos
    limit = min(len(text), open_pos + MAX_BOX_CHARS + 2)
    while i < limit:
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def _braceless_ok(token: str) -> bool:
    """True when the token after a braceless ``\\boxed `` can be an answer: ``5``, ``-2``, ``.5``,
    ``\\frac12``, an option letter ``B`` / ``(B)`` / ``B.``; not a prose word (``as``)."""
    return token[0] in "0123456789+-.\\" or re.fullmatch(r"\(?[A-Z][.)]?", token) is not None


def last_boxed(text: str) -> str | None:
    """Content of the last balanced ``\\boxed{..}`` / ``\\fbox{..}`` / ``\\boxed 5`` in ``text``.

    "Last" means the box whose command starts last, so nested boxes give the innermost one, and
    a trailing unbalanced (truncated) box is skipped in favour of the previous balanced one.
    Only the tail from each candidate is scanned, so megabyte strings cost little.
    """
    end = len(text)
    for _ in range(MAX_BOX_CANDIDATES):
        pos, cmd = max((text.rfind(c, 0, end), c) for c in _BOX_CMDS)
        if pos < 0:
            return None
        end = pos
        j = pos + len(cmd)
        if j < len(text) and text[j].isalpha():  # \boxedfoo, \fboxsep: another command
            continue
        k = j
        while k < len(text) and text[k] in " \t":
            k += 1
        if k < len(text) and text[k] == "{":
            close = _match_braces(text, k)
            if close is not None:
                return text[k + 1 : close]
            continue
        if k > j:  # "\boxed 5": the token up to whitespace or '$'
            m = re.match(r"[^\s$]+", text[k : k + MAX_BOX_CHARS])
            # Only a token that reads as an answer (a number, a sign, a command, an option letter);
            # "\boxed as requested" is prose that mentions the command, not a box.
            if m and _braceless_ok(m.group(0)):
                return m.group(0)
    return None


# A GSM8K "#### N" answer line: the marker followed by a numeric payload only (sign, "$", thousands
# commas, decimals, a fraction, "%", one lower-case unit word, a closing period). Markdown headings
# ("#### 3. Solve for x", "#### 4) Final check") are not answer markers.
_HASH_NUM = (
    r"[-+]?[ \t]*(?:\\?\$[ \t]*)?[-+]?"
    r"(?:\\[dt]?frac\{-?\d+\}\{\d+\}|(?:\d[\d,]*(?:\.\d+)?|\.\d+)(?:[ \t]*/[ \t]*\d+)?)"
    r"(?:[ \t]*\\?%|[ \t]*[a-z]+)?[ \t]*\.?"
)
_HASH_RE = re.compile(r"####\s*(" + _HASH_NUM + r")[ \t\r]*$", re.MULTILINE)
_HASH_GOLD_RE = re.compile(r"####\s*([^\n]*)")  # ground truths are authored data: any payload


def extract_answer(response: str) -> str | None:
    """Final answer of a model response: last box after ``</think>``, else ``#### N``."""
    text = strip_thinking(response)
    if text is None:
        return None
    box = last_boxed(text)
    if box is not None:
        return box
    hashes = _HASH_RE.findall(text[-MAX_BOX_CHARS:])
    if hashes and hashes[-1].strip():
        return hashes[-1].strip()
    return None


def reduce_ground_truth(ground_truth: str) -> str:
    """A ground truth holding ``\\boxed`` or ``#### N`` reduced to the answer itself."""
    gt = str(ground_truth).strip()
    if any(c in gt for c in _BOX_CMDS):
        box = last_boxed(gt)
        if box is not None:
            return box.strip()
    if "####" in gt:
        hashes = _HASH_GOLD_RE.findall(gt)
        if hashes and hashes[-1].strip():
            return hashes[-1].strip()
    return gt


# ----------------------------------------------------------------------------------------------
# Normalisation (what math-verify does not cover, and what lets us skip sympy)
# ----------------------------------------------------------------------------------------------
_TEXT_CMDS = ("\\text", "\\textbf", "\\textit", "\\mathrm", "\\mathbf", "\\mbox", "\\textnormal", "\\operatorname")
_UNIT_WORDS = (
    "cm|mm|km|m|meters?|metres?|centimeters?|inches|inch|in|feet|foot|ft|yards?|miles?|mi|"
    "kg|g|grams?|kilograms?|pounds?|lbs?|lb|oz|ounces?|liters?|litres?|l|ml|gallons?|"
    "seconds?|secs?|s|minutes?|mins?|hours?|hrs?|h|days?|weeks?|months?|years?|"
    "dollars?|cents?|euros?|degrees?|units?|sq|square|cubic|percent|mph|people|students|apples|"
    "points?|pages?|cookies|books|marbles|eggs|boxes|times"
)
_UNIT_RE = re.compile(r"(?:" + _UNIT_WORDS + r")", re.IGNORECASE)
# "<number> <unit words>": the unit words are dropped only when they cannot change the value.
# The tail is letter words (``m^2``, ``sq.``, ``km/h`` allowed), no numbers other than exponents,
# and none of the words below: operators (``2 times 3``, ``6 divided by 2``), number words and
# joiners of a second quantity (``2 hours and a half``), ``of`` (``2 percent of x``).
_UNIT_TAIL_RE = re.compile(r"^(?P<num>[-+]?[\d.,/]+)\s*(?P<tail>[A-Za-z].*)$")
_UNIT_TOKEN = r"[A-Za-z]+\.?(?:\^\{?-?\d{1,2}\}?)?"
_UNIT_TAIL_OK_RE = re.compile(_UNIT_TOKEN + r"(?:(?:\s+|\s*/\s*)" + _UNIT_TOKEN + r")*")
_VALUE_WORDS = frozenset(
    "times plus minus over divided by multiplied add added subtract subtracted less more fewer than of and "
    "point mod modulo power root factorial exp log sqrt half halves quarter quarters third thirds dozen dozens "
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty thirty forty fifty sixty seventy eighty ninety hundred hundreds "
    "thousand thousands million millions billion billions trillion trillions".split()
)
# Operator words between two operands read as the operator: "2 times 3" is 2 \times 3 (= 6), as
# sympy reads the LaTeX; "3 times" alone stays a count (a unit word, dropped).
_WORD_OPS = (
    ("multiplied by", "\\times"),
    ("times", "\\times"),
    ("plus", "+"),
    ("minus", "-"),
    ("divided by", "/"),
    ("over", "/"),
)
_WORD_OP_RE = re.compile(
    r"(?<=[\d})])\s+(" + "|".join(w.replace(" ", r"\s+") for w, _ in _WORD_OPS) + r")\s+(?=[-+]?[\d(\\])",
    re.IGNORECASE,
)
_FRAC_SHORT_RE = re.compile(r"\\frac\s*(\d)\s*(\d)")
_FRAC_HALF_SHORT_RE = re.compile(r"\\frac\s*\{([^{}]*)\}\s*(\d)")
_FRAC_HALF_SHORT2_RE = re.compile(r"\\frac\s*(\d)\s*\{")
_THOUSANDS_RE = re.compile(r"^[-+]?\d{1,3}(,\d{3})+(\.\d+)?$")
_NUMBER_RE = re.compile(r"^[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?$")
_LATEX_FRAC_NUM_RE = re.compile(r"^(-?)\\frac\{(-?\d+)\}\{(-?\d+)\}$")
_SLASH_NUM_RE = re.compile(r"^(-?\d+)/(\d+)$")
_SPACING_RE = re.compile(r"(?<!\\)\\[!,;: ]")
_WORDS_RE = re.compile(r"^[A-Za-z][A-Za-z '\-]*[A-Za-z]$")
# A token of an algebraic answer written in letters only: one lower-case letter (``p - q``) or
# lower-case letters without a vowel (``xy``, ``pq``, a product of variables).
_ALGEBRA_TOKEN_RE = re.compile(r"[a-z]|[b-df-hj-np-tv-z]+")
# Digit groups joined by a LaTeX thin space, with or without a comma: ``11,\! 111``, ``1\,000``.
_THIN_SEP_RE = re.compile(r"(?<=\d),?[ \t]*(?:\\[!,;: ]|~)[ \t]*(?=\d{3}(?!\d))")
# A plain number followed only by \text{...} words (``12 \text{ pencils}``): the words are dropped
# when they cannot change the value (see ``_drop_trailing_text``).
_TRAILING_TEXT_RE = re.compile(
    r"^(?P<num>(?:[A-Za-z](?:_\{?\w+\}?)?\s*=\s*)?[-+]?\s*"
    r"(?:\d[\d,]*(?:\.\d*)?|\.\d+|\\frac\{-?\d+\}\{\d+\})(?:\s*/\s*\d+)?)"
    r"\s*(?P<texts>(?:\\(?:text|textnormal|textrm|mbox|mathrm)\s*\{[^{}]*\}\s*)+)\.?\s*$"
)
_TEXT_WORDS_RE = re.compile(r"[A-Za-z][A-Za-z\s.'\-]*")
_SCI_RE = re.compile(r"^([-+]?(?:\d+(?:\.\d*)?|\.\d+))\\(?:times|cdot)10\^(?:\{([-+]?\d+)\}|(\d))$")
_VAR_EQ_RE = re.compile(r"^[A-Za-z](?:_\{?\w+\}?)?\s*=\s*(?=[^=])")


def _unwrap_text(s: str) -> str:
    """``\\text{abc}`` -> ``abc`` (and friends), brace-aware, repeated."""
    for cmd in _TEXT_CMDS:
        start = 0
        while True:
            i = s.find(cmd + "{", start)
            if i < 0:
                break
            if i + len(cmd) < len(s) and s[i + len(cmd)] != "{":
                start = i + 1
                continue
            close = _match_braces(s, i + len(cmd))
            if close is None:
                break
            s = s[:i] + s[i + len(cmd) + 1 : close] + s[close + 1 :]
            start = i
    return s


def _drop_trailing_text(s: str) -> str:
    """``12 \\text{ pencils}`` -> ``12``: a number followed only by ``\\text{}`` words loses the words
    unless one of them can change the value (``5 \\text{ million}``, ``2 \\text{ times}``...)."""
    m = _TRAILING_TEXT_RE.match(s)
    if not m:
        return s
    words = " ".join(re.findall(r"\{([^{}]*)\}", m.group("texts"))).strip()
    if not _TEXT_WORDS_RE.fullmatch(words):
        return s
    if any(t.lower() in _VALUE_WORDS for t in re.findall(r"[A-Za-z]+", words)):
        return s
    return m.group("num").strip()


def _word_op(word: str) -> str:
    key = " ".join(word.lower().split())
    return next(sym for w, sym in _WORD_OPS if w == key)


def _unit_tail_ok(tail: str) -> bool:
    """True when ``tail`` (what follows the number) is only unit words, so dropping it keeps the value."""
    tail = tail.strip()
    if not _UNIT_TAIL_OK_RE.fullmatch(tail):
        return False
    toks = [t.lower() for t in re.findall(r"[A-Za-z]+", tail)]
    if not _UNIT_RE.fullmatch(toks[0]):
        return False
    if toks == ["times"]:  # "3 times": a count
        return True
    return not any(t in _VALUE_WORDS for t in toks)


def clean_answer(s: str) -> str:
    """Semantics-preserving LaTeX cleanup; keeps spaces (``\\pi r`` must not become ``\\pir``)."""
    return _clean(s, thousands=True)


def _clean(s: str, thousands: bool) -> str:
    """``clean_answer``; ``thousands=False`` keeps commas (``1,000`` stays ``1,000``)."""
    s = s.strip()
    # Outer math delimiters.
    for a, b in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if s.startswith(a) and s.endswith(b) and len(s) >= len(a) + len(b):
            s = s[len(a) : len(s) - len(b)].strip()
    s = s.replace("\\left", "").replace("\\right", "")
    s = _THIN_SEP_RE.sub(",", s)  # thousands separators first: 11,\! 111 and 1\,000 are numbers
    # Spacing commands; the look-behind keeps a row break "\\\\ " intact.
    s = _SPACING_RE.sub(lambda m: "" if m.group(0) == "\\!" else " ", s).replace("~", " ")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("\\cfrac", "\\frac")
    s = s.replace("\\displaystyle", "")
    s = _FRAC_SHORT_RE.sub(r"\\frac{\1}{\2}", s)
    s = _FRAC_HALF_SHORT_RE.sub(r"\\frac{\1}{\2}", s)
    s = _FRAC_HALF_SHORT2_RE.sub(r"\\frac{\1}{", s)
    # A degree / percent sign before a comma makes it a list separator: 45^\circ,135^\circ.
    if re.search(r"(?:\\circ|°|\\degree|%)\s*\}?\s*,", s):
        thousands = False
    # Degrees and percent carry no value information for the answers we grade.
    for deg in ("^{\\circ}", "^\\circ", "^{\\circ }", "\\circ", "°", "^\\degree", "\\degree"):
        s = s.replace(deg, "")
    s = s.replace("\\%", "").replace("%", "")
    s = s.replace("\\$", "").replace("$", "")
    s = _drop_trailing_text(s.strip())
    s = _unwrap_text(s)
    s = s.strip().rstrip(".").strip()
    s = _VAR_EQ_RE.sub("", s, count=1)
    s = _WORD_OP_RE.sub(lambda m: " " + _word_op(m.group(1)) + " ", s)
    m = _UNIT_TAIL_RE.match(s)
    if m and _unit_tail_ok(m.group("tail")):
        s = m.group("num")
    # Thousands separators only as "1,000" / "1,234,567": a comma followed by a space separates
    # list items ("81, 256" is two numbers, never 81256).
    s = re.sub(r"^([-+])\s+(?=\d)", r"\1", s.strip())
    if thousands and _THOUSANDS_RE.match(s):
        s = s.replace(",", "")
    return s.strip()


def answer_key(s: str, thousands: bool = True) -> str:
    """String key for exact comparison: cleaned, whitespace-free except one space between two
    digits (``1 2`` is two numbers, not ``12``); ``thousands=False`` keeps commas as written."""
    key = re.sub(r"(?<=\d)\s+(?=\d)", "\0", _clean(s, thousands=thousands))
    return re.sub(r"\s+", "", key).replace("\0", " ")


def _list_key(s: str) -> str:
    """``answer_key`` with commas kept as written (no thousands reading)."""
    return answer_key(s, thousands=False)


def to_number(s: str) -> Fraction | None:
    """A plain number (int with leading zeros, decimal, ``a/b``, ``\\frac{a}{b}``) or None."""
    k = answer_key(s)
    if not k or len(k) > MAX_NUMBER_CHARS:
        return None
    try:
        if _NUMBER_RE.match(k):
            if "e" in k.lower():
                mant, exp = re.split("[eE]", k)
                if abs(int(exp)) > 100:
                    return None
                return Fraction(mant) * Fraction(10) ** int(exp)
            return Fraction(k)
        m = _LATEX_FRAC_NUM_RE.match(k)
        if m:
            v = Fraction(int(m.group(2)), int(m.group(3)))
            return -v if m.group(1) else v
        m = _SLASH_NUM_RE.match(k)
        if m:
            return Fraction(int(m.group(1)), int(m.group(2)))
        m = _SCI_RE.match(k)  # 4\times10^{-5}, as TheoremQA golds write 4e-05
        if m:
            exp = int(m.group(2) or m.group(3))
            if abs(exp) > 100:
                return None
            return Fraction(m.group(1)) * Fraction(10) ** exp
    except (ValueError, ZeroDivisionError):
        return None
    return None


def numbers_equal(a: Fraction, b: Fraction, *, approx: bool = False) -> bool:
    """Exact; with ``approx`` (a decimal is involved) also equal to 1e-9 relative (decimal
    renderings of the same value). Integers and fractions compare exactly: 1234567890 != 1234567891."""
    return a == b or (approx and abs(a - b) <= Fraction(1, 10**9) * max(1, abs(b)))


def _is_decimal(key: str) -> bool:
    """True when the number with ``answer_key`` ``key`` is a decimal or in scientific notation."""
    return "." in key or "e" in key.lower() or "\\times" in key or "\\cdot" in key


def _as_letter(s: str) -> str | None:
    """An option letter ``B``, ``(B)``, ``B.`` -> ``B``; anything else -> None."""
    m = re.fullmatch(r"\(?\s*([A-Z])\s*\)?\s*[.:]?", answer_key(s))
    return m.group(1) if m else None


def _is_words(s: str) -> bool:
    """A word answer (``Evelyn``, ``odd``, ``two lines``), compared as a string: sympy would read it
    as a product of symbols (anagrams match). Letters-only algebra is not words: ``p - q`` (a spaced
    minus, or single-letter tokens) and ``xy`` (vowel-free lower-case tokens) go to sympy."""
    if not _WORDS_RE.match(s) or "\\" in s:
        return False
    if re.search(r"\s-|-\s", s):
        return False
    return not all(_ALGEBRA_TOKEN_RE.fullmatch(t) for t in re.split(r"[\s\-']+", s) if t)


# ----------------------------------------------------------------------------------------------
# Hostile-input pre-filter
# ----------------------------------------------------------------------------------------------
_EXP_RE = re.compile(r"(\^|\*\*)\s*")
_FACT_RE = re.compile(r"(\d+)\s*!")


def _operand_after(s: str, i: int) -> str:
    """The exponent operand starting at ``i``: a brace/paren group or one token."""
    if i >= len(s):
        return ""
    if s[i] in "{(":
        depth = 0
        for j in range(i, len(s)):
            if s[j] in "{(":
                depth += 1
            elif s[j] in "})":
                depth -= 1
                if depth == 0:
                    return s[i + 1 : j]
        return s[i + 1 :]
    m = re.match(r"\d+(\.\d+)?|\\?[A-Za-z]+|.", s[i:])
    return m.group(0) if m else ""


def _numeric_value(op: str) -> float | None:
    return float(op) if re.fullmatch(r"[-+]?\d{1,30}(\.\d+)?", op) else None


def hostile_reason(s: str) -> str | None:
    """Why ``s`` must not reach sympy (too long, too deep, exponent tower...), or None."""
    if len(s) > MAX_VERIFY_CHARS:
        return f"longer than {MAX_VERIFY_CHARS} chars"
    depth = max_depth = 0
    for c in s:
        if c in "{([":
            depth += 1
            max_depth = max(max_depth, depth)
        elif c in "})]":
            depth -= 1
    if max_depth > MAX_NESTING:
        return f"nesting deeper than {MAX_NESTING}"
    for m in _EXP_RE.finditer(s):
        op = _operand_after(s, m.end()).replace(" ", "")
        if re.fullmatch(r"[-+]?\d+(\.\d+)?", op):
            if abs(float(op)) > MAX_EXPONENT:
                return f"exponent {op[:20]} larger than {MAX_EXPONENT}"
        elif ("^" in op or "**" in op) and not re.search(r"[a-zA-Z]", op.replace("\\left", "").replace("\\right", "")):
            return "numeric exponent tower"
        # A power applied to a power, (a^b)^c, multiplies the exponents.
        after = m.end() + len(op) + (2 if s[m.end() : m.end() + 1] in "{(" else 0)
        rest = re.match(r"(?:[\s)}\]]|\\right)*(\^|\*\*)\s*", s[after : after + 64])
        if rest:
            op2 = _operand_after(s, after + rest.end()).replace(" ", "")
            e1, e2 = _numeric_value(op), _numeric_value(op2)
            if e1 is None or e2 is None or abs(e1 * e2) > MAX_EXPONENT:
                if not (re.search(r"[a-zA-Z]", op) and re.search(r"[a-zA-Z]", op2)):
                    return "chained exponents"
    for m in _FACT_RE.finditer(s):
        if len(m.group(1)) > 6 or int(m.group(1)) > MAX_FACTORIAL:
            return f"factorial of {m.group(1)[:20]}"
    return None


# ----------------------------------------------------------------------------------------------
# Deadlines
# ----------------------------------------------------------------------------------------------
class _Deadline(BaseException):
    """Raised by our SIGALRM handler; a BaseException so library ``except Exception`` misses it."""


def _on_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer")


def _run_with_deadline(fn, seconds: float):
    """Run ``fn()`` on the main thread under a ``setitimer`` deadline; raises ``_Deadline``."""

    def handler(signum, frame):
        raise _Deadline()

    old_handler = signal.signal(signal.SIGALRM, handler)
    old_delay, _ = signal.setitimer(signal.ITIMER_REAL, seconds)
    start = time.monotonic()
    try:
        return fn()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old_handler)
        if old_delay > 0:  # re-arm an outer timer someone else had running
            signal.setitimer(signal.ITIMER_REAL, max(1e-3, old_delay - (time.monotonic() - start)))


# ----------------------------------------------------------------------------------------------
# Decisions
# ----------------------------------------------------------------------------------------------
def fast_decision(pred: str, gold: str) -> float | None:
    """1.0 / 0.0 when the pure-Python rules can decide, else None (needs sympy)."""
    kp, kg = answer_key(pred), answer_key(gold)
    if not kp:
        return 0.0
    if kp == kg:
        return 1.0
    if ("," in pred or "," in gold) and _list_key(pred) == _list_key(gold):
        return 1.0  # the same digits and commas, one side read as thousands: "81,256" / "81, 256"
    lg = _as_letter(gold)
    if lg is not None:
        return float(_as_letter(pred) == lg)
    np_, ng = to_number(pred), to_number(gold)
    if np_ is not None and ng is not None:
        return float(numbers_equal(np_, ng, approx=_is_decimal(kp) or _is_decimal(kg)))
    cg = clean_answer(gold)
    if _is_words(cg):  # sympy would read "Evelyn" as a product of symbols (anagrams match)
        return float(clean_answer(pred).lower() == cg.lower())
    if ng is not None and not re.search(r"[\d\\]", kp):  # number vs. letters-only text
        return 0.0
    return None


def _sympy_equal(pred: str, gold: str) -> tuple[float, str]:
    """math-verify on cleaned strings; no timeout of its own (callers provide one)."""
    from math_verify import parse, verify  # heavy import (sympy), so deferred

    g = parse("$" + clean_answer(gold) + "$", parsing_timeout=None)
    p = parse("$" + clean_answer(pred) + "$", parsing_timeout=None)
    if not g or not p:
        return 0.0, _PARSE_FAIL
    return float(verify(g, p, timeout_seconds=None)), _VERIFIED


def _decide_in_process(pred: str, gold: str, timeout: float) -> tuple[float, str]:
    """The sympy step on the current (main) thread under a signal deadline."""
    try:
        return _run_with_deadline(lambda: _sympy_equal(pred, gold), timeout)
    except _Deadline:
        return 0.0, _TIMEOUT


def _decide_answers(pred: str | None, gold: str) -> tuple[float | None, str]:
    """Fast path + pre-filter; returns (reward, status) or (None, '') if sympy is needed."""
    if pred is None:
        return 0.0, _NO_ANSWER
    if len(pred) > MAX_VERIFY_CHARS or len(gold) > MAX_VERIFY_CHARS:
        # Too long for our regex normalisation or sympy: only verbatim equality counts.
        if pred.strip() == gold.strip() and pred.strip():
            return 1.0, _FAST
        return 0.0, _PREFILTERED
    fast = fast_decision(pred, gold)
    if fast is not None:
        return fast, _FAST
    if hostile_reason(pred) is not None or hostile_reason(gold) is not None:
        return 0.0, _PREFILTERED
    return None, ""


# Imported eagerly so the (slow, ~1 s) sympy import never eats into a deadline. Also quiet
# math-verify's one-time "timeout disabled" warning: we supply our own deadline.
try:
    import math_verify  # noqa: F401
    import math_verify.grader as _mvg
    import math_verify.parser as _mvp

    _mvg.TIMEOUT_WARNING_SHOWN = True
    _mvp.TIMEOUT_WARNING_SHOWN = True
except Exception:  # pragma: no cover - math-verify missing: the import error surfaces on use
    pass


def math_reward(
    response: str, ground_truth: str, *, timeout: float = DEFAULT_TIMEOUT_S, isolate: bool = True, **row
) -> float:
    """1.0 if the response's final answer equals the ground truth, else 0.0.

    ``response``: model output (``<think>..</think>`` allowed, answer in ``\\boxed{}``).
    ``ground_truth``: an answer, a full solution with ``\\boxed``, or a GSM8K ``#### N`` string.
    Never raises on bad input. Pairs the pure-Python fast path cannot decide go to sympy: with
    ``isolate=True`` (default) in a shared worker process with a hard deadline (``timeout`` +
    2 s, even for C-level hangs; the first such call starts the worker, ~2 s); with
    ``isolate=False`` in this process under a signal deadline (main thread only, cheaper by the
    IPC round trip, but a C-level big-number operation that slips past the pre-filter can
    overrun). Off the main thread the worker is always used.
    """
    gold = reduce_ground_truth(ground_truth)
    pred = extract_answer(response)
    reward, status = _decide_answers(pred, gold)
    if reward is None:
        if not isolate and _on_main_thread():
            reward, status = _decide_in_process(pred, gold, timeout)
        else:
            reward, status = _shared_pool(1, timeout).decide([(pred, gold)])[0]
    _record(status)
    return reward


# "The answer is <clause>": the clause ends at a line break, "!", "?", ";", a full stop (not a
# decimal point) or ", " (not a thousands comma).
_ANSWER_IS_CLAUSE_RE = re.compile(r"answer is[:\s]*", re.IGNORECASE)
_ANSWER_CLAUSE_END_RE = re.compile(r"\n|[!?;]|\.(?!\d)|,\s")
_LEAD_NUMBER_RE = re.compile(r"\s*(?:\\?\$\s*)?([-+]?[\d,]*\.?\d+)")
_ARITHMETIC_RE = re.compile(r"[-+*/^\u00d7\u00f7]|\\(?:times|cdot|div|frac)")
# an operator right after the clause's leading number: the clause opens with an expression
_LEAD_OP_RE = re.compile(r"\s*(?:[-+*/^\u00d7\u00f7]|[xX](?![A-Za-z])|\\(?:times|cdot|div|frac))")


def _answer_clause_number(clause: str) -> str | None:
    """The number an answer clause states. A clause that opens with an expression (an operator
    right after its leading number) or with ``x =`` states the value side of its equation, as the
    math verifier reads one (the last side that is a number, not an expression): ``8`` for
    ``5 + 3 = 8``, ``2 * 4 = 8 cookies`` and ``x = 8``. Otherwise the answer leads: ``60`` for
    ``60 minutes = 1 hour``, ``4`` for ``4 because the price = $2``, ``18`` for ``18 dollars per
    2 weeks``; with no value side (``5 + 3``) the leading number too. None when it states no number."""
    sides = clause.split("=")
    lead = _LEAD_NUMBER_RE.match(sides[0])
    if lead is None and not (len(sides) > 1 and re.fullmatch(r"\s*[A-Za-z]\s*", sides[0])):
        return None
    if lead is not None and (len(sides) == 1 or not _LEAD_OP_RE.match(sides[0], lead.end())):
        return lead.group(1)  # the answer leads: "60 minutes = 1 hour", "4 because price = $2"
    values = []
    for side in sides:
        m = _LEAD_NUMBER_RE.match(side)
        if m and not _ARITHMETIC_RE.search(side, m.end()):
            values.append(m.group(1))
    if values:
        return values[-1]
    return lead.group(1) if lead else None


def _answer_is_number(text: str) -> str | None:
    """The number stated by the last "the answer is ..." clause of ``text`` that states one."""
    for m in reversed(list(_ANSWER_IS_CLAUSE_RE.finditer(text))):
        end = _ANSWER_CLAUSE_END_RE.search(text, m.end())
        number = _answer_clause_number(text[m.end() : end.start() if end else len(text)])
        if number is not None:
            return number
    return None


def gsm8k_reward(response: str, ground_truth: str, **row) -> float:
    """GSM8K-style numeric reward: answer from a box, ``#### N`` or "the answer is N" (of an
    equation there, the value side: "the answer is 5 + 3 = 8" states 8).

    Compares numbers only (no sympy), so it is cheap and cannot hang.
    """
    gold = reduce_ground_truth(ground_truth)
    text = strip_thinking(response)
    pred = extract_answer(response) if text is not None else None
    if pred is None and text is not None:
        pred = _answer_is_number(text[-MAX_BOX_CHARS:])
    if pred is None:
        _record(_NO_ANSWER)
        return 0.0
    a, b = to_number(pred), to_number(gold)
    _record(_FAST)
    if a is None or b is None:
        return float(answer_key(pred) == answer_key(gold) and bool(answer_key(gold)))
    return float(numbers_equal(a, b, approx=_is_decimal(answer_key(pred)) or _is_decimal(answer_key(gold))))


# ----------------------------------------------------------------------------------------------
# Worker processes (hard deadlines, thread-safe, parallel)
# ----------------------------------------------------------------------------------------------
# Representative comparisons a fresh process runs once before it takes deadlines: the first
# symbolic comparison of a process builds sympy / math-verify state lazily (about 0.3 s on a
# 2-core host), which would otherwise be charged to the first real pair's deadline.
_WARM_UP_PAIRS = (
    ("x+1", "1+x"),
    ("y^2+2y+1", "(y+1)^2"),
    ("\\frac{\\sqrt{2}}{2}", "\\sqrt2/2"),
    ("(1,2)", "(2, 1)"),
    ("\\{1,2\\}", "\\{2,1\\}"),
    ("[0,5]", "(0,5]"),
)


def _warm_up() -> None:
    """Run ``_WARM_UP_PAIRS`` through math-verify (no deadline: fixed, benign input)."""
    for pred, gold in _WARM_UP_PAIRS:
        try:
            _sympy_equal(pred, gold)
        except Exception:  # noqa: BLE001 - warming is best effort
            pass


def _worker_stdio(timeout: float) -> None:
    """Worker loop on stdin/stdout: JSON ``[idx, pred, gold]`` in, ``[idx, reward, status]`` out.

    Runs as ``python -c`` on its own main thread, so the signal deadline works here.
    """
    import json
    import sys

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and kills us
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    out = sys.stdout
    _warm_up()
    out.write("ready\n")  # imports (sympy) done and warm: deadlines start counting from here
    out.flush()
    for line in sys.stdin:
        idx, pred, gold = json.loads(line)
        try:
            reward, status = _decide_in_process(pred, gold, timeout)
        except Exception:  # noqa: BLE001 - a library failure scores 0, it must not kill the loop
            reward, status = 0.0, _PARSE_FAIL
        out.write(json.dumps([idx, reward, status]) + "\n")
        out.flush()


class _Worker:
    """One ``python -c`` child process with a line-buffered reply pipe."""

    def __init__(self, timeout: float, startup_timeout: float):
        pkg_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (pkg_root, env.get("PYTHONPATH")) if p)
        code = f"from clipo_jax.rewards.math import _worker_stdio; _worker_stdio({timeout!r})"
        # A plain subprocess, not multiprocessing: no re-import of the caller's __main__ and no
        # fork of a process that may hold JAX threads.
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, bufsize=0
        )
        self._buf = b""
        line = self.read_line(startup_timeout)
        if line != "ready":
            self.kill()
            raise RuntimeError(f"math verifier worker did not start within {startup_timeout:.0f}s (got {line!r})")

    def fileno(self) -> int:
        return self.proc.stdout.fileno()

    def send(self, obj) -> None:
        self.proc.stdin.write((json.dumps(obj) + "\n").encode())

    def has_line(self) -> bool:
        return b"\n" in self._buf

    def read_available(self) -> bool:
        """Read what the pipe holds; False on EOF (the worker died)."""
        chunk = os.read(self.fileno(), 65536)
        self._buf += chunk
        return bool(chunk)

    def pop_line(self) -> str:
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode()

    def read_line(self, timeout: float) -> str | None:
        deadline = time.monotonic() + timeout
        while not self.has_line():
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self], [], [], left)[0]:
                return None
            if not self.read_available():
                return None
        return self.pop_line()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass


class VerifierPool:
    """Persistent worker processes that run the sympy step with hard deadlines.

    Each worker enforces ``timeout`` itself (signal timer on its own main thread); if it does not
    answer within ``timeout + hard_grace`` seconds (a C-level hang the signal could not break)
    the parent kills it, scores the pair 0 (status ``hard_kills``) and starts a replacement.
    Workers start lazily (about 1-2 s each: the sympy import and a warm-up of a few comparisons,
    so a worker's first pair is not charged sympy's one-time set-up) and are reused across calls.
    """

    def __init__(
        self,
        num_workers: int = 2,
        timeout: float = DEFAULT_TIMEOUT_S,
        hard_grace: float = 2.0,
        startup_timeout: float = 120.0,
    ):
        if num_workers < 1:
            raise ValueError(f"VerifierPool: num_workers must be >= 1, got {num_workers}")
        self.num_workers, self.timeout, self.hard_grace = num_workers, timeout, hard_grace
        self.startup_timeout = startup_timeout
        self._workers: list[_Worker | None] = [None] * num_workers
        self._lock = threading.Lock()  # one batch at a time per pool

    def _get(self, i: int) -> _Worker:
        w = self._workers[i]
        if w is None or w.proc.poll() is not None:
            if w is not None:
                w.kill()
            w = self._workers[i] = _Worker(self.timeout, self.startup_timeout)
        return w

    def _kill(self, i: int) -> None:
        if self._workers[i] is not None:
            self._workers[i].kill()
        self._workers[i] = None

    def decide(self, pairs: Sequence[tuple[str, str]]) -> list[tuple[float, str]]:
        """[(reward, status)] for (pred, gold) pairs, in order."""
        results: list[tuple[float, str] | None] = [None] * len(pairs)
        with self._lock:
            todo = list(range(len(pairs)))[::-1]
            busy: dict[int, tuple[int, float]] = {}  # worker -> (pair index, deadline)
            while todo or busy:
                for i in range(self.num_workers):
                    if i in busy or not todo:
                        continue
                    w = self._get(i)
                    k = todo.pop()
                    try:
                        w.send([k, pairs[k][0], pairs[k][1]])
                    except OSError:  # died between tasks: restart and retry this pair
                        self._kill(i)
                        todo.append(k)
                        continue
                    busy[i] = (k, time.monotonic() + self.timeout + self.hard_grace)
                if not busy:
                    continue
                wait_s = max(0.0, min(d for _, d in busy.values()) - time.monotonic())
                ready = select.select([self._workers[i] for i in busy], [], [], wait_s)[0]
                for w in ready:
                    i = self._workers.index(w)
                    alive = w.read_available()
                    if w.has_line():
                        k, reward, status = json.loads(w.pop_line())
                        results[k] = (float(reward), status)
                        del busy[i]
                    elif not alive:  # worker died (e.g. out of memory)
                        results[busy.pop(i)[0]] = (0.0, _HARD_KILL)
                        self._kill(i)
                now = time.monotonic()
                for i, (k, deadline) in list(busy.items()):
                    if now >= deadline:
                        logger.warning(
                            "math verifier worker %d overran %.1fs; killed", i, self.timeout + self.hard_grace
                        )
                        results[k] = (0.0, _HARD_KILL)
                        self._kill(i)
                        del busy[i]
        return results  # type: ignore[return-value]

    def close(self) -> None:
        for i in range(self.num_workers):
            self._kill(i)


_POOLS: dict[tuple[int, float], VerifierPool] = {}
_POOLS_LOCK = threading.Lock()


def _shared_pool(num_workers: int, timeout: float) -> VerifierPool:
    with _POOLS_LOCK:
        key = (num_workers, timeout)
        if key not in _POOLS:
            _POOLS[key] = VerifierPool(num_workers, timeout)
        return _POOLS[key]


@atexit.register
def shutdown_pools() -> None:
    """Stop the shared worker processes (also runs at exit)."""
    with _POOLS_LOCK:
        for pool in _POOLS.values():
            pool.close()
        _POOLS.clear()


def batch_math_reward(
    responses: Sequence[str], ground_truths: Sequence[str], *, num_workers: int = 2, timeout: float = DEFAULT_TIMEOUT_S
) -> list[float]:
    """``[math_reward(r, g) for r, g in zip(...)]`` with hard deadlines, ``[batch]`` floats.

    The fast path runs in this process; only pairs that need sympy go to ``num_workers``
    persistent worker processes (shared between calls, started on first use). With
    ``num_workers=0`` everything runs in this process (signal deadline; main thread only).
    """
    if len(responses) != len(ground_truths):
        raise ValueError(f"batch_math_reward: {len(responses)} responses but {len(ground_truths)} ground truths")
    rewards: list[float | None] = []
    statuses: list[str] = []
    pending: list[tuple[int, str, str]] = []
    for i, (r, g) in enumerate(zip(responses, ground_truths)):
        gold = reduce_ground_truth(g)
        pred = extract_answer(r)
        reward, status = _decide_answers(pred, gold)
        rewards.append(reward)
        statuses.append(status)
        if reward is None:
            pending.append((i, pred, gold))
    if pending:
        if num_workers <= 0:
            if not _on_main_thread():
                raise RuntimeError(
                    "batch_math_reward(num_workers=0) needs the main thread (signal deadline); use num_workers >= 1"
                )
            decided = [_decide_in_process(p, g, timeout) for _, p, g in pending]
        else:
            decided = _shared_pool(num_workers, timeout).decide([(p, g) for _, p, g in pending])
        for (i, _, _), (reward, status) in zip(pending, decided):
            rewards[i], statuses[i] = reward, status
    for s in statuses:
        _record(s)
    return [float(r) for r in rewards]  # type: ignore[arg-type]


__all__ = [
    "DEFAULT_TIMEOUT_S",
    "RewardStats",
    "STATS",
    "VerifierPool",
    "answer_key",
    "batch_math_reward",
    "clean_answer",
    "extract_answer",
    "fast_decision",
    "gsm8k_reward",
    "hostile_reason",
    "last_boxed",
    "math_reward",
    "reduce_ground_truth",
    "reset_reward_stats",
    "reward_stats",
    "shutdown_pools",
    "strip_thinking",
    "to_number",
]
