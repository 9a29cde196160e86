"""Labelled preference pairs, a rubric's fitness on them, and judging pairs under a rubric.

Shared by the evolutionary loop (``evolution.py``) and the human review (``review.py``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Any, Sequence

from clipo_jax.rubrics.meta_rubric import MetaRubric
from clipo_jax.rubrics.pairs import RowError, read_pair_rows, to_pair
from clipo_jax.rubrics.types import PairInput, PairResult


class RefineError(ValueError):
    """Bad refinement input (data rows, configuration, an edit that cannot be applied)."""


# ----------------------------------------------------------------------------------------------
# Labelled preference pairs.
# ----------------------------------------------------------------------------------------------


def load_preference_pairs(path: str | os.PathLike, limit: int = 0, seed: int = 0) -> list[tuple[PairInput, str]]:
    """JudgeBench-format JSONL -> [(pair, correct verdict)].

    Rows need string ``prompt``, ``chosen``, ``rejected``; optional ``question_id``,
    ``query_type``, ``ground_truth``.  The chosen response is shown first or second by a coin
    seeded per pair, so a position-biased judge cannot score well.
    """
    try:
        rows = read_pair_rows(path, limit)
    except OSError as e:
        raise RefineError(f"{path}: cannot read pairs file: {e.strerror}") from None
    except RowError as e:
        raise RefineError(str(e)) from None
    out = [to_pair(row, seed) for row in rows]
    ids = [p.pair_id for p, _ in out]
    if len(set(ids)) != len(ids):
        raise RefineError(f"{path}: duplicate question_id values")
    return out


# ----------------------------------------------------------------------------------------------
# Fitness.
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Fitness:
    fitness: float  # wins / (wins + losses + errors) - length_penalty * length_chars / 1000
    accuracy: float  # wins / (wins + losses); 0 when nothing was decided (as JudgeBench reports)
    wins: int
    losses: int
    same: int
    length_chars: int
    correct: tuple[bool, ...] = ()  # per pair, in input order (for examples shown to the LLM)
    errors: int = 0  # pairs whose judgment failed ("error" verdicts): out of ``accuracy``, wrong in ``fitness``

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("correct")
        return d


def rubric_length(rubric: MetaRubric) -> int:
    """Characters of the rendering the judge sees."""
    return len(rubric.render())


def compute_fitness(
    verdicts: Sequence[str], labels: Sequence[str], length_chars: int, length_penalty: float
) -> Fitness:
    """``accuracy``: ties and errors left out (the ``"exclude"`` error policy, the number JudgeBench
    reports).  ``fitness``, which ranks and selects variants: ties left out, an error counted as a
    wrong verdict, minus the length penalty.  A failed judgment is no evidence for a rubric: were
    errors left out, a variant under which the judge fails on the hard pairs (a prompt grown past
    the context, output that no longer parses) would score the accuracy of the easy pairs alone."""
    wins = sum(v == l for v, l in zip(verdicts, labels))
    same = sum(v == "same" for v in verdicts)
    errors = sum(v == "error" for v in verdicts)
    losses = len(verdicts) - wins - same - errors
    acc = wins / (wins + losses) if wins + losses else 0.0
    acc_errors_wrong = wins / (wins + losses + errors) if wins + losses + errors else 0.0
    return Fitness(
        acc_errors_wrong - length_penalty * length_chars / 1000.0,
        acc,
        wins,
        losses,
        same,
        length_chars,
        tuple(v == l for v, l in zip(verdicts, labels)),
        errors,
    )


def rubric_id(rubric: MetaRubric) -> str:
    return hashlib.sha256(rubric.to_toml().encode()).hexdigest()[:12]


def with_rubric(pair: PairInput, rubric: MetaRubric) -> PairInput:
    """The pair judged under ``rubric``: general principles override, or the domain file (and
    the routing forced to that domain) for any other name."""
    if rubric.name == "general":
        return dataclasses.replace(pair, general=rubric)
    return dataclasses.replace(pair, meta_rubric=rubric, domain=rubric.name)


async def judge_under(judge, rubric: MetaRubric, pairs: Sequence[PairInput]) -> list[PairResult]:
    return await judge.judge_pairs([with_rubric(p, rubric) for p in pairs])
