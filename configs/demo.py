r"""The embedded default: SFT warm start + GRPO on the synthetic arithmetic task (2-core CPU).

  python -m experiments.train --config=configs/demo.py --workdir=/tmp/clipo_demo

Args (after the colon): size=tiny|small, clipo (add the CLIPO reward), algo=grpo|dapo|dr_grpo|gspo|gmpo,
seed=N, e.g. --config=configs/demo.py:clipo,algo=dapo,seed=1. Override anything else with
--config.rl.lr=3e-5 etc.
"""
import ml_collections

from clipo_jax.configlib import parse_arg


def get_config(arg=None):
  a = parse_arg(arg, size="small", clipo=False, algo="grpo", seed=0, steps=0)
  c = ml_collections.ConfigDict()
  c.seed = a.seed
  c.progress_bar = True

  c.task = ml_collections.ConfigDict(dict(
      name="synthetic", seed=0, train_size=20000, test_size=200, sft_size=4000, lucky_share=0.2,
      vocab_size=512))

  c.model = ml_collections.ConfigDict(dict(
      source="init:custom", d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=32, d_ff=384,
      dtype="float32", max_seq_len=256))
  if a.size == "tiny":  # for tests: seconds, learns nothing useful
    c.model.update(d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16, d_ff=64)

  c.sft = ml_collections.ConfigDict(dict(steps=600, batch_size=32, lr=3e-3, warmup_steps=30,
                                         weight_decay=0.0, max_len=128, cache_dir=""))

  c.rl = ml_collections.ConfigDict(dict(
      steps=60, prompts_per_step=16, group_size=8, max_new_tokens=48, max_prompt_len=80,
      temperature=1.0, top_p=1.0,
      lr=2e-4, warmup_steps=5, schedule="constant", weight_decay=0.0, grad_clip=1.0,
      advantage="grpo", policy_loss="ppo_clip", eps_low=0.2, eps_high=0.2, dual_clip=3.0,
      aggregation="token_mean", kl_coef=0.0, kl_estimator="k3", kl_clamp=10.0, entropy_coef=0.0,
      epochs=1, mini_batches=2, micro_batches=1, tis_cap=0.0, remat=False,
      dynamic_sampling=False, dynamic_max_rounds=2, overlong_buffer=0, mask_truncated=False,
      max_consecutive_skips=5))
  if a.algo == "dapo":
    c.rl.update(dynamic_sampling=True, eps_high=0.28, overlong_buffer=8)
  elif a.algo == "dr_grpo":
    c.rl.update(advantage="dr_grpo", aggregation="seq_mean_token_sum_norm")
  elif a.algo in ("gspo", "gmpo"):
    c.rl.update(policy_loss=a.algo, eps_low=3e-4 if a.algo == "gspo" else 0.4,
                eps_high=4e-4 if a.algo == "gspo" else 0.4, aggregation="seq_mean_token_mean")
  elif a.algo != "grpo":
    raise ValueError(f"unknown algo {a.algo!r}")

  c.clipo = ml_collections.ConfigDict(dict(
      enabled=a.clipo, loss_type="infonce", level="group", temperature=0.05, masked_label=0,
      skip_trivial=True, similarity="cosine", head="linear", d_out=64, fixed_head=False, lr=1e-3,
      weight_decay=0.01, lam=0.2, c0=0.0, clip_min=-0.5, warmup_steps=0, log_geometry=True))

  c.eval = ml_collections.ConfigDict(dict(every=0, max_new_tokens=64))
  c.ckpt = ml_collections.ConfigDict(dict(every=20, keep=2))
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))

  if a.size == "tiny":
    c.task.update(train_size=500, test_size=8, sft_size=200)
    c.sft.update(steps=5, batch_size=8)
    c.rl.update(steps=4, prompts_per_step=4, group_size=4, max_new_tokens=16, mini_batches=1)
    c.eval.update(max_new_tokens=16)
    c.ckpt.update(every=2)
  if a.steps:
    c.rl.steps = a.steps
  return c
