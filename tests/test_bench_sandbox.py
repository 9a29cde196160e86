"""experiments/bench_sandbox.py runs and prints the floor and each usable layer set's cost."""

import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_sandbox_prints_each_layer_set_against_the_floor():
    r = subprocess.run(
        [sys.executable, "-m", "experiments.bench_sandbox", "--repeats=1"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    floor = re.search(r"floor \(bare interpreter start\): ([\d.]+) ms", r.stdout)
    assert floor and float(floor.group(1)) > 0, r.stdout
    # seccomp is required by the sandbox (the tests fail without it); bubblewrap may be missing
    costs = re.findall(r"run_checker ([\d.]+) ms = ([\d.]+)x the floor", r.stdout)
    assert costs and all(float(ms) > 0 for ms, _ in costs), r.stdout
    assert "seccomp:" in r.stdout
