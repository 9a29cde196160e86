r"""CLIPO's effect on the embedded task: each base algorithm against itself + CLIPO and CLIPO's
ablations, on the plain task and its shortcut variant, over seeds, from the same SFT start per seed.

  python -m experiments.clipo_effect --root=RUNS
  python -m experiments.clipo_effect --root=RUNS --tasks=default --algos=grpo --seeds=0,1,2 --ablations=
  python -m experiments.clipo_effect --root=RUNS --summarize_only

The defaults are the whole study: tasks `default` and `shortcut` (configs/demo.py:shortcut=F,ARGS
with F = --shortcut_share, 0.5, and ARGS = --shortcut_args, leak=last,copy_style=bare: the leak
clause before the question and SFT copies that are the answer line alone, the setting in which
GRPO and DAPO learn to copy, in 2 of 5 seeds on one GPU: docs/results.md), algos grpo and dapo,
seeds 0-4, every ablation (a CLIPO variant of each algo: `fixed_head`, `loss=` each of the
paper's four losses infonce / supcon_in / supcon_out / soft_nn, `lam=` 0.05 / 0.2 / 0.5; an
ablation equal to the default CLIPO settings, loss=infonce and lam=0.2, is the `+clipo` run
itself), size small with its RL budget (--steps=0) and an evaluation every --eval_every RL steps
for the learning curves.

Every run is `python -m experiments.train --config=configs/demo.py:size=Z,algo=A,seed=S[,clipo]
[,shortcut=F,ARGS] --workdir=ROOT/TASK/METHOD_seedS` plus the ablation's `--config.clipo.*` overrides and
--extra. The runs of one (task, seed) share ROOT/TASK/sft_cache_seedS (config.sft.cache_dir), so
every method of that seed starts from the same SFT checkpoint. The plain/+CLIPO pairs run first,
the ablations after them. Finished runs (eval_after.json) are skipped; an interrupted one resumes
from its checkpoints; a failed one is retried by the next invocation. A SIGTERM or SIGINT of the
study terminates its runs in flight too. Set JAX_COMPILATION_CACHE_DIR to let runs of equal shapes
reuse compiled programs.

Writes ROOT/summary.md, ROOT/summary.json and, with matplotlib installed, ROOT/curves_TASK.png.
Per task, in % of the test set (greedy): outcome, process and lucky rate (and `copied` on the
shortcut task) on every test set after RL, mean ± std over seeds, with the SFT start; for every
CLIPO method the paired difference to its base algo (same seed), its mean and a percentile
bootstrap 95% CI over seeds; learning curves (each rate at every evaluated RL step, mean over
seeds); for every CLIPO method the contrastive reward of its lucky successes minus that of its
process-right ones during training (per seed, the mean over steps with both; < 0 where CLIPO
singles out right answers reached the wrong way, its claim); each method's cost per RL step with
the CLIPO stage's share. summary.json also holds the per-seed values, the commands, the machine
and library versions.
"""

import dataclasses
import json
import os
import shlex
import signal
import subprocess
import sys
import threading

import numpy as np
from absl import app, flags

PAPER_LOSSES = ("infonce", "supcon_in", "supcon_out", "soft_nn")
PAPER_LAMS = (0.05, 0.2, 0.5)
ALL_ABLATIONS = ["fixed_head", *(f"loss={x}" for x in PAPER_LOSSES), *(f"lam={x}" for x in PAPER_LAMS)]
TASKS = ("default", "shortcut")
# copied, copied_unworked: graded on the shortcut task only (copied_unworked by newer runs)
KEYS = ("outcome", "process", "lucky", "copied", "copied_unworked")
CI_LEVEL = 0.95
BOOTSTRAP_SEED = 0

FLAGS = flags.FLAGS
flags.DEFINE_string("root", "runs/clipo_effect", "directory for all runs")
flags.DEFINE_list("tasks", list(TASKS), "tasks: default (the plain demo task), shortcut (the answer-leak variant)")
flags.DEFINE_float("shortcut_share", 0.5, "leak share of the shortcut task (configs/demo.py:shortcut=F)")
flags.DEFINE_string(
    "shortcut_args",
    "leak=last,copy_style=bare",
    "more configs/demo.py args of the shortcut task (default: the setting in which GRPO has learned to copy)",
)
flags.DEFINE_list("algos", ["grpo", "dapo"], "base algorithms")
flags.DEFINE_list("seeds", ["0", "1", "2", "3", "4"], "seeds")
flags.DEFINE_list("ablations", ALL_ABLATIONS, "CLIPO variants run for every algo: fixed_head, loss=NAME, lam=X")
flags.DEFINE_enum("size", "small", ["tiny", "small"], "configs/demo.py size")
flags.DEFINE_integer("steps", 0, "RL steps of every run (0 = the config's: 60 small, 4 tiny)")
flags.DEFINE_integer("eval_every", 10, "evaluate every N RL steps for the learning curves (0 = before/after only)")
flags.DEFINE_list("extra", [], "extra --config.* overrides passed to every run")
flags.DEFINE_integer("n_boot", 10000, "bootstrap resamples per confidence interval")
flags.DEFINE_bool("summarize_only", False, "only aggregate finished runs")
flags.DEFINE_integer(
    "jobs",
    1,
    "runs at a time (each a process; on one GPU also set XLA_PYTHON_CLIENT_MEM_FRACTION to about 0.9/jobs)",
    lower_bound=1,
)


