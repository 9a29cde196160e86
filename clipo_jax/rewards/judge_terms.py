"""LLM-judge reward terms: OpenRS pairwise group rewards and pointwise checklist rubrics.

``pairwise_rubric`` judges pairs of responses of the same prompt with the OpenRS pairwise judge
(adaptive rubric, both orders, aggregation outside the LLM) and turns each group's verdicts into
rewards with ``rubrics.group_rewards``: ``anchor`` (each response against the greedy decode or a
chosen sample: +1 / 0 / -1), ``round_robin`` (win rate) or ``bradley_terry`` (centred
log-strength). Every pair of a step goes out at once (bounded by the backend's concurrency);
identical responses are "same" without a call; a pair seen before in the run (either order) is
answered from an in-memory cache. A failed judgment (a direction whose call failed for good or
whose output never parsed: an ``"error"`` verdict) is counted, never cached, marks both responses
as failed, and counts as the term's ``error_policy`` says: ``"tie"`` (the default: a same) or
``"exclude"`` (the comparison is left out of the group's rewards).

``checklist_rubric`` scores each response against the row's own weighted rubric items
(``row["rubric"]``, Rubrics as Rewards) and normalises the weighted sum to [0, 1]
(``rubrics.checklist``). A failed judgment gets its group's mean score (neutral for the advantage),
counted.

Both take a ``judge`` settings block: ``backend`` ("openai": any OpenAI-compatible server, e.g.
llama.cpp's server, vLLM, SGLang; "in-process": our own sampler on the run's mesh), ``base_url``,
``model``, ``max_concurrency``, ``timeout_s``, ``max_retries``, ``max_tokens`` (new tokens per
judgment; default ``DEFAULT_JUDGE_MAX_TOKENS`` = 8192, the release's budget: set it smaller for a
small judge on a CPU), ``parse_attempts``.
A judge that fails every call of ``down_after_steps`` consecutive steps ends the run with a
one-line ``RewardError`` (resume re-runs from the last checkpoint).
"""

from __future__ import annotations

import collections
import json
import logging
import os
import time
from typing import Any

import numpy as np

from clipo_jax.rewards.stage import RewardBatch, RewardError, RewardTerm, TermOutput, register_reward_term
from clipo_jax.rubrics.types import BT_ITERS, DEFAULT_JUDGE_MAX_TOKENS, ERROR_POLICIES, apply_error_policy

logger = logging.getLogger(__name__)

JUDGE_DEFAULTS = dict(
    backend="openai",
    base_url="",
    model="",
    max_concurrency=32,
    timeout_s=120.0,
    max_retries=3,
    max_tokens=DEFAULT_JUDGE_MAX_TOKENS,
    parse_attempts=2,
    protocol="single",
    temperature=0.0,
    cache_dir="",
    min_criteria=5,  # criteria asked for per direction (a small judge: 1-3)
    max_criteria=15,
    compact_chars=0,  # > 0: bound every free-text field of the answer (cheap judging)
    json_schema="auto",  # send the answer schema as response_format: "auto", True, False
)


def judge_settings(settings: dict) -> dict:
    s = dict(JUDGE_DEFAULTS)
    given = dict(settings.get("judge") or {})
    unknown = sorted(set(given) - set(JUDGE_DEFAULTS))
    if unknown:
        raise RewardError(f"judge settings: unknown key(s) {unknown}; valid: {sorted(JUDGE_DEFAULTS)}")
    s.update(given)
    if s["backend"] not in ("openai", "in-process", "logit"):
        raise RewardError(f"judge.backend={s['backend']!r}: must be 'openai', 'in-process' or 'logit'")
    if s["backend"] == "openai" and (not s["base_url"] or not s["model"]):
        raise RewardError("judge.backend='openai' needs judge.base_url and judge.model (e.g. --config.reward.judge...)")
    # a zero semaphore waits forever, zero attempts never ask: numbers are checked before any call
    for key, kind, ok, rule in JUDGE_NUMBER_RULES:
        s[key] = _number(f"judge.{key}", s[key], kind, ok, rule)
    if s["min_criteria"] > s["max_criteria"]:
        raise RewardError(f"judge.min_criteria={s['min_criteria']} > judge.max_criteria={s['max_criteria']}")
    return s


