"""A tiny demo run reproduces the numbers stored with the pinned versions (constraints.txt).

``tests/data/golden/demo_tiny.json`` holds the per-step metrics of the run below, produced with
the versions of constraints.txt on the CPU named in the file. XLA:CPU picks its kernels (and so
the order of float sums) by CPU family, so the numbers are compared tightly on a CPU with the
same instruction set (AVX-512 or not) and loosely elsewhere. Regenerate on purpose only:

    CLIPO_JAX_REGENERATE_GOLDEN=1 python -m pytest tests/test_reproducibility.py
"""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(REPO, "tests", "data", "golden", "demo_tiny.json")
FLAGS = [
    "--config=configs/demo.py:size=tiny",
    "--config.progress_bar=False",
    "--config.rl.steps=3",
    "--config.rl.entropy_coef=0.01",  # a gradient every step although the tiny model solves nothing
    "--config.rl.warmup_steps=0",
    "--config.eval.max_new_tokens=4",
    "--config.task.test_size=2",
]
# continuous quantities of the policy update; times and counters are left out
KEYS = ("actor/entropy", "actor/grad_norm", "actor/loss", "actor/pg_loss", "actor/tokens", "response/length_mean")


def cpu_family() -> str:
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        pass
    return "x86_64-avx512" if " avx512f" in flags else f"{os.uname().machine}-other"


def train_env() -> dict:
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    return env


def read_metrics(workdir) -> list[dict]:
    with open(workdir / "metrics.jsonl") as f:
        return [{k: rec[k] for k in ("step", *KEYS)} for rec in map(json.loads, f)]


def run_metrics(tmp_path) -> list[dict]:
    cmd = [sys.executable, "-m", "experiments.train", f"--workdir={tmp_path}", *FLAGS]
    r = subprocess.run(cmd, cwd=REPO, env=train_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return read_metrics(tmp_path)


def test_tiny_demo_matches_stored_numbers(tmp_path):
    got = run_metrics(tmp_path)
    if os.environ.get("CLIPO_JAX_REGENERATE_GOLDEN"):
        from importlib.metadata import version

        os.makedirs(os.path.dirname(GOLDEN), exist_ok=True)
        with open(GOLDEN, "w") as f:
            versions = {p: version(p) for p in ("jax", "jaxlib", "flax", "optax", "numpy")}
            json.dump({"cpu_family": cpu_family(), "versions": versions, "flags": FLAGS, "steps": got}, f, indent=1)
    assert_matches_golden(got)


def assert_matches_golden(got: list[dict]) -> None:
    with open(GOLDEN) as f:
        golden = json.load(f)
    assert [s["step"] for s in got] == [s["step"] for s in golden["steps"]]
    same_family = golden["cpu_family"] == cpu_family()
    rtol = 1e-4 if same_family else 2e-2  # another CPU family: other kernels, other rounding
    for want, have in zip(golden["steps"], got):
        for k in KEYS:
            np.testing.assert_allclose(have[k], want[k], rtol=rtol, atol=1e-6, err_msg=f"step {want['step']} {k}")


def test_a_run_killed_mid_step_resumes_from_the_checkpoint_it_saved_and_matches(tmp_path):
    """SIGKILL during the step after a checkpoint: orbax has finished that step (final directory)
    but the manifest comes with the next commit. The re-run resumes from that step (it was
    rejected, and ckpt.every steps redone, before) and reproduces the stored numbers."""
    from clipo_jax.checkpoints import MANIFEST, REJECTED

    ckpt_dir = tmp_path / "checkpoints"
    cmd = [sys.executable, "-m", "experiments.train", f"--workdir={tmp_path}", *FLAGS, "--config.ckpt.every=1"]
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=train_env(), stdout=log, stderr=subprocess.STDOUT)
        killed_after, raced, deadline = None, set(), time.time() + 600
        try:
            while killed_after is None and proc.poll() is None and time.time() < deadline:
                for step in (1, 2):  # step 3 is the last: its commit follows the save at once
                    d = ckpt_dir / str(step)
                    if step in raced or not d.is_dir() or (d / MANIFEST).exists():
                        continue
                    os.kill(proc.pid, signal.SIGSTOP)  # frozen where it is, then checked
                    if (d / MANIFEST).exists():  # the commit won the race: try the next step
                        raced.add(step)
                        os.kill(proc.pid, signal.SIGCONT)
                        continue
                    os.kill(proc.pid, signal.SIGKILL)
                    killed_after = step
                    break
                time.sleep(0.002)
        finally:
            if proc.poll() is None and killed_after is None:
                proc.kill()
            proc.wait()
    assert killed_after is not None, f"never saw a saved step without its manifest; raced on {sorted(raced)}"
    assert not (ckpt_dir / str(killed_after) / MANIFEST).exists()

    r = subprocess.run(cmd, cwd=REPO, env=train_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed from step {killed_after}" in r.stdout, (killed_after, r.stdout[-2000:], r.stderr[-2000:])
    assert not (tmp_path / REJECTED).exists()
    assert [m["step"] for m in read_metrics(tmp_path)] == [1, 2, 3]
    assert_matches_golden(read_metrics(tmp_path))
