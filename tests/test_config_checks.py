"""Config numbers and the workdir are checked before anything compiles, each failure one line
naming the key and the value; no setting is silently replaced by a default."""

import importlib
import math
import os
import subprocess
import sys

import pytest

from clipo_jax import trainer
from clipo_jax.models.config import ModelError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
ABSL_TRAILER = "Pass --helpshort or --helpfull to see help on flags."


def tiny(arg="size=tiny"):
    from configs import demo

    return demo.get_config(arg)


def set_key(config, key, value):
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
        node = node[p]
    with node.ignore_type():
        node[leaf] = value


def lookup(config, key):
    node = config
    for p in key.split("."):
        if p not in node:
            return None
        node = node[p]
    return node


# ----------------------------------------------------------------------------- every config file
@pytest.mark.parametrize(
    "module,arg",
    [
        ("demo", "size=tiny"),
        ("demo", "size=small"),
        ("demo", "algo=dapo,clipo"),
        ("demo", "algo=gspo"),
        ("demo", "algo=gmpo"),
        ("demo", "algo=dr_grpo"),
        ("demo", "algo=rloo"),
        ("demo", "algo=reinforce_pp"),
        ("demo_clipo", "algo=dapo"),
        ("grpo_smollm2_gsm8k", None),
        ("grpo_smollm2_gsm8k", "cpu"),
        ("grpo_smollm2_gsm8k", "clipo,data=/d"),
        ("clipo_gsm8k_qwen25_3b", "model=/m,data=/d"),
        ("clipo_math_qwen25_7b", "model=/m,data=/d,algo=gmpo,baseline"),
        ("openrs_if_smollm2", None),
        ("openrs_if_smollm2", "size=tiny,judge=in-process"),
    ],
)
def test_every_config_file_passes_the_number_rules(module, arg):
    trainer.validate_config(importlib.import_module(f"configs.{module}").get_config(arg))


def test_every_config_file_is_listed():
    listed = {"demo", "demo_clipo", "grpo_smollm2_gsm8k", "clipo_gsm8k_qwen25_3b", "clipo_math_qwen25_7b"}
    listed |= {"openrs_if_smollm2", "common", "__init__"}
    assert {f[:-3] for f in os.listdir(os.path.join(REPO, "configs")) if f.endswith(".py")} <= listed


# ----------------------------------------------------------------------------- the rule table
def violating_value(kind, rule):
    if kind != "int":
        return math.nan  # finite numbers only (rl.lr included)
    return next((v for v in (-2, -1, 0) if not rule(v)), None)


# rules that bound the value (clipo.masked_label takes any integer: only its type is checked)
BOUNDED_RULES = [row for row in trainer.NUMBER_RULES if violating_value(row[1], row[2]) is not None]


