"""Types shared by every part of ``clipo_jax.rubrics``: the backend contract, a completion's
request and response, a pair to judge and its result, verdicts and the error policies.

This module imports nothing else from the package at run time, so that backends, judges,
reward code and tools can all depend on it without depending on one another.

Verdicts: ``"first"`` / ``"second"`` (that response is better), ``"same"`` (a judged tie) and
``"error"`` (no judgment: a direction whose call failed for good or whose output never parsed,
or an error inside the pair).  An ``"error"`` is never decided by the other direction; what it
counts as is the consumer's choice, an error policy:

* ``"exclude"``: left out (JudgeBench and PPE accuracy; a group reward without that comparison);
* ``"tie"``: counted as ``"same"`` (RewardBench v2 best-of-4; RL rewards by default).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import TYPE_CHECKING, Any, Protocol, Sequence, runtime_checkable

if TYPE_CHECKING:  # annotations only: no import of the meta-rubric code at run time
    from clipo_jax.rubrics.meta_rubric import MetaRubric

# The default budget of new tokens for one judgment (as in the OpenRS release).
DEFAULT_JUDGE_MAX_TOKENS = 8192
# MM iterations of the Bradley-Terry group reward: a total order over 32 responses (the slowest
# case) is within 1e-4 of the optimum after 500 and off by 0.4 in log-strength after 50; each
# iteration is [G, G] work.
BT_ITERS = 500

VERDICTS = ("first", "second", "same", "error")
ERROR_POLICIES = ("exclude", "tie")


def check_error_policy(policy: str, where: str = "error_policy") -> str:
    if policy not in ERROR_POLICIES:
        raise ValueError(f"{where} must be one of {list(ERROR_POLICIES)}, got {policy!r}")
    return policy


def apply_error_policy(verdict: str, policy: str) -> str | None:
    """The verdict as a consumer counts it: an ``"error"`` becomes ``"same"`` under ``"tie"`` and
    None (left out) under ``"exclude"``; any other verdict is returned unchanged."""
    check_error_policy(policy)
    if verdict not in VERDICTS:
        raise ValueError(f"unknown verdict {verdict!r} (known: {list(VERDICTS)})")
    if verdict != "error":
        return verdict
    return "same" if policy == "tie" else None


# ----------------------------------------------------------------------------------------------
# Backends.
# ----------------------------------------------------------------------------------------------


class BackendError(RuntimeError):
    """A judge call failed for good (after retries); ``kind`` says why (timeout / http / garbage)."""

    def __init__(self, message: str, kind: str = "error"):
        super().__init__(message)
        self.kind = kind


@dataclasses.dataclass(frozen=True)
class CompletionRequest:
    """One chat completion.  ``json_schema`` asks for schema-constrained output when supported."""

    messages: tuple[dict[str, str], ...] | list[dict[str, str]]
    max_tokens: int = 2048
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    json_schema: dict[str, Any] | None = None
    schema_name: str = "judgment"

    def cache_key(self, model: str, use_schema: bool, judge: str | None = None) -> str:
        """Content hash of everything that determines the answer.

        ``judge`` identifies which judge answers besides its model name (the HTTP backend's
        server URL; the in-process backends' checkpoint and weight fingerprint), so that two
        judges under one name never share cached answers; None leaves it out of the hash (the
        replay transcripts' keys)."""
        payload = {
            "model": model,
            "messages": list(self.messages),
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "seed": self.seed,
            "schema": self.json_schema if use_schema else None,
        }
        if judge is not None:
            payload["judge"] = judge
        blob = json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()
        return hashlib.sha256(blob).hexdigest()


@dataclasses.dataclass
class CompletionResponse:
    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None
    cached: bool = False
    latency_s: float = 0.0
    attempts: int = 1


@runtime_checkable
class Backend(Protocol):
    """The judge backend contract."""

    name: str
    supports_json_schema: bool  # honours CompletionRequest.json_schema (constrained decoding)
    supports_logprobs: bool  # can return token log-probabilities (needed by a logit verdict)

    async def complete(self, request: CompletionRequest) -> CompletionResponse:
        """Returns the completion or raises BackendError; must be safe to call concurrently."""
        ...

    async def aclose(self) -> None: ...


def forget_cached(backend, request: CompletionRequest) -> None:
    """Drops ``request``'s cached completion from a backend that caches (``backend.forget``); the
    callers that parse an answer call it when the answer does not parse, so that a retry, a later
    step or a resumed run asks again instead of reading the same unusable answer."""
    forget = getattr(backend, "forget", None)
    if forget is not None:
        forget(request)


@runtime_checkable
class LogitBackend(Backend, Protocol):
    """Extra contract of a logit-verdict backend (``local_backends.LogitVerdictBackend``)."""

    async def choice_logprobs(self, request: CompletionRequest, choices: Sequence[str]) -> dict[str, float]:
        """Log-probability of each single-token choice (e.g. "A", "B", "S") as the next token."""
        ...


# ----------------------------------------------------------------------------------------------
# Pairs and their results.
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class PairInput:
    query: str
    first: str
    second: str
    query_type: str | None = None
    ground_truth: str | None = None
    constraints: list[dict[str, Any]] | None = None
    pair_id: str | None = None
    domain: str | None = None  # overrides routing when set
    meta_rubric: MetaRubric | None = None  # overrides the domain file (refinement / review)
    general: MetaRubric | None = None  # overrides general.toml (refinement)


@dataclasses.dataclass
class DirectionResult:
    score: float
    criteria: list[dict[str, Any]] | None
    parse_ok: bool
    error: str | None = None  # parse / backend error of the last attempt
    error_kind: str | None = None  # "parse" | "timeout" | "http" | "garbage" | ...
    attempts: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclasses.dataclass
class PairResult:
    verdict: str  # "first" | "second" | "same" | "error"
    path: str  # "ground_truth" | "constraints" | "pairwise" | "error" (the judge raised)
    domain: str
    forward: DirectionResult | None = None
    backward: DirectionResult | None = None
    pointwise: dict[str, Any] | None = None
    pair_id: str | None = None
    wall_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def is_error(self) -> bool:
        """True when there is no judgment to count (the verdict is ``"error"``)."""
        return self.verdict == "error"

    @property
    def failed(self) -> bool:
        """True when something in the pair failed and it is worth judging again: an ``"error"``
        verdict (a direction whose call failed for good or whose output never parsed, or an
        error inside the pair), or an LLM answer check that failed (the pair was then judged
        on another path)."""
        if self.verdict == "error" or self.path == "error":
            return True
        if any(d is not None and not d.parse_ok for d in (self.forward, self.backward)):
            return True
        return bool(self.pointwise and any(self.pointwise.get("answer_check_failed") or ()))
