r"""RL train-step throughput: tokens/s and achieved FLOP/s as a fraction of this machine's peak.

  python -m experiments.bench_train                       # demo model + SmolLM2-135M, ~5 min on 2 cores
  python -m experiments.bench_train --cases=demo --repeats=5
  python -m experiments.bench_train --cases=qwen25_0_5b --dtype=bfloat16 --peak_n=8192 \
      --nominal_peak_tflops=989                          # GPU: random-weight Qwen2.5-0.5B shape

Cases: demo (configs/demo.py's model and one mini-batch), or any shape preset of
clipo_jax.models.PRESETS by name (smollm2_135m, qwen25_0_5b, tiny_llama, ...): random weights from
transformer.init_params, B=8 and T=128+128 unless --batch/--prompt_len/--response_len say otherwise
(those flags apply to every case, demo included).

The step is clipo_jax.rl.step.train_step (PPO-clip, token-mean, one micro-batch, AdamW after
global-norm clipping; parameters float32, compute in --dtype) on a random batch of B sequences of T = prompt + response
tokens, all valid; it is jitted with the state donated, compiled once, then the median of
--repeats runs is reported. Tokens/s counts all B*T positions (the forward and backward pass
runs over prompt and response alike).

Peak: a jitted [n, n] @ [n, n] matmul in the compute dtype (--dtype; 2 n^3 FLOPs), median of 3,
measured in the same process right before every timed step (the shared machine's peak drifts with the load);
% peak is the median over the timed steps of (step FLOP/s) / (the peak just before it).

FLOPs per step, two counts:
  model:  B*T * (6 * (P_layers + d*V) + 12 * L * T * H * hd)
          P_layers = matmul weights of the L layers (q, k, v, o, gate, up, down), d*V the
          LM-head matmul (counted even though tied to the embedding table); the attention term
          is QK^T and PV over the full T x T grid (what the einsum computes, no causal skip),
          x3 for forward + backward. Norms, RoPE, softmax and the optimizer are not counted.
  xla:    compiled.cost_analysis()['flops'] of the whole step (includes the recomputed
          LM-head logits of the checkpointed log-prob chunks, elementwise ops, AdamW),
          corrected for loops: XLA counts a while-loop body once, so the raw count holds one
          layer instead of L (see xla_loop_correction; the raw count is printed too).
Fraction of peak = model FLOPs / step time / peak (MFU-style). On a gpu or tpu backend with
--nominal_peak_tflops > 0 (the vendor's dense figure for the dtype, e.g. 989 for H100 SXM bf16)
the model FLOP/s are also given as a fraction of that nominal peak. The breakdown rows time the
forward log-probs alone and forward+backward without the optimizer, to show where time goes.
The last line is the JSON summary.
"""

import json
import os
import statistics
import time

from absl import app, flags

from experiments.bench_common import machine as _machine

FLAGS = flags.FLAGS
flags.DEFINE_string("cases", "demo,smollm2_135m", "comma list: demo or a clipo_jax.models.PRESETS name")
flags.DEFINE_integer("repeats", 3, "timed runs per measurement (median)")
flags.DEFINE_integer("peak_n", 2048, "matmul size for the peak measurement")
flags.DEFINE_bool("breakdown", True, "also time forward-only and forward+backward")
flags.DEFINE_integer("batch", None, "rows B of every case (default: the case's own)")
flags.DEFINE_integer("prompt_len", None, "prompt tokens per row (default: the case's own)")
flags.DEFINE_integer("response_len", None, "response tokens per row (default: the case's own)")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "compute dtype of the model and of the peak matmul")
flags.DEFINE_float(
    "nominal_peak_tflops",
    0.0,
    "gpu/tpu only: the device's nominal dense TFLOP/s for --dtype (e.g. 989 for H100 SXM bf16); "
    "0 = do not report a fraction of it",
)


