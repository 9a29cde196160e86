r"""The reward stage's judge calls: concurrent vs one at a time, side by side in one run.

    python -m experiments.bench_reward_stage                # 128 judged pairs, 0.5 s per call
    python -m experiments.bench_reward_stage --pairs=32 --latency_s=0.2

An OpenAI-compatible HTTP server on 127.0.0.1 (aiohttp, in a child process so that it does not
share the client's interpreter lock) answers every judge call after a fixed delay
(``--latency_s``) with a rule-based judgment (a response containing GOOD wins a core
criterion). One step's batch holds ``--pairs`` judged pairs (groups of 9 responses, each judged
against sample 0 with the ``anchor`` method: 8 pairs a group, 2 calls a pair for the two
orders). Measured, each from a fresh stage (empty cache):

* concurrent: the stage as the trainer runs it (every call of the step in flight at once),
  timed on its second step (the first opens the client);
* sequential: the same stage with the judge limited to one call in flight;
* overlapped: a trainer-like step that starts the stage, runs the policy's reference
  log-prob pass on the tiny demo model meanwhile, then waits for the rewards.

Target: the concurrent stage adds at most 2x one call's latency per round of calls (one round
here: both orders of every pair go out together), not one latency per pair. The last line is
a JSON summary.
"""

from __future__ import annotations

import json
import logging
import re
import time

from absl import app, flags

from experiments.bench_common import machine

FLAGS = flags.FLAGS
flags.DEFINE_integer("pairs", 128, "Judged pairs in the step (a multiple of 8).")
flags.DEFINE_float("latency_s", 0.5, "Fixed latency of every judge call.")
flags.DEFINE_bool("sequential", True, "Also run the one-call-at-a-time stage (pairs x 2 x latency seconds).")
flags.DEFINE_integer(
    "serve", 0, "Internal: serve the delayed judge on this port (the bench starts it in a child process)."
)


def judgment(user_text: str) -> dict:
    a = re.search(r"<response_a>\n(.*?)\n</response_a>", user_text, re.DOTALL).group(1)
    b = re.search(r"<response_b>\n(.*?)\n</response_b>", user_text, re.DOTALL).group(1)
    label = "A" if "GOOD" in a and "GOOD" not in b else ("B" if "GOOD" in b and "GOOD" not in a else "S")
    crit = {"id": "c1", "title": "quality", "type": "core", "evidence": "e", "reason": "r", "label": label}
    crit["score"] = 0 if label == "S" else 2
    intent = {"task": "t", "explicit_requirements": [], "implicit_requirements": []}
    return {"intent": intent, "differences": ["d"], "criteria": [crit]}


