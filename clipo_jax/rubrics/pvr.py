"""Pointwise Verifiable Rubrics: checks applied to one response at a time (OpenRS paper, arXiv 2602.14069: the rubric pieces; paths by query kind).

* ``ground_truth_score(response, ground_truth, kind)`` -> +1 / 0 / -1, or None when no final
  answer can be extracted (the judge then asks the LLM, see ``PairwiseJudge``).
* ``check_constraint(response, constraint)`` -> bool for a hard instruction-following
  constraint dict ``{"type": <name>, ...params}``; ``CONSTRAINTS`` is the registry (add one
  function + one entry to extend).  ``{"type": "code", "code": "<python>"}`` runs LLM-written
  checker code in the sandbox.  A constraint written in words, ``{"rule": <text>, "need_code":
  <bool>}`` (``is_nl_constraint``), needs an LLM and is checked by the judge
  (``PairwiseJudge``), not here.
* ``guardrail_flags(response, expected_language=None)`` -> dict of degenerate-output flags
  (empty, repetition loop, wrong language) used as penalties.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import unicodedata
from typing import Any, Callable

from clipo_jax.rubrics.sandbox import SandboxLimits, run_checker

log = logging.getLogger(__name__)


class ConstraintError(ValueError):
    """A constraint dict is malformed (unknown type or missing parameter)."""


# ----------------------------------------------------------------------------------------------
# Ground truth.
# ----------------------------------------------------------------------------------------------


def _last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} with balanced braces."""
    idx = text.rfind("\\boxed")
    if idx < 0:
        return None
    i = text.find("{", idx)
    if i < 0:
        return None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j]
    return None


def normalise_answer(text: str) -> str:
    t = text.strip().strip("$").strip()
    t = re.sub(r"\\(left|right|,|!|;|displaystyle)", "", t)
    t = re.sub(r"\\text\{([^}]*)\}", r"\1", t)
    t = t.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    t = re.sub(r"\s+", "", t).rstrip(".").lower()
    return t


def extract_math_answer(response: str) -> str | None:
    boxed = _last_boxed(response)
    if boxed is not None:
        return boxed
    m = re.findall(r"answer is[:\s]*\$?([^\n$]+)", response, flags=re.IGNORECASE)
    return m[-1].strip() if m else None


def extract_choice(response: str) -> str | None:
    """Multiple-choice letter, read by the project's one letter reader
    (``clipo_jax.rewards.choice.extract_choice``): a boxed letter, else a letter written five
    times (JudgeBench / MMLU-Pro format), else "answer is (X)" / "Answer: X", else a last line
    that is only a letter.  Capitals in prose ("the answer is a bit subtle" names no choice); a
    hedge between letters ("A or B", "B and/or C") names none."""
    from clipo_jax.rewards.choice import extract_choice as read_letter  # lazy: pulls in the math verifier

    return read_letter(response)


def extract_bold(response: str) -> str | None:
    """Last **bold** span (LiveBench reasoning asks for the answer in bold)."""
    m = re.findall(r"\*\*([^*\n]{1,200})\*\*", response)
    return m[-1].strip() if m else None


def math_equivalent(response: str, ground_truth: str) -> float | None:
    """1.0 / 0.0 from the project's math verifier; exact normalised-string compare only when
    that module is unavailable.  None when the verifier cannot extract a final answer (no
    ``\\boxed{}`` / ``#### N``; the fallback: no boxed answer nor "the answer is"): the
    caller then asks the LLM (``PairwiseJudge``) or counts the answer as missing."""
    try:
        # lazy: the math verifier pulls in sympy
        from clipo_jax.rewards.math import extract_answer, math_reward
    except ImportError:
        math_reward = None
    if math_reward is not None:
        if extract_answer(response) is None:  # math_reward would say 0.0, a wrong answer
            return None
        return float(math_reward(response, ground_truth))
    answer = extract_math_answer(response)
    if answer is None:
        return None
    return float(normalise_answer(answer) == normalise_answer(ground_truth))


def _to_signed(match: float | None) -> int | None:
    if match is None:
        return None
    if match >= 0.999:
        return 1
    return 0 if match > 0 else -1