def _median_time(fn, repeats):
    fn()  # warmup (after compile)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def measure_peak(n: int, repeats: int, dtype: str = "float32") -> float:
    """FLOP/s of a jitted n x n matmul in `dtype` (median of repeats)."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    mm = jax.jit(jnp.dot)
    mm(a, b).block_until_ready()
    t = _median_time(lambda: mm(a, b).block_until_ready(), repeats)
    return 2 * n**3 / t


def case_shapes(name: str):
    """(ModelConfig, B, prompt len, response len) before the --batch/--prompt_len/--response_len
    overrides: demo = configs/demo.py; any PRESETS name = that shape, B=8, 128 + 128 tokens."""
    from clipo_jax.models import PRESETS, ModelConfig

    if name == "demo":
        import sys

        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        from configs.demo import get_config

        c = get_config()
        m = c.model
        cfg = ModelConfig(
            vocab_size=c.task.vocab_size,
            d_model=m.d_model,
            n_layers=m.n_layers,
            n_heads=m.n_heads,
            n_kv_heads=m.n_kv_heads,
            head_dim=m.head_dim,
            d_ff=m.d_ff,
            dtype=m.dtype,
            max_seq_len=m.max_seq_len,
        )
        rows = c.rl.prompts_per_step * c.rl.group_size // c.rl.mini_batches  # one mini-batch
        return cfg, rows, c.rl.max_prompt_len, c.rl.max_new_tokens
    if name in PRESETS:
        return PRESETS[name], 8, 128, 128
    raise ValueError(f"unknown case {name!r}; valid: demo, {', '.join(sorted(PRESETS))}")


def resolve_case(name: str, batch=None, prompt_len=None, response_len=None, dtype=None):
    """case_shapes with the overrides applied: (ModelConfig, B, prompt len, response len)."""
    cfg, B, Tp, N = case_shapes(name)
    B, Tp, N = batch or B, prompt_len or Tp, response_len or N
    cfg = cfg.replace(max_seq_len=max(cfg.max_seq_len, Tp + N))
    if dtype:
        cfg = cfg.replace(dtype=dtype)
    return cfg, B, Tp, N


def model_flops_per_token(cfg, T: int) -> float:
    d, hd = cfg.d_model, cfg.head_dim
    p_layer = d * hd * (2 * cfg.n_heads + 2 * cfg.n_kv_heads) + 3 * d * cfg.d_ff
    dense = 6 * (cfg.n_layers * p_layer + d * cfg.vocab_size)
    attn = 12 * cfg.n_layers * T * cfg.n_heads * hd
    return dense + attn


def xla_loop_correction(cfg, B: int, T: int, params) -> float:
    """FLOPs that cost_analysis misses: it counts a while-loop body once, whatever the trip count.

    The step has two loops over model work: the scan over the L layers (forward and backward
    bodies) and the lax.map over ceil(T / 128) sequence chunks of the LM head. Missing:
    (L - 1) x one layer's forward + backward, plus (chunks - 1) x one chunk's LM head; the
    latter is measured as the count with one chunk of length T minus the count with the
    step's 128-token chunks (each counted once).
    """
    import jax
    import jax.numpy as jnp

    from clipo_jax.models import transformer as tr

    tokens = jnp.zeros((B, T), jnp.int32)
    valid = jnp.ones((B, T), bool)
    # one layer's forward + backward: the whole decoder with n_layers=1 (its embedding gather and
    # final norm are a few B*T*d FLOPs on top, negligible)
    cfg1 = cfg.replace(n_layers=1)
    p1 = jax.tree.map(lambda x: x[:1], params["layers"])
    p1 = dict(params, layers=p1)
    hidden_sum = lambda p: jnp.sum(tr.forward(p, cfg1, tokens, valid)[0])
    layer = _flops_of(jax.jit(jax.grad(hidden_sum)).lower(p1).compile()) or 0.0
    extra = (cfg.n_layers - 1) * layer
    if T > 128:

        def lm(chunk):
            f = lambda p: jnp.sum(tr.token_logprobs(p, cfg, tokens, valid, tokens, chunk=chunk))
            return _flops_of(jax.jit(jax.grad(f)).lower(params).compile()) or 0.0

        extra += lm(T) - lm(128)
    return extra


def _flops_of(compiled) -> float | None:
    ca = compiled.cost_analysis()
    if isinstance(ca, (list, tuple)):
        ca = ca[0] if ca else None
    return float(ca["flops"]) if ca and "flops" in ca else None


def run_case(name: str, repeats: int, peak_fn, breakdown: bool) -> dict:
    import functools

    import jax
    import jax.numpy as jnp
    import numpy as np

    from clipo_jax.models.transformer import init_params
    from clipo_jax.rl.step import (
        RLBatch,
        StepConfig,
        TrainState,
        _micro_loss,
        make_optimizer,
        response_logprobs,
        train_step,
    )

    cfg, B, Tp, N = resolve_case(name, FLAGS.batch, FLAGS.prompt_len, FLAGS.response_len, FLAGS.dtype)
    T = Tp + N
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (B, T)), jnp.int32)
    batch = RLBatch(
        tokens,
        jnp.ones((B, T), bool),
        jnp.ones((B, N), bool),
        jnp.asarray(rng.normal(size=B), jnp.float32),
        jnp.asarray(rng.normal(-np.log(cfg.vocab_size), 0.1, (B, N)), jnp.float32),
        jnp.zeros((B, N), jnp.float32),
        jnp.zeros((B, N), jnp.float32),
    )
    params = init_params(cfg, jax.random.key(0))
    n_params = sum(x.size for x in jax.tree.leaves(params))
    opt = make_optimizer(1e-6, total_steps=1000)
    scfg = StepConfig()
    state = TrainState(params, jax.jit(opt.init)(params), jnp.zeros((), jnp.int32))
    step = jax.jit(functools.partial(train_step, cfg=cfg, scfg=scfg, optimizer=opt), donate_argnums=0)
    t0 = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    xla_raw = _flops_of(compiled)
    xla_flops = xla_raw + xla_loop_correction(cfg, B, T, params) if xla_raw else None
    holder = [state]

    def one():
        holder[0], m = compiled(holder[0], batch)
        jax.block_until_ready((holder[0], m))

    # the machine is shared and its matmul peak drifts with the load: time the peak right before
    # every step and report the median of the per-pair ratios (and of each quantity)
    one()
    times, peaks = [], []
    for _ in range(repeats):
        peaks.append(peak_fn())
        t0 = time.perf_counter()
        one()
        times.append(time.perf_counter() - t0)
    t_step, peak = statistics.median(times), statistics.median(peaks)
    tokens_per_step = B * T
    model_flops = model_flops_per_token(cfg, T) * tokens_per_step
    frac = statistics.median(model_flops / t / p for t, p in zip(times, peaks))
    xla_frac = statistics.median(xla_flops / t / p for t, p in zip(times, peaks)) if xla_flops else None
    row = dict(
        case=name,
        B=B,
        T=T,
        params=n_params,
        compile_s=compile_s,
        step_s=t_step,
        peak=peak,
        tokens_per_s=tokens_per_step / t_step,
        model_flops=model_flops,
        xla_flops_raw=xla_raw,
        xla_flops=xla_flops,
        model_flops_per_s=model_flops / t_step,
        frac_peak=frac,
        xla_frac_peak=xla_frac,
    )
    if breakdown:
        p = holder[0].params
        fwd = jax.jit(lambda p: response_logprobs(p, cfg, batch.tokens, batch.valid, N))
        fwd(p).block_until_ready()
        row["fwd_s"] = _median_time(lambda: fwd(p).block_until_ready(), repeats)
        denom = jnp.float32(B * N)
        grad = jax.jit(jax.grad(lambda p: _micro_loss(p, batch, denom, cfg=cfg, scfg=scfg, n_response=N)[0]))
        jax.block_until_ready(grad(p))
        row["fwd_bwd_s"] = _median_time(lambda: jax.block_until_ready(grad(p)), repeats)
    return row


def main(argv):
    del argv
    import jax

    load = os.getloadavg()
    backend = jax.default_backend()
    dt = FLAGS.dtype
    print(f"jax {jax.__version__} on {_machine()}; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    if backend != "cpu":
        print(f"backend {backend}: {jax.devices()[0].device_kind} x {jax.device_count()} (the step runs on one)")
    nominal = FLAGS.nominal_peak_tflops * 1e12 if backend in ("gpu", "tpu") and FLAGS.nominal_peak_tflops > 0 else None
    peak = measure_peak(FLAGS.peak_n, 5, dt)
    print(f"peak: {dt} {FLAGS.peak_n}^3 matmul, jit, median: {peak / 1e9:.1f} GFLOP/s")
    if nominal:
        print(
            f"nominal peak (--nominal_peak_tflops): {nominal / 1e12:.1f} TFLOP/s; measured matmul = {peak / nominal:.1%} of it"
        )
    rows = []
    for name in [c for c in FLAGS.cases.split(",") if c]:
        r = run_case(name, FLAGS.repeats, lambda: measure_peak(FLAGS.peak_n, 3, dt), FLAGS.breakdown)
        r["dtype"] = dt
        if nominal:
            r["frac_nominal"] = r["model_flops_per_s"] / nominal
        rows.append(r)
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}), flush=True)
    print()
    hdr = (
        f"{'case':<14}{'B x T':>10}{'params':>9}{'model GF':>9}{'step s':>9}{'tok/s':>9}{'model GF/s':>12}{'peak GF/s':>10}{'% peak':>8}"
        f"{'XLA GF':>8}{'raw GF':>8}{'XLA GF/s':>10}{'XLA %':>7}{'fwd s':>8}{'fwd+bwd s':>11}{'compile s':>11}"
    )
    print(hdr)
    for r in rows:
        xla = r["xla_flops"] / r["step_s"] / 1e9 if r["xla_flops"] else float("nan")
        print(
            f"{r['case']:<14}{r['B']:>4} x {r['T']:<4}{r['params'] / 1e6:>8.1f}M{r['model_flops'] / 1e9:>9.1f}{r['step_s']:>9.3f}"
            f"{r['tokens_per_s']:>9.0f}{r['model_flops_per_s'] / 1e9:>12.1f}{r['peak'] / 1e9:>10.1f}{100 * r['frac_peak']:>7.1f}%"
            f"{(r['xla_flops'] or float('nan')) / 1e9:>8.1f}{(r['xla_flops_raw'] or float('nan')) / 1e9:>8.1f}"
            f"{xla:>10.1f}{100 * (r['xla_frac_peak'] or float('nan')):>6.1f}%"
            f"{r.get('fwd_s', float('nan')):>8.3f}{r.get('fwd_bwd_s', float('nan')):>11.3f}{r['compile_s']:>11.1f}"
        )
    if nominal:
        for r in rows:
            print(
                f"{r['case']}: model FLOP/s {r['model_flops_per_s'] / 1e12:.2f} TFLOP/s = "
                f"{100 * r['frac_nominal']:.1f}% of nominal peak {nominal / 1e12:g} TFLOP/s ({dt})"
            )
    load_end = os.getloadavg()
    peak_end = measure_peak(FLAGS.peak_n, 5, dt)
    print(
        f"load average at the end: {load_end[0]:.2f}; peak at the end {peak_end / 1e9:.1f} GFLOP/s "
        f"(each case's % peak pairs every timed step with a peak measured just before it)"
    )
    results = [
        {
            "case": f"peak matmul {dt} GFLOP/s",
            "ours": peak / 1e9,
            "baseline": None,
            "baseline_name": f"jit {FLAGS.peak_n}^3 matmul",
            "ratio": None,
            "unit": "GFLOP/s",
        }
    ]
    for r in rows:
        results.append(
            {
                "case": f"{r['case']} train step tokens/s (B={r['B']}, T={r['T']})",
                "ours": r["tokens_per_s"],
                "baseline": None,
                "baseline_name": "",
                "ratio": None,
                "unit": "tokens/s",
            }
        )
        results.append(
            {
                "case": f"{r['case']} train step model FLOP/s vs matmul peak",
                "ours": r["model_flops_per_s"] / 1e9,
                "baseline": r["peak"] / 1e9,
                "baseline_name": f"measured {dt} matmul peak",
                "ratio": r["frac_peak"],
                "unit": "GFLOP/s",
            }
        )
        if r.get("frac_nominal") is not None:
            results.append(
                {
                    "case": f"{r['case']} train step model FLOP/s vs nominal peak",
                    "ours": r["model_flops_per_s"] / 1e9,
                    "baseline": nominal / 1e9,
                    "baseline_name": f"nominal {dt} peak (--nominal_peak_tflops)",
                    "ratio": r["frac_nominal"],
                    "unit": "GFLOP/s",
                }
            )
        if r["xla_flops"]:
            results.append(
                {
                    "case": f"{r['case']} train step XLA-counted FLOP/s vs matmul peak",
                    "ours": r["xla_flops"] / r["step_s"] / 1e9,
                    "baseline": r["peak"] / 1e9,
                    "baseline_name": f"measured {dt} matmul peak",
                    "ratio": r["xla_frac_peak"],
                    "unit": "GFLOP/s",
                }
            )
    print(
        json.dumps(
            {
                "bench": "train_step",
                "machine": _machine(),
                "backend": backend,
                "devices": [str(d) for d in jax.devices()],
                "jax": jax.__version__,
                "dtype": dt,
                "load_avg": [load[0], load_end[0]],
                "peak_gflops_start_end": [peak / 1e9, peak_end / 1e9],
                "results": results,
            }
        )
    )


if __name__ == "__main__":
    app.run(main)
