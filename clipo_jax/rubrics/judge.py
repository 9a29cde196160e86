"""The OpenRS pairwise judge (arXiv 2602.14069): paths by query kind, both orders (A/B swap), failures as errors.

    judge = PairwiseJudge(OpenAIHTTPBackend(base_url, model), JudgeConfig())
    result = await judge.judge_pair(PairInput(query, first, second, query_type="livebench-math",
                                              ground_truth="42"))
    result.verdict  # "first" | "second" | "same" | "error"

A direction whose call fails for good, or whose output still does not parse after the retries,
makes the pair an ``"error"`` verdict: the other direction alone never decides it.  An unexpected
error inside one pair (a bug, a bad query type) is an ``"error"`` too, on the ``error`` path,
never the end of a batch.  Both are counted in ``judge.counters`` and never raise.  What an error
counts as is the consumer's choice (``types.apply_error_policy``): ``summarise`` leaves errors out
of accuracy under ``error_policy="exclude"`` (JudgeBench, PPE) and counts them as ties under
``"tie"``; RL group rewards count them as ties by default.  An LLM answer check that fails on the
ground-truth path does not decide the pair either: the pair goes on to the next path.
``PairResult.failed`` says whether a pair is worth judging again.

Ground truth, any domain: programmatic first (the math verifier, a choice letter, an exact
match; ``GROUND_TRUTH_KIND`` / ``pvr.ground_truth_score``), then the LLM compares the response
with the ground truth (code included); a pair the check leaves undecided goes on.  Constraints:
programmatic ones (``pvr.CONSTRAINTS``) are the fast path, checked in worker threads; one written
in words, ``{"rule": ..., "need_code": false}``, is an awaited LLM yes/no check, and with
``"need_code": true`` the LLM writes ``check(response)`` once per constraint text, run in the
sandbox for each response (a checker that fails falls back to the yes/no check).  Sympy and the
sandboxed subprocesses run in worker threads, off the event loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import time
from typing import Any, Awaitable, Callable, Sequence

from clipo_jax.rubrics import pvr
from clipo_jax.rubrics.aggregation import check_min_score, score_comparison, verdict
from clipo_jax.rubrics.meta_rubric import MetaRubric, builtin_meta_rubric, domain_for_query_type
from clipo_jax.rubrics.protocol import (
    ANSWER_CHECK_SCHEMA,
    ANSWER_CHECK_TEMPLATE,
    CONSTRAINT_CHECK_SCHEMA,
    INTENT_SCHEMA,
    JudgeParseError,
    PromptConfig,
    build_answer_check_messages,
    build_checker_code_messages,
    build_constraint_check_messages,
    build_intent_messages,
    build_pairwise_messages,
    extract_checker_code,
    judgment_schema,
    parse_judgment,
    parse_yes_no,
)
from clipo_jax.rubrics.sandbox import SandboxLimits, run_checker
from clipo_jax.rubrics.types import (  # noqa: F401 - the pair types are re-exported from here
    DEFAULT_JUDGE_MAX_TOKENS,
    Backend,
    BackendError,
    CompletionRequest,
    DirectionResult,
    PairInput,
    PairResult,
    apply_error_policy,
    check_error_policy,
    forget_cached,
)

log = logging.getLogger(__name__)

# How the ground truth is checked programmatically, by domain; any other domain uses "any"
# (pvr.ground_truth_score: only what a program can tell for sure, the LLM compares the rest).
# Factual QA uses "any" too: its ground truths are choice letters (MMLU-Pro, GPQA), checked as
# such, or text ("Canberra") that no math verifier can judge.
GROUND_TRUTH_KIND = {"math": "math", "reasoning": "bold"}

# The LLM answer check's schema and prompt (protocol.py holds them).
LLM_CHECK_SCHEMA = ANSWER_CHECK_SCHEMA
LLM_CHECK_PROMPT = ANSWER_CHECK_TEMPLATE


def ground_truth_kind(domain: str) -> str:
    return GROUND_TRUTH_KIND.get(domain, "any")


@dataclasses.dataclass(frozen=True)
class JudgeConfig:
    protocol: str = "single"  # "single": one call per direction; "two_stage": an
    # answer-blind intent call first, shared by both orders
    max_tokens: int = DEFAULT_JUDGE_MAX_TOKENS  # new tokens per judgment (the release's 8192)
    intent_max_tokens: int = 512
    parse_attempts: int = 5  # attempts per direction on unparseable output
    min_score: float = 0.0  # verdict threshold m
    seed: int = 0
    temperature: float = 0.0
    use_json_schema: bool = True
    use_ground_truth: bool = True  # paths by query kind: verifiable path when a ground truth is given
    llm_answer_check: bool = True  # LLM check when a program cannot compare with the ground truth
    answer_check_max_tokens: int = 64
    constraint_check_max_tokens: int = 64  # the yes/no check of a constraint written in words
    checker_code_max_tokens: int = 1024  # the checker code written for a need_code constraint
    sandbox_limits: SandboxLimits = SandboxLimits()  # bound each run of LLM-written checker code
    prompt: PromptConfig = PromptConfig()

    def __post_init__(self):
        if self.protocol not in ("single", "two_stage"):
            raise ValueError(f"JudgeConfig.protocol must be 'single' or 'two_stage', got {self.protocol!r}")
        if self.parse_attempts < 1:
            raise ValueError("JudgeConfig.parse_attempts must be >= 1")
        if self.max_tokens < 1 or self.intent_max_tokens < 1:
            raise ValueError("JudgeConfig.max_tokens and intent_max_tokens must be >= 1")
        try:  # a negative threshold would make a tie in both orders a win of the first response
            check_min_score(self.min_score)
        except ValueError as e:
            raise ValueError(f"JudgeConfig: {e}") from None


@dataclasses.dataclass
class JudgeCounters:
    pairs: int = 0
    directions: int = 0
    parse_failures: int = 0  # directions that never parsed
    parse_retries: int = 0
    unknown_criterion_types: int = 0  # criteria whose type was none of the four: counted as important
    backend_failures: int = 0  # directions whose call failed for good
    intent_failures: int = 0
    llm_answer_checks: int = 0
    llm_answer_check_failures: int = 0
    constraint_errors: int = 0  # constraint checks that raised (malformed constraint): path skipped
    nl_constraint_checks: int = 0  # yes/no LLM checks of a constraint written in words
    nl_constraint_check_failures: int = 0  # ... whose call or answer failed: the response is undecided
    checker_code_writes: int = 0  # checker code written by the LLM (once per constraint text)
    checker_code_failures: int = 0  # code not written / not compiling, or a run that failed:
    # each counted failure falls back to the yes/no check
    checker_runs: int = 0  # sandboxed runs of LLM-written checker code
    pair_errors: int = 0  # pairs that raised inside the judge: an "error" on the "error" path
    error_pairs: int = 0  # pairs whose verdict is "error" (a failed direction, or pair_errors)
    path_ground_truth: int = 0
    path_constraints: int = 0
    path_pairwise: int = 0

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


class PairwiseJudge:
    def __init__(self, backend: Backend, config: JudgeConfig = JudgeConfig()):
        self.backend = backend
        self.config = config
        self.counters = JudgeCounters()
        self._intent_tasks: dict[str, asyncio.Future] = {}
        # Checker code per constraint text (None: no usable code), written once and shared.
        self._checker_tasks: dict[str, asyncio.Future] = {}

    # -- helpers ---------------------------------------------------------------------------
    def _request(self, messages, max_tokens, schema, seed, name="judgment") -> CompletionRequest:
        return CompletionRequest(
            messages=messages,
            max_tokens=max_tokens,
            temperature=self.config.temperature,
            top_p=1.0,
            seed=seed,
            schema_name=name,
            json_schema=schema if self.config.use_json_schema else None,
        )

    async def _intent(self, query: str) -> dict[str, Any] | None:
        """Answer-blind intent analysis, computed once per distinct query (deduplicated); a failed
        one is not remembered, so the query's next pair asks again (a judge lives for a whole RL
        run: one server blip must not leave a prompt without intent for good)."""
        task = self._intent_tasks.get(query)
        if task is None:
            task = self._intent_tasks[query] = asyncio.ensure_future(self._intent_call(query))
        intent = await task
        if intent is None and self._intent_tasks.get(query) is task:
            del self._intent_tasks[query]
        return intent

    async def _intent_call(self, query: str) -> dict[str, Any] | None:
        for attempt in range(self.config.parse_attempts):
            req = self._request(
                build_intent_messages(query, self.config.prompt),
                self.config.intent_max_tokens,
                INTENT_SCHEMA,
                self.config.seed + attempt,
                "intent",
            )
            try:
                resp = await self.backend.complete(req)
                return parse_judgment(resp.text, INTENT_SCHEMA)
            except JudgeParseError as e:
                forget_cached(self.backend, req)
                last = e
            except BackendError as e:
                last = e
        self.counters.intent_failures += 1
        log.warning("intent analysis failed (%s); judging without it", last)
        return None

    async def judge_direction(
        self,
        query: str,
        response_a: str,
        response_b: str,
        general: MetaRubric,
        domain: MetaRubric | None,
        intent: dict[str, Any] | None = None,
        reference: str | None = None,
    ) -> DirectionResult:
        """One order: A-side score of ``response_a`` vs ``response_b``."""
        cfg = self.config
        messages = build_pairwise_messages(
            query, response_a, response_b, general, domain, cfg.prompt, intent=intent, reference=reference
        )
        schema = judgment_schema(1, cfg.prompt.max_criteria, compact_chars=cfg.prompt.compact_chars)
        out = DirectionResult(score=0.0, criteria=None, parse_ok=False)
        self.counters.directions += 1
        for attempt in range(cfg.parse_attempts):
            out.attempts = attempt + 1
            # A new seed per attempt: temperature-0 output is otherwise identical (and cached).
            req = self._request(messages, cfg.max_tokens, schema, cfg.seed + attempt)
            try:
                resp = await self.backend.complete(req)
            except BackendError as e:
                # The backend already retried with backoff; this direction failed for good.
                out.error, out.error_kind = str(e), e.kind
                self.counters.backend_failures += 1
                return out
            out.prompt_tokens += resp.prompt_tokens
            out.completion_tokens += resp.completion_tokens
            try:
                if resp.finish_reason == "length":
                    # cut at max_tokens: json-repair would close the JSON after the last whole
                    # criterion, and a partial list of criteria can reverse the verdict
                    raise JudgeParseError(f"judge output cut at max_tokens={cfg.max_tokens}")
                obj = parse_judgment(resp.text, schema)
            except JudgeParseError as e:
                forget_cached(self.backend, req)
                out.error, out.error_kind = str(e), "parse"
                if attempt + 1 < cfg.parse_attempts:
                    self.counters.parse_retries += 1
                continue
            out.criteria = obj["criteria"]
            self.counters.unknown_criterion_types += sum("given_type" in c for c in obj["criteria"])
            out.score = score_comparison(obj["criteria"])
            out.parse_ok, out.error, out.error_kind = True, None, None
            return out
        self.counters.parse_failures += 1
        return out

    async def _llm_answer_check(self, response: str, reference: str, query: str | None, kind: str) -> int | None:
        """+1 / 0 / -1 from the LLM; None when the call or its parse failed.  For a final-answer
        kind the extracted answer is shown when there is one; otherwise the whole response (code,
        prose) with the query, so that the LLM can compare behaviour, not text."""
        self.counters.llm_answer_checks += 1
        shown = response
        if kind in ("math", "auto"):
            shown = pvr.extract_math_answer(response) or response[-2000:]
            query = None
        msgs = build_answer_check_messages(shown, reference, query, self.config.prompt)
        req = self._request(msgs, self.config.answer_check_max_tokens, ANSWER_CHECK_SCHEMA, self.config.seed, "check")
        try:
            resp = await self.backend.complete(req)
            v = parse_judgment(resp.text, ANSWER_CHECK_SCHEMA)["verdict"]
        except (BackendError, JudgeParseError) as e:
            if isinstance(e, JudgeParseError):
                forget_cached(self.backend, req)
            self.counters.llm_answer_check_failures += 1
            return None
        return {"correct": 1, "partial": 0, "wrong": -1}[v]

    async def _ground_truth_scores(self, pair: PairInput, domain: str) -> tuple[list[int | None], list[bool]]:
        """Scores of both responses against the ground truth, and which LLM answer checks failed.

        Programmatic first (the math verifier, a choice letter, an exact match; sympy runs in a
        worker thread), then the LLM check.  A failed LLM check is None (and flagged); so is a
        response that neither can score on a domain without a programmatic kind.  A response
        without an extractable answer (the math verifier finds no final answer, no **bold** span,
        no choice letter) goes to the LLM check; when the check is off it scores -1 in the math
        and reasoning domains and for a choice letter in any domain (unverifiable counts as
        missing), None elsewhere."""
        kind = ground_truth_kind(domain)
        scores: list[int | None] = []
        check_failed = []
        for resp in (pair.first, pair.second):
            s = await asyncio.to_thread(pvr.ground_truth_score, resp, pair.ground_truth, kind)
            failed = False
            if s is None:
                if self.config.llm_answer_check:
                    s = await self._llm_answer_check(resp, pair.ground_truth, pair.query, kind)
                    failed = s is None
                elif kind != "any" or re.fullmatch(r"\s*[A-J]\s*", str(pair.ground_truth)):
                    s = -1  # no extractable final answer (a choice letter included): missing
            scores.append(s)
            check_failed.append(failed)
        return scores, check_failed

    # -- constraints -----------------------------------------------------------------------
    async def _nl_yes_no(self, pair: PairInput, response: str, rule: str) -> bool | None:
        """The LLM's yes/no answer: does ``response`` obey ``rule``; None when it failed."""
        self.counters.nl_constraint_checks += 1
        msgs = build_constraint_check_messages(response, rule, pair.query, self.config.prompt)
        for attempt in range(self.config.parse_attempts):
            req = self._request(
                msgs,
                self.config.constraint_check_max_tokens,
                CONSTRAINT_CHECK_SCHEMA,
                self.config.seed + attempt,
                "constraint_check",
            )
            try:
                return parse_yes_no((await self.backend.complete(req)).text)
            except BackendError:
                break  # the backend already retried
            except JudgeParseError:
                forget_cached(self.backend, req)
                continue
        self.counters.nl_constraint_check_failures += 1
        return None

    async def _checker_code(self, rule: str) -> str | None:
        """Checker code for ``rule``, written once per constraint text (in memory here; the
        request is deterministic, so a backend's disk cache keeps it across runs)."""
        if rule not in self._checker_tasks:
            self._checker_tasks[rule] = asyncio.ensure_future(self._write_checker(rule))
        return await self._checker_tasks[rule]

    async def _write_checker(self, rule: str) -> str | None:
        self.counters.checker_code_writes += 1
        req = CompletionRequest(
            messages=build_checker_code_messages(rule),
            max_tokens=self.config.checker_code_max_tokens,
            temperature=0.0,
            top_p=1.0,
            seed=self.config.seed,
            schema_name="checker_code",
            json_schema=None,
        )
        try:
            code = extract_checker_code((await self.backend.complete(req)).text)
        except BackendError as e:
            code, why = None, f"the call failed ({e})"
        else:
            why = "no `def check(response)` in the answer"
        if code is not None:
            try:
                compile(code, "<checker>", "exec", dont_inherit=True)
            except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
                code, why = None, f"it does not compile ({type(e).__name__}: {e})"
        if code is None:
            self.counters.checker_code_failures += 1
            log.warning("checker code for constraint %r unusable: %s; using the yes/no check", rule[:80], why)
        return code

    async def _nl_constraint(self, pair: PairInput, response: str, constraint: dict) -> bool | None:
        """One constraint written in words: LLM-written checker code run in the sandbox when
        ``need_code`` is true (a checker that fails falls back to the yes/no answer), else the
        LLM's yes/no answer.  None when undecided."""
        rule = constraint["rule"]
        if constraint.get("need_code"):
            code = await self._checker_code(rule)
            if code is not None:
                self.counters.checker_runs += 1
                result = await asyncio.to_thread(run_checker, code, response, self.config.sandbox_limits)
                if result.ok:
                    return result.value is True
                self.counters.checker_code_failures += 1
                log.warning("checker for constraint %r failed (%s); using the yes/no check", rule[:80], result.error)
        return await self._nl_yes_no(pair, response, rule)

    async def _response_passes(self, pair: PairInput, response: str, programmatic: list, nl: list) -> bool | None:
        """Programmatic constraints first (a worker thread; the fast path), then those written in
        words in order, stopping at the first one not met.  None when one could not be decided."""
        if programmatic and not await asyncio.to_thread(pvr.constraints_pass, response, programmatic):
            return False
        undecided = False
        for c in nl:
            ok = await self._nl_constraint(pair, response, c)
            if ok is False:
                return False
            undecided |= ok is None
        return None if undecided else True

    async def _constraints_pass(self, pair: PairInput) -> tuple[bool | None, bool | None] | None:
        """Whether each response passes all hard constraints (both responses at once); a
        response is None when a check in words could not be decided; None if a check raised."""
        nl = [c for c in pair.constraints if pvr.is_nl_constraint(c)]
        programmatic = [c for c in pair.constraints if not pvr.is_nl_constraint(c)]
        try:
            for c in nl:
                if not isinstance(c.get("rule"), str) or not c["rule"].strip():
                    raise pvr.ConstraintError(f"a constraint in words needs a non-empty 'rule', got {c!r}")
            p1, p2 = await asyncio.gather(
                self._response_passes(pair, pair.first, programmatic, nl),
                self._response_passes(pair, pair.second, programmatic, nl),
            )
        except Exception as e:  # noqa: BLE001 - a malformed constraint: judge without it
            self.counters.constraint_errors += 1
            log.warning(
                "pair %s: constraint check failed (%s: %s); judging without constraints",
                pair.pair_id,
                type(e).__name__,
                e,
            )
            return None
        return p1, p2

    # -- main entry ------------------------------------------------------------------------
    async def judge_pair(self, pair: PairInput) -> PairResult:
        start = time.perf_counter()
        self.counters.pairs += 1
        domain_name = "general"
        try:
            domain_name = pair.domain or domain_for_query_type(pair.query_type)
            result = await self._judge_pair(pair, domain_name)
        except Exception as e:  # noqa: BLE001 - one pair never ends a batch
            self.counters.pair_errors += 1
            log.exception("pair %s: the judge raised; an 'error' verdict on the 'error' path", pair.pair_id)
            result = PairResult("error", "error", domain_name, pointwise={"error": f"{type(e).__name__}: {e}"})
        if result.verdict == "error":
            self.counters.error_pairs += 1
        result.pair_id = pair.pair_id
        result.wall_s = time.perf_counter() - start
        return result

    async def _judge_pair(self, pair: PairInput, domain_name: str) -> PairResult:
        cfg = self.config
        pointwise: dict[str, Any] = {}
        if cfg.use_ground_truth and pair.ground_truth not in (None, ""):
            (s1, s2), check_failed = await self._ground_truth_scores(pair, domain_name)
            pointwise["ground_truth"] = [s1, s2]
            if any(check_failed):
                # A failed LLM check is no score: the next path decides (as in the release).
                pointwise["answer_check_failed"] = check_failed
            elif s1 is not None and s2 is not None and s1 != s2:
                self.counters.path_ground_truth += 1
                return PairResult("first" if s1 > s2 else "second", "ground_truth", domain_name, pointwise=pointwise)
        passes = await self._constraints_pass(pair) if pair.constraints else None
        if passes is not None:
            p1, p2 = passes
            pointwise["constraints"] = [p1, p2]
            if p1 is None or p2 is None:
                # An undecided check in words is no result: the pairwise protocol decides.
                pointwise["constraint_check_failed"] = [p1 is None, p2 is None]
            elif p1 != p2:
                self.counters.path_constraints += 1
                return PairResult("first" if p1 else "second", "constraints", domain_name, pointwise=pointwise)
        self.counters.path_pairwise += 1
        general = pair.general or builtin_meta_rubric("general")
        domain = pair.meta_rubric or (None if domain_name == "general" else builtin_meta_rubric(domain_name))
        intent = await self._intent(pair.query) if cfg.protocol == "two_stage" else None
        reference = pair.ground_truth if cfg.prompt.include_reference else None
        fwd, bwd = await asyncio.gather(
            self.judge_direction(pair.query, pair.first, pair.second, general, domain, intent, reference),
            self.judge_direction(pair.query, pair.second, pair.first, general, domain, intent, reference),
        )
        # Both orders or nothing: a failed direction is an error, not a 0 that lets the other decide.
        v = verdict(fwd.score, bwd.score, cfg.min_score) if fwd.parse_ok and bwd.parse_ok else "error"
        return PairResult(
            v,
            "pairwise",
            domain_name,
            forward=fwd,
            backward=bwd,
            pointwise=pointwise or None,
        )

    async def judge_pairs(
        self,
        pairs: Sequence[PairInput],
        max_pairs_in_flight: int = 64,
        on_result: Callable[[int, PairResult], Awaitable[None] | None] | None = None,
    ) -> list[PairResult]:
        """Judges many pairs concurrently (the backend bounds the in-flight calls); ``on_result``
        is called as each pair finishes (e.g. to append it to a JSONL file)."""
        sem = asyncio.Semaphore(max_pairs_in_flight)
        results: list[PairResult | None] = [None] * len(pairs)

        async def one(i: int, p: PairInput):
            async with sem:
                r = await self.judge_pair(p)
            results[i] = r
            if on_result is not None:
                maybe = on_result(i, r)
                if asyncio.iscoroutine(maybe):
                    await maybe

        await asyncio.gather(*(one(i, p) for i, p in enumerate(pairs)))
        return results  # type: ignore[return-value]


