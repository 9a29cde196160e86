r"""Decode attention alone: the sampler's two layouts, on all cores and on one, against the bytes
the step must read.

  python -m experiments.bench_decode_attention                 # SmolLM2-135M shapes, batch 1, 8, 32
  python -m experiments.bench_decode_attention --quick         # smoke run: batch 1 and 4, 2 repeats

One decode step's attention over the KV cache for every layer of the model (`--model`, a
clipo_jax.models.PRESETS name; default SmolLM2-135M: 30 layers, 9 query heads over 3 kv heads,
head_dim 64), through the library's own `transformer._attention_einsum`, one query per row:
  * keys [B, K, S, hd] (the stacked cache's layout): q.k and p.v as batched einsums, which
    XLA:CPU runs as one dot per (row, kv head) on a single thread;
  * keys [B, K, hd, S] (the per-layer cache the unrolled sampler keeps): from 8 (row, kv head)
    pairs q.k and p.v as multiply-and-sum fusions (float32 products), below that as einsums over
    the transposed keys (transformer._FUSED_DECODE_MIN_PAIRS);
  * kernel: the same transposed keys through clipo_jax.kernels.decode_attention (the JAX FFI),
    which shares the (row, kv head) pairs out over XLA's thread pool; the sampler's default on
    CPU where it builds (skipped, with the reason, where it does not).
The layers are chained (each layer's query adds 1e-3 of the previous output) so none is dropped
or overlapped; the mask, scale and softmax are the model's. Random float32 keys/values, `--slots`
cache slots of which the first `--slots` - 16 hold positions (the rest empty, as in a growing
cache). Each (layout, cores) pair runs in its own subprocess pinned with sched_setaffinity before
jax starts (XLA sizes its thread pool from the affinity); median of --repeats timed calls after
2 warmups, the same shapes for both layouts.
  * floor = the K and V bytes one step reads (2 x L x B x K x S x hd x 4) / the read bandwidth
    measured in the all-cores worker (best of 5 jitted sums over a 1 GiB float32 array).
The last line is the JSON summary: per batch, the sampler's default (the kernel, or the fused
transposed layout where the kernel is unavailable) against the einsum layout (ratio = einsum /
ours, bigger is better), against its own one-core time and against the floor; `fused_ms` is the
transposed layout through XLA's fusions.
"""

import json
import os
import statistics
import subprocess
import sys
import time

from absl import app, flags

from experiments.bench_common import cores as _cores
from experiments.bench_common import machine as _machine
from experiments.bench_common import read_bandwidth_gbs

FLAGS = flags.FLAGS
flags.DEFINE_list("batches", ["1", "8", "32"], "batch sizes (rows decoding at once)")
flags.DEFINE_integer("slots", 176, "KV-cache slots attended per step (SmolLM2 batch 32 in bench_sampler: 112 + 128/2)")
flags.DEFINE_string("model", "smollm2_135m", "a clipo_jax.models.PRESETS name: the attention shapes")
flags.DEFINE_integer("repeats", 9, "timed calls per case (median reported)")
flags.DEFINE_bool("quick", False, "smoke run: batches 1,4, 2 repeats")
flags.DEFINE_string("worker", None, "internal: 'einsum', 'transposed' or 'kernel'")
flags.DEFINE_integer("batch", 1, "internal: the worker's batch size")
flags.DEFINE_bool("measure_bandwidth", False, "internal: the worker also measures read bandwidth")

LAYOUTS = ("einsum", "transposed", "kernel")


