"""Pieces shared by every config: the RL, CLIPO, eval, checkpoint and mesh blocks with defaults."""

import ml_collections


def rl_block(**overrides) -> ml_collections.ConfigDict:
    c = dict(
        steps=60,
        prompts_per_step=16,
        group_size=8,
        max_new_tokens=48,
        max_prompt_len=80,
        temperature=1.0,
        top_p=1.0,
        lr=2e-4,
        warmup_steps=5,
        schedule="constant",
        weight_decay=0.0,
        grad_clip=1.0,
        advantage="grpo",
        policy_loss="ppo_clip",
        eps_low=0.2,
        eps_high=0.2,
        dual_clip=3.0,
        aggregation="token_mean",
        kl_coef=0.0,
        kl_estimator="k3",
        kl_clamp=10.0,
        kl_in_reward=False,  # True: beta * sum_t KL_t is subtracted from each response's reward, not a loss
        entropy_coef=0.0,
        epochs=1,
        mini_batches=2,
        micro_batches=1,
        tis_cap=0.0,
        remat=False,
        dynamic_sampling=False,
        dynamic_max_rounds=2,
        overlong_buffer=0,
        mask_truncated=False,
        max_consecutive_skips=5,
        logprob_chunks=1,  # > 1: the reference/old log-prob passes run over this many row chunks
        trim_padding=16,  # the update drops all-padding columns, widths rounded to this (0 = full width)
        rollout_chunk_prompts=0,  # > 0: sample the rollouts this many prompts per call (implies row keys)
        rollout_row_keys=False,  # per-row sampling keys: samples independent of the batch size
        rollout_replicate_weights=False,  # sample from a compute-dtype copy of the weights on every device
    )
    c.update(overrides)
    return ml_collections.ConfigDict(c)