def summarise(
    results: Sequence[PairResult], labels: Sequence[str] | None = None, error_policy: str = "exclude"
) -> dict[str, Any]:
    """Accuracy with ties excluded (wins / (wins + losses), as the paper reports), the Same
    ratio, the error rate and the failure rates over directions judged.  ``labels`` are the
    correct verdicts ("first" / "second"); JudgeBench pairs are (chosen, rejected) so all "first".

    ``error_policy`` says what an ``"error"`` verdict counts as: ``"exclude"`` (JudgeBench, PPE)
    leaves it out of every pair count; ``"tie"`` (RewardBench v2) counts it as "same".  Whatever
    the policy, ``accuracy_without_errors`` leaves errors out and ``accuracy_with_errors`` counts
    each as a wrong verdict (wins / (wins + losses + errors)); ``error_rate`` = errors / pairs."""
    check_error_policy(error_policy)
    n = len(results)
    labels = list(labels) if labels is not None else ["first"] * n
    counted = [(apply_error_policy(r.verdict, error_policy), l) for r, l in zip(results, labels)]
    counted = [(v, l) for v, l in counted if v is not None]
    errors = sum(r.verdict == "error" for r in results)
    wins = sum(v == l for v, l in counted)
    same = sum(v == "same" for v, _ in counted)
    losses = len(counted) - wins - same
    dirs = [d for r in results for d in (r.forward, r.backward) if d is not None]
    parse_fail = sum((not d.parse_ok) and d.error_kind == "parse" for d in dirs)
    backend_fail = sum((not d.parse_ok) and d.error_kind not in (None, "parse") for d in dirs)
    n_counted = len(counted)
    return {
        "n_pairs": n,
        "error_policy": error_policy,
        "n_counted": n_counted,  # pairs the policy counts (errors left out under "exclude")
        "accuracy": wins / (wins + losses) if wins + losses else 0.0,
        "accuracy_without_errors": wins / (wins + losses) if wins + losses else 0.0,
        "accuracy_with_errors": wins / (wins + losses + errors) if wins + losses + errors else 0.0,
        "accuracy_ties_as_wrong": wins / n_counted if n_counted else 0.0,
        "wins": wins,
        "losses": losses,
        "same": same,
        "same_ratio": same / n_counted if n_counted else 0.0,
        "errors": errors,
        "error_rate": errors / n if n else 0.0,
        "n_directions": len(dirs),
        "parse_failure_rate": parse_fail / len(dirs) if dirs else 0.0,
        "backend_failure_rate": backend_fail / len(dirs) if dirs else 0.0,
        "paths": {p: sum(r.path == p for r in results) for p in ("ground_truth", "constraints", "pairwise", "error")},
        "failed_pairs": sum(r.failed for r in results),
        "prompt_tokens": sum(d.prompt_tokens for d in dirs),
        "completion_tokens": sum(d.completion_tokens for d in dirs),
    }
