r"""The sampler's matmuls alone: XLA's dots against the packed CPU kernel, with the weights
streamed from memory and with them resident in cache.

  python -m experiments.bench_dense                    # SmolLM2-135M shapes, M = 1, 8, 32
  python -m experiments.bench_dense --batches=32 --repeats=9
  python -m experiments.bench_dense --quick            # smoke run: M = 1 and 4, tiny model

One decode step's matmuls at M = batch rows for every layer of the model (`--model`, a
clipo_jax.models.PRESETS name; random float32 weights of its shapes): per layer [M, D] @ wq, wk, wv, wo,
w_gate, w_up, w_down, then the LM head [M, D] @ [D, V]; each input waits on the previous output
(a [M, 1] mean added), so none overlaps or is dropped. Two ways to multiply:
  * XLA: `x @ W` over the per-layer buffers the unrolled sampler reads (XLA:CPU's dots);
  * kernel: `clipo_jax.kernels.dense` over the same weights packed in column panels
    (`transformer.pack_dense_weights`, the sampler's `cpu_dense_kernel` path), where it builds.
Two weight placements:
  * streamed: every layer its own weights (the whole model, far more than the caches hold), as in
    the sampler: each weight comes from memory once per step;
  * resident: every layer reads layer 0's weights (one layer, a few MiB, stays in L2/L3): the
    same arithmetic without the layers' memory stream (the LM head, 113 MiB for SmolLM2, still
    streams).
streamed / resident time is what streaming the layers' weights costs on top of the arithmetic:
1.0 means the stream is fully overlapped with it. Where the chain is bound by memory (small M:
the weight stream is longer than the arithmetic at peak) it cannot be 1.0; compare with the floor. Also printed:
  * peak = a float32 [--peak_n]^2 matmul, best of 5, by XLA's dot and by the kernel; the faster
    (the fastest matmul this host runs), GFLOP/s;
  * floor = max(FLOPs / peak, weight bytes / read bandwidth) for the streamed chain, with the
    bandwidth the best of 5 jitted sums over a 1 GiB float32 array.
Median of --repeats timed calls after 2 warmups, all in one process, cases interleaved per
repeat. The last line is the JSON summary (ratio = XLA time / kernel time, bigger is better).
"""

import json
import statistics
import time

from absl import app, flags

from experiments.bench_common import machine, matmul_chain, read_bandwidth_gbs

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "smollm2_135m", "a clipo_jax.models.PRESETS name (random weights)")
flags.DEFINE_list("batches", ["1", "8", "32"], "rows M per matmul")
flags.DEFINE_integer("repeats", 7, "timed calls per case (median reported)")
flags.DEFINE_integer("peak_n", 2048, "matmul size for the peak measurement")
flags.DEFINE_bool("quick", False, "smoke run: tiny_llama, M = 1 and 4, 2 repeats")


def _peak_gflops(n: int) -> dict:
    """GFLOP/s of a float32 [n, n] @ [n, n], best of 5: XLA's dot and, where it builds, the kernel
    (packed weight). The larger is the peak: the fastest matmul this host runs."""
    import jax
    import jax.numpy as jnp

    from clipo_jax import kernels

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    ways = {"XLA": (jax.jit(lambda a, b: a @ b), a)}
    if kernels.available():
        ways["kernel"] = (jax.jit(kernels.dense), kernels.pack_dense(a))
    out = {}
    for name, (f, b) in ways.items():
        f(a, b).block_until_ready()
        best = float("inf")
        for _ in range(5):
            t = time.perf_counter()
            f(a, b).block_until_ready()
            best = min(best, time.perf_counter() - t)
        out[name] = 2 * n**3 / best / 1e9
    return out


