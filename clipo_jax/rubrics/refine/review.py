"""Human-in-the-loop review of a domain edit: judge the same pairs under the old and the proposed
file (the backend caches judge calls), list the pairs whose verdict flips, and record a person's
accept / reject decision (``write_review_record``)."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import os
import pathlib
import time
from typing import Any, Sequence

from clipo_jax.rubrics.meta_rubric import load_meta_rubric
from clipo_jax.rubrics.refine.fitness import Fitness, RefineError, compute_fitness, judge_under, rubric_length
from clipo_jax.rubrics.types import PairInput


@dataclasses.dataclass(frozen=True)
class Flip:
    pair_id: str
    label: str
    old_verdict: str
    new_verdict: str

    @property
    def effect(self) -> str:
        was, now = self.old_verdict == self.label, self.new_verdict == self.label
        return "fixed" if now and not was else ("broken" if was and not now else "changed")


@dataclasses.dataclass
class ReviewReport:
    old_path: str
    new_path: str
    old_sha256: str
    new_sha256: str
    n_pairs: int
    old: Fitness
    new: Fitness
    flips: list[Flip]

    def as_dict(self) -> dict[str, Any]:
        return {
            "old_path": self.old_path,
            "new_path": self.new_path,
            "old_sha256": self.old_sha256,
            "new_sha256": self.new_sha256,
            "n_pairs": self.n_pairs,
            "old": self.old.as_dict(),
            "new": self.new.as_dict(),
            "flips": [dict(dataclasses.asdict(f), effect=f.effect) for f in self.flips],
        }


def _sha256(path: str | os.PathLike) -> str:
    return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()


async def review_edit(
    judge, old_path: str | os.PathLike, new_path: str | os.PathLike, pairs: Sequence[tuple[PairInput, str]]
) -> ReviewReport:
    """Judges ``pairs`` under the old and the proposed rubric file; lists the flipped verdicts."""
    old, new = load_meta_rubric(old_path), load_meta_rubric(new_path)
    if old.name != new.name:
        raise RefineError(f"{new_path}: the edit renames the meta-rubric ({old.name!r} -> {new.name!r})")
    plain = [p for p, _ in pairs]
    labels = [l for _, l in pairs]
    before, after = await asyncio.gather(judge_under(judge, old, plain), judge_under(judge, new, plain))
    flips = [
        Flip(p.pair_id, l, a.verdict, b.verdict)
        for p, l, a, b in zip(plain, labels, before, after)
        if a.verdict != b.verdict
    ]
    return ReviewReport(
        str(old_path),
        str(new_path),
        _sha256(old_path),
        _sha256(new_path),
        len(pairs),
        compute_fitness([r.verdict for r in before], labels, rubric_length(old), 0.0),
        compute_fitness([r.verdict for r in after], labels, rubric_length(new), 0.0),
        flips,
    )


def write_review_record(
    path: str | os.PathLike, report: ReviewReport, decision: str, reviewer: str, note: str = ""
) -> dict[str, Any]:
    """Appends one JSON line recording a person's decision on an edit."""
    if decision not in ("accept", "reject"):
        raise RefineError(f"decision must be 'accept' or 'reject', got {decision!r}")
    rec = {
        "decision": decision,
        "reviewer": reviewer,
        "note": note,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **report.as_dict(),
    }
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return rec
