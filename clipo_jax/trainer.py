"""The training loop: (SFT warm start) -> RL steps, each a short sequence of named stages:

    prompts -> rollout -> rewards -> contrastive -> advantages -> reference/old log-probs
    -> update -> metrics

The stages live where a reader looks for them: ``rollout.py`` (prompts, sampling, DAPO
refills), ``rewards/stage.py`` (weighted reward terms, judge calls in the background),
``contrastive.py`` (``clipo_stage``), ``rl/advantages.py``, ``rl/update.py`` (log-prob passes and
the PPO epochs); SFT is in ``sft.py``. Judge terms run while the policy computes its reference
and old log-probs and the CLIPO head step.

Everything stateful lives in the checkpoint (policy, optimizer, reference, CLIPO head, step, data
position, counters), and every PRNG key is derived from (config.seed, step), so re-running the
same command on the same workdir resumes and reproduces an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from clipo_jax import contrastive, evaluation, parallel, rollout, sampling, tasks
from clipo_jax.checkpoints import (  # noqa: F401  (re-exported)
    CheckpointError,
    RunCheckpoints,
    newest_good_step,
    params_digest,
    write_atomic,
)
from clipo_jax.models import PRESETS, ModelConfig, load_model, transformer
from clipo_jax.models.config import ATTENTION_IMPLS
from clipo_jax.rewards import stage as reward_stage
from clipo_jax.rl import advantages as adv_lib
from clipo_jax.rl import dapo, losses, update
from clipo_jax.rl.step import StepConfig, TrainState, make_optimizer, response_logprobs, train_step
from clipo_jax.sft import cached_sft, run_sft, sft_cache_dir  # noqa: F401  (re-exported)

logger = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    pass


# ============================================================================ config checks
# Every number the trainer reads: (dotted key, kind, rule, text, required). kind "int" is an
# integer (not a bool); "float" is any finite int or float. Optional keys (required=False) are
# checked when set.
def _ge(lo):
    return lambda v: v >= lo


_POS, _NONNEG = (lambda v: v > 0), _ge(0)  # noqa: E731
_ANY = lambda v: True  # noqa: E731
_UNIT = lambda v: 0 <= v <= 1  # noqa: E731
_OPEN_UNIT = lambda v: 0 < v <= 1  # noqa: E731
NUMBER_RULES = [
    ("seed", "int", _NONNEG, ">= 0", True),
    ("rl.steps", "int", _NONNEG, ">= 0", True),
    ("rl.prompts_per_step", "int", _ge(1), ">= 1", True),
    ("rl.group_size", "int", _ge(1), ">= 1", True),
    ("rl.max_new_tokens", "int", _ge(1), ">= 1", True),
    ("rl.max_prompt_len", "int", _ge(1), ">= 1", True),
    ("rl.temperature", "float", _POS, "> 0", True),
    ("rl.top_p", "float", _OPEN_UNIT, "in (0, 1]", True),
    ("rl.lr", "float", _POS, "> 0", True),
    ("rl.warmup_steps", "int", _NONNEG, ">= 0", True),
    ("rl.weight_decay", "float", _NONNEG, ">= 0", True),
    ("rl.grad_clip", "float", _NONNEG, ">= 0 (0 = no clipping)", True),
    ("rl.eps_low", "float", lambda v: 0 <= v < 1, "in [0, 1)", True),
    ("rl.eps_high", "float", _NONNEG, ">= 0", True),
    ("rl.dual_clip", "float", lambda v: v == 0 or v > 1, "0 (off) or > 1", True),
    ("rl.kl_coef", "float", _NONNEG, ">= 0", True),
    ("rl.kl_clamp", "float", _NONNEG, ">= 0 (0 = no clamp)", True),
    ("rl.entropy_coef", "float", _NONNEG, ">= 0", True),
    ("rl.epochs", "int", _ge(1), ">= 1", True),
    ("rl.mini_batches", "int", _ge(1), ">= 1", True),
    ("rl.micro_batches", "int", _ge(1), ">= 1", True),
    ("rl.tis_cap", "float", _NONNEG, ">= 0 (0 = off)", True),
    ("rl.dynamic_max_rounds", "int", _ge(1), ">= 1", True),
    ("rl.overlong_buffer", "int", _NONNEG, ">= 0", True),
    ("rl.max_consecutive_skips", "int", _ge(1), ">= 1", True),
    ("rl.logprob_chunks", "int", _ge(1), ">= 1", False),
    ("rl.rollout_chunk_prompts", "int", _NONNEG, ">= 0 (0 = one call)", False),
    ("rl.trim_padding", "int", _NONNEG, ">= 0 (0 = full width)", False),
    ("sft.steps", "int", _NONNEG, ">= 0", True),
    ("sft.batch_size", "int", _ge(1), ">= 1", True),
    ("sft.lr", "float", _POS, "> 0", True),
    ("sft.warmup_steps", "int", _NONNEG, ">= 0", True),
    ("sft.weight_decay", "float", _NONNEG, ">= 0", True),
    ("sft.max_len", "int", _ge(1), ">= 1", True),
    ("clipo.temperature", "float", _POS, "> 0", True),
    ("clipo.masked_label", "int", _ANY, "", True),
    ("clipo.d_out", "int", _ge(1), ">= 1", True),
    ("clipo.lr", "float", _POS, "> 0", True),
    ("clipo.weight_decay", "float", _NONNEG, ">= 0", True),
    ("clipo.lam", "float", _NONNEG, ">= 0", True),
    ("clipo.c0", "float", _ANY, "", True),
    ("clipo.clip_min", "float", _ANY, "", True),
    ("clipo.warmup_steps", "int", _NONNEG, ">= 0", True),
    ("clipo.export_every", "int", _NONNEG, ">= 0 (0 = off)", False),
    ("eval.every", "int", _NONNEG, ">= 0 (0 = only before and after)", True),
    ("eval.max_new_tokens", "int", _ge(1), ">= 1", True),
    ("eval.temperature", "float", _NONNEG, ">= 0 (0 = greedy)", False),
    ("eval.top_p", "float", _OPEN_UNIT, "in (0, 1]", False),
    ("eval.n", "int", _ge(1), ">= 1", False),
    ("ckpt.every", "int", _ge(1), ">= 1", True),
    ("ckpt.keep", "int", _ge(1), ">= 1", True),
    ("mesh.data", "int", lambda v: v == -1 or v >= 1, "-1 (the remaining devices) or >= 1", True),
    ("mesh.fsdp", "int", lambda v: v == -1 or v >= 1, "-1 (the remaining devices) or >= 1", True),
    ("mesh.tensor", "int", lambda v: v == -1 or v >= 1, "-1 (the remaining devices) or >= 1", True),
    ("model.d_model", "int", _ge(1), ">= 1", False),
    ("model.n_layers", "int", _ge(1), ">= 1", False),
    ("model.n_heads", "int", _ge(1), ">= 1", False),
    ("model.n_kv_heads", "int", _ge(1), ">= 1", False),
    ("model.head_dim", "int", _ge(1), ">= 1", False),
    ("model.d_ff", "int", _ge(1), ">= 1", False),
    ("model.max_seq_len", "int", _ge(1), ">= 1", False),
    ("reward.gate_reward", "float", _ANY, "", False),
    ("reward.correct_threshold", "float", _ANY, "", False),
    ("task.train_size", "int", _ge(1), ">= 1", False),
    ("task.test_size", "int", _ge(1), ">= 1", False),
    ("task.sft_size", "int", _NONNEG, ">= 0", False),
    ("task.lucky_share", "float", _UNIT, "in [0, 1]", False),
    ("task.leak_share", "float", _UNIT, "in [0, 1]", False),
    ("task.copy_share", "float", _UNIT, "in [0, 1]", False),
    ("task.vocab_size", "int", _ge(1), ">= 1", False),
    ("task.max_value", "int", _ge(1), ">= 1", False),
    ("task.train_limit", "int", _NONNEG, ">= 0 (0 = all)", False),
    ("task.test_limit", "int", _NONNEG, ">= 0 (0 = all)", False),
]
# Flags the trainer reads by truthiness; each must be a bool when set.
BOOL_FLAGS = (
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
)
_MISSING = object()
GSPO_WIDE_EPS = 0.01  # validate_config warns above it: a PPO-sized clip on GSPO's sequence ratio


def _lookup(config, key: str):
    node = config
    for part in key.split("."):
        if not hasattr(node, "keys") or part not in node:
            return _MISSING
        node = node[part]
    return node


def _number_error(key: str, value, kind: str, rule, text: str) -> str | None:
    import math

    if kind == "int":
        ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
        what = "an integer"
    else:
        ok = isinstance(value, (int, float, np.number)) and not isinstance(value, bool)
        ok = ok and math.isfinite(value)
        what = "a finite number"
    if not ok or not rule(value):
        return f"config.{key}={value!r} must be {what}" + (f" {text}" if text else "")
    return None


def _check_numbers(config) -> None:
    for key, kind, rule, text, required in NUMBER_RULES:
        value = _lookup(config, key)
        if value is _MISSING:
            if required:
                raise TrainingError(f"config.{key} is missing (it must be {text or 'set'})")
            continue
        if value is None and not required:
            continue
        err = _number_error(key, value, kind, rule, text)
        if err:
            raise TrainingError(err)
    m = config.model
    if m.get("n_heads") and m.get("n_kv_heads") and m.n_heads % m.n_kv_heads:
        raise TrainingError(
            f"config.model.n_heads={m.n_heads} is not a multiple of config.model.n_kv_heads={m.n_kv_heads}"
        )
    rl = config.rl
    if rl.overlong_buffer >= rl.max_new_tokens:
        raise TrainingError(
            f"config.rl.overlong_buffer={rl.overlong_buffer} must be < config.rl.max_new_tokens={rl.max_new_tokens}"
        )
    for name, weight in dict(reward_config(config).terms).items():
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not np.isfinite(weight):
            raise TrainingError(f"config.reward.terms.{name}={weight!r} must be a finite number")


def check_workdir(workdir: str) -> None:
    """The run directory exists (created here) and takes a file; else one line naming it."""
    import tempfile

    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise TrainingError(f"--workdir={workdir} exists and is not a directory")
    try:
        os.makedirs(workdir, exist_ok=True)
        with tempfile.TemporaryFile(dir=workdir):
            pass
    except OSError as e:
        raise TrainingError(f"--workdir={workdir} is not a writable directory ({e.strerror or e})") from None


def validate_config(config) -> None:
    """Fail before any compilation on unknown registry names, impossible shapes and numbers out
    of range (NUMBER_RULES)."""
    _check_numbers(config)
    rl = config.rl
    checks = [
        ("rl.advantage", rl.advantage, adv_lib.ADVANTAGE_ESTIMATORS),
        ("rl.policy_loss", rl.policy_loss, losses.POLICY_LOSSES),
        ("rl.aggregation", rl.aggregation, losses.AGGREGATIONS),
        ("rl.kl_estimator", rl.kl_estimator, losses.KL_ESTIMATORS),
        ("task.name", config.task.name, tasks.TASKS),
        ("model.attention_impl", config.model.get("attention_impl", "einsum"), ATTENTION_IMPLS),
    ]
    for field, value, registry in checks:
        if value not in registry:
            raise TrainingError(f"config.{field}={value!r} is not one of {sorted(registry)}")
    if config.model.get("attention_impl") == "cudnn" and jax.default_backend() != "gpu":
        raise TrainingError(
            f"config.model.attention_impl='cudnn' needs a GPU backend (this one is {jax.default_backend()!r})"
        )
    for key in BOOL_FLAGS:  # read by truthiness: the string 'false' would switch them on
        value = _lookup(config, key)
        if value is not _MISSING and not isinstance(value, (bool, np.bool_)):
            raise TrainingError(f"config.{key}={value!r} must be a bool")
    if rl.policy_loss == "gspo" and max(rl.eps_low, rl.eps_high) > GSPO_WIDE_EPS:
        # a length-normalised sequence ratio rarely leaves [0.8, 1.2]: PPO's 0.2 is no clip at all
        logger.warning(
            "config.rl.policy_loss='gspo' with eps_low=%g, eps_high=%g: GSPO clips a sequence ratio, "
            "the paper uses 3e-4 / 4e-4 (configs: algo=gspo sets them)",
            rl.eps_low,
            rl.eps_high,
        )
    if rl.get("kl_in_reward", False) is True and not rl.kl_coef:
        logger.warning("config.rl.kl_in_reward=True with rl.kl_coef=0: no KL penalty (set rl.kl_coef > 0)")
    if rl.get("dynamic_sampling", False) and rl.group_size < 2:
        raise TrainingError(
            f"config.rl.dynamic_sampling=True needs config.rl.group_size >= 2 (got {rl.group_size}): "
            "a group of one response has no reward spread, so every group would be filtered out"
        )
    if rl.group_size < 1 or rl.prompts_per_step < 1:
        raise TrainingError("config.rl.group_size and config.rl.prompts_per_step must be >= 1")
    rows = rl.prompts_per_step * rl.group_size
    if rl.mini_batches < 1 or rl.prompts_per_step % rl.mini_batches:
        raise TrainingError(
            f"config.rl.prompts_per_step={rl.prompts_per_step} must split into rl.mini_batches={rl.mini_batches}"
        )
    if (rows // rl.mini_batches) % rl.micro_batches:
        raise TrainingError(
            f"mini-batch of {rows // rl.mini_batches} rows does not split into rl.micro_batches={rl.micro_batches}"
        )
    chunks = rl.get("logprob_chunks", 1)
    if rows % chunks:
        raise TrainingError(f"config.rl.logprob_chunks={chunks} does not divide the step's {rows} rows")
    if config.clipo.enabled:
        contrastive.ContrastiveConfig(**_clipo_static(config)).validate()
        pooling = config.clipo.get("pooling", "decode")
        if pooling not in sampling.POOLINGS:
            raise TrainingError(f"config.clipo.pooling={pooling!r} is not one of {list(sampling.POOLINGS)}")
        head_path = config.clipo.get("head_init_path", "")
        if head_path and not os.path.isfile(head_path):
            raise TrainingError(f"config.clipo.head_init_path={head_path!r} is not a file")
    terms = dict(reward_config(config).terms)
    unknown = sorted(set(terms) - set(reward_stage.REWARD_TERMS))
    if not terms or unknown:
        raise TrainingError(
            f"config.reward.terms={terms}: {'unknown term(s) ' + str(unknown) if unknown else 'empty'}; "
            f"valid: {sorted(reward_stage.REWARD_TERMS)}"
        )


def reward_config(config):
    """The config's reward block; configs without one score with the task's verifier alone."""
    import ml_collections

    if "reward" in config:
        return config.reward
    return ml_collections.ConfigDict({"terms": {"verifiable": 1.0}})


def _clipo_static(config) -> dict:
    c = config.clipo
    return dict(
        loss_type=c.loss_type,
        level=c.level,
        temperature=c.temperature,
        masked_label=c.masked_label,
        skip_trivial=c.skip_trivial,
        similarity=c.similarity,
        group_size=config.rl.group_size,
        head=c.head,
        d_out=c.d_out,
        fixed_head=c.fixed_head,
        lr=c.lr,
        weight_decay=c.weight_decay,
    )


def _policy_opts(rl) -> tuple:
    if rl.policy_loss == "ppo_clip":
        opts = dict(eps_low=rl.eps_low, eps_high=rl.eps_high, dual_clip=rl.dual_clip or None)
    elif rl.policy_loss in ("gspo", "gmpo", "cispo"):
        opts = dict(eps_low=rl.eps_low, eps_high=rl.eps_high)
    else:
        opts = {}
    return tuple(sorted(opts.items()))


# ============================================================================ metrics sink
class MetricsWriter:
    """metrics.jsonl (one object per step) + TensorBoard. On resume, lines past the restored
    step are dropped so the file reads like an uninterrupted run."""

    def __init__(self, workdir: str, resume_step: int | None, enabled: bool = True):
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.enabled = enabled
        self.tb = None
        if not enabled:  # another process writes them
            return
        if os.path.exists(self.path):
            keep, unreadable = [], 0
            with open(self.path) as f:
                for line in f:
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:
                        unreadable += 1  # e.g. a line cut by a kill
                        continue
                    if resume_step is not None and rec.get("step", 0) <= resume_step:
                        keep.append(line if line.endswith("\n") else line + "\n")
            if unreadable:
                logger.warning("%s: dropped %d unreadable line(s)", self.path, unreadable)
            write_atomic(self.path, "".join(keep))  # a failed rewrite leaves the old file whole
        try:
            from tensorboardX import SummaryWriter

            # events of steps after the restored one are discarded: TensorBoard shows each step once
            purge = None if resume_step is None else resume_step + 1
            self.tb = SummaryWriter(os.path.join(workdir, "tb"), purge_step=purge)
        except ImportError:
            logger.warning("tensorboardX not installed: TensorBoard logging off")

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        rec = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(k, float(v), step)

    def close(self):
        if self.tb is not None:
            self.tb.close()


# ============================================================================ model setup
def init_model_config(config, vocab_size: int) -> ModelConfig:
    """The ModelConfig of a config.model.source='init:<preset>' model (random weights)."""
    m = config.model
    preset = m.source[len("init:") :]
    if preset not in PRESETS and preset != "custom":
        raise TrainingError(f"config.model.source={m.source!r}: unknown preset; valid: {sorted(PRESETS)} or custom")
    base = PRESETS.get(preset, ModelConfig())
    overrides = {
        k: m[k] for k in ("d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff") if m.get(k) is not None
    }
    return base.replace(
        vocab_size=vocab_size,
        dtype=m.dtype,
        max_seq_len=m.get("max_seq_len", 512),
        attention_impl=m.get("attention_impl", "einsum"),
        **overrides,
    )


def step_config(rl) -> StepConfig:
    """The train step's static options from config.rl."""
    return StepConfig(
        policy_loss=rl.policy_loss,
        policy_loss_opts=_policy_opts(rl),
        aggregation=rl.aggregation,
        kl_coef=0.0 if rl.get("kl_in_reward", False) else rl.kl_coef,  # in the reward: no loss term
        kl_estimator=rl.kl_estimator,
        kl_clamp=rl.kl_clamp or None,  # 0 = no clamp
        entropy_coef=rl.entropy_coef,
        temperature=max(rl.temperature, 1e-6),
        micro_batches=rl.micro_batches,
        use_old_logp=(rl.epochs > 1 or rl.mini_batches > 1),
        tis_cap=rl.tis_cap or None,
        remat=rl.remat,
        max_len=rl.max_new_tokens,
    )


