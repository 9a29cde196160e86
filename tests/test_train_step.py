"""The pure RL train step on a 1-layer model: exact micro-batch accumulation, NaN skip,
the on-policy gradient vs an independently written loss, and SFT learning."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from clipo_jax.models.config import ModelConfig
from clipo_jax.models.transformer import forward_logits, init_params
from clipo_jax.rl import losses, update
from clipo_jax.rl.step import RLBatch, StepConfig, TrainState, make_optimizer, sft_loss, sft_step, train_step

CFG = ModelConfig(vocab_size=48, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=8, d_ff=32, max_seq_len=64)
B, TP, N = 4, 5, 6  # rows, prompt length (left-padded), response length
T = TP + N


def make_batch(seed=0, old_noise=0.3):
    """Left-padded prompts, ragged response masks (row 3 has 1 token), random advantages."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, CFG.vocab_size, (B, T)).astype(np.int32)
    prompt_len = np.array([5, 3, 4, 2])
    resp_len = np.array([6, 4, 2, 1])
    valid = np.zeros((B, T), bool)
    resp_mask = np.zeros((B, N), bool)
    for i in range(B):
        valid[i, TP - prompt_len[i] : TP + resp_len[i]] = True
        resp_mask[i, : resp_len[i]] = True
    tokens = np.where(valid, tokens, 0)
    adv = rng.normal(size=B).astype(np.float32)
    # old log-probs off the current ones so ratios spread around 1 and clipping is active
    old = rng.normal(-np.log(CFG.vocab_size), old_noise, (B, N)).astype(np.float32)
    ref = rng.normal(-np.log(CFG.vocab_size), old_noise, (B, N)).astype(np.float32)
    sampler = (old + rng.normal(0, 0.3, (B, N))).astype(np.float32)  # sampler vs trainer mismatch
    return RLBatch(
        jnp.asarray(tokens),
        jnp.asarray(valid),
        jnp.asarray(resp_mask),
        jnp.asarray(adv),
        jnp.asarray(old),
        jnp.asarray(ref),
        jnp.asarray(sampler),
    )


@functools.lru_cache(None)
def params0():
    return init_params(CFG, jax.random.key(0), std=0.2)


def state_for(opt):
    p = params0()
    return TrainState(p, opt.init(p), jnp.zeros((), jnp.int32))


def run_step(scfg, batch, opt):
    fn = jax.jit(functools.partial(train_step, cfg=CFG, scfg=scfg, optimizer=opt))
    return fn(state_for(opt), batch)


def tree_allclose(a, b, **kw):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), **kw)


def max_tree_diff(a, b):
    return max(
        float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    )


# ------------------------------------------------------------------ (a) micro-batches
MB_OPTS = (("dual_clip", 3.0), ("eps_high", 0.28), ("eps_low", 0.2))


@functools.lru_cache(None)
def jitted_sgd_step(scfg):
    """The SGD(lr=1) train step, compiled once per StepConfig (the batches here share one shape)."""
    return jax.jit(functools.partial(train_step, cfg=CFG, scfg=scfg, optimizer=optax.sgd(1.0)))


def mb_config(aggregation, micro_batches):
    return StepConfig(
        aggregation=aggregation, micro_batches=micro_batches, kl_coef=0.05, entropy_coef=0.01, policy_loss_opts=MB_OPTS
    )


@functools.lru_cache(None)
def sgd_step_result(aggregation, micro_batches):
    """SGD(lr=1): new - old = -grad, so comparing params compares the accumulated gradients."""
    return jitted_sgd_step(mb_config(aggregation, micro_batches))(state_for(optax.sgd(1.0)), make_batch())


