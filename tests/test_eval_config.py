"""pass@k against an independent combinatorial reference; the config arg parser; config files."""

import itertools
import math

import pytest

from clipo_jax.configlib import parse_arg
from clipo_jax.evaluation import pass_at_k


@pytest.mark.parametrize("n,c,k", [(5, 0, 1), (5, 2, 1), (5, 2, 3), (6, 6, 2), (8, 3, 8), (10, 1, 4)])
def test_pass_at_k_matches_enumeration(n, c, k):
    # probability that a random k-subset of n samples (c correct) contains a correct one
    samples = [1] * c + [0] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    want = sum(any(samples[i] for i in s) for s in subsets) / len(subsets)
    assert math.isclose(pass_at_k(n, c, k), want, rel_tol=1e-12)


def test_pass_at_k_needs_enough_samples():
    with pytest.raises(ValueError, match="pass@4 needs at least 4 samples"):
        pass_at_k(2, 1, 4)


def test_parse_arg_types_and_flags():
    a = parse_arg("size=tiny,clipo,seed=3,lr=0.5", size="small", clipo=False, seed=0, lr=1.0)
    assert (a.size, a.clipo, a.seed, a.lr) == ("tiny", True, 3, 0.5)
    assert parse_arg(None, x=1).x == 1
    with pytest.raises(ValueError, match="unknown config arg 'sied'"):
        parse_arg("sied=1", seed=0)
    with pytest.raises(ValueError, match="seed='x' is not a int"):
        parse_arg("seed=x", seed=0)
    with pytest.raises(ValueError, match="needs a value"):
        parse_arg("seed", seed=0)


@pytest.mark.parametrize(
    "module,arg",
    [
        ("demo", "size=tiny"),
        ("demo", "algo=dapo,clipo"),
        ("demo", "algo=gspo"),
        ("demo", "algo=gmpo"),
        ("demo", "algo=dr_grpo"),
        ("demo_clipo", "algo=dapo"),
        ("grpo_smollm2_gsm8k", "cpu"),
        ("grpo_smollm2_gsm8k", "clipo,data=/d"),
        ("clipo_gsm8k_qwen25_3b", "model=/m,data=/d"),
        ("clipo_math_qwen25_7b", "model=/m,data=/d,algo=gmpo,baseline"),
    ],
)
def test_every_config_validates(module, arg):
    import importlib

    from clipo_jax import trainer

    cfg = importlib.import_module(f"configs.{module}").get_config(arg)
    trainer.validate_config(cfg)


def test_paper_track_hyperparameters():
    from configs import clipo_gsm8k_qwen25_3b as t1
    from configs import clipo_math_qwen25_7b as t2

    c1, c2 = t1.get_config("model=/m,data=/d"), t2.get_config("model=/m,data=/d")
    assert (c1.rl.prompts_per_step, c1.rl.group_size, c1.clipo.d_out, c1.clipo.warmup_steps) == (512, 16, 512, 14)
    assert (c2.rl.prompts_per_step, c2.rl.group_size, c2.clipo.d_out, c2.clipo.warmup_steps) == (128, 16, 2048, 58)
    for c in (c1, c2):
        assert c.rl.lr == 1e-6 and c.rl.kl_coef == 0.001 and c.rl.kl_estimator == "k3" and c.rl.dual_clip == 3.0
        assert c.clipo.temperature == 0.05 and c.clipo.lam == 0.2 and c.clipo.clip_min == -0.5


def test_unknown_registry_name_fails_validation():
    from clipo_jax import trainer
    from configs import demo

    c = demo.get_config("size=tiny")
    c.rl.advantage = "nope"
    with pytest.raises(trainer.TrainingError, match=r"config.rl.advantage='nope' is not one of \['dr_grpo'"):
        trainer.validate_config(c)
