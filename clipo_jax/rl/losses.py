"""Policy losses, KL penalties, loss aggregation, entropy and sampler/trainer IS for RLVR.

Shapes: ``[batch, seq]`` log-probs of the taken response tokens (float32), a response
``mask[batch, seq]`` (1 on response tokens, 0 on prompt/padding), and one advantage per
response ``[batch]`` (``[batch, seq]`` per-token advantages are also accepted where the
loss allows). Everything here is pure jax.numpy and jittable; names pick implementations
from small registries:

* ``POLICY_LOSSES``: ``fn(logp, old_logp, adv[B,1|T], mask, **opts) -> (per_token[B,T], metrics)``
* ``KL_ESTIMATORS``: ``fn(log_r[B,T]) -> [B,T]`` with ``log_r = ref_logp - logp``
* ``AGGREGATIONS``: ``fn(per_token, mask, max_len) -> (numerator, denominator)``

Aggregation returns a numerator and a denominator instead of a mean so that gradient
accumulation is exact: sum numerators over micro-batches, compute the denominator once
over the whole mini-batch (``aggregation_denominator``), divide once.

Sequence-level losses (gspo, gmpo) return per-token terms too. They are built so that
``seq_mean_token_mean`` reproduces the paper objective exactly (a mean over responses);
every aggregation here weights the tokens of one response equally, so under
``token_mean`` the same losses weight each response by its length instead.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from clipo_jax.rl.advantages import lookup

__all__ = [
    "AGGREGATIONS",
    "KL_ESTIMATORS",
    "POLICY_LOSSES",
    "aggregate",
    "aggregated_loss",
    "aggregation_denominator",
    "kl_penalty",
    "kl_reward_penalty",
    "logprob_gap_metrics",
    "masked_mean",
    "microbatch_loss",
    "policy_loss",
    "register_aggregation",
    "register_kl",
    "register_policy_loss",
    "safe_divide",
    "tis_weights",
    "token_entropy",
]

# Token log-ratios are clamped before exp so one wild token cannot overflow float32
# (exp(20) ~ 5e8); the common torch implementations use the same bound.
LOG_RATIO_CLAMP = 20.0

sg = jax.lax.stop_gradient


# ----------------------------------------------------------------------------- helpers


def masked_mean(x, mask):
    """Mean of ``x`` over positions where ``mask`` is set; 0 when the mask is empty."""
    mask = jnp.asarray(mask, jnp.float32)
    return jnp.where(mask > 0, x, 0.0).sum() / jnp.maximum(mask.sum(), 1.0)


def _masked_max(x, mask):
    return jnp.where(mask.sum() > 0, jnp.where(mask > 0, x, -jnp.inf).max(), 0.0)


def safe_divide(numerator, denominator):
    """``numerator / denominator`` with an empty denominator giving 0 (all denominators are counts)."""
    return numerator / jnp.maximum(denominator, 1.0)


def _check_tokens(name: str, x, shape=None):
    x = jnp.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name} must be [batch, seq], got shape {x.shape}")
    if shape is not None and x.shape != shape:
        raise ValueError(f"{name} shape {x.shape} != logp shape {shape}")
    return x


def _log_ratio(logp, old_logp, mask):
    """``log pi - log pi_old`` clamped, 0 off the mask (padding may hold -inf/NaN)."""
    diff = jnp.where(mask > 0, logp - old_logp, 0.0)
    return jnp.clip(diff, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)


def _seq_mean(x, mask):
    """Per-response mean over its tokens, ``[batch, 1]``; empty responses give 0."""
    return jnp.where(mask > 0, x, 0.0).sum(axis=1, keepdims=True) / jnp.maximum(mask.sum(axis=1, keepdims=True), 1.0)


def _ppo_k3(log_ratio, mask):
    # KL(pi_old || pi) estimate on tokens sampled from pi_old, the usual "approx_kl" diagnostic:
    # Schulman's k3 = (r - 1) - log r with r = pi / pi_old, i.e. of log r = logp - old_logp.
    return masked_mean(_k3(log_ratio), mask)


# ------------------------------------------------------------------------ policy losses

POLICY_LOSSES: dict[str, Callable] = {}


def register_policy_loss(name: str):
    """Decorator: ``@register_policy_loss("x")`` adds ``fn(logp, old_logp, adv, mask, **opts)``.

    ``adv`` arrives as ``[batch, 1]`` (per response) or ``[batch, seq]`` (per token); the fn
    returns ``(per_token_loss[batch, seq], metrics)`` with zeros off the mask.
    """

    def deco(fn):
        POLICY_LOSSES[name] = fn
        return fn

    return deco


def policy_loss(name, logp, old_logp, advantages, mask, *, is_weights=None, **opts):
    """Per-token policy loss (to be minimised) and scalar metrics.

    Args:
      name: loss in POLICY_LOSSES (ppo_clip, gspo, gmpo, cispo).
      logp: ``[batch, seq]`` log pi(a_t) under the current params (differentiated).
      old_logp: ``[batch, seq]`` log pi_old(a_t), the policy that sampled (constant).
      advantages: ``[batch]`` per response or ``[batch, seq]`` per token.
      mask: ``[batch, seq]`` response-token mask.
      is_weights: optional ``[batch, seq]`` sampler->trainer importance weights (e.g.
        ``tis_weights``) multiplied into the per-token loss, gradient stopped.
      **opts: loss options (eps_low, eps_high, dual_clip, ...).
    Returns:
      ``(per_token_loss[batch, seq], metrics)``: zero off the mask; aggregate it with
      ``aggregate``. Metrics are masked means (clip_frac, ratio_mean, ratio_max, approx_kl).
    """
    fn = lookup(POLICY_LOSSES, name, "policy loss")
    logp = _check_tokens("logp", logp).astype(jnp.float32)
    old_logp = _check_tokens("old_logp", old_logp, logp.shape).astype(jnp.float32)
    mask = _check_tokens("mask", mask, logp.shape).astype(jnp.float32)
    adv = jnp.asarray(advantages, jnp.float32)
    if adv.shape == logp.shape[:1]:
        adv = adv[:, None]
    elif adv.shape != logp.shape:
        raise ValueError(f"advantages shape {adv.shape} must be [batch] or [batch, seq] = {logp.shape}")
    loss, metrics = fn(logp, sg(old_logp), sg(adv), mask, **opts)
    if is_weights is not None:
        is_weights = _check_tokens("is_weights", is_weights, logp.shape).astype(jnp.float32)
        loss = loss * sg(is_weights)
    return jnp.where(mask > 0, loss, 0.0), metrics


def _eps_pair(eps_low, eps_high):
    eps_high = eps_low if eps_high is None else eps_high
    if not (eps_low >= 0 and eps_high >= 0):
        raise ValueError(f"clip epsilons must be >= 0, got eps_low={eps_low}, eps_high={eps_high}")
    return eps_low, eps_high


@register_policy_loss("ppo_clip")
def ppo_clip(logp, old_logp, adv, mask, *, eps_low=0.2, eps_high=None, dual_clip=3.0):
    """PPO clipped surrogate per token: -min(rho*A, clip(rho, 1-eps_low, 1+eps_high)*A).

    ``eps_high`` defaults to ``eps_low``; DAPO's clip-higher sets it to 0.28. ``dual_clip=c``
    additionally caps the loss of negative-advantage tokens at ``c*|A|`` (None disables).
    """
    eps_low, eps_high = _eps_pair(eps_low, eps_high)
    log_ratio = _log_ratio(logp, old_logp, mask)
    ratio = jnp.exp(log_ratio)
    surr = -adv * ratio
    surr_clipped = -adv * jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high)
    loss = jnp.maximum(surr, surr_clipped)
    metrics = {}
    if dual_clip is not None:
        if dual_clip <= 1.0:
            raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
        capped = jnp.minimum(loss, -dual_clip * adv)
        dual_active = (adv < 0) & (loss > -dual_clip * adv)
        loss = jnp.where(adv < 0, capped, loss)
        metrics["dual_clip_frac"] = masked_mean(dual_active, mask)
    metrics.update(
        clip_frac=masked_mean(surr_clipped > surr, mask),
        clip_frac_low=masked_mean((ratio < 1.0 - eps_low) & (adv < 0), mask),
        clip_frac_high=masked_mean((ratio > 1.0 + eps_high) & (adv > 0), mask),
        ratio_mean=masked_mean(ratio, mask),
        ratio_max=_masked_max(ratio, mask),
        approx_kl=_ppo_k3(log_ratio, mask),
    )
    return loss, metrics


@register_policy_loss("gspo")
def gspo(logp, old_logp, adv, mask, *, eps_low=3e-4, eps_high=4e-4):
    """GSPO: clip the length-normalised sequence ratio s_i = exp(mean_t log rho_t).

    Written in the token form: each token carries ``s_i,t = sg(s_i) * pi_t / sg(pi_t)``,
    whose value is s_i and whose gradient is s_i * grad log pi_t, so every token of the
    response receives gradient. Aggregated with ``seq_mean_token_mean`` this equals the
    paper's -mean_i min(s_i A_i, clip(s_i) A_i) in value and gradient.
    """
    eps_low, eps_high = _eps_pair(eps_low, eps_high)
    log_ratio = _log_ratio(logp, old_logp, mask)
    seq_log_ratio = _seq_mean(log_ratio, mask)  # [B, 1]
    token_grad_path = jnp.where(mask > 0, logp - sg(logp), 0.0)
    ratio = jnp.exp(sg(seq_log_ratio) + token_grad_path)
    surr = -adv * ratio
    surr_clipped = -adv * jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high)
    loss = jnp.maximum(surr, surr_clipped)
    has_tokens = (mask.sum(axis=1) > 0).astype(jnp.float32)
    seq_ratio = jnp.exp(seq_log_ratio[:, 0])
    metrics = dict(
        clip_frac=masked_mean(surr_clipped > surr, mask),
        ratio_mean=masked_mean(seq_ratio, has_tokens),
        ratio_max=_masked_max(seq_ratio, has_tokens),
        approx_kl=_ppo_k3(log_ratio, mask),
    )
    return loss, metrics


@register_policy_loss("gmpo")
def gmpo(logp, old_logp, adv, mask, *, eps_low=0.4, eps_high=0.4):
    """GMPO: geometric mean of token ratios, clipped per token in log space.

    Per response: g_i = exp(mean_t l_t) with l_t = min(log rho_t, clip(log rho_t, -eps_low,
    eps_high)) for A_i > 0 and max(...) for A_i < 0 (the sign-aware pessimistic bound);
    loss_i = -A_i g_i. Every token of the response carries loss_i, so
    ``seq_mean_token_mean`` gives mean_i loss_i. Needs per-response advantages.
    """
    if adv.shape[1] != 1:
        raise ValueError("gmpo needs per-response advantages [batch], got per-token [batch, seq]")
    eps_low, eps_high = _eps_pair(eps_low, eps_high)
    log_ratio = _log_ratio(logp, old_logp, mask)
    sign = jnp.sign(adv)  # [B, 1]
    clipped = jnp.clip(log_ratio, -eps_low, eps_high)
    log_term = sign * jnp.minimum(sign * log_ratio, sign * clipped)
    seq_ratio = jnp.exp(_seq_mean(log_term, mask))  # [B, 1]
    loss = jnp.broadcast_to(-adv * seq_ratio, logp.shape)
    has_tokens = (mask.sum(axis=1) > 0).astype(jnp.float32)
    metrics = dict(
        clip_frac=masked_mean((sign * clipped < sign * log_ratio), mask),
        ratio_mean=masked_mean(seq_ratio[:, 0], has_tokens),
        ratio_max=_masked_max(seq_ratio[:, 0], has_tokens),
        approx_kl=_ppo_k3(log_ratio, mask),
    )
    return loss, metrics


@register_policy_loss("cispo")
def cispo(logp, old_logp, adv, mask, *, eps_low=1.0, eps_high=0.28):
    """CISPO (MiniMax-M1): -sg(clip(rho, 1-eps_low, 1+eps_high)) * A * log pi per token.

    The weight is clipped, not the update, so clipped tokens still get gradient. The value
    returned is -w*A (the gradient is -w*A*grad log pi). eps_low=1 means no lower bound.
    """
    eps_low, eps_high = _eps_pair(eps_low, eps_high)
    log_ratio = _log_ratio(logp, old_logp, mask)
    ratio = jnp.exp(log_ratio)
    weight = sg(jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high))
    token_grad_path = jnp.exp(jnp.where(mask > 0, logp - sg(logp), 0.0))
    loss = -adv * weight * token_grad_path
    metrics = dict(
        clip_frac=masked_mean((ratio > 1.0 + eps_high) | (ratio < 1.0 - eps_low), mask),
        ratio_mean=masked_mean(ratio, mask),
        ratio_max=_masked_max(ratio, mask),
        approx_kl=_ppo_k3(log_ratio, mask),
    )
    return loss, metrics


# ---------------------------------------------------------------------------------- KL

KL_ESTIMATORS: dict[str, Callable] = {}


def register_kl(name: str):
    """Decorator: ``@register_kl("x")`` adds ``fn(log_r[B,T]) -> [B,T]``, log_r = ref - logp."""

    def deco(fn):
        KL_ESTIMATORS[name] = fn
        return fn

    return deco


@register_kl("k1")
def _k1(log_r):
    return -log_r


@register_kl("k2")
def _k2(log_r):
    return 0.5 * jnp.square(log_r)


@register_kl("k3")
def _k3(log_r):
    # (r - 1) - log r. expm1 avoids the catastrophic cancellation of exp(x) - 1; below
    # |x| = 1e-2 even expm1(x) - x cancels, so use the Taylor series x^2/2 + x^3/6 + x^4/24
    # (truncation error < x^5/120, under float32 resolution there).
    small = jnp.abs(log_r) < 1e-2
    series = jnp.square(log_r) * (0.5 + log_r * (1.0 / 6.0 + log_r / 24.0))
    return jnp.where(small, series, jnp.expm1(log_r) - log_r)


KL_ESTIMATORS["low_var_kl"] = _k3  # the name verl/OpenRLHF configs use


def kl_penalty(name, logp, ref_logp, clamp=None, *, mask=None, max_log_ratio=LOG_RATIO_CLAMP):
    """Per-token KL(pi || pi_ref) estimate ``[batch, seq]`` on the sampled tokens.

    With log r = ref_logp - logp: k1 = -log r, k2 = (log r)^2 / 2, k3 = (r - 1) - log r.
    With ``mask`` (the response mask ``[batch, seq]``) log r is set to 0 off the mask before
    the estimator, so padding that holds NaN/-inf gives 0 there and a finite gradient (a
    masked sum of the estimate alone is not enough: the estimator's own gradient at a NaN
    point is NaN, and 0 * NaN = NaN). ``log r`` is then capped above at ``max_log_ratio`` so
    k3's exp cannot overflow float32 (None disables; the negative side needs no guard:
    expm1 -> -1); ``clamp`` (> 0, or None) finally bounds the estimate to [-clamp, clamp].
    Use as a loss (aggregate it like the policy loss, times beta) or subtract it from the
    reward (``kl_reward_penalty``). Without ``mask`` every position is estimated.
    """
    fn = lookup(KL_ESTIMATORS, name, "KL estimator")
    logp = _check_tokens("logp", logp).astype(jnp.float32)
    ref_logp = _check_tokens("ref_logp", ref_logp, logp.shape).astype(jnp.float32)
    log_r = ref_logp - logp
    if mask is not None:
        mask = _check_tokens("mask", mask, logp.shape)
        log_r = jnp.where(mask > 0, log_r, 0.0)
    if max_log_ratio is not None:
        log_r = jnp.minimum(log_r, max_log_ratio)
    kl = fn(log_r)
    if clamp is not None:
        if clamp <= 0:
            raise ValueError(f"KL clamp must be > 0, got {clamp}")
        kl = jnp.clip(kl, -clamp, clamp)
    return kl


def kl_reward_penalty(rewards, logp, ref_logp, mask, *, beta, name="k1", clamp=None):
    """KL in the reward: ``rewards[B] - beta * sum_t kl_t`` over each response's tokens.

    Returns ``(shaped_rewards[B], metrics)``; the penalty is a constant (gradient stopped),
    so this runs before the advantage estimator. ``kl_seq_mean`` averages over the rows with a
    non-empty mask (the sampled ones), ``kl_token_mean`` over the masked tokens.
    """
    mask = _check_tokens("mask", mask).astype(jnp.float32)
    kl = sg(kl_penalty(name, logp, ref_logp, clamp, mask=mask))
    seq_kl = jnp.where(mask > 0, kl, 0.0).sum(axis=1)
    rewards = jnp.asarray(rewards, jnp.float32)
    rows = (mask > 0).any(axis=1)  # the sampled rows: DAPO's padding copies have an empty mask
    metrics = {"kl_seq_mean": seq_kl.sum() / jnp.maximum(rows.sum(), 1), "kl_token_mean": masked_mean(kl, mask)}
    return rewards - beta * seq_kl, metrics


# --------------------------------------------------------------------------- aggregation

AGGREGATIONS: dict[str, Callable] = {}
# Aggregations whose denominator counts every sampled response, also those the loss mask leaves
# out (truncated ones under rl.mask_truncated): a constant normaliser (Dr. GRPO) must not shrink
# when a batch has more truncations. The trainer passes their denominator the sampled rows.
COUNTS_SAMPLED_ROWS: set[str] = set()


def register_aggregation(name: str, *, counts_sampled_rows: bool = False):
    """Decorator: adds ``fn(per_token[B,T], mask[B,T], max_len) -> (numerator, denominator)``.

    Both must be sums over rows (responses) so that micro-batch parts add up exactly, and
    the denominator must depend on the mask only. ``counts_sampled_rows``: the trainer computes
    the denominator from the sampled responses' mask instead of the loss mask (see
    ``COUNTS_SAMPLED_ROWS``).
    """

    def deco(fn):
        AGGREGATIONS[name] = fn
        if counts_sampled_rows:
            COUNTS_SAMPLED_ROWS.add(name)
        else:
            COUNTS_SAMPLED_ROWS.discard(name)
        return fn

    return deco


def _row_sums(per_token, mask):
    return jnp.where(mask > 0, per_token, 0.0).sum(axis=1), mask.sum(axis=1)


@register_aggregation("token_mean")
def _token_mean(per_token, mask, max_len):
    sums, counts = _row_sums(per_token, mask)
    return sums.sum(), counts.sum()


@register_aggregation("seq_mean_token_mean")
def _seq_mean_token_mean(per_token, mask, max_len):
    sums, counts = _row_sums(per_token, mask)
    return (sums / jnp.maximum(counts, 1.0)).sum(), (counts > 0).sum().astype(jnp.float32)


@register_aggregation("seq_mean_token_sum")
def _seq_mean_token_sum(per_token, mask, max_len):
    sums, counts = _row_sums(per_token, mask)
    return sums.sum(), (counts > 0).sum().astype(jnp.float32)


@register_aggregation("seq_mean_token_sum_norm", counts_sampled_rows=True)
def _seq_mean_token_sum_norm(per_token, mask, max_len):
    sums, counts = _row_sums(per_token, mask)
    return sums.sum() / max_len, (counts > 0).sum().astype(jnp.float32)


def aggregate(name, per_token, mask, *, max_len=None):
    """``(numerator, denominator)`` scalars; the loss is ``numerator / denominator``.

    * token_mean: sum of all masked tokens / number of masked tokens.
    * seq_mean_token_mean: sum_i (token mean of response i) / number of responses.
    * seq_mean_token_sum: sum_i (token sum of response i) / number of responses.
    * seq_mean_token_sum_norm: sum_i (token sum of response i) / max_len / number of
      responses (Dr. GRPO: a constant normaliser). ``max_len`` defaults to seq; in the
      trainer the number of responses is every sampled one (``COUNTS_SAMPLED_ROWS``).
    Responses with an empty mask are not counted. Split micro-batches by rows (never inside
    a response); the denominator depends on the mask only, see ``aggregation_denominator``.
    """
    fn = lookup(AGGREGATIONS, name, "loss aggregation")
    per_token = _check_tokens("per_token", per_token).astype(jnp.float32)
    mask = _check_tokens("mask", mask, per_token.shape).astype(jnp.float32)
    if max_len is None:
        max_len = per_token.shape[1]
    elif max_len <= 0:
        raise ValueError(f"max_len must be > 0, got {max_len}")
    num, den = fn(per_token, mask, float(max_len))
    return num, jnp.asarray(den, jnp.float32)


def aggregation_denominator(name, mask, *, max_len=None):
    """The denominator of ``aggregate`` for a whole mini-batch mask ``[batch, seq]``.

    The trainer computes it once before the micro-batch loop and divides each
    micro-batch numerator by it, which makes accumulated gradients exact.
    """
    mask = jnp.asarray(mask, jnp.float32)
    return aggregate(name, jnp.zeros_like(mask), mask, max_len=max_len)[1]


def aggregated_loss(name, per_token, mask, *, max_len=None):
    """Scalar loss = numerator / denominator (0 when nothing is masked in)."""
    return safe_divide(*aggregate(name, per_token, mask, max_len=max_len))


def microbatch_loss(name, per_token_chunks: Sequence, mask_chunks: Sequence, *, max_len=None):
    """Loss from row-wise micro-batches: ``sum_m num_m / sum_m den_m``.

    Equals ``aggregated_loss`` of the concatenated batch (same ``max_len``); this is the
    accumulation rule the trainer follows (it gets sum_m den_m up front from the mask).
    """
    if len(per_token_chunks) != len(mask_chunks) or not per_token_chunks:
        raise ValueError("need the same positive number of per_token and mask chunks")
    parts = [aggregate(name, x, m, max_len=max_len) for x, m in zip(per_token_chunks, mask_chunks)]
    return safe_divide(sum(p[0] for p in parts), sum(p[1] for p in parts))


# ------------------------------------------------------------------------------ entropy


def token_entropy(logits, mask=None):
    """Entropy of the next-token distribution per position ``[batch, seq]`` in float32.

    Args:
      logits: ``[batch, seq, vocab]`` (any float dtype; -inf entries allowed).
      mask: optional ``[batch, seq]``; positions off the mask return 0.
    """
    logits = jnp.asarray(logits).astype(jnp.float32)
    if logits.ndim != 3:
        raise ValueError(f"logits must be [batch, seq, vocab], got shape {logits.shape}")
    logp = jax.nn.log_softmax(logits, axis=-1)
    p = jnp.exp(logp)
    # 0 * log 0 = 0; keep -inf out of both the product and its gradient.
    logp_safe = jnp.where(p > 0, logp, 0.0)
    ent = -(p * logp_safe).sum(axis=-1)
    if mask is not None:
        ent = jnp.where(jnp.asarray(mask) > 0, ent, 0.0)
    return ent


# ------------------------------------------------------- sampler vs trainer log-prob gap


def tis_weights(trainer_logp, sampler_logp, cap=2.0):
    """Truncated importance weights ``min(pi_trainer / pi_sampler, cap)`` ``[batch, seq]``.

    ``trainer_logp`` is log pi_old recomputed by the trainer, ``sampler_logp`` what the
    sampler reported for the same tokens. Gradient stopped; pass to ``policy_loss`` as
    ``is_weights``. Off-mask positions should be masked by the loss (they are).
    """
    if cap is None or cap <= 0:
        raise ValueError(f"TIS cap must be > 0, got {cap}")
    log_w = jnp.clip(
        jnp.asarray(trainer_logp, jnp.float32) - jnp.asarray(sampler_logp, jnp.float32),
        -LOG_RATIO_CLAMP,
        LOG_RATIO_CLAMP,
    )
    log_w = jnp.where(jnp.isfinite(log_w), log_w, 0.0)  # padding may hold -inf - -inf
    return sg(jnp.minimum(jnp.exp(log_w), cap))


def logprob_gap_metrics(trainer_logp, sampler_logp, mask, *, cap=None):
    """Masked sampler-vs-trainer log-prob gap diagnostics (scalars).

    ``logprob_gap/mean_abs``, ``/max_abs``, ``/mean`` (trainer - sampler), ``/k3_kl``
    (KL(sampler || trainer) estimated on the sampled tokens), ``/ratio_mean``,
    ``/ratio_max``, ``/ratio_min`` of pi_trainer/pi_sampler, and ``/frac_over_cap`` if cap.
    A healthy setup has mean_abs near float noise; a jump means the two disagree.
    """
    trainer_logp = _check_tokens("trainer_logp", trainer_logp).astype(jnp.float32)
    sampler_logp = _check_tokens("sampler_logp", sampler_logp, trainer_logp.shape).astype(jnp.float32)
    mask = _check_tokens("mask", mask, trainer_logp.shape).astype(jnp.float32)
    gap = jnp.where(mask > 0, trainer_logp - sampler_logp, 0.0)
    ratio = jnp.exp(jnp.clip(gap, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    metrics = {
        "logprob_gap/mean_abs": masked_mean(jnp.abs(gap), mask),
        "logprob_gap/max_abs": _masked_max(jnp.abs(gap), mask),
        "logprob_gap/mean": masked_mean(gap, mask),
        "logprob_gap/k3_kl": masked_mean(_k3(jnp.clip(gap, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)), mask),
        "logprob_gap/ratio_mean": masked_mean(ratio, mask),
        "logprob_gap/ratio_max": _masked_max(ratio, mask),
        "logprob_gap/ratio_min": -_masked_max(-ratio, mask),
    }
    if cap is not None:
        metrics["logprob_gap/frac_over_cap"] = masked_mean(ratio > cap, mask)
    return metrics