# ---------------------------------------------------------------------------------------------
# The bootstrap (a pure function: tests check it against an exact enumeration)
# ---------------------------------------------------------------------------------------------
def bootstrap_ci(values, n_boot: int = 10000, seed: int = BOOTSTRAP_SEED, level: float = CI_LEVEL):
    """Percentile bootstrap CI of the mean of `values` (e.g. per-seed paired differences):
    resample the values with replacement n_boot times and return the (1-level)/2 and (1+level)/2
    quantiles of the resampled means as (lo, hi). None with fewer than 2 values (nothing to resample)."""
    x = np.asarray(values, dtype=np.float64)
    if x.size < 2:
        return None
    idx = np.random.default_rng(seed).integers(0, x.size, size=(n_boot, x.size))
    means = x[idx].mean(axis=1)
    lo, hi = np.percentile(means, [50 * (1 - level), 50 * (1 + level)])
    # a bound that is 0 in exact arithmetic comes out as +-1e-15 or so when the values are not
    # exact in binary (e.g. 100 * (0.41 - 0.395) = 1.4999999999999958): whether the interval
    # excludes 0 must not hinge on that round-off, so bounds within it of 0 are 0
    tol = 1e-9 * float(np.max(np.abs(x)))
    return tuple(0.0 if abs(b) <= tol else float(b) for b in (lo, hi))


# ---------------------------------------------------------------------------------------------
# Methods and runs
# ---------------------------------------------------------------------------------------------
def ablation_overrides(ablation: str) -> dict:
    """`fixed_head` / `loss=NAME` / `lam=X` -> the config.clipo values it sets."""
    from clipo_jax import contrastive

    if ablation == "fixed_head":
        return {"fixed_head": True}
    key, sep, value = ablation.partition("=")
    if sep and key == "loss":
        if value not in contrastive.LOSSES:
            raise ValueError(f"--ablations: loss={value!r} is not one of {sorted(contrastive.LOSSES)}")
        return {"loss_type": value}
    if sep and key == "lam":
        try:
            return {"lam": float(value)}
        except ValueError:
            raise ValueError(f"--ablations: lam={value!r} is not a number") from None
    raise ValueError(f"--ablations: unknown ablation {ablation!r}; valid: fixed_head, loss=NAME, lam=X")


@dataclasses.dataclass(frozen=True)
class Method:
    algo: str
    clipo: bool
    ablation: str = ""  # "" = the default CLIPO settings (configs/common.py clipo_block)

    @property
    def name(self) -> str:
        if not self.clipo:
            return self.algo
        return f"{self.algo}+clipo" + (f"[{self.ablation}]" if self.ablation else "")

    @property
    def slug(self) -> str:  # the name as a directory name
        return self.name.replace("[", "_").replace("]", "").replace("=", "-")

    @property
    def overrides(self) -> dict:
        return ablation_overrides(self.ablation) if self.ablation else {}


def canonical_ablation(ablation: str) -> str:
    """One spelling per ablation (lam=0.050 -> lam=0.05), validated."""
    over = ablation_overrides(ablation.strip())
    if "lam" in over:
        return f"lam={over['lam']:g}"
    return ablation.strip()


def study_methods() -> tuple[list[Method], dict[str, str]]:
    """Every algo's methods (plain, +CLIPO, then each ablation), and the ablations that equal the
    default CLIPO settings (their name -> the +clipo method's name; run once)."""
    from configs import common

    defaults = common.clipo_block(True)
    methods, aliases = [], {}
    for algo in FLAGS.algos:
        methods += [Method(algo, False), Method(algo, True)]
        for ablation in dict.fromkeys(canonical_ablation(a) for a in FLAGS.ablations):
            m = Method(algo, True, ablation)
            if all(defaults[k] == v for k, v in m.overrides.items()):
                aliases[m.name] = Method(algo, True).name
            else:
                methods.append(m)
    return methods, aliases


def task_arg(task: str) -> str:
    if task != "shortcut":
        return ""
    return f",shortcut={FLAGS.shortcut_share:g}" + (f",{FLAGS.shortcut_args}" if FLAGS.shortcut_args else "")


def run_dir(task: str, method: Method, seed) -> str:
    return os.path.join(FLAGS.root, task, f"{method.slug}_seed{seed}")


