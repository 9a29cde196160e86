# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # CLIPO: the contrastive losses, the head step, and the effect on the embedded task
#
# CLIPO (arXiv 2603.10101) maps each rollout's pooled final hidden state to a unit-norm embedding
# with a small head, scores it with a supervised contrastive loss over its rollout group, and adds
# `c_i = max(c0 - lam * L_i * [y_i = 1], clip_min)` to the outcome reward of correct rollouts.
# This notebook
#
# 1. evaluates the four loss types of `clipo_jax/contrastive.py` on toy embeddings and checks them
#    against a plain numpy transcription of the formulas, including two cases with a closed form;
# 2. runs the online head update (`head_step`) on toy pooled states;
# 3. plots the recorded GRPO vs GRPO+CLIPO study (3 seeds) with error bars.
#
# Runs on CPU in well under a minute; `NOTEBOOK_SIZE` changes nothing here.

# %%
import json
import pathlib

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

from clipo_jax import contrastive as C

ROOT = next(p for p in [pathlib.Path.cwd(), *pathlib.Path.cwd().parents] if (p / "clipo_jax").is_dir())
TAU, EPS = 0.05, 1e-8  # the default temperature and the reference's eps
print("loss types:", sorted(C.LOSSES), " similarities:", sorted(C.SIMILARITIES))

# %% [markdown]
# ## A numpy reference, written from the formulas
#
# For anchor `i` in a group: `s_ij` cosine similarity, logits `l_ij = (s_ij - max_k s_ik) / tau`
# (the row max includes `i` itself), `A(i)` = the group minus `i`, `P(i)` = same label minus `i`,
# `S_i = sum_{a in A(i)} exp(l_ia)`. Then
#
# | loss | `L_i` |
# |---|---|
# | soft_nn | `-[log(sum_P exp l_ip + eps) - log(S_i + eps)]` |
# | supcon_in | soft_nn `+ log(|P| + eps)` |
# | supcon_out | `-(1/(|P|+eps)) sum_P [l_ip - log(S_i + eps)]` |
# | infonce | `-[l_{i p_i} - log(S_i + eps)]` for one positive `p_i` drawn per anchor |
#
# Anchors with label 0 (incorrect) are masked, as are anchors without a positive or a negative.
# InfoNCE draws its positive at random: the reference takes the drawn positive as an argument.


# %%
def numpy_loss(z, labels, loss_type, tau=TAU, picked=None):
    """Per-anchor loss of one group (loops, float64); picked[i] = InfoNCE's positive for anchor i."""
    z = np.asarray(z, np.float64)
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    s = z @ z.T
    n = len(z)
    out = np.zeros(n)
    for i in range(n):
        logits = (s[i] - s[i].max()) / tau
        others = [j for j in range(n) if j != i]
        pos = [j for j in others if labels[j] == labels[i]]
        neg = [j for j in others if labels[j] != labels[i]]
        if labels[i] == 0 or not pos or not neg:
            continue
        log_s = np.log(np.exp(logits[others]).sum() + EPS)
        soft_nn = -(np.log(np.exp(logits[pos]).sum() + EPS) - log_s)
        if loss_type == "soft_nn":
            out[i] = soft_nn
        elif loss_type == "supcon_in":
            out[i] = soft_nn + np.log(len(pos) + EPS)
        elif loss_type == "supcon_out":
            out[i] = -np.sum(logits[pos] - log_s) / (len(pos) + EPS)
        elif loss_type == "infonce":
            out[i] = -(logits[picked[i]] - log_s)
    return out


def library_loss(z, labels, loss_type, seed=0):
    groups = np.zeros(len(z), np.int32)
    per, batch = C.contrastive_loss(
        jnp.asarray(z, jnp.float32),
        jnp.asarray(labels),
        jnp.asarray(groups),
        loss_type=loss_type,
        rng=jax.random.key(seed),
    )
    return np.asarray(per), float(batch)


