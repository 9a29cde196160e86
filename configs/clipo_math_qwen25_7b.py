r"""CLIPO paper Track II: Qwen2.5-7B-Instruct, MATH (7,500), GRPO + CLIPO (spec section 7).

  python -m experiments.train --config=configs/clipo_math_qwen25_7b.py:model=/ckpt/Qwen2.5-7B-Instruct,data=/data/clipo \
      --workdir=/runs/track2_clipo

Args as in clipo_gsm8k_qwen25_3b.py (baseline, algo=grpo|dapo|gspo|gmpo, seed, fixed_head, loss, level,
tau, lam). Validation in the paper: T 0.6, top-p 0.95, mean@16 every 29 steps — use
experiments.evaluate with --temperature=0.6 --top_p=0.95 --n=16 on the saved checkpoints.
"""
import ml_collections

from clipo_jax.configlib import parse_arg
from configs import common

TRACK_II_TESTS = ("math", "math_perturb_simple", "math_perturb_hard", "amc", "aime", "aime2025")


def get_config(arg=None):
  a = parse_arg(arg, model="", data="", baseline=False, algo="grpo", seed=0, fixed_head=False,
                loss="infonce", level="group", tau=0.05, lam=0.2)
  c = ml_collections.ConfigDict()
  c.task = ml_collections.ConfigDict(dict(
      name="dataset", tokenizer=a.model, train=f"clipo:{a.data}/train/math75.parquet",
      tests=",".join(f"{n}=clipo:{a.data}/test/{n}.parquet" for n in TRACK_II_TESTS),
      train_limit=0, test_limit=0))
  c.model = ml_collections.ConfigDict(dict(source=a.model, dtype="bfloat16"))
  c.sft = common.sft_block()
  # 7,500 prompts / 128 per step = 58 steps per epoch, 10 epochs
  c.rl = common.rl_block(steps=580, prompts_per_step=128, group_size=16, max_prompt_len=512, max_new_tokens=4096,
                         lr=1e-6, warmup_steps=0, schedule="constant", weight_decay=0.01, grad_clip=1.0,
                         eps_low=0.2, eps_high=0.2, dual_clip=3.0, aggregation="token_mean", kl_coef=0.001,
                         kl_estimator="k3", epochs=1, mini_batches=1, micro_batches=64, remat=True,
                         temperature=1.0, top_p=1.0)
  common.apply_algo(c.rl, a.algo)
  c.clipo = common.clipo_block(not a.baseline, d_out=2048, warmup_steps=58, fixed_head=a.fixed_head,
                               loss_type=a.loss, level=a.level, temperature=a.tau, lam=a.lam,
                               log_geometry=False)
  c.eval = ml_collections.ConfigDict(dict(every=29, max_new_tokens=4096))
  c.ckpt = ml_collections.ConfigDict(dict(every=29, keep=3))
  return common.finish(c, a.seed)
