"""Labelled preference pairs in the JudgeBench JSONL format (prompt, chosen, rejected, ...)."""

from __future__ import annotations

import json
import os
import random

from clipo_jax.rubrics.judge import PairInput


class RowError(ValueError):
    """A malformed row; the message names the file and line."""


def read_pair_rows(path: str | os.PathLike, limit: int = 0) -> list[dict]:
    """Rows with string prompt/chosen/rejected; question_id defaults to 'row<line>'."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise RowError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise RowError(f"{path}:{lineno}: a row must be a JSON object")
            for key in ("prompt", "chosen", "rejected"):
                if not isinstance(row.get(key), str):
                    raise RowError(f"{path}:{lineno}: field '{key}' must be a string")
            row.setdefault("question_id", f"row{lineno}")
            rows.append(row)
            if limit and len(rows) >= limit:
                break
    return rows


def to_pair(row: dict, seed: int) -> tuple[PairInput, str]:
    """Chosen shown first or second by a per-pair seeded coin (so a position-biased judge cannot
    score well); returns (pair, correct verdict)."""
    swap = random.Random(f"{seed}:{row['question_id']}").random() < 0.5
    first, second = (row["rejected"], row["chosen"]) if swap else (row["chosen"], row["rejected"])
    constraints = row.get("constraints") if isinstance(row.get("constraints"), list) else None
    pair = PairInput(
        row["prompt"],
        first,
        second,
        query_type=row.get("query_type"),
        ground_truth=row.get("ground_truth") or None,
        constraints=constraints,
        pair_id=str(row["question_id"]),
    )
    return pair, ("second" if swap else "first")
