r"""Our sampler's two layer loops side by side: the unrolled loop over per-layer weight and cache
buffers (`Sampler(unroll_layers=True)`, the CPU default) vs the layer scan (`unroll_layers=False`).

  python -m experiments.bench_layer_loop                  # SmolLM2-135M, batch 32, 128 new tokens
  python -m experiments.bench_layer_loop --batch=8 --repeats=5

One process, one model; for each loop: the first call (compile + run), then the best of
--repeats warm calls of one whole greedy generate (GSM8K chat prompts as in bench_sampler),
alternating the two loops. Prints the times, the ratio, and whether the outputs agree; the last
line is the JSON summary (ratio = scan time / unrolled time; bigger is better for unrolled).
"""
import json
import time

from absl import app, flags

from experiments.bench_common import gsm8k_chat_prompts, machine as _machine

FLAGS = flags.FLAGS
flags.DEFINE_integer("batch", 32, "prompts per generate call")
flags.DEFINE_integer("new_tokens", 128, "tokens generated per row")
flags.DEFINE_integer("repeats", 3, "warm calls per loop (best reported)")
flags.DEFINE_string("model", "smollm2", "model name or path")


def main(argv):
  del argv
  import jax
  import numpy as np
  from clipo_jax import sampling
  from clipo_jax.models import load_model
  cfg, params, tok = load_model(FLAGS.model)
  params = jax.device_put(params)
  prompts = gsm8k_chat_prompts(tok, FLAGS.batch, 120)
  scfg = sampling.SamplingConfig(max_new_tokens=FLAGS.new_tokens, temperature=0.0, stop_ids=(), pad_id=tok.pad_id)
  samplers = {"unrolled": sampling.Sampler(cfg, unroll_layers=True), "scan": sampling.Sampler(cfg, unroll_layers=False)}
  first, warm, outs = {}, {k: [] for k in samplers}, {}
  for name, s in samplers.items():
    t = time.perf_counter()
    outs[name] = s(params, prompts, jax.random.key(0), scfg)
    first[name] = time.perf_counter() - t
  for _ in range(FLAGS.repeats):
    for name, s in samplers.items():
      t = time.perf_counter()
      s(params, prompts, jax.random.key(0), scfg)
      warm[name].append(time.perf_counter() - t)
  best = {k: min(v) for k, v in warm.items()}
  same = bool(np.array_equal(outs["unrolled"].tokens, outs["scan"].tokens))
  lp_diff = float(np.abs(outs["unrolled"].logprobs - outs["scan"].logprobs).max())
  print(f"{_machine()}; batch {FLAGS.batch}, {FLAGS.new_tokens} new tokens, prompt bucket "
        f"{samplers['scan'].length_bucket(max(map(len, prompts)))}")
  for name in samplers:
    print(f"{name:>9}: first call (compile + run) {first[name]:6.2f} s, warm call {best[name]:6.2f} s "
          f"({FLAGS.batch * FLAGS.new_tokens / best[name]:.1f} tokens/s)")
  print(f"scan / unrolled = {best['scan'] / best['unrolled']:.2f}x; same tokens: {same}; "
        f"max |log-prob diff| {lp_diff:.1e}")
  print(json.dumps({"bench": "layer_loop", "machine": _machine(), "results": [
      {"case": f"generate batch {FLAGS.batch} x {FLAGS.new_tokens}", "ours": round(best["unrolled"], 3),
       "baseline": round(best["scan"], 3), "baseline_name": "layer scan", "ratio": round(best["scan"] / best["unrolled"], 3),
       "unit": "s per call (ratio = scan / unrolled)"},
      {"case": "first call (compile + run)", "ours": round(first["unrolled"], 2), "baseline": round(first["scan"], 2),
       "baseline_name": "layer scan", "ratio": round(first["scan"] / first["unrolled"], 3), "unit": "s"}]}))


if __name__ == "__main__":
  app.run(main)
