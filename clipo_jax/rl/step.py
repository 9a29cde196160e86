"""The pure RL train step: one optimizer update on one mini-batch, with micro-batch accumulation.

    new_state, metrics = train_step(state, batch)        # jitted, state donated

Loss aggregation stays exact under accumulation: the aggregation's denominator is computed
over the whole mini-batch first, each micro-batch contributes numerator / denominator, and
the gradients are summed (see rl/losses.py). The diagnostics (clip fractions, ratios, approx_kl,
the sampler/trainer log-prob gap) are computed once on the whole mini-batch from the log-probs the
micro-batches return, so they do not depend on the number of micro-batches. A non-finite loss or
gradient skips the update (the state is kept) and reports `skipped = 1`; the trainer counts
consecutive skips.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import struct

from clipo_jax.models.config import ModelConfig
from clipo_jax.models.transformer import Params, token_logprobs
from clipo_jax.rl import losses


@struct.dataclass
class TrainState:
    params: Any
    opt_state: Any
    step: jax.Array


class RLBatch(NamedTuple):
    """One mini-batch of B responses. Prompt length Tp = T - N (left-padded prompts).

    tokens/valid [B, T] = prompt ++ response; response_mask [B, N]; advantages [B];
    old_logp, ref_logp, sampler_logp [B, N] float32 (zeros when unused); sampled_rows [B] bool or
    None: the responses that were sampled (not DAPO's padding copies), truncated ones included
    although ``mask_truncated`` leaves them out of ``response_mask``: the denominator of the
    ``losses.COUNTS_SAMPLED_ROWS`` aggregations (Dr. GRPO) counts them; None = the rows with a
    non-empty ``response_mask``.
    """

    tokens: jax.Array
    valid: jax.Array
    response_mask: jax.Array
    advantages: jax.Array
    old_logp: jax.Array
    ref_logp: jax.Array
    sampler_logp: jax.Array
    sampled_rows: jax.Array | None = None


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Static options of the train step (hashable: part of the jit cache key)."""

    policy_loss: str = "ppo_clip"
    policy_loss_opts: tuple = ()  # sorted (key, value) pairs, e.g. (("eps_high", 0.28),)
    aggregation: str = "token_mean"
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    kl_clamp: float | None = 10.0
    entropy_coef: float = 0.0
    temperature: float = 1.0
    micro_batches: int = 1
    use_old_logp: bool = True  # False: on-policy, old = stop_gradient(current) (ratio 1)
    tis_cap: float | None = None  # truncated importance sampling vs the sampler's log-probs
    remat: bool = False
    # the aggregations' constant length (Dr. GRPO's seq_mean_token_sum_norm divides by it): the
    # response budget, which a batch trimmed to its longest response (update.trim_padding) is
    # narrower than; None = the batch's response width
    max_len: int | None = None


def response_logprobs(
    params: Params,
    cfg: ModelConfig,
    tokens,
    valid,
    n_response: int,
    temperature: float = 1.0,
    with_entropy: bool = False,
    remat: bool = False,
):
    """Log-probs of the response tokens [B, N] (and their entropy) from the full sequences [B, T].

    Position t predicts token t + 1, so response token j (at T - N + j) is read at T - N + j - 1.
    """
    T = tokens.shape[1]
    targets = jnp.roll(tokens, -1, axis=1)
    out = token_logprobs(params, cfg, tokens, valid, targets, temperature=temperature, with_entropy=True, remat=remat)
    lp, ent = out[0], out[1]
    sl = slice(T - n_response - 1, T - 1)
    if with_entropy:
        return lp[:, sl], ent[:, sl]
    return lp[:, sl]


def make_optimizer(
    lr: float,
    *,
    total_steps: int,
    warmup_steps: int = 0,
    schedule: str = "constant",
    weight_decay: float = 0.0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    grad_clip: float | None = 1.0,
    min_lr_ratio: float = 0.0,
) -> optax.GradientTransformation:
    """AdamW with linear warmup then constant or cosine decay, after global-norm clipping."""
    if schedule == "constant":
        decay = optax.constant_schedule(lr)
    elif schedule == "cosine":
        decay = optax.cosine_decay_schedule(lr, max(1, total_steps - warmup_steps), alpha=min_lr_ratio)
    else:
        raise ValueError(f"unknown lr schedule {schedule!r}; valid: constant, cosine")
    sched = (
        optax.join_schedules([optax.linear_schedule(0.0, lr, warmup_steps), decay], [warmup_steps])
        if warmup_steps > 0
        else decay
    )
    parts = [optax.clip_by_global_norm(grad_clip)] if grad_clip else []
    parts.append(optax.adamw(sched, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))
    return optax.chain(*parts)


# the loss terms: numerator / global denominator per micro-batch, exact partial sums of the mini-batch's
ADDITIVE_METRICS = ("actor/pg_loss", "actor/kl", "actor/entropy")


def _micro_loss(
    params, mb: RLBatch, denom, *, cfg: ModelConfig, scfg: StepConfig, n_response: int, max_len: int | None = None
):
    """The micro-batch's share of the loss, its ADDITIVE_METRICS and (gradient stopped) its log-probs."""
    max_len = max_len or n_response  # the aggregations' constant length (StepConfig.max_len)
    logp, ent = response_logprobs(
        params, cfg, mb.tokens, mb.valid, n_response, scfg.temperature, with_entropy=True, remat=scfg.remat
    )
    mask = mb.response_mask.astype(jnp.float32)
    old = mb.old_logp if scfg.use_old_logp else jax.lax.stop_gradient(logp)
    is_w = losses.tis_weights(old, mb.sampler_logp, scfg.tis_cap) if scfg.tis_cap else None
    per_tok, _ = losses.policy_loss(
        scfg.policy_loss, logp, old, mb.advantages, mask, is_weights=is_w, **dict(scfg.policy_loss_opts)
    )
    num, _ = losses.aggregate(scfg.aggregation, per_tok, mask, max_len=max_len)
    loss = num / denom
    metrics = {"actor/pg_loss": num / denom}
    if scfg.kl_coef:
        kl = losses.kl_penalty(scfg.kl_estimator, logp, mb.ref_logp, scfg.kl_clamp, mask=mask)
        kl_num, _ = losses.aggregate(scfg.aggregation, kl, mask, max_len=max_len)
        loss = loss + scfg.kl_coef * kl_num / denom
        metrics["actor/kl"] = kl_num / denom
    ent_num, _ = losses.aggregate(scfg.aggregation, ent, mask, max_len=max_len)
    metrics["actor/entropy"] = ent_num / denom
    if scfg.entropy_coef:
        loss = loss - scfg.entropy_coef * ent_num / denom
    return loss, (metrics, jax.lax.stop_gradient(logp))


def batch_metrics(logp, batch: RLBatch, scfg: StepConfig) -> dict:
    """The policy loss's diagnostics and the sampler-vs-trainer gap over a whole mini-batch.

    ``logp`` [B, N] are the current log-probs. The gap compares the sampler's log-probs with
    pi_old as the trainer computes it: ``batch.old_logp`` when the step uses it, else the current
    log-probs (on-policy: they are pi_old), so policy drift over mini-batches and epochs is not
    reported as sampler mismatch.
    """
    mask = batch.response_mask.astype(jnp.float32)
    old = batch.old_logp if scfg.use_old_logp else logp
    _, pm = losses.policy_loss(scfg.policy_loss, logp, old, batch.advantages, mask, **dict(scfg.policy_loss_opts))
    metrics = {f"actor/{k}": v for k, v in pm.items()}
    gap = losses.logprob_gap_metrics(old, batch.sampler_logp, mask)
    metrics.update({f"actor/{k}": v for k, v in gap.items()})
    return metrics


def train_step(
    state: TrainState, batch: RLBatch, *, cfg: ModelConfig, scfg: StepConfig, optimizer: optax.GradientTransformation
):
    """One update on one mini-batch. Pure; jit with donate_argnums=0."""
    B, N = batch.response_mask.shape
    M = scfg.micro_batches
    if B % M:
        raise ValueError(f"mini-batch of {B} rows does not split into {M} micro-batches")
    max_len = scfg.max_len or N
    if max_len < N:
        raise ValueError(f"StepConfig.max_len={max_len} is shorter than the batch's {N} response columns")
    count_mask = batch.response_mask
    if scfg.aggregation in losses.COUNTS_SAMPLED_ROWS and batch.sampled_rows is not None:
        count_mask = batch.sampled_rows[:, None]  # a row counts once, whatever its loss mask
    denom = losses.aggregation_denominator(scfg.aggregation, count_mask.astype(jnp.float32), max_len=max_len)
    denom = jnp.maximum(denom, 1e-8)
    micro = jax.tree.map(lambda x: x.reshape((M, B // M) + x.shape[1:]), batch)
    grad_fn = jax.value_and_grad(
        functools.partial(_micro_loss, cfg=cfg, scfg=scfg, n_response=N, max_len=max_len), has_aux=True
    )

    def accumulate(carry, mb):
        g_acc, l_acc, m_acc = carry
        (loss, (metrics, logp)), g = grad_fn(state.params, mb, denom)
        # the loss terms (numerator / global denominator) are exact partial sums over micro-batches
        return (jax.tree.map(jnp.add, g_acc, g), l_acc + loss, jax.tree.map(jnp.add, m_acc, metrics)), logp

    zeros_g = jax.tree.map(jnp.zeros_like, state.params)
    _, (m_shape, _) = jax.eval_shape(grad_fn, state.params, jax.tree.map(lambda x: x[0], micro), denom)[0]
    zeros_m = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), m_shape)
    (grads, loss, metrics), logp = jax.lax.scan(accumulate, (zeros_g, jnp.float32(0), zeros_m), micro)
    # the diagnostics on the whole mini-batch: maxima, minima and token means as with micro_batches=1
    metrics.update(batch_metrics(logp.reshape(B, N), batch, scfg))
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, new_opt = optimizer.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    new_state = TrainState(
        keep(new_params, state.params), keep(new_opt, state.opt_state), state.step + finite.astype(state.step.dtype)
    )
    metrics = dict(
        metrics,
        **{
            "actor/loss": loss,
            "actor/grad_norm": grad_norm,
            "actor/skipped": 1.0 - finite.astype(jnp.float32),
            "actor/tokens": jnp.sum(batch.response_mask),
        },
    )
    return new_state, metrics


def sft_loss(params, cfg: ModelConfig, tokens, valid, loss_mask, remat: bool = False):
    """Token-mean cross-entropy on the positions marked by loss_mask [B, T] (mask of targets)."""
    targets = jnp.roll(tokens, -1, axis=1)
    lp = token_logprobs(params, cfg, tokens, valid, targets, remat=remat)
    m = jnp.roll(loss_mask, -1, axis=1).at[:, -1].set(False).astype(jnp.float32)
    return -jnp.sum(lp * m) / jnp.maximum(jnp.sum(m), 1.0)


def sft_step(state: TrainState, tokens, valid, loss_mask, *, cfg: ModelConfig, optimizer: optax.GradientTransformation):
    loss, grads = jax.value_and_grad(sft_loss)(state.params, cfg, tokens, valid, loss_mask)
    updates, new_opt = optimizer.update(grads, state.opt_state, state.params)
    return TrainState(optax.apply_updates(state.params, updates), new_opt, state.step + 1), {
        "sft/loss": loss,
        "sft/grad_norm": optax.tree.norm(grads),
    }