def apply_algo(rl: ml_collections.ConfigDict, algo: str) -> None:
    """Named algorithm presets on top of the RL block (GRPO is the default)."""
    if algo == "grpo":
        return
    if algo == "dapo":  # clip-higher, dynamic sampling, overlong shaping, token-mean
        rl.update(dynamic_sampling=True, eps_high=0.28, overlong_buffer=max(1, rl.max_new_tokens // 6))
    elif algo == "dr_grpo":
        rl.update(advantage="dr_grpo", aggregation="seq_mean_token_sum_norm")
    elif algo == "gspo":
        rl.update(policy_loss="gspo", eps_low=3e-4, eps_high=4e-4, aggregation="seq_mean_token_mean")
    elif algo == "gmpo":
        rl.update(policy_loss="gmpo", eps_low=0.4, eps_high=0.4, aggregation="seq_mean_token_mean")
    elif algo == "rloo":
        rl.update(advantage="rloo")
    elif algo == "reinforce_pp":
        rl.update(advantage="reinforce_pp")
    else:
        raise ValueError(f"unknown algo {algo!r}; valid: grpo, dapo, dr_grpo, gspo, gmpo, rloo, reinforce_pp")


def clipo_block(enabled: bool, **overrides) -> ml_collections.ConfigDict:
    """CLIPO defaults from the paper (arXiv 2603.10101, contrastive head, loss, reward, warmup); d_out and warmup depend on the track."""
    c = dict(
        enabled=enabled,
        loss_type="infonce",
        level="group",
        temperature=0.05,
        masked_label=0,
        skip_trivial=True,
        similarity="cosine",
        head="linear",
        d_out=512,
        fixed_head=False,
        lr=1e-3,
        weight_decay=0.01,
        lam=0.2,
        c0=0.0,
        clip_min=-0.5,
        warmup_steps=0,
        log_geometry=True,
        # pooled hidden state: "decode" as the authors' code, "prefill_and_decode" adds the prefill state
        pooling="decode",
        head_on_padding=False,  # True: DAPO's padding copies train the head too
        head_init_path="",  # a head file (clipo_head/step_<n>.safetensors of a run) to start from
        export_every=0,  # > 0: write WORKDIR/clipo_head/step_<n>.safetensors every n steps and at the end
    )
    c.update(overrides)
    return ml_collections.ConfigDict(c)


def sft_block(**overrides) -> ml_collections.ConfigDict:
    c = dict(steps=0, batch_size=32, lr=3e-3, warmup_steps=30, weight_decay=0.0, max_len=128, cache_dir="")
    c.update(overrides)
    return ml_collections.ConfigDict(c)


def finish(c: ml_collections.ConfigDict, seed: int = 0) -> ml_collections.ConfigDict:
    c.seed = seed
    c.progress_bar = True
    defaults = {
        "reward": dict(terms=dict(verifiable=1.0), label_term="verifiable", gate_reward=0.0, correct_threshold=0.5),
        "eval": dict(every=0, max_new_tokens=64),
        "ckpt": dict(every=20, keep=2),
        "mesh": dict(data=-1, fsdp=1, tensor=1),
    }
    for key, value in defaults.items():
        if key not in c:
            c[key] = ml_collections.ConfigDict(value)
    if "model" in c and "attention_impl" not in c.model:
        # "einsum" or "dot_product" (jax.nn.dot_product_attention; docs/parts/attention.md)
        c.model.attention_impl = "einsum"
    return c


def paper_track(
    a,
    *,
    train_file: str,
    tests,
    steps: int,
    prompts: int,
    max_new_tokens: int,
    mini_batches: int,
    d_out: int,
    warmup: int,
    eval_every: int,
    micro_batches: int,
    logprob_chunks: int,
    rollout_chunk_prompts: int,
) -> ml_collections.ConfigDict:
    """A CLIPO paper track (arXiv 2603.10101, training tracks): shared hyper-parameters, track-specific sizes.

    `a` is the parsed arg of the track config (model, data, baseline, algo, seed, fixed_head, loss,
    level, tau, lam). micro_batches, logprob_chunks and rollout_chunk_prompts are the sizes
    `experiments/plan_scale.py --fit=H100` picks for the track's 8-chip mesh (docs/results.md);
    the rollout samples from a bfloat16 copy of the weights (no all-gathers in the decode loop).
    """
    c = ml_collections.ConfigDict()
    c.task = ml_collections.ConfigDict(
        dict(
            name="dataset",
            tokenizer=a.model,
            train=f"clipo:{a.data}/train/{train_file}",
            tests=",".join(f"{n}=clipo:{a.data}/test/{n}.parquet" for n in tests),
            train_limit=0,
            test_limit=0,
        )
    )
    c.model = ml_collections.ConfigDict(dict(source=a.model, dtype="bfloat16"))
    c.sft = sft_block()
    c.rl = rl_block(
        steps=steps,
        prompts_per_step=prompts,
        group_size=16,
        max_prompt_len=512,
        max_new_tokens=max_new_tokens,
        lr=1e-6,
        warmup_steps=0,
        schedule="constant",
        weight_decay=0.01,
        grad_clip=1.0,
        eps_low=0.2,
        eps_high=0.2,
        dual_clip=3.0,
        aggregation="token_mean",
        kl_coef=0.001,
        kl_estimator="k3",
        epochs=1,
        mini_batches=mini_batches,
        micro_batches=micro_batches,
        logprob_chunks=logprob_chunks,
        rollout_chunk_prompts=rollout_chunk_prompts,
        rollout_replicate_weights=True,
        remat=True,
        temperature=1.0,
        top_p=1.0,
    )
    apply_algo(c.rl, a.algo)
    c.clipo = clipo_block(
        not a.baseline,
        d_out=d_out,
        warmup_steps=warmup,
        fixed_head=a.fixed_head,
        loss_type=a.loss,
        level=a.level,
        temperature=a.tau,
        lam=a.lam,
        log_geometry=False,
    )
    c.eval = ml_collections.ConfigDict(dict(every=eval_every, max_new_tokens=max_new_tokens))
    c.ckpt = ml_collections.ConfigDict(dict(every=eval_every, keep=3))
    return finish(c, a.seed)
