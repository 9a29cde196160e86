"""The rollout stage: training prompts -> groups of sampled responses (with DAPO refills).

``PromptStream`` walks the training pool deterministically (reshuffled every epoch from the seed,
overlong prompts dropped and counted), so a resumed run draws the same prompts. ``rollout``
samples ``group_size`` responses per prompt with the policy, decodes them and, when a reward
term asks for it, the greedy decode of each prompt (an anchor for pairwise judging). With DAPO
dynamic sampling, rounds are drawn and scored until enough groups have reward spread.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np

from clipo_jax import sampling
from clipo_jax.rl import dapo


class RolloutError(ValueError):
    pass


class PromptStream:
    """Deterministic stream over ``pool``: position ``p`` is row ``perm_epoch[p % len]`` with
    ``perm_epoch`` a permutation seeded by (seed, epoch). Prompts longer than
    ``max_prompt_len`` tokens are skipped and counted in ``counters``."""

    def __init__(
        self,
        pool,
        encode: Callable[[dict], list[int]],
        max_prompt_len: int,
        seed: int,
        position: int = 0,
        counters=None,
    ):
        if not pool:
            raise RolloutError("the task's training pool is empty")
        self.pool, self.encode, self.max_prompt_len, self.seed = pool, encode, max_prompt_len, seed
        self.position = int(position)
        self.counters = counters if counters is not None else {}

    def next(self, n: int) -> tuple[list[dict], list[list[int]]]:
        rows, ids = [], []
        misses = 0
        while len(rows) < n:
            if misses > len(self.pool):  # a whole pass without one prompt that fits
                raise RolloutError(f"no training prompt fits config.rl.max_prompt_len={self.max_prompt_len}")
            epoch, i = divmod(self.position, len(self.pool))
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.pool))
            row = self.pool[order[i]]
            self.position += 1
            p = self.encode(row)
            if len(p) > self.max_prompt_len:
                self.counters["prompts_dropped_overlong"] = self.counters.get("prompts_dropped_overlong", 0) + 1
                misses += 1
                continue
            misses = 0
            rows.append(row)
            ids.append(p)
        return rows, ids


@dataclasses.dataclass
class Rollouts:
    """One step's groups. ``out``: the sampler's arrays (host numpy), rows group-major;
    ``rows``: the data row of each group; ``texts``: decoded responses [B]; ``valid``: bool [B]
    (False for DAPO padding copies); ``anchors``: greedy decode per group or None;
    ``rewards``: set when the rewards were needed during sampling (dynamic sampling)."""

    out: sampling.SampleOutput
    rows: list[dict]
    texts: list[str]
    valid: np.ndarray
    rounds: int = 1
    anchors: list[str] | None = None
    rewards: Any = None
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class RolloutSpec:
    """What ``rollout`` needs besides the policy parameters."""

    sampler: Any
    tokenizer: Any
    config: sampling.SamplingConfig
    prompts_per_step: int
    group_size: int
    prompt_width: int  # rounds are stacked under dynamic sampling: one prompt width for all
    greedy_anchor: bool = False
    dynamic_sampling: bool = False
    dynamic_max_rounds: int = 0
    # > 0: the sampler takes the prompts this many at a time (`Sampler.__call__`'s chunk_prompts;
    # needs config.row_keys at temperature > 0); 0 = one call
    chunk_prompts: int = 0


def left_pad_to(tokens: np.ndarray, mask: np.ndarray, width: int, pad_id: int):
    """Left-pad [B, T] prompt tokens/mask to [B, width]."""
    d = width - tokens.shape[1]
    if d < 0:
        raise RolloutError(f"prompt width {tokens.shape[1]} exceeds the rollout width {width}")
    return (np.pad(tokens, ((0, 0), (d, 0)), constant_values=pad_id), np.pad(mask, ((0, 0), (d, 0))))


def _sample_round(spec: RolloutSpec, params, stream: PromptStream, key) -> tuple[dict, list[dict], list[str], list]:
    import jax

    rows, ids = stream.next(spec.prompts_per_step)
    out = spec.sampler(params, ids, key, spec.config, chunk_prompts=spec.chunk_prompts)
    stop_ids = spec.config.stop_ids
    texts = [sampling.response_text(spec.tokenizer, out, i, stop_ids) for i in range(len(out.lengths))]
    anchors = None
    if spec.greedy_anchor:
        greedy_cfg = dataclasses.replace(spec.config, temperature=0.0, top_p=1.0, n_samples=1)
        g = spec.sampler(params, ids, jax.random.fold_in(key, 1), greedy_cfg, chunk_prompts=spec.chunk_prompts)
        anchors = [sampling.response_text(spec.tokenizer, g, i, stop_ids) for i in range(len(g.lengths))]
    fields = {k: np.asarray(v) for k, v in out._asdict().items()}
    return fields, rows, texts, anchors


def rollout(
    spec: RolloutSpec,
    params,
    stream: PromptStream,
    key,
    score: Callable[[list[dict], list[str], np.ndarray, np.ndarray, list | None], Any] | None = None,
) -> Rollouts:
    """Sample one step's groups. With dynamic sampling, ``score(rows, texts, lengths, truncated,
    anchors) -> RewardResult`` is called per round and groups without reward spread are refilled."""
    import jax

    G = spec.group_size
    if not spec.dynamic_sampling:
        fields, rows, texts, anchors = _sample_round(spec, params, stream, jax.random.fold_in(key, 0))
        return Rollouts(sampling.SampleOutput(**fields), rows, texts, np.ones(len(texts), bool), 1, anchors)

    rounds: list[tuple[list[dict], list[str], list | None, Any]] = []

    def sample_round(round_idx: int) -> dict:
        fields, rows, texts, anchors = _sample_round(spec, params, stream, jax.random.fold_in(key, round_idx))
        fields["prompt_tokens"], fields["prompt_mask"] = left_pad_to(
            fields["prompt_tokens"], fields["prompt_mask"], spec.prompt_width, spec.tokenizer.pad_id
        )
        result = score(rows, texts, fields["lengths"], fields["truncated"], anchors)
        rounds.append((rows, texts, anchors, result))
        fields["rewards"] = result.rewards
        fields["outcome"] = result.outcome
        fields["round_row"] = np.stack([np.full(len(texts), round_idx), np.arange(len(texts))], 1)
        for name, v in result.per_term.items():
            fields[f"term/{name}"] = v
        return fields

    drawn = dapo.dynamic_sample(
        sample_round,
        target_groups=spec.prompts_per_step,
        group_size=G,
        max_rounds=spec.dynamic_max_rounds,
        on_short="pad",
    )
    batch = dict(drawn.batch)
    where = batch.pop("round_row")
    texts = [rounds[r][1][i] for r, i in where]
    rows = [rounds[r][0][i // G] for r, i in where[::G]]
    anchors = [rounds[r][2][i // G] for r, i in where[::G]] if spec.greedy_anchor else None
    rewards = {"rewards": batch.pop("rewards"), "outcome": batch.pop("outcome")}
    rewards["per_term"] = {k[len("term/") :]: batch.pop(k) for k in list(batch) if k.startswith("term/")}
    # the rounds' reward metrics: counts summed, the rest averaged over every sampled group
    from clipo_jax.rewards.stage import merge_round_metrics

    rewards["metrics"] = merge_round_metrics([r[3].metrics for r in rounds])
    metrics = {(f"dynamic_{k}" if not k.startswith("dynamic") else k): float(v) for k, v in drawn.metrics().items()}
    return Rollouts(sampling.SampleOutput(**batch), rows, texts, drawn.valid, drawn.rounds, anchors, rewards, metrics)
