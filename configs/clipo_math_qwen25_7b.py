r"""CLIPO paper Track II: Qwen2.5-7B-Instruct, MATH (7,500), GRPO + CLIPO (arXiv 2603.10101, training tracks).

  python -m experiments.train --config=configs/clipo_math_qwen25_7b.py:model=CKPT/Qwen2.5-7B-Instruct,data=DATA/clipo \
      --config.mesh.fsdp=2 --config.mesh.tensor=4 --workdir=runs/track2_clipo

Args as in clipo_gsm8k_qwen25_3b.py (baseline, algo=grpo|dapo|gspo|gmpo, seed, fixed_head, loss, level,
tau, lam). Validation in the paper: T 0.6, top-p 0.95, mean@16 every 29 steps — use
experiments.evaluate with --temperature=0.6 --top_p=0.95 --n=16 on the saved checkpoints.
Mesh: on 8 H100s --config.mesh.fsdp=2 --config.mesh.tensor=4. rl.micro_batches, rl.logprob_chunks and rl.rollout_chunk_prompts
are sized for that mesh (80 GB per chip); for another mesh or chip re-fit them with
  python -m experiments.plan_scale --config=configs/clipo_math_qwen25_7b.py --shape=qwen25_7b \
      --devices=8 --mesh=data=1,fsdp=2,tensor=4 --fit=H100
"""

from clipo_jax.configlib import parse_arg
from configs import common

TRACK_II_TESTS = ("math", "math_perturb_simple", "math_perturb_hard", "amc", "aime", "aime2025")


def get_config(arg=None):
    a = parse_arg(
        arg,
        model="",
        data="",
        baseline=False,
        algo="grpo",
        seed=0,
        fixed_head=False,
        loss="infonce",
        level="group",
        tau=0.05,
        lam=0.2,
    )
    # 7,500 prompts / 128 per step = 58 steps per epoch, 10 epochs
    return common.paper_track(
        a,
        train_file="math75.parquet",
        tests=TRACK_II_TESTS,
        steps=580,
        prompts=128,
        max_new_tokens=4096,
        mini_batches=1,
        d_out=2048,
        warmup=58,
        eval_every=29,
        micro_batches=128,  # sized by plan_scale --fit=H100 for the mesh above
        logprob_chunks=64,
        rollout_chunk_prompts=16,
    )
