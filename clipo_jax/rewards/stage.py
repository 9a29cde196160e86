"""The reward stage: named reward terms over a whole batch of rollout groups, combined by weight.

A term sees the batch at once (prompts, rows, every response of every group, token counts), so
it can compare responses within a group (OpenRS pairwise rubrics), call a judge server
concurrently, or batch a verifier pool. Terms are registered by name and picked in the config::

    config.reward.terms = {"verifiable": 1.0, "pvr": 1.0, "pairwise_rubric": 0.5}

    final reward [B] = sum_t weight_t * values_t, then rows that fail a gate (a hard constraint)
                       are set to ``config.reward.gate_reward``.

Add a term with::

    from clipo_jax.rewards.stage import RewardTerm, TermOutput, register_reward_term

    @register_reward_term("length_penalty")
    class LengthPenalty(RewardTerm):
        async def score(self, batch):
            return TermOutput(values=-batch.lengths / 1000.0)

A term's ``score`` is a coroutine: the stage runs every term of a step concurrently on one
background event loop, so the trainer can start the stage, run the policy's own work (reference
and old log-probs, the CLIPO head) and only then wait for the judge (``RewardStage.start``).
Failures inside a term are counted and logged (``reward/<term>/failures``), never raised, except
a judge that stays down (``RewardError``), which ends the run with a one-line error; the run then
resumes from its last checkpoint.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import math
import threading
from typing import Any, Callable, Mapping, Sequence

import numpy as np

logger = logging.getLogger(__name__)


class RewardError(ValueError):
    """Bad reward configuration or data row, or a judge that stays down (one-line message)."""


@dataclasses.dataclass(frozen=True)
class RewardBatch:
    """One step's rollouts, group-major: response i belongs to group i // group_size.

    rows: the data row of each group (prompt, ground_truth, reward_fn, constraints, rubric, ...);
    responses: decoded responses [B]; lengths / truncated: [B] token counts and no-stop flags;
    anchors: optional reference response per group (e.g. the greedy decode) for pairwise terms.
    """

    rows: Sequence[dict]
    responses: Sequence[str]
    lengths: np.ndarray
    truncated: np.ndarray
    group_size: int
    anchors: Sequence[str] | None = None
    step: int = 0

    def __post_init__(self):
        if len(self.responses) != len(self.rows) * self.group_size:
            raise RewardError(
                f"RewardBatch: {len(self.responses)} responses for {len(self.rows)} groups of {self.group_size}"
            )

    @property
    def n_groups(self) -> int:
        return len(self.rows)

    def __len__(self) -> int:
        return len(self.responses)

    def row(self, i: int) -> dict:
        """The data row of response i."""
        return self.rows[i // self.group_size]

    def prompt(self, group: int) -> str:
        """The prompt as the policy saw it (``messages`` win over ``prompt``, as in
        ``Task.encode_prompt``): a system prompt or earlier turns reach the judge too."""
        row = self.rows[group]
        if row.get("messages"):
            return conversation_text(row["messages"])
        return str(row.get("prompt", ""))


def conversation_text(messages: Sequence[Mapping[str, Any]]) -> str:
    """A chat as judge-readable text: a lone user message as itself, anything longer (a system
    prompt, earlier turns) as role-labelled blocks in order."""
    if len(messages) == 1 and messages[0].get("role", "user") == "user":
        return str(messages[0].get("content", ""))
    return "\n\n".join(f"[{m.get('role', 'user')}]\n{m.get('content', '')}" for m in messages)


@dataclasses.dataclass
class TermOutput:
    """values: float [B] raw term values; failed: bool [B] responses whose value is a fallback
    (judge failure scored as a tie, ...); gate_failed: bool [B] responses that fail a hard
    constraint (final reward replaced by the gate value); metrics: scalars to log."""

    values: np.ndarray
    failed: np.ndarray | None = None
    gate_failed: np.ndarray | None = None
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)


class RewardTerm:
    """Base class of a reward term. Subclasses set ``required_fields`` (row fields every row
    must carry) and implement ``async score(batch) -> TermOutput``; ``check_row`` may add checks
    (run on the whole training pool before compilation); ``aclose`` releases clients."""

    name: str = ""
    required_fields: tuple[str, ...] = ()
    settings_keys: tuple[str, ...] | None = None  # None: any settings accepted

    def __init__(self, settings: Mapping[str, Any] | None = None, context: "RewardContext | None" = None):
        self.settings = dict(settings or {})
        self.context = context
        if self.settings_keys is not None:
            unknown = sorted(set(self.settings) - set(self.settings_keys))
            if unknown:
                raise RewardError(
                    f"config.reward.{self.name}: unknown setting(s) {unknown}; valid: {sorted(self.settings_keys)}"
                )

    def check_row(self, row: dict, where: str) -> None:
        missing = [f for f in self.required_fields if f not in row or row[f] is None]
        if missing:
            raise RewardError(f"{where}: reward term {self.name!r} needs field(s) {missing}; the row has {sorted(row)}")

    async def preflight(self) -> None:
        """Checks that need the event loop (e.g. a judge URL that answers); raise RewardError."""

    async def score(self, batch: RewardBatch) -> TermOutput:
        raise NotImplementedError

    async def aclose(self) -> None:
        pass


@dataclasses.dataclass
class RewardContext:
    """What terms may need besides their own settings: the task (its verifier), the run's
    mesh (an in-process judge's weights), the workdir (judge caches), the seed."""

    task: Any = None
    mesh: Any = None
    workdir: str | None = None
    seed: int = 0


REWARD_TERMS: dict[str, Callable[..., RewardTerm]] = {}


def register_reward_term(name: str):
    """Class decorator: register a RewardTerm subclass under ``name``."""

    def deco(cls):
        if name in REWARD_TERMS and REWARD_TERMS[name] is not cls:
            raise ValueError(f"reward term {name!r} is already registered ({REWARD_TERMS[name].__qualname__})")
        cls.name = name
        REWARD_TERMS[name] = cls
        return cls

    return deco


@dataclasses.dataclass
class RewardResult:
    """rewards: float32 [B] final; outcome: float32 [B] the label term's raw values (CLIPO's
    correctness labels and the logged outcome); per_term: raw values by term; metrics: scalars."""

    rewards: np.ndarray
    outcome: np.ndarray
    per_term: dict[str, np.ndarray]
    metrics: dict[str, float]


class _Loop:
    """One asyncio loop on a daemon thread, shared by every stage in the process: clients
    (httpx, the in-process judge's batcher) stay bound to one loop for the whole run."""

    _lock = threading.Lock()
    _loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def get(cls) -> asyncio.AbstractEventLoop:
        with cls._lock:
            if cls._loop is None or cls._loop.is_closed():
                loop = asyncio.new_event_loop()
                threading.Thread(target=loop.run_forever, name="reward-stage-loop", daemon=True).start()
                cls._loop = loop
            return cls._loop


# Per-step counts: summed over DAPO rounds (other metrics are averaged). A term's metric counts
# when its last name part, without a "judge_" prefix (the checklist term's counters), is listed.
COUNT_METRICS = (
    "calls",
    "cache_hits",
    "duplicates",
    "identical_free",
    "pairs",
    "parse_failures",
    "parse_retries",
    "backend_failures",
    "pair_failures",
    "failures",
    "errors",
    "requests",
    "dedup_hits",
    "scored",
    "prompt_tokens",
    "completion_tokens",
    "latency_s",
    "wall_s",
)


def _is_count(key: str) -> bool:
    name = key.rsplit("/", 1)[-1]
    return name.removeprefix("judge_") in COUNT_METRICS


def merge_round_metrics(rounds: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """The reward metrics of several scoring rounds of one step (DAPO refills)."""
    keys = set().union(*rounds) if rounds else set()
    out = {}
    for k in keys:
        vals = [r[k] for r in rounds if k in r]
        out[k] = float(np.sum(vals)) if _is_count(k) else float(np.mean(vals))
    return out


class PendingRewards:
    """A reward computation in flight; ``result()`` waits for it (re-raising a RewardError).
    ``outcome`` holds the label term's values at once (None without a label term), so CLIPO's
    correctness labels are known while the judge terms are still running."""

    def __init__(self, future: concurrent.futures.Future, outcome: np.ndarray | None = None):
        self._future = future
        self.outcome = outcome

    def done(self) -> bool:
        return self._future.done()

    def result(self) -> RewardResult:
        return self._future.result()


class RewardStage:
    """Weighted reward terms. Build with ``RewardStage.from_config(config.reward, context)``."""

    def __init__(
        self,
        terms: Mapping[str, RewardTerm],
        weights: Mapping[str, float],
        label_term: str | None = None,
        gate_reward: float = 0.0,
        correct_threshold: float = 0.5,
    ):
        if not terms:
            raise RewardError("config.reward.terms is empty: name at least one reward term")
        self.terms = dict(terms)
        self.weights = {k: float(weights[k]) for k in self.terms}
        self.label_term = label_term
        self.gate_reward = float(gate_reward)
        self.correct_threshold = float(correct_threshold)

    # -- construction and checks (before any compilation) ------------------------------------
    @classmethod
    def from_config(cls, reward_cfg, context: RewardContext) -> "RewardStage":
        weights = {k: v for k, v in dict(reward_cfg.terms).items() if v != 0}  # weight 0 = term off
        unknown = sorted(set(weights) - set(REWARD_TERMS))
        if unknown:
            raise RewardError(f"config.reward.terms: unknown term(s) {unknown}; valid: {sorted(REWARD_TERMS)}")
        for name, w in weights.items():
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
                raise RewardError(f"config.reward.terms.{name}={w!r}: the weight must be a finite number")
        label = reward_cfg.get("label_term", "verifiable")
        if label and label not in weights:
            label = None  # no outcome term: CLIPO labels / outcome logging use the final reward
        terms = {}
        for name in weights:
            settings = reward_cfg.get(name, None)
            settings = settings.to_dict() if hasattr(settings, "to_dict") else dict(settings or {})
            terms[name] = REWARD_TERMS[name](settings, context)
        return cls(
            terms,
            weights,
            label_term=label,
            gate_reward=reward_cfg.get("gate_reward", 0.0),
            correct_threshold=reward_cfg.get("correct_threshold", 0.5),
        )

    def check_rows(self, rows: Sequence[dict], source: str = "training row") -> None:
        """Every term's field checks on every row: a one-line RewardError naming the row."""
        for i, row in enumerate(rows):
            for term in self.terms.values():
                term.check_row(row, f"{source} {i}")

    def preflight(self) -> None:
        fut = asyncio.run_coroutine_threadsafe(self._preflight(), _Loop.get())
        fut.result()

    async def _preflight(self):
        await asyncio.gather(*(t.preflight() for t in self.terms.values()))

    # -- scoring --------------------------------------------------------------------------
    def start(self, batch: RewardBatch) -> PendingRewards:
        """Score the label term (the verifier: fast) and start every other term on the
        background loop; returns without waiting for those."""
        loop = _Loop.get()
        label_out = None
        if self.label_term:
            label_out = asyncio.run_coroutine_threadsafe(self._term(self.label_term, batch), loop).result()
        future = asyncio.run_coroutine_threadsafe(self._score(batch, label_out), loop)
        outcome = None if label_out is None else np.asarray(label_out.values, np.float32)
        return PendingRewards(future, outcome)

    def compute(self, batch: RewardBatch) -> RewardResult:
        return self.start(batch).result()

    async def _score(self, batch: RewardBatch, label_out: TermOutput | None = None) -> RewardResult:
        names = [n for n in self.terms if not (label_out is not None and n == self.label_term)]
        outputs = dict(zip(names, await asyncio.gather(*(self._term(n, batch) for n in names))))
        if label_out is not None:
            outputs[self.label_term] = label_out
        return self.combine({n: outputs[n] for n in self.terms}, batch)

    async def _term(self, name: str, batch: RewardBatch) -> TermOutput:
        """One term's scores; an unexpected fault becomes a one-line RewardError naming the term."""
        try:
            return await self.terms[name].score(batch)
        except RewardError:
            raise
        except Exception as e:
            raise RewardError(f"reward term {name!r}: {type(e).__name__}: {e}") from e

    def combine(self, outputs: Mapping[str, TermOutput], batch: RewardBatch) -> RewardResult:
        """Weighted sum, gates, and the per-term metrics (raw mean, share, failures)."""
        B = len(batch)
        total = np.zeros(B, np.float32)
        gate = np.zeros(B, bool)
        metrics: dict[str, float] = {}
        per_term = {}
        contributions = {}
        for name, out in outputs.items():
            values = np.asarray(out.values, np.float32).reshape(-1)
            if values.shape != (B,):
                raise RewardError(f"reward term {name!r} returned {values.shape[0]} values for {B} responses")
            bad = ~np.isfinite(values)
            failed = np.zeros(B, bool) if out.failed is None else np.asarray(out.failed, bool)
            if bad.any():  # a term must never poison the batch: count and neutralise
                values = np.where(bad, 0.0, values).astype(np.float32)
                failed = failed | bad
            per_term[name] = values
            contrib = self.weights[name] * values
            total = total + contrib
            contributions[name] = float(np.abs(contrib).mean())
            if out.gate_failed is not None:
                gate |= np.asarray(out.gate_failed, bool)
                metrics[f"reward/{name}/gate_failed_frac"] = float(np.mean(out.gate_failed))
            metrics[f"reward/{name}/mean"] = float(values.mean())
            metrics[f"reward/{name}/failures"] = float(failed.sum())
            metrics.update({f"reward/{name}/{k}": float(v) for k, v in out.metrics.items()})
        norm = sum(contributions.values())
        for name, c in contributions.items():
            metrics[f"reward/{name}/share"] = c / norm if norm > 0 else 0.0
        if gate.any():
            total = np.where(gate, np.float32(self.gate_reward), total).astype(np.float32)
        G = batch.group_size
        metrics["reward/group_spread"] = float(total.reshape(-1, G).std(axis=1).mean())
        outcome = per_term[self.label_term] if self.label_term else total
        return RewardResult(total.astype(np.float32), np.asarray(outcome, np.float32), per_term, metrics)

    def close(self) -> None:
        async def _close():
            await asyncio.gather(*(t.aclose() for t in self.terms.values()), return_exceptions=True)

        try:
            asyncio.run_coroutine_threadsafe(_close(), _Loop.get()).result(timeout=30)
        except Exception as e:  # closing must not mask the run's own outcome
            logger.warning("reward stage close: %s", e)


# The built-in terms register themselves on import.
from clipo_jax.rewards import terms as _terms  # noqa: E402,F401
