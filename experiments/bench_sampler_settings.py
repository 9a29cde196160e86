r"""Our sampler under different settings, side by side in one process.

  python -m experiments.bench_sampler_settings                      # prefill groups / cache phases
  python -m experiments.bench_sampler_settings --compare=layer_loop # unrolled loop vs layer scan
  python -m experiments.bench_sampler_settings --compare=decode_kernel  # CPU kernel vs XLA fusions
  python -m experiments.bench_sampler_settings --compare=dense_kernel   # packed CPU matmuls vs XLA dots
  python -m experiments.bench_sampler_settings --batch=8 --repeats=5

--compare=phases: one prefill group and a full-length cache (the sampler before length-sorted prefill groups and phased caches), prefill
groups of 8 only, cache phases (4 per octave) only, and both (the default `Sampler`).
--compare=layer_loop: the unrolled loop over per-layer weight and cache buffers
(`unroll_layers=True`, the CPU default) vs the layer scan (`unroll_layers=False`).
--compare=decode_kernel: decode attention through XLA's fusions (`cpu_decode_kernel=False`) vs the
CPU kernel (`clipo_jax.kernels.decode_attention`, the default where it builds).
--compare=dense_kernel: the layer matrices and LM head through XLA's dots (`cpu_dense_kernel=False`)
vs packed in panels through `clipo_jax.kernels.dense` (the default where it builds).

SmolLM2-135M by default, GSM8K chat prompts as in bench_sampler, greedy. For each setting: the
first call (compile + run), the process RSS after it and a glibc malloc_trim (what the compiled
executables and live buffers hold), then the best of --repeats warm calls of a whole generate
and of a prefill-only call (max_new_tokens=1), the settings alternating call by call. Prints the
times and whether every setting gives the first setting's tokens; the last line is the JSON
summary (ratio = first setting's time / this setting's; bigger is better). The first setting's
first call also pays JAX's one-time start-up, so compare first calls among the later settings.
"""

import ctypes
import json
import time

from absl import app, flags

from experiments.bench_common import gsm8k_chat_prompts
from experiments.bench_common import machine as _machine

FLAGS = flags.FLAGS
flags.DEFINE_enum(
    "compare", "phases", ["phases", "layer_loop", "decode_kernel", "dense_kernel"], "which settings to compare"
)
flags.DEFINE_integer("batch", 32, "prompts per generate call")
flags.DEFINE_integer("new_tokens", 128, "tokens generated per row")
flags.DEFINE_integer("repeats", 3, "warm calls per setting (best reported)")
flags.DEFINE_string("model", "smollm2", "model name or path")

SETTINGS = {
    "phases": {
        "one group, one cache phase": dict(prefill_group_rows=0, cache_steps_per_octave=0),
        "prefill groups of 8": dict(prefill_group_rows=8, cache_steps_per_octave=0),
        "cache phases 4/octave": dict(prefill_group_rows=0, cache_steps_per_octave=4),
        "both (default)": dict(prefill_group_rows=8, cache_steps_per_octave=4),
    },
    "layer_loop": {"layer scan": dict(unroll_layers=False), "unrolled (CPU default)": dict(unroll_layers=True)},
    "decode_kernel": {
        "XLA fusions": dict(cpu_decode_kernel=False),
        "CPU kernel (default)": dict(cpu_decode_kernel=True),
    },
    "dense_kernel": {
        "XLA dots": dict(cpu_dense_kernel=False),
        "CPU dense kernel (default)": dict(cpu_dense_kernel=True),
    },
}


def _rss_mib_after_trim() -> float:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS")) / 1024


def main(argv):
    del argv
    import jax
    import numpy as np

    from clipo_jax import sampling
    from clipo_jax.models import load_model

    cfg, params, tok = load_model(FLAGS.model)
    params = jax.device_put(params)
    prompts = gsm8k_chat_prompts(tok, FLAGS.batch, 120)
    scfg = {
        n: sampling.SamplingConfig(max_new_tokens=n, temperature=0.0, stop_ids=(), pad_id=tok.pad_id)
        for n in (FLAGS.new_tokens, 1)
    }
    samplers = {name: sampling.Sampler(cfg, **kw) for name, kw in SETTINGS[FLAGS.compare].items()}
    first, rss, outs = {}, {}, {}
    warm = {name: {n: [] for n in scfg} for name in samplers}
    for name, s in samplers.items():
        t = time.perf_counter()
        outs[name] = s(params, prompts, jax.random.key(0), scfg[FLAGS.new_tokens])
        first[name] = time.perf_counter() - t
        s(params, prompts, jax.random.key(0), scfg[1])  # compiles the prefill-only shapes
        rss[name] = _rss_mib_after_trim()
    for _ in range(FLAGS.repeats):
        for name, s in samplers.items():
            for n in scfg:
                t = time.perf_counter()
                s(params, prompts, jax.random.key(0), scfg[n])
                warm[name][n].append(time.perf_counter() - t)
    best = {name: {n: min(v) for n, v in w.items()} for name, w in warm.items()}
    ref = next(iter(samplers))
    lens = [len(p) for p in prompts]
    print(
        f"{_machine()}; batch {FLAGS.batch} (prompts {min(lens)}-{max(lens)} tokens, bucket "
        f"{samplers[ref].length_bucket(max(lens))}), {FLAGS.new_tokens} new tokens, best of {FLAGS.repeats}"
    )
    results = []
    for name in samplers:
        same = bool(np.array_equal(outs[name].tokens, outs[ref].tokens))
        lp = float(np.abs(outs[name].logprobs - outs[ref].logprobs).max())
        call, pre = best[name][FLAGS.new_tokens], best[name][1]
        print(
            f"{name:>28}: call {call:6.2f} s ({call / best[ref][FLAGS.new_tokens]:.3f} of first), prefill-only "
            f"{pre:5.2f} s, first call (compile + run) {first[name]:6.2f} s, RSS after trim {rss[name]:6.0f} MiB "
            f"(cumulative: earlier settings' executables stay); same tokens as '{ref}': {same}, "
            f"max |log-prob diff| {lp:.1e}"
        )
        for case, ours, base, unit in (
            ("generate", call, best[ref][FLAGS.new_tokens], "s per call"),
            ("prefill only", pre, best[ref][1], "s per call"),
            ("first call (compile + run)", first[name], first[ref], "s"),
        ):
            results.append(
                {
                    "case": f"{name}: {case}",
                    "ours": round(ours, 3),
                    "baseline": round(base, 3),
                    "baseline_name": ref,
                    "ratio": round(base / ours, 3),
                    "unit": unit,
                }
            )
    print(json.dumps({"bench": f"sampler_settings_{FLAGS.compare}", "machine": _machine(), "results": results}))


if __name__ == "__main__":
    app.run(main)
