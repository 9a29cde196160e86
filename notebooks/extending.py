# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # Extending: a new policy loss and a new contrastive loss, trained end to end
#
# The RL core and CLIPO pick their pieces by name from small registries: policy losses
# (`clipo_jax.rl.losses.register_policy_loss`), advantage estimators, KL estimators and aggregations
# (`register_advantage`, `register_kl`, `register_aggregation`), contrastive losses and similarities
# (`clipo_jax.contrastive.register_loss`, `register_similarity`), rewards, reward terms and tasks.
# One function plus one registration makes a name usable from a config. This notebook adds a policy
# loss and a contrastive loss, checks each against a direct numpy computation, and trains the
# embedded demo briefly with each.
#
# With `NOTEBOOK_SIZE=small` (default) the runs use the demo's `size=tiny` preset (a 1-layer model,
# 4 RL steps of 4 prompts: the point is that the new names plug into the real trainer, not what the
# model learns); `NOTEBOOK_SIZE=full` runs 20 RL steps of 8 prompts.

# %%
import json
import os
import pathlib
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

ROOT = next(p for p in [pathlib.Path.cwd(), *pathlib.Path.cwd().parents] if (p / "configs" / "demo.py").exists())
sys.path.insert(0, str(ROOT))  # the configs package lives at the repository root

from clipo_jax import contrastive as C  # noqa: E402
from clipo_jax import trainer  # noqa: E402
from clipo_jax.rl import losses  # noqa: E402
from configs import demo  # noqa: E402

SIZE = os.environ.get("NOTEBOOK_SIZE", "small")

# %% [markdown]
# ## A policy loss
#
# `fn(logp, old_logp, adv, mask, **opts) -> (per_token_loss, metrics)`: token log-probs under the
# current and the sampling policy `[B, T]`, advantages `[B, 1]` (or per token `[B, T]`), the response
# mask. The trainer aggregates the per-token loss (token mean, sequence mean, ...) itself.
#
# The example is a *soft-clipped* surrogate: instead of PPO's hard clip of the ratio `r` to
# `[1 - eps, 1 + eps]`, `r` passes through `1 + eps * tanh((r - 1) / eps)`, which is smooth and keeps
# a (shrinking) gradient outside the trust region.


# %%
@losses.register_policy_loss("soft_clip")
def soft_clip(logp, old_logp, adv, mask, *, eps=0.2):
    ratio = jnp.exp(jnp.clip(logp - old_logp, -20.0, 20.0))
    soft = 1.0 + eps * jnp.tanh((ratio - 1.0) / eps)
    per_token = -(soft * adv) * mask
    n = jnp.maximum(mask.sum(), 1.0)
    return per_token, {"soft_ratio_mean": jnp.sum(soft * mask) / n}


print("policy losses:", sorted(losses.POLICY_LOSSES))

# %% [markdown]
# Checked against numpy on random inputs, through the library's `policy_loss` entry point (the one
# the train step calls):

# %%
rng = np.random.default_rng(0)
logp = rng.normal(size=(4, 6)) * 0.1 - 1.0
old = logp - rng.normal(size=(4, 6)) * 0.3
adv = np.array([1.0, -1.0, 0.5, 0.0])
mask = (rng.random((4, 6)) > 0.3).astype(np.float32)
per_token, m = losses.policy_loss("soft_clip", *(jnp.asarray(x, jnp.float32) for x in (logp, old, adv, mask)), eps=0.2)
r = np.exp(logp - old)
want = -(1 + 0.2 * np.tanh((r - 1) / 0.2)) * adv[:, None] * mask
print(
    "max |library - numpy| =",
    float(np.abs(np.asarray(per_token) - want).max()),
    " metrics:",
    {k: round(float(v), 4) for k, v in m.items()},
)
np.testing.assert_allclose(np.asarray(per_token), want, rtol=1e-5, atol=1e-6)

# %% [markdown]
# ## A contrastive loss
#
# A CLIPO loss type is a function of the anchor rows, `AnchorRows(logits, positive_mask,
# num_positives, log_denominator, sampled_positive)`, returning one loss per anchor; the framework
# does the similarity, the row max, the temperature, the masking of incorrect and trivial anchors
# and the blockwise group layout. The example uses the *hardest* positive (the least similar correct
# rollout) instead of InfoNCE's random one: `L_i = log(S_i + eps) - min_{p in P(i)} l_ip`.


# %%
def hard_positive(rows):
    worst = jnp.min(jnp.where(rows.positive_mask, rows.logits, jnp.inf), axis=-1)
    return jnp.where(rows.num_positives > 0, rows.log_denominator - worst, 0.0)


C.register_loss("hard_positive", hard_positive)
print("contrastive losses:", sorted(C.LOSSES))

# %% [markdown]
# Two checks. With identical positives (8 correct rollouts sharing an embedding, 8 orthogonal
# incorrect ones) every positive has logit 0, so the loss is `log(7 + 8 e^-20 + eps) ~ log 7`,
# like InfoNCE. On random embeddings it is at least InfoNCE's value for any drawn positive, since it
# takes the smallest positive logit.

