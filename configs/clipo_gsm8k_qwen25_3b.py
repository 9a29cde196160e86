r"""CLIPO paper Track I: Qwen2.5-3B-Instruct, GSM8K train, GRPO + CLIPO (spec section 7).

  python -m experiments.train --config=configs/clipo_gsm8k_qwen25_3b.py:model=/ckpt/Qwen2.5-3B-Instruct,data=/data/clipo \
      --workdir=/runs/track1_clipo

model= an HF checkpoint directory (config.json + safetensors, with tokenizer.json); data= the CLIPO
parquet directory (train/, test/). Args: baseline (GRPO without CLIPO), algo=..., seed=N, fixed_head,
loss=infonce|supcon_in|supcon_out|soft_nn, level=group|cross|batch, tau=0.05, lam=0.2.
Mesh: --config.mesh.fsdp=8 etc. on a GPU/TPU slice.
"""
import ml_collections

from clipo_jax.configlib import parse_arg
from configs import common

TRACK_I_TESTS = ("gsm8k", "gsm_symbolic", "gsm_p1", "gsm_p2", "theoremqa_x2", "mmlu2k", "truthfulqa_x2",
                 "commonsense_qa")


def get_config(arg=None):
  a = parse_arg(arg, model="", data="", baseline=False, algo="grpo", seed=0, fixed_head=False,
                loss="infonce", level="group", tau=0.05, lam=0.2)
  c = ml_collections.ConfigDict()
  c.task = ml_collections.ConfigDict(dict(
      name="dataset", tokenizer=a.model, train=f"clipo:{a.data}/train/gsm8k.parquet",
      tests=",".join(f"{n}=clipo:{a.data}/test/{n}.parquet" for n in TRACK_I_TESTS),
      train_limit=0, test_limit=0))
  c.model = ml_collections.ConfigDict(dict(source=a.model, dtype="bfloat16"))
  c.sft = common.sft_block()
  # 7,473 prompts / 512 per step = 14 steps per epoch, 6 epochs
  c.rl = common.rl_block(steps=84, prompts_per_step=512, group_size=16, max_prompt_len=512, max_new_tokens=2048,
                         lr=1e-6, warmup_steps=0, schedule="constant", weight_decay=0.01, grad_clip=1.0,
                         eps_low=0.2, eps_high=0.2, dual_clip=3.0, aggregation="token_mean", kl_coef=0.001,
                         kl_estimator="k3", epochs=1, mini_batches=2, micro_batches=64, remat=True,
                         temperature=1.0, top_p=1.0)
  common.apply_algo(c.rl, a.algo)
  c.clipo = common.clipo_block(not a.baseline, d_out=512, warmup_steps=14, fixed_head=a.fixed_head,
                               loss_type=a.loss, level=a.level, temperature=a.tau, lam=a.lam,
                               log_geometry=False)
  c.eval = ml_collections.ConfigDict(dict(every=7, max_new_tokens=2048))
  c.ckpt = ml_collections.ConfigDict(dict(every=7, keep=3))
  return common.finish(c, a.seed)
