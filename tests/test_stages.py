"""The trainer's stages one at a time on the tiny demo model: the prompt stream, the rollout
(greedy anchors, DAPO refills), the CLIPO stage and the update stage."""

import dataclasses
import random

import jax
import numpy as np
import optax
import pytest

from clipo_jax import contrastive, rollout, sampling, tasks, trainer
from clipo_jax.rl import update
from clipo_jax.rl.step import StepConfig, make_optimizer, train_step


def spec_for(task, cfg, G=4, prompts=3, **kw):
    tok = task.tokenizer
    scfg = sampling.SamplingConfig(
        max_new_tokens=8, temperature=1.0, n_samples=G, stop_ids=tuple(tok.stop_ids), pad_id=tok.pad_id
    )
    sampler = sampling.Sampler(cfg)
    return rollout.RolloutSpec(sampler, tok, scfg, prompts, G, sampler.length_bucket(64), **kw)


def test_prompt_stream_is_deterministic_resumable_and_counts_overlong(tiny):
    _, task, _, _ = tiny
    lengths = [len(task.encode_prompt(r)) for r in task.train_rows]
    limit = int(np.median(lengths))
    a = rollout.PromptStream(task.train_rows, task.encode_prompt, limit, seed=3)
    rows_a, ids_a = a.next(10)
    assert all(len(p) <= limit for p in ids_a)
    dropped = a.counters.get("prompts_dropped_overlong", 0)
    assert dropped == a.position - 10 and dropped > 0
    more, _ = a.next(5)
    b = rollout.PromptStream(task.train_rows, task.encode_prompt, limit, seed=3, position=0)
    assert b.next(10)[0] == rows_a
    c = rollout.PromptStream(task.train_rows, task.encode_prompt, limit, seed=3, position=b.position)  # resume
    assert c.next(5)[0] == more
    with pytest.raises(rollout.RolloutError, match="no training prompt fits"):
        rollout.PromptStream(task.train_rows, task.encode_prompt, 1, seed=0).next(1)


def test_rollout_texts_and_greedy_anchors(tiny):
    _, task, cfg, params = tiny
    spec = spec_for(task, cfg, greedy_anchor=True)
    stream = rollout.PromptStream(task.train_rows, task.encode_prompt, 64, seed=0)
    ro = rollout.rollout(spec, params, stream, jax.random.key(5))
    B = 3 * 4
    assert len(ro.texts) == B and len(ro.rows) == 3 and ro.valid.all() and ro.rounds == 1
    for i in range(B):
        assert ro.texts[i] == sampling.response_text(task.tokenizer, ro.out, i, spec.config.stop_ids)
    # the anchors are the greedy decodes of the same prompts
    ids = [task.encode_prompt(r) for r in ro.rows]
    greedy = spec.sampler(
        params, ids, jax.random.key(0), dataclasses.replace(spec.config, temperature=0.0, n_samples=1)
    )
    assert ro.anchors == [sampling.response_text(task.tokenizer, greedy, i, spec.config.stop_ids) for i in range(3)]
    # the same key and stream position give the same rollout
    again = rollout.rollout(
        spec, params, rollout.PromptStream(task.train_rows, task.encode_prompt, 64, 0), jax.random.key(5)
    )
    assert again.texts == ro.texts