# %%
z = np.zeros((16, 16), np.float32)
z[:8, 0] = 1.0
z[np.arange(8, 16), np.arange(8, 16)] = 1.0
labels = np.array([1] * 8 + [0] * 8)
groups = np.zeros(16, np.int32)
per, _ = C.contrastive_loss(z, labels, groups, loss_type="hard_positive")
want = np.log(7 + 8 * np.exp(-20.0) + 1e-8)
print(f"identical positives: {np.asarray(per[:8]).mean():.6f}  closed form {want:.6f}  (log 7 = {np.log(7):.6f})")
np.testing.assert_allclose(np.asarray(per[:8]), want, atol=1e-5)

zr = rng.normal(size=(16, 8)).astype(np.float32)
zr /= np.linalg.norm(zr, axis=1, keepdims=True)
lab = rng.integers(0, 2, 16)
hard, _ = C.contrastive_loss(zr, lab, groups, loss_type="hard_positive")
for seed in range(5):
    info, _ = C.contrastive_loss(zr, lab, groups, loss_type="infonce", rng=jax.random.key(seed))
    assert np.all(np.asarray(hard) >= np.asarray(info) - 1e-5)
print("hard_positive >= infonce on every anchor, 5 draws")

# %% [markdown]
# ## Unknown names fail before any compilation
#
# The trainer checks every registry name in the config first and lists the valid ones.

# %%
bad = demo.get_config("size=tiny")
bad.rl.policy_loss = "soft_clp"
try:
    trainer.validate_config(bad)
except (ValueError, trainer.TrainingError) as e:  # raised before any model is built
    print(f"{type(e).__name__}: {e}")

# %% [markdown]
# ## A reward and a task, so that an untrained model gets a signal
#
# The runs below start from a randomly initialised 1-layer model without SFT, which never solves an
# arithmetic problem: every reward would be 0, every advantage 0, and CLIPO would find no correct
# rollouts to contrast. Two more registrations fix that for the demonstration: a reward function
# (`clipo_jax.rewards.register_reward`; `fn(response, ground_truth, **row) -> float`) that pays 1 for
# a response of even character length, and a task (`clipo_jax.tasks.register_task`;
# `fn(task_config, workdir) -> Task`) that is the synthetic task with that reward on its training
# rows. About half of the random rollouts succeed. (Evaluation still grades the arithmetic.)

# %%
import dataclasses  # noqa: E402

from clipo_jax import tasks  # noqa: E402
from clipo_jax.rewards import register_reward  # noqa: E402


@register_reward("even_length")
def even_length(response, ground_truth, **row):
    return 1.0 if len(response) % 2 == 0 else 0.0


@tasks.register_task("synthetic_even_length")
def synthetic_even_length(cfg, workdir):
    task = tasks.build_synthetic(cfg, workdir)
    rows = [dict(r, reward_fn="even_length") for r in task.train_rows]
    return dataclasses.replace(task, train_rows=rows)


print("tasks:", sorted(tasks.TASKS))

# %% [markdown]
# ## Training with each
#
# The demo config (`size=tiny`, no SFT, the new task) with `rl.policy_loss = "soft_clip"`, then
# GRPO + CLIPO with `clipo.loss_type = "hard_positive"`. The loss's own metrics reach `metrics.jsonl`
# under `actor/`; CLIPO logs `contrastive/*` (the batch loss over its anchors: correct rollouts with
# at least one correct and one incorrect group mate). From a shell the first run is
# `python -m experiments.train --config=configs/demo.py:size=tiny --config.rl.policy_loss=soft_clip --workdir=D`,
# with the module that registers the loss imported first (e.g. at the top of a config file).


# %%
def train(config, label):
    config.task.name = "synthetic_even_length"
    config.sft.steps = 0
    config.progress_bar = False
    if SIZE == "full":
        config.rl.update(steps=20, prompts_per_step=8)
    with tempfile.TemporaryDirectory(prefix=f"clipo_extending_{label}_") as workdir:
        trainer.run(config, workdir)
        return [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]


c1 = demo.get_config("size=tiny")
c1.rl.policy_loss = "soft_clip"
m1 = train(c1, "soft_clip")
print("\nstep  reward  actor/soft_ratio_mean")
for m in m1:
    print(f"{m['step']:>4}  {m['reward/outcome_mean']:.3f}  {m['actor/soft_ratio_mean']:.4f}")
assert any(m["reward/outcome_mean"] > 0 for m in m1)
# soft_ratio_mean is 1 here: the tiny preset makes one update per step on the rollouts of the current
# policy (one epoch, one mini-batch), so every ratio is exactly 1 and the gradient is the policy gradient

# %%
c2 = demo.get_config("size=tiny,clipo")
c2.clipo.loss_type = "hard_positive"
m2 = train(c2, "hard_positive")
print("\nstep  reward  contrastive/loss  contrastive/num_anchors  contrastive/reward_mean")
for m in m2:
    print(
        f"{m['step']:>4}  {m['reward/outcome_mean']:.3f}  {m['contrastive/loss']:>16.4f}"
        f"  {m['contrastive/num_anchors']:>23.0f}  {m['contrastive/reward_mean']:>23.4f}"
    )
assert any(m["contrastive/num_anchors"] > 0 for m in m2), "correct rollouts with positives were contrasted"