@pytest.mark.parametrize("row", BOUNDED_RULES, ids=[row[0] for row in BOUNDED_RULES])
def test_each_rule_rejects_a_value_out_of_range_with_one_line(row):
    key, kind, rule, text, _ = row
    config = tiny("size=tiny,clipo")
    config.model.source = "init:custom"
    for optional in ("eval.temperature", "eval.top_p", "eval.n"):
        if lookup(config, optional) is None:
            set_key(config, optional, {"eval.n": 1}.get(optional, 0.5))
    if key.startswith("reward.") and "reward" not in config:
        pytest.skip("the demo has no reward block")
    if key in ("task.train_limit", "task.test_limit"):
        set_key(config, key, 0)
    trainer.validate_config(config)  # valid before the change
    bad = violating_value(kind, rule)
    set_key(config, key, bad)
    with pytest.raises(trainer.TrainingError) as e:
        trainer.validate_config(config)
    msg = str(e.value)
    what = "an integer" if kind == "int" else "a finite number"
    assert msg == f"config.{key}={bad!r} must be {what}" + (f" {text}" if text else "")
    assert "\n" not in msg


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("rl.lr", math.nan, "config.rl.lr=nan must be a finite number > 0"),
        ("rl.lr", -1.0, "config.rl.lr=-1.0 must be a finite number > 0"),
        ("rl.lr", 0.0, "config.rl.lr=0.0 must be a finite number > 0"),
        ("rl.lr", -math.inf, "config.rl.lr=-inf must be a finite number > 0"),
        ("rl.steps", -1, "config.rl.steps=-1 must be an integer >= 0"),
        ("rl.top_p", 1.5, "config.rl.top_p=1.5 must be a finite number in (0, 1]"),
        ("rl.temperature", 0.0, "config.rl.temperature=0.0 must be a finite number > 0"),
        ("rl.eps_low", 1.0, "config.rl.eps_low=1.0 must be a finite number in [0, 1)"),
        ("rl.dual_clip", 0.5, "config.rl.dual_clip=0.5 must be a finite number 0 (off) or > 1"),
        ("rl.kl_coef", math.inf, "config.rl.kl_coef=inf must be a finite number >= 0"),
        ("rl.group_size", True, "config.rl.group_size=True must be an integer >= 1"),
        ("clipo.c0", math.nan, "config.clipo.c0=nan must be a finite number"),
        ("clipo.temperature", 0.0, "config.clipo.temperature=0.0 must be a finite number > 0"),
        ("task.lucky_share", 1.2, "config.task.lucky_share=1.2 must be a finite number in [0, 1]"),
        ("model.n_heads", 0, "config.model.n_heads=0 must be an integer >= 1"),
        ("model.n_kv_heads", 3, "config.model.n_heads=2 is not a multiple of config.model.n_kv_heads=3"),
        ("mesh.data", 0, "config.mesh.data=0 must be an integer -1 (the remaining devices) or >= 1"),
        ("rl.overlong_buffer", 16, "config.rl.overlong_buffer=16 must be < config.rl.max_new_tokens=16"),
        ("ckpt.keep", 0, "config.ckpt.keep=0 must be an integer >= 1"),
    ],
)
def test_named_cases(key, value, message):
    config = tiny()
    set_key(config, key, value)
    with pytest.raises(trainer.TrainingError) as e:
        trainer.validate_config(config)
    assert str(e.value) == message


# flags the trainer reads by truthiness ('false' as a string would switch them on)
BOOL_KEYS = [
    "rl.mask_truncated",
    "rl.kl_in_reward",
    "rl.dynamic_sampling",
    "rl.remat",
    "rl.rollout_row_keys",
    "rl.rollout_replicate_weights",
    "clipo.enabled",
    "clipo.skip_trivial",
    "clipo.fixed_head",
    "clipo.head_on_padding",
    "clipo.log_geometry",
]


@pytest.mark.parametrize("key", BOOL_KEYS)
@pytest.mark.parametrize("value", ["false", "no", 0, 1, None])
def test_bool_flags_must_be_bools(key, value):
    config = tiny("size=tiny,clipo")
    for ok in (True, False):
        set_key(config, key, ok)
        trainer.validate_config(config)
    set_key(config, key, value)
    with pytest.raises(trainer.TrainingError) as e:
        trainer.validate_config(config)
    assert str(e.value) == f"config.{key}={value!r} must be a bool"


def test_dynamic_sampling_needs_groups_of_two_or_more():
    config = tiny("size=tiny,algo=dapo")
    assert config.rl.dynamic_sampling is True
    trainer.validate_config(config)
    config.rl.group_size = 1
    with pytest.raises(trainer.TrainingError) as e:
        trainer.validate_config(config)
    msg = str(e.value)
    assert "\n" not in msg and "config.rl.dynamic_sampling=True" in msg and "config.rl.group_size" in msg, msg
    config.rl.dynamic_sampling = False  # without dynamic sampling one response per prompt is fine
    trainer.validate_config(config)


@pytest.mark.parametrize("clamp,want", [(0.0, None), (0, None), (5.0, 5.0)])
def test_kl_clamp_zero_means_no_clamp_in_the_step_config(clamp, want):
    config = tiny()
    set_key(config, "rl.kl_clamp", clamp)
    trainer.validate_config(config)
    assert trainer.step_config(config.rl).kl_clamp == want


def test_rl_lr_plus_inf_is_refused():
    config = tiny()
    config.rl.lr = math.inf
    with pytest.raises(trainer.TrainingError, match=r"config.rl.lr=inf must be a finite number > 0"):
        trainer.validate_config(config)