def serve_delayed_judge(port: int, delay_s: float) -> None:
    """Serve until killed: every chat completion answers after ``delay_s`` seconds.

    An asyncio server (aiohttp), so that, like a real inference server, it costs little CPU per
    call; the bench measures the client's stage, not a thread-per-request Python server."""
    import asyncio

    from aiohttp import web

    async def models(request):
        return web.json_response({"data": [{"id": "rule-judge"}]})

    async def chat(request):
        body = await request.json()
        await asyncio.sleep(delay_s)
        content = json.dumps(judgment(body["messages"][-1]["content"]))
        choice = {"message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
        return web.json_response({"choices": [choice]})

    server = web.Application()
    server.router.add_get("/v1/models", models)
    server.router.add_post("/v1/chat/completions", chat)
    web.run_app(server, host="127.0.0.1", port=port, print=None, access_log=None, backlog=4096)


def make_batch(n_groups: int, step: int = 0):
    import numpy as np

    from clipo_jax.rewards.stage import RewardBatch

    G = 9
    rows = [{"prompt": f"Write a short note number {g}."} for g in range(n_groups)]
    responses = [
        f"step {step} group {g} response {i}" + (" GOOD" if i % 3 == 1 else "")
        for g in range(n_groups)
        for i in range(G)
    ]
    lengths = np.full(len(responses), 10)
    return RewardBatch(rows, responses, lengths, np.zeros(len(responses), bool), G, step=step)


def make_stage(url: str, concurrency: int):
    import ml_collections

    from clipo_jax.rewards.stage import RewardContext, RewardStage

    judge = dict(backend="openai", base_url=url, model="rule-judge", max_concurrency=concurrency, max_retries=0)
    cfg = ml_collections.ConfigDict(
        dict(terms={"pairwise_rubric": 1.0}, pairwise_rubric=dict(method="anchor", anchor="sample", judge=judge))
    )
    return RewardStage.from_config(cfg, RewardContext())


def timed_stage(url: str, concurrency: int, n_groups: int) -> tuple[float, dict]:
    """The stage's wall time for one step, measured on its second step (fresh responses, so no
    cache hits): the first step also opens the HTTP client and loads the meta-rubrics."""
    stage = make_stage(url, concurrency)
    try:
        stage.compute(make_batch(n_groups if concurrency > 1 else 1, step=0))  # warm-up
        t0 = time.perf_counter()
        result = stage.compute(make_batch(n_groups, step=1))
        return time.perf_counter() - t0, result.metrics
    finally:
        stage.close()


def overlapped_step(url: str, n_groups: int) -> dict:
    """Start the stage, run the reference log-prob pass of the tiny demo policy, then wait."""
    import jax
    import numpy as np

    from clipo_jax.models import transformer
    from clipo_jax.models.config import ModelConfig
    from clipo_jax.rl.step import response_logprobs

    cfg = ModelConfig(vocab_size=512, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=32, d_ff=384)
    params = transformer.init_params(cfg, jax.random.key(0))
    B, T, N = n_groups * 9, 128, 48
    tokens = np.random.default_rng(0).integers(0, 512, (B, T)).astype(np.int32)
    valid = np.ones((B, T), bool)
    logp = jax.jit(lambda p, t, v: response_logprobs(p, cfg, t, v, N, 1.0))
    jax.block_until_ready(logp(params, tokens, valid))  # compiled outside the timing

    t0 = time.perf_counter()
    for _ in range(3):
        jax.block_until_ready(logp(params, tokens, valid))
    policy_s = (time.perf_counter() - t0) / 3

    stage = make_stage(url, 10_000)
    try:
        t0 = time.perf_counter()
        pending = stage.start(make_batch(n_groups, step=2))
        for _ in range(3):  # ref + old log-probs + (stand-in for) the CLIPO head
            jax.block_until_ready(logp(params, tokens, valid))
        t_policy = time.perf_counter() - t0
        pending.result()
        wall = time.perf_counter() - t0
    finally:
        stage.close()
    return {"policy_s": 3 * policy_s, "policy_in_step_s": t_policy, "step_s": wall}


def main(argv):
    del argv
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request otherwise
    if FLAGS.pairs % 8:
        raise app.UsageError("--pairs must be a multiple of 8 (groups of 9, anchor method)")
    if FLAGS.latency_s <= 0:
        raise app.UsageError("--latency_s must be > 0 (the figures are in units of one call's latency)")
    n_groups = FLAGS.pairs // 8
    if FLAGS.serve:  # the child: serve until killed
        serve_delayed_judge(FLAGS.serve, FLAGS.latency_s)
        return
    import socket
    import subprocess
    import sys

    import httpx

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    child = subprocess.Popen(
        [sys.executable, "-m", "experiments.bench_reward_stage", f"--serve={port}", f"--latency_s={FLAGS.latency_s}"]
    )
    try:  # the server child goes with the bench, whatever ends it
        url = f"http://127.0.0.1:{port}"
        for _ in range(200):
            try:
                httpx.get(url + "/v1/models", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        lat = FLAGS.latency_s
        print(f"machine: {machine()}; judge latency {lat} s per call; {FLAGS.pairs} pairs = {2 * FLAGS.pairs} calls")

        conc_s, m = timed_stage(url, 10_000, n_groups)
        calls = int(m["reward/pairwise_rubric/calls"])
        failed = int(m["reward/pairwise_rubric/parse_failures"] + m["reward/pairwise_rubric/backend_failures"])
        if failed:  # a judgment that does not parse is retried: the timing would count two rounds
            raise SystemExit(f"{failed} judged pairs failed (parse or backend); the benchmark needs valid judgments")
        print(f"concurrent : {conc_s:7.2f} s  ({conc_s / lat:5.2f} x one call latency)")
        seq_s = None
        if FLAGS.sequential:
            seq_s, _ = timed_stage(url, 1, n_groups)
            print(f"sequential : {seq_s:7.2f} s  ({seq_s / lat:5.1f} x one call latency)")
            print(f"speed-up   : {seq_s / conc_s:7.1f} x")
        ov = overlapped_step(url, n_groups)
        print(
            f"overlapped step: {ov['step_s']:.2f} s = max(policy {ov['policy_s']:.2f} s, judge {conc_s:.2f} s) "
            f"rather than their sum {ov['policy_s'] + conc_s:.2f} s"
        )
        added = conc_s / lat
        print(
            f"target: concurrent stage <= 2 x latency per round of calls: {added:.2f} x -> {'met' if added <= 2 else 'NOT met'}"
        )
        print(
            json.dumps(
                {
                    "bench": "reward_stage",
                    "machine": machine(),
                    "pairs": FLAGS.pairs,
                    "judge_calls": 2 * calls,
                    "latency_s": lat,
                    "concurrent_s": round(conc_s, 3),
                    "sequential_s": None if seq_s is None else round(seq_s, 3),
                    "ratio": None if seq_s is None else round(seq_s / conc_s, 2),
                    "concurrent_in_latencies": round(added, 3),
                    "overlapped_step_s": round(ov["step_s"], 3),
                    "policy_work_s": round(ov["policy_s"], 3),
                    "target_met": added <= 2,
                }
            )
        )
    finally:
        child.kill()


if __name__ == "__main__":
    app.run(main)