def sft_dir(task: str, seed) -> str:
    return os.path.join(FLAGS.root, task, f"sft_cache_seed{seed}")


def run_command(task: str, method: Method, seed) -> list[str]:
    """The run's `python -m experiments.train ...` arguments (after the interpreter)."""
    arg = f"size={FLAGS.size},algo={method.algo},seed={seed}"
    arg += f",steps={FLAGS.steps}" if FLAGS.steps else ""
    arg += ",clipo" if method.clipo else ""
    arg += task_arg(task)
    cmd = [
        "-m",
        "experiments.train",
        f"--config=configs/demo.py:{arg}",
        f"--workdir={run_dir(task, method, seed)}",
        f"--config.sft.cache_dir={sft_dir(task, seed)}",
        "--config.progress_bar=False",
        f"--config.eval.every={FLAGS.eval_every}",
        *[f"--config.{x}" for x in FLAGS.extra],
    ]
    # after --extra, so an extra clipo.* override cannot undo the ablation
    return cmd + [f"--config.clipo.{k}={v}" for k, v in method.overrides.items()]


def recorded_command(task: str, method: Method, seed) -> str:
    """The run's command as recorded (in its dir and in summary.json): `python -m experiments.train ...`."""
    return shlex.join(["python", *run_command(task, method, seed)])


def study_command() -> str:
    """The command that runs this study (what --summarize_only would aggregate)."""
    args = [
        f"--root={FLAGS.root}",
        f"--tasks={','.join(FLAGS.tasks)}",
        f"--shortcut_share={FLAGS.shortcut_share:g}",
        f"--shortcut_args={FLAGS.shortcut_args}",
        f"--algos={','.join(FLAGS.algos)}",
        f"--seeds={','.join(FLAGS.seeds)}",
        f"--ablations={','.join(FLAGS.ablations)}",
        f"--size={FLAGS.size}",
        f"--steps={FLAGS.steps}",
        f"--eval_every={FLAGS.eval_every}",
        f"--n_boot={FLAGS.n_boot}",
    ]
    if FLAGS.extra:
        args.append(f"--extra={','.join(FLAGS.extra)}")
    return shlex.join(["python", "-m", "experiments.clipo_effect", *args])


def finished(workdir: str) -> bool:
    return os.path.exists(os.path.join(workdir, "eval_after.json"))


COMMAND_FILE = "study_command.txt"  # in each run dir: the `python -m experiments.train ...` it was started with


def stale_runs(methods: list[Method]) -> list[str]:
    """Run dirs under --root that were started with another command than this study's (another
    --shortcut_args, --extra, --steps...): resuming or summarizing them would mix two setups."""
    stale = []
    for task in FLAGS.tasks:
        for m in methods:
            for seed in FLAGS.seeds:
                path = os.path.join(run_dir(task, m, seed), COMMAND_FILE)
                if os.path.exists(path):
                    with open(path) as f:
                        if f.read().strip() != recorded_command(task, m, seed):
                            stale.append(os.path.dirname(path))
    return stale


def pending_runs(methods: list[Method]) -> list[tuple[str, Method, str]]:
    """(task, method, seed) of every unfinished run, the plain/+CLIPO pairs before the ablations."""
    runs = []
    for phase in ("pairs", "ablations"):
        for task in FLAGS.tasks:
            for algo in FLAGS.algos:
                for seed in FLAGS.seeds:
                    for m in methods:
                        if m.algo != algo or bool(m.ablation) != (phase == "ablations"):
                            continue
                        if not finished(run_dir(task, m, seed)):
                            runs.append((task, m, seed))
    return runs


# Runs in flight, so that a SIGTERM / SIGINT of the study stops them too: `kill PID` reaches only
# this process, and an orphaned run would keep writing its run dir while the next invocation
# resumes the same run in it.
_children: set[subprocess.Popen] = set()
_children_lock = threading.RLock()  # re-entrant: the handler may run while the main thread holds it
_stopping = threading.Event()


def _stop(signum, frame):
    _stopping.set()
    with _children_lock:
        for proc in _children:
            proc.terminate()
    raise SystemExit(f"stopped by signal {signum}: runs in flight were terminated; run the same command to resume")


def execute(run: tuple[str, Method, str]) -> str | None:
    """One run as a subprocess, its output appended to RUN_DIR.log; the run dir if it failed."""
    if _stopping.is_set():
        return None
    task, m, seed = run
    workdir = run_dir(task, m, seed)
    cmd = [sys.executable, *run_command(task, m, seed)]
    # one write per line: with --jobs > 1 the threads' lines must not interleave
    print(f"running {shlex.join(cmd)}\n", end="", flush=True)
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, COMMAND_FILE), "w") as f:
        f.write(recorded_command(task, m, seed) + "\n")
    with open(workdir + ".log", "a") as log:  # appends: a resumed run keeps its history
        with _children_lock:
            if _stopping.is_set():
                return None
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
            _children.add(proc)
        rc = proc.wait()
        with _children_lock:
            _children.discard(proc)
    if _stopping.is_set():
        return None
    if rc:
        print(f"run {workdir} failed with exit {rc}; see {workdir}.log\n", end="", flush=True)
        return workdir
    return None