def test_dynamic_sampling_keeps_rows_texts_and_rewards_aligned(tiny):
    _, task, cfg, params = tiny
    spec = spec_for(task, cfg, dynamic_sampling=True, dynamic_max_rounds=3)
    stream = rollout.PromptStream(task.train_rows, task.encode_prompt, 64, seed=1)
    from clipo_jax.rewards.stage import RewardResult

    seen = []

    def score(rows, texts, lengths, truncated, anchors):
        # reward = odd token count; a group of one prompt in three gets all zeros (no spread)
        r = (np.asarray(lengths) % 2).astype(np.float32)
        r[: spec.group_size] = 0.0
        seen.append((list(rows), list(texts), r.copy()))
        return RewardResult(r, r, {"x": r * 2}, {"m": float(len(seen))})

    ro = rollout.rollout(spec, params, stream, jax.random.key(2), score=score)
    G = spec.group_size
    assert ro.out.tokens.shape[0] == 3 * G and len(ro.texts) == 3 * G and len(ro.rows) == 3
    by_text = {}
    for rows, texts, r in seen:
        for i, t in enumerate(texts):
            by_text.setdefault((rows[i // G]["prompt"], t), set()).add(float(r[i]))
    for i, t in enumerate(ro.texts):
        assert t == sampling.response_text(task.tokenizer, ro.out, i, spec.config.stop_ids)
        assert float(ro.rewards["rewards"][i]) in by_text[(ro.rows[i // G]["prompt"], t)]
    np.testing.assert_array_equal(ro.rewards["per_term"]["x"], 2 * ro.rewards["rewards"])
    kept = ro.valid.reshape(-1, G).all(1)
    assert (ro.rewards["rewards"].reshape(-1, G)[kept].std(1) > 0).all()
    assert ro.rounds == len(seen) and ro.metrics["dynamic_sampling/rounds"] == len(seen)


def test_clipo_stage_equals_the_head_step_and_reward(tiny):
    config, task, cfg, params = tiny
    cc = contrastive.ContrastiveConfig(group_size=4, d_out=8)
    head = contrastive.init_head_state(jax.random.key(1), cfg.d_model, cc)
    rng = np.random.default_rng(0)
    out = sampling.SampleOutput(
        *[None] * 4,
        lengths=rng.integers(1, 9, 12),
        logprobs=None,
        pooled_hidden=rng.normal(size=(12, cfg.d_model)).astype(np.float32),
        truncated=None,
    )
    labels = np.array([1, 1, 0, 1, 1, 0, 0, 1, 1, 1, 1, 0], np.int32)
    opts = dataclasses.make_dataclass(
        "O", [("lam", float), ("c0", float), ("clip_min", float), ("log_geometry", bool)]
    )(0.2, 0.0, -0.5, True)
    key = jax.random.key(9)
    same = jax.tree.map(np.array, head)
    new_head, reward, m = contrastive.clipo_stage(
        head, out, labels, 4, key, cc, opts, lambda t: jax.tree.map(jax.numpy.asarray, t)
    )
    _, per, _, _ = contrastive.head_step(
        jax.tree.map(jax.numpy.asarray, same), out.pooled_hidden, labels, np.repeat(np.arange(3), 4), key, cc
    )
    want = np.asarray(contrastive.contrastive_reward(per, labels, lam=0.2, c0=0.0, clip_min=-0.5))
    np.testing.assert_allclose(reward, want, rtol=1e-6)
    assert (reward[labels == 0] == 0).all() and m["contrastive/reward_mean"] == pytest.approx(float(want.mean()))
    assert any(k.startswith("clipo/geometry") for k in m)
    # the rollout's group size must be the head's: a mismatch would group the loss wrongly
    with pytest.raises(contrastive.ContrastiveError, match="group_size=4 but the rollout groups have 6"):
        contrastive.clipo_stage(new_head, out, labels, 6, key, cc, opts, lambda t: t)
    with pytest.raises(contrastive.ContrastiveError, match="does not divide batch size 12"):
        contrastive.clipo_stage(new_head, out, labels, 5, key, cc, opts, lambda t: t)


def test_clipo_stage_padding_metrics_and_geometry_before_update(tiny):
    """Padding groups neither train the head nor enter its metrics; per-label metrics are logged
    without log_geometry; the geometry is taken with the head before its update."""
    config, task, cfg, params = tiny
    cc = contrastive.ContrastiveConfig(group_size=4, d_out=8, loss_type="supcon_out")
    rng = np.random.default_rng(1)
    pooled = rng.normal(size=(12, cfg.d_model)).astype(np.float32)
    pooled[8:] = pooled[:4]  # the last group is a padding copy of the first, as DAPO pads
    labels = np.array([1, 1, 0, 1, 1, 0, 0, 1, 1, 1, 0, 1], np.int32)
    labels[8:] = labels[:4]
    lengths = rng.integers(1, 9, 12)
    lengths[8:] = lengths[:4]
    valid = np.arange(12) < 8
    out = sampling.SampleOutput(*[None] * 4, lengths=lengths, logprobs=None, pooled_hidden=pooled, truncated=None)
    place = lambda t: jax.tree.map(jax.numpy.asarray, t)
    fields = [("lam", float), ("c0", float), ("clip_min", float), ("log_geometry", bool), ("head_on_padding", bool)]
    Opts = dataclasses.make_dataclass("O", fields)
    head0 = contrastive.init_head_state(jax.random.key(1), cfg.d_model, cc)
    copy = lambda: jax.tree.map(jax.numpy.array, head0)
    key = jax.random.key(3)

    masked, reward, m = contrastive.clipo_stage(
        copy(), out, labels, 4, key, cc, Opts(0.2, 0.0, -0.5, True, False), place, valid=valid
    )
    out8 = out._replace(pooled_hidden=pooled[:8], lengths=lengths[:8])
    alone, reward8, m8 = contrastive.clipo_stage(
        copy(), out8, labels[:8], 4, key, cc, Opts(0.2, 0.0, -0.5, True, False), place
    )
    for a, b in zip(jax.tree.leaves(masked.params), jax.tree.leaves(alone.params)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(reward[:8], reward8, rtol=1e-6)
    for k in ("clipo/count/correct", "clipo/loss/correct/mean", "clipo/length/incorrect/max", "clipo/reward/all/mean"):
        assert m[k] == pytest.approx(m8[k], rel=1e-6), k
    # geometry before the update: the pooled-space figures do not depend on the head; the head-space
    # ones equal those of the initial head (applied to the 8 real rows)
    z0 = contrastive.head_apply(head0.params, pooled[:8], cc.head)
    geo0 = contrastive.contrastive_geometry(
        pooled[:8], z0, labels[:8], np.repeat(np.arange(2), 4), lengths[:8], group_size=4
    )
    for k, v in geo0.items():
        assert m[k] == pytest.approx(float(v), rel=1e-5, abs=1e-6), k
    with_pad, _, m_pad = contrastive.clipo_stage(
        copy(), out, labels, 4, key, cc, Opts(0.2, 0.0, -0.5, False, True), place, valid=valid
    )
    assert not np.allclose(jax.tree.leaves(with_pad.params)[0], jax.tree.leaves(alone.params)[0])
    assert m_pad["clipo/count/correct"] == labels.sum()  # head_on_padding: every row counts
    assert not any(k.startswith("clipo/geometry") for k in m_pad)  # log_geometry off: labels only


def test_build_rl_batch_masks_padding_and_truncated_rows():
    out = sampling.SampleOutput(
        prompt_tokens=np.ones((4, 3), np.int32),
        prompt_mask=np.ones((4, 3), bool),
        tokens=np.full((4, 2), 7, np.int32),
        response_mask=np.array([[1, 1], [1, 0], [1, 1], [1, 1]], bool),
        lengths=np.array([2, 1, 2, 2]),
        logprobs=np.full((4, 2), -1.0, np.float32),
        pooled_hidden=None,
        truncated=np.array([False, False, True, False]),
    )
    valid_rows = np.array([True, True, True, False])
    b = update.build_rl_batch(out, np.arange(4.0), valid_rows, mask_truncated=True)
    np.testing.assert_array_equal(b.response_mask, [[1, 1], [1, 0], [0, 0], [0, 0]])
    # Dr. GRPO's normaliser counts the truncated row (sampled), not the padding copy
    np.testing.assert_array_equal(b.sampled_rows, [True, True, True, False])
    assert update.trim_padding(b, 1).sampled_rows is b.sampled_rows
    assert b.tokens.shape == (4, 5) and b.valid[1].tolist() == [1, 1, 1, 1, 0]
    assert b.old_logp.sum() == 0 and b.sampler_logp.sum() == -8
    # the KL in the reward covers the truncated row too (its reward enters the group's baseline)
    np.testing.assert_array_equal(update.sampled_tokens(out, valid_rows, 2), [[1, 1], [1, 0], [1, 1], [0, 0]])
    np.testing.assert_array_equal(update.sampled_tokens(out, valid_rows, 1), [[1], [1], [1], [0]])


def _padded_batch(vocab, rng, B=6, Tp=12, N=20, prompt_lens=(5, 3, 4, 5, 2, 5), resp_lens=(7, 1, 4, 6, 7, 3)):
    """An RL batch laid out as the rollout lays it out: prompts left-padded to Tp, responses
    right-padded to N, padding holding junk tokens (the trim must not depend on them)."""
    tokens = rng.integers(1, vocab, (B, Tp + N)).astype(np.int32)
    valid = np.zeros((B, Tp + N), bool)
    for i, (p, r) in enumerate(zip(prompt_lens, resp_lens)):
        valid[i, Tp - p : Tp + r] = True
    resp = valid[:, Tp:].copy()
    f32 = lambda *s: rng.normal(size=s).astype(np.float32)  # noqa: E731
    return update.RLBatch(tokens, valid, resp, f32(B), -np.abs(f32(B, N)), -np.abs(f32(B, N)), -np.abs(f32(B, N)))


def test_trim_padding_shapes():
    b = _padded_batch(50, np.random.default_rng(0))
    t = update.trim_padding(b, 4)  # longest prompt 5 -> 8 of 12 columns, longest response 7 -> 8 of 20
    assert t.tokens.shape == (6, 16) and t.response_mask.shape == (6, 8) and t.old_logp.shape == (6, 8)
    np.testing.assert_array_equal(t.tokens, b.tokens[:, 4:20])
    np.testing.assert_array_equal(t.sampler_logp, b.sampler_logp[:, :8])
    assert t.valid.sum() == b.valid.sum() and t.response_mask.sum() == b.response_mask.sum()
    assert update.trim_padding(b, 0) is b  # off
    assert update.trim_padding(b, 64) is b  # rounding up reaches both full widths: nothing to drop
    assert update.trim_padding(b, 1).tokens.shape == (6, 5 + 7)
    empty = b._replace(valid=b.valid & False, response_mask=b.response_mask & False)
    assert update.trim_padding(empty, 1).tokens.shape == (6, 2)  # one prompt column predicts token 0


@pytest.mark.parametrize(
    "aggregation,kl", [("token_mean", 0.0), ("seq_mean_token_sum_norm", 0.1), ("seq_mean_token_mean", 0.1)]
)
def test_trim_padding_changes_no_logprob_or_update(tiny, aggregation, kl):
    """The trimmed batch gives the full batch's log-probs on every kept column and the same train
    step (loss, gradient, new parameters); Dr. GRPO's constant normaliser is the budget N."""
    from clipo_jax.rl.step import TrainState, response_logprobs

    _, task, cfg, params = tiny
    b = _padded_batch(cfg.vocab_size, np.random.default_rng(1))
    t = update.trim_padding(b, 4)
    N, n = b.response_mask.shape[1], t.response_mask.shape[1]
    full = np.asarray(response_logprobs(params, cfg, b.tokens, b.valid, N))
    kept = np.asarray(response_logprobs(params, cfg, t.tokens, t.valid, n))
    mask = b.response_mask[:, :n]
    np.testing.assert_allclose(kept[mask], full[:, :n][mask], rtol=0, atol=2e-6)

    # new params = params - 1e3 x gradient: compares the gradients (scaled far above the params' rounding)
    opt = optax.sgd(1e3)
    scfg = StepConfig(aggregation=aggregation, kl_coef=kl, max_len=N)
    step = jax.jit(lambda s, x: train_step(s, x, cfg=cfg, scfg=scfg, optimizer=opt))
    fresh = lambda: TrainState(params, opt.init(params), jax.numpy.zeros((), jax.numpy.int32))  # noqa: E731
    s_full, m_full = step(fresh(), b)
    s_trim, m_trim = step(fresh(), t)
    assert float(m_full["actor/loss"]) != 0.0
    assert ("actor/kl" in m_full) == bool(kl)
    for k in ("actor/loss", "actor/grad_norm", "actor/pg_loss", "actor/entropy") + (("actor/kl",) if kl else ()):
        assert float(m_trim[k]) == pytest.approx(float(m_full[k]), rel=1e-5, abs=1e-7), k
    for x, y, p in zip(*(jax.tree.leaves(s.params) for s in (s_trim, s_full, fresh()))):
        g_trim, g_full = np.asarray(p) - np.asarray(x), np.asarray(p) - np.asarray(y)
        np.testing.assert_allclose(g_trim, g_full, rtol=1e-3, atol=1e-4 * np.abs(g_full).max())
    if aggregation == "seq_mean_token_sum_norm":  # without the budget the trimmed loss is N / n larger
        loose = StepConfig(aggregation=aggregation, kl_coef=kl)
        _, m_loose = jax.jit(lambda s, x: train_step(s, x, cfg=cfg, scfg=loose, optimizer=opt))(fresh(), t)
        assert float(m_loose["actor/pg_loss"]) == pytest.approx(float(m_full["actor/pg_loss"]) * N / n, rel=1e-5)
    with pytest.raises(ValueError, match="shorter than"):
        train_step(fresh(), b, cfg=cfg, scfg=StepConfig(max_len=N - 1), optimizer=opt)


def test_policy_update_keeps_groups_together_and_repeats_its_order(tiny):
    config, task, cfg, params = tiny
    spec = spec_for(task, cfg, G=2, prompts=4)
    ro = rollout.rollout(
        spec, params, rollout.PromptStream(task.train_rows, task.encode_prompt, 64, 0), jax.random.key(1)
    )
    adv = np.repeat(np.arange(4.0), 2)  # advantage = group id
    batch = update.build_rl_batch(ro.out, adv, ro.valid, False)
    opt = make_optimizer(1e-3, total_steps=10)
    scfg = StepConfig()
    step = jax.jit(lambda s, b: train_step(s, b, cfg=cfg, scfg=scfg, optimizer=opt))
    seen = []

    def step_fn(state, b):
        seen.append(np.asarray(b.advantages))
        return step(state, b)

    def place(tree):
        return jax.tree.map(jax.numpy.asarray, tree)

    from clipo_jax.rl.step import TrainState

    state = TrainState(params, opt.init(params), jax.numpy.zeros((), jax.numpy.int32))
    kw = dict(step_fn=step_fn, place=place, to_host=lambda t: jax.tree.map(np.asarray, t), epochs=2, mini_batches=2)
    new_state, metrics = update.policy_update(state, batch, group_size=2, seed=0, step=3, **kw)
    assert len(metrics) == 4 and len(seen) == 4
    for a in seen:  # each mini-batch holds two whole groups
        assert len(a) == 4 and (a[0::2] == a[1::2]).all()
    first = [a.tolist() for a in seen]
    seen.clear()
    update.policy_update(state, batch, group_size=2, seed=0, step=3, **kw)
    assert [a.tolist() for a in seen] == first  # seeded by (seed, step, epoch)
    m = update.update_metrics(metrics)
    assert m["actor/pg_loss"] == pytest.approx(np.mean([float(x["actor/pg_loss"]) for x in metrics]))
    assert update.skipped_steps(metrics) == 0


def test_rollout_grade_metrics_against_the_grader(tmp_path):
    # training rollouts graded as the test sets are: right process, a bare copy of the leaked
    # answer (lucky), a wrong answer; the CLIPO reward averaged over each kind of success
    from clipo_jax.data import synthetic
    from configs.demo import get_config

    config = get_config("size=tiny,shortcut=0.5,leak=last,copy_style=bare")
    task = tasks.build_task(config.task, str(tmp_path))
    assert task.grade_keys == ("outcome", "process", "lucky", "copied", "copied_unworked")
    base = synthetic.SyntheticTask(leak_share=1.0, leak_position="last")
    problems = synthetic.generate_problems(base, 3, seed=5)
    rng = random.Random(0)
    texts, kinds = [], []
    for p in problems:
        copy, _ = synthetic.copied_solution(p, rng, style="bare")
        for kind, text in (("right", synthetic.solution_text(p)), ("copy", copy), ("wrong", f"answer {p.answer + 1}")):
            texts.append(text)
            kinds.append(kind)
        texts.append(synthetic.solution_text(p))
        kinds.append("right")
    kinds = np.array(kinds)
    valid = np.ones(12, bool)
    valid[8:] = False  # the third group: DAPO padding copies, not counted
    ro = rollout.Rollouts(out=None, rows=synthetic.dataset_rows(problems), texts=texts, valid=valid)
    c_reward = np.linspace(-0.5, 0.0, 12)
    m = trainer.rollout_grade_metrics(task, ro, 4, c_reward)
    v = valid
    assert m["rollout/outcome"] == pytest.approx(((kinds != "wrong") & v).sum() / v.sum())  # 6 / 8
    assert m["rollout/process"] == pytest.approx(((kinds == "right") & v).sum() / v.sum())
    assert m["rollout/lucky"] == pytest.approx(((kinds == "copy") & v).sum() / v.sum())
    assert m["rollout/copied"] == m["rollout/lucky"]  # every lucky answer here is a copy; right ones are not counted
    assert m["clipo/count/process_right"] == 4 and m["clipo/count/lucky"] == 2 and m["clipo/count/copied"] == 2
    assert m["clipo/reward/process_right/mean"] == pytest.approx(c_reward[(kinds == "right") & v].mean())
    assert m["clipo/reward/lucky/mean"] == pytest.approx(c_reward[(kinds == "copy") & v].mean())
    # without CLIPO only the rates
    assert set(trainer.rollout_grade_metrics(task, ro, 4)) == {f"rollout/{k}" for k in task.grade_keys} | {
        "time/grade_rollouts"
    }