@pytest.mark.parametrize("aggregation,m", [(a, 4) for a in sorted(losses.AGGREGATIONS)] + [("token_mean", 2)])
def test_micro_batches_give_the_same_update(aggregation, m):
    base_state, base_m = sgd_step_result(aggregation, 1)
    assert max_tree_diff(base_state.params, params0()) > 1e-4, "the update must move the params"
    st, mt = sgd_step_result(aggregation, m)
    tree_allclose(st.params, base_state.params, rtol=1e-5, atol=1e-6)
    for key in ("actor/loss", "actor/grad_norm", "actor/tokens"):
        np.testing.assert_allclose(float(mt[key]), float(base_m[key]), rtol=1e-5, atol=1e-7, err_msg=key)
    assert int(st.step) == 1


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_mean"])
def test_micro_batch_loss_metrics_are_exact(aggregation):
    """pg_loss / kl / entropy are numerator/denominator partial sums: they must add up over
    micro-batches like actor/loss does, not be averaged (which scales them by 1/M)."""
    m1, m4 = sgd_step_result(aggregation, 1)[1], sgd_step_result(aggregation, 4)[1]
    # loss = pg + kl_coef * kl - ent_coef * entropy holds at M=1; all four must match at M=4
    np.testing.assert_allclose(
        float(m1["actor/loss"]),
        float(m1["actor/pg_loss"]) + 0.05 * float(m1["actor/kl"]) - 0.01 * float(m1["actor/entropy"]),
        rtol=1e-5,
    )
    for key in ("actor/pg_loss", "actor/kl", "actor/entropy"):
        np.testing.assert_allclose(float(m4[key]), float(m1[key]), rtol=1e-5, err_msg=key)


def test_micro_batches_must_divide():
    with pytest.raises(ValueError, match="3 micro-batches"):
        run_step(StepConfig(micro_batches=3), make_batch(), optax.sgd(1.0))


# ------------------------------------------------------------------ (b) non-finite skip
@functools.lru_cache(None)
def jitted_adam_step():
    opt = make_optimizer(1e-2, total_steps=10)
    return jax.jit(functools.partial(train_step, cfg=CFG, scfg=StepConfig(micro_batches=2), optimizer=opt))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_advantage_skips_update(bad):
    opt = make_optimizer(1e-2, total_steps=10)
    batch = make_batch()
    poisoned = batch._replace(advantages=batch.advantages.at[1].set(bad))
    fn = jitted_adam_step()
    start = state_for(opt)
    new, m = fn(start, poisoned)
    assert float(m["actor/skipped"]) == 1.0
    assert int(new.step) == 0
    tree_allclose(new.params, start.params, rtol=0, atol=0)
    tree_allclose(new.opt_state, start.opt_state, rtol=0, atol=0)
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(new.params))
    # the next finite batch updates normally from the kept state
    newer, m2 = fn(new, batch)
    assert float(m2["actor/skipped"]) == 0.0 and int(newer.step) == 1
    assert max_tree_diff(newer.params, start.params) > 1e-4


def test_nan_in_old_logp_skips_update():
    opt = optax.sgd(1.0)
    batch = make_batch()
    poisoned = batch._replace(old_logp=batch.old_logp.at[0, 0].set(np.nan))
    new, m = run_step(StepConfig(), poisoned, opt)
    assert float(m["actor/skipped"]) == 1.0 and int(new.step) == 0
    tree_allclose(new.params, params0(), rtol=0, atol=0)


# ------------------------------------------------------------------ (c) on-policy gradient
def reference_loss(params, batch, kl_coef, ent_coef):
    """Written independently of rl/: at ratio 1 the PPO surrogate's gradient is -A grad log pi.

    Token-mean over response tokens of  -A_b * log pi(y_bt) + kl_coef * k3 - ent_coef * H.
    """
    logits, _ = forward_logits(params, CFG, batch.tokens, batch.valid)  # [B, T, V]
    logp_all = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    # response token j sits at TP + j and is predicted at position TP + j - 1
    pos = TP - 1 + jnp.arange(N)
    lp_rows = logp_all[:, pos, :]  # [B, N, V]
    y = batch.tokens[:, TP:]
    lp = jnp.take_along_axis(lp_rows, y[..., None], axis=-1)[..., 0]
    ent = -jnp.sum(jnp.exp(lp_rows) * lp_rows, axis=-1)
    log_r = batch.ref_logp - lp
    k3 = jnp.exp(log_r) - 1.0 - log_r
    mask = batch.response_mask.astype(jnp.float32)
    # surrogate: A * exp(lp - sg(lp)) has value A and gradient A * grad lp
    surr = batch.advantages[:, None] * jnp.exp(lp - jax.lax.stop_gradient(lp))
    per_tok = -surr + kl_coef * k3 - ent_coef * ent
    return jnp.sum(per_tok * mask) / jnp.sum(mask)


