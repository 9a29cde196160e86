"""Reward-model benchmarks for the judge CLI: one reader per published format and each
benchmark's own scoring, as pure functions behind a small registry (``BENCHMARKS``).

Every reader turns a file into JudgeBench-format pair rows (``prompt``, ``chosen``, ``rejected``,
``question_id`` = a stable pair id, optional ``query_type``, ``ground_truth``, ``constraints``),
so the judge, the seeded presentation order (``pairs.to_pair``) and ``--resume`` work on every
benchmark alike.  A pair expanded from a multi-response row carries ``bench`` =
``{"row", "group", "i", "j"}`` (row id, subset or domain, chosen index, rejected index) and the
id ``<row id>#c<i>r<j>``.  Every scorer takes the pair rows, the judge's verdicts, the correct
verdicts (labels) and an error policy and returns a dict with ``score`` (the headline number),
``score_name`` and the details.

* ``judgebench`` / ``ppe``: JudgeBench-format rows (``pairs.scan_pair_rows``; the OpenRS release
  ships PPE in this format).  Pairwise accuracy, wins / (wins + losses): a tie and an error are
  left out (``judge.summarise``).  Default error policy ``exclude``.
* ``rewardbench2``: RewardBench 2 rows (``id``, ``prompt``, ``chosen`` and ``rejected`` lists,
  ``subset``, optional ``num_correct`` / ``num_incorrect`` / ``total_completions`` / ``models`` /
  ``additional_metadata``).  One pair per (chosen, rejected) combination; a row is a win only when
  its chosen response beats every rejected one, a tie is not a win, an error counts as a tie
  (default policy ``tie``).  Accuracy per subset; the headline is the mean of the subset
  accuracies.  The ``Ties`` subset is excluded (``TIES_REASON``): its authors score it from
  absolute reward margins between several correct answers, which pairwise verdicts cannot give.
* ``rmbench``: RM-Bench rows (a JSON list, or JSONL: ``id``, ``prompt``, ``chosen`` and
  ``rejected`` with 3 responses each in style order concise / detailed plain / detailed markdown,
  ``domain``).  Nine pairs per row; ``M[i][j]`` = the fraction of rows in which chosen style i beats
  rejected style j; hard = the mean of the cells above the diagonal, normal = the diagonal, easy =
  below it; the headline is their mean.  Default policy ``exclude``: an error pair leaves its row
  out of that one cell's denominator, and the row's other pairs still count.

Rows are validated when read: an invalid row is returned as (line, reason) and skipped; duplicate
row ids, an empty file, a JSON list that does not parse, or a file without a row to score raise
``pairs.RowError``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Callable, Iterator, Sequence

from clipo_jax.rubrics.judge import summarise
from clipo_jax.rubrics.pairs import InvalidRow, RowError, parse_line, scan_pair_rows, validate_row
from clipo_jax.rubrics.types import PairResult, apply_error_policy, check_error_policy

RMBENCH_STYLES = ("concise", "detailed_plain", "detailed_markdown")
TIES_SUBSETS = ("ties", "tie")
TIES_REASON = (
    "subset 'Ties' not scored: its official score weighs whether every correct answer outscores "
    "every incorrect one and reward-margin terms, which need absolute scores, not pairwise verdicts"
)
_MAX_REASON = 300


@dataclasses.dataclass
class BenchmarkPairs:
    """What a reader returns: the pairs to judge and the account of the rows read."""

    path: str
    pairs: list[dict]  # JudgeBench-format rows, one per pair; question_id is the pair id
    invalid: list[InvalidRow]
    excluded: list[dict]  # valid rows not scored: {"line", "id", "reason"}
    n_rows_read: int  # rows (non-blank lines, or list elements) read up to the limit
    n_rows: int  # valid rows kept and expanded into pairs


@dataclasses.dataclass(frozen=True)
class Benchmark:
    name: str
    read: Callable[[str, int], BenchmarkPairs]  # (path, limit on scored rows; 0 = all)
    score: Callable[[Sequence[dict], Sequence[str], Sequence[str], str], dict]
    error_policy: str  # the default of --error_policy
    describe: Callable[[dict], str]  # one line for the CLI from score()'s dict


# ----------------------------------------------------------------------------------------------
# Reading.
# ----------------------------------------------------------------------------------------------
def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _clip(reason: str) -> str:
    return reason if len(reason) <= _MAX_REASON else reason[: _MAX_REASON - 3] + "..."


def iter_records(path: str) -> Iterator[tuple[int, Any, str | None]]:
    """(line, parsed value or None, reason or None) for each row of a JSONL file or element of a
    JSON list (detected by a leading ``[``); blank JSONL lines are skipped.  A JSON list that does
    not parse raises ``RowError`` (the elements after a syntax error cannot be found)."""
    with open(path, "rb") as f:
        head = f.read(4096)
    if head.startswith(b"\xef\xbb\xbf"):
        head = head[3:]
    if head.lstrip()[:1] == b"[":
        yield from _iter_json_list(path)
        return
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            row, reason = parse_line(raw, lineno)
            if reason != "":  # "" is a blank line
                yield lineno, row, reason


def _iter_json_list(path: str) -> Iterator[tuple[int, Any, str | None]]:
    with open(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise RowError(f"{path}:{line}: not valid UTF-8 (byte 0x{data[e.start]:02x})") from None
    dec = json.JSONDecoder()
    pos = text.index("[") + 1
    line, counted_to = 1, 0

    def skip_ws(p: int) -> int:
        while p < len(text) and text[p] in " \t\r\n":
            p += 1
        return p

    def where(p: int) -> int:
        nonlocal line, counted_to
        line += text.count("\n", counted_to, p)
        counted_to = p
        return line

    pos = skip_ws(pos)
    if pos < len(text) and text[pos] == "]":
        pos += 1
    else:
        while True:
            start = pos
            try:
                obj, pos = dec.raw_decode(text, pos)
            except json.JSONDecodeError as e:
                raise RowError(
                    f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno}); "
                    "a JSON list cannot be read past a syntax error"
                ) from None
            except RecursionError:
                raise RowError(f"{path}:{where(start)}: not valid JSON (nested too deeply)") from None
            yield where(start), obj, None
            pos = skip_ws(pos)
            if pos < len(text) and text[pos] == ",":
                pos = skip_ws(pos + 1)
                continue
            if pos < len(text) and text[pos] == "]":
                pos += 1
                break
            raise RowError(f"{path}:{where(pos)}: not valid JSON (expected ',' or ']' between list elements)")
    if skip_ws(pos) != len(text):
        raise RowError(f"{path}:{where(skip_ws(pos))}: not valid JSON (extra data after the list)")


def _str_list_reason(row: dict, key: str, length: int | None) -> str | None:
    v = row.get(key)
    if key not in row:
        return f"field '{key}' must be a list of strings (missing)"
    if not isinstance(v, list):
        return f"field '{key}' must be a list of strings, got {type(v).__name__}"
    if not all(isinstance(x, str) for x in v):
        bad = next(x for x in v if not isinstance(x, str))
        return f"field '{key}' must be a list of strings, got an element of type {type(bad).__name__}"
    if length is not None and len(v) != length:
        return f"field '{key}' must hold {length} responses, got {len(v)}"
    if not v:
        return f"field '{key}' must hold at least one response, got an empty list"
    return None


def _common_reason(row: Any, group_key: str, length: int | None) -> str | None:
    """Checks shared by the multi-response formats; the optional judge fields (``ground_truth``,
    ``constraints``) are checked by the JudgeBench row validator."""
    if not isinstance(row, dict):
        return f"a row must be a JSON object, got {type(row).__name__}"
    rid = row.get("id")
    if rid is not None and not (_is_int(rid) or (isinstance(rid, str) and rid.strip())):
        return f"field 'id' must be a non-empty string or an integer, got {rid!r}"
    if "prompt" not in row:
        return "field 'prompt' must be a string (missing)"
    if not isinstance(row["prompt"], str):
        return f"field 'prompt' must be a string, got {type(row['prompt']).__name__}"
    for key in ("chosen", "rejected"):
        reason = _str_list_reason(row, key, length)
        if reason:
            return reason
    g = row.get(group_key)
    if not isinstance(g, str) or not g.strip():
        return f"field '{group_key}' must be a non-empty string, got {g!r}"
    probe = {"prompt": row["prompt"], "chosen": "", "rejected": "", "query_type": g}
    probe.update({k: row[k] for k in ("ground_truth", "constraints") if k in row})
    return validate_row(probe)


def rewardbench2_row_reason(row: Any) -> str | None:
    """Why a RewardBench 2 row cannot be scored, or None."""
    reason = _common_reason(row, "subset", None)
    if reason:
        return reason
    for key in ("num_correct", "num_incorrect", "num_rejected", "total_completions"):
        if key in row and row[key] is not None and not (_is_int(row[key]) and row[key] >= 0):
            return f"field '{key}' must be a non-negative integer, got {row[key]!r}"
    models = row.get("models")
    if models is not None and not (isinstance(models, list) and all(isinstance(m, str) for m in models)):
        return f"field 'models' must be a list of strings, got {models!r}"[:_MAX_REASON]
    return None


def rmbench_row_reason(row: Any) -> str | None:
    """Why an RM-Bench row cannot be scored, or None."""
    return _common_reason(row, "domain", len(RMBENCH_STYLES))


def _scan_multi(
    path: str,
    limit: int,
    row_reason: Callable[[Any], str | None],
    group_key: str,
    exclude_reason: Callable[[dict], str | None],
) -> BenchmarkPairs:
    out = BenchmarkPairs(path=path, pairs=[], invalid=[], excluded=[], n_rows_read=0, n_rows=0)
    seen: dict[str, int] = {}
    duplicates: list[str] = []
    last_line, on_line = 0, 0  # elements of a compact JSON list share a line
    for lineno, row, reason in iter_records(path):
        out.n_rows_read += 1
        on_line = on_line + 1 if lineno == last_line else 1
        last_line = lineno
        if reason is None:
            reason = row_reason(row)
        if reason is not None:
            out.invalid.append(InvalidRow(lineno, _clip(reason)))
            continue
        if row.get("id") is not None:
            rid = str(row["id"])
        else:  # row<line>; the 2nd, 3rd, ... element starting on that line: row<line>_2, row<line>_3, ...
            rid = f"row{lineno}" if on_line == 1 else f"row{lineno}_{on_line}"
        if rid in seen:
            duplicates.append(f"{path}:{lineno}: id {rid!r} is already used on line {seen[rid]}")
            continue
        seen[rid] = lineno
        why = exclude_reason(row)
        if why:
            out.excluded.append({"line": lineno, "id": rid, "reason": why})
            continue
        out.n_rows += 1
        for i, c in enumerate(row["chosen"]):
            for j, r in enumerate(row["rejected"]):
                pair = {
                    "question_id": f"{rid}#c{i}r{j}",
                    "prompt": row["prompt"],
                    "chosen": c,
                    "rejected": r,
                    "query_type": row[group_key],
                    "bench": {"row": rid, "group": row[group_key], "i": i, "j": j},
                }
                pair.update({k: row[k] for k in ("ground_truth", "constraints") if row.get(k) is not None})
                out.pairs.append(pair)
        if limit and out.n_rows >= limit:
            break
    if duplicates:
        raise RowError("duplicate row ids (each row needs its own id):\n" + "\n".join(duplicates))
    if out.n_rows_read == 0:
        raise RowError(f"{path}: no rows (the file is empty)")
    if not out.pairs:
        lines = [f"{path}:{r.line}: {r.reason}" for r in out.invalid[:20]]
        lines += [f"{path}:{r['line']}: {r['reason']}" for r in out.excluded[:5]]
        raise RowError(
            f"{path}: no row to score ({len(out.invalid)} invalid, {len(out.excluded)} excluded):\n" + "\n".join(lines)
        )
    return out


def read_judgebench(path: str | os.PathLike, limit: int = 0) -> BenchmarkPairs:
    """JudgeBench-format rows, one pair each (``pairs.scan_pair_rows``)."""
    scan = scan_pair_rows(path, limit)
    return BenchmarkPairs(
        path=scan.path,
        pairs=scan.rows,
        invalid=scan.invalid,
        excluded=[],
        n_rows_read=scan.n_lines,
        n_rows=len(scan.rows),
    )


def _ties_excluded(row: dict) -> str | None:
    return TIES_REASON if row["subset"].strip().lower() in TIES_SUBSETS else None


def read_rewardbench2(path: str | os.PathLike, limit: int = 0) -> BenchmarkPairs:
    """RewardBench 2 rows (JSONL or a JSON list): one pair per (chosen, rejected) combination;
    ``limit`` counts scored rows (Ties rows are read, counted as excluded, and not judged)."""
    return _scan_multi(os.fspath(path), limit, rewardbench2_row_reason, "subset", _ties_excluded)


def read_rmbench(path: str | os.PathLike, limit: int = 0) -> BenchmarkPairs:
    """RM-Bench rows (a JSON list such as ``total_dataset.json``, or JSONL): 9 pairs per row."""
    return _scan_multi(os.fspath(path), limit, rmbench_row_reason, "domain", lambda row: None)


# ----------------------------------------------------------------------------------------------
# Scoring.
# ----------------------------------------------------------------------------------------------
def pair_outcome(verdict: str, label: str, error_policy: str) -> str | None:
    """ "win" (chosen preferred), "loss", "tie", or None (an error left out under ``exclude``)."""
    v = apply_error_policy(verdict, error_policy)
    if v is None:
        return None
    if v == "same":
        return "tie"
    return "win" if v == label else "loss"


def _by_row(pairs: Sequence[dict], verdicts: Sequence[str], labels: Sequence[str]) -> dict[str, list]:
    if not (len(pairs) == len(verdicts) == len(labels)):
        raise ValueError(f"{len(pairs)} pairs, {len(verdicts)} verdicts and {len(labels)} labels")
    rows: dict[str, list] = {}
    for p, v, l in zip(pairs, verdicts, labels):
        rows.setdefault(p["bench"]["row"], []).append((p["bench"], v, l))
    return rows


def score_pairwise(pairs: Sequence[dict], verdicts: Sequence[str], labels: Sequence[str], error_policy: str) -> dict:
    """JudgeBench / PPE: pairwise accuracy, wins / (wins + losses) (``judge.summarise``)."""
    s = summarise([PairResult(verdict=v, path="pairwise", domain="") for v in verdicts], labels, error_policy)
    keep = ("n_pairs", "n_counted", "wins", "losses", "same", "errors")
    return {
        "score": s["accuracy"],
        "score_name": "pairwise accuracy, wins / (wins + losses): ties and errors left out",
        **{k: s[k] for k in keep},
    }


def row_result(outcomes: Sequence[str | None]) -> str:
    """Best-of-N for one RewardBench 2 row from its pairs' outcomes: a lost pair makes a loss, else
    a tied pair a tie, else a pair left out (an error under ``exclude``) leaves the row undecided,
    else the row is a win (the chosen response beat every rejected one)."""
    if "loss" in outcomes:
        return "loss"
    if "tie" in outcomes:
        return "tie"
    if None in outcomes or not outcomes:
        return "undecided"
    return "win"


def _tally(results: list[str]) -> dict:
    n = {k: results.count(k) for k in ("win", "tie", "loss", "undecided")}
    decided = n["win"] + n["tie"] + n["loss"]
    return {
        "rows": len(results),
        "wins": n["win"],
        "ties": n["tie"],
        "losses": n["loss"],
        "undecided": n["undecided"],
        "accuracy": n["win"] / decided if decided else None,
        # the OpenRS release's win rate: ties left out of the denominator (not RewardBench 2's rule)
        "win_rate_ties_excluded": n["win"] / (n["win"] + n["loss"]) if n["win"] + n["loss"] else None,
    }


def score_rewardbench2(
    pairs: Sequence[dict], verdicts: Sequence[str], labels: Sequence[str], error_policy: str
) -> dict:
    """Best-of-N accuracy: a row is a win when its chosen response beats every rejected one (a
    tie, an error under ``tie``, or a loss in any pair makes it no win); an undecided row (an error
    under ``exclude`` and every other pair won) is left out.  Accuracy = wins / decided rows, per
    subset; ``score`` = the mean of the subset accuracies, ``accuracy`` = over all decided rows."""
    check_error_policy(error_policy)
    results: dict[str, list[str]] = {}
    overall: list[str] = []
    rows_with_errors = 0
    for _rid, items in _by_row(pairs, verdicts, labels).items():
        res = row_result([pair_outcome(v, l, error_policy) for _, v, l in items])
        results.setdefault(items[0][0]["group"], []).append(res)
        overall.append(res)
        rows_with_errors += any(v == "error" for _, v, _ in items)
    by_subset = {k: _tally(v) for k, v in sorted(results.items())}
    accs = [t["accuracy"] for t in by_subset.values() if t["accuracy"] is not None]
    total = _tally(overall)
    return {
        "score": sum(accs) / len(accs) if accs else 0.0,
        "score_name": "mean over subsets of best-of-N accuracy (chosen beats every rejected; a tie is no win)",
        "subset_mean": sum(accs) / len(accs) if accs else None,
        **total,
        "rows_with_errors": rows_with_errors,
        "error_pairs": sum(v == "error" for v in verdicts),
        "by_subset": by_subset,
    }


def rmbench_counts(cells: Sequence[tuple[int, int, str | None]]) -> tuple[list[list[int]], list[list[int]]]:
    """(wins, counted) 3x3 tables from (chosen style, rejected style, outcome) triples; an outcome
    of None (left out) adds to neither, a tie or a loss adds to ``counted`` only."""
    k = len(RMBENCH_STYLES)
    wins = [[0] * k for _ in range(k)]
    counted = [[0] * k for _ in range(k)]
    for i, j, outcome in cells:
        if outcome is None:
            continue
        counted[i][j] += 1
        wins[i][j] += outcome == "win"
    return wins, counted


def rmbench_accuracy(wins: Sequence[Sequence[int]], counted: Sequence[Sequence[int]]) -> dict:
    """M = wins / counted per cell (None where no row counts); hard = the mean of the cells with
    i < j (chosen plainer than rejected), normal = the diagonal, easy = i > j; a cell without a
    counted row is left out of its mean."""
    k = len(RMBENCH_STYLES)
    m = [[wins[i][j] / counted[i][j] if counted[i][j] else None for j in range(k)] for i in range(k)]

    def mean(cells):
        vals = [m[i][j] for i, j in cells if m[i][j] is not None]
        return sum(vals) / len(vals) if vals else None

    idx = [(i, j) for i in range(k) for j in range(k)]
    hard = mean([(i, j) for i, j in idx if i < j])
    normal = mean([(i, j) for i, j in idx if i == j])
    easy = mean([(i, j) for i, j in idx if i > j])
    parts = [x for x in (hard, normal, easy) if x is not None]
    return {
        "hard": hard,
        "normal": normal,
        "easy": easy,
        "average": sum(parts) / len(parts) if parts else None,
        "matrix": m,
        "counted": [list(r) for r in counted],
    }


def score_rmbench(pairs: Sequence[dict], verdicts: Sequence[str], labels: Sequence[str], error_policy: str) -> dict:
    """RM-Bench's style matrix over all rows, per domain, and per domain group (the part of the
    domain before '-': safety-refuse and safety-response pool into safety)."""
    check_error_policy(error_policy)
    groups: dict[str, list] = {}
    cells_all: list = []
    rows = rows_with_errors = 0
    for _rid, items in _by_row(pairs, verdicts, labels).items():
        rows += 1
        rows_with_errors += any(v == "error" for _, v, _ in items)
        cells = [(b["i"], b["j"], pair_outcome(v, l, error_policy)) for b, v, l in items]
        groups.setdefault(items[0][0]["group"], []).append(cells)
        cells_all += cells

    def acc(list_of_cells) -> dict:
        flat = [c for cells in list_of_cells for c in cells]
        return {"rows": len(list_of_cells), **rmbench_accuracy(*rmbench_counts(flat))}

    by_group: dict[str, list] = {}
    for g, v in groups.items():
        by_group.setdefault(g.split("-")[0], []).extend(v)
    total = {"rows": rows, **rmbench_accuracy(*rmbench_counts(cells_all))}
    return {
        "score": total["average"] if total["average"] is not None else 0.0,
        "score_name": "mean of hard, normal and easy accuracy (RM-Bench style matrix, all rows)",
        **total,
        "styles": list(RMBENCH_STYLES),
        "rows_with_errors": rows_with_errors,
        "error_pairs": sum(v == "error" for v in verdicts),
        "tie_pairs": sum(pair_outcome(v, l, error_policy) == "tie" for v, l in zip(verdicts, labels)),
        "by_domain": {g: acc(v) for g, v in sorted(groups.items())},
        "by_domain_group": {g: acc(v) for g, v in sorted(by_group.items())},
    }


# ----------------------------------------------------------------------------------------------
# One line per benchmark for the CLI.
# ----------------------------------------------------------------------------------------------
def _f(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def _describe_pairwise(s: dict) -> str:
    return f"pairwise accuracy {_f(s['score'])} over {s['wins'] + s['losses']} decided pairs"


def _describe_rewardbench2(s: dict) -> str:
    subsets = "  ".join(f"{k} {_f(v['accuracy'])} ({v['rows']})" for k, v in s["by_subset"].items())
    return (
        f"best-of-N: subset mean {_f(s['subset_mean'])}  all rows {_f(s['accuracy'])} "
        f"(wins {s['wins']}, ties {s['ties']}, losses {s['losses']}, undecided {s['undecided']})  {subsets}"
    )


def _describe_rmbench(s: dict) -> str:
    domains = "  ".join(f"{k} {_f(v['average'])}" for k, v in s["by_domain"].items())
    return (
        f"hard {_f(s['hard'])}  normal {_f(s['normal'])}  easy {_f(s['easy'])}  average {_f(s['average'])} "
        f"({s['rows']} rows)  {domains}"
    )


BENCHMARKS: dict[str, Benchmark] = {
    "judgebench": Benchmark("judgebench", read_judgebench, score_pairwise, "exclude", _describe_pairwise),
    "ppe": Benchmark("ppe", read_judgebench, score_pairwise, "exclude", _describe_pairwise),
    "rewardbench2": Benchmark("rewardbench2", read_rewardbench2, score_rewardbench2, "tie", _describe_rewardbench2),
    "rmbench": Benchmark("rmbench", read_rmbench, score_rmbench, "exclude", _describe_rmbench),
}


def get_benchmark(name: str) -> Benchmark:
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r} (known: {', '.join(BENCHMARKS)})")
    return BENCHMARKS[name]
