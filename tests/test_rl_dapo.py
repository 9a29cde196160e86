"""DAPO extras: group std filter, dynamic sampling loop, overlong shaping, truncation mask."""

import jax.numpy as jnp
import numpy as np
import pytest

from clipo_jax.rl import (
    DynamicSamplingError,
    compute_advantages,
    dynamic_sample,
    group_std_filter,
    overlong_penalty,
    truncation_mask,
)


def ref_keep(rewards, g, min_std):
    keep = []
    for start in range(0, len(rewards), g):
        vals = [float(v) for v in rewards[start : start + g]]
        all_same = all(v == vals[0] for v in vals)
        mean = sum(vals) / g
        std = (sum((v - mean) ** 2 for v in vals) / g) ** 0.5
        keep.append(not all_same and std > min_std)
    return np.array(keep)


# --------------------------------------------------------------------- group filter


def test_std_filter_binary_and_float_ties():
    rewards = np.array([1, 1, 1, 0, 0, 0, 1, 0, 1, 0.1, 0.1, 0.1, 0.7, 0.7, 0.70001])
    keep = group_std_filter(rewards, 3)
    np.testing.assert_array_equal(keep, [False, False, True, False, True])
    np.testing.assert_array_equal(keep, ref_keep(rewards, 3, 0.0))
    # np.std alone is not exactly 0 for three 0.1s in float64 round-off on every platform;
    # the exact tie test is what drops it.
    assert not keep[3]


@pytest.mark.parametrize("min_std", [0.0, 0.1, 0.3])
def test_std_filter_continuous_rewards_min_std(min_std):
    rng = np.random.default_rng(0)
    rewards = rng.normal(scale=rng.uniform(0, 0.5, size=20).repeat(4), size=80)
    np.testing.assert_array_equal(group_std_filter(rewards, 4, min_std), ref_keep(rewards, 4, min_std))


def test_std_filter_errors_name_the_row():
    with pytest.raises(DynamicSamplingError, match="row 4"):
        group_std_filter(np.array([0, 1, 0, 1, np.nan, 1.0]), 2)
    with pytest.raises(DynamicSamplingError, match="group_size=4"):
        group_std_filter(np.zeros(6), 4)


# ------------------------------------------------------------------ dynamic sampling


class ScriptedSampler:
    """A real sampler stand-in: each call draws groups whose rewards are solvable or not.

    Group k of round r gets id 1000*r + k; solve_prob[r] controls how many groups have
    reward spread. Records the calls made.
    """

    def __init__(self, groups_per_round, group_size, spread_per_round, seed=0):
        self.groups_per_round = groups_per_round
        self.group_size = group_size
        self.spread_per_round = spread_per_round
        self.rng = np.random.default_rng(seed)
        self.calls = []

    def __call__(self, round_idx):
        self.calls.append(round_idx)
        n, g = self.groups_per_round, self.group_size
        spread = self.rng.permutation(n) < self.spread_per_round[min(round_idx, len(self.spread_per_round) - 1)]
        rewards = np.repeat(self.rng.integers(0, 2, size=n).astype(np.float32), g).reshape(n, g)
        rewards[spread, 0] = 1 - rewards[spread, 0]  # flip one response: spread in that group
        group_id = np.repeat(1000 * round_idx + np.arange(n), g)
        tokens = np.arange(n * g * 3).reshape(n * g, 3) + 100_000 * round_idx
        return {"rewards": rewards.reshape(-1), "group_id": group_id, "tokens": tokens, "spread": np.repeat(spread, g)}