def _worker(layout: str, batch: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from clipo_jax.models import PRESETS, transformer

    cfg = PRESETS[FLAGS.model]
    L, K, H, hd, S = cfg.n_layers, cfg.n_kv_heads, cfg.n_heads, cfg.head_dim, FLAGS.slots
    rng = np.random.default_rng(0)
    keys = [rng.standard_normal((batch, K, S, hd), np.float32) for _ in range(L)]
    if layout != "einsum":
        keys = [np.ascontiguousarray(k.swapaxes(2, 3)) for k in keys]
    if layout == "kernel":
        from clipo_jax import kernels

        if not kernels.available():
            return {"unavailable": kernels.unavailable_reason()}
        cfg = cfg.replace(cpu_decode_kernel=True)
    keys = [jnp.asarray(k) for k in keys]
    values = [jnp.asarray(rng.standard_normal((batch, K, S, hd), np.float32)) for _ in range(L)]
    filled = S - 16
    pos = jnp.asarray(np.where(np.arange(S) < filled, np.arange(S), -1)[None].repeat(batch, 0).astype(np.int32))
    q_pos = jnp.full((batch, 1), filled, jnp.int32)
    q0 = jnp.asarray(rng.standard_normal((batch, 1, H, hd), np.float32))
    window = int(np.iinfo(np.int32).max)

    @jax.jit
    def step(q, keys, values):
        for k, v in zip(keys, values):
            seg = transformer.Segment(k, v, pos, k_transposed=layout != "einsum")
            out = transformer._attention_einsum(cfg, q, [seg], q_pos, window)
            q = q + 1e-3 * out.reshape(q.shape)
        return q

    t = time.perf_counter()
    step(q0, keys, values).block_until_ready()
    compile_s = time.perf_counter() - t
    step(q0, keys, values).block_until_ready()
    runs = []
    for _ in range(FLAGS.repeats):
        t = time.perf_counter()
        out = step(q0, keys, values).block_until_ready()
        runs.append((time.perf_counter() - t) * 1e3)
    res = {
        "ms": statistics.median(runs),
        "runs_ms": runs,
        "first_call_s": compile_s,
        "cores": _cores(),
        "checksum": float(jnp.sum(out)),
        "kv_bytes": 2 * L * batch * K * S * hd * 4,
    }
    if FLAGS.measure_bandwidth:
        res["read_gbs"] = read_bandwidth_gbs(1024)
    return res


def _run_worker(layout: str, batch: int, one_core: bool) -> dict:
    cmd = [sys.executable, "-m", "experiments.bench_decode_attention", f"--worker={layout}", f"--batch={batch}"]
    cmd += [f"--{k}={getattr(FLAGS, k)}" for k in ("slots", "model", "repeats")]
    if not one_core and layout == "transposed":
        cmd.append("--measure_bandwidth")
    # the worker pins itself before importing jax (XLA sizes its thread pool from the affinity)
    env = dict(os.environ, BENCH_ONE_CORE="1" if one_core else "0")
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode or not lines:
        raise RuntimeError(f"worker {layout} batch {batch} failed:\n{out.stderr[-2000:]}")
    return json.loads(lines[-1])


def main(argv):
    del argv
    if FLAGS.quick:
        FLAGS.batches, FLAGS.repeats = ["1", "4"], 2
    if FLAGS.worker:
        print(json.dumps(_worker(FLAGS.worker, FLAGS.batch)))
        return
    machine = _machine()
    print(f"machine: {machine}; load average at start: {os.getloadavg()}", flush=True)
    from clipo_jax.models import PRESETS

    cfg = PRESETS[FLAGS.model]
    print(
        f"{FLAGS.model}: {cfg.n_layers} layers, {cfg.n_heads} query heads over {cfg.n_kv_heads} kv heads, "
        f"head_dim {cfg.head_dim}; {FLAGS.slots} cache slots; one decode step's attention over every layer"
    )
    head = f"{'batch':>5} | {'layout':<10} | {'all cores ms':>12} | {'one core ms':>11} | {'cores x':>7} | {'floor ms':>8} | {'/ floor':>7} | {'first call s':>12}"
    print(head)
    print("-" * len(head))
    results = []
    for b in map(int, FLAGS.batches):
        r = {lay: {"all": _run_worker(lay, b, False), "one": _run_worker(lay, b, True)} for lay in LAYOUTS}
        gbs = r["transposed"]["all"]["read_gbs"]
        floor_ms = r["transposed"]["all"]["kv_bytes"] / (gbs * 1e9) * 1e3
        for lay in LAYOUTS:
            a, o = r[lay]["all"], r[lay]["one"]
            if "unavailable" in a:
                print(f"{b:>5} | {lay:<10} | not run: {a['unavailable']}", flush=True)
                continue
            print(
                f"{b:>5} | {lay:<10} | {a['ms']:>12.2f} | {o['ms']:>11.2f} | {o['ms'] / a['ms']:>7.2f} | "
                f"{floor_ms:>8.2f} | {a['ms'] / floor_ms:>7.2f} | {a['first_call_s']:>12.2f}",
                flush=True,
            )
        ours_layout = "transposed" if "unavailable" in r["kernel"]["all"] else "kernel"
        t, e, f = r[ours_layout]["all"], r["einsum"]["all"], r["transposed"]["all"]
        results.append(
            {
                "case": f"decode attention batch {b}",
                "ours_layout": ours_layout,
                "ours": round(t["ms"], 3),
                "baseline": round(e["ms"], 3),
                "baseline_name": "the same attention over [B, K, S, hd] keys (batched einsums)",
                "ratio": round(e["ms"] / t["ms"], 3),
                "unit": "ms per step, all layers",
                "one_core_ms": round(r[ours_layout]["one"]["ms"], 3),
                "fused_ms": round(f["ms"], 3),
                "fused_one_core_ms": round(r["transposed"]["one"]["ms"], 3),
                "einsum_one_core_ms": round(r["einsum"]["one"]["ms"], 3),
                "floor_ms": round(floor_ms, 3),
                "floor_x": round(t["ms"] / floor_ms, 3),
                "read_gbs": round(gbs, 2),
                "cores": t["cores"],
                # every layout computes the same chained attention (float32 summation order only)
                "checksum_abs_diff": max(
                    abs(r[lay]["all"]["checksum"] - e["checksum"]) for lay in LAYOUTS if "checksum" in r[lay]["all"]
                ),
            }
        )
    print(
        f"cores x = one-core time / all-cores time ({results[0]['cores']} cores); floor = K and V bytes of one "
        f"step / {results[0]['read_gbs']:.1f} GB/s measured read bandwidth; first call = compile + one run."
    )
    print(json.dumps({"bench": "decode_attention", "machine": machine, "results": results}))


if __name__ == "__main__":
    if os.environ.get("BENCH_ONE_CORE") == "1":  # before jax is imported anywhere in this process
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    app.run(main)
