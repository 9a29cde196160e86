# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # OpenRS as an RL reward: instruction following with SmolLM2-135M-Instruct
#
# Reads a run of `configs/openrs_if_smollm2.py` (by default the one recorded in
# `docs/runs/openrs_if_smollm2/`, made with
# `python -m experiments.train --config=configs/openrs_if_smollm2.py:judge=logit --workdir=RUN`)
# and shows the reward terms, the judge's Same ratio and the policy entropy per step, the step-time
# split (rollout / judge / update) and the constraint accuracy before -> after RL.
#
# Runs as a notebook (jupytext) or as a script:
# `python notebooks/openrs_rl.py [RUN_DIR] [--png=docs/openrs_if_curves.png]`.

# %%
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__)) if "__file__" in globals() else os.getcwd()
REPO = os.path.dirname(HERE)
args = [a for a in sys.argv[1:] if not a.startswith("-")] if "__file__" in globals() else []
RUN = args[0] if args else os.environ.get("OPENRS_RUN", os.path.join(REPO, "docs", "runs", "openrs_if_smollm2"))
PNG = next((a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--png=")), None)

rows = [json.loads(line) for line in open(os.path.join(RUN, "metrics.jsonl"))]
steps = np.array([r["step"] for r in rows])


def series(key):
    return np.array([r.get(key, np.nan) for r in rows], float)


print(f"{len(rows)} RL steps from {RUN}")

# %% [markdown]
# ## Rewards, Same ratio, entropy

# %%
fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
for key, label in [
    ("reward/mean", "final reward"),
    ("reward/verifiable/mean", "constraints followed (fraction)"),
    ("reward/pairwise_rubric/mean", "pairwise rubric (vs greedy)"),
    ("reward/pvr/mean", "PVR (guardrails)"),
]:
    axes[0].plot(steps, series(key), label=label)
axes[0].set_xlabel("RL step")
axes[0].set_title("reward terms (raw means)")
axes[0].legend(fontsize=7)
axes[1].plot(steps, series("reward/pairwise_rubric/same_ratio"))
axes[1].set_ylim(-0.05, 1.05)
axes[1].set_xlabel("RL step")
axes[1].set_title("judge 'Same' ratio")
axes[2].plot(steps, series("actor/entropy"))
axes[2].set_xlabel("RL step")
axes[2].set_title("policy entropy (nats / token)")
fig.tight_layout()
if PNG:
    fig.savefig(PNG, dpi=110)
    print("wrote", PNG)

# %% [markdown]
# ## Where a step's time goes

# %%
split = {
    k: float(np.nanmean(series(f"time/{k}")))
    for k in ("rollout", "reward", "reward_wait", "reference", "update", "step")
}
print("mean seconds per step: " + ", ".join(f"{k} {v:.1f}" for k, v in split.items()))
print(
    "judge: {:.0f} calls / step, {:.0f} cache hits, {:.0f} parse failures, {:.0f} backend failures in all".format(
        np.nanmean(series("reward/pairwise_rubric/calls")),
        np.nansum(series("reward/pairwise_rubric/cache_hits")),
        np.nansum(series("reward/pairwise_rubric/parse_failures")),
        np.nansum(series("reward/pairwise_rubric/backend_failures")),
    )
)

# %% [markdown]
# ## Constraint accuracy before -> after RL (greedy, strict)

# %%
before = json.load(open(os.path.join(RUN, "eval_before.json")))
after = json.load(open(os.path.join(RUN, "eval_after.json")))
print(f"{'test set':<16}{'prompt-level':>22}{'instruction-level':>24}{'prompts':>9}")
for name in after:
    b, a = before[name], after[name]
    print(
        f"{name:<16}{b['prompt_strict']:>10.3f} -> {a['prompt_strict']:<8.3f}"
        f"{b['instruction_strict']:>12.3f} -> {a['instruction_strict']:<8.3f}{a.get('n_problems', 0):>9}"
    )