def warn_missing_sft(methods: list[Method]) -> None:
    """One line per (task, seed) whose new runs will retrain the SFT start that its finished runs
    used (its cache is gone, e.g. not copied along with the run dirs): on a GPU the retrained start
    is not bitwise the same, and the summary then leaves those pairs out."""
    pending = {(task, seed) for task, _, seed in pending_runs(methods)}
    for task, seed in sorted(pending):
        done = [m for m in methods if finished(run_dir(task, m, seed))]
        cache = sft_dir(task, seed)
        if done and not (os.path.isdir(cache) and os.listdir(cache)):
            print(
                f"warning: {cache} is missing but {len(done)} run(s) of task {task} seed {seed} "
                "finished from it: the new runs retrain the SFT start, and are paired with those runs only "
                "if it comes out bitwise the same (see start.json)\n",
                end="",
                flush=True,
            )


def run_all(methods: list[Method]) -> list[str]:
    """Runs every unfinished run; returns the failed run dirs. With --jobs=1 one after another;
    with more, the first run of each (task, seed) goes first (it trains the shared SFT start),
    then the others of that seed, --jobs at a time."""
    runs = pending_runs(methods)
    if FLAGS.jobs <= 1:
        return [w for w in map(execute, runs) if w]
    from concurrent.futures import ThreadPoolExecutor

    leaders = {}
    for run in runs:
        leaders.setdefault((run[0], run[2]), run)
    with ThreadPoolExecutor(max_workers=FLAGS.jobs) as pool:
        failed = [w for w in pool.map(execute, leaders.values()) if w]
        # a seed whose first run failed has no SFT start: its other runs wait for the next call
        bad = {(task, seed) for task, m, seed in leaders.values() if run_dir(task, m, seed) in failed}
        rest = [r for r in runs if r not in leaders.values() and (r[0], r[2]) not in bad]
        failed += [w for w in pool.map(execute, rest) if w]
    return failed


# ---------------------------------------------------------------------------------------------
# Reading runs
# ---------------------------------------------------------------------------------------------
def read_json(path: str):
    with open(path) as f:
        return json.load(f)


def read_metrics(workdir: str) -> list[dict]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


START_FILE = "start.json"  # written by the trainer: a digest of the parameters RL starts from


def run_start(workdir: str) -> tuple[str | None, str]:
    """(params digest or None for runs that predate start.json, the pre-RL evaluation as text)."""
    path = os.path.join(workdir, START_FILE)
    digest = read_json(path)["params_digest"] if os.path.exists(path) else None
    return digest, json.dumps(read_json(os.path.join(workdir, "eval_before.json")), sort_keys=True)


def same_start(a: tuple[str | None, str], b: tuple[str | None, str]) -> bool:
    """Bitwise the same start where both runs record a digest, else the same pre-RL evaluation (a
    run that lost its SFT cache and retrained it on a GPU differs in both)."""
    return a[0] == b[0] if a[0] and b[0] else a[1] == b[1]


def run_curve(workdir: str) -> dict[int, dict]:
    """RL step -> {test set: {key: rate}} of a finished run: eval_before.json at step 0, the
    trainer's periodic evaluations (the `eval/<set>/<key>` rows of metrics.jsonl, every
    config.eval.every steps) and eval_after.json at the last step."""
    points = {0: read_json(os.path.join(workdir, "eval_before.json"))}
    for row in read_metrics(workdir):
        ev = {}
        for k, v in row.items():
            if k.startswith("eval/"):
                _, s, key = k.split("/", 2)
                ev.setdefault(s, {})[key] = v
        if ev:
            points[int(row["step"])] = ev
    last = read_json(os.path.join(workdir, "config.json"))["rl"]["steps"]
    points[int(last)] = read_json(os.path.join(workdir, "eval_after.json"))
    return dict(sorted(points.items()))


def step_costs(workdirs: list[str]) -> dict | None:
    """The median step time and CLIPO stage time (head step, loss, reward, metrics) over the steps
    that compile nothing, from the runs' metrics.jsonl: the first step of every process that ran
    (``time/first_step_in_process``; a resumed run has one per resume) is left out, and for runs
    that predate that key, the run's first step."""
    steps, stage = [], []
    for workdir in workdirs:
        rows = [r for r in read_metrics(workdir) if "time/step" in r]  # eval rows carry no timings
        if rows and "time/first_step_in_process" not in rows[0]:
            rows = rows[1:]
        rows = [r for r in rows if not r.get("time/first_step_in_process")]
        steps += [r["time/step"] for r in rows]
        stage += [r.get("time/contrastive", 0.0) for r in rows]
    if not steps:
        return None
    step_s, clipo_s = float(np.median(steps)), float(np.median(stage))
    return {"step_s": step_s, "clipo_s": clipo_s, "clipo_share": clipo_s / step_s, "steps": len(steps)}