def build_model(config, vocab_size: int, rng) -> tuple[ModelConfig, Any]:
    m = config.model
    if m.source.startswith("init:"):
        cfg = init_model_config(config, vocab_size)
        return cfg, transformer.init_params(cfg, rng)
    cfg, params, _ = load_model(m.source, with_tokenizer=False)
    return cfg.replace(dtype=m.dtype, attention_impl=m.get("attention_impl", "einsum")), params


# ============================================================================ rollout helpers
def evaluate(
    task: tasks.Task, sampler: sampling.Sampler, params, scfg: sampling.SamplingConfig, rng, batch_size: int = 64
) -> dict[str, dict[str, float]]:
    """The shared evaluation (clipo_jax.evaluation) as the trainer uses it."""
    return evaluation.evaluate(task, sampler, params, scfg, rng, batch_size=batch_size)


def format_eval(before: dict | None, after: dict, keys, before_only: bool = False) -> str:
    n = max([14] + [len(name) + 2 for name in after])  # columns widen for long names and keys
    w = {k: max(10, len(k) + 2) for k in keys}
    if before_only:
        lines = [f"{'test set':<{n}}" + "".join(f"{k:>{w[k]}}" for k in keys)]
        lines += [
            f"{name:<{n}}" + "".join(f"{d.get(k, float('nan')):>{w[k]}.3f}" for k in keys) for name, d in after.items()
        ]
        return "\n".join(lines)
    wb = {k: max(16, len(k) + 9) for k in keys}
    wa = {k: max(15, len(k) + 8) for k in keys}
    lines = [f"{'test set':<{n}}" + "".join(f"{k + ' before':>{wb[k]}}{k + ' after':>{wa[k]}}" for k in keys)]
    for name in after:
        row = f"{name:<{n}}"
        for k in keys:
            b = before[name].get(k, float("nan")) if before else float("nan")
            row += f"{b:>{wb[k]}.3f}{after[name].get(k, float('nan')):>{wa[k]}.3f}"
        lines.append(row)
    return "\n".join(lines)