def main(argv):
    del argv
    import jax
    import jax.numpy as jnp
    import numpy as np

    from clipo_jax import kernels
    from clipo_jax.models import PRESETS, transformer

    model = "tiny_llama" if FLAGS.quick else FLAGS.model
    batches = [1, 4] if FLAGS.quick else [int(b) for b in FLAGS.batches]
    repeats = 2 if FLAGS.quick else FLAGS.repeats
    cfg = PRESETS[model].replace(dtype="float32", param_dtype="float32")
    # the model's matrix shapes, scaled by 1 / sqrt(K) so activations keep their size through the
    # chain and the cases' outputs can be compared
    shapes = transformer.param_shapes(cfg)
    key = iter(jax.random.split(jax.random.key(0), 8 * cfg.n_layers + 1))
    matrix = lambda shape: jax.random.normal(next(key), shape, jnp.float32) / np.sqrt(shape[0])
    streamed = {
        "layers": [
            {k: matrix(shapes["layers"][k][1:]) for k in transformer.DENSE_WEIGHTS} for _ in range(cfg.n_layers)
        ],
        "head": matrix((cfg.d_model, cfg.vocab_size)),
    }
    resident = {"layers": [streamed["layers"][0]] * cfg.n_layers, "head": streamed["head"]}
    weight_bytes = sum(a.nbytes for a in jax.tree.leaves(streamed))
    flops_per_row = 2 * sum(int(np.prod(a.shape)) for a in jax.tree.leaves(streamed))

    cases = {"XLA": (matmul_chain(lambda x, w: x @ w, lambda x, w: x @ w), lambda w: w)}
    if kernels.available():
        pack = jax.jit(
            lambda w: {
                "layers": [{k: kernels.pack_dense(a) for k, a in lw.items()} for lw in w["layers"]],
                "head": kernels.pack_dense(w["head"]),
            }
        )
        cases["kernel"] = (matmul_chain(kernels.dense, kernels.dense), pack)
        why_not = None
    else:
        why_not = kernels.unavailable_reason()
    weights = {}
    for name, (_, prep) in cases.items():
        weights[(name, "streamed")] = prep(streamed)
        # one layer's (prepared) buffers read by every layer: preparing the repeated layer would
        # give each its own copy
        w = prep(resident)
        weights[(name, "resident")] = {"layers": [w["layers"][0]] * cfg.n_layers, "head": w["head"]}
    bandwidth = read_bandwidth_gbs(1024)
    peaks = _peak_gflops(FLAGS.peak_n)
    peak = max(peaks.values())
    print(
        f"machine: {machine()}; {model}: {cfg.n_layers} layers, {weight_bytes / 2**20:.0f} MiB of matmul weights; "
        f"peak {peak:.0f} GFLOP/s (best {FLAGS.peak_n}^3 matmul: "
        + ", ".join(f"{k} {v:.0f}" for k, v in peaks.items())
        + f"), read bandwidth {bandwidth:.1f} GB/s; jax {jax.__version__}"
        + (f"; kernel unavailable: {why_not}" if why_not else ""),
        flush=True,
    )
    results = []
    for M in batches:
        x = jax.random.normal(jax.random.key(M), (M, cfg.d_model), jnp.float32)
        times = {key: [] for key in weights}
        for key, w in weights.items():  # warm up (compile) every case first
            for _ in range(2):
                cases[key[0]][0](w["layers"], w["head"], x).block_until_ready()
        for _ in range(repeats):  # then interleave, so load drift hits every case alike
            for key, w in weights.items():
                t = time.perf_counter()
                cases[key[0]][0](w["layers"], w["head"], x).block_until_ready()
                times[key].append((time.perf_counter() - t) * 1e3)
        ms = {key: statistics.median(t) for key, t in times.items()}
        # every case computes the same chain (float32 summation order only)
        outs = {key: np.asarray(cases[key[0]][0](w["layers"], w["head"], x)) for key, w in weights.items()}
        diff = max(
            float(np.max(np.abs(outs[(name, place)] - outs[("XLA", place)]) / (np.abs(outs[("XLA", place)]) + 1e-6)))
            for name, place in weights
        )
        flops = flops_per_row * M
        floor_ms = max(flops / (peak * 1e9), weight_bytes / (bandwidth * 1e9)) * 1e3
        print(
            f"M = {M}: floor {floor_ms:.2f} ms (arithmetic {flops / peak / 1e6:.2f} ms, weight stream "
            f"{weight_bytes / bandwidth / 1e6:.2f} ms); outputs agree to a relative {diff:.1e}"
        )
        for name in cases:
            s, r = ms[(name, "streamed")], ms[(name, "resident")]
            print(
                f"  {name:6s}: streamed {s:7.2f} ms ({flops / s / 1e6:5.0f} GFLOP/s, {s / floor_ms:.2f}x the floor), "
                f"resident {r:7.2f} ms; streamed / resident {s / r:.2f}",
                flush=True,
            )
        if "kernel" in cases:
            for place in ("streamed", "resident"):
                xla, ker = ms[("XLA", place)], ms[("kernel", place)]
                results.append(
                    {
                        "case": f"matmul chain M={M}, weights {place}",
                        "ours": float(f"{ker:.4g}"),  # 4 significant figures: a tiny model's chain is ~0.05 ms
                        "baseline": float(f"{xla:.4g}"),
                        "baseline_name": "XLA:CPU dots",
                        "ratio": round(xla / ker, 3),
                        "unit": "ms per step's matmuls",
                        "floor_ms": float(f"{floor_ms:.4g}") if place == "streamed" else None,
                        "max_rel_diff": diff,
                    }
                )
            results.append(
                {
                    "case": f"streaming cost M={M} (streamed / resident)",
                    "ours": round(ms[("kernel", "streamed")] / ms[("kernel", "resident")], 3),
                    "baseline": round(ms[("XLA", "streamed")] / ms[("XLA", "resident")], 3),
                    "baseline_name": "XLA:CPU dots",
                    "ratio": None,
                    "unit": "time with weights streamed / time with one layer's weights resident",
                }
            )
    print(
        json.dumps(
            {
                "bench": "dense",
                "machine": machine(),
                "peak_gflops": round(peak, 1),
                "peak_by_way_gflops": {k: round(v, 1) for k, v in peaks.items()},
                "bandwidth_gbs": round(bandwidth, 2),
                "results": results,
            }
        )
    )


if __name__ == "__main__":
    app.run(main)