def _looks_mathematical(gt: str) -> bool:
    """A short number or formula (``42``, ``-3.5``, ``\\frac{1}{2}``, ``x^2+1``), not prose or code."""
    if len(gt) > 60 or "\n" in gt:
        return False
    if re.fullmatch(r"[-+]?\d[\d,]*(\.\d+)?%?", gt):
        return True
    return bool(re.search(r"\\(frac|sqrt|pi|boxed)|\^", gt)) and not re.search(r"[a-zA-Z]{4,}\s+[a-zA-Z]{4,}", gt)


def ground_truth_score(response: str, ground_truth: str, kind: str = "auto") -> int | None:
    """+1 matches, 0 partial, -1 wrong; None when the response has no extractable answer.

    kind: "math", "choice" (multiple-choice letter), "bold" (answer in **bold**), "exact"
    (normalised string), "auto" (choice for a single letter A-J, else math), or "any" (any
    domain: decides only what a program can tell for sure, None otherwise so that the LLM
    compares; a choice letter for a single-letter ground truth, the math verifier when the
    response states a final answer (boxed or "the answer is") and the ground truth is a number
    or a formula, +1 for an exact match after normalisation).
    """
    gt = str(ground_truth).strip()
    if kind == "any":
        if re.fullmatch(r"[A-J]", gt):
            got = extract_choice(response)
            return None if got is None else (1 if got == gt.upper() else -1)
        if normalise_answer(response) == normalise_answer(gt) and normalise_answer(gt):
            return 1
        if _looks_mathematical(gt) and extract_math_answer(response) is not None:
            return _to_signed(math_equivalent(response, gt))
        return None
    if kind == "auto":
        kind = "choice" if re.fullmatch(r"[A-J]", gt) else "math"
    if kind == "choice":
        got = extract_choice(response)
        return None if got is None else (1 if got == gt.upper() else -1)
    if kind == "bold":
        got = extract_bold(response)
        if got is None:
            return None
        return 1 if normalise_answer(got) == normalise_answer(gt) else -1
    if kind == "exact":
        return 1 if normalise_answer(response) == normalise_answer(gt) else -1
    if kind == "math":
        return _to_signed(math_equivalent(response, gt))
    raise ValueError(f"unknown ground-truth kind {kind!r} (math / choice / bold / exact / auto)")


# ----------------------------------------------------------------------------------------------
# Hard instruction-following constraints.
# ----------------------------------------------------------------------------------------------


def words(text: str) -> list[str]:
    """Words, with inner apostrophes (straight or curly) and hyphens kept: "don't", "don’t" and
    "well-known" are one word each."""
    return re.findall(r"\b\w[\w'\u2019-]*\b", text)


# Abbreviations whose final period ends no sentence (the regex fallback of ``sentences``).
_ABBREVIATIONS = frozenset({"dr", "mr", "mrs", "ms", "prof", "st", "jr", "sr", "vs", "a.m", "p.m", "e.g", "i.e", "etc"})
# Sentence-final punctuation, any closing quotes / brackets after it, then whitespace.
_SENTENCE_END = re.compile(r"[.!?]+[\"'\u201d\u2019)\]]*\s+")


def regex_sentences(text: str) -> list[str]:
    """Sentences split at ``.``/``!``/``?`` (plus closing quotes or brackets) followed by
    whitespace, except after a common abbreviation (Dr., Mr., Mrs., Ms., a.m., p.m., e.g., i.e.,
    etc.): the fallback of ``sentences`` when NLTK's punkt data is not installed."""
    text = text.strip()
    out, start = [], 0
    for m in _SENTENCE_END.finditer(text):
        if text[m.start()] == ".":
            before = text[start : m.start()].split()
            last = before[-1].lstrip("\"'\u201c\u2018([").lower() if before else ""
            if last in _ABBREVIATIONS:
                continue
        out.append(text[start : m.end()].strip())
        start = m.end()
    out.append(text[start:].strip())
    return [s for s in out if s]


