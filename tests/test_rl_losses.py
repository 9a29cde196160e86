"""Policy losses, KL, aggregation, entropy and TIS vs numpy references written here.

Gradients are checked against central finite differences of the float64 numpy
reference (or against analytic numpy gradients where the loss is a gradient trick).
"""

import functools
from decimal import Decimal, getcontext

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clipo_jax.rl import (
    AGGREGATIONS,
    KL_ESTIMATORS,
    POLICY_LOSSES,
    UnknownNameError,
    aggregate,
    aggregated_loss,
    aggregation_denominator,
    kl_penalty,
    kl_reward_penalty,
    logprob_gap_metrics,
    microbatch_loss,
    policy_loss,
    register_policy_loss,
    tis_weights,
    token_entropy,
)

B, T = 6, 7


def make_batch(seed=0, scale=0.3, empty_row=True):
    rng = np.random.default_rng(seed)
    old = np.log(rng.uniform(0.05, 0.95, size=(B, T)))
    logp = old + rng.normal(scale=scale, size=(B, T))
    lengths = rng.integers(1, T + 1, size=B)
    mask = (np.arange(T)[None, :] < lengths[:, None]).astype(np.float64)
    if empty_row:
        mask[2] = 0.0
    adv = rng.normal(size=B)
    adv[0] = -abs(adv[0])
    adv[1] = abs(adv[1])
    return logp, old, adv, mask


def fd_grad(fn, x, h=1e-6):
    """Central finite differences of a float64 scalar function."""
    g = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        xp, xm = x.copy(), x.copy()
        xp[idx] += h
        xm[idx] -= h
        g[idx] = (fn(xp) - fn(xm)) / (2 * h)
    return g


def f32(*xs):
    return [jnp.asarray(x, jnp.float32) for x in xs]


# ------------------------------------------------------------------ numpy references


def ref_aggregate(name, x, mask, max_len):
    rows = [x[i][mask[i] > 0] for i in range(x.shape[0])]
    rows = [r for r in rows if len(r)]
    if not rows:
        return 0.0
    if name == "token_mean":
        return float(np.concatenate(rows).sum() / sum(len(r) for r in rows))
    if name == "seq_mean_token_mean":
        return float(np.mean([r.mean() for r in rows]))
    if name == "seq_mean_token_sum":
        return float(np.mean([r.sum() for r in rows]))
    if name == "seq_mean_token_sum_norm":
        return float(np.mean([r.sum() / max_len for r in rows]))
    raise AssertionError(name)


def ref_ppo_tokens(logp, old, adv, eps_low, eps_high, dual_clip):
    ratio = np.exp(logp - old)
    a = np.broadcast_to(adv[:, None], ratio.shape)
    out = np.empty_like(ratio)
    for idx in np.ndindex(ratio.shape):
        r, A = ratio[idx], a[idx]
        val = max(-A * r, -A * min(max(r, 1 - eps_low), 1 + eps_high))
        if dual_clip is not None and A < 0:
            val = min(val, dual_clip * abs(A))
        out[idx] = val
    return out


def ref_gspo_objective(logp, old, adv, mask, eps_low, eps_high):
    losses = []
    for i in range(logp.shape[0]):
        m = mask[i] > 0
        if not m.any():
            continue
        s = np.exp(np.mean(logp[i][m] - old[i][m]))
        losses.append(max(-s * adv[i], -np.clip(s, 1 - eps_low, 1 + eps_high) * adv[i]))
    return float(np.mean(losses))


def ref_gmpo_objective(logp, old, adv, mask, eps_low, eps_high):
    losses = []
    for i in range(logp.shape[0]):
        m = mask[i] > 0
        if not m.any():
            continue
        lr = logp[i][m] - old[i][m]
        lr_clip = np.clip(lr, -eps_low, eps_high)
        # pessimistic per token: the smaller ratio when A > 0, the larger when A < 0
        terms = np.minimum(lr, lr_clip) if adv[i] > 0 else np.maximum(lr, lr_clip)
        losses.append(-adv[i] * np.exp(terms.mean()))
    return float(np.mean(losses))


def ref_k3_decimal(x):
    getcontext().prec = 60
    d = Decimal(float(x))
    return float(d.exp() - 1 - d)


