# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # Quickstart: SFT + GRPO on the embedded arithmetic task
#
# The embedded demo (`configs/demo.py`, the README's first command) needs no downloads: a synthetic
# task of 2-3 step arithmetic chains with its own SentencePiece tokenizer, a small decoder trained
# from scratch, an SFT warm start on gold traces (20% of them "lucky": a wrong process that still
# reaches the right answer), then GRPO with a verifiable outcome reward. Greedy evaluation before and
# after RL reports outcome accuracy, process accuracy (right answer by a valid process) and the lucky
# rate on an in-distribution test set and four shifted ones (bigger numbers, one or two extra steps,
# an irrelevant distractor clause).
#
# **Size.** With `NOTEBOOK_SIZE=small` (the default, what CI runs) the model (2 layers, d 64), the SFT
# (200 steps) and the RL run (12 steps of 8 prompts) are shrunk to a few minutes on 2 CPU cores. That
# is too little training for the model to solve the task: the small size shows the mechanics (the
# pipeline, the files, the curve and the tables), with a near-flat curve and before/after numbers
# within noise of each other. `NOTEBOOK_SIZE=full` runs `configs/demo.py` unchanged (1,000 SFT steps,
# 60 RL steps of 32 prompts, 200 problems per test set; about 10 minutes on 2 cores), where the
# sampled reward rises clearly; the README reports that run. The same run from a shell:
# `python -m experiments.train --config=configs/demo.py --workdir=DIR`.

# %%
import json
import os
import pathlib
import sys
import tempfile
import time

import matplotlib.pyplot as plt
import numpy as np

ROOT = next(p for p in [pathlib.Path.cwd(), *pathlib.Path.cwd().parents] if (p / "configs" / "demo.py").exists())
sys.path.insert(0, str(ROOT))  # the configs package lives at the repository root

from clipo_jax import tasks, trainer  # noqa: E402
from configs import demo  # noqa: E402

SIZE = os.environ.get("NOTEBOOK_SIZE", "small")
print("size:", SIZE)

# %% [markdown]
# ## The config
#
# A config is an `ml_collections.ConfigDict`; anything in it can be overridden (from the command line:
# `--config.rl.steps=10`). The small size overrides the fields printed below.

# %%
config = demo.get_config("seed=0")
if SIZE == "small":
    small = {
        "task": dict(train_size=4000, sft_size=3000, test_size=64),
        "model": dict(d_model=64, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=32, d_ff=256),
        "sft": dict(steps=200),
        "rl": dict(steps=12, prompts_per_step=8),
    }
    for block, values in small.items():
        config[block].update(values)
        print(f"{block}: {values}")
config.progress_bar = False
rl = config.rl
print(
    f"\nRL: {rl.steps} steps x {rl.prompts_per_step} prompts x {rl.group_size} rollouts, "
    f"{rl.advantage} advantages, {rl.policy_loss} (clip {rl.eps_low}/{rl.eps_high}, dual clip {rl.dual_clip}), "
    f"lr {rl.lr}, T = {rl.temperature}; SFT {config.sft.steps} steps x {config.sft.batch_size}"
)

# %% [markdown]
# ## The task
#
# A look at the data: an RL prompt with its ground truth, an SFT trace, and a problem from each
# shifted test set. (The trainer builds the same task in its run directory; the tokenizer trained
# here is reused.)

# %%
workdir = os.environ.get("QUICKSTART_WORKDIR") or tempfile.mkdtemp(prefix="clipo_quickstart_")
task = tasks.build_task(config.task, workdir)
row = task.train_rows[0]
print("RL prompt:", repr(row["prompt"]), " ground truth:", row["ground_truth"])
prompt, trace = task.sft_pairs[0]
print("SFT pair:", repr(prompt), "->", repr(trace))
for name, rows in task.test_sets.items():
    print(f"{name:<13} ({len(rows)} problems) e.g. {rows[0]['prompt']!r}")
print("tokenizer:", task.tokenizer.vocab_size, "pieces; prompt tokens:", len(task.encode_prompt(row)))

# %% [markdown]
# ## Train
#
# `trainer.run` does the SFT warm start, the evaluation before RL, the RL steps (rollout -> reward ->
# advantages -> reference log-probs -> PPO-clip update), checkpoints, and the evaluation after RL. It
# writes `metrics.jsonl` (one line per RL step), `eval_before.json` and `eval_after.json` to the run
# directory; running it again on the same directory resumes.

# %%
t0 = time.perf_counter()
result = trainer.run(config, workdir)
wall = time.perf_counter() - t0
print(f"\nwall time {wall:.0f} s")

# %% [markdown]
# ## The reward curve
#
# The mean outcome reward of the sampled rollouts (temperature 1) per RL step, and a running mean.

# %%
metrics = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
steps = np.array([m["step"] for m in metrics])
reward = np.array([m["reward/outcome_mean"] for m in metrics])
k = min(5, len(reward))
smooth = np.convolve(reward, np.ones(k) / k, mode="valid")
fig, ax = plt.subplots(figsize=(6, 3))
ax.plot(steps, reward, alpha=0.35, label="per step")
ax.plot(steps[k - 1 :], smooth, label=f"{k}-step mean")
ax.set_xlabel("RL step")
ax.set_ylabel("outcome reward (sampled)")
ax.legend()
fig.tight_layout()
plt.show()
print(f"first {k} steps: {reward[:k].mean():.3f}   last {k} steps: {reward[-k:].mean():.3f}")

# %% [markdown]
# Where an RL step's time goes (seconds; the first step includes compilation):

# %%
keys = ["time/rollout", "time/reference", "time/update", "time/step"]
print(f"{'':<12}" + "".join(f"{key.split('/')[1]:>10}" for key in keys))
print(f"{'first step':<12}" + "".join(f"{metrics[0][key]:>10.2f}" for key in keys))
later = metrics[1:] or metrics
print(f"{'median rest':<12}" + "".join(f"{np.median([m[key] for m in later]):>10.2f}" for key in keys))

# %% [markdown]
# ## Before and after RL
#
# Greedy decoding on every test set; percentages of problems. `outcome = process + lucky`.

# %%
before, after = result["before"], result["after"]
cols = task.grade_keys
print(f"{'test set':<14}" + "".join(f"{c + ' before -> after':>28}" for c in cols))
for name in after:
    print(f"{name:<14}" + "".join(f"{100 * before[name][c]:>18.1f} -> {100 * after[name][c]:<6.1f}" for c in cols))

# %% [markdown]
# The run directory is a temporary one unless `QUICKSTART_WORKDIR` names a directory to keep (then a
# second execution resumes from its last checkpoint; a finished run is only evaluated again).

# %%
if not os.environ.get("QUICKSTART_WORKDIR"):
    import shutil

    shutil.rmtree(workdir)