def run_reward_gap(workdir: str) -> dict | None:
    """CLIPO's contrastive reward of the lucky successes minus that of the process-right ones, mean
    over the RL steps that had both (the trainer's clipo/reward/{lucky,process_right}/mean, logged
    with config.eval.grade_rollouts); None for a run without those metrics or such a step."""
    gaps = [
        r["clipo/reward/lucky/mean"] - r["clipo/reward/process_right/mean"]
        for r in read_metrics(workdir)
        if r.get("clipo/count/lucky", 0) > 0 and r.get("clipo/count/process_right", 0) > 0
    ]
    return {"gap": float(np.mean(gaps)), "steps": len(gaps)} if gaps else None


def stats(values: list[float], seeds: list) -> dict:
    v = np.asarray(values, dtype=np.float64)
    return {"mean": float(v.mean()), "std": float(v.std()), "values": v.tolist(), "seeds": list(seeds)}


# ---------------------------------------------------------------------------------------------
# Per-task summary
# ---------------------------------------------------------------------------------------------
def summarize_task(task: str, methods: list[Method]) -> dict | None:
    """{"sets", "keys", "methods", "paired_differences", "curves", "cost_per_step"} of one task
    (rates in %), or None before any run of it has finished."""
    evals = {}  # method name -> {seed: eval_after}
    # every method of a seed should start from one SFT checkpoint; a run whose start differs from
    # the seed's first (e.g. its SFT was retrained on a GPU after the cache was lost) gets start 2, ...
    # A run joins a start only if it has the same start as every run already there: same_start is
    # not transitive (a run without start.json matches runs of two different digests by their
    # pre-RL evaluation), so comparing with the start's first run alone could put two runs of
    # different digests in one start.
    starts = {}  # seed -> [[fingerprint of each run of that start], ...] in the order first seen
    start_of = {}  # method name -> {seed: start index}
    fingerprint = {}  # method name -> {seed: (digest, eval_before)}
    for m in methods:
        for seed in FLAGS.seeds:
            workdir = run_dir(task, m, seed)
            if finished(workdir):
                evals.setdefault(m.name, {})[seed] = read_json(os.path.join(workdir, "eval_after.json"))
                fp, known = run_start(workdir), starts.setdefault(seed, [])
                fingerprint.setdefault(m.name, {})[seed] = fp
                index = next((i for i, runs in enumerate(known) if all(same_start(f, fp) for f in runs)), len(known))
                if index == len(known):
                    known.append([])
                known[index].append(fp)
                start_of.setdefault(m.name, {})[seed] = index
    if not evals:
        return None
    first = next(iter(next(iter(evals.values())).values()))
    sets = list(first)
    # the keys every run graded (a run made before a key existed does not have it)
    every = [ev[sets[0]] for by_seed in evals.values() for ev in by_seed.values()]
    every += [json.loads(fp[1])[sets[0]] for known in starts.values() for runs in known for fp in runs]
    keys = [k for k in KEYS if all(k in ev for ev in every)]
    sft_rows = {}  # one row per start: the pre-RL evaluation of the seeds that have it
    for i in range(max(len(known) for known in starts.values())):
        label = "SFT (start)" if i == 0 else f"SFT (start {i + 1})"
        sft_rows[label] = {  # the pre-RL evaluation of the start's first run
            seed: json.loads(starts[seed][i][0][1]) for seed in FLAGS.seeds if i < len(starts.get(seed, []))
        }
    table = {**sft_rows, **evals}

    out = {
        "sets": sets,
        "keys": keys,
        "methods": {},
        "paired_differences": {},
        "curves": {},
        "reward_gap": {},
        "cost_per_step": {},
        # method -> {seed: 1-based start} for runs not from their seed's first start; their paired
        # differences use only the seeds that share the base's start
        "other_starts": {
            name: {seed: i + 1 for seed, i in by_seed.items() if i}
            for name, by_seed in start_of.items()
            if any(by_seed.values())
        },
        "unpaired": {},  # comparison -> seeds left out: variant and base from different starts
    }
    for name, by_seed in table.items():
        seeds = list(by_seed)
        out["methods"][name] = {
            f"{s}/{k}": stats([100 * by_seed[seed][s][k] for seed in seeds], seeds) for k in keys for s in sets
        }

    for m in methods:  # each CLIPO method against its base algo, seed by seed
        base = Method(m.algo, False).name
        if not m.clipo or m.name not in evals or base not in evals:
            continue
        both = [seed for seed in evals[m.name] if seed in evals[base]]
        # the two runs themselves must share a start (same digest, or without one the same pre-RL evaluation)
        seeds = [seed for seed in both if same_start(fingerprint[m.name][seed], fingerprint[base][seed])]
        if len(seeds) < len(both):
            out["unpaired"][f"{m.name} - {base}"] = [seed for seed in both if seed not in seeds]
        if not seeds:
            continue
        diff = {"variant": m.name, "base": base, "seeds": seeds}
        for k in keys:
            for s in sets:
                d = [100 * (evals[m.name][seed][s][k] - evals[base][seed][s][k]) for seed in seeds]
                ci = bootstrap_ci(d, n_boot=FLAGS.n_boot)
                diff[f"{s}/{k}"] = {"mean": float(np.mean(d)), "values": d, "ci95": list(ci) if ci else None}
        out["paired_differences"][f"{m.name} - {base}"] = diff

    for m in methods:  # learning curves: every evaluated step, mean over the seeds
        curves = {seed: run_curve(run_dir(task, m, seed)) for seed in evals.get(m.name, {})}
        if not curves:
            continue
        steps = sorted(set.intersection(*(set(c) for c in curves.values())))  # steps every seed has
        entry = {"steps": steps, "seeds": list(curves)}
        for k in keys:
            for s in sets:
                values = [[100 * curves[seed][t][s][k] for t in steps] for seed in curves]
                entry[f"{s}/{k}"] = {"mean": np.mean(values, axis=0).tolist(), "values": values}
        out["curves"][m.name] = entry

    for m in methods:  # does CLIPO's reward single out the lucky successes? (< 0: it does)
        if not m.clipo:
            continue
        gaps = {seed: run_reward_gap(run_dir(task, m, seed)) for seed in evals.get(m.name, {})}
        gaps = {seed: g for seed, g in gaps.items() if g}
        if gaps:
            values = [g["gap"] for g in gaps.values()]
            ci = bootstrap_ci(values, n_boot=FLAGS.n_boot)
            out["reward_gap"][m.name] = {
                "mean": float(np.mean(values)),
                "values": values,
                "seeds": list(gaps),
                "steps": [g["steps"] for g in gaps.values()],
                "ci95": list(ci) if ci else None,
            }

    for m in methods:
        cost = step_costs([run_dir(task, m, seed) for seed in FLAGS.seeds if finished(run_dir(task, m, seed))])
        if cost:
            out["cost_per_step"][m.name] = {**cost, "clipo": m.clipo}
    return out