def test_on_policy_ratio_one_and_gradient_matches_reference():
    batch = make_batch(3)
    kl_coef, ent_coef = 0.1, 0.02
    scfg = StepConfig(use_old_logp=False, kl_coef=kl_coef, kl_clamp=None, entropy_coef=ent_coef, micro_batches=2)
    new, m = run_step(scfg, batch, optax.sgd(1.0))
    assert float(m["actor/ratio_mean"]) == pytest.approx(1.0, abs=1e-6)
    assert float(m["actor/ratio_max"]) == pytest.approx(1.0, abs=1e-6)
    assert float(m["actor/clip_frac"]) == 0.0
    ref_loss, ref_grad = jax.jit(jax.value_and_grad(reference_loss), static_argnums=(2, 3))(
        params0(), batch, kl_coef, ent_coef
    )
    np.testing.assert_allclose(float(m["actor/loss"]), float(ref_loss), rtol=1e-5)
    got_grad = jax.tree.map(lambda a, b: a - b, params0(), new.params)  # SGD lr 1: p - p' = grad
    assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(ref_grad)) > 1e-3
    tree_allclose(got_grad, ref_grad, rtol=2e-4, atol=2e-6)
    np.testing.assert_allclose(float(m["actor/grad_norm"]), float(optax.tree.norm(ref_grad)), rtol=1e-5)


