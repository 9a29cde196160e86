"""experiments/clipo_effect.py: the paired bootstrap, flag errors, and the whole study end to end at
the tiny size (real trainer subprocesses; a per-module persistent XLA compilation cache makes the
runs after the first cheap)."""

import itertools
import json
import os
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from experiments.clipo_effect import bootstrap_ci  # noqa: E402


def exact_bootstrap_quantiles(values, level=0.95):
    """The bootstrap distribution of the mean enumerated exactly: all n^n equally likely resamples."""
    v = np.asarray(values, dtype=np.float64)
    means = [v[list(idx)].mean() for idx in itertools.product(range(len(v)), repeat=len(v))]
    return np.percentile(means, [50 * (1 - level), 50 * (1 + level)])


@pytest.mark.parametrize("values", [[0.5, 1.5, -2.0, 4.5], [-2.0, 1.0, -1.0, 2.0, 0.5, -0.5]])
def test_bootstrap_matches_exact_enumeration(values):
    # the values lie on a 0.5 grid, so every resampled mean lies on a grid of 0.5 / n: the Monte
    # Carlo quantile may land on a neighbouring grid point of the exact one, no further
    step = 0.5 / len(values)
    lo, hi = bootstrap_ci(values, n_boot=10000, seed=0)
    ref_lo, ref_hi = exact_bootstrap_quantiles(values)
    assert abs(lo - ref_lo) <= step + 1e-12 and abs(hi - ref_hi) <= step + 1e-12, ((lo, hi), (ref_lo, ref_hi))
    assert bootstrap_ci(values, n_boot=10000, seed=0) == (lo, hi)  # fixed seed: reproducible


def test_bootstrap_ci_excludes_or_includes_zero():
    lo, hi = bootstrap_ci([1.0, 2.0, 1.5, 3.0, 2.5])  # every seed better: the CI is above 0
    assert 0 < lo <= np.mean([1.0, 2.0, 1.5, 3.0, 2.5]) <= hi
    lo, hi = bootstrap_ci([-2.0, 1.0, -1.0, 2.0, 0.5, -0.5])  # signs flip from seed to seed
    assert lo < 0 < hi


def test_bootstrap_needs_two_values():
    assert bootstrap_ci([]) is None
    assert bootstrap_ci([1.5]) is None
    assert bootstrap_ci([2.0, 2.0]) == (2.0, 2.0)


def test_bootstrap_bound_that_is_zero_is_not_round_off():
    # greedy rates are counts of a 200-problem test set; the paired differences in points, as the
    # study computes them, carry round-off (100 * (82/200 - 79/200) = 1.4999999999999958). On the
    # exact half-point grid (integers, exact in float) the same resamples give a lower bound of
    # exactly 0: the interval touches 0, it does not exclude it
    variant, base = [82, 55, 16, 132, 187], [79, 55, 14, 130, 188]
    d = [100 * (a / 200 - b / 200) for a, b in zip(variant, base)]
    half_points = np.subtract(variant, base)  # one problem of 200 is half a point: 3, 0, 2, 2, -1
    idx = np.random.default_rng(0).integers(0, 5, size=(10000, 5))
    sums = half_points[idx].sum(axis=1)  # integers: exact
    ref = np.percentile(sums, [2.5, 97.5]) / 5 * 0.5
    assert ref[0] == 0.0
    lo, hi = bootstrap_ci(d, n_boot=10000, seed=0)
    assert lo == ref[0] and not lo > 0, lo
    assert hi == pytest.approx(ref[1], abs=1e-12)


