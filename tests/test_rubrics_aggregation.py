"""Aggregation (OpenRS paper, arXiv 2602.14069: criterion aggregation to A/B swap debiasing and verdict) against an independent plain-Python reference."""

import random

import numpy as np
import pytest

from clipo_jax.rubrics import score_comparison, verdict
from clipo_jax.rubrics.aggregation import (
    FIRST,
    SAME,
    SECOND,
    CriterionError,
    aggregate_scores,
    batch_verdicts,
    pad_criteria,
)

WEIGHT = {"core": 5, "important": 2, "highlight": 1}


def reference_score(criteria):
    """OpenRS paper: criterion aggregation written out literally, independently of the library code."""
    if criteria is None:
        return 0.0
    kept = [c for c in criteria if int(c["score"]) != 0]
    signed = []
    for c in kept:
        mag = abs(int(c["score"]))
        sign = {"A": 1, "B": -1, "S": 0}[c["label"]]
        signed.append((c["type"], sign * mag))
    crit = [v for t, v in signed if t == "critical"]
    if crit:
        return float(sum(crit))
    num = sum(WEIGHT.get(t, 2) * v for t, v in signed)
    den = sum(WEIGHT.get(t, 2) for t, v in signed)
    return num / (den + 1e-6)


def reference_verdict(f, b, m):
    if f > m and b <= -m:
        return "first"
    if f <= -m and b > m:
        return "second"
    return "same"


def random_criteria(rng, n_max=12, types=("core", "important", "highlight", "critical", "weird")):
    if rng.random() < 0.1:
        return None
    return [
        {"type": rng.choice(types), "label": rng.choice("ABS"), "score": rng.randint(-2, 2)}
        for _ in range(rng.randint(0, n_max))
    ]


def test_hand_built_cases():
    # Label decides the sign, not the score's sign: label B with score +2 is a B win.
    assert score_comparison([{"type": "core", "label": "B", "score": 2}]) == pytest.approx(-2, abs=1e-5)
    # Weighted mean: core A 2 (w5), highlight B 1 (w1) -> (10 - 1) / 6.
    assert score_comparison(
        [{"type": "core", "label": "A", "score": 2}, {"type": "highlight", "label": "B", "score": -1}]
    ) == pytest.approx(1.5, abs=1e-5)
    # A critical labelled S vetoes everything else and contributes 0.
    assert (
        score_comparison([{"type": "core", "label": "A", "score": 2}, {"type": "critical", "label": "S", "score": 1}])
        == 0.0
    )
    # Critical sum is plain (not normalised).
    assert (
        score_comparison(
            [
                {"type": "critical", "label": "B", "score": 2},
                {"type": "critical", "label": "B", "score": 1},
                {"type": "core", "label": "A", "score": 2},
            ]
        )
        == -3.0
    )
    # Score 0 is skipped, even for a critical item (no veto then).
    assert score_comparison(
        [{"type": "critical", "label": "B", "score": 0}, {"type": "important", "label": "A", "score": 1}]
    ) == pytest.approx(1, abs=1e-5)
    # Unknown type weighs like important.
    assert score_comparison(
        [{"type": "??", "label": "A", "score": 2}, {"type": "highlight", "label": "B", "score": 2}]
    ) == pytest.approx(2 * (2 - 1) / 3, abs=1e-5)
    assert score_comparison(None) == 0.0
    assert score_comparison([]) == 0.0


def test_bad_criterion_raises_clear_error():
    with pytest.raises(CriterionError, match="criterion 0: label"):
        score_comparison([{"type": "core", "label": "C", "score": 1}])
    with pytest.raises(CriterionError, match="score"):
        score_comparison([{"type": "core", "label": "A", "score": "two"}])


def test_verdict_table():
    assert verdict(1.0, -1.0) == "first"
    assert verdict(1.0, 0.0) == "first"  # win + tie is a win at m = 0
    assert verdict(0.0, 0.5) == "second"
    assert verdict(1.0, 1.0) == "same"  # position bias: both orders prefer A
    assert verdict(0.0, 0.0) == "same"
    assert verdict(0.4, -1.0, min_score=0.5) == "same"
    assert verdict(0.6, -0.5, min_score=0.5) == "first"
    assert verdict(-0.5, 0.6, min_score=0.5) == "second"


def test_plain_matches_reference_random():
    rng = random.Random(0)
    for _ in range(500):
        crit = random_criteria(rng)
        assert score_comparison(crit) == pytest.approx(reference_score(crit), abs=1e-9)


def test_jitted_matches_reference_random():
    rng = random.Random(1)
    batch = [random_criteria(rng, n_max=20) for _ in range(3000)]
    arrays = pad_criteria(batch)
    assert arrays["types"].shape == (3000, 32)  # bucketed to a power of two
    got = np.asarray(aggregate_scores(**arrays))
    want = np.array([reference_score(c) for c in batch])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert (~arrays["parse_ok"]).sum() > 0 and np.all(got[~arrays["parse_ok"]] == 0)


def test_batch_verdicts_match_reference():
    rng = np.random.default_rng(2)
    f = rng.choice([-2, -1, -0.5, 0, 0.5, 1, 2], size=2000).astype(np.float32)
    b = rng.choice([-2, -1, -0.5, 0, 0.5, 1, 2], size=2000).astype(np.float32)
    code = {"first": FIRST, "second": SECOND, "same": SAME}
    for m in (0.0, 0.5, 1.0):
        got = np.asarray(batch_verdicts(f, b, m))
        want = np.array([code[reference_verdict(x, y, m)] for x, y in zip(f, b)])
        np.testing.assert_array_equal(got, want)


def test_pad_rejects_too_many_criteria():
    with pytest.raises(CriterionError, match="max_criteria"):
        pad_criteria([[{"type": "core", "label": "A", "score": 1}] * 5], max_criteria=4)
