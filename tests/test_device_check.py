"""experiments/device_check.sh: the accelerator check run at toy sizes on CPU (--tiny), so that the
script a GPU/TPU host runs for a few lent minutes keeps working; and its exit status when a step
fails. The figures' sizes are the benchmarks' business: only their presence and sign are checked."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "experiments", "device_check.sh")
STEPS = ["env", "parity", "sampler", "train", "plan"]


def _run(args, python=sys.executable, timeout=600):
    env = {**os.environ, "DEVICE_CHECK_PYTHON": python}
    return subprocess.run(["bash", SCRIPT, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _summary(out_dir):
    """{step: PASS/FAIL} from summary.txt."""
    rows = {}
    for line in open(os.path.join(out_dir, "summary.txt")):
        parts = line.split()
        if len(parts) >= 2 and parts[0] in STEPS:
            rows[parts[0]] = parts[1]
    return rows


def _last_json(path):
    lines = [l for l in open(path).read().splitlines() if l.startswith("{")]
    return json.loads(lines[-1])


def test_failed_step_makes_exit_nonzero_and_the_rest_still_runs(tmp_path):
    proc = _run(["--steps", "env,parity", "--out", str(tmp_path)], python="false", timeout=60)
    assert proc.returncode != 0, proc.stdout
    assert _summary(tmp_path) == {"env": "FAIL", "parity": "FAIL"}  # parity ran after env failed
    assert "device_check: FAILED" in proc.stdout
    assert os.path.exists(tmp_path / "env.log") and os.path.exists(tmp_path / "parity.log")


def test_unknown_step_is_refused(tmp_path):
    proc = _run(["--steps", "env,bogus", "--out", str(tmp_path)], timeout=60)
    assert proc.returncode == 2 and "unknown step bogus" in proc.stderr


@pytest.mark.slow
def test_device_check_tiny_on_cpu(tmp_path):
    proc = _run(["--tiny", "--out", str(tmp_path)])
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert _summary(tmp_path) == {s: "PASS" for s in STEPS}
    assert "device_check: all steps passed" in proc.stdout

    env = (tmp_path / "env.log").read_text()
    assert "backend: cpu" in env and "jax " in env and "cpu: " in env

    assert " passed" in (tmp_path / "parity.log").read_text()

    sampler = (tmp_path / "sampler.log").read_text()
    assert "HF side skipped" in sampler
    cases = {r["case"]: r for r in _last_json(tmp_path / "sampler.log")["results"]}
    for b in (1, 4):
        assert cases[f"tokens/s batch {b}"]["ours"] > 0
        assert cases[f"decode bandwidth fraction batch {b}"]["ours"] > 0
    assert cases["memory bandwidth"]["ours"] > 0

    train = (tmp_path / "train.log").read_text()
    assert "% peak" in train and " cores;" in train  # the table and the bench_common.machine() line
    summary = _last_json(tmp_path / "train.log")
    assert summary["bench"] == "train_step" and summary["backend"] == "cpu"
    tr = {r["case"]: r for r in summary["results"]}
    assert tr["tiny_llama train step tokens/s (B=2, T=16)"]["ours"] > 0
    assert 0 < tr["tiny_llama train step model FLOP/s vs matmul peak"]["ratio"]

    plan = json.loads((tmp_path / "plan.json").read_text())
    programs = {p["program"]: p for p in plan["programs"]}
    assert {"train", "logp", "prefill", "decode"} <= set(programs)
    for p in programs.values():
        assert p["argument_bytes"] > 0 and p["total_bytes"] > 0, p
        assert p["measured_peak_bytes"] is None or p["measured_peak_bytes"] > 0
    assert "measured/plan" in (tmp_path / "plan.log").read_text()
