"""OpenRS aggregation: criterion-wise judgments -> one A-side score -> a verdict.

Two entry points over the same rule (OpenRS paper, arXiv 2602.14069: criterion aggregation to A/B swap debiasing and verdict):

* ``score_comparison(criteria)`` / ``verdict(f, b, m)`` — plain Python, one pair at a time.
* ``aggregate_scores(types, labels, scores, mask, parse_ok)`` and ``batch_verdicts`` — jitted and
  vectorised over padded ``[pairs, criteria]`` arrays, so a whole RL batch (thousands of pairs)
  is scored in one call.

The rule: the signed value of a criterion is ``+|score|`` for label A, ``-|score|`` for label B,
``0`` for S (the sign comes from the label, never from the score). Criteria with score 0 are
skipped (for every type, critical included). If any non-skipped critical criterion is present the
result is the plain sum of the critical values (a critical labelled S adds 0 but still vetoes).
Otherwise ``sum(w * v) / (sum(w) + 1e-6)`` with weights core 5, important 2, highlight 1; an
unknown type counts as important. A failed parse scores 0 (a tie) and is counted by the caller.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

# Integer codes used in the padded arrays.  Order matters only through TYPE_WEIGHTS.
TYPE_CODES = {"core": 0, "important": 1, "highlight": 2, "critical": 3}
TYPE_WEIGHTS = {"core": 5.0, "important": 2.0, "highlight": 1.0}
LABEL_SIGNS = {"A": 1, "B": -1, "S": 0}
EPS = 1e-6

# Verdict codes of ``batch_verdicts``.
FIRST, SAME, SECOND = 1, 0, -1
VERDICT_NAMES = {FIRST: "first", SAME: "same", SECOND: "second"}


class CriterionError(ValueError):
    """A criterion dict that cannot be aggregated (bad label / score)."""


def type_code(type_name: Any) -> int:
    """Unknown or missing types count as ``important`` (OpenRS paper, arXiv 2602.14069: criterion aggregation)."""
    return TYPE_CODES.get(str(type_name).strip().lower(), TYPE_CODES["important"])


def label_sign(label: Any, where: str = "criterion") -> int:
    key = str(label).strip().upper()
    if key not in LABEL_SIGNS:
        raise CriterionError(f"{where}: label must be one of A / B / S, got {label!r}")
    return LABEL_SIGNS[key]


def _score_int(score: Any, where: str) -> int:
    if isinstance(score, bool) or not isinstance(score, (int, float, np.integer, np.floating)):
        raise CriterionError(f"{where}: score must be a number in -2..2, got {score!r}")
    return int(round(float(score)))


def score_comparison(criteria: Sequence[Mapping[str, Any]] | None) -> float:
    """A-side score of one judged direction, in [-2, 2] (or the critical sum under a veto).

    Args:
      criteria: a list of dicts with ``type`` (core / important / highlight / critical),
        ``label`` (A / B / S) and ``score`` (int); ``None`` means the judge output failed to
        parse, which scores 0 (a tie — the caller counts it).
    Returns:
      > 0 when response A is better, < 0 when B is better, 0 for a tie.
    """
    if criteria is None:
        return 0.0
    weighted, weight_sum, critical_sum, vetoed = 0.0, 0.0, 0.0, False
    for i, item in enumerate(criteria):
        where = f"criterion {i}"
        score = _score_int(item.get("score"), where)
        if score == 0:
            continue  # skipped, whatever the type
        value = label_sign(item.get("label"), where) * abs(score)
        code = type_code(item.get("type"))
        if code == TYPE_CODES["critical"]:
            vetoed = True
            critical_sum += value
            continue
        w = (5.0, 2.0, 1.0)[code]
        weighted += w * value
        weight_sum += w
    if vetoed:
        return float(critical_sum)
    return weighted / (weight_sum + EPS)


def check_min_score(min_score: Any) -> float:
    """``min_score`` as a float; ValueError unless it is finite and >= 0.  With m < 0 both
    conditions of ``verdict`` can hold and the first one wins: f = b = 0 (a tie in both orders)
    would be a win of whichever response is shown first, and swapping the pair would not swap
    the verdict."""
    try:
        m = float(min_score)
    except (TypeError, ValueError):
        m = float("nan")
    if not np.isfinite(m) or m < 0:
        raise ValueError(f"verdict threshold min_score must be a finite number >= 0, got {min_score!r}")
    return m


def verdict(forward: float, backward: float, min_score: float = 0.0) -> str:
    """Bi-directional verdict (OpenRS paper, arXiv 2602.14069: A/B swap debiasing and verdict).

    ``forward`` is the A-side score with A = first response, ``backward`` the A-side score with
    A = second response.  Returns "first", "second" or "same".  ``min_score`` (m) must be a
    finite number >= 0: a negative m makes a tie in both orders a win of the first response.
    """
    m = check_min_score(min_score)
    if forward > m and backward <= -m:
        return "first"
    if forward <= -m and backward > m:
        return "second"
    return "same"


# ----------------------------------------------------------------------------------------------
# Vectorised, jitted path.
# ----------------------------------------------------------------------------------------------


@jax.jit
def aggregate_scores(
    types: jax.Array, labels: jax.Array, scores: jax.Array, mask: jax.Array, parse_ok: jax.Array
) -> jax.Array:
    """A-side score of many judged directions at once.

    Args:
      types: int [pairs, criteria] — TYPE_CODES (0 core, 1 important, 2 highlight, 3 critical).
      labels: int [pairs, criteria] — +1 for A, -1 for B, 0 for S.
      scores: int [pairs, criteria] — raw judge scores (only |score| and score == 0 matter).
      mask: bool [pairs, criteria] — True for real criteria, False for padding.
      parse_ok: bool [pairs] — False where the judge output failed to parse (scores 0).
    Returns:
      float32 [pairs] scores.
    """
    scores = scores.astype(jnp.float32)
    active = mask & (scores != 0)
    value = jnp.sign(labels).astype(jnp.float32) * jnp.abs(scores)
    is_critical = types == TYPE_CODES["critical"]
    weights = jnp.asarray([5.0, 2.0, 1.0, 0.0], jnp.float32)[jnp.clip(types, 0, 3)]
    soft = active & ~is_critical
    weighted = jnp.sum(jnp.where(soft, weights * value, 0.0), axis=-1)
    weight_sum = jnp.sum(jnp.where(soft, weights, 0.0), axis=-1)
    crit = active & is_critical
    critical_sum = jnp.sum(jnp.where(crit, value, 0.0), axis=-1)
    result = jnp.where(jnp.any(crit, axis=-1), critical_sum, weighted / (weight_sum + EPS))
    return jnp.where(parse_ok, result, 0.0)


def batch_verdicts(forward: jax.Array, backward: jax.Array, min_score: float | jax.Array = 0.0) -> jax.Array:
    """Vectorised ``verdict``: int32 [pairs] with FIRST (+1), SAME (0), SECOND (-1).  A concrete
    ``min_score`` is checked as in ``verdict`` (a traced one cannot be)."""
    if not isinstance(min_score, jax.core.Tracer):
        m = np.asarray(min_score, np.float64)  # a scalar or one threshold per pair
        if not (np.all(np.isfinite(m)) and np.all(m >= 0)):
            raise ValueError(f"verdict threshold min_score must be finite numbers >= 0, got {min_score!r}")
    return _batch_verdicts(forward, backward, min_score)


@jax.jit
def _batch_verdicts(forward: jax.Array, backward: jax.Array, min_score: float | jax.Array = 0.0) -> jax.Array:
    first = (forward > min_score) & (backward <= -min_score)
    second = (forward <= -min_score) & (backward > min_score)
    return jnp.where(first, FIRST, jnp.where(second, SECOND, SAME)).astype(jnp.int32)


def pad_criteria(
    batch: Iterable[Sequence[Mapping[str, Any]] | None], max_criteria: int | None = None
) -> dict[str, np.ndarray]:
    """Turns a list of criterion lists (None = parse failure) into padded numpy arrays.

    The criteria axis is padded to a power of two (at least 16) so that jit compiles once per
    bucket rather than once per batch.  Returns dict(types, labels, scores, mask, parse_ok).
    """
    batch = list(batch)
    longest = max([len(c) for c in batch if c is not None] + [1])
    width = max_criteria or max(16, 1 << (longest - 1).bit_length())
    if longest > width:
        raise CriterionError(f"a judgment has {longest} criteria, more than max_criteria={width}")
    n = len(batch)
    out = {
        "types": np.zeros((n, width), np.int32),
        "labels": np.zeros((n, width), np.int32),
        "scores": np.zeros((n, width), np.int32),
        "mask": np.zeros((n, width), bool),
        "parse_ok": np.zeros((n,), bool),
    }
    for p, criteria in enumerate(batch):
        if criteria is None:
            continue
        out["parse_ok"][p] = True
        for c, item in enumerate(criteria):
            where = f"pair {p} criterion {c}"
            out["types"][p, c] = type_code(item.get("type"))
            out["labels"][p, c] = label_sign(item.get("label"), where)
            out["scores"][p, c] = _score_int(item.get("score"), where)
            out["mask"][p, c] = True
    return out