def test_pg_loss_value_matches_numpy_ppo_clip():
    # off-policy PPO-clip loss value with old log-probs, against a plain-numpy formula
    batch = make_batch()
    _, m = sgd_step_result("token_mean", 1)  # same batch and clip options (eps 0.2 / 0.28, dual 3)
    assert float(m["actor/clip_frac"]) > 0, "the batch should exercise clipping"
    logits, _ = forward_logits(params0(), CFG, batch.tokens, batch.valid)
    logits = np.asarray(logits, np.float64)
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    toks = np.asarray(batch.tokens)
    mask = np.asarray(batch.response_mask)
    adv = np.asarray(batch.advantages, np.float64)
    old = np.asarray(batch.old_logp, np.float64)
    total, count = 0.0, 0
    for b in range(B):
        for j in range(N):
            if not mask[b, j]:
                continue
            p = TP + j - 1
            lp = logits[b, p, toks[b, TP + j]] - lse[b, p]
            r = np.exp(lp - old[b, j])
            loss = max(-adv[b] * r, -adv[b] * min(max(r, 0.8), 1.28))
            if adv[b] < 0:
                loss = min(loss, -3.0 * adv[b])
            total += loss
            count += 1
    np.testing.assert_allclose(float(m["actor/pg_loss"]), total / count, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------ (d) metrics and KL padding
def numpy_logp(params, batch):
    """float64 log pi of the response tokens [B, N] from the model's logits (numpy log-softmax)."""
    logits, _ = forward_logits(params, CFG, batch.tokens, batch.valid)
    logits = np.asarray(logits, np.float64)
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    toks = np.asarray(batch.tokens)
    out = np.zeros((B, N))
    for b in range(B):
        for j in range(N):
            p = TP + j - 1
            out[b, j] = logits[b, p, toks[b, TP + j]] - lse[b, p]
    return out


def test_diagnostics_do_not_depend_on_micro_batches():
    """Maxima, minima and token means over the whole mini-batch, whatever the micro-batching:
    against numpy over all response tokens (not a mean of per-micro-batch maxima)."""
    batch = make_batch()
    mask = np.asarray(batch.response_mask)
    lr_all = numpy_logp(params0(), batch) - np.asarray(batch.old_logp, np.float64)
    lr = lr_all[mask]
    ratio = np.exp(lr)
    adv = np.broadcast_to(np.asarray(batch.advantages, np.float64)[:, None], (B, N))[mask]
    gap = (np.asarray(batch.old_logp, np.float64) - np.asarray(batch.sampler_logp, np.float64))[mask]
    want = {
        "actor/ratio_max": ratio.max(),
        "actor/ratio_mean": ratio.mean(),
        "actor/approx_kl": np.mean(np.expm1(lr) - lr),
        "actor/clip_frac": np.mean(-adv * np.clip(ratio, 0.8, 1.28) > -adv * ratio),
        "actor/clip_frac_high": np.mean((ratio > 1.28) & (adv > 0)),
        "actor/clip_frac_low": np.mean((ratio < 0.8) & (adv < 0)),
        "actor/logprob_gap/max_abs": np.abs(gap).max(),
        "actor/logprob_gap/mean_abs": np.abs(gap).mean(),
        "actor/logprob_gap/k3_kl": np.mean(np.expm1(gap) - gap),
        "actor/logprob_gap/ratio_max": np.exp(gap).max(),
        "actor/logprob_gap/ratio_min": np.exp(gap).min(),
        "actor/logprob_gap/ratio_mean": np.exp(gap).mean(),
    }
    # the batch separates the right answers from a mean of micro-batch maxima / means
    row_max = np.where(mask, np.exp(lr_all), -np.inf).max(1)
    assert abs(row_max.mean() - ratio.max()) > 1e-2 and 0 < want["actor/clip_frac"] < 1
    m1 = sgd_step_result("token_mean", 1)[1]
    for micro_batches in (1, 2, 4):
        m = sgd_step_result("token_mean", micro_batches)[1]
        for key, value in want.items():
            np.testing.assert_allclose(float(m[key]), value, rtol=2e-5, atol=1e-6, err_msg=f"{key} M={micro_batches}")
        for key in m1:
            if key != "actor/grad_norm":  # a sum of micro-batch gradients: float rounding only
                np.testing.assert_allclose(float(m[key]), float(m1[key]), rtol=1e-5, atol=1e-6, err_msg=key)


def test_logprob_gap_compares_the_sampler_with_old_logp():
    """The sampler-vs-trainer gap is pi_old (old_logp) vs the sampler: a second update with moved
    params must not report the policy's own drift as sampler mismatch."""
    batch = make_batch()
    step = jitted_sgd_step(mb_config("token_mean", 1))
    s1 = sgd_step_result("token_mean", 1)[0]
    assert max_tree_diff(s1.params, params0()) > 1e-3, "the first update must move the params"
    _, m2 = step(s1, batch)
    mask = np.asarray(batch.response_mask)
    gap = (np.asarray(batch.old_logp, np.float64) - np.asarray(batch.sampler_logp, np.float64))[mask]
    for key, value in (("mean_abs", np.abs(gap).mean()), ("max_abs", np.abs(gap).max()), ("mean", gap.mean())):
        np.testing.assert_allclose(float(m2[f"actor/logprob_gap/{key}"]), value, rtol=1e-5, atol=1e-7, err_msg=key)
    # a perfect sampler (sampler_logp == old_logp) reports no gap after the params moved
    _, m3 = step(s1, batch._replace(sampler_logp=batch.old_logp))
    assert float(m3["actor/logprob_gap/max_abs"]) == 0.0 and float(m3["actor/logprob_gap/ratio_max"]) == 1.0


def test_update_metrics_combine_extremes_and_count_skips():
    steps = [
        {"actor/skipped": 1.0, "actor/ratio_max": 2.0, "actor/logprob_gap/max_abs": 0.5, "actor/pg_loss": 1.0},
        {"actor/skipped": 1.0, "actor/ratio_max": 5.0, "actor/logprob_gap/max_abs": 0.1, "actor/pg_loss": 2.0},
        {"actor/skipped": 0.0, "actor/ratio_max": 3.0, "actor/logprob_gap/max_abs": 0.2, "actor/pg_loss": 6.0},
    ]
    for s, r_min in zip(steps, (0.7, 0.4, 0.9)):
        s["actor/logprob_gap/ratio_min"] = r_min
    m = update.update_metrics(steps)
    assert m["actor/skipped"] == update.skipped_steps(steps) == 2  # a count, as documented
    assert m["actor/ratio_max"] == 5.0 and m["actor/logprob_gap/max_abs"] == 0.5
    assert m["actor/logprob_gap/ratio_min"] == 0.4
    assert m["actor/pg_loss"] == pytest.approx(3.0)


def test_nan_reference_logp_off_the_mask_does_not_skip_the_update():
    """Padding in ref_logp (NaN/-inf off the response mask) must not reach the KL gradient."""
    batch = make_batch()
    step = jitted_sgd_step(mb_config("token_mean", 2))  # kl_coef 0.05, two micro-batches
    clean_state, clean_m = sgd_step_result("token_mean", 2)
    for pad in (np.nan, -np.inf):
        padded = batch._replace(ref_logp=jnp.where(batch.response_mask, batch.ref_logp, pad))
        st, m = step(state_for(optax.sgd(1.0)), padded)
        assert float(m["actor/skipped"]) == 0.0 and int(st.step) == 1
        tree_allclose(st.params, clean_state.params, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(float(m["actor/kl"]), float(clean_m["actor/kl"]), rtol=1e-6)


def test_kl_clamp_zero_in_the_config_means_no_clamp():
    """config.rl.kl_clamp=0 is valid ('0 = no clamp'): the step trains without a clamp (this
    batch's k3 values are far below the default clamp of 10, so the update is the clamped one)."""
    from clipo_jax import trainer
    from configs import demo

    c = demo.get_config("size=tiny")
    c.rl.kl_coef, c.rl.kl_clamp = 0.05, 0.0
    trainer.validate_config(c)
    kl_clamp = trainer.step_config(c.rl).kl_clamp
    assert kl_clamp is None
    scfg = dataclasses.replace(mb_config("token_mean", 1), kl_clamp=kl_clamp)
    st, m = jitted_sgd_step(scfg)(state_for(optax.sgd(1.0)), make_batch())
    clamped_state, clamped_m = sgd_step_result("token_mean", 1)
    assert float(m["actor/skipped"]) == 0.0
    np.testing.assert_allclose(float(m["actor/kl"]), float(clamped_m["actor/kl"]), rtol=1e-6)
    tree_allclose(st.params, clamped_state.params, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------ (e) SFT
def test_sft_loss_matches_reference_and_decreases():
    rng = np.random.default_rng(5)
    L = 10
    tokens = rng.integers(1, CFG.vocab_size, (4, L)).astype(np.int32)
    valid = np.ones((4, L), bool)
    valid[2, 8:] = False
    lmask = np.zeros((4, L), bool)
    lmask[:, 4:] = True  # completion tokens are the targets
    lmask &= valid
    p = params0()
    logits, _ = forward_logits(p, CFG, jnp.asarray(tokens), jnp.asarray(valid))
    logits = np.asarray(logits, np.float64)
    lse = np.log(np.exp(logits).sum(-1))
    nll = [lse[b, t - 1] - logits[b, t - 1, tokens[b, t]] for b in range(4) for t in range(1, L) if lmask[b, t]]
    ref = float(np.mean(nll))
    got = float(sft_loss(p, CFG, jnp.asarray(tokens), jnp.asarray(valid), jnp.asarray(lmask)))
    np.testing.assert_allclose(got, ref, rtol=1e-5)

    opt = make_optimizer(3e-2, total_steps=20)
    state = TrainState(p, opt.init(p), jnp.zeros((), jnp.int32))
    step = jax.jit(functools.partial(sft_step, cfg=CFG, optimizer=opt))
    seen = []
    for _ in range(8):
        state, m = step(state, tokens, valid, lmask)
        seen.append(float(m["sft/loss"]))
    assert seen[0] == pytest.approx(ref, rel=1e-5)
    assert seen[-1] < 0.7 * seen[0], seen
    assert int(state.step) == 8


def test_dr_grpo_normaliser_counts_a_masked_truncated_response():
    """Dr. GRPO divides by max_len and the number of sampled responses: a truncated response that
    rl.mask_truncated leaves out of the loss still counts, so the normaliser does not shrink with
    the number of truncations (it did: only rows with a non-empty loss mask were counted)."""
    batch = make_batch()
    masked = batch._replace(response_mask=batch.response_mask.at[1].set(False))  # row 1 truncated
    scfg = StepConfig(policy_loss="ppo_clip", aggregation="seq_mean_token_sum_norm", max_len=N)
    opt = make_optimizer(1e-3, total_steps=10)
    _, m_old = run_step(scfg, masked, opt)  # no sampled_rows: the rows with loss tokens (3)
    _, m_new = run_step(scfg, masked._replace(sampled_rows=jnp.ones(B, bool)), opt)
    # the same numerator over 4 rows instead of 3
    np.testing.assert_allclose(float(m_new["actor/pg_loss"]), float(m_old["actor/pg_loss"]) * 3 / 4, rtol=1e-6)
    # DAPO padding rows (sampled_rows False) are not counted; token_mean ignores sampled_rows
    _, m_pad = run_step(scfg, masked._replace(sampled_rows=jnp.array([True, True, True, False])), opt)
    np.testing.assert_allclose(float(m_pad["actor/pg_loss"]), float(m_old["actor/pg_loss"]), rtol=1e-6)
    tm = StepConfig(policy_loss="ppo_clip", aggregation="token_mean")
    _, a = run_step(tm, masked, opt)
    _, b = run_step(tm, masked._replace(sampled_rows=jnp.ones(B, bool)), opt)
    assert float(a["actor/pg_loss"]) == float(b["actor/pg_loss"])