def test_dynamic_sampling_fills_over_rounds_and_counts():
    sampler = ScriptedSampler(groups_per_round=4, group_size=3, spread_per_round=[1, 2, 3])
    res = dynamic_sample(sampler, target_groups=5, group_size=3, max_rounds=5)
    assert res.full and res.rounds == 3 and sampler.calls == [0, 1, 2]
    assert (res.groups_sampled, res.groups_kept, res.groups_dropped) == (12, 5, 6)
    assert res.groups_surplus == 1 and res.groups_padded == 0
    assert res.batch["rewards"].shape == (15,) and res.batch["tokens"].shape == (15, 3)
    assert res.valid.all()
    # Every kept group came whole from a sampled group with spread, in sampling order.
    ids = res.batch["group_id"].reshape(5, 3)
    assert np.all(ids == ids[:, :1]) and np.all(np.diff(ids[:, 0]) > 0)
    assert res.batch["spread"].all()
    assert group_std_filter(res.batch["rewards"], 3).all()
    # Other fields were sliced with the same rows: token rows encode (round, row).
    rows = res.batch["tokens"][:, 0]
    np.testing.assert_array_equal(rows // 100_000, res.batch["group_id"] // 1000)
    np.testing.assert_array_equal(rows % 100_000 // 3 // 3, res.batch["group_id"] % 1000)
    m = res.metrics()
    assert m["dynamic_sampling/rounds"] == 3 and m["dynamic_sampling/full"] == 1.0


def test_dynamic_sampling_first_round_enough():
    sampler = ScriptedSampler(groups_per_round=4, group_size=2, spread_per_round=[4])
    res = dynamic_sample(sampler, target_groups=4, group_size=2, max_rounds=3)
    assert res.full and res.rounds == 1 and res.groups_dropped == 0 and res.groups_surplus == 0


def test_dynamic_sampling_short_return():
    sampler = ScriptedSampler(groups_per_round=4, group_size=2, spread_per_round=[1])
    res = dynamic_sample(sampler, target_groups=4, group_size=2, max_rounds=2, on_short="return")
    assert not res.full and res.rounds == 3 and sampler.calls == [0, 1, 2]  # 1 + max_rounds
    assert res.groups_kept == 3 and res.batch["rewards"].shape == (6,) and res.valid.all()


def test_dynamic_sampling_short_pad_gives_static_shape_and_valid_mask():
    sampler = ScriptedSampler(groups_per_round=4, group_size=2, spread_per_round=[1])
    res = dynamic_sample(sampler, target_groups=4, group_size=2, max_rounds=1, on_short="pad")
    assert not res.full and res.groups_kept == 2 and res.groups_padded == 2
    assert res.batch["rewards"].shape == (8,) and res.batch["tokens"].shape == (8, 3)
    np.testing.assert_array_equal(res.valid, [1, 1, 1, 1, 0, 0, 0, 0])
    # Padding rows get zero advantage when the valid mask is passed on, even under the
    # batch-whitened estimator.
    adv = np.asarray(compute_advantages("reinforce_pp", res.batch["rewards"], 2, valid=res.valid))
    assert np.all(adv[4:] == 0) and np.all(adv[:4] != 0)


def test_dynamic_sampling_short_raise_and_zero_kept_return():
    with pytest.raises(DynamicSamplingError, match="0/2 groups"):
        dynamic_sample(ScriptedSampler(3, 2, [0]), target_groups=2, group_size=2, max_rounds=1, on_short="raise")
    res = dynamic_sample(ScriptedSampler(3, 2, [0]), target_groups=2, group_size=2, max_rounds=0)
    assert res.groups_kept == 0 and res.batch["tokens"].shape == (0, 3) and res.rounds == 1


def test_dynamic_sampling_rejects_bad_batches():
    with pytest.raises(DynamicSamplingError, match="no 'rewards'"):
        dynamic_sample(lambda r: {"x": np.zeros(4)}, target_groups=1, group_size=2, max_rounds=0)
    with pytest.raises(DynamicSamplingError, match="field 'tokens'"):
        dynamic_sample(
            lambda r: {"rewards": np.array([0.0, 1.0]), "tokens": np.zeros((3, 2))},
            target_groups=1,
            group_size=2,
            max_rounds=0,
        )
    with pytest.raises(DynamicSamplingError, match="on_short"):
        dynamic_sample(lambda r: {}, target_groups=1, group_size=2, max_rounds=0, on_short="wait")
    with pytest.raises(DynamicSamplingError, match="multiple of 2"):
        dynamic_sample(lambda r: {"rewards": np.zeros(3)}, target_groups=1, group_size=2, max_rounds=0)


# ------------------------------------------------------------------------ overlong


def ref_overlong(length, max_len, cache_len):
    start = max_len - cache_len
    if length <= start:
        return 0.0
    if length <= max_len:
        return -(length - start) / cache_len
    return -1.0


def test_overlong_penalty_matches_piecewise_reference():
    lengths = np.array([0, 10, 96, 97, 100, 112, 127, 128, 129, 500])
    got = overlong_penalty(lengths, max_len=128, cache_len=32)
    want = [ref_overlong(int(n), 128, 32) for n in lengths]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert got.dtype == np.float32
    assert got[2] == 0.0 and got[3] == pytest.approx(-1 / 32) and got[7] == -1.0 and got[9] == -1.0
    # Monotone non-increasing in length.
    assert np.all(np.diff(overlong_penalty(np.arange(200), 128, 32)) <= 0)


@pytest.mark.parametrize("max_len,cache_len", [(100, 0), (100, 101), (100, -5)])
def test_overlong_penalty_bad_config(max_len, cache_len):
    with pytest.raises(ValueError, match="cache_len"):
        overlong_penalty([1, 2], max_len, cache_len)


def test_overlong_penalty_negative_length_names_row():
    with pytest.raises(ValueError, match="row 1"):
        overlong_penalty([3, -1], 10, 5)


# ------------------------------------------------------------------- truncation mask


@pytest.mark.parametrize("xp", [np, jnp])
def test_truncation_mask(xp):
    mask = xp.asarray(np.ones((3, 4), np.float32))
    new, n = truncation_mask(mask, xp.asarray([False, True, False]))
    np.testing.assert_array_equal(np.asarray(new), [[1] * 4, [0] * 4, [1] * 4])
    assert int(n) == 1
    new, n = truncation_mask(mask, [1, 1, 0])
    assert int(n) == 2 and np.asarray(new)[2].sum() == 4
    with pytest.raises(ValueError, match="truncated shape"):
        truncation_mask(mask, [1, 0])
