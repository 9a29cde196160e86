"""The update stage: advantages -> reference / old log-probs -> PPO epochs of mini-batch steps.

Pure helpers around the jitted ``rl.step.train_step``: ``build_rl_batch`` assembles the
training arrays from a step's rollouts, ``trim_padding`` drops the columns that are padding in
every row, ``policy_update`` runs ``epochs x mini_batches`` steps
with whole groups kept together (the permutation is seeded by (seed, step, epoch), so a resumed
run repeats it), and ``update_metrics`` combines the steps' metrics.
"""

from __future__ import annotations

from typing import Callable

import jax
import numpy as np

from clipo_jax.rl.step import RLBatch


def build_rl_batch(
    out, advantages: np.ndarray, valid_rows: np.ndarray, mask_truncated: bool, old_logp=None, ref_logp=None
) -> RLBatch:
    """[B, Tp + N] tokens / validity, the response mask (DAPO padding groups and, optionally,
    truncated responses carry no loss) and the per-token arrays of the loss."""
    tokens = np.concatenate([out.prompt_tokens, out.tokens], 1)
    valid = np.concatenate([out.prompt_mask, out.response_mask], 1)
    resp_mask = out.response_mask & valid_rows[:, None]
    if mask_truncated:
        resp_mask = resp_mask & ~out.truncated[:, None]
    zeros = np.zeros_like(out.logprobs)
    return RLBatch(
        tokens,
        valid,
        resp_mask,
        advantages.astype(np.float32),
        zeros if old_logp is None else old_logp,
        zeros if ref_logp is None else ref_logp,
        out.logprobs,
        np.asarray(valid_rows, bool),
    )


def sampled_tokens(out, valid_rows: np.ndarray, width: int) -> np.ndarray:
    """[B, width] bool: the response tokens of the sampled rows (not DAPO's padding copies),
    truncated responses included. The KL in the reward penalises every token the policy sampled:
    a truncated response that ``mask_truncated`` leaves out of the loss still enters its group's
    baseline through its reward. ``width``: the response columns kept by ``trim_padding``."""
    return (out.response_mask & valid_rows[:, None])[:, :width]


def trim_padding(batch: RLBatch, multiple: int) -> RLBatch:
    """The batch without the columns that are padding in every row: the left padding of the
    prompts (left-padded to the rollout's fixed prompt width) and the response columns past the
    longest response (padded to max_new_tokens). Each kept width is rounded up to a multiple of
    ``multiple`` (capped at the full width), so a run meets a few shapes and compiles the
    log-prob and train steps once for each. ``multiple`` <= 0 keeps the batch as it is.

    Lossless: positions come from ``valid`` (cumulative count), attention is causal and masked,
    so the kept columns' log-probs are those of the full batch. The aggregations' constant length
    (Dr. GRPO) is the response budget, passed separately (``StepConfig.max_len``)."""
    if multiple <= 0:
        return batch
    T, N = batch.tokens.shape[1], batch.response_mask.shape[1]
    Tp = T - N
    cols = np.asarray(batch.valid).any(0)
    prompt_cols, resp_cols = np.flatnonzero(cols[:Tp]), np.flatnonzero(cols[Tp:])
    used_p = Tp - int(prompt_cols[0]) if len(prompt_cols) else 1  # the last prompt column predicts token 0
    used_n = int(resp_cols[-1]) + 1 if len(resp_cols) else 1
    keep_p = min(Tp, -(-max(used_p, 1) // multiple) * multiple)
    keep_n = min(N, -(-used_n // multiple) * multiple)
    if keep_p == Tp and keep_n == N:
        return batch
    seq = slice(Tp - keep_p, Tp + keep_n)
    return RLBatch(
        batch.tokens[:, seq],
        batch.valid[:, seq],
        batch.response_mask[:, :keep_n],
        batch.advantages,
        batch.old_logp[:, :keep_n],
        batch.ref_logp[:, :keep_n],
        batch.sampler_logp[:, :keep_n],
        batch.sampled_rows,
    )


def sequence_logprobs(
    logp_fn: Callable, params_by_name: dict, tokens, valid, place: Callable, to_host: Callable, chunks: int = 1
):
    """Log-probs of the responses under each named parameter set (reference, old policy), with
    each chunk's token arrays placed on the mesh once for all passes. Returns {name: [B, N] host
    array}. chunks > 1 runs the B rows as that many equal passes (config.rl.logprob_chunks): at
    paper scale one pass over every row of a step does not fit a device (experiments/plan_scale)."""
    if not params_by_name:
        return {}
    rows = len(tokens)
    if chunks < 1 or rows % chunks:
        raise ValueError(f"{rows} rows do not split into {chunks} log-prob chunks")
    out: dict[str, list] = {name: [] for name in params_by_name}
    for rows_c in np.split(np.arange(rows), chunks):
        tokens_d, valid_d = place((tokens[rows_c], valid[rows_c]))
        for name, p in params_by_name.items():
            out[name].append(to_host(logp_fn(p, tokens_d, valid_d)))
    return {name: np.concatenate(parts) for name, parts in out.items()}


def policy_update(
    state,
    batch: RLBatch,
    *,
    step_fn: Callable,
    place: Callable,
    to_host: Callable,
    epochs: int,
    mini_batches: int,
    group_size: int,
    seed: int,
    step: int,
):
    """``epochs`` passes of ``mini_batches`` jitted steps over whole groups. Returns the new state
    and the list of each step's metrics (host)."""
    rows = len(batch.advantages)
    per_mb = rows // mini_batches
    step_metrics = []
    for epoch in range(epochs):
        perm = np.random.default_rng([seed, step, epoch]).permutation(rows // group_size)
        order = (perm[:, None] * group_size + np.arange(group_size)).reshape(-1)
        for mb in range(mini_batches):
            idx = order[mb * per_mb : (mb + 1) * per_mb]
            state, sm = step_fn(state, place(jax.tree.map(lambda x: x[idx], batch)))
            step_metrics.append(sm)  # fetched once at the end: a fetch per step would stall the queue
    return state, to_host(step_metrics)


def _reduction(key: str) -> str:
    """How a step metric combines over the steps of one update: extremes by max / min, the skip
    flags by count, everything else by mean."""
    if key == "actor/skipped":
        return "sum"
    leaf = key.rsplit("/", 1)[-1]
    if leaf.endswith("_max") or leaf.startswith("max_"):
        return "max"
    if leaf.endswith("_min") or leaf.startswith("min_"):
        return "min"
    return "mean"


_COMBINE = {"sum": sum, "max": max, "min": min, "mean": lambda xs: sum(xs) / len(xs)}


def update_metrics(step_metrics: list[dict]) -> dict[str, float]:
    """Each metric over the steps of one update: the mean, except the extremes (``*_max``,
    ``max_*``: the largest; ``*_min``, ``min_*``: the smallest) and ``actor/skipped``, the number
    of steps whose loss or gradient was not finite (skipped by ``train_step``)."""
    values: dict[str, list[float]] = {}
    for sm in step_metrics:
        for k, v in sm.items():
            values.setdefault(k, []).append(float(v))
    return {k: _COMBINE[_reduction(k)](xs) for k, xs in values.items()}


def skipped_steps(step_metrics: list[dict]) -> int:
    return int(sum(float(s["actor/skipped"]) for s in step_metrics))