JUDGE_NUMBER_RULES = (
    ("max_concurrency", int, lambda v: v >= 1, ">= 1"),
    ("timeout_s", float, lambda v: v > 0, "> 0"),
    ("max_retries", int, lambda v: v >= 0, ">= 0"),
    ("max_tokens", int, lambda v: v >= 1, ">= 1"),
    ("parse_attempts", int, lambda v: v >= 1, ">= 1"),
    ("temperature", float, lambda v: v >= 0, ">= 0"),
    ("min_criteria", int, lambda v: v >= 1, ">= 1"),
    ("max_criteria", int, lambda v: v >= 1, ">= 1"),
    ("compact_chars", int, lambda v: v >= 0, ">= 0 (0 = off)"),
)


def _number(name: str, value, kind, ok, rule: str):
    """``value`` as ``kind`` if it satisfies ``ok``; else a one-line RewardError naming the setting."""
    try:
        if isinstance(value, bool) or (kind is int and isinstance(value, float) and not value.is_integer()):
            raise ValueError
        v = kind(value)
    except (TypeError, ValueError):
        raise RewardError(f"{name}={value!r}: must be a number {rule}") from None
    if not ok(v):
        raise RewardError(f"{name}={value!r}: must be {rule}")
    return v


def make_judge_backend(s: dict, context):
    from clipo_jax.rubrics.registry import make_backend

    if not s["cache_dir"] and context is not None and context.workdir:
        # completions are cached in the run directory: a resumed run replays what it was told
        s = dict(s, cache_dir=os.path.join(context.workdir, "judge_cache"))

    if s["backend"] == "openai":
        return make_backend(
            "openai",
            base_url=s["base_url"],
            model=s["model"],
            max_concurrency=int(s["max_concurrency"]),
            timeout_s=float(s["timeout_s"]),
            max_retries=int(s["max_retries"]),
            cache_dir=s["cache_dir"] or None,
            rng_seed=context.seed if context else 0,
            json_schema=s["json_schema"],
        )
    return make_backend(
        s["backend"],
        model=s["model"] or "smollm2",
        mesh=context.mesh if context else None,
        max_batch=int(s["max_concurrency"]),
        cache_dir=s["cache_dir"] or None,
    )


async def check_reachable(backend) -> None:
    """The judge server must answer (any HTTP status: not every server serves GET /models)
    before the run compiles anything."""
    url = getattr(backend, "base_url", None)
    if not url:
        return
    import httpx

    try:
        async with httpx.AsyncClient(timeout=10.0) as client:
            await client.get(url + "/models")
    except (httpx.HTTPError, httpx.InvalidURL, ValueError) as e:
        raise RewardError(f"judge server {url} is unreachable ({type(e).__name__}: {e})") from None


def _at_least(lo):
    return lambda v: v >= lo


class _DownDetector:
    """Counts consecutive steps in which every judge call failed for a backend reason. A step may
    score several rounds (DAPO refills): its calls are summed over them, so a down judge ends the
    run after ``down_after_steps`` steps, not rounds. A step without calls (all cached) changes
    nothing."""

    def __init__(self, name: str, down_after_steps: int):
        self.name, self.limit = name, max(1, int(down_after_steps))
        self.streak = 0  # finished steps in a row in which every call failed
        self.step, self.calls, self.failures = None, 0, 0  # the current step's sums

    def update(self, step: int, calls: int, backend_failures: int, last_error: str | None) -> None:
        if step != self.step:
            if self.calls > 0:
                self.streak = self.streak + 1 if self.failures == self.calls else 0
            self.step, self.calls, self.failures = step, 0, 0
        self.calls += calls
        self.failures += backend_failures
        if self.calls > 0 and self.failures == self.calls and self.streak + 1 >= self.limit:
            raise RewardError(
                f"reward term {self.name!r}: the judge failed all {self.calls} calls in {self.streak + 1} "
                f"consecutive step(s) (last error: {last_error}); fix the judge and re-run the same command to resume"
            )