# ============================================================================ the run
@dataclasses.dataclass
class RunContext:
    """Everything a step's stages need that does not change during the run."""

    config: Any
    task: tasks.Task
    cfg: ModelConfig
    mesh: Any
    sampler: sampling.Sampler
    rollout_spec: rollout.RolloutSpec
    eval_cfg: sampling.SamplingConfig
    step_cfg: StepConfig
    clipo_cfg: contrastive.ContrastiveConfig | None
    rewards: reward_stage.RewardStage
    jit_step: Any = None
    jit_logp: Any = None

    def shard_batch(self, tree):
        """Host arrays -> device arrays split over the mesh's batch axes (data parallelism); with
        several processes each one places only its own rows."""
        mesh = self.mesh
        return parallel.put_global(
            tree, jax.tree.map(lambda x: parallel.batch_sharding(mesh, x.ndim, x.shape[0]), tree)
        )

    def replicate(self, tree):
        return parallel.put_global(tree, jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec()))


def setup(config, workdir: str, root) -> tuple[RunContext, Any]:
    """Task, model (initial params), sampler, step configs and the reward stage; fails with a
    one-line error on bad rows or an unreachable judge before anything is compiled."""
    mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    primary = parallel.is_primary()
    if not primary:  # process 0 builds the task first: it may train a tokenizer into workdir
        parallel.barrier("task")
    try:
        task = tasks.build_task(config.task, workdir)
    except (OSError, KeyError) as e:  # an unknown data source, a missing file: one line, no traceback
        from clipo_jax.data.datasets import UnknownSourceError

        if isinstance(e, KeyError) and not isinstance(e, UnknownSourceError):
            raise  # a bug, not bad input
        raise TrainingError(f"task: {e}") from None
    if primary:
        parallel.barrier("task")
    rewards = reward_stage.RewardStage.from_config(
        reward_config(config), reward_stage.RewardContext(task=task, mesh=mesh, workdir=workdir, seed=config.seed)
    )
    try:
        rewards.check_rows(task.train_rows)
        rewards.preflight()
        return _setup_model(config, task, mesh, rewards, root)
    except BaseException:
        rewards.close()  # judge clients and in-process judge weights
        raise


