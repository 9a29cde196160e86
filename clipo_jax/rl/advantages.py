"""Critic-free advantage estimators for grouped rollouts (GRPO family).

A batch holds P prompts x G responses laid out as contiguous groups: rows
``[p*G, (p+1)*G)`` are the G responses to prompt p, so ``rewards[B]`` with
``B = P*G``. Every estimator returns one scalar advantage per response; the policy
loss broadcasts it over that response's tokens.

An optional ``valid[B]`` mask marks real responses. Invalid rows (padding added by
dynamic sampling, failed generations) are left out of every statistic and get
advantage 0, so they never move the gradient.

Extend by writing ``fn(rewards[P, G], valid[P, G], **opts) -> [P, G]`` and decorating
it with ``@register_advantage("name")``.
"""

from __future__ import annotations

from typing import Callable

import jax.numpy as jnp

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "UnknownNameError",
    "compute_advantages",
    "lookup",
    "register_advantage",
]

# std is in the denominator; the same epsilon as the torch reference implementations.
STD_EPS = 1e-6


class UnknownNameError(ValueError):
    """A registry lookup with a name that is not registered."""


def lookup(registry: dict, name: str, what: str):
    """Returns ``registry[name]`` or raises a one-line UnknownNameError listing valid names."""
    try:
        return registry[name]
    except (KeyError, TypeError):
        valid = ", ".join(sorted(registry))
        raise UnknownNameError(f"unknown {what} {name!r}; valid names: {valid}") from None


ADVANTAGE_ESTIMATORS: dict[str, Callable] = {}


def register_advantage(name: str):
    """Decorator: ``@register_advantage("my_adv")`` adds ``fn(rewards[P,G], valid[P,G], **opts)``."""

    def deco(fn):
        ADVANTAGE_ESTIMATORS[name] = fn
        return fn

    return deco


def compute_advantages(
    name: str,
    rewards,
    group_size: int,
    *,
    valid=None,
    **opts,
) -> jnp.ndarray:
    """Advantages ``[batch]`` from rewards ``[batch]`` grouped in contiguous blocks.

    Args:
      name: estimator name in ADVANTAGE_ESTIMATORS (grpo, dr_grpo, rloo, reinforce_pp).
      rewards: ``[batch]`` scalar reward per response, ``batch = prompts * group_size``.
      group_size: responses per prompt (static under jit).
      valid: optional ``[batch]`` bool/0-1 mask of real responses; invalid rows are
        excluded from group and batch statistics and get advantage 0.
      **opts: estimator options (e.g. ``norm_by_std=False`` for grpo).
    Returns:
      ``[batch]`` float32 advantages.
    """
    fn = lookup(ADVANTAGE_ESTIMATORS, name, "advantage estimator")
    rewards = jnp.asarray(rewards, jnp.float32)
    if rewards.ndim != 1:
        raise ValueError(f"rewards must be [batch], got shape {rewards.shape}")
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    (batch,) = rewards.shape
    if batch % group_size:
        raise ValueError(f"rewards batch {batch} is not a multiple of group_size {group_size}")
    if valid is None:
        valid = jnp.ones_like(rewards)
    else:
        valid = jnp.asarray(valid).astype(jnp.float32)
        if valid.shape != rewards.shape:
            raise ValueError(f"valid shape {valid.shape} != rewards shape {rewards.shape}")
    grouped = rewards.reshape(-1, group_size)
    grouped_valid = valid.reshape(-1, group_size)
    # Zero invalid rewards so NaN/garbage in padding rows cannot leak into statistics.
    grouped = jnp.where(grouped_valid > 0, grouped, 0.0)
    adv = fn(grouped, grouped_valid, **opts)
    return (adv * grouped_valid).reshape(batch).astype(jnp.float32)


def _group_mean_std(rewards, valid):
    """Masked per-group mean and unbiased (ddof=1) std, each ``[P, 1]``.

    Groups with fewer than two valid responses get mean 0 and std 1, the convention of
    the torch references: a lone response keeps its raw reward as advantage.
    """
    n = valid.sum(axis=1, keepdims=True)
    mean = (rewards * valid).sum(axis=1, keepdims=True) / jnp.maximum(n, 1.0)
    var = (((rewards - mean) * valid) ** 2).sum(axis=1, keepdims=True) / jnp.maximum(n - 1.0, 1.0)
    lone = n < 2
    return jnp.where(lone, 0.0, mean), jnp.where(lone, 1.0, jnp.sqrt(var))


@register_advantage("grpo")
def grpo(rewards, valid, *, norm_by_std: bool = True, eps: float = STD_EPS):
    """A = (r - mean_g) / (std_g + eps) with ddof=1; ``norm_by_std=False`` drops the std."""
    mean, std = _group_mean_std(rewards, valid)
    adv = rewards - mean
    if norm_by_std:
        adv = adv / (std + eps)
    return adv


@register_advantage("dr_grpo")
def dr_grpo(rewards, valid):
    """A = r - mean_g (Dr. GRPO: no std normalisation; pair with seq_mean_token_sum_norm)."""
    mean, _ = _group_mean_std(rewards, valid)
    return rewards - mean


@register_advantage("rloo")
def rloo(rewards, valid):
    """Leave-one-out baseline: A_i = r_i - mean_{j != i in group} r_j.

    A group with a single valid response has no other sample, so its baseline is 0.
    """
    n = valid.sum(axis=1, keepdims=True)
    total = (rewards * valid).sum(axis=1, keepdims=True)
    baseline = (total - rewards) / jnp.maximum(n - 1.0, 1.0)
    return rewards - jnp.where(n < 2, 0.0, baseline)


@register_advantage("reinforce_pp")
def reinforce_pp(rewards, valid, *, eps: float = STD_EPS):
    """REINFORCE++ baseline: subtract the group mean, then whiten over the whole batch.

    Batch statistics are over valid responses (one weight per response), std with ddof=1;
    a batch with fewer than two valid responses is left unnormalised (mean 0, std 1).
    """
    mean, _ = _group_mean_std(rewards, valid)
    centred = rewards - mean
    # The whole batch as one group: same ddof=1 and lone-response convention.
    batch_mean, batch_std = _group_mean_std(centred.reshape(1, -1), valid.reshape(1, -1))
    return (centred - batch_mean) / (batch_std + eps)
