r"""The embedded default: SFT warm start + GRPO on the synthetic arithmetic task (2-core CPU).

  python -m experiments.train --config=configs/demo.py --workdir=runs/clipo_demo

Args (after the colon): size=tiny|small, clipo (add the CLIPO reward),
algo=grpo|dapo|dr_grpo|gspo|gmpo|rloo|reinforce_pp, seed=N, steps=N, shortcut=F (the shortcut
variant, docs/parts/synthetic.md: task.leak_share=F of problems leak their answer in an irrelevant
clause; 0 = off) with leak=anywhere|last (task.leak_position: where the clause goes) and copy=F
(task.copy_share: that share of the leaked SFT traces copy it, default 0.2) and copy_style=slip|bare
(task.copy_style: a copying trace is a chain with a slip, or the answer line alone), hard (harder
arithmetic: quantities 2-30, results up to 200), holdout (task.hold_out_distractor_math: training
also leaves out the distractor test set's math without its clause; off by default, as in the stored
results); e.g. --config=configs/demo.py:clipo,algo=dapo,seed=1.
Override anything else with --config.rl.lr=3e-5.
"""

import ml_collections

from clipo_jax.configlib import parse_arg
from configs import common


def get_config(arg=None):
    a = parse_arg(
        arg,
        size="small",
        clipo=False,
        algo="grpo",
        seed=0,
        steps=0,
        shortcut=0.0,
        leak="anywhere",
        copy=0.2,
        copy_style="slip",
        hard=False,
        holdout=False,
    )
    c = ml_collections.ConfigDict()
    c.task = ml_collections.ConfigDict(
        dict(
            name="synthetic",
            seed=0,
            train_size=20000,
            test_size=200,
            sft_size=6000,
            lucky_share=0.2,
            vocab_size=512,
            num_steps=(2, 3),
            number_range=(2, 12),
            mul_range=(2, 3),
            max_value=60,
            ops=("+", "-", "*"),
        )
    )
    c.model = ml_collections.ConfigDict(
        dict(
            source="init:custom",
            d_model=128,
            n_layers=4,
            n_heads=4,
            n_kv_heads=2,
            head_dim=32,
            d_ff=384,
            dtype="float32",
            max_seq_len=256,
        )
    )
    c.sft = common.sft_block(steps=1000, batch_size=32, lr=3e-3, max_len=128)
    c.rl = common.rl_block(steps=60, lr=1e-4, prompts_per_step=32)
    common.apply_algo(c.rl, a.algo)
    c.clipo = common.clipo_block(a.clipo, d_out=64)
    # grade_rollouts: the test sets' grader on every training rollout too (rollout/lucky,
    # rollout/copied; with CLIPO the contrastive reward of lucky vs process-right successes)
    c.eval = ml_collections.ConfigDict(dict(every=0, max_new_tokens=64, grade_rollouts=True))
    if a.size == "tiny":  # for tests: seconds, learns nothing useful
        c.model.update(d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16, d_ff=64)
        c.task.update(train_size=500, test_size=8, sft_size=200)
        c.sft.update(steps=5, batch_size=8)
        c.rl.update(steps=4, prompts_per_step=4, group_size=4, max_new_tokens=16, mini_batches=1)
        c.eval.update(max_new_tokens=16)
        c.ckpt = ml_collections.ConfigDict(dict(every=2, keep=2))
    elif a.size != "small":
        raise ValueError(f"unknown size {a.size!r}; valid: tiny, small")
    if a.steps:
        c.rl.steps = a.steps
    if a.shortcut:
        # imported here: the module pulls in the reward modules (math-verify, sympy), about 0.5 s
        from clipo_jax.data.synthetic import COPY_STYLES, LEAK_POSITIONS

        if not 0.0 < a.shortcut <= 1.0:
            raise ValueError(f"config arg shortcut={a.shortcut} must be in (0, 1] (the leak share)")
        if a.leak not in LEAK_POSITIONS:
            raise ValueError(f"config arg leak={a.leak!r}; valid: {', '.join(LEAK_POSITIONS)}")
        c.task.leak_share = a.shortcut
        c.task.copy_share = a.copy
        c.task.leak_position = a.leak
        if a.copy_style not in COPY_STYLES:
            raise ValueError(f"config arg copy_style={a.copy_style!r}; valid: {', '.join(COPY_STYLES)}")
        c.task.copy_style = a.copy_style
    elif a.leak != "anywhere" or a.copy != 0.2 or a.copy_style != "slip":
        raise ValueError("config args leak=, copy= and copy_style= apply to the shortcut variant only (add shortcut=F)")
    if a.hard:
        c.task.update(number_range=(2, 30), max_value=200)
    if a.holdout:  # set only when asked: an absent key keeps the SFT cache digests of existing runs
        c.task.hold_out_distractor_math = True
    return common.finish(c, a.seed)