def _setup_model(config, task, mesh, rewards, root) -> tuple["RunContext", Any]:
    rl = config.rl
    tok = task.tokenizer
    cfg, params = build_model(config, tok.vocab_size, jax.random.fold_in(root, 1))
    from clipo_jax.models.loading import fit_output_vocab

    cfg = fit_output_vocab(cfg, tok, config.model.source)
    params = parallel.shard_tree(params, mesh, transformer.param_logical_axes(cfg))
    stop_ids = tuple(tok.stop_ids)
    # rollouts in chunks of prompts (the paper's 512 x 16 do not fit one call) need per-row keys so
    # the samples are those of one call; rollout_row_keys alone gives batch-size-invariant samples
    chunk_prompts = int(rl.get("rollout_chunk_prompts", 0) or 0)
    row_keys = chunk_prompts > 0 or bool(rl.get("rollout_row_keys", False))
    rollout_cfg = sampling.SamplingConfig(
        max_new_tokens=rl.max_new_tokens,
        temperature=rl.temperature,
        top_p=rl.top_p,
        n_samples=rl.group_size,
        stop_ids=stop_ids,
        pad_id=tok.pad_id,
        pooling=config.clipo.get("pooling", "decode"),
        row_keys=row_keys,
    )
    eval_cfg = sampling.SamplingConfig(
        max_new_tokens=config.eval.max_new_tokens,
        temperature=config.eval.get("temperature", 0.0),
        top_p=config.eval.get("top_p", 1.0),
        n_samples=config.eval.get("n", 1),
        stop_ids=stop_ids,
        pad_id=tok.pad_id,
    )
    sampler = sampling.Sampler(cfg, mesh, replicate_weights=bool(rl.get("rollout_replicate_weights", False)))
    prompt_width = sampler.length_bucket(rl.max_prompt_len)
    new_tokens = max(rl.max_new_tokens, config.eval.max_new_tokens)
    if prompt_width + new_tokens > cfg.max_seq_len:  # nothing else reads the bound: a run would train past it
        raise TrainingError(
            f"model.max_seq_len={cfg.max_seq_len} is shorter than the longest sequence, {prompt_width + new_tokens} "
            f"tokens (rl.max_prompt_len={rl.max_prompt_len} padded to {prompt_width} + "
            f"max(rl.max_new_tokens, eval.max_new_tokens)={new_tokens})"
        )
    # test prompts that cannot fit the model's context with the eval budget would be evaluated
    # past it, and one of them makes the whole batch's cache that long
    eval_prompt_len = cfg.max_seq_len - config.eval.max_new_tokens
    task, left_out = evaluation.fit_test_sets(task, eval_prompt_len)
    for name, n in left_out.items():
        where = (
            f"test set {name}: {n} prompt(s) longer than model.max_seq_len - eval.max_new_tokens = {eval_prompt_len}"
        )
        if not task.test_sets[name]:
            raise TrainingError(f"{where} tokens, that is all of them")
        logger.warning("%s tokens are left out of evaluation (%d kept)", where, len(task.test_sets[name]))
    spec = rollout.RolloutSpec(
        sampler=sampler,
        tokenizer=tok,
        config=rollout_cfg,
        prompts_per_step=rl.prompts_per_step,
        group_size=rl.group_size,
        prompt_width=prompt_width,
        greedy_anchor=any(getattr(t, "needs_greedy_anchor", False) for t in rewards.terms.values()),
        dynamic_sampling=rl.dynamic_sampling,
        dynamic_max_rounds=rl.dynamic_max_rounds,
        chunk_prompts=chunk_prompts,
    )
    step_cfg = step_config(rl)
    clipo_cfg = contrastive.ContrastiveConfig(**_clipo_static(config)) if config.clipo.enabled else None
    ctx = RunContext(config, task, cfg, mesh, sampler, spec, eval_cfg, step_cfg, clipo_cfg, rewards)
    return ctx, params


