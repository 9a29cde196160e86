"""Advantage estimators vs plain-Python references written here from the spec."""

import functools
import math

import jax
import numpy as np
import pytest

from clipo_jax.rl import (
    ADVANTAGE_ESTIMATORS,
    UnknownNameError,
    compute_advantages,
    register_advantage,
)

EPS = 1e-6


# ------------------------------------------------------------------ python references


def _groups(rewards, g, valid):
    for start in range(0, len(rewards), g):
        idx = [i for i in range(start, start + g) if valid[i]]
        yield idx, [float(rewards[i]) for i in idx]


def _stats(vals):
    """Group mean / ddof=1 std, with the spec's convention for a lone response."""
    if len(vals) < 2:
        return 0.0, 1.0
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))
    return mean, std


def ref_grpo(rewards, g, valid, norm_by_std=True):
    out = [0.0] * len(rewards)
    for idx, vals in _groups(rewards, g, valid):
        mean, std = _stats(vals)
        for i, v in zip(idx, vals):
            out[i] = (v - mean) / (std + EPS) if norm_by_std else v - mean
    return np.array(out)


def ref_dr_grpo(rewards, g, valid):
    return ref_grpo(rewards, g, valid, norm_by_std=False)


def ref_rloo(rewards, g, valid):
    out = [0.0] * len(rewards)
    for idx, vals in _groups(rewards, g, valid):
        for k, (i, v) in enumerate(zip(idx, vals)):
            others = [w for j, w in enumerate(vals) if j != k]
            out[i] = v - (sum(others) / len(others) if others else 0.0)
    return np.array(out)


def ref_reinforce_pp(rewards, g, valid):
    centred = {}
    for idx, vals in _groups(rewards, g, valid):
        mean, _ = _stats(vals)
        for i, v in zip(idx, vals):
            centred[i] = v - mean
    vals = list(centred.values())
    mean, std = _stats(vals) if len(vals) >= 2 else (0.0, 1.0)
    out = [0.0] * len(rewards)
    for i, c in centred.items():
        out[i] = (c - mean) / (std + EPS)
    return np.array(out)


REFS = {"grpo": ref_grpo, "dr_grpo": ref_dr_grpo, "rloo": ref_rloo, "reinforce_pp": ref_reinforce_pp}


# ------------------------------------------------------------------------------ tests


@pytest.mark.parametrize("name", sorted(REFS))
@pytest.mark.parametrize("group_size", [1, 2, 5])
def test_matches_reference_continuous(name, group_size):
    rng = np.random.default_rng(group_size)
    rewards = rng.normal(size=4 * group_size).astype(np.float32)
    valid = np.ones_like(rewards, bool)
    got = np.asarray(compute_advantages(name, rewards, group_size))
    np.testing.assert_allclose(got, REFS[name](rewards, group_size, valid), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(REFS))
def test_matches_reference_binary_with_ties_and_invalid(name):
    # Group 0 all ties, group 1 mixed, group 2 one valid response, group 3 no valid.
    rewards = np.array([1, 1, 1, 1, 1, 0, 0, 1, 1, 1, 0, 0, 7, 7, 7, 7], np.float32)
    valid = np.array([1, 1, 1, 1, 1, 1, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0], bool)
    got = np.asarray(compute_advantages(name, rewards, 4, valid=valid))
    np.testing.assert_allclose(got, REFS[name](rewards, 4, valid), rtol=1e-5, atol=1e-5)
    assert np.all(got[~valid] == 0.0)


def test_grpo_group_of_one_keeps_raw_reward():
    rewards = np.array([0.0, 1.0, -2.5, 3.0], np.float32)
    got = np.asarray(compute_advantages("grpo", rewards, 1))
    # mean 0, std 1 for a lone response: A = r / (1 + eps)
    np.testing.assert_allclose(got, rewards / (1 + EPS), rtol=1e-6)


def test_grpo_ties_give_zero_and_mixed_group_is_standardised():
    got = np.asarray(compute_advantages("grpo", np.array([1, 1, 1, 0, 1, 0], np.float32), 3))
    np.testing.assert_array_equal(got[:3], 0.0)
    # ddof=1: values 0,1,0 -> mean 1/3, std sqrt(1/3); check zero mean and unit sample std.
    assert abs(got[3:].sum()) < 1e-5
    assert abs(np.std(got[3:], ddof=1) - 1.0) < 1e-4


