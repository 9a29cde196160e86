"""The training loop: (SFT warm start) -> RL steps of rollout -> reward -> advantage -> update.

One linear function, `run(config, workdir)`, in banner-commented sections. Everything
stateful lives in the checkpoint (policy, optimizer, reference, CLIPO head, step, data
position, counters), and every PRNG key is derived from (config.seed, step), so re-running the
same command on the same workdir resumes and reproduces an uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from clipo_jax import contrastive, parallel, sampling, tasks
from clipo_jax.models import PRESETS, ModelConfig, load_model, transformer
from clipo_jax.rl import advantages as adv_lib
from clipo_jax.rl import dapo, losses
from clipo_jax.rl.step import RLBatch, StepConfig, TrainState, make_optimizer, response_logprobs, sft_step, train_step

logger = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    pass


# ============================================================================ config checks
def validate_config(config) -> None:
    """Fail before any compilation on unknown registry names and impossible shapes."""
    rl = config.rl
    checks = [
        ("rl.advantage", rl.advantage, adv_lib.ADVANTAGE_ESTIMATORS),
        ("rl.policy_loss", rl.policy_loss, losses.POLICY_LOSSES),
        ("rl.aggregation", rl.aggregation, losses.AGGREGATIONS),
        ("rl.kl_estimator", rl.kl_estimator, losses.KL_ESTIMATORS),
        ("task.name", config.task.name, tasks.TASKS),
    ]
    for field, value, registry in checks:
        if value not in registry:
            raise TrainingError(f"config.{field}={value!r} is not one of {sorted(registry)}")
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
    if config.clipo.enabled:
        contrastive.ContrastiveConfig(**_clipo_static(config)).validate()


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
            keep = []
            with open(self.path) as f:
                for line in f:
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a line cut by a kill
                    if resume_step is not None and rec.get("step", 0) <= resume_step:
                        keep.append(line if line.endswith("\n") else line + "\n")
            with open(self.path, "w") as f:
                f.writelines(keep)
        try:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(os.path.join(workdir, "tb"))
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
def build_model(config, vocab_size: int, rng) -> tuple[ModelConfig, Any]:
    m = config.model
    if m.source.startswith("init:"):
        preset = m.source[len("init:") :]
        if preset not in PRESETS and preset != "custom":
            raise TrainingError(f"config.model.source={m.source!r}: unknown preset; valid: {sorted(PRESETS)} or custom")
        base = PRESETS.get(preset, ModelConfig())
        overrides = {
            k: m[k] for k in ("d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff") if k in m and m[k]
        }
        cfg = base.replace(vocab_size=vocab_size, dtype=m.dtype, max_seq_len=m.get("max_seq_len", 512), **overrides)
        return cfg, transformer.init_params(cfg, rng)
    cfg, params, _ = load_model(m.source, with_tokenizer=False)
    return cfg.replace(dtype=m.dtype), params


# ============================================================================ rollout helpers
def evaluate(
    task: tasks.Task, sampler: sampling.Sampler, params, scfg: sampling.SamplingConfig, rng, batch_size: int = 64
) -> dict[str, dict[str, float]]:
    """The shared evaluation (clipo_jax.evaluation) as the trainer uses it."""
    from clipo_jax import evaluation

    return evaluation.evaluate(task, sampler, params, scfg, rng, batch_size=batch_size)


def format_eval(before: dict | None, after: dict, keys, before_only: bool = False) -> str:
    if before_only:
        lines = [f"{'test set':<14}" + "".join(f"{k:>10}" for k in keys)]
        lines += [
            f"{name:<14}" + "".join(f"{d.get(k, float('nan')):>10.3f}" for k in keys) for name, d in after.items()
        ]
        return "\n".join(lines)
    lines = [f"{'test set':<14}" + "".join(f"{k + ' before':>16}{k + ' after':>15}" for k in keys)]
    for name in after:
        row = f"{name:<14}"
        for k in keys:
            b = before[name].get(k, float("nan")) if before else float("nan")
            row += f"{b:>16.3f}{after[name].get(k, float('nan')):>15.3f}"
        lines.append(row)
    return "\n".join(lines)


# ============================================================================ the run
def run(config, workdir: str) -> dict:
    """Run SFT (optional) then RL; returns {'before': eval, 'after': eval, 'last_metrics': ...}."""
    import orbax.checkpoint as ocp
    from tqdm import tqdm

    validate_config(config)
    os.makedirs(workdir, exist_ok=True)
    primary = parallel.is_primary()  # with several processes, process 0 writes the run's files
    if primary:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))
    rl, seed = config.rl, config.seed
    root = jax.random.key(seed)
    mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)

    # ---------------------------------------------------------------- task, model, optimizer
    if not primary:  # process 0 builds the task first: it may train a tokenizer into workdir
        parallel.barrier("task")
    task = tasks.build_task(config.task, workdir)
    if primary:
        parallel.barrier("task")
    tok = task.tokenizer
    cfg, params = build_model(config, tok.vocab_size, jax.random.fold_in(root, 1))
    from clipo_jax.models.tokenizer import check_vocab

    check_vocab(tok, cfg.vocab_size, config.model.source)
    axes = transformer.param_logical_axes(cfg)
    params = parallel.shard_tree(params, mesh, axes)
    stop_ids = tuple(tok.stop_ids)
    N = rl.max_new_tokens
    rollout_cfg = sampling.SamplingConfig(
        max_new_tokens=N,
        temperature=rl.temperature,
        top_p=rl.top_p,
        n_samples=rl.group_size,
        stop_ids=stop_ids,
        pad_id=tok.pad_id,
    )
    eval_cfg = sampling.SamplingConfig(
        max_new_tokens=config.eval.max_new_tokens,
        temperature=config.eval.get("temperature", 0.0),
        top_p=config.eval.get("top_p", 1.0),
        n_samples=config.eval.get("n", 1),
        stop_ids=stop_ids,
        pad_id=tok.pad_id,
    )
    sampler = sampling.Sampler(cfg, mesh)
    prompt_width = sampler.length_bucket(rl.max_prompt_len)
    optimizer = make_optimizer(
        rl.lr,
        total_steps=rl.steps,
        warmup_steps=rl.warmup_steps,
        schedule=rl.schedule,
        weight_decay=rl.weight_decay,
        grad_clip=rl.grad_clip,
    )
    step_cfg = StepConfig(
        policy_loss=rl.policy_loss,
        policy_loss_opts=_policy_opts(rl),
        aggregation=rl.aggregation,
        kl_coef=rl.kl_coef,
        kl_estimator=rl.kl_estimator,
        kl_clamp=rl.kl_clamp,
        entropy_coef=rl.entropy_coef,
        temperature=max(rl.temperature, 1e-6),
        micro_batches=rl.micro_batches,
        use_old_logp=(rl.epochs > 1 or rl.mini_batches > 1),
        tis_cap=rl.tis_cap or None,
        remat=rl.remat,
    )
    clipo_cfg = contrastive.ContrastiveConfig(**_clipo_static(config)) if config.clipo.enabled else None

    ckpt_dir = os.path.abspath(os.path.join(workdir, "checkpoints"))
    manager = ocp.CheckpointManager(
        ckpt_dir, options=ocp.CheckpointManagerOptions(max_to_keep=config.ckpt.keep, create=True)
    )

    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    replicate = lambda tree: parallel.put_global(tree, replicated)  # host/local values -> every device

    def new_state(p):
        # every leaf on the mesh: moments sharded like their params, counts replicated (a plain
        # jit(optimizer.init) leaves outputs that do not depend on p on one device)
        p_sh = jax.tree.map(lambda x: x.sharding, p)
        opt_sh = optax.tree_map_params(
            optimizer,
            lambda _, sh: sh,
            jax.eval_shape(optimizer.init, p),
            p_sh,
            transform_non_params=lambda _: replicated,
        )
        opt_state = jax.jit(optimizer.init, out_shardings=opt_sh)(p)
        return TrainState(p, opt_state, jax.jit(lambda: jnp.zeros((), jnp.int32), out_shardings=replicated)())

    def head_init():
        if clipo_cfg is None:  # orbax refuses empty trees: keep the slot with a placeholder
            return replicate({"unused": jnp.zeros((), jnp.int32)})
        return replicate(contrastive.init_head_state(jax.random.fold_in(root, 2), cfg.d_model, clipo_cfg))

    def save(step, state, ref_params, head, meta):
        manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                ref=ocp.args.StandardSave(ref_params),
                head=ocp.args.StandardSave(head),
                meta=ocp.args.JsonSave(meta),
            ),
        )

    # ---------------------------------------------------------------- resume or SFT warm start
    latest = manager.latest_step()
    parallel.barrier("resume_check")  # no process may see a checkpoint another one is writing now
    eval_before_path = os.path.join(workdir, "eval_before.json")
    if latest is not None:
        abstract = lambda t: jax.tree.map(ocp.utils.to_shape_dtype_struct, t)
        template_state = new_state(params)
        restored = manager.restore(
            latest,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract(template_state)),
                ref=ocp.args.StandardRestore(abstract(params)),
                head=ocp.args.StandardRestore(abstract(head_init())),
                meta=ocp.args.JsonRestore(),
            ),
        )
        state, ref_params, head, meta = restored.state, restored.ref, restored.head, restored.meta
        logger.info("resumed from %s step %d", ckpt_dir, latest)
        print(f"resumed from step {latest}")
    else:
        if config.sft.steps > 0:
            params = cached_sft(config, task, cfg, params, mesh, workdir)
        state = new_state(params)
        ref_params = jax.tree.map(jnp.copy, params)
        head = head_init()
        meta = {"data_position": 0, "consecutive_skips": 0, "counters": {}}
        save(0, state, ref_params, head, meta)
        manager.wait_until_finished()
    if os.path.exists(eval_before_path):
        with open(eval_before_path) as f:
            before = json.load(f)
    else:
        before = evaluate(task, sampler, ref_params, eval_cfg, jax.random.fold_in(root, 3))
        if primary:
            with open(eval_before_path, "w") as f:
                json.dump(before, f, indent=1)
            print("eval before RL:\n" + format_eval(None, before, task.grade_keys, before_only=True))
    parallel.barrier("eval_before")  # every process has read or computed `before`

    writer = MetricsWriter(workdir, manager.latest_step(), enabled=primary)
    # explicit state shardings in and out: the donated state keeps one layout, so no recompiles
    state_shardings = jax.tree.map(lambda x: x.sharding, state)
    jit_step = jax.jit(
        lambda s, b: train_step(s, b, cfg=cfg, scfg=step_cfg, optimizer=optimizer),
        in_shardings=(state_shardings, None),
        out_shardings=(state_shardings, None),
        donate_argnums=0,
    )
    jit_logp = jax.jit(lambda p, t, v: response_logprobs(p, cfg, t, v, N, step_cfg.temperature))

    def shard_batch(tree):
        """Host arrays -> device arrays split over the mesh's batch axes (data parallelism); with
        several processes each one places only its own rows."""
        return parallel.put_global(
            tree, jax.tree.map(lambda x: parallel.batch_sharding(mesh, x.ndim, x.shape[0]), tree)
        )

    counters = dict(meta.get("counters", {}))
    consecutive_skips = int(meta.get("consecutive_skips", 0))
    data_pos = int(meta["data_position"])
    pool = task.train_rows
    start = int(manager.latest_step() or 0)
    last_metrics: dict[str, float] = {}

    def next_prompts(n):
        """Deterministic stream over the training pool (reshuffled every epoch); drops overlong."""
        nonlocal data_pos
        rows, ids = [], []
        misses = 0
        while len(rows) < n:
            if misses > len(pool):  # a whole pass without one prompt that fits
                raise TrainingError(f"no training prompt fits config.rl.max_prompt_len={rl.max_prompt_len}")
            epoch, i = divmod(data_pos, len(pool))
            order = np.random.default_rng([seed, epoch]).permutation(len(pool))
            row = pool[order[i]]
            data_pos += 1
            p = task.encode_prompt(row)
            if len(p) > rl.max_prompt_len:
                counters["prompts_dropped_overlong"] = counters.get("prompts_dropped_overlong", 0) + 1
                misses += 1
                continue
            misses = 0
            rows.append(row)
            ids.append(p)
        return rows, ids

    # ---------------------------------------------------------------- RL loop
    bar = tqdm(range(start, rl.steps), initial=start, total=rl.steps, desc="rl", disable=not config.progress_bar)
    for step in bar:
        t0 = time.perf_counter()
        step_key = jax.random.fold_in(root, 1000 + step)
        G = rl.group_size

        # rollout (with DAPO dynamic sampling: refill groups whose rewards have zero spread)
        def sample_round(round_idx):
            rows, ids = next_prompts(rl.prompts_per_step)
            out = sampler(state.params, ids, jax.random.fold_in(step_key, round_idx), rollout_cfg)
            texts = [sampling.response_text(tok, out, i, stop_ids) for i in range(len(out.lengths))]
            fields = dict(out._asdict())
            fields["rewards"] = np.array([task.reward(rows[i // G], t) for i, t in enumerate(texts)], np.float32)
            if rl.dynamic_sampling:  # rounds are stacked: give every round the same prompt width
                fields.update(
                    zip(
                        ("prompt_tokens", "prompt_mask"),
                        _left_pad_to(out.prompt_tokens, out.prompt_mask, prompt_width, tok.pad_id),
                    )
                )
            return fields

        t_roll = time.perf_counter()
        if rl.dynamic_sampling:
            drawn = dapo.dynamic_sample(
                sample_round,
                target_groups=rl.prompts_per_step,
                group_size=G,
                max_rounds=rl.dynamic_max_rounds,
                on_short="pad",
            )
            batch, valid_rows, rounds = drawn.batch, drawn.valid, drawn.rounds
            for k, v in drawn.metrics().items():
                m_key = f"dynamic_{k}" if not k.startswith("dynamic") else k
                counters[m_key] = counters.get(m_key, 0) + float(v)
        else:
            batch, rounds = sample_round(0), 1
            valid_rows = np.ones(len(batch["rewards"]), bool)
        rewards = batch.pop("rewards")
        out = sampling.SampleOutput(**batch)
        t_reward = time.perf_counter()
        outcome = rewards.copy()
        if rl.overlong_buffer:
            shaped = dapo.overlong_penalty(out.lengths, N, rl.overlong_buffer)
            rewards = rewards + np.asarray(shaped, np.float32)

        # CLIPO: contrastive reward from the head's per-sample losses before its update
        m: dict[str, float] = {}
        if clipo_cfg is not None:
            labels = (outcome > 0.5).astype(np.int32)
            group_ids = np.repeat(np.arange(len(rewards) // G), G)
            pooled, labels_d, group_ids_d, lengths_d = replicate((out.pooled_hidden, labels, group_ids, out.lengths))
            head, per_sample, c_loss, c_metrics = contrastive.head_step(
                head, pooled, labels_d, group_ids_d, replicate(jax.random.fold_in(step_key, 77)), clipo_cfg
            )
            c_reward = np.asarray(
                contrastive.contrastive_reward(
                    per_sample, labels_d, lam=config.clipo.lam, c0=config.clipo.c0, clip_min=config.clipo.clip_min
                )
            )
            rewards = rewards + c_reward
            m.update({k: float(v) for k, v in c_metrics.items()})
            if config.clipo.log_geometry:
                z = contrastive.head_apply(head.params, pooled, clipo_cfg.head)
                geo = contrastive.contrastive_metrics(
                    pooled, z, labels_d, group_ids_d, lengths_d, per_sample, replicate(c_reward), group_size=G
                )
                m.update({k: float(v) for k, v in geo.items()})
            m["contrastive/reward_mean"] = float(c_reward.mean())

        adv = np.asarray(
            adv_lib.compute_advantages(rl.advantage, jnp.asarray(rewards), G, valid=jnp.asarray(valid_rows))
        )
        t_ref = time.perf_counter()
        tokens = np.concatenate([out.prompt_tokens, out.tokens], 1)
        valid = np.concatenate([out.prompt_mask, out.response_mask], 1)
        resp_mask = out.response_mask & valid_rows[:, None]  # padding groups (DAPO) carry no loss
        if rl.mask_truncated:
            resp_mask = resp_mask & ~out.truncated[:, None]
        zeros = np.zeros_like(out.logprobs)
        if rl.kl_coef or step_cfg.use_old_logp:
            tokens_d, valid_d = shard_batch((tokens, valid))  # placed once for both passes
        ref_logp = parallel.to_host(jit_logp(ref_params, tokens_d, valid_d)) if rl.kl_coef else zeros
        old_logp = parallel.to_host(jit_logp(state.params, tokens_d, valid_d)) if step_cfg.use_old_logp else zeros
        full = RLBatch(tokens, valid, resp_mask, adv.astype(np.float32), old_logp, ref_logp, out.logprobs)

        # updates: PPO epochs x mini-batches (whole groups stay together); frozen during CLIPO warmup
        t_update = time.perf_counter()
        frozen = clipo_cfg is not None and step < config.clipo.warmup_steps
        empty = not resp_mask.any()  # e.g. every group filtered out by dynamic sampling
        if empty:
            counters["empty_batches"] = counters.get("empty_batches", 0) + 1
            logger.warning("step %d: no trainable response after filtering; update skipped", step)
        step_metrics = []
        if not frozen and not empty:
            rows = len(adv)
            per_mb = rows // rl.mini_batches
            for epoch in range(rl.epochs):
                perm = np.random.default_rng([seed, step, epoch]).permutation(rows // G)
                order = (perm[:, None] * G + np.arange(G)).reshape(-1)
                for mb in range(rl.mini_batches):
                    idx = order[mb * per_mb : (mb + 1) * per_mb]
                    state, sm = jit_step(state, shard_batch(jax.tree.map(lambda x: x[idx], full)))
                    step_metrics.append(parallel.to_host(sm))
            skipped = sum(float(s["actor/skipped"]) for s in step_metrics)
            counters["nonfinite_skips"] = counters.get("nonfinite_skips", 0) + int(skipped)
            consecutive_skips = consecutive_skips + 1 if skipped == len(step_metrics) else 0
            if consecutive_skips >= rl.max_consecutive_skips:
                manager.wait_until_finished()  # an in-flight async save must finish before we exit
                writer.close()
                raise TrainingError(
                    f"{consecutive_skips} consecutive steps had a NaN/inf loss or gradient "
                    f"(step {step}); aborting — lower rl.lr or check the reward"
                )
        t_end = time.perf_counter()

        # metrics
        for sm in step_metrics:
            for k, v in sm.items():
                m[k] = m.get(k, 0.0) + float(v) / len(step_metrics)
        n_tok = int(out.lengths.sum())
        m.update(
            {
                "reward/mean": float(rewards.mean()),
                "reward/outcome_mean": float(outcome.mean()),
                "reward/std": float(rewards.std()),
                "response/length_mean": float(out.lengths.mean()),
                "response/truncated_frac": float(out.truncated.mean()),
                "rollout/rounds": rounds,
                "time/rollout": t_reward - t_roll,
                "time/reward": t_ref - t_reward,
                "time/reference": t_update - t_ref,
                "time/update": t_end - t_update,
                "time/step": t_end - t0,
                "throughput/tokens_per_s": n_tok / max(t_end - t0, 1e-9),
                "actor/frozen": float(frozen),
                **{f"counters/{k}": v for k, v in counters.items()},
            }
        )
        last_metrics = m
        writer.write(step + 1, m)
        bar.set_postfix(reward=f"{m['reward/outcome_mean']:.3f}", len=f"{m['response/length_mean']:.0f}")

        if config.eval.every and (step + 1) % config.eval.every == 0 and step + 1 < rl.steps:
            ev = evaluate(task, sampler, state.params, eval_cfg, jax.random.fold_in(root, 3))
            writer.write(
                step + 1,
                {f"eval/{s}/{k}": v for s, d in ev.items() for k, v in d.items() if isinstance(v, (int, float))},
            )
        if (step + 1) % config.ckpt.every == 0 or step + 1 == rl.steps:
            save(
                step + 1,
                state,
                ref_params,
                head,
                {"data_position": data_pos, "consecutive_skips": consecutive_skips, "counters": dict(counters)},
            )  # a copy: the save is async
    manager.wait_until_finished()
    writer.close()

    # ---------------------------------------------------------------- final eval
    after = evaluate(task, sampler, state.params, eval_cfg, jax.random.fold_in(root, 3))
    if primary:
        with open(os.path.join(workdir, "eval_after.json"), "w") as f:
            json.dump(after, f, indent=1)
    print("\nevaluation before -> after RL (greedy):\n" + format_eval(before, after, task.grade_keys))
    return {"before": before, "after": after, "last_metrics": last_metrics, "state": state}


def _left_pad_to(tokens: np.ndarray, mask: np.ndarray, width: int, pad_id: int):
    """Left-pad [B, T] prompt tokens/mask to [B, width]."""
    d = width - tokens.shape[1]
    if d < 0:
        raise TrainingError(f"prompt width {tokens.shape[1]} exceeds the rollout width {width}")
    return (np.pad(tokens, ((0, 0), (d, 0)), constant_values=pad_id), np.pad(mask, ((0, 0), (d, 0))))


# ============================================================================ SFT
def run_sft(config, task: tasks.Task, cfg: ModelConfig, params, mesh, workdir: str):
    """Supervised warm start on the task's (prompt, completion) pairs; loss on completion tokens."""
    from tqdm import tqdm

    s = config.sft
    tok = task.tokenizer
    if not task.sft_pairs:
        raise TrainingError(f"config.sft.steps={s.steps} but task {task.name!r} has no SFT pairs")
    seqs, masks = [], []
    dropped = 0
    for prompt, completion in task.sft_pairs:
        p = task.encode_prompt({"prompt": prompt})
        c = tok.encode(completion) + [tok.eos_id]
        if len(p) + len(c) > s.max_len:
            dropped += 1
            continue
        seqs.append(p + c)
        masks.append([False] * len(p) + [True] * len(c))
    if dropped:
        logger.warning(
            "SFT: dropped %d of %d pairs longer than sft.max_len=%d", dropped, len(task.sft_pairs), s.max_len
        )
    L = max(len(x) for x in seqs)
    tokens = np.full((len(seqs), L), tok.pad_id, np.int32)
    valid = np.zeros((len(seqs), L), bool)
    lmask = np.zeros((len(seqs), L), bool)
    for i, (x, mk) in enumerate(zip(seqs, masks)):
        tokens[i, : len(x)], valid[i, : len(x)], lmask[i, : len(x)] = x, True, mk
    opt = make_optimizer(
        s.lr,
        total_steps=s.steps,
        warmup_steps=s.warmup_steps,
        schedule="cosine",
        weight_decay=s.weight_decay,
        grad_clip=1.0,
        min_lr_ratio=0.1,
    )
    # batches and the step counter go on the mesh (with several processes: only this process's
    # rows of each batch)
    put_batch = lambda *xs: parallel.put_global(xs, parallel.batch_sharding(mesh, 2, s.batch_size))
    step0 = parallel.put_global(np.zeros((), np.int32), parallel.named_sharding(mesh, None))
    state = TrainState(params, jax.jit(opt.init)(params), step0)
    step_fn = jax.jit(lambda st, t, v, l: sft_step(st, t, v, l, cfg=cfg, optimizer=opt), donate_argnums=0)
    rng = np.random.default_rng(config.seed)
    bar = tqdm(range(s.steps), desc="sft", disable=not config.progress_bar)
    log = open(os.path.join(workdir, "sft_metrics.jsonl"), "w") if parallel.is_primary() else None
    for i in bar:
        idx = rng.choice(len(seqs), s.batch_size, replace=False)
        state, m = step_fn(state, *put_batch(tokens[idx], valid[idx], lmask[idx]))
        if i % 20 == 0 or i == s.steps - 1:
            loss = float(parallel.to_host(m["sft/loss"]))
            bar.set_postfix(loss=f"{loss:.3f}")
            if log is not None:
                log.write(json.dumps({"step": i, "loss": loss}) + "\n")
    if log is not None:
        log.close()
    return state.params