def opt_state_shardings(optimizer, opt_shapes, param_shardings, replicated):
    """Optimizer-state shardings: moments like their params, everything else (counts) replicated."""
    return optax.tree_map_params(
        optimizer, lambda _, sh: sh, opt_shapes, param_shardings, transform_non_params=lambda _: replicated
    )


def new_train_state(params, optimizer, mesh) -> TrainState:
    """Every leaf on the mesh: moments sharded like their params, counts replicated (a plain
    jit(optimizer.init) leaves outputs that do not depend on params on one device)."""
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    p_sh = jax.tree.map(lambda x: x.sharding, params)
    opt_sh = opt_state_shardings(optimizer, jax.eval_shape(optimizer.init, params), p_sh, replicated)
    opt_state = jax.jit(optimizer.init, out_shardings=opt_sh)(params)
    return TrainState(params, opt_state, jax.jit(lambda: jnp.zeros((), jnp.int32), out_shardings=replicated)())


def reward_batch(ro: rollout.Rollouts, group_size: int, step: int) -> reward_stage.RewardBatch:
    return reward_stage.RewardBatch(
        rows=ro.rows,
        responses=ro.texts,
        lengths=np.asarray(ro.out.lengths),
        truncated=np.asarray(ro.out.truncated),
        group_size=group_size,
        anchors=ro.anchors,
        step=step,
    )


