"""Labelled preference pairs in the JudgeBench JSONL format (prompt, chosen, rejected, ...).

Every row is validated when it is read (``validate_row``): string ``prompt`` / ``chosen`` /
``rejected``; optional ``question_id`` (non-empty string or integer, default ``row<line>``),
``query_type`` (string), ``ground_truth`` (string or number) and ``constraints`` (a list of
``{"type": ...}`` objects, each checked by its type and parameters, or constraints written in words,
``{"rule": <text>, "need_code": <bool>}``, checked by the judge's LLM; ``validate_constraint``).

``scan_pair_rows`` never stops at a bad row: it returns the valid rows and the invalid ones as
(line, reason), and raises ``RowError`` only for what spoils the whole file: two rows with the
same ``question_id`` (as compared: ``1`` and ``"1"`` collide; both lines named), or no valid row
at all.  ``read_pair_rows`` is the strict form: the first invalid row raises.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
from typing import Any

from clipo_jax.rubrics.types import PairInput

MAX_CODE_CHARS = 100_000  # a 'code' constraint's checker source
MAX_RULE_CHARS = 4_000  # a constraint written in words


class RowError(ValueError):
    """A malformed row or file; the message names the file (and line)."""


@dataclasses.dataclass(frozen=True)
class InvalidRow:
    line: int
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"line": self.line, "reason": self.reason}


@dataclasses.dataclass
class PairRows:
    path: str
    rows: list[dict]  # valid rows; question_id set (a string) on each
    lines: list[int]  # the line of each valid row
    invalid: list[InvalidRow]
    n_lines: int  # non-blank lines read (up to the limit)


# ----------------------------------------------------------------------------------------------
# Validation.
# ----------------------------------------------------------------------------------------------
_COUNT_TYPES = ("word_count", "sentence_count", "paragraph_count", "bullet_count", "keyword_count")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_bounds(c: dict) -> str | None:
    present = [k for k in ("min", "max", "equals") if k in c]
    if not present:
        return "needs 'min', 'max' or 'equals'"
    for k in present:
        if not _is_int(c[k]) or c[k] < 0:
            return f"'{k}' must be a non-negative integer, got {c[k]!r}"
    if "min" in c and "max" in c and c["min"] > c["max"]:
        return f"'min' {c['min']} is above 'max' {c['max']}"
    return None


def _nonempty_str(c: dict, key: str) -> str | None:
    if key not in c:
        return f"is missing the parameter '{key}'"
    if not isinstance(c[key], str) or not c[key]:
        return f"'{key}' must be a non-empty string, got {c[key]!r}"
    return None


def validate_constraint(c: Any) -> str | None:
    """Why the constraint dict ``c`` cannot be checked, or None when it is well formed.

    Known types are checked by their parameters; a type registered in ``pvr.CONSTRAINTS`` that
    this table does not know is dry-run on an empty response instead.  A ``code`` constraint needs
    Python source that compiles (it is not run here) and cannot set sandbox limits.  A constraint
    written in words (no ``type``, a ``rule``) needs a non-empty ``rule`` and a boolean
    ``need_code`` when given, and nothing else."""
    from clipo_jax.rubrics import pvr

    if not isinstance(c, dict):
        return f"must be an object with a 'type' (or a 'rule' in words), got {type(c).__name__}"
    if pvr.is_nl_constraint(c):
        return _validate_nl_constraint(c)
    ctype = c.get("type")
    if not isinstance(ctype, str) or ctype not in pvr.CONSTRAINTS:
        return f"unknown constraint type {ctype!r} (known: {', '.join(sorted(pvr.CONSTRAINTS))})"
    reason = None
    if ctype in _COUNT_TYPES:
        reason = (_nonempty_str(c, "keyword") if ctype == "keyword_count" else None) or _check_bounds(c)
    elif ctype in ("keywords_include", "keywords_exclude"):
        reason = pvr.keywords_problem(c)
    elif ctype in ("starts_with", "ends_with"):
        reason = _nonempty_str(c, "phrase")
    elif ctype == "language":
        reason = _nonempty_str(c, "language")
    elif ctype == "code":
        if "limits" in c:
            reason = "cannot set sandbox limits (the operator sets them)"
        else:
            reason = _nonempty_str(c, "code")
        if reason is None and len(c["code"]) > MAX_CODE_CHARS:
            reason = f"'code' is longer than {MAX_CODE_CHARS} characters"
        if reason is None:
            try:
                compile(c["code"], "<constraint code>", "exec", dont_inherit=True)
            except SyntaxError as e:
                reason = f"'code' does not compile: {e.msg} (line {e.lineno})"
            except (ValueError, RecursionError, MemoryError) as e:
                reason = f"'code' does not compile: {type(e).__name__}"
        return f"type 'code': {reason}" if reason else None
    if reason is None:
        try:  # a dry run catches what the table cannot (an unsupported language, a new type)
            pvr.check_constraint("", c)
        except Exception as e:  # noqa: BLE001 - any failure makes the constraint unusable
            reason = f"{type(e).__name__}: {e}"
    return f"type '{ctype}': {reason}" if reason else None


def _validate_nl_constraint(c: dict) -> str | None:
    """A constraint written in words: a non-empty ``rule`` and an optional boolean ``need_code``."""
    rule = c["rule"]
    extra = sorted(set(c) - {"rule", "need_code"})
    if not isinstance(rule, str) or not rule.strip():
        reason = f"'rule' must be a non-empty string, got {rule!r}"
    elif len(rule) > MAX_RULE_CHARS:
        reason = f"'rule' is longer than {MAX_RULE_CHARS} characters"
    elif "need_code" in c and not isinstance(c["need_code"], bool):
        reason = f"'need_code' must be true or false, got {c['need_code']!r}"
    elif extra:
        reason = f"unknown keys {extra} (a constraint in words has 'rule' and 'need_code')"
    else:
        return None
    return f"constraint in words: {reason}"


def validate_row(row: Any) -> str | None:
    """Why a parsed JSONL row cannot be judged, or None when it is well formed."""
    if not isinstance(row, dict):
        return f"a row must be a JSON object, got {type(row).__name__}"
    for key in ("prompt", "chosen", "rejected"):
        if key not in row:
            return f"field '{key}' must be a string (missing)"
        if not isinstance(row[key], str):
            return f"field '{key}' must be a string, got {type(row[key]).__name__}"
    qid = row.get("question_id")
    if qid is not None and not (_is_int(qid) or (isinstance(qid, str) and qid.strip())):
        return f"field 'question_id' must be a non-empty string or an integer, got {qid!r}"
    qt = row.get("query_type")
    if qt is not None and not isinstance(qt, str):
        return f"field 'query_type' must be a string, got {type(qt).__name__} {qt!r}"
    gt = row.get("ground_truth")
    if gt is not None and not (isinstance(gt, str) or _is_number(gt)):
        return f"field 'ground_truth' must be a string or a number, got {type(gt).__name__}"
    cons = row.get("constraints")
    if cons is not None:
        if not isinstance(cons, list):
            return f"field 'constraints' must be a list, got {type(cons).__name__}"
        for i, c in enumerate(cons):
            reason = validate_constraint(c)
            if reason:
                return f"constraints[{i}]: {reason}"
    return None


# ----------------------------------------------------------------------------------------------
# Reading.
# ----------------------------------------------------------------------------------------------
def parse_line(raw: bytes, lineno: int) -> tuple[Any, str | None]:
    """One JSONL line -> (row, None), or (None, a one-line reason) for bytes that are not UTF-8 JSON."""
    if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]  # a UTF-8 byte order mark
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})"
    if not text.strip():
        return None, ""
    try:
        return json.loads(text), None
    except json.JSONDecodeError as e:
        return None, f"not valid JSON ({e.msg} at column {e.colno})"
    except RecursionError:
        return None, "not valid JSON (nested too deeply)"


def _scan(path: str, limit: int) -> tuple[PairRows, list[str]]:
    out = PairRows(path=path, rows=[], lines=[], invalid=[], n_lines=0)
    seen: dict[str, int] = {}
    duplicates: list[str] = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            row, reason = parse_line(raw, lineno)
            if reason == "":
                continue  # a blank line
            out.n_lines += 1
            if reason is None:
                reason = validate_row(row)
            if reason is not None:
                out.invalid.append(InvalidRow(lineno, reason if len(reason) <= 300 else reason[:297] + "..."))
                continue
            if row.get("question_id") is None:
                row["question_id"] = f"row{lineno}"
            qid = row["question_id"] = str(row["question_id"])
            if qid in seen:
                duplicates.append(f"{path}:{lineno}: question_id {qid!r} is already used on line {seen[qid]}")
            else:
                seen[qid] = lineno
            out.rows.append(row)
            out.lines.append(lineno)
            if limit and len(out.rows) >= limit:
                break
    return out, duplicates


def _raise_for_file(out: PairRows, duplicates: list[str]) -> None:
    if duplicates:
        raise RowError("duplicate question_id values (each pair needs its own id):\n" + "\n".join(duplicates))
    if not out.rows:
        if out.n_lines == 0:
            raise RowError(f"{out.path}: no rows (the file is empty)")
        raise RowError(
            f"{out.path}: no valid rows ({len(out.invalid)} invalid):\n"
            + "\n".join(f"{out.path}:{r.line}: {r.reason}" for r in out.invalid[:20])
            + ("\n..." if len(out.invalid) > 20 else "")
        )


def scan_pair_rows(path: str | os.PathLike, limit: int = 0) -> PairRows:
    """All rows of ``path``: the valid ones kept (the first ``limit`` valid ones when ``limit`` >
    0), the invalid ones listed with line and reason.  Raises ``RowError`` for duplicate ids or
    when no row is valid, ``OSError`` when the file cannot be read."""
    out, duplicates = _scan(os.fspath(path), limit)
    _raise_for_file(out, duplicates)
    return out


def read_pair_rows(path: str | os.PathLike, limit: int = 0) -> list[dict]:
    """Strict reading: the valid rows, or ``RowError`` naming the first invalid row's file:line."""
    out, duplicates = _scan(os.fspath(path), limit)
    if out.invalid:
        raise RowError(f"{out.path}:{out.invalid[0].line}: {out.invalid[0].reason}")
    _raise_for_file(out, duplicates)
    return out.rows


def to_pair(row: dict, seed: int) -> tuple[PairInput, str]:
    """Chosen shown first or second by a per-pair seeded coin (so a position-biased judge cannot
    score well); returns (pair, correct verdict)."""
    swap = random.Random(f"{seed}:{row['question_id']}").random() < 0.5
    first, second = (row["rejected"], row["chosen"]) if swap else (row["chosen"], row["rejected"])
    gt = row.get("ground_truth")
    pair = PairInput(
        row["prompt"],
        first,
        second,
        query_type=row.get("query_type"),
        ground_truth=None if gt is None or gt == "" else str(gt),
        constraints=row.get("constraints") or None,
        pair_id=str(row["question_id"]),
    )
    return pair, ("second" if swap else "first")