@register_reward_term("pairwise_rubric")
class PairwiseRubricTerm(RewardTerm):
    settings_keys = (
        "method",
        "anchor",
        "anchor_index",
        "max_pairs",
        "bt_iters",
        "query_type",
        "ground_truth",
        "cache_size",
        "down_after_steps",
        "error_policy",
        "judge",
    )

    """Settings: ``method`` (anchor | round_robin | bradley_terry), ``anchor`` ("greedy": the
    greedy decode of the prompt, or "sample": response ``anchor_index`` of the group),
    ``max_pairs`` (bradley_terry: pairs sampled per group, 0 = all), ``bt_iters``,
    ``query_type`` (routes the meta-rubric when rows carry none), ``ground_truth`` (pass the
    row's ground truth to the judge's verifiable path), ``cache_size``, ``down_after_steps``,
    ``error_policy`` ("tie" or "exclude": what a failed judgment counts as), ``judge`` (see module
    docstring)."""

    def __init__(self, settings=None, context=None):
        super().__init__(settings, context)
        from clipo_jax.rubrics.group_rewards import GROUP_METHODS
        from clipo_jax.rubrics.judge import JudgeConfig, PairwiseJudge
        from clipo_jax.rubrics.protocol import PromptConfig

        s = self.settings
        self.method = s.get("method", "anchor")
        if self.method not in GROUP_METHODS:
            raise RewardError(f"pairwise_rubric.method={self.method!r}: valid: {sorted(GROUP_METHODS)}")
        self.anchor = s.get("anchor", "greedy")
        if self.anchor not in ("greedy", "sample"):
            raise RewardError(f"pairwise_rubric.anchor={self.anchor!r}: valid: 'greedy', 'sample'")
        self.cache: collections.OrderedDict[tuple, str] = collections.OrderedDict()
        self.cache_size = int(s.get("cache_size", 100_000))
        self.error_policy = s.get("error_policy", "tie")
        if self.error_policy not in ERROR_POLICIES:
            raise RewardError(f"pairwise_rubric.error_policy={self.error_policy!r}: valid: {list(ERROR_POLICIES)}")
        self.down = _DownDetector(
            self.name, _number("down_after_steps", s.get("down_after_steps", 2), int, _at_least(1), ">= 1")
        )
        for key, default, least in (
            ("anchor_index", 0, 0),
            ("max_pairs", 0, 0),
            ("bt_iters", BT_ITERS, 1),
            ("cache_size", 100_000, 0),
        ):
            _number(f"pairwise_rubric.{key}", s.get(key, default), int, _at_least(least), f">= {least}")
        self.judge_cfg = judge_settings(s)
        self.backend = make_judge_backend(self.judge_cfg, context)
        if self.judge_cfg["backend"] == "logit":  # generation-free: labels from next-token logits
            from clipo_jax.rubrics.logit_judge import LogitJudge

            self.judge = LogitJudge(
                self.backend,
                max_pairs_per_pass=int(self.judge_cfg["max_concurrency"]),
                max_criteria=int(self.judge_cfg["max_criteria"]),
            )
            return
        self.judge = PairwiseJudge(
            self.backend,
            JudgeConfig(
                protocol=self.judge_cfg["protocol"],
                max_tokens=int(self.judge_cfg["max_tokens"]),
                parse_attempts=int(self.judge_cfg["parse_attempts"]),
                temperature=float(self.judge_cfg["temperature"]),
                seed=context.seed if context else 0,
                use_ground_truth=bool(s.get("ground_truth", False)),
                prompt=PromptConfig(
                    min_criteria=int(self.judge_cfg["min_criteria"]),
                    max_criteria=int(self.judge_cfg["max_criteria"]),
                    compact_chars=int(self.judge_cfg["compact_chars"]),
                ),
            ),
        )

    @property
    def needs_greedy_anchor(self) -> bool:
        return self.method == "anchor" and self.anchor == "greedy"

    def check_row(self, row: dict, where: str) -> None:
        from clipo_jax.rubrics import pvr

        if "prompt" not in row and "messages" not in row:
            raise RewardError(f"{where}: reward term 'pairwise_rubric' needs 'prompt' or 'messages'")
        cons = row.get("constraints")
        if cons is not None and (
            not isinstance(cons, list)
            or not all(isinstance(c, dict) and ("type" in c or "id" in c or pvr.is_nl_constraint(c)) for c in cons)
        ):
            raise RewardError(
                f"{where}: 'constraints' must be a list of {{'type': ...}} (programmatic), {{'rule': <text>}} "
                f"(written in words) or IF-style {{'id': ..., 'kwargs': ...}} objects, got {str(cons)[:120]}"
            )
        unknown = sorted({str(c["type"]) for c in cons or () if "type" in c and c["type"] not in pvr.CONSTRAINTS})
        if unknown:  # the judge would warn and judge without any constraint of the row
            raise RewardError(f"{where}: unknown constraint type(s) {unknown}; known: {sorted(pvr.CONSTRAINTS)}")

    async def preflight(self) -> None:
        await check_reachable(self.backend)

    def _group_pairs(self, g: int, group: int, step: int) -> tuple[list[tuple[int, int]], int]:
        """(i, j) index pairs of one group; index g is the greedy anchor when there is one."""
        from clipo_jax.rubrics.group_rewards import GroupRewardConfig, _pairs_for

        if self.needs_greedy_anchor:
            return [(i, g) for i in range(g)], g + 1
        max_pairs = int(self.settings.get("max_pairs", 0)) or None
        cfg = GroupRewardConfig(
            method=self.method,
            anchor_index=int(self.settings.get("anchor_index", 0)),
            max_pairs=max_pairs,
            seed=hash((self.context.seed if self.context else 0, step, group)) & 0x7FFFFFFF,
        )
        return _pairs_for(self.method, g, cfg), g

    async def score(self, batch: RewardBatch) -> TermOutput:
        from clipo_jax.rubrics import pvr
        from clipo_jax.rubrics.group_rewards import GroupRewardConfig, pairwise_rewards
        from clipo_jax.rubrics.judge import PairInput

        t0 = time.perf_counter()
        G = batch.group_size
        if self.needs_greedy_anchor and batch.anchors is None:
            raise RewardError("pairwise_rubric with anchor='greedy' needs the rollout's greedy anchors")
        if self.method == "anchor" and not self.needs_greedy_anchor and int(self.settings.get("anchor_index", 0)) >= G:
            raise RewardError(
                f"pairwise_rubric.anchor_index={self.settings.get('anchor_index')} is not a response of a group of {G}"
            )
        groups, todo, hits = [], {}, {}  # todo: cache key -> PairInput of the unique pairs to judge
        same_free = cache_hits = duplicates = 0
        for gi in range(batch.n_groups):
            texts = list(batch.responses[gi * G : (gi + 1) * G])
            if self.needs_greedy_anchor:
                texts.append(batch.anchors[gi])
            index, n = self._group_pairs(G, gi, batch.step)
            row = batch.rows[gi]
            query = batch.prompt(gi)
            qtype = row.get("query_type") or self.settings.get("query_type") or None
            gt = row.get("ground_truth") if self.settings.get("ground_truth", False) else None
            gt = None if gt is None else str(gt)
            # typed and written-in-words ones; IF-style {"id", "kwargs"} ones are the pvr term's
            cons = [c for c in row.get("constraints") or () if "type" in c or pvr.is_nl_constraint(c)] or None
            cons_key = json.dumps(cons, sort_keys=True) if cons else ""
            keyed = []
            for i, j in index:
                a, b = texts[i], texts[j]
                if a == b:
                    keyed.append((i, j, None, False))
                    same_free += 1
                    continue
                flipped = b < a
                key = (query, qtype, gt, cons_key) + ((b, a) if flipped else (a, b))
                keyed.append((i, j, key, flipped))
                if key in hits or key in todo:
                    duplicates += 1
                elif key in self.cache:
                    cache_hits += 1
                    hits[key] = self.cache[key]  # copied now: inserts below may evict it
                    self.cache.move_to_end(key)
                else:
                    first, second = key[4], key[5]
                    todo[key] = PairInput(query, first, second, query_type=qtype, ground_truth=gt, constraints=cons)
            groups.append((keyed, n))
        keys = list(todo)
        results = await self.judge.judge_pairs([todo[k] for k in keys], max_pairs_in_flight=max(len(keys), 1))
        verdicts, failed_keys = dict(hits), set()
        parse_fail = backend_fail = pair_fail = n_errors = llm_calls = 0
        latency, last_error = 0.0, None
        for k, r in zip(keys, results):
            latency += r.wall_s
            # ground-truth / constraint shortcuts never call the LLM; a pair that raised inside
            # the judge ("error" path) was meant to, and failed
            llm_calls += r.path in ("pairwise", "error")
            verdicts[k] = r.verdict
            if r.verdict == "error":  # a failed judgment: counted, never cached
                failed_keys.add(k)
                n_errors += 1
                dirs = [d for d in (r.forward, r.backward) if d is not None]
                kinds = [d.error_kind for d in dirs if d.error_kind]
                if r.path == "error":
                    pair_fail += 1
                    last_error = (r.pointwise or {}).get("error") or last_error
                elif kinds and all(kd == "parse" for kd in kinds):
                    parse_fail += 1
                elif kinds:
                    backend_fail += 1
                    last_error = next((d.error for d in dirs if d.error_kind and d.error_kind != "parse"), None)
            else:
                self.cache[k] = r.verdict
                if len(self.cache) > self.cache_size:
                    self.cache.popitem(last=False)
        self.down.update(batch.step, llm_calls, backend_fail + pair_fail, last_error)
        flip = {"first": "second", "second": "first", "same": "same", "error": "error"}
        B = len(batch)
        values = np.zeros(B, np.float32)
        failed = np.zeros(B, bool)
        n_same = n_pairs = n_same_judged = n_judged = 0
        cfg = GroupRewardConfig(
            method=self.method, bt_iters=int(self.settings.get("bt_iters", BT_ITERS)), error_policy=self.error_policy
        )
        for gi, (keyed, n) in enumerate(groups):
            triples = []
            for i, j, key, flipped in keyed:
                if key is None:
                    v = "same"
                else:
                    v = verdicts[key]
                    v = flip[v] if flipped else v
                    if key in failed_keys:
                        for idx in (i, j):
                            if idx < G:
                                failed[gi * G + idx] = True
                triples.append((i, j, v))
                counted = apply_error_policy(v, self.error_policy)
                if counted is None:  # an error left out under the "exclude" policy
                    continue
                n_same += counted == "same"
                n_pairs += 1
                if key is not None:
                    n_same_judged += counted == "same"
                    n_judged += 1
            values[gi * G : (gi + 1) * G] = pairwise_rewards(self.method, n, triples, cfg)[:G]
        metrics = {
            "same_ratio": n_same / max(n_pairs, 1),  # identical responses count as same (errors: by policy)
            "same_ratio_judged": n_same_judged / max(n_judged, 1),  # pairs with a judge verdict only
            "pairs": float(n_pairs),
            "calls": float(len(keys)),
            "cache_hits": float(cache_hits),
            "duplicates": float(duplicates),
            "identical_free": float(same_free),
            "parse_failures": float(parse_fail),
            "backend_failures": float(backend_fail),
            "pair_failures": float(pair_fail),  # pairs that raised inside the judge (the "error" path)
            "errors": float(n_errors),  # pairs judged this step whose judgment failed
            "latency_mean_s": latency / max(len(keys), 1),
            "wall_s": time.perf_counter() - t0,
        }
        return TermOutput(values=values, failed=failed, metrics=metrics)

    async def aclose(self) -> None:
        await self.backend.aclose()


