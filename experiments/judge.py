r"""Runs the OpenRS judge over a JudgeBench-format JSONL file.

    python -m experiments.judge --input=/work/shared/data/judgebench/gpt.jsonl \
        --base_url=http://127.0.0.1:8080/v1 --model=smollm2 --output_dir=/tmp/judge_run \
        --workers=8 --limit=20

Writes ``DIR/verdicts.jsonl`` (one line per pair, appended as each pair finishes, so ``--resume``
loses nothing) and ``DIR/summary.json`` (accuracy with ties excluded, Same ratio, parse-failure
rate, calls, tokens, wall time).  Rows need ``prompt``, ``chosen``, ``rejected``; optional
``question_id``, ``query_type``, ``ground_truth``, ``constraints``.  Row order is shuffled per pair
(seeded) so that "chosen" is not always shown first; the label is kept accordingly.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time

from absl import app, flags

from clipo_jax.rubrics import JudgeConfig, OpenAIHTTPBackend, PairwiseJudge
from clipo_jax.rubrics.judge import PairResult, summarise
from clipo_jax.rubrics.pairs import RowError, read_pair_rows, to_pair
from clipo_jax.rubrics.protocol import PromptConfig

FLAGS = flags.FLAGS
flags.DEFINE_string("input", None, "JudgeBench-format JSONL file.")
flags.DEFINE_string("base_url", None, "OpenAI-compatible server, e.g. http://127.0.0.1:8080/v1.")
flags.DEFINE_string("model", None, "Model name sent to the server.")
flags.DEFINE_string("output_dir", None, "Where verdicts.jsonl and summary.json go.")
flags.DEFINE_bool("resume", False, "Skip pairs already in DIR/verdicts.jsonl.")
flags.DEFINE_integer("workers", 8, "Concurrent judge calls (bounded).")
flags.DEFINE_integer("limit", 0, "Judge only the first N rows (0 = all).")
flags.DEFINE_integer("max_tokens", 4096, "Max new tokens per judge call.")
flags.DEFINE_float("timeout_s", 300.0, "Per-call timeout in seconds.")
flags.DEFINE_integer("max_retries", 10, "Retries per call for timeouts / HTTP errors / garbage.")
flags.DEFINE_integer("parse_attempts", 5, "Attempts per direction on unparseable output.")
flags.DEFINE_float("min_score", 0.0, "Verdict threshold m.")
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
    from clipo_jax.rubrics.judge import DirectionResult

    return PairResult(
        verdict=d["verdict"],
        path=d["path"],
        domain=d["domain"],
        forward=DirectionResult(**d["forward"]) if d.get("forward") else None,
        backward=DirectionResult(**d["backward"]) if d.get("backward") else None,
        pointwise=d.get("pointwise"),
        pair_id=d.get("pair_id"),
        wall_s=d.get("wall_s", 0.0),
    )


async def run(rows: list[dict], out_dir: str) -> dict:
    verdict_path = os.path.join(out_dir, "verdicts.jsonl")
    done: dict[str, dict] = {}
    if FLAGS.resume and os.path.exists(verdict_path):
        with open(verdict_path, encoding="utf-8") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                    done[rec["pair_id"]] = rec
                except (json.JSONDecodeError, KeyError):
                    logging.warning("skipping a truncated line in %s", verdict_path)  # killed mid-write
    elif os.path.exists(verdict_path):
        os.remove(verdict_path)
    cache_dir = None if FLAGS.cache_dir == "none" else (FLAGS.cache_dir or os.path.join(out_dir, "cache"))
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
    judge = PairwiseJudge(backend, config)
    pairs, labels = zip(*(to_pair(r, FLAGS.seed) for r in rows)) if rows else ((), ())
    todo = [i for i, p in enumerate(pairs) if p.pair_id not in done]
    logging.info("%d pairs, %d already done, %d to judge", len(pairs), len(pairs) - len(todo), len(todo))
    start = time.perf_counter()
    out = open(verdict_path, "a", encoding="utf-8")

    def write(j: int, res: PairResult):
        i = todo[j]
        rec = res.to_dict()
        rec.update(label=labels[i], correct=res.verdict == labels[i], query_type=pairs[i].query_type)
        out.write(json.dumps(rec, ensure_ascii=False) + "\n")
        out.flush()  # appended as each pair finishes: resume loses nothing
        done[res.pair_id] = rec

    try:
        await judge.judge_pairs(
            [pairs[i] for i in todo], max_pairs_in_flight=max(FLAGS.workers, 1) * 2, on_result=write
        )
    finally:
        out.close()
        await backend.aclose()
    wall = time.perf_counter() - start
    results = [result_from_dict(done[p.pair_id]) for p in pairs]
    summary = summarise(results, labels)
    summary.update(
        input=FLAGS.input,
        model=FLAGS.model,
        protocol=FLAGS.protocol,
        wall_s=wall,
        judged_this_run=len(todo),
        calls=backend.stats.requests,
        backend=backend.stats.as_dict(),
        judge=judge.counters.as_dict(),
        pairs_per_s=len(todo) / wall if wall > 0 else 0.0,
    )
    by_type: dict[str, list] = {}
    for r, l, p in zip(results, labels, pairs):
        by_type.setdefault((p.query_type or "none").split("-")[0], []).append((r, l))
    summary["by_source"] = {k: summarise([r for r, _ in v], [l for _, l in v])["accuracy"] for k, v in by_type.items()}
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def main(argv):
    del argv
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request otherwise
    for name in ("input", "base_url", "model", "output_dir"):
        if not getattr(FLAGS, name):
            raise app.UsageError(f"--{name} is required")
    os.makedirs(FLAGS.output_dir, exist_ok=True)
    try:
        rows = read_pair_rows(FLAGS.input, FLAGS.limit)
    except (RowError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    s = asyncio.run(run(rows, FLAGS.output_dir))
    print(
        f"pairs {s['n_pairs']}  accuracy (ties excluded) {s['accuracy']:.3f}  same ratio {s['same_ratio']:.3f}  "
        f"parse failures {s['parse_failure_rate']:.3f}  backend failures {s['backend_failure_rate']:.3f}"
    )
    print(
        f"calls {s['calls']}  prompt tokens {s['backend']['prompt_tokens']}  completion tokens "
        f"{s['backend']['completion_tokens']}  wall {s['wall_s']:.1f}s  paths {s['paths']}"
    )


if __name__ == "__main__":
    app.run(main)
