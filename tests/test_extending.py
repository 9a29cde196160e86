"""The README's "add your own loss in 10 lines" example works as written."""

import re

import jax
import jax.numpy as jnp
import numpy as np


def test_readme_policy_loss_example_registers_and_trains(tmp_path):
    readme = open("README.md").read()
    code = re.search(r"```python\n(# my_losses.py.*?)```", readme, re.S).group(1)
    exec(compile(code, "README-example", "exec"), {})
    from clipo_jax.rl import losses

    assert "clipped_reinforce" in losses.POLICY_LOSSES
    rng = np.random.default_rng(0)
    logp = jnp.asarray(rng.normal(size=(4, 6)) * 0.1 - 1.0, jnp.float32)
    old = logp - 0.05
    adv = jnp.asarray([1.0, -1.0, 0.5, 0.0])
    mask = jnp.asarray(rng.random((4, 6)) > 0.3, jnp.float32)
    per_tok, metrics = losses.policy_loss("clipped_reinforce", logp, old, adv, mask)
    ratio = np.minimum(np.exp(0.05), 2.0)
    want = -(ratio * np.asarray(adv)[:, None]) * np.asarray(mask)
    np.testing.assert_allclose(np.asarray(per_tok), want, rtol=1e-5)
    # and it plugs into the real train step by name
    from clipo_jax.models import transformer
    from clipo_jax.models.config import PRESETS
    from clipo_jax.rl.step import RLBatch, StepConfig, TrainState, make_optimizer, train_step

    cfg = PRESETS["tiny_llama"]
    params = transformer.init_params(cfg, jax.random.key(0))
    opt = make_optimizer(1e-3, total_steps=1)
    state = TrainState(params, opt.init(params), jnp.zeros((), jnp.int32))
    B, Tp, N = 4, 5, 6
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (B, Tp + N)), jnp.int32)
    batch = RLBatch(
        tokens, jnp.ones((B, Tp + N), bool), mask > 0, adv, jnp.zeros((B, N)), jnp.zeros((B, N)), jnp.zeros((B, N))
    )
    new, m = train_step(
        state, batch, cfg=cfg, scfg=StepConfig(policy_loss="clipped_reinforce", use_old_logp=False), optimizer=opt
    )
    assert float(m["actor/skipped"]) == 0.0 and int(new.step) == 1


def _readme_block(marker: str) -> str:
    readme = open("README.md").read()
    inside = r"(?:(?!```).)*?"  # one code block: never across a closing fence
    return re.search(r"```python\n(" + inside + re.escape(marker) + inside + r")```", readme, re.S).group(1)


def test_readme_contrastive_loss_example_matches_numpy():
    ns = {}
    exec(compile(_readme_block('C.register_loss("hard_positive"'), "README-example", "exec"), ns)
    from clipo_jax import contrastive as C

    assert "hard_positive" in C.LOSSES
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(5, 7)).astype(np.float32)
    pos = rng.random((5, 7)) > 0.5
    pos[4] = False  # an anchor without a positive
    log_den = np.log(np.exp(logits).sum(-1))
    rows = C.AnchorRows(
        jnp.asarray(logits),
        jnp.asarray(pos),
        jnp.asarray(pos.sum(-1)),
        jnp.asarray(log_den),
        jnp.zeros(5, jnp.float32),
    )
    got = np.asarray(ns["hard_positive"](rows))
    want = [log_den[i] - logits[i][pos[i]].min() if pos[i].any() else 0.0 for i in range(5)]
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_readme_reward_term_example_scores_a_batch():
    exec(compile(_readme_block('@register_reward_term("brevity")'), "README-example", "exec"), {})
    import ml_collections

    from clipo_jax.rewards.stage import REWARD_TERMS, RewardBatch, RewardContext, RewardStage

    assert "brevity" in REWARD_TERMS
    stage = RewardStage.from_config(ml_collections.ConfigDict({"terms": {"brevity": 0.5}}), RewardContext())
    try:
        lengths = np.array([100, 300, 50, 0])
        batch = RewardBatch([{"prompt": "a"}, {"prompt": "b"}], ["w"] * 4, lengths, np.zeros(4, bool), 2)
        result = stage.compute(batch)
        np.testing.assert_allclose(result.rewards, -0.5 * lengths / 1000.0, rtol=1e-6)
        assert "reward/brevity/mean" in result.metrics
    finally:
        stage.close()