@functools.cache
def _punkt():
    """NLTK's English punkt sentence tokenizer (the one IFEval counts sentences with), or None when
    nltk or its ``punkt_tab`` data is not installed (looked up offline, as ``clipo_jax.data.instruct``
    does: nltk's path plus the copy the llama-index-core wheel ships)."""
    try:
        from clipo_jax.data.instruct import _import_nltk

        _import_nltk()
        from nltk.tokenize.punkt import PunktTokenizer

        return PunktTokenizer("english")
    except (ImportError, LookupError, OSError) as e:
        log.warning("NLTK punkt data not available (%s); sentence_count uses a regex splitter", type(e).__name__)
        return None


def sentences(text: str) -> list[str]:
    """Sentences of ``text``: NLTK's punkt tokenizer when its data is installed, else
    ``regex_sentences``."""
    tok = _punkt()
    if tok is None:
        return regex_sentences(text)
    return [s for s in tok.tokenize(text.strip()) if s.strip()]


def paragraphs(text: str) -> list[str]:
    return [p for p in re.split(r"\n\s*\n", text.strip()) if p.strip()]


def bullets(text: str) -> list[str]:
    return re.findall(r"^\s*(?:[-*+•]|\d+[.)])\s+\S", text, flags=re.MULTILINE)


def _cmp(n: int, c: dict) -> bool:
    lo, hi = c.get("min"), c.get("max")
    if "equals" in c:
        return n == int(c["equals"])
    if lo is None and hi is None:
        raise ConstraintError(f"constraint {c.get('type')!r} needs 'min', 'max' or 'equals'")
    return (lo is None or n >= int(lo)) and (hi is None or n <= int(hi))


def _param(c: dict, key: str):
    if key not in c:
        raise ConstraintError(f"constraint {c.get('type')!r} is missing the parameter {key!r}")
    return c[key]


def keywords_problem(c: dict) -> str | None:
    """Why the ``keywords`` parameter is unusable, or None: it must be a non-empty list of
    non-empty strings.  A single string is an error, not a list of its characters ('apple' would
    otherwise be checked as the keywords 'a', 'p', 'l', 'e').  ``check_row``
    (``pairs.validate_constraint``) and the check itself share this rule."""
    if "keywords" not in c:
        return "is missing the parameter 'keywords'"
    kw = c["keywords"]
    if not isinstance(kw, (list, tuple)) or not kw or not all(isinstance(k, str) and k for k in kw):
        return f"'keywords' must be a non-empty list of non-empty strings, got {kw!r:.200}"
    return None


def _keywords(c: dict) -> list[str]:
    reason = keywords_problem(c)
    if reason is not None:
        raise ConstraintError(f"constraint {c.get('type')!r}: {reason}")
    return list(c["keywords"])


def _json_format(r: str, c: dict) -> bool:
    body = r.strip()
    m = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", body, flags=re.DOTALL | re.IGNORECASE)
    try:
        json.loads(m.group(1) if m else body)
        return True
    except json.JSONDecodeError:
        return False


# Scripts used as a cheap language check (no language-ID model needed for the common cases).
_SCRIPT_OF = {
    "en": "latin",
    "fr": "latin",
    "de": "latin",
    "es": "latin",
    "it": "latin",
    "pt": "latin",
    "ru": "cyrillic",
    "uk": "cyrillic",
    "zh": "han",
    "ja": "japanese",
    "ko": "hangul",
    "ar": "arabic",
    "he": "hebrew",
    "hi": "devanagari",
    "el": "greek",
    "th": "thai",
}
_EN_STOPWORDS = {
    "the",
    "and",
    "is",
    "of",
    "to",
    "in",
    "a",
    "that",
    "it",
    "for",
    "on",
    "with",
    "as",
    "are",
    "this",
    "be",
    "was",
    "you",
    "not",
    "or",
    "by",
    "have",
    "an",
    "at",
}