# %% [markdown]
# ## Closed-form case 1: identical positives
#
# A group of 16: the 8 correct rollouts share one embedding, the 8 incorrect ones are orthogonal to
# it and to each other. For a correct anchor the 7 positives have logit 0 and the 8 negatives
# `-1/tau = -20`, so `S = 7 + 8 e^-20` and InfoNCE = SupCon-out = SupCon-in `= log S ~ log 7`,
# while Soft-NN `= log(S + eps) - log(7 + eps) ~ 0`: all positives are already as close as possible.

# %%
z1 = np.zeros((16, 16), np.float32)
z1[:8, 0] = 1.0
for i in range(8, 16):
    z1[i, i] = 1.0
y1 = np.array([1] * 8 + [0] * 8)

S = 7 + 8 * np.exp(-1 / TAU)
expected = {
    "infonce": np.log(S + EPS),
    "supcon_out": np.log(S + EPS),
    "soft_nn": np.log(S + EPS) - np.log(7 + EPS),
}
expected["supcon_in"] = expected["soft_nn"] + np.log(7 + EPS)  # soft_nn + log |P|
print(f"{'loss':<11}{'closed form':>14}{'library':>12}{'numpy ref':>12}   (correct anchors; log 7 = {np.log(7):.6f})")
for name, want in expected.items():
    per, _ = library_loss(z1, y1, name)
    ref = numpy_loss(z1, y1, name, picked=[1] * 8 + [None] * 8)
    print(f"{name:<11}{want:>14.6f}{per[:8].mean():>12.6f}{ref[:8].mean():>12.6f}")
    np.testing.assert_allclose(per[:8], want, atol=1e-5)
    np.testing.assert_allclose(ref[:8], want, atol=1e-9)
    assert np.all(per[8:] == 0), "incorrect anchors are masked"

# %% [markdown]
# ## Closed-form case 2: everything orthogonal, where eps matters
#
# Now all 16 embeddings are mutually orthogonal. Every other rollout has logit `-20`, so
# `S = 15 e^-20 ~ 3.1e-8`, the same order as `eps = 1e-8`. InfoNCE is
# `20 + log(15 e^-20 + eps) ~ 2.988`, not the `log 15 ~ 2.708` one gets without eps. The library
# follows the reference code's eps placement exactly, so it reproduces 2.988.

# %%
z2 = np.eye(16, dtype=np.float32)
want = 1 / TAU + np.log(15 * np.exp(-1 / TAU) + EPS)
per, _ = library_loss(z2, y1, "infonce")
print(f"closed form {want:.6f}   library {per[:8].mean():.6f}   log 15 = {np.log(15):.6f}")
np.testing.assert_allclose(per[:8], want, atol=1e-4)
assert abs(want - 2.988) < 1e-3

# %% [markdown]
# ## Random embeddings: the library against the numpy reference
#
# Two groups of 8 random 6-dimensional embeddings with mixed labels. Group level (the default)
# is computed blockwise in the library, one `[G, G]` block per prompt, never a `B x B` matrix.