@functools.cache
def _grading_pool() -> ThreadPoolExecutor:
    """One worker thread for rollout grading, made on first use (the grader is a pure function)."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="grade_rollouts")


def rollout_grade_metrics(task: tasks.Task, ro: rollout.Rollouts, group_size: int, c_reward=None) -> dict[str, float]:
    """The task's evaluation grader applied to this step's training rollouts (config.eval.
    grade_rollouts): ``rollout/<key>`` = the share of valid rollouts with each grade key (e.g. the
    lucky rate the policy is being trained on; ``copied`` counts lucky copies only). With CLIPO
    rewards on a task that grades the process, also the mean contrastive reward of the
    process-right successes and of the lucky ones (``clipo/reward/{process_right,lucky,copied}/mean`` and ``clipo/count/...``; 0 with count 0
    when a step has none): whether the contrastive reward singles out right answers reached the
    wrong way, CLIPO's claim, measured where it acts."""
    t = time.perf_counter()
    grades = [task.grader(ro.rows[i // group_size], text) for i, text in enumerate(ro.texts)]
    valid = np.asarray(ro.valid, bool)
    flags = {k: np.array([bool(g.get(k, False)) for g in grades]) & valid for k in task.grade_keys}
    if "copied" in flags and "lucky" in flags:
        # on a training prompt the clause states the answer, so a right answer always "copies" it:
        # count the copies that skipped the work
        flags["copied"] &= flags["lucky"]
    m = {f"rollout/{k}": float(v.sum() / max(valid.sum(), 1)) for k, v in flags.items()}
    if c_reward is not None and "process" in flags and "lucky" in flags:
        c_reward = np.asarray(c_reward, np.float64)
        groups = {"process_right": flags["process"], "lucky": flags["lucky"]}
        if "copied" in flags:
            groups["copied"] = flags["copied"]
        for name, mask in groups.items():
            m[f"clipo/count/{name}"] = float(mask.sum())
            m[f"clipo/reward/{name}/mean"] = float(c_reward[mask].mean()) if mask.any() else 0.0
    m["time/grade_rollouts"] = time.perf_counter() - t
    return m


def start_rewards(ctx: RunContext, ro: rollout.Rollouts, step: int):
    """-> (outcome [B] now, a callable that waits for the full RewardResult)."""
    if ro.rewards is not None:  # scored round by round during dynamic sampling
        r = ro.rewards
        result = reward_stage.RewardResult(r["rewards"], r["outcome"], r["per_term"], r["metrics"])
        return result.outcome, lambda: result
    pending = ctx.rewards.start(reward_batch(ro, ctx.config.rl.group_size, step))
    if pending.outcome is not None:
        return pending.outcome, pending.result
    result = pending.result()
    return result.outcome, lambda: result


def rl_step(ctx: RunContext, step: int, state, ref_params, head, stream: rollout.PromptStream, root, counters: dict):
    """One RL step through its stages. Returns (state, head, metrics, skipped, empty)."""
    rl, G = ctx.config.rl, ctx.config.rl.group_size
    t0 = time.perf_counter()
    step_key = jax.random.fold_in(root, 1000 + step)
    timings = {}

    # rollout (with DAPO dynamic sampling the rewards are scored round by round)
    score = lambda rows, texts, lengths, truncated, anchors: ctx.rewards.compute(
        reward_stage.RewardBatch(rows, texts, lengths, truncated, G, anchors, step)
    )
    ro = rollout.rollout(ctx.rollout_spec, state.params, stream, step_key, score=score)
    for k, v in ro.metrics.items():
        counters[k] = counters.get(k, 0) + v
    out = ro.out
    timings["rollout"] = time.perf_counter() - t0

    # rewards: the label term (the verifier) now, judge terms in the background
    t = time.perf_counter()
    outcome, wait_rewards = start_rewards(ctx, ro, step)
    timings["reward_start"] = time.perf_counter() - t
    labels = (outcome > ctx.rewards.correct_threshold).astype(np.int32)

    # contrastive (CLIPO): the head step needs only the labels, so it overlaps the judge
    m: dict[str, float] = {}
    c_reward = None
    t_clipo = time.perf_counter()
    if ctx.clipo_cfg is not None:
        head, c_reward, c_metrics = contrastive.clipo_stage(
            head,
            out,
            labels,
            G,
            jax.random.fold_in(step_key, 77),
            ctx.clipo_cfg,
            ctx.config.clipo,
            ctx.replicate,
            valid=ro.valid,
        )
        m.update(c_metrics)
    timings["contrastive"] = time.perf_counter() - t_clipo

    # grading the rollouts for the logs (a host thread, overlapped with the log-prob and update work)
    grading = None
    if ctx.config.eval.get("grade_rollouts", False) and ctx.task.grader is not None:
        grading = _grading_pool().submit(rollout_grade_metrics, ctx.task, ro, G, c_reward)

    # reference / old log-probs: also independent of the rewards
    t_ref = time.perf_counter()
    rl_batch = update.build_rl_batch(out, np.zeros(len(ro.texts), np.float32), ro.valid, rl.mask_truncated)
    rl_batch = update.trim_padding(rl_batch, rl.get("trim_padding", 16))
    passes = {}
    if rl.kl_coef:
        passes["ref"] = ref_params
    kl_in_reward = bool(rl.kl_coef) and rl.get("kl_in_reward", False)
    if ctx.step_cfg.use_old_logp or kl_in_reward:  # KL in the reward: log pi of the sampling policy
        passes["old"] = state.params
    logps = update.sequence_logprobs(
        functools.partial(ctx.jit_logp, n_response=rl_batch.response_mask.shape[1]),
        passes,
        rl_batch.tokens,
        rl_batch.valid,
        ctx.shard_batch,
        parallel.to_host,
        chunks=rl.get("logprob_chunks", 1),
    )
    timings["reference"] = time.perf_counter() - t_ref

    # wait for the judge terms; final reward = terms + DAPO overlong shaping + CLIPO
    t_wait = time.perf_counter()
    rr = wait_rewards()
    timings["reward_wait"] = time.perf_counter() - t_wait
    rewards = rr.rewards
    if rl.overlong_buffer:
        rewards = rewards + np.asarray(
            dapo.overlong_penalty(out.lengths, rl.max_new_tokens, rl.overlong_buffer), np.float32
        )
    if c_reward is not None:
        rewards = rewards + c_reward
    if kl_in_reward:  # r_i - beta * sum_t KL_t(pi_old || pi_ref), before the advantage
        shaped, kl_m = losses.kl_reward_penalty(
            rewards,
            logps["old"],
            logps["ref"],
            update.sampled_tokens(out, ro.valid, rl_batch.response_mask.shape[1]),
            beta=rl.kl_coef,
            name=rl.kl_estimator,
            clamp=rl.kl_clamp or None,
        )
        rewards = np.asarray(shaped, np.float32)
        m.update({f"kl_reward/{k}": float(v) for k, v in kl_m.items()})
    # what the rewards cost the step: the label term plus the judge time not hidden behind the
    # contrastive and log-prob work (the judge's own wall time is reward/<term>/wall_s)
    timings["reward"] = timings["reward_start"] + timings["reward_wait"]

    # advantages
    adv = np.asarray(adv_lib.compute_advantages(rl.advantage, jnp.asarray(rewards), G, valid=jnp.asarray(ro.valid)))
    rl_batch = rl_batch._replace(
        advantages=adv.astype(np.float32),
        old_logp=logps.get("old", rl_batch.old_logp),
        ref_logp=logps.get("ref", rl_batch.ref_logp),
    )

    # update: PPO epochs x mini-batches (whole groups together); frozen during CLIPO warmup
    t_update = time.perf_counter()
    frozen = ctx.clipo_cfg is not None and step < ctx.config.clipo.warmup_steps
    empty = not rl_batch.response_mask.any()  # e.g. every group filtered out by dynamic sampling
    step_metrics = []
    if not frozen and not empty:
        state, step_metrics = update.policy_update(
            state,
            rl_batch,
            step_fn=ctx.jit_step,
            place=ctx.shard_batch,
            to_host=parallel.scalars_to_host,
            epochs=rl.epochs,
            mini_batches=rl.mini_batches,
            group_size=G,
            seed=ctx.config.seed,
            step=step,
        )
    timings["update"] = time.perf_counter() - t_update
    if grading is not None:
        t = time.perf_counter()
        m.update(grading.result())
        timings["grade_rollouts_wait"] = time.perf_counter() - t  # what the overlap did not hide
    t_end = time.perf_counter()

    # metrics
    m.update(update.update_metrics(step_metrics))
    # over the sampled rows only: DAPO's padding copies (ro.valid False) are not new samples
    sampled = ro.valid
    n_tok = int(out.lengths[sampled].sum())
    if sampled.any():
        m.update(
            {
                "reward/mean": float(rewards[sampled].mean()),
                "reward/outcome_mean": float(rr.outcome[sampled].mean()),
                "reward/std": float(rewards[sampled].std()),
                "response/length_mean": float(out.lengths[sampled].mean()),
                "response/truncated_frac": float(out.truncated[sampled].mean()),
            }
        )
    m.update(
        {
            "update/seq_len": float(rl_batch.tokens.shape[1]),  # after trim_padding
            "rollout/rounds": ro.rounds,
            **{f"time/{k}": v for k, v in timings.items()},
            "time/step": t_end - t0,
            "throughput/tokens_per_s": n_tok / max(t_end - t0, 1e-9),
            "actor/frozen": float(frozen),
        }
    )
    m.update(rr.metrics)
    skipped = update.skipped_steps(step_metrics) if step_metrics else 0
    return state, head, m, (skipped, len(step_metrics)), empty


def config_changes(path: str, new_json: str) -> list[str]:
    """The dotted keys whose values differ between the config.json at ``path`` (if any) and
    ``new_json``: ``rl.steps: 60 -> 120``."""
    try:
        with open(path) as f:
            old = json.load(f)
    except (OSError, ValueError):
        return []

    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            if isinstance(v, dict):
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = v
        return out

    a, b = flat(old), flat(json.loads(new_json))
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def run(config, workdir: str) -> dict:
    """Run SFT (optional) then RL; returns {'before': eval, 'after': eval, 'last_metrics': ...}."""
    from tqdm import tqdm

    validate_config(config)
    check_workdir(workdir)
    if parallel.is_primary():  # with several processes, process 0 writes the run's files
        changed = config_changes(os.path.join(workdir, "config.json"), config.to_json_best_effort(indent=2))
        if changed:  # said now; config.json is rewritten once the checkpoint has restored (record_config)
            logger.warning("%s: the run continues with changed settings: %s", workdir, ", ".join(changed[:20]))
            print(f"config changed since the last start of this run: {', '.join(changed[:20])}")
    root = jax.random.key(config.seed)
    ctx, params = setup(config, workdir, root)
    try:
        return _run(ctx, params, workdir, root, tqdm)
    except CheckpointError as e:  # e.g. a save that failed on a full disk: one line, the run resumes before it
        raise TrainingError(str(e)) from None
    finally:
        ctx.rewards.close()


def record_config(config, workdir: str) -> None:
    """WORKDIR/config.json, once the run has restored its checkpoint (or starts fresh): a resume
    refused because the checkpoint does not fit its config leaves the run's record as it was
    (experiments/evaluate.py --run builds the model from it). Changed settings keep the previous
    config beside it (config.prev.json)."""
    if not parallel.is_primary():
        return
    path = os.path.join(workdir, "config.json")
    text = config.to_json_best_effort(indent=2)
    if config_changes(path, text):
        os.replace(path, os.path.join(workdir, "config.prev.json"))
    write_atomic(path, text)


def _run(ctx: RunContext, params, workdir: str, root, tqdm) -> dict:
    config, rl, seed = ctx.config, ctx.config.rl, ctx.config.seed
    primary = parallel.is_primary()
    optimizer = make_optimizer(
        rl.lr,
        total_steps=rl.steps,
        warmup_steps=rl.warmup_steps,
        schedule=rl.schedule,
        weight_decay=rl.weight_decay,
        grad_clip=rl.grad_clip,
    )

    def head_init():
        if ctx.clipo_cfg is None:  # orbax refuses empty trees: keep the slot with a placeholder
            return ctx.replicate({"unused": jnp.zeros((), jnp.int32)})
        return ctx.replicate(contrastive.init_head_state(jax.random.fold_in(root, 2), ctx.cfg.d_model, ctx.clipo_cfg))

    def head_start():
        """The head of a fresh run: config.clipo.head_init_path's parameters, or a random init."""
        path = config.clipo.get("head_init_path", "") if ctx.clipo_cfg is not None else ""
        if not path:
            return head_init()
        try:
            params = contrastive.load_head(path, ctx.cfg.d_model, ctx.clipo_cfg)
        except contrastive.ContrastiveError as e:
            raise TrainingError(f"config.clipo.head_init_path: {e}") from None
        print(f"CLIPO head loaded from {path}")
        return ctx.replicate(contrastive.head_state_from_params(params, ctx.clipo_cfg))

    def export_head(step: int):
        """config.clipo.export_every > 0: the head's parameters every that many steps and at the end,
        as WORKDIR/clipo_head/step_<n>.safetensors (readable by clipo.head_init_path)."""
        every = config.clipo.get("export_every", 0) if ctx.clipo_cfg is not None else 0
        if not (every and primary and (step % every == 0 or step == rl.steps)):
            return
        os.makedirs(os.path.join(workdir, "clipo_head"), exist_ok=True)
        contrastive.save_head(
            os.path.join(workdir, "clipo_head", f"step_{step}.safetensors"), parallel.to_host(head.params)
        )

    # ---------------------------------------------------------------- resume or SFT warm start
    ckpt = RunCheckpoints(workdir, config.ckpt.keep)
    latest = ckpt.latest_step()
    parallel.barrier("resume_check")  # no process may see a checkpoint another one is writing now
    if latest is not None:
        try:
            state, ref_params, head, meta = ckpt.restore(
                latest, new_train_state(params, optimizer, ctx.mesh), params, head_init()
            )
        except CheckpointError as e:
            ckpt.close()
            raise TrainingError(str(e)) from None
        logger.info("resumed from %s step %d", ckpt.dir, latest)
        print(f"resumed from step {latest}")
        record_config(config, workdir)
    else:
        record_config(config, workdir)
        if config.sft.steps > 0:
            params = cached_sft(config, ctx.task, ctx.cfg, params, ctx.mesh, workdir)
        write_start(workdir, config, params, primary)
        state = new_train_state(params, optimizer, ctx.mesh)
        ref_params = jax.tree.map(jnp.copy, params)
        head = head_start()
        meta = {"data_position": 0, "consecutive_skips": 0, "counters": {}}
        ckpt.save(0, state, ref_params, head, meta)
        ckpt.wait()
    before = evaluate_before(ctx, ref_params, workdir, root)

    writer = MetricsWriter(workdir, ckpt.latest_step(), enabled=primary)
    # explicit state shardings in and out: the donated state keeps one layout, so no recompiles
    state_shardings = jax.tree.map(lambda x: x.sharding, state)
    cfg, step_cfg = ctx.cfg, ctx.step_cfg
    ctx.jit_step = jax.jit(
        lambda s, b: train_step(s, b, cfg=cfg, scfg=step_cfg, optimizer=optimizer),
        in_shardings=(state_shardings, None),
        out_shardings=(state_shardings, None),
        donate_argnums=0,
    )
    ctx.jit_logp = jax.jit(
        lambda p, t, v, n_response: response_logprobs(p, cfg, t, v, n_response, step_cfg.temperature),
        static_argnames="n_response",
    )

    counters = dict(meta.get("counters", {}))
    consecutive_skips = int(meta.get("consecutive_skips", 0))
    stream = rollout.PromptStream(
        ctx.task.train_rows, ctx.task.encode_prompt, rl.max_prompt_len, seed, int(meta["data_position"]), counters
    )
    start = int(ckpt.latest_step() or 0)
    last_metrics: dict[str, float] = {}

    # ---------------------------------------------------------------- RL loop
    bar = tqdm(range(start, rl.steps), initial=start, total=rl.steps, desc="rl", disable=not config.progress_bar)
    try:
        for step in bar:
            try:
                state, head, m, (skipped, n_updates), empty = rl_step(
                    ctx, step, state, ref_params, head, stream, root, counters
                )
            except (reward_stage.RewardError, rollout.RolloutError) as e:
                raise TrainingError(f"step {step}: {e}") from None
            if empty:
                counters["empty_batches"] = counters.get("empty_batches", 0) + 1
                logger.warning("step %d: no trainable response after filtering; update skipped", step)
            if n_updates:
                counters["nonfinite_skips"] = counters.get("nonfinite_skips", 0) + skipped
                consecutive_skips = consecutive_skips + 1 if skipped == n_updates else 0
                if consecutive_skips >= rl.max_consecutive_skips:
                    raise TrainingError(
                        f"{consecutive_skips} consecutive steps had a NaN/inf loss or gradient "
                        f"(step {step}); aborting — lower rl.lr or check the reward"
                    )
            m.update({f"counters/{k}": v for k, v in counters.items()})
            # the first step of a process (a fresh start or a resume) compiles the programs: step
            # timings over a run leave it out
            m["time/first_step_in_process"] = float(step == start)
            last_metrics = m
            export_head(step + 1)
            ckpt.commit()  # the previous save is final, with its manifest, before this step's line
            writer.write(step + 1, m)
            if "reward/outcome_mean" in m:  # absent in a step of DAPO padding copies only
                bar.set_postfix(reward=f"{m['reward/outcome_mean']:.3f}", len=f"{m['response/length_mean']:.0f}")

            if config.eval.every and (step + 1) % config.eval.every == 0 and step + 1 < rl.steps:
                ev = evaluate(ctx.task, ctx.sampler, state.params, ctx.eval_cfg, jax.random.fold_in(root, 3))
                writer.write(
                    step + 1,
                    {f"eval/{s}/{k}": v for s, d in ev.items() for k, v in d.items() if isinstance(v, (int, float))},
                )
            if (step + 1) % config.ckpt.every == 0 or step + 1 == rl.steps:
                meta = {
                    "data_position": stream.position,
                    "consecutive_skips": consecutive_skips,
                    "counters": dict(counters),
                }
                ckpt.save(step + 1, state, ref_params, head, meta)  # meta is a copy: the save is async
    finally:
        try:
            ckpt.close()  # an in-flight async save must finish, whatever ends the loop
        finally:
            writer.close()

    # ---------------------------------------------------------------- final eval
    after = evaluate(ctx.task, ctx.sampler, state.params, ctx.eval_cfg, jax.random.fold_in(root, 3))
    if primary:
        write_atomic(os.path.join(workdir, "eval_after.json"), json.dumps(after, indent=1))
    print("\nevaluation before -> after RL (greedy):\n" + format_eval(before, after, ctx.task.grade_keys))
    return {"before": before, "after": after, "last_metrics": last_metrics, "state": state}


START_FILE = "start.json"  # in the run dir: a digest of the RL start's parameters


def write_start(workdir: str, config, params, primary: bool) -> None:
    """Records which parameters RL starts from: runs meant to be compared from one SFT start can
    check that they did (an SFT retrained after its cache was lost is not bitwise the same on a GPU)."""
    digest = params_digest(params)  # on every process: a collective over the mesh
    if primary:
        start = {"params_digest": digest, "sft_cache": sft_cache_dir(config, workdir) if config.sft.steps > 0 else None}
        write_atomic(os.path.join(workdir, START_FILE), json.dumps(start, indent=1))


def evaluate_before(ctx: RunContext, ref_params, workdir: str, root) -> dict:
    """The pre-RL evaluation, computed once per run directory (eval_before.json)."""
    path = os.path.join(workdir, "eval_before.json")
    before = None
    if os.path.exists(path):
        try:
            with open(path) as f:
                before = json.load(f)
            if not isinstance(before, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as e:  # e.g. emptied by a crash mid-write: computed again
            logger.warning("%s is unreadable (%s); evaluating the RL start again", path, e)
            before = None
    if before is None:
        before = evaluate(ctx.task, ctx.sampler, ref_params, ctx.eval_cfg, jax.random.fold_in(root, 3))
        if parallel.is_primary():
            write_atomic(path, json.dumps(before, indent=1))
            print("eval before RL:\n" + format_eval(None, before, ctx.task.grade_keys, before_only=True))
    parallel.barrier("eval_before")  # every process has read or computed `before`
    return before


def restore_params(workdir: str, params_template):
    """The policy parameters of a run's newest checkpoint that verifies (for evaluation)."""
    import orbax.checkpoint as ocp

    ckpt_dir = os.path.abspath(os.path.join(workdir, "checkpoints"))
    step = newest_good_step(ckpt_dir)  # verified against its manifest; bad newer steps are logged
    if step is None:
        raise TrainingError(f"{ckpt_dir}: no checkpoint that verifies against its manifest")
    handlers = {name: ocp.StandardCheckpointHandler() for name in ("state", "ref", "head")}
    manager = ocp.CheckpointManager(ckpt_dir, item_handlers={**handlers, "meta": ocp.JsonCheckpointHandler()})
    try:
        # the saved shardings name the training run's devices: restore onto one local device (an
        # 8-device run evaluated on 1 failed orbax's topology check)
        one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one), manager.item_metadata(step)["state"]
        )
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
    finally:
        manager.close()
    state = restored.state
    params = state["params"] if isinstance(state, dict) else state.params
    try:
        out = jax.tree.map(lambda t, x: jnp.asarray(x, t.dtype), params_template, params)
    except ValueError as e:
        raise TrainingError(f"{ckpt_dir} step {step}: parameters do not match the run's model config ({e})") from None
    bad = [  # same tree, other shapes (e.g. another d_model or n_layers): tree.map does not see them
        f"{jax.tree_util.keystr(path)} is {tuple(x.shape)}, the config gives {tuple(t.shape)}"
        for (path, t), x in zip(jax.tree_util.tree_flatten_with_path(params_template)[0], jax.tree.leaves(out))
        if tuple(t.shape) != tuple(x.shape)
    ]
    if bad:
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        raise TrainingError(f"{ckpt_dir} step {step}: parameters do not match the run's model config ({bad[0]}{more})")
    return out