def script_histogram(text: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for ch in text:
        if not ch.isalpha():
            continue
        name = unicodedata.name(ch, "")
        if name.startswith(("HIRAGANA", "KATAKANA")):
            s = "japanese"
        elif name.startswith("CJK"):
            s = "han"
        else:
            s = name.split(" ")[0].lower()
        counts[s] = counts.get(s, 0) + 1
    return counts


# Fewer letters than this and a language-ID model is no evidence: in our probes langdetect named
# the wrong language for about a third of replies under 16 letters ("Call me later" -> it,
# "Je ne sais pas." -> lt, "OK" -> pt) and for some up to 19 ("Кошка сидит на ковре." -> mk).
# Below it the script check alone decides (see ``detect_language_ok``).
MIN_DETECT_LETTERS = 20


@functools.cache
def _langdetect():
    """langdetect's ``detect`` with its seed fixed (it is random otherwise), or None when the
    package is not installed (it comes with the ``instruct`` / ``test`` extras)."""
    try:
        import langdetect
    except ImportError:
        log.warning(
            "langdetect is not installed; the 'language' check only tells scripts apart "
            "(plus English stop words): pip install langdetect"
        )
        return None
    langdetect.DetectorFactory.seed = 0
    return langdetect.detect


def _english_by_stopwords(text: str) -> bool:
    toks = [w.lower() for w in words(text)]
    return len(toks) < 8 or sum(t in _EN_STOPWORDS for t in toks) / len(toks) >= 0.08


def detect_language_ok(text: str, language: str, min_share: float = 0.8) -> bool:
    """True if ``text`` is in ``language`` (ISO 639-1 code).

    1. Script pre-filter: at least ``min_share`` of the letters are in the language's script
       (kana or han for Japanese); a text with no letters is in no language.
    2. Language ID, as IFEval's ``language:response_language`` does it: langdetect (fixed seed)
       must name ``language`` (``zh-cn`` / ``zh-tw`` count as ``zh``).  This tells apart the
       languages that share a script (English / French / German..., Russian / Ukrainian,
       Chinese / Japanese).  Japanese needs some kana: a kanji-only text is counted as not
       Japanese (it cannot be told from Chinese, and langdetect often calls it Korean).
    3. A text with fewer than ``MIN_DETECT_LETTERS`` letters is too short for language ID: the
       script check alone decides, so a short reply is never failed (or, as a guardrail,
       penalised) on a guess.  Without langdetect installed, step 2 is an English stop-word
       check for ``en`` only.
    """
    lang = language.lower()
    if lang not in _SCRIPT_OF:
        raise ConstraintError(f"language {language!r} is not supported (known: {sorted(_SCRIPT_OF)})")
    hist = script_histogram(text)
    total = sum(hist.values())
    if total == 0:
        return False
    want = _SCRIPT_OF[lang]
    share = hist.get(want, 0) + (hist.get("han", 0) if want == "japanese" else 0)
    if share / total < min_share:
        return False
    if lang == "ja" and not hist.get("japanese"):  # kanji only: not told apart from Chinese
        return False
    if total < MIN_DETECT_LETTERS:
        return True
    detect = _langdetect()
    if detect is None:
        return _english_by_stopwords(text) if lang == "en" else True
    try:
        got = detect(text)
    except Exception:  # langdetect.LangDetectException: no usable features
        return False
    return got.split("-")[0].lower() == lang


def _code_checker(r: str, c: dict, limits: SandboxLimits | None = None) -> bool:
    if "limits" in c:
        raise ConstraintError("a constraint row cannot set sandbox limits; the operator's config sets them")
    result = run_checker(_param(c, "code"), r, limits or SandboxLimits())
    if not result.ok:
        log.warning("sandboxed checker failed (%s); counting the constraint as not met", result.error)
        return False
    return result.value is True


def _whole_word(keyword: str) -> re.Pattern:
    """``keyword`` as a whole word, case-insensitive: not inside a longer word ('art' is not in
    'start'), and working for keywords that start or end with a non-word character ('C++')."""
    return re.compile(r"(?<!\w)" + re.escape(keyword) + r"(?!\w)", flags=re.IGNORECASE)


def _ends_with(r: str, c: dict) -> bool:
    """As IFEval's ``startend:end_checker``: the response, stripped of surrounding whitespace and
    double quotes, ends with the stripped phrase (case-insensitive)."""
    return r.strip().strip('"').lower().endswith(_param(c, "phrase").strip().lower())


ConstraintFn = Callable[[str, dict], bool]
CONSTRAINTS: dict[str, ConstraintFn] = {
    "word_count": lambda r, c: _cmp(len(words(r)), c),
    "sentence_count": lambda r, c: _cmp(len(sentences(r)), c),
    "paragraph_count": lambda r, c: _cmp(len(paragraphs(r)), c),
    "bullet_count": lambda r, c: _cmp(len(bullets(r)), c),
    "keywords_include": lambda r, c: all(k.lower() in r.lower() for k in _keywords(c)),
    "keywords_exclude": lambda r, c: not any(_whole_word(k).search(r) for k in _keywords(c)),
    "keyword_count": lambda r, c: _cmp(len(_whole_word(_param(c, "keyword")).findall(r)), c),
    "json_format": _json_format,
    "all_lowercase": lambda r, c: r == r.lower(),
    "all_uppercase": lambda r, c: r == r.upper(),
    "starts_with": lambda r, c: r.strip().lower().startswith(_param(c, "phrase").lower()),
    "ends_with": _ends_with,
    "no_commas": lambda r, c: "," not in r,
    "language": lambda r, c: detect_language_ok(r, _param(c, "language")),
    "code": _code_checker,
}


def is_nl_constraint(constraint: Any) -> bool:
    """True for a constraint written in words, ``{"rule": <text>, "need_code": <bool>}`` (no
    ``type``): the judge checks it with an LLM yes/no answer or LLM-written checker code."""
    return isinstance(constraint, dict) and "type" not in constraint and "rule" in constraint


def check_constraint(response: str, constraint: dict[str, Any], sandbox_limits: SandboxLimits | None = None) -> bool:
    """One constraint. ``sandbox_limits`` (the operator's) bound a ``code`` constraint's checker.
    A blank (whitespace-only) response follows no constraint (False)."""
    if is_nl_constraint(constraint):
        raise ConstraintError(
            "a constraint written in words ({'rule': ..., 'need_code': ...}) needs an LLM: "
            "the judge (PairwiseJudge) checks it, not pvr.check_constraint"
        )
    ctype = constraint.get("type")
    if ctype not in CONSTRAINTS:
        raise ConstraintError(f"unknown constraint type {ctype!r} (known: {sorted(CONSTRAINTS)})")
    if ctype == "code":
        if not response.strip():
            _param(constraint, "code")
            return False
        return _code_checker(response, constraint, sandbox_limits)
    # Run the check even on a blank response: a dry run on "" is how a malformed constraint
    # (missing or mistyped parameter) is found (``pairs.validate_constraint``).
    ok = bool(CONSTRAINTS[ctype](response, constraint))
    # A blank (whitespace-only) response follows no constraint, as IFEval / IFBench's strict
    # check has it: otherwise an empty reply passes 'no_commas' and beats a real one.
    return ok and bool(response.strip())


def constraints_pass(response: str, constraints: list[dict[str, Any]]) -> bool:
    return all(check_constraint(response, c) for c in constraints)


# ----------------------------------------------------------------------------------------------
# Guardrails.
# ----------------------------------------------------------------------------------------------


def repetition_loop(text: str, ngram: int = 8, max_share: float = 0.3, min_words: int = 40) -> bool:
    """True if the most frequent word n-gram covers more than ``max_share`` of all n-grams —
    the signature of a generation stuck in a loop."""
    toks = text.split()
    if len(toks) < min_words:
        return False
    grams = [tuple(toks[i : i + ngram]) for i in range(len(toks) - ngram + 1)]
    counts: dict[tuple, int] = {}
    for g in grams:
        counts[g] = counts.get(g, 0) + 1
    return max(counts.values()) * ngram / len(toks) > max_share if len(toks) else False


def guardrail_flags(response: str, expected_language: str | None = None) -> dict[str, bool]:
    """Degenerate-output flags for one response: empty, repetition_loop, wrong_language."""
    return {
        "empty": not response.strip(),
        "repetition_loop": repetition_loop(response),
        "wrong_language": bool(expected_language)
        and bool(response.strip())
        and not detect_language_ok(response, expected_language),
    }