def fmt_ci(d: dict, digits: int = 1) -> str:
    if d["ci95"] is None:
        return f"{d['mean']:+.{digits}f}"
    lo, hi = d["ci95"]
    return f"{d['mean']:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}]"


def task_markdown(task: str, t: dict, aliases: dict) -> list[str]:
    sets, keys = t["sets"], t["keys"]
    lines = ["", f"## task `{task}`" + (f" (configs/demo.py:{task_arg(task)[1:]})" if task_arg(task) else "")]
    for k in keys:  # one table per metric: methods x test sets, mean ± std over seeds
        lines += [
            "",
            f"**{k}** (% of problems, greedy, mean ± std over seeds)",
            "",
            "| method | seeds | " + " | ".join(sets) + " |",
            "|---|---|" + "---|" * len(sets),
        ]
        for name, cells in t["methods"].items():
            row = [f"{cells[f'{s}/{k}']['mean']:.1f} ± {cells[f'{s}/{k}']['std']:.1f}" for s in sets]
            lines.append(f"| {name} | {len(cells[f'{sets[0]}/{k}']['values'])} | " + " | ".join(row) + " |")
    other = t.get("other_starts", {})
    per_seed = "leak" if "leak" in sets else sets[0]  # leak: where the shortcut pays, copying or not
    seeds = list(FLAGS.seeds)
    lines += [
        "",
        f"**lucky on `{per_seed}`, per seed** (%; (sN): a run from the seed's start N, see below)",
        "",
        "| method | " + " | ".join(f"seed {seed}" for seed in seeds) + " |",
        "|---|" + "---|" * len(seeds),
    ]
    for name, cells in t["methods"].items():
        c = cells[f"{per_seed}/lucky"]
        value = dict(zip(c["seeds"], c["values"]))
        row = [
            f"{value[seed]:.1f}" + (f" (s{other[name][seed]})" if seed in other.get(name, {}) else "")
            if seed in value
            else "-"
            for seed in seeds
        ]
        lines.append(f"| {name} | " + " | ".join(row) + " |")
    if other:
        lines += [
            "",
            "Runs from another SFT start than their seed's first run (their SFT cache was missing and the "
            "retrained SFT is not the same parameters; the `SFT (start N)` rows are those starts), so "
            "compared with their base only on the seeds that share its start:",
        ]
        lines += [f"- {name}: seeds {', '.join(by_seed)}" for name, by_seed in other.items()]
    if t.get("unpaired"):
        lines += ["", "Not paired (variant and base from different starts): "]
        lines[-1] += "; ".join(f"{name} (seeds {', '.join(left)})" for name, left in t["unpaired"].items())
    if t["paired_differences"]:
        n = {len(d["seeds"]) for d in t["paired_differences"].values()}
        for k in keys:
            lines += [
                "",
                f"**{k}, CLIPO method minus its base algo** (points, same seed; mean [percentile bootstrap "
                f"{100 * CI_LEVEL:.0f}% CI over seeds, {FLAGS.n_boot} resamples])",
                "",
                "| comparison | seeds | " + " | ".join(sets) + " |",
                "|---|---|" + "---|" * len(sets),
            ]
            for name, d in t["paired_differences"].items():
                row = [fmt_ci(d[f"{s}/{k}"]) for s in sets]
                lines.append(f"| {name} | {len(d['seeds'])} | " + " | ".join(row) + " |")
        if min(n) < 2:
            lines += ["", "No CI where fewer than 2 seeds are paired: one difference has no spread to resample."]
    if aliases:
        lines += ["", "Equal to the default CLIPO settings, so the `+clipo` rows: " + ", ".join(sorted(aliases)) + "."]
    if t["curves"]:
        shown = [s for s in ("in_dist", "leak") if s in sets]  # leak: where the shortcut pays
        lines += [
            "",
            "**learning curves** (lucky rate, %, mean over seeds, at RL step "
            + ", ".join(str(s) for s in next(iter(t["curves"].values()))["steps"])
            + "; every set and rate in summary.json)",
            "",
            "| method | " + " | ".join(shown) + " |",
            "|---|" + "---|" * len(shown),
        ]
        for name, c in t["curves"].items():
            cells = [" ".join(f"{v:.1f}" for v in c[f"{s}/lucky"]["mean"]) for s in shown]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if t.get("reward_gap"):
        lines += [
            "",
            "**CLIPO reward, lucky minus process-right successes** (mean over the RL steps with both, per "
            "seed; mean [bootstrap CI] over seeds; < 0: the contrastive reward singles out the lucky ones)",
            "",
            "| method | seeds | per seed | mean |",
            "|---|---|---|---|",
        ]
        for name, g in t["reward_gap"].items():
            per_seed = ", ".join(f"{v:+.3f}" for v in g["values"])
            lines.append(f"| {name} | {', '.join(g['seeds'])} | {per_seed} | {fmt_ci(g, digits=3)} |")
    if t["cost_per_step"]:
        lines += [
            "",
            "**cost per RL step** (median over the steps that compile nothing: not the first of a run or of a resume; over every seed's run)",
            "",
            "| method | step s | CLIPO stage s | CLIPO share |",
            "|---|---|---|---|",
        ]
        for name, c in t["cost_per_step"].items():
            share = f"{100 * c['clipo_share']:.1f}%" if c["clipo"] else "-"
            lines.append(f"| {name} | {c['step_s']:.2f} | {c['clipo_s']:.3f} | {share} |")
    return lines


