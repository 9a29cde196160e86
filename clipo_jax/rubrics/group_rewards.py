"""OpenRS as an RL reward: pairwise judgments over a group of rollouts -> one reward each (arXiv 2602.14069).

Methods (registry ``GROUP_METHODS``):

* ``anchor`` (O(G) pairs): every response is judged against one anchor (index ``anchor_index``,
  e.g. the greedy decode); reward +1 / 0 / -1 for win / same / loss, the anchor gets 0.
* ``round_robin`` (O(G^2) pairs): all pairs; reward = win rate, "same" counts as half a win.
* ``bradley_terry``: all pairs (or ``max_pairs`` sampled ones); reward = centred log-strength
  fitted by jit-compiled minorise-maximise iterations (``fit_bradley_terry``).

A pair whose judgment failed (verdict ``"error"``) counts as the config's ``error_policy`` says:
``"tie"`` (the default: a "same", half a win each way) or ``"exclude"`` (the comparison is left
out: no win, no loss, not played).

PVR terms (ground-truth score, guardrail penalties) are added with configurable weights.  The
"Same" ratio (share of judged pairs that came out "same") is returned for logging: a rising
ratio means the judge can no longer tell rollouts apart.  Identical responses are "same" without
a call; all calls of a group go out concurrently through the backend (bounded, cached).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import itertools
import random
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from clipo_jax.rubrics import pvr
from clipo_jax.rubrics.judge import PairwiseJudge, ground_truth_kind
from clipo_jax.rubrics.meta_rubric import domain_for_query_type
from clipo_jax.rubrics.types import BT_ITERS, PairInput, apply_error_policy, check_error_policy


@functools.partial(jax.jit, static_argnames=("num_iters",))
def fit_bradley_terry(wins: jax.Array, num_iters: int = BT_ITERS, prior: float = 0.1) -> jax.Array:
    """Bradley-Terry log-strengths by MM iterations (Hunter 2004), batched.

    Args:
      wins: float [..., G, G]; wins[i, j] = number of times i beat j (a "same" adds 0.5 to both).
      num_iters: fixed iteration count (static, so one compilation).
      prior: pseudo-comparisons added to every pair as half-wins each way, which keeps
        undefeated / winless responses finite (a weak symmetric prior).
    Returns:
      float32 [..., G] log-strengths, centred to mean 0 over the group.
    """
    g = wins.shape[-1]
    if g < 2:  # nobody to compare with: every strength is the mean, 0 (the MM step would be 0 / 0)
        return jnp.zeros(wins.shape[:-1], jnp.float32)
    off_diag = 1.0 - jnp.eye(g, dtype=jnp.float32)
    w = (wins.astype(jnp.float32) + 0.5 * prior) * off_diag
    n = w + jnp.swapaxes(w, -1, -2)  # comparisons per pair
    total_wins = jnp.sum(w, axis=-1)  # [..., G]

    def step(_, log_p):
        p = jnp.exp(log_p)
        denom = jnp.sum(n / (p[..., :, None] + p[..., None, :]), axis=-1)
        new = jnp.log(total_wins) - jnp.log(denom)
        return new - jnp.mean(new, axis=-1, keepdims=True)

    init = jnp.zeros(wins.shape[:-1], jnp.float32)
    return jax.lax.fori_loop(0, num_iters, step, init)


@dataclasses.dataclass(frozen=True)
class GroupRewardConfig:
    method: str = "anchor"
    anchor_index: int | None = 0  # None: a random anchor drawn from ``seed``
    max_pairs: int | None = None  # bradley_terry: sample this many pairs (None = all)
    bt_iters: int = BT_ITERS
    seed: int = 0
    ground_truth_weight: float = 0.0  # reward += w * (+1 / 0 / -1 ground-truth score)
    guardrail_weight: float = 0.0  # reward -= w * (number of guardrail flags raised)
    expected_language: str | None = None
    error_policy: str = "tie"  # an "error" verdict: "tie" (a same) or "exclude" (left out)

    def __post_init__(self):
        check_error_policy(self.error_policy, "GroupRewardConfig.error_policy")
        # max_pairs=0 used to sample no pair (every reward 0, no call, no error) and bt_iters=0 to
        # return the initial strengths (0) whatever the verdicts: both silently remove the signal.
        for name, value in (("max_pairs", self.max_pairs), ("bt_iters", self.bt_iters)):
            if value is None and name == "max_pairs":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"GroupRewardConfig.{name}={value!r}: must be an integer >= 1")


@dataclasses.dataclass
class GroupRewardResult:
    rewards: np.ndarray  # float32 [G]
    pairwise: np.ndarray  # float32 [G] the pairwise part alone
    same_ratio: float  # "same" among the pairs counted (errors are "same" under the "tie" policy)
    n_pairs_judged: int
    n_pairs_deduplicated: int
    pairs: list[tuple[int, int, str]]  # (i, j, verdict of i vs j), "error" included
    n_errors: int = 0  # pairs whose judgment failed


def _pairs_for(method: str, g: int, cfg: GroupRewardConfig) -> list[tuple[int, int]]:
    rng = random.Random(cfg.seed)
    if method == "anchor":
        a = cfg.anchor_index if cfg.anchor_index is not None else rng.randrange(g)
        if not 0 <= a < g:
            raise ValueError(f"GroupRewardConfig.anchor_index={a} out of range for a group of {g}")
        return [(i, a) for i in range(g) if i != a]
    allp = list(itertools.combinations(range(g), 2))
    if method == "bradley_terry" and cfg.max_pairs is not None and cfg.max_pairs < len(allp):
        return rng.sample(allp, cfg.max_pairs)
    return allp


def pairwise_rewards(method: str, g: int, pairs: Sequence[tuple[int, int, str]], cfg: GroupRewardConfig) -> np.ndarray:
    """Turns (i, j, verdict of i vs j) triples into per-response rewards [G]; an ``"error"``
    verdict counts as ``cfg.error_policy`` says (a tie, or left out)."""
    pairs = [(i, j, apply_error_policy(v, cfg.error_policy)) for i, j, v in pairs]
    pairs = [(i, j, v) for i, j, v in pairs if v is not None]
    wins = np.zeros((g, g), np.float32)
    for i, j, v in pairs:
        if v == "first":
            wins[i, j] += 1
        elif v == "second":
            wins[j, i] += 1
        else:
            wins[i, j] += 0.5
            wins[j, i] += 0.5
    if method == "anchor":
        out = np.zeros(g, np.float32)
        for i, _, v in pairs:
            out[i] = {"first": 1.0, "second": -1.0}.get(v, 0.0)
        return out
    if method == "round_robin":
        played = wins + wins.T
        n = played.sum(axis=1)
        return np.where(n > 0, wins.sum(axis=1) / np.maximum(n, 1e-9), 0.5).astype(np.float32)
    if method == "bradley_terry":
        return np.asarray(fit_bradley_terry(jnp.asarray(wins), num_iters=cfg.bt_iters))
    raise ValueError(f"unknown group reward method {method!r} (known: {sorted(GROUP_METHODS)})")


GROUP_METHODS: dict[str, Callable[..., Any]] = {m: pairwise_rewards for m in ("anchor", "round_robin", "bradley_terry")}


_FLIPPED = {"first": "second", "second": "first"}  # "same" and "error" read the same both ways


async def group_rewards(
    judge: PairwiseJudge,
    query: str,
    responses: Sequence[str],
    config: GroupRewardConfig = GroupRewardConfig(),
    query_type: str | None = None,
    ground_truth: str | None = None,
) -> GroupRewardResult:
    """Rewards for one group of G rollouts of ``query``."""
    if config.method not in GROUP_METHODS:
        raise ValueError(f"unknown group reward method {config.method!r} (known: {sorted(GROUP_METHODS)})")
    g = len(responses)
    index = _pairs_for(config.method, g, config)
    # One call per pair of distinct texts: a group with repeated responses meets the same pair at
    # several positions (and in either order), and a judge that is not bit-deterministic would
    # give identical responses different rewards. A pair met the other way round takes the
    # flipped verdict; identical responses are "same" with no call.
    todo, seen, dedup = [], set(), 0
    for i, j in index:
        pair = (responses[i], responses[j])
        if pair[0] == pair[1] or pair in seen:
            dedup += 1
            continue
        seen.update((pair, pair[::-1]))
        todo.append((i, j))
    judged = await asyncio.gather(
        *(
            judge.judge_pair(
                PairInput(query, responses[i], responses[j], query_type=query_type, ground_truth=ground_truth)
            )
            for i, j in todo
        )
    )
    verdicts = {}  # (text, text) -> verdict, both orientations
    for (i, j), r in zip(todo, judged):
        verdicts[(responses[i], responses[j])] = r.verdict
        verdicts[(responses[j], responses[i])] = _FLIPPED.get(r.verdict, r.verdict)
    triples = [
        (i, j, "same" if responses[i] == responses[j] else verdicts[(responses[i], responses[j])]) for i, j in index
    ]
    pair_part = pairwise_rewards(config.method, g, triples, config)
    rewards = pair_part.astype(np.float32).copy()
    if config.ground_truth_weight and ground_truth is not None:
        # Checked as the judge checks it: the kind of the query type's domain (math verifier,
        # **bold** answer for reasoning, choice letter...); no extractable answer counts as -1.
        kind = ground_truth_kind(domain_for_query_type(query_type))
        gt = [pvr.ground_truth_score(r, ground_truth, kind) for r in responses]
        rewards += config.ground_truth_weight * np.array([s if s is not None else -1 for s in gt], np.float32)
    if config.guardrail_weight:
        flags = [sum(pvr.guardrail_flags(r, config.expected_language).values()) for r in responses]
        rewards -= config.guardrail_weight * np.array(flags, np.float32)
    counted = [apply_error_policy(v, config.error_policy) for _, _, v in triples]
    counted = [v for v in counted if v is not None]
    return GroupRewardResult(
        rewards=rewards,
        pairwise=pair_part,
        same_ratio=sum(v == "same" for v in counted) / max(len(counted), 1),
        n_pairs_judged=len(todo),
        n_pairs_deduplicated=dedup,
        pairs=triples,
        n_errors=sum(v == "error" for _, _, v in triples),
    )