def test_reward_gap_uses_the_steps_with_both_kinds_of_success(tmp_path):
    from experiments.clipo_effect import run_reward_gap

    rows = [
        {"step": 1, "clipo/count/lucky": 2.0, "clipo/count/process_right": 5.0},
        {"step": 2, "clipo/count/lucky": 0.0, "clipo/count/process_right": 7.0},  # no lucky success
        {"step": 3, "clipo/count/lucky": 4.0, "clipo/count/process_right": 1.0},
        {"step": 3, "eval/in_dist/outcome": 0.5},  # an evaluation row
    ]
    rewards = {1: (-0.1, -0.3), 2: (0.0, -0.2), 3: (-0.4, -0.25)}  # step: (lucky, process_right)
    for r in rows:
        if "clipo/count/lucky" in r:
            r["clipo/reward/lucky/mean"], r["clipo/reward/process_right/mean"] = rewards[r["step"]]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = run_reward_gap(str(tmp_path))
    assert got["steps"] == 2 and got["gap"] == pytest.approx(((-0.1 + 0.3) + (-0.4 + 0.25)) / 2)
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "time/step": 1.0}) + "\n")
    assert run_reward_gap(str(tmp_path)) is None  # a run without the metrics (or without CLIPO)


def study(root, *args, env=None, timeout=60):
    cmd = [sys.executable, "-m", "experiments.clipo_effect", f"--root={root}", *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def fake_run(workdir, before, after, digest=None):
    os.makedirs(workdir)
    for name, value in (("eval_before.json", before), ("eval_after.json", after)):
        with open(os.path.join(workdir, name), "w") as f:
            json.dump({s: {"outcome": v, "process": v, "lucky": 0.0} for s, v in value.items()}, f)
    with open(os.path.join(workdir, "config.json"), "w") as f:  # the curves read rl.steps
        json.dump({"rl": {"steps": 2}}, f)
    if digest:
        with open(os.path.join(workdir, "start.json"), "w") as f:
            json.dump({"params_digest": digest, "sft_cache": None}, f)


def test_runs_from_another_sft_start_are_not_paired(tmp_path):
    # seed 0: both runs from one start (no start.json, equal pre-RL evaluations, as in runs that
    # predate it); seed 1: equal evaluations but different digests; seed 2: both from one digest
    sets = ("in_dist", "distractor")
    before = {s: 0.5 for s in sets}
    after = {"grpo": {0: 0.6, 1: 0.62, 2: 0.55}, "grpo+clipo": {0: 0.7, 1: 0.5, 2: 0.6}}
    digests = {"grpo": {1: "aaaa", 2: "cccc"}, "grpo+clipo": {1: "bbbb", 2: "cccc"}}
    for method, by_seed in after.items():
        for seed, value in by_seed.items():
            run = tmp_path / "default" / f"{method}_seed{seed}"
            fake_run(run, before, {s: value for s in sets}, digests[method].get(seed))
    r = study(tmp_path, "--tasks=default", "--algos=grpo", "--seeds=0,1,2", "--ablations=", "--summarize_only")
    assert r.returncode == 0, r.stderr[-3000:]
    t = json.loads((tmp_path / "summary.json").read_text())["tasks"]["default"]
    d = t["paired_differences"]["grpo+clipo - grpo"]
    assert d["seeds"] == ["0", "2"] and t["unpaired"] == {"grpo+clipo - grpo": ["1"]}
    assert d["in_dist/outcome"]["values"] == pytest.approx([10.0, 5.0])
    assert t["other_starts"] == {"grpo+clipo": {"1": 2}}
    assert list(t["methods"]) == ["SFT (start)", "SFT (start 2)", "grpo", "grpo+clipo"]
    assert t["methods"]["SFT (start 2)"]["in_dist/outcome"]["seeds"] == ["1"]
    md = (tmp_path / "summary.md").read_text()
    assert "Not paired (variant and base from different starts): grpo+clipo - grpo (seeds 1)" in md
    assert "| grpo+clipo | 0.0 | 0.0 (s2) | 0.0 |" in md  # the per-seed lucky table marks the start
    # summarized again elsewhere: the environment stays the one the runs ran on
    summary = json.loads((tmp_path / "summary.json").read_text())
    here, summary["environment"] = summary["environment"], {"devices": "gpu: 1 x NVIDIA H200"}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    r = study(tmp_path, "--tasks=default", "--algos=grpo", "--seeds=0,1,2", "--ablations=", "--summarize_only")
    assert r.returncode == 0, r.stderr[-3000:]
    again = json.loads((tmp_path / "summary.json").read_text())
    assert again["environment"] == {"devices": "gpu: 1 x NVIDIA H200"} and again["summarized_on"] == here


def test_runs_with_different_digests_are_not_paired_through_a_run_without_one(tmp_path):
    # seed 0: the grpo runs predate start.json (no digest); dapo and dapo+clipo record different
    # digests. All four have the same pre-RL evaluation, so each digest run matches the grpo runs
    # by it, but dapo and dapo+clipo did not start from the same parameters: not paired, and not
    # shown as one start
    before = {"in_dist": 0.5}
    runs = {"grpo": (0.6, None), "grpo+clipo": (0.7, None), "dapo": (0.6, "aaaa"), "dapo+clipo": (0.65, "bbbb")}
    for method, (value, digest) in runs.items():
        fake_run(tmp_path / "default" / f"{method}_seed0", before, {"in_dist": value}, digest)
    r = study(tmp_path, "--tasks=default", "--algos=grpo,dapo", "--seeds=0", "--ablations=", "--summarize_only")
    assert r.returncode == 0, r.stderr[-3000:]
    t = json.loads((tmp_path / "summary.json").read_text())["tasks"]["default"]
    assert list(t["paired_differences"]) == ["grpo+clipo - grpo"]  # no digests: matched by the evaluation
    assert t["paired_differences"]["grpo+clipo - grpo"]["in_dist/outcome"]["values"] == pytest.approx([10.0])
    assert t["unpaired"] == {"dapo+clipo - dapo": ["0"]}
    assert t["other_starts"] == {"dapo+clipo": {"0": 2}}
    assert list(t["methods"]) == ["SFT (start)", "SFT (start 2)", "grpo", "grpo+clipo", "dapo", "dapo+clipo"]


def test_a_lost_sft_cache_is_announced_before_new_runs(tmp_path):
    for method in ("grpo", "grpo+clipo"):
        fake_run(tmp_path / "default" / f"{method}_seed0", {"in_dist": 0.5}, {"in_dist": 0.6})
    cmd = [sys.executable, "-m", "experiments.clipo_effect", f"--root={tmp_path}", "--tasks=default", "--algos=grpo"]
    cmd += ["--seeds=0", "--ablations=fixed_head", "--size=tiny", "--jobs=1"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        first = proc.stdout.readline()  # printed before the pending fixed-head run starts
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    assert first.startswith(f"warning: {tmp_path / 'default' / 'sft_cache_seed0'} is missing but 2 run(s)"), first


@pytest.mark.parametrize(
    "args, message",
    [
        (["--ablations=loss=nope"], "loss='nope' is not one of"),
        (["--ablations=lam=x"], "lam='x' is not a number"),
        (["--ablations=dropout"], "unknown ablation 'dropout'"),
        (["--tasks=default,gsm8k"], "--tasks: unknown ['gsm8k']"),
        (["--algos=grpo,ppo"], "unknown algo 'ppo'"),
        (["--shortcut_share=0"], "--shortcut_share=0.0 must be in (0, 1]"),
        (["--tasks=shortcut", "--shortcut_args=leak=middle"], "config arg leak='middle'; valid: anywhere, last"),
        (["--tasks=shortcut", "--shortcut_args=copies=0.5"], "unknown config arg 'copies'"),
    ],
)
def test_flag_errors(tmp_path, args, message):
    r = study(tmp_path, *args)
    assert r.returncode != 0 and message in r.stderr, r.stderr[-2000:]
    assert not os.listdir(tmp_path)  # nothing ran


@pytest.mark.slow
def test_study_end_to_end(tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    env.update(JAX_COMPILATION_CACHE_DIR=str(tmp_path / "xla_cache"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    env.pop("XLA_FLAGS", None)
    root = tmp_path / "study"
    args = [
        "--size=tiny",
        "--seeds=0,1",
        "--algos=grpo",
        "--tasks=default,shortcut",
        "--ablations=fixed_head,loss=infonce",  # loss=infonce is the default CLIPO run: not run twice
        "--steps=2",
        "--eval_every=1",
        "--shortcut_args=leak=last,copy=0.5",
        "--jobs=2",  # the first run of each (task, seed) trains the shared SFT start, alone
    ]
    r = study(root, *args, env=env, timeout=1200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.count("running ") == 12  # 2 tasks x 2 seeds x 3 methods
    with open(root / "summary.json") as f:
        summary = json.load(f)

    methods = ["grpo", "grpo+clipo", "grpo+clipo[fixed_head]"]
    starts = {}  # task -> the SFT start digests of its seeds
    assert summary["study"]["methods"] == methods
    assert summary["study"]["ablation_aliases"] == {"grpo+clipo[loss=infonce]": "grpo+clipo"}
    assert all(run["finished"] for run in summary["runs"].values()) and len(summary["runs"]) == 12
    assert summary["environment"]["versions"]["jax"] and summary["environment"]["devices"] == "cpu: 1 x cpu"
    shifted = ["big_numbers", "extra_step_1", "extra_step_2", "distractor"]
    expected_sets = {"default": ["in_dist", *shifted], "shortcut": ["in_dist", *shifted, "leak", "leak_decoy"]}
    for task, sets in expected_sets.items():
        t = summary["tasks"][task]
        assert t["sets"] == sets
        assert t["keys"] == ["outcome", "process", "lucky"] + (
            ["copied", "copied_unworked"] if task == "shortcut" else []
        )
        assert list(t["methods"]) == ["SFT (start)", *methods]
        for cells in t["methods"].values():  # per-seed values behind every mean
            for s in sets:
                for k in t["keys"]:
                    c = cells[f"{s}/{k}"]
                    assert c["seeds"] == ["0", "1"] and len(c["values"]) == 2
                    assert np.isclose(c["mean"], np.mean(c["values"])) and np.isclose(c["std"], np.std(c["values"]))
        assert list(t["paired_differences"]) == ["grpo+clipo - grpo", "grpo+clipo[fixed_head] - grpo"]
        for d in t["paired_differences"].values():
            assert d["seeds"] == ["0", "1"]
            for s in sets:
                for k in t["keys"]:
                    cell = d[f"{s}/{k}"]
                    variant = t["methods"][d["variant"]][f"{s}/{k}"]["values"]
                    base = t["methods"][d["base"]][f"{s}/{k}"]["values"]
                    assert np.allclose(cell["values"], np.subtract(variant, base))
                    assert cell["ci95"] == list(bootstrap_ci(cell["values"], n_boot=10000))
                    assert cell["ci95"][0] <= cell["mean"] <= cell["ci95"][1]
        assert list(t["curves"]) == methods
        for c in t["curves"].values():  # step 0 (SFT), the eval at step 1, the final one at step 2
            assert c["steps"] == [0, 1, 2] and c["seeds"] == ["0", "1"]
            for s in sets:
                assert len(c[f"{s}/lucky"]["mean"]) == 3 and np.array(c[f"{s}/lucky"]["values"]).shape == (2, 3)
                assert len(c[f"{s}/outcome"]["mean"]) == 3
        assert list(t["cost_per_step"]) == methods
        assert set(t["reward_gap"]) <= {"grpo+clipo", "grpo+clipo[fixed_head]"}  # CLIPO runs with lucky successes
        for g in t["reward_gap"].values():
            assert len(g["values"]) == len(g["seeds"]) == len(g["steps"]) and min(g["steps"]) >= 1
        assert t["cost_per_step"]["grpo+clipo"]["clipo_share"] > 0
        assert t["other_starts"] == {} and t["unpaired"] == {}  # one start per seed: every seed is paired
        for seed in ("0", "1"):  # every method of a (task, seed) started from one SFT checkpoint
            assert len(os.listdir(root / task / f"sft_cache_seed{seed}")) == 1
            before = [
                (root / task / f"{m}_seed{seed}" / "eval_before.json").read_text() for m in ("grpo", "grpo+clipo")
            ]
            before.append((root / task / f"grpo+clipo_fixed_head_seed{seed}" / "eval_before.json").read_text())
            assert before[0] == before[1] == before[2]
            digests = {
                json.loads((root / task / f"{m}_seed{seed}" / "start.json").read_text())["params_digest"]
                for m in ("grpo", "grpo+clipo", "grpo+clipo_fixed_head")
            }
            assert len(digests) == 1
            starts.setdefault(task, set()).update(digests)
            logs = [
                (root / task / f"{m}_seed{seed}.log").read_text()
                for m in ("grpo", "grpo+clipo", "grpo+clipo_fixed_head")
            ]
            assert [("SFT: reusing" in log) for log in logs] == [False, True, True]
    assert all(len(digests) == 2 for digests in starts.values())  # the seeds' SFT starts differ
    # the training rollouts are graded too; the CLIPO reward's successes are exactly the grader's
    for task in ("default", "shortcut"):
        rows = [json.loads(x) for x in open(root / task / "grpo+clipo_seed0" / "metrics.jsonl")]
        rows = [r for r in rows if "clipo/count/correct" in r]  # the RL steps' rows (not the evaluations')
        assert len(rows) == 2
        for r in rows:
            assert 0 <= r["rollout/lucky"] <= r["rollout/outcome"] <= 1 and r["time/grade_rollouts"] >= 0
            assert r["clipo/count/process_right"] + r["clipo/count/lucky"] == r["clipo/count/correct"]
            rollouts = r["clipo/count/correct"] + r["clipo/count/incorrect"]
            assert r["rollout/outcome"] == pytest.approx(r["clipo/count/correct"] / rollouts)
        assert ("clipo/count/copied" in rows[0]) == (task == "shortcut")
    for run, entry in summary["runs"].items():  # the recorded commands are the ones that ran
        assert f"--workdir={root / run}" in entry["command"]
    assert "--config.clipo.fixed_head=True" in summary["runs"]["shortcut/grpo+clipo_fixed_head_seed1"]["command"]
    assert "shortcut=0.5,leak=last,copy=0.5" in summary["runs"]["shortcut/grpo_seed0"]["command"]
    # the same root with another shortcut setup: refused, nothing reused or mixed into the summary
    r = study(root, *[a for a in args if not a.startswith("--shortcut_args")], "--summarize_only", env=env)
    assert r.returncode != 0 and "were started with another command" in r.stderr, r.stderr[-2000:]
    assert str(root / "shortcut") in r.stderr
    md = (root / "summary.md").read_text()
    assert "grpo+clipo[fixed_head] - grpo" in md and "learning curves" in md
    try:
        import matplotlib  # noqa: F401

        assert (root / "curves_default.png").stat().st_size > 0 and (root / "curves_shortcut.png").exists()
    except ImportError:
        pass

    first = (root / "summary.json").read_text()
    r = study(root, *args, "--summarize_only", env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (root / "summary.json").read_text() == first
    r = study(root, *args, env=env, timeout=120)  # every run finished: nothing runs again
    assert r.returncode == 0 and "running " not in r.stdout, r.stderr[-3000:]
    assert (root / "summary.json").read_text() == first


def test_runs_started_with_another_command_are_refused(tmp_path):
    # a run dir left by a study with another shortcut setup: same path, other command
    run = tmp_path / "shortcut" / "grpo_seed0"
    run.mkdir(parents=True)
    (run / "study_command.txt").write_text("python -m experiments.train --config=configs/demo.py:shortcut=0.5\n")
    args = ["--tasks=shortcut", "--algos=grpo", "--seeds=0", "--ablations=", "--shortcut_args=leak=last"]
    r = study(tmp_path, *args, "--summarize_only")
    assert r.returncode != 0 and "1 run(s) under" in r.stderr and str(run) in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "summary.json").exists()
    # the command the study would use is accepted (it gets past the check to "no finished runs")
    cmd = "python -m experiments.train --config=configs/demo.py:size=small,algo=grpo,seed=0,shortcut=0.5,leak=last"
    cmd += f" --workdir={run} --config.sft.cache_dir={tmp_path / 'shortcut' / 'sft_cache_seed0'}"
    cmd += " --config.progress_bar=False --config.eval.every=10"
    (run / "study_command.txt").write_text(cmd + "\n")
    r = study(tmp_path, *args, "--summarize_only")
    assert "another command" not in r.stderr and "no finished runs" in r.stderr, r.stderr[-2000:]


def _processes_naming(text: str) -> list[int]:
    """pids of live processes whose command line contains text (Linux /proc)."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{pid}/stat") as f:
                zombie = f.read().rsplit(")", 1)[1].split()[0] == "Z"
        except OSError:
            continue
        if text in cmdline and not zombie:
            pids.append(int(pid))
    return pids


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads /proc")
@pytest.mark.parametrize("jobs", [1, 2])
def test_sigterm_stops_the_runs_in_flight(tmp_path, jobs):
    # `kill PID` of the study reaches the study alone: it must stop its runs, or an orphan would
    # keep writing a run dir that the next invocation resumes
    import signal
    import time

    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    root = tmp_path / "study"
    cmd = [sys.executable, "-m", "experiments.clipo_effect", f"--root={root}", "--size=tiny", "--tasks=default"]
    cmd += ["--algos=grpo", "--seeds=0,1", "--ablations=", f"--jobs={jobs}"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not _processes_naming(f"--workdir={root}") and time.monotonic() < deadline:
            time.sleep(0.2)
        runs = _processes_naming(f"--workdir={root}")
        assert runs, "no run started"
        time.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0 and "stopped by signal" in err, err[-2000:]
    assert out.count("running ") == jobs, out  # nothing new started after the signal
    deadline = time.monotonic() + 30
    while _processes_naming(f"--workdir={root}") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _processes_naming(f"--workdir={root}")
    assert not (root / "summary.json").exists()


def test_step_costs_leave_out_the_first_step_of_every_process(tmp_path):
    """A resumed run compiles again on its first step after the resume: that step is not a cost
    of the method. Runs that predate the flag lose only their first step, as before."""
    from experiments.clipo_effect import step_costs

    def write(workdir, rows):
        os.makedirs(workdir)
        with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)

    def row(step, seconds, first):
        return {
            "step": step,
            "time/step": seconds,
            "time/contrastive": seconds / 10,
            "time/first_step_in_process": first,
        }

    # steps 1-3 in the first process, 4-6 after a resume (step 4 compiled again)
    resumed = [row(1, 30.0, 1.0), row(2, 1.0, 0.0), row(3, 1.0, 0.0), row(4, 25.0, 1.0), row(5, 2.0, 0.0)]
    resumed += [{"step": 5, "eval/in_dist/outcome": 0.5}, row(6, 2.0, 0.0)]
    write(str(tmp_path / "a"), resumed)
    got = step_costs([str(tmp_path / "a")])
    assert got["steps"] == 4 and got["step_s"] == pytest.approx(1.5) and got["clipo_s"] == pytest.approx(0.15)
    write(str(tmp_path / "old"), [{"step": s, "time/step": t} for s, t in ((1, 30.0), (2, 1.0), (3, 3.0))])
    got = step_costs([str(tmp_path / "old")])
    assert got["steps"] == 2 and got["step_s"] == pytest.approx(2.0)


def test_a_key_that_only_newer_runs_grade_is_left_out_not_a_crash(tmp_path):
    """Runs made before a grade key existed (copied_unworked) lack it: the summary keeps the keys
    every run has instead of failing on the first run without it."""
    sets = ("in_dist",)
    for method, value in (("grpo", 0.6), ("grpo+clipo", 0.7)):
        run = tmp_path / "default" / f"{method}_seed0"
        fake_run(run, {s: 0.5 for s in sets}, {s: value for s in sets})
    for method in ("grpo", "grpo+clipo"):  # the RL runs grade it, their SFT start's evaluation did not
        newer = tmp_path / "default" / f"{method}_seed0" / "eval_after.json"
        ev = json.loads(newer.read_text())
        ev["in_dist"]["copied_unworked"] = 0.1
        newer.write_text(json.dumps(ev))
    r = study(tmp_path, "--tasks=default", "--algos=grpo", "--seeds=0", "--ablations=", "--summarize_only")
    assert r.returncode == 0, r.stderr[-3000:]
    t = json.loads((tmp_path / "summary.json").read_text())["tasks"]["default"]
    assert t["keys"] == ["outcome", "process", "lucky"]
    assert t["paired_differences"]["grpo+clipo - grpo"]["in_dist/outcome"]["values"] == pytest.approx([10.0])