@register_reward_term("checklist_rubric")
class ChecklistRubricTerm(RewardTerm):
    """Pointwise checklist rubrics (Rubrics as Rewards): rows carry ``rubric`` items
    ``[{"criterion": str, "weight": float}, ...]``; the score is in [0, 1]. Settings:
    ``down_after_steps``, ``judge`` (see module docstring)."""

    required_fields = ("rubric",)
    settings_keys = ("down_after_steps", "judge")

    def __init__(self, settings=None, context=None):
        super().__init__(settings, context)
        from clipo_jax.rubrics.checklist import ChecklistConfig, ChecklistScorer

        self.judge_cfg = judge_settings(self.settings)
        self.backend = make_judge_backend(self.judge_cfg, context)
        self.scorer = ChecklistScorer(
            self.backend,
            ChecklistConfig(
                max_tokens=int(self.judge_cfg["max_tokens"]),
                parse_attempts=int(self.judge_cfg["parse_attempts"]),
                temperature=float(self.judge_cfg["temperature"]),
                max_in_flight=int(self.judge_cfg["max_concurrency"]),
            ),
        )
        self.down = _DownDetector(
            self.name, _number("down_after_steps", self.settings.get("down_after_steps", 2), int, _at_least(1), ">= 1")
        )
        self._parsed: dict[int, Any] = {}

    def check_row(self, row: dict, where: str) -> None:
        super().check_row(row, where)
        from clipo_jax.rubrics.checklist import ChecklistError, parse_rubric

        try:
            parse_rubric(row["rubric"], where)
        except ChecklistError as e:
            raise RewardError(str(e)) from None

    async def preflight(self) -> None:
        await check_reachable(self.backend)

    async def score(self, batch: RewardBatch) -> TermOutput:
        from clipo_jax.rubrics.checklist import parse_rubric

        t0 = time.perf_counter()
        G = batch.group_size
        items = [parse_rubric(row["rubric"], f"group {g}") for g, row in enumerate(batch.rows)]
        before = self.scorer.counters.as_dict()
        requests = [(batch.prompt(i // G), text, items[i // G]) for i, text in enumerate(batch.responses)]
        results = await self.scorer.score_many(requests)
        after = self.scorer.counters.as_dict()
        delta = {k: after[k] - before.get(k, 0) for k in after if isinstance(after[k], (int, float))}
        scores = np.array([np.nan if r.score is None else r.score for r in results], np.float32)
        failed = np.isnan(scores)
        kinds = [r.error_kind for r in results if r.error_kind]
        backend_fail = sum(k != "parse" for k in kinds)
        self.down.update(batch.step, len(results), backend_fail, kinds[-1] if kinds else None)
        values = scores.reshape(-1, G)
        ok = ~np.isnan(values)
        count = ok.sum(axis=1, keepdims=True)
        group_mean = np.where(
            count > 0, np.where(ok, values, 0.0).sum(axis=1, keepdims=True) / np.maximum(count, 1), 0.0
        )
        values = np.where(np.isnan(values), group_mean, values).reshape(-1)
        metrics = {f"judge_{k}": float(v) for k, v in delta.items()}
        metrics["wall_s"] = time.perf_counter() - t0
        return TermOutput(values=values.astype(np.float32), failed=failed, metrics=metrics)

    async def aclose(self) -> None:
        await self.backend.aclose()