def plot_curves(task: str, t: dict) -> str | None:
    """ROOT/curves_TASK.png: lucky rate and outcome per test set against the RL step, one line per
    method (mean over seeds). None when matplotlib is not installed (it is an optional extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    sets, rows = t["sets"], ("lucky", "outcome")
    # one colour per CLIPO variant (none, default, each ablation), one line style per algo
    variants = list(dict.fromkeys(name.split("+", 1)[1] if "+" in name else "" for name in t["curves"]))
    algos = list(dict.fromkeys(name.split("+", 1)[0] for name in t["curves"]))
    fig, axes = plt.subplots(len(rows), len(sets), figsize=(2.6 * len(sets) + 2, 2.4 * len(rows)), squeeze=False)
    for i, k in enumerate(rows):
        for j, s in enumerate(sets):
            ax = axes[i][j]
            for name, c in t["curves"].items():
                algo, _, variant = name.partition("+")
                style = dict(
                    color=f"C{variants.index(variant) % 10}", linestyle=("-", "--", ":")[algos.index(algo) % 3]
                )
                ax.plot(c["steps"], c[f"{s}/{k}"]["mean"], marker=".", label=name, **style)
            ax.set_title(f"{s}", fontsize=8)
            ax.set_xlabel("RL step", fontsize=7)
            ax.set_ylabel(f"{k} (%)", fontsize=7)
            ax.tick_params(labelsize=7)
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="center right", fontsize=6)
    fig.suptitle(f"task {task}: mean over seeds", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1 - 1.8 / (2.6 * len(sets) + 2), 1))
    path = os.path.join(FLAGS.root, f"curves_{task}.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def environment() -> dict:
    import platform
    from importlib.metadata import PackageNotFoundError, version

    from experiments.bench_common import machine

    libs = {}
    for p in ("jax", "jaxlib", "flax", "optax", "numpy", "ml-collections", "matplotlib"):
        try:
            libs[p] = version(p)
        except PackageNotFoundError:
            libs[p] = None
    return {
        "machine": machine(),
        "devices": jax_devices(),
        "python": platform.python_version(),
        "versions": libs,
        "seeds": FLAGS.seeds,
    }


def jax_devices() -> str:
    """What the runs' JAX sees, e.g. 'gpu: 1 x NVIDIA H200', asked of a child process so this one
    never takes accelerator memory from the runs."""
    probe = "import jax; d = jax.devices(); print(f'{jax.default_backend()}: {len(d)} x {d[0].device_kind}')"
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=300)
    return (
        r.stdout.strip().splitlines()[-1]
        if r.returncode == 0 and r.stdout.strip()
        else f"unknown (exit {r.returncode})"
    )


def main(argv):
    del argv
    unknown = [t for t in FLAGS.tasks if t not in TASKS]
    if unknown:
        sys.exit(f"--tasks: unknown {unknown}; valid: {', '.join(TASKS)}")
    if not 0.0 < FLAGS.shortcut_share <= 1.0:
        sys.exit(f"--shortcut_share={FLAGS.shortcut_share} must be in (0, 1]")
    if FLAGS.steps < 0 or FLAGS.eval_every < 0:
        sys.exit("--steps and --eval_every must be >= 0")
    try:
        from configs import common

        for algo in FLAGS.algos:  # an unknown algo fails here, not in every one of its runs
            common.apply_algo(common.rl_block(), algo)
        FLAGS.ablations = [canonical_ablation(a) for a in FLAGS.ablations]
        methods, aliases = study_methods()
        from configs import demo

        for task in FLAGS.tasks:  # a bad --shortcut_args fails here, not in every run
            demo.get_config(f"size={FLAGS.size}{task_arg(task)}")
    except ValueError as e:
        sys.exit(str(e))
    stale = stale_runs(methods)
    if stale:
        sys.exit(
            f"{len(stale)} run(s) under --root={FLAGS.root} were started with another command (see their "
            f"{COMMAND_FILE}), e.g. {stale[0]}: use another --root or remove them"
        )
    os.makedirs(FLAGS.root, exist_ok=True)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _stop)
    if not FLAGS.summarize_only:
        warn_missing_sft(methods)
    failed = [] if FLAGS.summarize_only else run_all(methods)

    runs = {}
    for task in FLAGS.tasks:
        for m in methods:
            for seed in FLAGS.seeds:
                workdir = run_dir(task, m, seed)
                runs[os.path.relpath(workdir, FLAGS.root)] = {
                    "command": recorded_command(task, m, seed),
                    "finished": finished(workdir),
                }
    summary = {
        "study": {
            "command": study_command(),
            "tasks": {t: f"configs/demo.py:size={FLAGS.size}{task_arg(t)}" for t in FLAGS.tasks},
            "algos": FLAGS.algos,
            "seeds": FLAGS.seeds,
            "methods": [m.name for m in methods],
            "ablation_aliases": aliases,
            "size": FLAGS.size,
            "steps": FLAGS.steps,
            "eval_every": FLAGS.eval_every,
            "extra": FLAGS.extra,
            "bootstrap": {"n_boot": FLAGS.n_boot, "seed": BOOTSTRAP_SEED, "level": CI_LEVEL, "kind": "percentile"},
            "units": "% of the test set; paired differences in points",
        },
        "environment": environment(),
        "runs": runs,
        "tasks": {},
    }
    previous = os.path.join(FLAGS.root, "summary.json")
    if FLAGS.summarize_only and os.path.exists(previous):
        # the environment is the one the runs ran on: a summary redone elsewhere (e.g. a laptop
        # reading a GPU's run dirs) keeps the last running invocation's and adds its own apart
        ran_on = read_json(previous).get("environment")
        if ran_on and ran_on != summary["environment"]:
            summary["summarized_on"], summary["environment"] = summary["environment"], ran_on
    lines = [f"# CLIPO study: {sum(r['finished'] for r in runs.values())} of {len(runs)} runs finished", ""]
    lines += [f"`{study_command()}`"]
    for task in FLAGS.tasks:
        t = summarize_task(task, methods)
        if t is None:
            lines += ["", f"## task `{task}`: no finished run"]
            continue
        summary["tasks"][task] = t
        lines += task_markdown(task, t, aliases)
        if t["curves"]:
            png = plot_curves(task, t)
            lines += ["", f"learning curves: {os.path.basename(png)}" if png else "(matplotlib not installed: no plot)"]
    md = "\n".join(lines)
    print(md)
    with open(os.path.join(FLAGS.root, "summary.md"), "w") as f:
        f.write(md + "\n")
    with open(os.path.join(FLAGS.root, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    if failed:
        sys.exit(f"{len(failed)} run(s) failed: {', '.join(failed)}")
    if not summary["tasks"]:
        sys.exit("no finished runs")


if __name__ == "__main__":
    app.run(main)