# %%
rng = np.random.default_rng(0)
z = rng.normal(size=(16, 6)).astype(np.float32)
labels = np.array([1, 1, 0, 1, 0, 0, 1, 1, 0, 1, 1, 1, 0, 0, 0, 1])
groups = np.repeat(np.arange(2), 8)
zn = z / np.linalg.norm(z, axis=1, keepdims=True)
print(f"{'loss':<11}{'max |library - numpy|':>22}{'batch loss':>12}")
key = jax.random.key(1)
# InfoNCE's draw, replayed: one randint per anchor gives the rank of its positive among P(i) in column order
n_pos = np.array(
    [sum(labels[j] == labels[i] for j in range(8 * (i // 8), 8 * (i // 8) + 8) if j != i) for i in range(16)]
)
rank = np.asarray(jax.random.randint(key, (16,), 0, np.maximum(n_pos, 1)))
for name in ("infonce", "supcon_in", "supcon_out", "soft_nn"):
    per, batch = C.contrastive_loss(zn, labels, groups, loss_type=name, rng=key)
    per = np.asarray(per)
    ref = np.zeros(16)
    for g in range(2):
        sl, lab = slice(8 * g, 8 * g + 8), labels[8 * g : 8 * g + 8]
        picked = {}
        for i in range(8):
            pos = [j for j in range(8) if j != i and lab[j] == lab[i]]
            picked[i] = pos[rank[8 * g + i]] if pos else None
        ref[sl] = numpy_loss(zn[sl], lab, name, picked=picked)
    diff = np.abs(per - ref).max()
    print(f"{name:<11}{diff:>22.2e}{float(batch):>12.4f}")
    assert diff < 1e-4, (name, diff)

# %% [markdown]
# ## The reward
#
# Correct rollouts get `c_i = max(c0 - lam * L_i, clip_min)` (defaults `c0 = 0`, `lam = 0.2`,
# `clip_min = -0.5`); incorrect ones get `c0 = 0`. A correct rollout far from its peers (large
# `L_i`) earns less than one inside the cluster of correct answers.

# %%
per, _ = C.contrastive_loss(zn, labels, groups, loss_type="infonce", rng=jax.random.key(1))
reward = np.asarray(C.contrastive_reward(per, labels))
np.testing.assert_allclose(reward, np.maximum(-0.2 * np.asarray(per) * (labels == 1), -0.5), rtol=1e-6)
for name, arr in (("label", labels), ("L_i", np.asarray(per).round(3)), ("c_i", reward.round(3))):
    print(f"{name:<6}", arr[:8])

# %% [markdown]
# ## The head step
#
# The head (linear, `hidden -> d_out`, then L2 normalisation) is trained online with AdamW on the
# contrastive loss of each batch. `head_step` returns the per-sample losses *before* its update:
# those drive the reward of that batch. Here toy pooled states (hidden 32) carry a weak "correct"
# direction plus noise; over a few dozen steps the head learns to pull correct rollouts together,
# and the loss falls.

# %%
G, P, H = 8, 4, 32
cfg = C.ContrastiveConfig(group_size=G, d_out=16, lr=1e-2)
state = C.init_head_state(jax.random.key(0), hidden=H, cfg=cfg)
direction = rng.normal(size=H)
losses = []
for step in range(60):
    lab = rng.integers(0, 2, size=P * G)
    pooled = rng.normal(size=(P * G, H)) + 1.5 * lab[:, None] * direction
    gid = np.repeat(np.arange(P), G)
    state, per_sample, loss, metrics = C.head_step(
        state, jnp.asarray(pooled, jnp.float32), jnp.asarray(lab), jnp.asarray(gid), jax.random.key(step), cfg
    )
    losses.append(float(loss))
print(f"head step {int(state.step)}: batch loss first 5 {np.mean(losses[:5]):.3f} -> last 5 {np.mean(losses[-5:]):.3f}")
print({k: round(float(v), 3) for k, v in metrics.items()})
assert np.mean(losses[-5:]) < np.mean(losses[:5])
fig, ax = plt.subplots(figsize=(5, 2.5))
ax.plot(losses)
ax.set_xlabel("head step")
ax.set_ylabel("InfoNCE batch loss")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## GRPO vs GRPO+CLIPO on the embedded task (recorded study)
#
# `python -m experiments.clipo_effect --root=D --tasks=default --seeds=0,1,2 --algos=grpo --ablations=
# --eval_every=0 --extra=clipo.pooling=prefill_and_decode` trains each method from the same SFT start per
# seed and writes the greedy evaluation on the five 200-problem test sets, mean and std over seeds; the
# table `tasks.default.methods` of its `summary.json` is stored as `docs/clipo_effect_summary.json` (Intel
# Xeon, 2 cores, the pinned versions; docs/results.md). The study takes about an hour on 2 CPU cores, so
# this notebook reads that file. Error bars are one standard deviation over the 3 seeds.

# %%
summary = json.loads((ROOT / "docs" / "clipo_effect_summary.json").read_text())
methods = list(summary)
sets = ["in_dist", "big_numbers", "extra_step_1", "extra_step_2", "distractor"]
print(f"outcome accuracy, % (mean ± std over seeds, n = {len(summary['grpo']['in_dist/outcome']['values'])})")
print(f"{'method':<14}" + "".join(f"{s:>15}" for s in sets))
for m in methods:
    cells = [summary[m][f"{s}/outcome"] for s in sets]
    print(f"{m:<14}" + "".join(f"{c['mean']:>8.1f} ± {c['std']:<4.1f}" for c in cells))
    for c in cells:  # the summary's mean and std are those of its per-seed values (population std)
        assert abs(np.mean(c["values"]) - c["mean"]) < 1e-9 and abs(np.std(c["values"]) - c["std"]) < 1e-9

fig, axes = plt.subplots(1, 2, figsize=(9, 3))
for ax, metric in zip(axes, ("outcome", "process")):
    width = 0.8 / len(methods)
    for k, m in enumerate(methods):
        means = [summary[m][f"{s}/{metric}"]["mean"] for s in sets]
        stds = [summary[m][f"{s}/{metric}"]["std"] for s in sets]
        ax.bar(np.arange(len(sets)) + k * width, means, width, yerr=stds, capsize=2, label=m)
    ax.set_xticks(np.arange(len(sets)) + 0.4 - width / 2)
    ax.set_xticklabels(sets, rotation=30, fontsize=8)
    ax.set_ylabel(f"{metric} accuracy (%)")
axes[0].legend(fontsize=7)
fig.tight_layout()
plt.show()

# %% [markdown]
# Each +CLIPO variant against its base method: the difference of the means, and that difference in
# units of the combined seed spread `sqrt(std_a^2 + std_b^2)`. With 3 seeds, only ratios well above 1
# would indicate an effect (README, "CLIPO's effect on the embedded task", says what the setup can and
# cannot show).

# %%
ratios = []
print(f"{'comparison':<20}{'test set':<14}{'diff (points)':>14}{'diff / spread':>15}")
for base in [m for m in methods if m + "+clipo" in summary]:
    for s in sets:
        a, b = summary[base][f"{s}/outcome"], summary[base + "+clipo"][f"{s}/outcome"]
        d = b["mean"] - a["mean"]
        spread = np.hypot(a["std"], b["std"])
        ratio = abs(d) / spread if spread else 0.0
        ratios.append(ratio)
        print(f"{base + ' -> +clipo':<20}{s:<14}{d:>+14.1f}{ratio:>15.2f}")
print(f"largest |diff| / spread: {max(ratios):.2f}")

# %% [markdown]
# ## The shortcut variant: when GRPO learns to copy, and whether CLIPO stops it (recorded study)
#
# `configs/demo.py:shortcut=0.5,leak=last,hard` leaks the answer into a clause right before the
# question on half the training problems, with harder arithmetic, so copying pays
# (docs/parts/synthetic.md). `XLA_PYTHON_CLIENT_MEM_FRACTION=0.08 python -m experiments.clipo_effect
# --root=RUNS --tasks=shortcut --algos=grpo --seeds=0,1,2,3,4 --ablations= --shortcut_share=0.5
# --shortcut_args=leak=last,hard --eval_every=20 --jobs=10` ran GRPO and GRPO+CLIPO from the same
# SFT start per seed on one H200; its summary (the root written as RUNS) is
# `docs/clipo_shortcut_summary.json`. `leak`: every test problem leaked (copying pays);
# `leak_decoy`: a wrong number in the clause (copying fails). Rates in %.

# %%
shortcut = json.loads((ROOT / "docs" / "clipo_shortcut_summary.json").read_text())
task = shortcut["task"]
print(shortcut["study"]["tasks"]["shortcut"], "|", shortcut["environment"]["devices"])
seeds = shortcut["study"]["seeds"]
for key in ("leak/lucky", "leak_decoy/copied", "leak_decoy/outcome"):
    print(f"\n{key} per seed {', '.join(seeds)}")
    for m, cells in task["methods"].items():
        c = cells[key]
        assert len(c["values"]) == len(seeds) and abs(np.mean(c["values"]) - c["mean"]) < 1e-9
        print(f"  {m:<12}" + "".join(f"{v:>7.1f}" for v in c["values"]) + f"   mean {c['mean']:.1f}")
for name, d in task["paired_differences"].items():
    for key in ("leak/lucky", "leak_decoy/copied", "in_dist/outcome"):
        lo, hi = d[key]["ci95"]
        print(f"{name}  {key:<18} {d[key]['mean']:+.1f} points, 95% CI [{lo:+.1f}, {hi:+.1f}]")

# %% [markdown]
# The lucky rate on `leak` at every evaluated RL step, one line per seed: copying runs away in one
# seed and stays near its SFT level in the others (docs/results.md discusses it).


# %%
def plot_seed_curves(curves: dict, key: str = "leak/lucky"):
    """One panel per method: `key` at every evaluated RL step, one line per seed."""
    fig, axes = plt.subplots(1, len(curves), figsize=(3.3 * len(curves), 3), sharey=True)
    for ax, (m, curve) in zip(np.atleast_1d(axes), curves.items()):
        for seed, values in zip(curve["seeds"], curve[key]["values"]):
            ax.plot(curve["steps"], values, marker="o", label=f"seed {seed}")
        ax.set_title(m)
        ax.set_xlabel("RL step")
    np.atleast_1d(axes)[0].set_ylabel(f"{key} (%)")
    np.atleast_1d(axes)[0].legend(fontsize=7)
    fig.tight_layout()
    plt.show()


plot_seed_curves(task["curves"])

# %% [markdown]
# With bare copies (`copy_style=bare`: the SFT copying traces are the answer line alone) GRPO learns
# the shortcut at the demo's own difficulty in seeds 0, 2 and 4 of 5 on the CPU; GRPO+CLIPO learns
# it in the same seeds. `python -m experiments.clipo_effect --root=RUNS --tasks=shortcut --algos=grpo
# --seeds=0,1,2,3,4 --ablations= --eval_every=20 --jobs=2` (the study's default shortcut setting:
# `--shortcut_share=0.5 --shortcut_args=leak=last,copy_style=bare`) on 2 CPU cores; its summary is
# `docs/clipo_shortcut_bare_summary.json`, together with the same study's `--ablations=loss=soft_nn`
# runs (same root, same SFT starts). Its training rollouts were graded too
# (`config.eval.grade_rollouts`), so it also holds CLIPO's contrastive reward of the lucky successes
# minus that of the process-right ones (`reward_gap`): CLIPO's claim needs it below 0. With the
# default InfoNCE loss it is above 0; with soft_nn it is about 0, and the copying is the same.

# %%
bare = json.loads((ROOT / "docs" / "clipo_shortcut_bare_summary.json").read_text())
task = bare["task"]
print(bare["study"]["tasks"]["shortcut"], "|", bare["environment"]["devices"])
for m, curve in task["curves"].items():
    for seed, values in zip(curve["seeds"], curve["leak/lucky"]["values"]):
        print(f"{m:<12} seed {seed}: lucky on leak at steps {curve['steps']}: " + ", ".join(f"{v:.1f}" for v in values))
for key in ("leak_decoy/copied", "leak_decoy/outcome", "in_dist/outcome"):
    print(key, {m: cells[key]["values"] for m, cells in task["methods"].items()})
for m, g in task["reward_gap"].items():
    lo, hi = g["ci95"]
    print(
        f"{m}: CLIPO reward, lucky minus process-right successes, per seed {g['seeds']}: "
        + ", ".join(f"{v:+.3f}" for v in g["values"])
        + f"; mean {g['mean']:+.3f} [{lo:+.3f}, {hi:+.3f}]"
    )

# %% [markdown]
# ## The study at its defaults: GRPO and DAPO, with and without CLIPO, both tasks, 5 seeds (recorded)
#
# `XLA_PYTHON_CLIENT_MEM_FRACTION=0.07 JAX_COMPILATION_CACHE_DIR=CACHE python -m experiments.clipo_effect
# --root=RUNS --tasks=shortcut,default --algos=grpo,dapo --seeds=0,1,2,3,4 --ablations= --eval_every=20
# --jobs=12` on one H200 (the shortcut task at the default `--shortcut_share=0.5
# --shortcut_args=leak=last,copy_style=bare`); its summary is `docs/clipo_study_summary.json`. Three
# of CLIPO's ablations on GRPO and the shortcut task (`--tasks=shortcut --algos=grpo
# --ablations=fixed_head,lam=0.5,lam=0.05`, same root, so the same SFT starts), and the other nine
# (the other three losses on GRPO, all six on DAPO) are in `docs/clipo_study_ablations_summary.json`.
# Those nine ran where the SFT caches were missing: their seeds retrained SFT, which on a GPU gave
# other parameters (`SFT (start 2)`), so the summary does not pair them with their base runs.

# %%
study = json.loads((ROOT / "docs" / "clipo_study_summary.json").read_text())
ablations = json.loads((ROOT / "docs" / "clipo_study_ablations_summary.json").read_text())
print(study["study"]["command"])
print(study["environment"]["devices"], "|", study["environment"]["versions"])
seeds = study["study"]["seeds"]
sc = study["tasks"]["shortcut"]
for key in ("leak/lucky", "leak_decoy/copied", "leak_decoy/outcome", "in_dist/process"):
    print(f"\nshortcut task, {key}, per seed {', '.join(seeds)}")
    # the ablation study repeats the SFT / grpo / grpo+clipo rows: shown once
    extra = {m: c for m, c in ablations["tasks"]["shortcut"]["methods"].items() if m not in sc["methods"]}
    other = ablations["tasks"]["shortcut"]["other_starts"]  # method -> {seed: start}, for runs not from start 1
    for m, cells in {**sc["methods"], **extra}.items():
        c = cells[key]
        assert c["seeds"] == seeds and abs(np.mean(c["values"]) - c["mean"]) < 1e-9
        start = " (start 2)" if m in other else ""
        print(f"  {m + start:<38}" + "".join(f"{v:>7.1f}" for v in c["values"]) + f"   mean {c['mean']:.1f}")

# %% [markdown]
# Paired by seed, each CLIPO method minus its base algorithm, with the percentile-bootstrap 95% CI
# over the 5 seeds (every set and rate is in the summaries).

# %%
for task_name, task in study["tasks"].items():
    diffs = dict(task["paired_differences"])
    if task_name == "shortcut":
        diffs.update({k: v for k, v in ablations["tasks"]["shortcut"]["paired_differences"].items() if k not in diffs})
    keys = (
        ("leak/lucky", "leak_decoy/copied", "in_dist/outcome")
        if task_name == "shortcut"
        else ("in_dist/outcome", "in_dist/process", "extra_step_1/outcome")
    )
    for name, d in diffs.items():
        cells = [f"{k} {d[k]['mean']:+.1f} [{d[k]['ci95'][0]:+.1f}, {d[k]['ci95'][1]:+.1f}]" for k in keys]
        print(f"{task_name:<9} {name:<38} " + "; ".join(cells))

# %% [markdown]
# The nine start-2 runs also graded their training rollouts: CLIPO's reward of the lucky successes
# minus that of the process-right ones, per seed and mean [bootstrap 95% CI] (> 0: the copies get
# the higher contrastive reward).

# %%
for m, g in ablations["tasks"]["shortcut"]["reward_gap"].items():
    lo, hi = g["ci95"]
    print(
        f"  {m:<28} " + ", ".join(f"{v:+.3f}" for v in g["values"]) + f"; mean {g['mean']:+.3f} [{lo:+.3f}, {hi:+.3f}]"
    )

# %% [markdown]
# The lucky rate on `leak` at every evaluated RL step, one line per seed. Copying is all or nothing:
# in the seeds where GRPO or DAPO picks it up it takes over the leaked problems, and CLIPO follows
# its base method in every seed.

# %%
plot_seed_curves(sc["curves"])

# %%
print("cost per RL step (median; the runs shared the GPU, 12 at a time)")
for task_name, task in study["tasks"].items():
    for m, c in task["cost_per_step"].items():
        share = f"{100 * c['clipo_share']:.1f}%" if c["clipo"] else "-"
        print(f"  {task_name:<9} {m:<12} step {c['step_s']:.3f} s  CLIPO stage {c['clipo_s']:.4f} s  share {share}")