def test_reward_term_weights_and_missing_keys():
    config = tiny()
    config.reward.terms.verifiable = math.nan
    with pytest.raises(trainer.TrainingError, match=r"^config.reward.terms.verifiable=nan must be a finite number$"):
        trainer.validate_config(config)
    config = tiny()
    del config.rl["lr"]
    with pytest.raises(trainer.TrainingError, match=r"^config.rl.lr is missing \(it must be > 0\)$"):
        trainer.validate_config(config)


# ----------------------------------------------------------------------------- no silent defaults
def test_model_sizes_are_used_as_given_never_replaced():
    import jax

    config = tiny()
    config.model.update(n_heads=4, n_kv_heads=2)
    cfg, _ = trainer.build_model(config, 64, jax.random.key(0))
    assert (cfg.n_heads, cfg.n_kv_heads, cfg.d_model, cfg.head_dim) == (4, 2, 32, 16)
    config.model.n_heads = 0  # before: `if m[k]` dropped the 0 and the preset's 4 heads were used
    with pytest.raises(ModelError, match="n_heads"):
        trainer.build_model(config, 64, jax.random.key(0))


# ----------------------------------------------------------------------------- workdir
def test_workdir_checks(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(trainer.TrainingError, match=r"^--workdir=.*afile exists and is not a directory$"):
        trainer.check_workdir(str(afile))
    with pytest.raises(trainer.TrainingError, match=r"^--workdir=.*afile/run is not a writable directory \("):
        trainer.check_workdir(str(afile / "run"))  # cannot be created under a file
    # procfs takes no new files, not even from root (chmod does not stop root)
    with pytest.raises(trainer.TrainingError, match=r"^--workdir=/proc/self is not a writable directory \("):
        trainer.check_workdir("/proc/self")
    trainer.check_workdir(str(tmp_path / "new" / "run"))
    assert (tmp_path / "new" / "run").is_dir() and not os.listdir(tmp_path / "new" / "run")


# ----------------------------------------------------------------------------- the command line
def run_cli(workdir, *flags):
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "experiments.train", f"--workdir={workdir}", "--config=configs/demo.py:size=tiny"]
    r = subprocess.run([*cmd, *flags], cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip() and ln.strip() != ABSL_TRAILER]
    return r, (lines[-1] if lines else "")


@pytest.mark.parametrize(
    "flag,line",
    [
        ("--config.rl.lr=nan", "error: config.rl.lr=nan must be a finite number > 0"),
        ("--config.rl.steps=-1", "error: config.rl.steps=-1 must be an integer >= 0"),
        ("--config.model.n_heads=0", "error: config.model.n_heads=0 must be an integer >= 1"),
    ],
)
def test_cli_number_errors_are_one_line_before_the_workdir(tmp_path, flag, line):
    workdir = tmp_path / "w"
    r, last = run_cli(workdir, flag)
    assert r.returncode == 1, r.stderr[-1500:]
    assert "Traceback" not in r.stderr, r.stderr[-1500:]
    assert last == line
    assert not workdir.exists()


def test_cli_workdir_that_is_a_file(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("not a run")
    r, last = run_cli(afile)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-1500:]
    assert last == f"error: --workdir={afile} exists and is not a directory"
    assert afile.read_text() == "not a run"


def test_gspo_with_a_ppo_sized_clip_warns_and_the_preset_does_not(caplog):
    config = tiny("size=tiny")
    config.rl.policy_loss = "gspo"  # eps stay PPO's 0.2
    with caplog.at_level("WARNING", logger="clipo_jax.trainer"):
        trainer.validate_config(config)
    assert any("policy_loss='gspo' with eps_low=0.2, eps_high=0.2" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level("WARNING", logger="clipo_jax.trainer"):
        trainer.validate_config(tiny("size=tiny,algo=gspo"))
    assert not [r for r in caplog.records if "gspo" in r.getMessage()]


def test_kl_in_reward_without_a_coefficient_warns(caplog):
    config = tiny("size=tiny")
    config.rl.kl_in_reward = True
    with caplog.at_level("WARNING", logger="clipo_jax.trainer"):
        trainer.validate_config(config)
    assert any("kl_in_reward=True with rl.kl_coef=0" in r.getMessage() for r in caplog.records)
    caplog.clear()
    config.rl.kl_coef = 0.01
    with caplog.at_level("WARNING", logger="clipo_jax.trainer"):
        trainer.validate_config(config)
    assert not [r for r in caplog.records if "kl_in_reward" in r.getMessage()]