def test_grpo_norm_by_std_false_equals_dr_grpo():
    rewards = np.random.default_rng(0).uniform(size=12).astype(np.float32)
    a = compute_advantages("grpo", rewards, 4, norm_by_std=False)
    b = compute_advantages("dr_grpo", rewards, 4)
    np.testing.assert_allclose(a, b, rtol=1e-6)
    np.testing.assert_allclose(a, ref_dr_grpo(rewards, 4, np.ones(12, bool)), rtol=1e-5, atol=1e-6)


def test_rloo_is_scaled_grpo_centering():
    # A_rloo = G/(G-1) * (r - mean): a second, algebraic check.
    rewards = np.random.default_rng(1).normal(size=15).astype(np.float32)
    g = 5
    centred = rewards.reshape(-1, g) - rewards.reshape(-1, g).mean(1, keepdims=True)
    got = np.asarray(compute_advantages("rloo", rewards, g)).reshape(-1, g)
    np.testing.assert_allclose(got, centred * g / (g - 1), rtol=1e-5, atol=1e-6)


def test_reinforce_pp_whitened_over_batch():
    rewards = np.random.default_rng(2).normal(size=16).astype(np.float32)
    got = np.asarray(compute_advantages("reinforce_pp", rewards, 4))
    assert abs(got.mean()) < 1e-5 and abs(got.std(ddof=1) - 1) < 1e-4


def test_invalid_rows_with_nan_do_not_leak():
    rewards = np.array([1.0, np.nan, 0.0, 2.0], np.float32)
    valid = np.array([1, 0, 1, 1], bool)
    for name in REFS:
        got = np.asarray(compute_advantages(name, rewards, 2, valid=valid))
        assert np.all(np.isfinite(got)), name
        np.testing.assert_allclose(got, REFS[name](np.nan_to_num(rewards), 2, valid), rtol=1e-5, atol=1e-5)


def test_reinforce_pp_single_valid_response_unnormalised():
    rewards = np.array([2.0, 5.0, 1.0, 1.0], np.float32)
    valid = np.array([1, 0, 0, 0], bool)
    got = np.asarray(compute_advantages("reinforce_pp", rewards, 2, valid=valid))
    np.testing.assert_allclose(got, ref_reinforce_pp(rewards, 2, valid), rtol=1e-6)
    assert abs(got[0] - 2.0) < 1e-5


def test_jittable():
    rewards = np.random.default_rng(3).normal(size=8).astype(np.float32)
    fn = jax.jit(functools.partial(compute_advantages, "grpo", group_size=4))
    np.testing.assert_allclose(fn(rewards), ref_grpo(rewards, 4, np.ones(8, bool)), rtol=1e-5, atol=1e-6)


def test_unknown_name_is_one_line_and_lists_valid():
    with pytest.raises(UnknownNameError) as err:
        compute_advantages("gpro", np.zeros(4), 2)
    msg = str(err.value)
    assert "\n" not in msg and "'gpro'" in msg
    for name in ("grpo", "dr_grpo", "rloo", "reinforce_pp"):
        assert name in msg
    assert isinstance(err.value, ValueError)


@pytest.mark.parametrize(
    "rewards,group_size,match",
    [(np.zeros(5), 2, "multiple of group_size"), (np.zeros((2, 2)), 2, r"\[batch\]"), (np.zeros(4), 0, "group_size")],
)
def test_bad_shapes(rewards, group_size, match):
    with pytest.raises(ValueError, match=match):
        compute_advantages("grpo", rewards, group_size)


def test_register_custom_estimator():
    @register_advantage("test_max_baseline")
    def max_baseline(rewards, valid):
        return rewards - rewards.max(axis=1, keepdims=True)

    try:
        got = np.asarray(compute_advantages("test_max_baseline", np.array([1.0, 3.0, 2.0, 2.0]), 2))
        np.testing.assert_allclose(got, [-2.0, 0.0, 0.0, 0.0])
    finally:
        del ADVANTAGE_ESTIMATORS["test_max_baseline"]