def sft_cache_dir(config, workdir: str) -> str:
    """Where the SFT result lives: keyed by everything that determines it, so runs that differ
    only in their RL settings (e.g. GRPO vs GRPO+CLIPO on one seed) share one warm start."""
    import hashlib

    key = json.dumps(
        {
            "model": config.model.to_dict(),
            "sft": {k: v for k, v in config.sft.to_dict().items() if k != "cache_dir"},
            "task": config.task.to_dict(),
            "seed": config.seed,
        },
        sort_keys=True,
    )
    digest = hashlib.sha1(key.encode()).hexdigest()[:12]
    root = config.sft.get("cache_dir") or os.path.join(workdir, "sft")
    return os.path.abspath(os.path.join(root, digest))


def cached_sft(config, task: tasks.Task, cfg: ModelConfig, params, mesh, workdir: str):
    """run_sft, or restore its result if this exact SFT was already done (see sft_cache_dir)."""
    import orbax.checkpoint as ocp

    path = sft_cache_dir(config, workdir)
    ckptr = ocp.StandardCheckpointer()
    if os.path.exists(os.path.join(path, "params")):
        print(f"SFT: reusing {path}")
        return ckptr.restore(os.path.join(path, "params"), jax.tree.map(ocp.utils.to_shape_dtype_struct, params))
    params = run_sft(config, task, cfg, params, mesh, workdir)
    os.makedirs(path, exist_ok=True)
    ckptr.save(os.path.join(path, "params"), params)
    ckptr.wait_until_finished()
    return params


def restore_params(workdir: str, params_template):
    """The policy parameters of a run's latest checkpoint (for evaluation)."""
    import orbax.checkpoint as ocp

    ckpt_dir = os.path.abspath(os.path.join(workdir, "checkpoints"))
    manager = ocp.CheckpointManager(ckpt_dir)
    step = manager.latest_step()
    if step is None:
        raise TrainingError(f"{ckpt_dir}: no checkpoint")
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    state = restored.state
    params = state["params"] if isinstance(state, dict) else state.params
    try:
        return jax.tree.map(lambda t, x: jnp.asarray(x, t.dtype), params_template, params)
    except ValueError as e:
        raise TrainingError(f"{ckpt_dir} step {step}: parameters do not match the run's model config ({e})") from None
