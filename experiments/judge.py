r"""Runs the OpenRS judge over a reward-model benchmark file (JudgeBench, PPE, RewardBench 2, RM-Bench).

    python -m experiments.judge --input=DATA/judgebench/gpt.jsonl \
        --base_url=http://127.0.0.1:8080/v1 --model=smollm2 --output_dir=runs/judge_run \
        --workers=8 --limit=20
    python -m experiments.judge --backend=in-process --model=smollm2 --input=... --output_dir=...

``--backend``: ``openai`` (any OpenAI-compatible server; the default), ``in-process`` (our sampler
on a local checkpoint: ``smollm2``, a ``.gguf`` file or an HF directory, batched up to ``--workers``
requests per sampler call) or ``logit`` (the generation-free verdict from next-token logits).
    python -m experiments.judge --benchmark=rewardbench2 --input=DATA/rewardbench2/test.jsonl ...
    python -m experiments.judge --benchmark=rmbench --input=DATA/rmbench/total_dataset.json ...

``--benchmark`` picks the reader and the scoring (``clipo_jax.rubrics.benchmarks``): ``judgebench``
(the default) and ``ppe`` read JudgeBench-format rows, one pair each; ``rewardbench2`` expands a
row into one pair per (chosen, rejected) combination and scores best-of-N per row; ``rmbench``
expands a row into 9 pairs (chosen style i vs rejected style j) and scores the 3x3 style matrix.
An expanded pair's id is ``<row id>#c<i>r<j>``.  ``summary.json`` has the pair-level numbers below
and ``benchmark``, ``benchmark_score`` (the headline), ``benchmark_score_name`` and
``benchmark_scores`` (per subset or domain, the matrix, ...); rows read but not scored (the
RewardBench 2 ``Ties`` subset) are listed in ``excluded_rows`` with the reason.

Writes ``DIR/verdicts.jsonl`` (one line per pair, appended as each pair finishes, so ``--resume``
loses nothing; rewritten to one line per pair at the end of a run) and ``DIR/summary.json``
(accuracy with ties excluded, with and without errors, the error rate, Same ratio, parse-failure
rate, calls, tokens, wall time, invalid rows).

A pair with a direction whose call failed for good or whose output never parsed has the verdict
``"error"``. ``--error_policy`` says what an error counts as in the headline numbers:
``exclude`` (left out; the default for JudgeBench, PPE and RM-Bench) or ``tie`` (a tie; the
default for RewardBench 2).
``summary.json`` always has ``accuracy_without_errors``, ``accuracy_with_errors`` (an error counted
as a wrong verdict), ``errors`` and ``error_rate``.  JudgeBench rows need ``prompt``, ``chosen``,
``rejected``; optional ``question_id``, ``query_type``, ``ground_truth``, ``constraints`` (see
``clipo_jax.rubrics.pairs``).  Row order is shuffled per pair (seeded by the pair id) so that
"chosen" is not always shown first; the label is kept accordingly.

Every row is validated when read: an invalid row (not UTF-8, not JSON, a missing or mistyped
field, a malformed constraint) is reported as ``file:line: reason`` on stderr, skipped, and listed
in ``summary.json`` (``invalid_rows``); the run goes on with the rest.  Duplicate row ids (both
lines named), an empty file, a JSON list that does not parse, or a file without a row to score
stop the run before any call (exit status 2).  ``--limit=N`` takes the first N rows to score.
``--resume`` keeps the pairs already judged and judges again those whose previous attempt failed
(a backend call that failed for good, output that never parsed, a failed LLM answer check), with
fresh decoding seeds so that a cached bad completion is not reused.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import sys
import time

from absl import app, flags

from clipo_jax.rubrics import JudgeConfig, OpenAIHTTPBackend, PairwiseJudge
from clipo_jax.rubrics.benchmarks import BENCHMARKS, Benchmark, get_benchmark
from clipo_jax.rubrics.judge import DirectionResult, JudgeCounters, PairResult, summarise
from clipo_jax.rubrics.pairs import InvalidRow, RowError, to_pair
from clipo_jax.rubrics.protocol import PromptConfig
from clipo_jax.rubrics.registry import make_backend
from clipo_jax.rubrics.types import DEFAULT_JUDGE_MAX_TOKENS, ERROR_POLICIES

FLAGS = flags.FLAGS
flags.DEFINE_string("input", None, "Benchmark file in the format --benchmark names.")
flags.DEFINE_enum(
    "benchmark",
    "judgebench",
    list(BENCHMARKS),
    "Reader and scoring: judgebench / ppe (JudgeBench-format pairs), rewardbench2 (best-of-N rows), "
    "rmbench (3x3 style matrix).",
)
flags.DEFINE_enum(
    "backend",
    "openai",
    ["openai", "in-process", "logit"],
    "Judge backend: an OpenAI-compatible server, our sampler on a local checkpoint (in-process), or "
    "the generation-free logit verdict (logit).",
)
flags.DEFINE_string("base_url", None, "openai backend: OpenAI-compatible server, e.g. http://127.0.0.1:8080/v1.")
flags.DEFINE_string("model", None, "Model name sent to the server.")
flags.DEFINE_string("output_dir", None, "Where verdicts.jsonl and summary.json go.")
flags.DEFINE_bool("resume", False, "Keep pairs judged in DIR/verdicts.jsonl; judge failed ones again.")
flags.DEFINE_integer("workers", 8, "Concurrent judge calls (bounded).")
flags.DEFINE_integer("limit", 0, "Judge only the first N rows to score (0 = all).")
flags.DEFINE_integer("max_tokens", DEFAULT_JUDGE_MAX_TOKENS, "Max new tokens per judgment (the release's 8192).")
flags.DEFINE_float("timeout_s", 300.0, "Per-call timeout in seconds.")
flags.DEFINE_integer("max_retries", 10, "Retries per call for timeouts / HTTP errors / garbage.")
flags.DEFINE_integer("parse_attempts", 5, "Attempts per direction on unparseable output.")
flags.DEFINE_float("min_score", 0.0, "Verdict threshold m.")
flags.register_validator(
    "min_score", lambda m: m >= 0 and m != float("inf"), "--min_score must be a finite number >= 0"
)
flags.DEFINE_enum(
    "error_policy",
    None,
    list(ERROR_POLICIES),
    "What a failed pair ('error' verdict) counts as: exclude or tie. Default: the benchmark's own "
    "(exclude for judgebench, ppe, rmbench; tie for rewardbench2).",
)
flags.DEFINE_enum("protocol", "single", ["single", "two_stage"], "Judge protocol.")
flags.DEFINE_bool("json_schema", True, "Ask for JSON-schema constrained output when supported.")
flags.DEFINE_bool("ground_truth", True, "Use the verifiable ground-truth path when a row has one.")
flags.DEFINE_integer("max_response_chars", 6000, "Per-response character budget in the prompt.")
flags.DEFINE_integer("compact_chars", 0, "> 0: bound free-text answer fields to this many characters.")
flags.DEFINE_integer("min_criteria", 5, "Criteria asked for, at least.")
flags.DEFINE_integer("max_criteria", 15, "Criteria asked for, at most.")
flags.DEFINE_string("api_key_env", "OPENAI_API_KEY", "Environment variable holding the API key.")
flags.DEFINE_string("cache_dir", None, "Completion cache (default DIR/cache; 'none' disables).")
flags.DEFINE_integer("seed", 0, "Seed for decoding and for the A/B presentation order.")


def result_from_dict(d: dict) -> PairResult:
    res = PairResult(
        verdict=d["verdict"],
        path=d["path"],
        domain=d["domain"],
        forward=DirectionResult(**d["forward"]) if d.get("forward") else None,
        backward=DirectionResult(**d["backward"]) if d.get("backward") else None,
        pointwise=d.get("pointwise"),
        pair_id=d.get("pair_id"),
        wall_s=d.get("wall_s", 0.0),
    )
    # A record whose pair raised or has a failed direction is an error whatever verdict it holds.
    if res.path == "error" or any(x is not None and not x.parse_ok for x in (res.forward, res.backward)):
        res.verdict = "error"
    return res


def load_verdicts(path: str) -> dict[str, dict]:
    """pair_id -> the last usable record of ``path`` (a later line replaces an earlier one)."""
    done: dict[str, dict] = {}
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, start=1):
            try:
                rec = json.loads(line)
                result_from_dict(rec)  # every field the summary needs is there
                done[str(rec["pair_id"])] = rec
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
                logging.warning("%s:%d: unusable verdict line skipped (killed mid-write?)", path, lineno)
    return done


async def run(
    rows: list[dict],
    out_dir: str,
    invalid: list[InvalidRow] = (),
    n_lines: int | None = None,
    benchmark: Benchmark | None = None,
    excluded: list[dict] = (),
    n_rows: int | None = None,
) -> dict:
    """Judges the pair rows (JudgeBench format, one per pair) and writes verdicts.jsonl and
    summary.json; ``benchmark`` scores them (default: --benchmark)."""
    bench = benchmark or get_benchmark(FLAGS.benchmark)
    policy = FLAGS.error_policy or bench.error_policy
    verdict_path = os.path.join(out_dir, "verdicts.jsonl")
    done: dict[str, dict] = {}
    if FLAGS.resume and os.path.exists(verdict_path):
        done = load_verdicts(verdict_path)
    elif os.path.exists(verdict_path):
        os.remove(verdict_path)
    cache_dir = None if FLAGS.cache_dir == "none" else (FLAGS.cache_dir or os.path.join(out_dir, "cache"))
    if FLAGS.backend == "openai":
        backend = OpenAIHTTPBackend(
            FLAGS.base_url,
            FLAGS.model,
            api_key_env=FLAGS.api_key_env,
            max_concurrency=FLAGS.workers,
            timeout_s=FLAGS.timeout_s,
            max_retries=FLAGS.max_retries,
            json_schema="auto" if FLAGS.json_schema else False,
            cache_dir=cache_dir,
            rng_seed=FLAGS.seed,
        )
    else:  # a local checkpoint ("smollm2", a .gguf file or an HF directory), batched by our sampler
        backend = make_backend(FLAGS.backend, model=FLAGS.model, cache_dir=cache_dir, max_batch=FLAGS.workers)
    config = JudgeConfig(
        protocol=FLAGS.protocol,
        max_tokens=FLAGS.max_tokens,
        parse_attempts=FLAGS.parse_attempts,
        min_score=FLAGS.min_score,
        seed=FLAGS.seed,
        use_json_schema=FLAGS.json_schema,
        use_ground_truth=FLAGS.ground_truth,
        prompt=PromptConfig(
            min_criteria=FLAGS.min_criteria,
            max_criteria=FLAGS.max_criteria,
            max_response_chars=FLAGS.max_response_chars,
            compact_chars=FLAGS.compact_chars,
        ),
    )
    # Round r of a pair (r = the times it was judged before and failed) decodes with seeds from
    # seed + r * parse_attempts on, so a retry asks anew instead of reading the cached failure.
    judges: dict[int, PairwiseJudge] = {}

    def judge_for(round_: int):
        if round_ not in judges:
            if FLAGS.backend == "logit":  # deterministic: a retry cannot change its answer
                from clipo_jax.rubrics.logit_judge import LogitJudge

                judges[round_] = LogitJudge(backend, min_score=FLAGS.min_score)
            else:
                judges[round_] = PairwiseJudge(
                    backend, dataclasses.replace(config, seed=FLAGS.seed + round_ * FLAGS.parse_attempts)
                )
        return judges[round_]

    pairs, labels = zip(*(to_pair(r, FLAGS.seed) for r in rows)) if rows else ((), ())
    todo: list[tuple[int, int]] = []  # (pair index, round)
    retried = 0
    relabelled = 0
    for i, p in enumerate(pairs):
        rec = done.get(p.pair_id)
        if rec is not None and rec.get("label") != labels[i]:
            # Judged in the other presentation order (another --seed): its verdict names the other
            # response; judge it again rather than score it against this run's label.
            relabelled += 1
            rec = None
        if rec is None:
            todo.append((i, 0))
        elif result_from_dict(rec).failed:
            todo.append((i, int(rec.get("round", 0)) + 1))
            retried += 1
    logging.info(
        "%d pairs: %d already judged, %d to judge (%d again after a failed attempt, %d shown in the "
        "other order by another --seed)",
        len(pairs),
        len(pairs) - len(todo),
        len(todo),
        retried,
        relabelled,
    )
    start = time.perf_counter()
    out = open(verdict_path, "a", encoding="utf-8")
    sem = asyncio.Semaphore(max(FLAGS.workers, 1) * 2)

    async def one(i: int, round_: int) -> None:
        async with sem:
            res = await judge_for(round_).judge_pair(pairs[i])
        rec = res.to_dict()
        rec.update(label=labels[i], correct=res.verdict == labels[i], query_type=pairs[i].query_type, round=round_)
        if "bench" in rows[i]:
            rec["bench"] = rows[i]["bench"]
        out.write(json.dumps(rec, ensure_ascii=False) + "\n")
        out.flush()  # appended as each pair finishes: resume loses nothing
        done[pairs[i].pair_id] = rec

    completed = False
    try:
        await asyncio.gather(*(one(i, r) for i, r in todo))
        completed = True
    finally:
        out.close()
        await backend.aclose()
    wall = time.perf_counter() - start
    if completed:  # one line per pair: this input's pairs in order, then any others kept
        ids = [p.pair_id for p in pairs]
        id_set = set(ids)
        order = ids + [k for k in done if k not in id_set]
        tmp = verdict_path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            for k in order:
                f.write(json.dumps(done[k], ensure_ascii=False) + "\n")
        os.replace(tmp, verdict_path)
    results = [result_from_dict(done[p.pair_id]) for p in pairs]
    summary = summarise(results, labels, error_policy=policy)
    counters = JudgeCounters()
    for j in judges.values():
        for k, v in getattr(j, "counters", JudgeCounters()).as_dict().items():
            setattr(counters, k, getattr(counters, k) + v)
    summary.update(
        input=FLAGS.input,
        benchmark=bench.name,
        model=FLAGS.model,
        judge_backend=FLAGS.backend,
        protocol=FLAGS.protocol,
        max_tokens=FLAGS.max_tokens,
        wall_s=wall,
        judged_this_run=len(todo),
        retried_failures=retried,
        rejudged_other_order=relabelled,
        n_rows_read=n_lines if n_lines is not None else len(rows) + len(invalid),
        n_rows=n_rows if n_rows is not None else len(rows),
        n_invalid_rows=len(invalid),
        invalid_rows=[r.to_dict() for r in invalid],
        n_excluded_rows=len(excluded),
        excluded_rows=list(excluded),
        calls=backend.stats.requests,
        backend=backend.stats.as_dict(),
        judge=counters.as_dict(),
        pairs_per_s=len(todo) / wall if wall > 0 else 0.0,
    )
    by_type: dict[str, list] = {}
    for r, l, p in zip(results, labels, pairs):
        by_type.setdefault((p.query_type or "none").split("-")[0], []).append((r, l))
    summary["by_source"] = {
        k: summarise([r for r, _ in v], [l for _, l in v], error_policy=policy)["accuracy"] for k, v in by_type.items()
    }
    scores = bench.score(rows, [r.verdict for r in results], labels, policy)
    summary["benchmark_score"] = scores.pop("score")
    summary["benchmark_score_name"] = scores.pop("score_name")
    summary["benchmark_scores"] = scores
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def main(argv):
    del argv
    needed = ("input", "output_dir") + (("base_url", "model") if FLAGS.backend == "openai" else ("model",))
    for name in needed:
        if not getattr(FLAGS, name):
            raise app.UsageError(f"--{name} is required" + (" with --backend=openai" if name == "base_url" else ""))
    os.makedirs(FLAGS.output_dir, exist_ok=True)
    bench = get_benchmark(FLAGS.benchmark)
    try:
        data = bench.read(FLAGS.input, FLAGS.limit)
    except (RowError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    for r in data.invalid[:20]:
        print(f"warning: {data.path}:{r.line}: {r.reason} (row skipped)", file=sys.stderr)
    if len(data.invalid) > 20:
        print(f"warning: {len(data.invalid) - 20} more invalid rows skipped", file=sys.stderr)
    for reason in sorted({r["reason"] for r in data.excluded}):
        n = sum(r["reason"] == reason for r in data.excluded)
        print(f"note: {n} rows excluded: {reason} (listed in summary.json)", file=sys.stderr)
    s = asyncio.run(
        run(data.pairs, FLAGS.output_dir, data.invalid, data.n_rows_read, bench, data.excluded, data.n_rows)
    )
    print(
        f"pairs {s['n_pairs']}  accuracy (ties excluded, errors as {s['error_policy']}) {s['accuracy']:.3f}  "
        f"with errors as wrong {s['accuracy_with_errors']:.3f}  same ratio {s['same_ratio']:.3f}  "
        f"errors {s['errors']} (rate {s['error_rate']:.3f})"
    )
    print(
        f"parse failures {s['parse_failure_rate']:.3f}  backend failures {s['backend_failure_rate']:.3f} "
        "(per direction)"
    )
    print(
        f"calls {s['calls']}  prompt tokens {s['backend']['prompt_tokens']}  completion tokens "
        f"{s['backend']['completion_tokens']}  wall {s['wall_s']:.1f}s  paths {s['paths']}"
    )
    print(f"benchmark {s['benchmark']}: {bench.describe(s['benchmark_scores'] | {'score': s['benchmark_score']})}")
    if s["n_invalid_rows"] or s["failed_pairs"]:
        print(
            f"invalid rows skipped {s['n_invalid_rows']} (listed in summary.json)  "
            f"pairs with a failed attempt {s['failed_pairs']} (--resume judges them again)"
        )


if __name__ == "__main__":
    app.run(main)
