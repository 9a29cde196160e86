"""DAPO extras: dynamic sampling (group std filter + refill), overlong shaping, truncation mask.

Dynamic sampling runs on the host between rollout rounds (numpy); the mask helper is
plain array arithmetic and works on numpy or jax arrays.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import numpy as np

__all__ = [
    "DynamicSamplingError",
    "DynamicSamplingResult",
    "dynamic_sample",
    "group_std_filter",
    "overlong_penalty",
    "truncation_mask",
]

ON_SHORT = ("return", "pad", "raise")


class DynamicSamplingError(ValueError):
    """Bad rollout batches for dynamic sampling, or a batch still short with on_short='raise'."""


def group_std_filter(rewards, group_size: int, min_std: float = 0.0) -> np.ndarray:
    """Which groups carry signal: ``keep[prompts]`` bool.

    A group is kept when its rewards are not all identical and their (population) std
    exceeds ``min_std``. Testing "not all identical" exactly keeps float round-off in
    the mean (e.g. three rewards of 0.1) from passing a no-signal group. Filtering on
    std rather than mean also works for continuous rewards (contrastive, rubric).

    Args:
      rewards: ``[batch]`` with ``batch = prompts * group_size``, contiguous groups.
    """
    rewards = np.asarray(rewards, dtype=np.float64)
    if rewards.ndim != 1 or group_size < 1 or rewards.shape[0] % group_size:
        raise DynamicSamplingError(
            f"rewards must be [prompts*group_size] with group_size={group_size}, got shape {rewards.shape}"
        )
    bad = np.flatnonzero(~np.isfinite(rewards))
    if bad.size:
        raise DynamicSamplingError(f"non-finite reward at row {int(bad[0])} ({bad.size} rows in total)")
    grouped = rewards.reshape(-1, group_size)
    spread = grouped.max(axis=1) > grouped.min(axis=1)
    return spread & (grouped.std(axis=1) > min_std)


@dataclasses.dataclass
class DynamicSamplingResult:
    """Output of ``dynamic_sample``.

    batch: the arrays of the kept groups, ``[n_groups * group_size, ...]`` each; with
      on_short='pad' always ``target_groups`` groups.
    valid: ``[rows]`` bool, False on padding rows (pass to compute_advantages and zero
      their loss mask).
    full: whether ``target_groups`` real groups were collected.
    rounds: how many times the sampler was called (1 + extra rounds drawn).
    groups_sampled / groups_kept / groups_dropped: groups seen, used, filtered out for no
      signal; groups_surplus: kept-able groups discarded because the batch was full;
      groups_padded: padding groups appended (on_short='pad').
    """

    batch: dict
    valid: np.ndarray
    full: bool
    rounds: int
    groups_sampled: int
    groups_kept: int
    groups_dropped: int
    groups_surplus: int
    groups_padded: int

    def metrics(self) -> dict:
        """Scalar counters for the metrics writer."""
        return {
            "dynamic_sampling/rounds": self.rounds,
            "dynamic_sampling/groups_sampled": self.groups_sampled,
            "dynamic_sampling/groups_kept": self.groups_kept,
            "dynamic_sampling/groups_dropped": self.groups_dropped,
            "dynamic_sampling/groups_surplus": self.groups_surplus,
            "dynamic_sampling/groups_padded": self.groups_padded,
            "dynamic_sampling/full": float(self.full),
        }


def _rows_of(batch: Mapping[str, Any], key: str, round_idx: int) -> int:
    if key not in batch:
        raise DynamicSamplingError(f"sampled batch (round {round_idx}) has no {key!r} field")
    rows = np.asarray(batch[key]).shape[0]
    for name, value in batch.items():
        if np.asarray(value).shape[:1] != (rows,):
            raise DynamicSamplingError(
                f"field {name!r} (round {round_idx}) has leading dim {np.shape(value)[:1]}, expected {rows}"
            )
    return rows


def dynamic_sample(
    sample_fn: Callable[[int], Mapping[str, Any]],
    *,
    target_groups: int,
    group_size: int,
    max_rounds: int,
    min_std: float = 0.0,
    on_short: str = "return",
    rewards_key: str = "rewards",
) -> DynamicSamplingResult:
    """Draw rollout rounds until ``target_groups`` groups with reward spread are kept.

    Args:
      sample_fn: ``sample_fn(round_idx) -> dict`` of arrays with a common leading dim
        ``[groups * group_size]`` in contiguous groups, including ``rewards_key``.
      target_groups: groups wanted in the training batch.
      group_size: responses per prompt.
      max_rounds: extra rounds allowed after the first (total calls <= 1 + max_rounds).
      min_std: see ``group_std_filter``.
      on_short: what to do if the batch is not full after the last round:
        'return' the kept groups as they are (fewer rows, ``full=False``);
        'pad' up to target_groups with copies of sampled groups marked ``valid=False``
        (static shapes for jit; the caller must zero their loss mask);
        'raise' DynamicSamplingError.
    Surplus kept groups from the last round are discarded (counted).
    """
    if on_short not in ON_SHORT:
        raise DynamicSamplingError(f"on_short must be one of {ON_SHORT}, got {on_short!r}")
    if target_groups < 1 or max_rounds < 0:
        raise DynamicSamplingError(f"need target_groups >= 1 and max_rounds >= 0, got {target_groups}, {max_rounds}")
    kept: list[dict] = []  # one dict of [group_size, ...] arrays per kept group
    fallback: dict | None = None  # one sampled group, to copy as padding
    sampled = dropped = surplus = rounds = 0
    keys = None
    while rounds <= max_rounds and len(kept) < target_groups:
        batch = sample_fn(rounds)
        rows = _rows_of(batch, rewards_key, rounds)
        if keys is None:
            keys = set(batch)
        elif set(batch) != keys:
            raise DynamicSamplingError(f"round {rounds} fields {sorted(batch)} differ from round 0 {sorted(keys)}")
        if rows == 0 or rows % group_size:
            raise DynamicSamplingError(f"round {rounds} has {rows} rows, not a positive multiple of {group_size}")
        keep = group_std_filter(batch[rewards_key], group_size, min_std)
        rounds += 1
        sampled += keep.size
        dropped += int((~keep).sum())
        for g in np.flatnonzero(keep):
            group = {k: np.asarray(v)[g * group_size : (g + 1) * group_size] for k, v in batch.items()}
            if len(kept) < target_groups:
                kept.append(group)
            else:
                surplus += 1
        if fallback is None:
            fallback = {k: np.asarray(v)[:group_size] for k, v in batch.items()}
    full = len(kept) == target_groups
    n_real = len(kept)
    padded = 0
    if not full:
        if on_short == "raise":
            raise DynamicSamplingError(
                f"only {n_real}/{target_groups} groups with reward spread after {rounds} rounds "
                f"({dropped} of {sampled} groups had no spread)"
            )
        if on_short == "pad":
            padded = target_groups - n_real
            kept.extend([fallback] * padded)
    if kept:
        out = {k: np.concatenate([g[k] for g in kept], axis=0) for k in keys}
    else:  # on_short == 'return' with nothing kept: empty arrays of the right trailing shape
        out = {k: fallback[k][:0] for k in keys}
    valid = np.repeat(np.arange(len(kept)) < n_real, group_size)
    return DynamicSamplingResult(
        batch=out,
        valid=valid,
        full=full,
        rounds=rounds,
        groups_sampled=sampled,
        groups_kept=n_real,
        groups_dropped=dropped,
        groups_surplus=surplus,
        groups_padded=padded,
    )


def overlong_penalty(lengths, max_len: int, cache_len: int) -> np.ndarray:
    """DAPO soft overlong punishment, counted in response tokens: ``[batch]`` float32.

    0 for length <= max_len - cache_len; -(length - (max_len - cache_len)) / cache_len
    inside the window; -1 beyond max_len. Add it to the task reward.

    Args:
      lengths: ``[batch]`` response lengths in tokens (e.g. ``response_mask.sum(-1)``).
      max_len: L_max, the response token budget.
      cache_len: L_c, the width of the soft window (0 < cache_len <= max_len).
    """
    if not 0 < cache_len <= max_len:
        raise ValueError(
            f"overlong shaping needs 0 < cache_len <= max_len, got cache_len={cache_len}, max_len={max_len}"
        )
    lengths = np.asarray(lengths, dtype=np.float64)
    if np.any(lengths < 0):
        raise ValueError(f"negative response length at row {int(np.flatnonzero(lengths < 0)[0])}")
    start = max_len - cache_len
    penalty = -np.clip((lengths - start) / cache_len, 0.0, 1.0)
    return penalty.astype(np.float32)


def truncation_mask(response_mask, truncated):
    """Zero the loss mask of truncated responses (DAPO's optional overlong filtering).

    Args:
      response_mask: ``[batch, seq]`` (numpy or jax).
      truncated: ``[batch]`` bool, True where the response hit the length limit without EOS.
    Returns:
      ``(mask[batch, seq], n_masked)`` where n_masked counts the responses removed.
    """
    if not hasattr(truncated, "shape"):
        truncated = np.asarray(truncated)
    if truncated.shape != response_mask.shape[:1]:
        raise ValueError(f"truncated shape {truncated.shape} != batch of response_mask {response_mask.shape}")
    truncated = truncated != 0
    keep = 1 - truncated.astype(response_mask.dtype)
    return response_mask * keep[:, None], truncated.sum()