def ref_entropy(logits):
    logits = np.asarray(logits, np.float64)
    z = logits - logits.max(axis=-1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(axis=-1, keepdims=True)
    out = np.zeros(logits.shape[:-1])
    for idx in np.ndindex(out.shape):
        out[idx] = -sum(pi * np.log(pi) for pi in p[idx] if pi > 0)
    return out


# ------------------------------------------------------------------------- ppo_clip


@pytest.mark.parametrize("eps_low,eps_high,dual_clip", [(0.2, 0.2, None), (0.2, 0.28, 3.0), (0.1, 0.3, 1.5)])
def test_ppo_clip_tokens_metrics_and_grad(eps_low, eps_high, dual_clip):
    logp, old, adv, mask = make_batch(scale=0.4)
    logp[0, 0] = old[0, 0] + 2.0  # ratio e^2 with A < 0: dual-clip territory
    opts = dict(eps_low=eps_low, eps_high=eps_high, dual_clip=dual_clip)
    loss, metrics = policy_loss("ppo_clip", *f32(logp, old, adv, mask), **opts)
    want = ref_ppo_tokens(logp, old, adv, eps_low, eps_high, dual_clip) * mask
    np.testing.assert_allclose(loss, want, rtol=1e-5, atol=1e-6)

    ratio = np.exp(logp - old)
    a = np.broadcast_to(adv[:, None], ratio.shape)
    clipped = -a * np.clip(ratio, 1 - eps_low, 1 + eps_high) > -a * ratio
    np.testing.assert_allclose(metrics["clip_frac"], clipped[mask > 0].mean(), rtol=1e-6)
    np.testing.assert_allclose(metrics["ratio_mean"], ratio[mask > 0].mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["ratio_max"], ratio[mask > 0].max(), rtol=1e-5)
    assert 0 < float(metrics["clip_frac"]) < 1  # the batch exercises both branches

    def ref_total(lp):
        return ref_aggregate("token_mean", ref_ppo_tokens(lp, old, adv, eps_low, eps_high, dual_clip), mask, T)

    def jax_total(lp):
        per_tok, _ = policy_loss("ppo_clip", lp, *f32(old, adv, mask), **opts)
        return aggregated_loss("token_mean", per_tok, jnp.asarray(mask))

    np.testing.assert_allclose(jax_total(jnp.asarray(logp, jnp.float32)), ref_total(logp), rtol=1e-5)
    got = jax.grad(jax_total)(jnp.asarray(logp, jnp.float32))
    np.testing.assert_allclose(got, fd_grad(ref_total, logp), rtol=1e-3, atol=1e-6)


def _ppo_single(ratio, adv, **opts):
    """Loss and d loss / d log pi for one token with the given ratio and advantage."""
    old = jnp.zeros((1, 1))
    fn = lambda lp: policy_loss("ppo_clip", lp, old, jnp.array([adv]), jnp.ones((1, 1)), **opts)[0].sum()
    lp = jnp.full((1, 1), np.log(ratio), jnp.float32)
    return float(fn(lp)), float(jax.grad(fn)(lp)[0, 0])


def test_clip_higher_asymmetry():
    # ratio 1.25, A > 0: clipped by eps_high=0.2, free under clip-higher 0.28.
    val, grad = _ppo_single(1.25, 1.0, eps_low=0.2, eps_high=0.2)
    assert val == pytest.approx(-1.2, abs=1e-6) and grad == 0.0
    val, grad = _ppo_single(1.25, 1.0, eps_low=0.2, eps_high=0.28)
    assert val == pytest.approx(-1.25, abs=1e-6) and grad == pytest.approx(-1.25, rel=1e-5)
    # The low side still clips at 0.8 for A < 0 with clip-higher on.
    val, grad = _ppo_single(0.75, -1.0, eps_low=0.2, eps_high=0.28)
    assert val == pytest.approx(0.8, abs=1e-6) and grad == 0.0
    # ratio 0.75 with A > 0 is never clipped (pessimistic bound takes the unclipped term).
    val, grad = _ppo_single(0.75, 1.0, eps_low=0.2, eps_high=0.28)
    assert val == pytest.approx(-0.75, abs=1e-6) and grad == pytest.approx(-0.75, rel=1e-5)


def test_dual_clip_only_for_negative_advantage():
    # A < 0, ratio 10: plain PPO loss is 10*|A|; dual-clip caps it at 3*|A| with zero grad.
    val, grad = _ppo_single(10.0, -1.0, dual_clip=None)
    assert val == pytest.approx(10.0, rel=1e-5) and grad == pytest.approx(10.0, rel=1e-5)
    val, grad = _ppo_single(10.0, -1.0, dual_clip=3.0)
    assert val == pytest.approx(3.0, rel=1e-6) and grad == 0.0
    # A > 0, ratio 10: dual-clip changes nothing.
    assert _ppo_single(10.0, 1.0, dual_clip=3.0) == _ppo_single(10.0, 1.0, dual_clip=None)
    # A < 0, ratio 2 (< c): dual clip inactive.
    assert _ppo_single(2.0, -1.0, dual_clip=3.0) == _ppo_single(2.0, -1.0, dual_clip=None)
    _, metrics = policy_loss(
        "ppo_clip", jnp.log(jnp.array([[10.0, 10.0]])), jnp.zeros((1, 2)), jnp.array([-1.0]), jnp.ones((1, 2))
    )
    assert float(metrics["dual_clip_frac"]) == 1.0
    with pytest.raises(ValueError, match="dual_clip"):
        _ppo_single(2.0, -1.0, dual_clip=0.5)


# ------------------------------------------------------------------------------ gspo


def test_gspo_matches_sequence_objective_and_grad():
    eps_low, eps_high = 0.02, 0.03  # wide enough that some sequences are clipped and some not
    logp, old, adv, mask = make_batch(seed=1, scale=0.1)

    def jax_total(lp):
        per_tok, _ = policy_loss("gspo", lp, *f32(old, adv, mask), eps_low=eps_low, eps_high=eps_high)
        return aggregated_loss("seq_mean_token_mean", per_tok, jnp.asarray(mask))

    ref = functools.partial(ref_gspo_objective, old=old, adv=adv, mask=mask, eps_low=eps_low, eps_high=eps_high)
    lp32 = jnp.asarray(logp, jnp.float32)
    np.testing.assert_allclose(jax_total(lp32), ref(logp), rtol=1e-5)
    got = np.asarray(jax.grad(jax_total)(lp32))
    np.testing.assert_allclose(got, fd_grad(ref, logp), rtol=1e-3, atol=1e-6)

    # Analytic: an unclipped response gets -A s / (n_seq |y|) on every one of its tokens.
    n_seq = (mask.sum(1) > 0).sum()
    unclipped = 0
    for i in range(B):
        m = mask[i] > 0
        if not m.any():
            assert np.all(got[i] == 0)
            continue
        s = np.exp(np.mean(logp[i][m] - old[i][m]))
        is_clipped = (adv[i] > 0 and s > 1 + eps_high) or (adv[i] < 0 and s < 1 - eps_low)
        want = 0.0 if is_clipped else -adv[i] * s / (n_seq * m.sum())
        np.testing.assert_allclose(got[i][m], want, rtol=1e-4, atol=1e-7)
        assert np.all(got[i][~m] == 0)
        if not is_clipped:
            unclipped += 1
            assert np.all(got[i][m] != 0)  # gradient reaches every token
    assert 0 < unclipped < n_seq


def test_gspo_metrics_are_sequence_level():
    logp, old, adv, mask = make_batch(seed=2, scale=0.1)
    _, metrics = policy_loss("gspo", *f32(logp, old, adv, mask))
    seq = [np.exp(np.mean(logp[i][mask[i] > 0] - old[i][mask[i] > 0])) for i in range(B) if mask[i].any()]
    np.testing.assert_allclose(metrics["ratio_mean"], np.mean(seq), rtol=1e-5)
    np.testing.assert_allclose(metrics["ratio_max"], np.max(seq), rtol=1e-5)


# ------------------------------------------------------------------------------ gmpo


def test_gmpo_matches_geometric_objective_and_grad():
    eps = 0.1  # small enough that the log-space clip is active on some tokens
    logp, old, adv, mask = make_batch(seed=3, scale=0.2)

    def jax_total(lp):
        per_tok, _ = policy_loss("gmpo", lp, *f32(old, adv, mask), eps_low=eps, eps_high=eps)
        return aggregated_loss("seq_mean_token_mean", per_tok, jnp.asarray(mask))

    ref = functools.partial(ref_gmpo_objective, old=old, adv=adv, mask=mask, eps_low=eps, eps_high=eps)
    lp32 = jnp.asarray(logp, jnp.float32)
    np.testing.assert_allclose(jax_total(lp32), ref(logp), rtol=1e-5)
    got = np.asarray(jax.grad(jax_total)(lp32))
    np.testing.assert_allclose(got, fd_grad(ref, logp), rtol=1e-3, atol=1e-6)
    # Clipped tokens get no gradient, unclipped ones do.
    lr = logp - old
    for i in range(B):
        for t in range(T):
            if mask[i, t] == 0:
                assert got[i, t] == 0
                continue
            clip_active = (adv[i] > 0 and lr[i, t] > eps) or (adv[i] < 0 and lr[i, t] < -eps)
            assert (got[i, t] == 0) == clip_active


def test_gmpo_rejects_per_token_advantages():
    logp, old, adv, mask = make_batch()
    with pytest.raises(ValueError, match="per-response"):
        policy_loss("gmpo", *f32(logp, old, np.ones((B, T)), mask))


# ----------------------------------------------------------------------------- cispo


def test_cispo_value_and_gradient():
    eps_low, eps_high = 0.2, 0.1
    logp, old, adv, mask = make_batch(seed=4, scale=0.3)
    w = np.clip(np.exp(logp - old), 1 - eps_low, 1 + eps_high)
    a = np.broadcast_to(adv[:, None], w.shape)

    def jax_total(lp):
        per_tok, _ = policy_loss("cispo", lp, *f32(old, adv, mask), eps_low=eps_low, eps_high=eps_high)
        return aggregated_loss("token_mean", per_tok, jnp.asarray(mask))

    lp32 = jnp.asarray(logp, jnp.float32)
    per_tok, metrics = policy_loss("cispo", lp32, *f32(old, adv, mask), eps_low=eps_low, eps_high=eps_high)
    np.testing.assert_allclose(per_tok, -a * w * mask, rtol=1e-5, atol=1e-6)
    # grad of -sg(w) A log pi under token_mean: -w A / N on every masked token, clipped or not.
    want = -w * a * mask / mask.sum()
    np.testing.assert_allclose(jax.grad(jax_total)(lp32), want, rtol=1e-4, atol=1e-7)
    r = np.exp(logp - old)[mask > 0]
    np.testing.assert_allclose(metrics["clip_frac"], ((r > 1 + eps_high) | (r < 1 - eps_low)).mean(), rtol=1e-6)


# ------------------------------------------------------------ shared loss behaviours


@pytest.mark.parametrize("name", ["ppo_clip", "gspo", "gmpo", "cispo"])
def test_padding_nan_and_empty_masks(name):
    logp, old, adv, mask = make_batch(seed=5)
    logp = np.where(mask > 0, logp, np.nan)  # garbage off the mask must not leak
    old = np.where(mask > 0, old, -np.inf)
    fn = lambda lp, m: aggregated_loss("token_mean", policy_loss(name, lp, *f32(old, adv), m)[0], m)
    lp32, m32 = f32(logp, mask)
    assert np.isfinite(float(fn(lp32, m32)))
    g = np.asarray(jax.grad(fn)(lp32, m32))
    assert np.all(np.isfinite(g)) and np.all(g[mask == 0] == 0)
    # An all-empty mask: loss 0, zero gradient, finite metrics.
    zero = jnp.zeros_like(m32)
    assert float(fn(lp32, zero)) == 0.0
    assert np.all(np.asarray(jax.grad(fn)(lp32, zero)) == 0)
    _, metrics = policy_loss(name, lp32, *f32(old, adv), zero)
    assert all(np.isfinite(float(v)) for v in metrics.values())


@pytest.mark.parametrize("name", ["ppo_clip", "gspo", "gmpo", "cispo"])
def test_approx_kl_is_kl_from_old_to_current_on_old_samples(name):
    """approx_kl estimates KL(pi_old || pi) on tokens drawn from pi_old: Schulman's k3 of
    log r = logp - old_logp. Checked against numpy on the same draws and, by Monte Carlo,
    against the exact KL of the two categorical distributions."""
    rng = np.random.default_rng(21)
    V = 6
    q = rng.dirichlet(np.ones(V))  # pi_old: the sampler
    p = q * np.exp(rng.normal(0, 0.7, V))  # pi: the current policy
    p /= p.sum()
    x = rng.choice(V, size=(40, 1000), p=q)
    old, cur = np.log(q[x]), np.log(p[x])
    _, m = policy_loss(name, *f32(cur, old, np.zeros(40), np.ones_like(old)))
    lr = cur - old
    want = np.mean(np.expm1(lr) - lr)
    np.testing.assert_allclose(float(m["approx_kl"]), want, rtol=1e-4)
    exact = float(np.sum(q * np.log(q / p)))
    reversed_k3 = np.mean(np.expm1(-lr) + lr)  # k3 of old - logp: a different (biased) quantity
    assert abs(want - exact) < 0.01 < abs(reversed_k3 - exact), (want, exact, reversed_k3)
    assert abs(float(m["approx_kl"]) - exact) < 0.01


@pytest.mark.parametrize("name", ["ppo_clip", "gspo", "cispo"])
def test_per_token_advantages_equal_broadcast(name):
    logp, old, adv, mask = make_batch(seed=6)
    a, _ = policy_loss(name, *f32(logp, old, adv, mask))
    b, _ = policy_loss(name, *f32(logp, old, np.repeat(adv[:, None], T, 1), mask))
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_is_weights_scale_loss_and_gradient():
    logp, old, adv, mask = make_batch(seed=7)
    w = np.random.default_rng(0).uniform(0.5, 2.0, size=(B, T))
    lp32 = jnp.asarray(logp, jnp.float32)
    fn = lambda lp, **kw: policy_loss("ppo_clip", lp, *f32(old, adv, mask), **kw)[0]
    np.testing.assert_allclose(fn(lp32, is_weights=jnp.asarray(w)), np.asarray(fn(lp32)) * w, rtol=1e-6)
    g_w = jax.grad(lambda lp: fn(lp, is_weights=jnp.asarray(w, jnp.float32)).sum())(lp32)
    g = jax.grad(lambda lp: fn(lp).sum())(lp32)
    np.testing.assert_allclose(g_w, np.asarray(g) * w, rtol=1e-5, atol=1e-7)


def test_policy_loss_jits_to_same_values():
    logp, old, adv, mask = make_batch(seed=8)
    args = f32(logp, old, adv, mask)
    for name in ["ppo_clip", "gspo", "gmpo", "cispo"]:
        eager, m_eager = policy_loss(name, *args)
        jitted, m_jit = jax.jit(functools.partial(policy_loss, name))(*args)
        np.testing.assert_allclose(eager, jitted, rtol=1e-6, atol=1e-7)
        assert set(m_eager) == set(m_jit)


def test_policy_loss_shape_errors():
    logp, old, adv, mask = make_batch()
    with pytest.raises(ValueError, match="old_logp"):
        policy_loss("ppo_clip", *f32(logp, old[:, :3], adv, mask))
    with pytest.raises(ValueError, match="advantages"):
        policy_loss("ppo_clip", *f32(logp, old, adv[:3], mask))
    with pytest.raises(ValueError, match="epsilon"):
        policy_loss("ppo_clip", *f32(logp, old, adv, mask), eps_low=-0.1)


def test_register_custom_policy_loss():
    @register_policy_loss("test_vanilla_pg")
    def vanilla_pg(logp, old_logp, adv, mask):
        return -adv * logp, {}

    try:
        logp, old, adv, mask = make_batch()
        loss, _ = policy_loss("test_vanilla_pg", *f32(logp, old, adv, mask))
        np.testing.assert_allclose(loss, -adv[:, None] * logp * mask, rtol=1e-5, atol=1e-6)
    finally:
        del POLICY_LOSSES["test_vanilla_pg"]


# ------------------------------------------------------------------------------- KL


def test_kl_estimators_match_reference():
    rng = np.random.default_rng(9)
    logp = rng.normal(-2, 1, size=(B, T)).astype(np.float32)
    ref = rng.normal(-2, 1, size=(B, T)).astype(np.float32)
    log_r = ref.astype(np.float64) - logp.astype(np.float64)
    np.testing.assert_allclose(kl_penalty("k1", logp, ref), logp.astype(np.float64) - ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(kl_penalty("k2", logp, ref), 0.5 * log_r**2, rtol=1e-5, atol=1e-6)
    k3_ref = np.vectorize(ref_k3_decimal)(log_r)
    np.testing.assert_allclose(kl_penalty("k3", logp, ref), k3_ref, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(kl_penalty("low_var_kl", logp, ref), k3_ref, rtol=2e-5, atol=1e-6)
    assert np.all(np.asarray(kl_penalty("k3", logp, ref)) >= 0)
    # Gradient of k3 wrt logp is -(r - 1).
    g = jax.grad(lambda lp: kl_penalty("k3", lp, jnp.asarray(ref)).sum())(jnp.asarray(logp))
    np.testing.assert_allclose(g, -np.expm1(log_r), rtol=1e-4, atol=1e-6)


def test_k3_accurate_for_small_log_ratio():
    x = np.concatenate([-np.logspace(-7, 1, 40), np.logspace(-7, 1, 40)]).astype(np.float32)
    zeros = np.zeros((1, x.size), np.float32)
    got = np.asarray(kl_penalty("k3", zeros, x[None, :]))[0]
    want = np.array([ref_k3_decimal(v) for v in x])
    np.testing.assert_allclose(got, want, rtol=2e-5)
    # The naive float32 formula is far off here, which is why the stable form matters.
    naive = np.exp(x) - np.float32(1) - x
    small = np.abs(x) < 1e-3
    assert np.max(np.abs(naive[small] - want[small]) / want[small]) > 1e-2


def test_k3_stable_for_large_log_ratio_and_clamp():
    log_r = np.array([[-80.0, -50.0, 2.0, 30.0, 100.0]], np.float32)
    zeros = np.zeros_like(log_r)
    got = np.asarray(kl_penalty("k3", zeros, log_r))
    assert np.all(np.isfinite(got))
    assert got[0, 0] == pytest.approx(79.0, rel=1e-6) and got[0, 1] == pytest.approx(49.0, rel=1e-6)
    assert got[0, 2] == pytest.approx(ref_k3_decimal(2.0), rel=1e-5)
    # log r clamped at +20 before exp: finite, equal to k3(20) for 30 and 100.
    assert got[0, 3] == got[0, 4] == pytest.approx(ref_k3_decimal(20.0), rel=1e-5)
    grad = jax.grad(lambda lp: kl_penalty("k3", lp, jnp.asarray(log_r)).sum())(jnp.asarray(zeros))
    assert np.all(np.isfinite(grad))
    # Output clamp bounds the penalty and cuts the gradient where it binds.
    clamped = np.asarray(kl_penalty("k3", zeros, log_r, clamp=10.0))
    np.testing.assert_allclose(clamped, np.minimum([[79, 49, ref_k3_decimal(2.0), 1e9, 1e9]], 10.0), rtol=1e-5)
    grad = jax.grad(lambda lp: kl_penalty("k3", lp, jnp.asarray(log_r), clamp=10.0).sum())(jnp.asarray(zeros))
    np.testing.assert_allclose(grad, [[0, 0, -np.expm1(2.0), 0, 0]], rtol=1e-5)
    # Without the log-ratio bound float32 overflows honestly (documented).
    assert np.isinf(np.asarray(kl_penalty("k3", zeros, log_r, max_log_ratio=None))[0, 4])


@pytest.mark.parametrize("pad", [np.nan, -np.inf, np.inf])
@pytest.mark.parametrize("name", ["k1", "k2", "k3"])
def test_kl_penalty_ignores_off_mask_garbage_in_value_and_gradient(name, pad):
    """With mask=, NaN/inf reference log-probs off the mask (padding) give 0 there and a finite
    gradient equal to that of clean padding: the log-ratio is masked before the estimator."""
    logp, _, _, mask = make_batch(seed=12)
    delta = np.random.default_rng(3).normal(scale=0.5, size=logp.shape)
    ref = np.where(mask > 0, logp + delta, pad)

    def loss(lp):
        return aggregated_loss("token_mean", kl_penalty(name, lp, *f32(ref), 10.0, mask=jnp.asarray(mask)), mask)

    value, grad = jax.value_and_grad(loss)(jnp.asarray(logp, jnp.float32))
    grad = np.asarray(grad)
    # numpy: log r = ref - logp = delta on the mask; d(token mean)/d logp = -d est / d log r / count
    est = {"k1": -delta, "k2": 0.5 * delta**2, "k3": np.expm1(delta) - delta}[name]
    d_est = {"k1": -np.ones_like(delta), "k2": delta, "k3": np.expm1(delta)}[name]
    count = mask.sum()
    np.testing.assert_allclose(float(value), est[mask > 0].sum() / count, rtol=1e-5)
    assert np.all(np.isfinite(grad)) and np.all(grad[mask == 0] == 0)
    np.testing.assert_allclose(grad[mask > 0], -d_est[mask > 0] / count, rtol=1e-4, atol=1e-7)
    per_token = np.asarray(kl_penalty(name, *f32(logp, ref), mask=mask))
    assert np.all(per_token[mask == 0] == 0)
    # in the reward: the shaped rewards are finite too
    shaped, _ = kl_reward_penalty(np.zeros(B), *f32(logp, ref, mask), beta=0.1, name=name)
    np.testing.assert_allclose(shaped, -0.1 * np.where(mask > 0, est, 0.0).sum(1), rtol=1e-5, atol=1e-6)


def test_k1_clamp_is_symmetric():
    got = np.asarray(kl_penalty("k1", jnp.array([[0.0, 0.0, 0.0]]), jnp.array([[-30.0, 0.5, 30.0]]), clamp=10.0))
    np.testing.assert_allclose(got, [[10.0, -0.5, -10.0]])
    with pytest.raises(ValueError, match="clamp"):
        kl_penalty("k1", jnp.zeros((1, 1)), jnp.zeros((1, 1)), clamp=0.0)


def test_kl_in_reward():
    logp, _, _, mask = make_batch(seed=10)
    ref = logp + np.random.default_rng(1).normal(scale=0.2, size=logp.shape)
    rewards = np.arange(B, dtype=np.float64)
    shaped, metrics = kl_reward_penalty(rewards, *f32(logp, ref, mask), beta=0.1, name="k3")
    lr = ref - logp
    k3 = np.expm1(lr) - lr
    want = rewards - 0.1 * (k3 * mask).sum(1)
    np.testing.assert_allclose(shaped, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(metrics["kl_token_mean"], k3[mask > 0].mean(), rtol=1e-4)

    # rows with an empty mask (DAPO's padding copies) are not averaged into the sequence mean
    mask = mask.copy()
    mask[: B // 2] = 0
    _, metrics = kl_reward_penalty(rewards, *f32(logp, ref, mask), beta=0.1, name="k3")
    sampled = mask.any(1)
    np.testing.assert_allclose(metrics["kl_seq_mean"], (k3 * mask).sum(1)[sampled].mean(), rtol=1e-4)


# ----------------------------------------------------------------------- aggregation

AGG_NAMES = ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm"]


@pytest.mark.parametrize("name", AGG_NAMES)
@pytest.mark.parametrize("max_len", [None, 16])
def test_aggregation_matches_reference(name, max_len):
    rng = np.random.default_rng(11)
    x = rng.normal(size=(B, T))
    _, _, _, mask = make_batch(seed=11)
    x_with_pad_garbage = np.where(mask > 0, x, np.nan)
    got = aggregated_loss(name, *f32(x_with_pad_garbage, mask), max_len=max_len)
    np.testing.assert_allclose(got, ref_aggregate(name, x, mask, max_len or T), rtol=1e-5)
    num, den = aggregate(name, *f32(x, mask), max_len=max_len)
    want_den = mask.sum() if name == "token_mean" else (mask.sum(1) > 0).sum()
    assert float(den) == want_den == float(aggregation_denominator(name, mask, max_len=max_len))


@pytest.mark.parametrize("name", AGG_NAMES)
def test_aggregation_all_masked_is_zero(name):
    assert float(aggregated_loss(name, jnp.ones((2, 3)), jnp.zeros((2, 3)))) == 0.0


@pytest.mark.parametrize("name", AGG_NAMES)
@pytest.mark.parametrize("loss_name", ["ppo_clip", "gspo"])
def test_gradient_accumulation_is_exact(name, loss_name):
    logp, old, adv, mask = make_batch(seed=12, scale=0.3)
    splits = [slice(0, 1), slice(1, 4), slice(4, B)]  # uneven; the empty row 2 sits mid-chunk
    d_total = aggregation_denominator(name, mask, max_len=T)

    def numerator(lp, sl):
        per_tok, _ = policy_loss(loss_name, lp, *f32(old[sl], adv[sl], mask[sl]))
        return aggregate(name, per_tok, jnp.asarray(mask[sl], jnp.float32), max_len=T)[0]

    lp32 = jnp.asarray(logp, jnp.float32)
    # One jitted program per chunk (eager dispatch of every op under grad is slow on CPU).
    num_and_grad = lambda sl: jax.jit(jax.value_and_grad(lambda lp: numerator(lp, sl) / d_total))
    full_val, full_grad = num_and_grad(slice(None))(lp32)
    parts = [num_and_grad(sl)(lp32[sl]) for sl in splits]
    np.testing.assert_allclose(np.concatenate([g for _, g in parts]), full_grad, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(sum(float(v) for v, _ in parts), float(full_val), rtol=1e-5)
    per_tok, _ = policy_loss(loss_name, *f32(logp, old, adv, mask))
    chunks = [per_tok[sl] for sl in splits]
    np.testing.assert_allclose(
        microbatch_loss(name, chunks, [mask[sl] for sl in splits], max_len=T),
        aggregated_loss(name, per_tok, jnp.asarray(mask), max_len=T),
        rtol=1e-5,
    )


def test_naive_mean_of_micro_means_is_not_exact():
    # Guard that the exactness test above can fail: averaging micro-batch token means
    # differs from the full token mean when micro-batches hold different token counts.
    x = jnp.array([[1.0, 1.0, 1.0], [4.0, 0.0, 0.0]])
    mask = jnp.array([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    naive = 0.5 * (aggregated_loss("token_mean", x[:1], mask[:1]) + aggregated_loss("token_mean", x[1:], mask[1:]))
    exact = microbatch_loss("token_mean", [x[:1], x[1:]], [mask[:1], mask[1:]])
    assert float(exact) == pytest.approx(7 / 4) and abs(float(naive) - float(exact)) > 0.5


# --------------------------------------------------------------------------- entropy


def test_token_entropy_matches_numpy():
    rng = np.random.default_rng(13)
    logits = rng.normal(scale=3.0, size=(2, 3, 11)).astype(np.float32)
    logits[0, 0, :5] = -np.inf  # masked vocabulary entries
    logits[1, 2] = 1e4 * np.eye(11)[3]  # near one-hot: entropy ~ 0
    got = np.asarray(token_entropy(logits))
    np.testing.assert_allclose(got, ref_entropy(logits), rtol=1e-5, atol=1e-6)
    mask = np.array([[1, 1, 0], [0, 1, 1]], np.float32)
    np.testing.assert_allclose(token_entropy(logits, mask), ref_entropy(logits) * mask, rtol=1e-5, atol=1e-6)
    # Uniform distribution: log V.
    assert float(token_entropy(jnp.zeros((1, 1, 11)))[0, 0]) == pytest.approx(np.log(11), rel=1e-6)
    # bf16 logits are computed in float32.
    bf = token_entropy(jnp.asarray(logits[1:, :2], jnp.bfloat16))
    assert bf.dtype == jnp.float32
    np.testing.assert_allclose(bf, ref_entropy(np.asarray(jnp.asarray(logits[1:, :2], jnp.bfloat16))), rtol=1e-5)
    g = jax.grad(lambda z: token_entropy(z).sum())(jnp.asarray(logits))
    assert np.all(np.isfinite(np.asarray(g)))


def test_token_entropy_gradient_matches_fd():
    rng = np.random.default_rng(14)
    logits = rng.normal(size=(1, 2, 5))
    g = jax.grad(lambda z: token_entropy(z).sum())(jnp.asarray(logits, jnp.float32))
    np.testing.assert_allclose(g, fd_grad(lambda z: ref_entropy(z).sum(), logits), rtol=1e-3, atol=1e-5)


# ------------------------------------------------------------------------------- TIS


def test_tis_weights_and_gap_metrics():
    rng = np.random.default_rng(15)
    trainer = np.log(rng.uniform(0.01, 1, size=(B, T)))
    sampler = trainer + rng.normal(scale=0.5, size=(B, T))
    _, _, _, mask = make_batch(seed=15)
    w = np.asarray(tis_weights(*f32(trainer, sampler), cap=2.0))
    np.testing.assert_allclose(w, np.minimum(np.exp(trainer - sampler), 2.0), rtol=1e-5)
    assert w.max() == pytest.approx(2.0) and np.any(w < 2.0)
    with pytest.raises(ValueError, match="cap"):
        tis_weights(*f32(trainer, sampler), cap=0.0)

    m = logprob_gap_metrics(*f32(trainer, sampler, mask), cap=2.0)
    gap = (trainer - sampler)[mask > 0]
    ratio = np.exp(gap)
    want = {
        "logprob_gap/mean_abs": np.abs(gap).mean(),
        "logprob_gap/max_abs": np.abs(gap).max(),
        "logprob_gap/mean": gap.mean(),
        "logprob_gap/k3_kl": (ratio - 1 - gap).mean(),
        "logprob_gap/ratio_mean": ratio.mean(),
        "logprob_gap/ratio_max": ratio.max(),
        "logprob_gap/ratio_min": ratio.min(),
        "logprob_gap/frac_over_cap": (ratio > 2.0).mean(),
    }
    assert set(m) == set(want)
    for k, v in want.items():
        np.testing.assert_allclose(m[k], v, rtol=1e-4, atol=1e-6, err_msg=k)
    # Identical log-probs: no gap.
    same = logprob_gap_metrics(*f32(trainer, trainer, mask))
    assert float(same["logprob_gap/max_abs"]) == 0.0 and float(same["logprob_gap/ratio_mean"]) == 1.0


# ------------------------------------------------------------------------ registries


@pytest.mark.parametrize(
    "call,registry",
    [
        (lambda: policy_loss("ppo", *f32(*make_batch())), POLICY_LOSSES),
        (lambda: kl_penalty("k4", jnp.zeros((1, 1)), jnp.zeros((1, 1))), KL_ESTIMATORS),
        (lambda: aggregate("mean", jnp.zeros((1, 1)), jnp.ones((1, 1))), AGGREGATIONS),
    ],
)
def test_unknown_names_raise_one_line(call, registry):
    with pytest.raises(UnknownNameError) as err:
        call()
    msg = str(err.value)
    assert "\n" not in msg and all(name in msg for name in registry)


# ------------------------------------------------------------------ property: masks


@settings(max_examples=25, deadline=None)
@given(
    name=st.sampled_from(AGG_NAMES),
    lengths=st.lists(st.integers(0, 5), min_size=6, max_size=6),
    cuts=st.sets(st.integers(1, 5), max_size=4),
    seed=st.integers(0, 2**16),
)
def test_property_any_row_split_is_exact(name, lengths, cuts, seed):
    # Random ragged masks (empty rows allowed), random row splits: sum num / sum den is exact.
    x = np.random.default_rng(seed).normal(size=(6, 5))
    mask = (np.arange(5)[None, :] < np.array(lengths)[:, None]).astype(np.float64)
    bounds = [0, *sorted(cuts), 6]
    chunks = [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]
    got = microbatch_loss(name, [jnp.asarray(x[c], jnp.float32) for c in chunks], [mask[c] for c in chunks], max_len=5)
    np.testing.assert_allclose(got, ref_aggregate(name, x, mask, 5), rtol=1e-5, atol=1e-6)
