r"""CLIPO's effect on the embedded task: GRPO vs GRPO+CLIPO and DAPO vs DAPO+CLIPO over seeds.

  python -m experiments.clipo_effect --root=RUNS --seeds=0,1,2

Every (algo, clipo, seed) run is `python -m experiments.train --config=configs/demo.py:algo=A[,clipo],seed=S`
with the same budget; runs of one seed share the SFT warm start (config.sft.cache_dir), so the
comparison isolates the RL phase. Finished runs are skipped, an interrupted one resumes. Prints and
writes (<root>/summary.md, <root>/summary.json, <root>/cost_per_step.json, and the machine and versions in
<root>/environment.json) mean ± std over seeds of outcome accuracy, process
accuracy and lucky rate on every test set, after RL, plus the SFT starting point, and each method's
cost per RL step with the share of the CLIPO stage in it.
"""

import json
import os
import subprocess
import sys

import numpy as np
from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("root", "/tmp/clipo_effect", "directory for all runs")
flags.DEFINE_list("seeds", ["0", "1", "2"], "seeds")
flags.DEFINE_list("algos", ["grpo", "dapo"], "base algorithms")
flags.DEFINE_list("extra", [], "extra --config.* overrides passed to every run")
flags.DEFINE_bool("summarize_only", False, "only aggregate finished runs")


def environment() -> dict:
    from importlib.metadata import version

    from experiments.bench_common import machine

    libs = {p: version(p) for p in ("jax", "jaxlib", "flax", "optax", "numpy")}
    return {"machine": machine(), "versions": libs, "seeds": FLAGS.seeds, "algos": FLAGS.algos, "extra": FLAGS.extra}


def run_name(algo, clipo, seed):
    return f"{algo}{'+clipo' if clipo else ''}_seed{seed}"


def step_costs(variants) -> dict:
    """Per method: the median step time and CLIPO stage time (head step, loss, reward, metrics) over
    the steps after each run's first (compilation), from the runs' metrics.jsonl."""
    cost = {}
    for algo, clipo in variants:
        steps, stage = [], []
        for seed in FLAGS.seeds:
            path = os.path.join(FLAGS.root, run_name(algo, clipo, seed), "metrics.jsonl")
            if not os.path.exists(path):
                continue
            with open(path) as f:
                rows = [json.loads(line) for line in f if line.strip()]
            rows = [r for r in rows[1:] if "time/step" in r]
            steps += [r["time/step"] for r in rows]
            stage += [r.get("time/contrastive", 0.0) for r in rows]
        if steps:
            step_s, clipo_s = float(np.median(steps)), float(np.median(stage))
            name = run_name(algo, clipo, "")[: -len("_seed")]
            cost[name] = {"step_s": step_s, "clipo_s": clipo_s, "clipo_share": clipo_s / step_s, "steps": len(steps)}
    return cost


def main(argv):
    del argv
    os.makedirs(FLAGS.root, exist_ok=True)
    variants = [(a, c) for a in FLAGS.algos for c in (False, True)]
    # algorithm-major order: every seed of the first pair (e.g. GRPO vs GRPO+CLIPO) finishes first
    for algo in FLAGS.algos:
        for seed in FLAGS.seeds:
            for clipo in (False, True):
                workdir = os.path.join(FLAGS.root, run_name(algo, clipo, seed))
                if FLAGS.summarize_only or os.path.exists(os.path.join(workdir, "eval_after.json")):
                    continue
                arg = f"algo={algo},seed={seed}" + (",clipo" if clipo else "")
                cmd = [
                    sys.executable,
                    "-m",
                    "experiments.train",
                    f"--config=configs/demo.py:{arg}",
                    f"--workdir={workdir}",
                    f"--config.sft.cache_dir={os.path.join(FLAGS.root, 'sft_cache')}",
                    "--config.progress_bar=False",
                    *[f"--config.{x}" for x in FLAGS.extra],
                ]
                print("running", " ".join(cmd), flush=True)
                with open(workdir + ".log", "w") as log:
                    rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT)
                if rc:
                    print(f"run {workdir} failed with exit {rc}; see {workdir}.log", flush=True)

    table = {}
    for algo, clipo in variants:
        name = run_name(algo, clipo, "")[: -len("_seed")]
        evals = []
        for seed in FLAGS.seeds:
            path = os.path.join(FLAGS.root, run_name(algo, clipo, seed), "eval_after.json")
            if os.path.exists(path):
                with open(path) as f:
                    evals.append(json.load(f))
        if evals:
            table[name] = evals
    sft = []
    for seed in FLAGS.seeds:
        path = os.path.join(FLAGS.root, run_name(FLAGS.algos[0], False, seed), "eval_before.json")
        if os.path.exists(path):
            with open(path) as f:
                sft.append(json.load(f))
    if sft:
        table = {"SFT (start)": sft, **table}
    if not table:
        sys.exit("no finished runs")
    sets = list(next(iter(table.values()))[0])
    keys = ("outcome", "process", "lucky")
    summary = {name: {} for name in table}
    lines = []
    for k in keys:  # one table per metric: methods x test sets, mean ± std over seeds (in %)
        lines += [
            "",
            f"**{k}** (% of problems, greedy, mean ± std over seeds)",
            "",
            "| method | seeds | " + " | ".join(sets) + " |",
            "|---|---|" + "---|" * len(sets),
        ]
        for name, evals in table.items():
            cells = []
            for s in sets:
                vals = np.array([e[s][k] for e in evals]) * 100
                summary[name][f"{s}/{k}"] = {
                    "mean": float(vals.mean()),
                    "std": float(vals.std()),
                    "values": vals.tolist(),
                }
                cells.append(f"{vals.mean():.1f} ± {vals.std():.1f}")
            lines.append(f"| {name} | {len(evals)} | " + " | ".join(cells) + " |")
    cost = step_costs(variants)
    if cost:
        lines += [
            "",
            "**cost per RL step** (median over steps after the first, over every seed's run)",
            "",
            "| method | step s | CLIPO stage s | CLIPO share |",
            "|---|---|---|---|",
        ]
        for name, c in cost.items():
            share = f"{100 * c['clipo_share']:.1f}%" if c["clipo_s"] else "-"
            lines.append(f"| {name} | {c['step_s']:.2f} | {c['clipo_s']:.3f} | {share} |")
    md = "\n".join(lines)
    print(md)
    with open(os.path.join(FLAGS.root, "summary.md"), "w") as f:
        f.write(md + "\n")
    with open(os.path.join(FLAGS.root, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    with open(os.path.join(FLAGS.root, "cost_per_step.json"), "w") as f:
        json.dump(cost, f, indent=1)
    with open(os.path.join(FLAGS.root, "environment.json"), "w") as f:  # what the numbers depend on
        json.dump(environment(), f, indent=1)


if __name__ == "__main__":
    app.run(main)
