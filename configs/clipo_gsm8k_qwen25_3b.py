r"""CLIPO paper Track I: Qwen2.5-3B-Instruct, GSM8K train, GRPO + CLIPO (arXiv 2603.10101, training tracks).

  python -m experiments.train --config=configs/clipo_gsm8k_qwen25_3b.py:model=CKPT/Qwen2.5-3B-Instruct,data=DATA/clipo \
      --config.mesh.fsdp=8 --workdir=runs/track1_clipo

model= an HF checkpoint directory (config.json + safetensors, with tokenizer.json); data= the CLIPO
parquet directory (train/, test/). Args: baseline (GRPO without CLIPO), algo=..., seed=N, fixed_head,
loss=infonce|supcon_in|supcon_out|soft_nn, level=group|cross|batch, tau=0.05, lam=0.2.
Mesh: on 8 H100s --config.mesh.fsdp=8. rl.micro_batches, rl.logprob_chunks and rl.rollout_chunk_prompts
are sized for that mesh (80 GB per chip); for another mesh or chip re-fit them with
  python -m experiments.plan_scale --config=configs/clipo_gsm8k_qwen25_3b.py --shape=qwen25_3b \
      --devices=8 --mesh=data=1,fsdp=8,tensor=1 --fit=H100
"""

from clipo_jax.configlib import parse_arg
from configs import common

TRACK_I_TESTS = (
    "gsm8k",
    "gsm_symbolic",
    "gsm_p1",
    "gsm_p2",
    "theoremqa_x2",
    "mmlu2k",
    "truthfulqa_x2",
    "commonsense_qa",
)


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
    # 7,473 prompts / 512 per step = 14 steps per epoch, 6 epochs
    return common.paper_track(
        a,
        train_file="gsm8k.parquet",
        tests=TRACK_I_TESTS,
        steps=84,
        prompts=512,
        max_new_tokens=2048,
        mini_batches=2,
        d_out=512,
        warmup=14,
        eval_every=7,
        micro_batches=64,  # sized by plan_scale --fit=H100 for the mesh above
        logprob_chunks=32,
        rollout_chunk_prompts=64,
    )
