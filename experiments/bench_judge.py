r"""Throughput of the OpenRS judge pieces.

    python -m experiments.bench_judge                      # starts llama-cpp-python on SmolLM2 itself
    python -m experiments.bench_judge --base_url=http://127.0.0.1:8080/v1 --model=NAME

1. Aggregation: pairs/s of the jitted, vectorised ``aggregate_scores`` over padded
   [pairs, criteria] arrays vs the plain Python reference ``score_comparison`` looped per pair.
2. Judge calls/s through the OpenAI HTTP backend at concurrency 1 / 8 / 32 (short requests,
   cache off), ratio vs concurrency 1.  Skipped (null) when no server can be had.
Prints a table, then the benchmark JSON line last.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time

import jax
import numpy as np
from absl import app, flags

from clipo_jax.rubrics import CompletionRequest, OpenAIHTTPBackend, score_comparison
from clipo_jax.rubrics.aggregation import aggregate_scores, pad_criteria
from experiments.bench_common import machine, start_llama_server

FLAGS = flags.FLAGS
flags.DEFINE_integer("pairs", 4096, "Pairs in the aggregation batch.")
flags.DEFINE_integer("criteria", 12, "Criteria per pair (padded to 16).")
flags.DEFINE_string("base_url", None, "OpenAI-compatible server; default: start llama-cpp-python locally.")
flags.DEFINE_string("model", "smollm2", "Model name for the server.")
flags.DEFINE_list("concurrency", ["1", "8", "32"], "Concurrency levels for the HTTP backend.")
flags.DEFINE_integer("calls", 32, "Calls per concurrency level.")
flags.DEFINE_integer("max_tokens", 8, "New tokens per benchmark call.")


def bench_aggregation(n_pairs: int, n_crit: int):
    rng = random.Random(0)
    types = ["core", "important", "highlight", "critical"]
    batch = [
        [
            {
                "type": rng.choice(types[:3]) if rng.random() > 0.05 else "critical",
                "label": rng.choice("ABS"),
                "score": rng.randint(-2, 2),
            }
            for _ in range(n_crit)
        ]
        for _ in range(n_pairs)
    ]
    arrays = pad_criteria(batch)
    dev = {k: jax.device_put(v) for k, v in arrays.items()}
    aggregate_scores(**dev).block_until_ready()  # compile
    reps = 20
    t = time.perf_counter()
    for _ in range(reps):
        out = aggregate_scores(**dev)
    out.block_until_ready()
    jit_s = (time.perf_counter() - t) / reps
    t = time.perf_counter()
    for _ in range(3):
        padded = pad_criteria(batch)
        aggregate_scores(**padded).block_until_ready()
    pad_s = (time.perf_counter() - t) / 3
    t = time.perf_counter()
    ref = [score_comparison(c) for c in batch]
    py_s = time.perf_counter() - t
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-4)  # same numbers, or no benchmark
    return n_pairs / jit_s, n_pairs / pad_s, n_pairs / py_s


async def calls_per_s(url: str, model: str, concurrency: int, n_calls: int, max_tokens: int) -> tuple[float, int]:
    be = OpenAIHTTPBackend(url, model, max_concurrency=concurrency, timeout_s=300, json_schema=False)
    reqs = [
        CompletionRequest(
            messages=[{"role": "user", "content": f"Say one word about the number {i}."}], max_tokens=max_tokens, seed=i
        )
        for i in range(n_calls)
    ]
    await be.complete(reqs[0])  # warm the connection and the server
    t = time.perf_counter()
    await asyncio.gather(*(be.complete(r) for r in reqs[1:]))
    dt = time.perf_counter() - t
    await be.aclose()
    return (n_calls - 1) / dt, be.stats.failures


def main(argv):
    del argv
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request otherwise
    results = []
    jit_ps, pad_ps, py_ps = bench_aggregation(FLAGS.pairs, FLAGS.criteria)
    rows = [
        ("aggregate_scores (jit, arrays on device)", jit_ps, py_ps),
        ("pad_criteria + aggregate_scores (from dicts)", pad_ps, py_ps),
    ]
    print(f"{'case':58s} {'ours':>14s} {'baseline':>14s} {'ratio':>8s}")
    for case, ours, base in rows:
        print(
            f"{case + f' [{FLAGS.pairs}x{FLAGS.criteria}]':58s} {ours:14,.0f} {base:14,.0f} {ours / base:8.1f}  pairs/s"
        )
        results.append(
            {
                "case": f"{case}, {FLAGS.pairs} pairs x {FLAGS.criteria} criteria",
                "ours": ours,
                "baseline": base,
                "baseline_name": "plain Python score_comparison loop",
                "ratio": ours / base,
                "unit": "pairs/s",
            }
        )
    proc, url = (None, FLAGS.base_url) if FLAGS.base_url else start_llama_server()
    try:
        if url is None:
            print("no OpenAI-compatible server (install llama-cpp-python or pass --base_url): HTTP cases skipped")
            for c in FLAGS.concurrency:
                results.append(
                    {
                        "case": f"judge calls via OpenAI HTTP backend, concurrency {c}",
                        "ours": None,
                        "baseline": None,
                        "baseline_name": "concurrency 1",
                        "ratio": None,
                        "unit": "calls/s",
                    }
                )
        else:
            base = None
            for c in map(int, FLAGS.concurrency):
                rate, failures = asyncio.run(calls_per_s(url, FLAGS.model, c, FLAGS.calls, FLAGS.max_tokens))
                base = base or rate
                print(
                    f"{f'HTTP backend calls, concurrency {c} ({FLAGS.max_tokens} new tokens)':58s} {rate:14.2f} "
                    f"{base:14.2f} {rate / base:8.2f}  calls/s  failures={failures}"
                )
                results.append(
                    {
                        "case": f"judge calls via OpenAI HTTP backend ({FLAGS.model}, {FLAGS.max_tokens} new "
                        f"tokens), concurrency {c}",
                        "ours": rate,
                        "baseline": base,
                        "baseline_name": "same backend at concurrency 1",
                        "ratio": rate / base,
                        "unit": "calls/s",
                    }
                )
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(10)
    print(json.dumps({"bench": "judge", "machine": machine(), "results": results}))


if __name__ == "__main__":
    app.run(main)
