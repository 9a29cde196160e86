"""RLVR core: advantage estimators, policy losses, KL, aggregation, entropy, DAPO extras.

Each family is a small string -> function registry; see advantages.py and losses.py for
how to add one.
"""

from clipo_jax.rl.advantages import (
    ADVANTAGE_ESTIMATORS,
    UnknownNameError,
    compute_advantages,
    register_advantage,
)
from clipo_jax.rl.dapo import (
    DynamicSamplingError,
    DynamicSamplingResult,
    dynamic_sample,
    group_std_filter,
    overlong_penalty,
    truncation_mask,
)
from clipo_jax.rl.losses import (
    AGGREGATIONS,
    KL_ESTIMATORS,
    POLICY_LOSSES,
    aggregate,
    aggregated_loss,
    aggregation_denominator,
    kl_penalty,
    kl_reward_penalty,
    logprob_gap_metrics,
    masked_mean,
    microbatch_loss,
    policy_loss,
    register_aggregation,
    register_kl,
    register_policy_loss,
    safe_divide,
    tis_weights,
    token_entropy,
)

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "AGGREGATIONS",
    "DynamicSamplingError",
    "DynamicSamplingResult",
    "KL_ESTIMATORS",
    "POLICY_LOSSES",
    "UnknownNameError",
    "aggregate",
    "aggregated_loss",
    "aggregation_denominator",
    "compute_advantages",
    "dynamic_sample",
    "group_std_filter",
    "kl_penalty",
    "kl_reward_penalty",
    "logprob_gap_metrics",
    "masked_mean",
    "microbatch_loss",
    "overlong_penalty",
    "policy_loss",
    "register_advantage",
    "register_aggregation",
    "register_kl",
    "register_policy_loss",
    "safe_divide",
    "tis_weights",
    "token_entropy",
    "truncation_mask",
]
