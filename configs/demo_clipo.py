r"""The embedded task with the CLIPO contrastive reward (GRPO + CLIPO).

  python -m experiments.train --config=configs/demo_clipo.py --workdir=runs/clipo_demo_clipo

Ablations: --config=configs/demo_clipo.py:algo=dapo,seed=1 and --config.clipo.loss_type=supcon_out,
--config.clipo.level=cross, --config.clipo.temperature=0.1, --config.clipo.lam=0.5,
--config.clipo.fixed_head=True, --config.clipo.warmup_steps=5.
"""

from clipo_jax.configlib import parse_arg
from configs import demo


def get_config(arg=None):
    a = parse_arg(arg, size="small", algo="grpo", seed=0, steps=0)
    return demo.get_config(f"size={a.size},algo={a.algo},seed={a.seed},steps={a.steps},clipo")
