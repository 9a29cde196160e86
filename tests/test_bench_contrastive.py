"""experiments/bench_contrastive.py end to end with --quick (tiny shapes, 1 repeat): every case
runs, the first line names the machine, and each track prints the loss's memory floor line and a
JSON entry for it whose numbers agree with each other (the speed figures themselves are the
benchmark's business, not a test's)."""

import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM = r"([0-9.]+(?:e[+-]?\d+)?)"


def test_bench_contrastive_quick_memory_floor():
    cmd = [sys.executable, "-m", "experiments.bench_contrastive", "--quick"]
    try:
        import torch  # noqa: F401
    except ImportError:
        cmd.append("--skip_torch")
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()

    from experiments.bench_common import cores, machine

    # the bench module defines absl flags: read its quick shapes in a child process, not here,
    # where other experiments modules' flags of the same names are already defined
    probe = "import json; from experiments.bench_contrastive import TRACKS_QUICK; print(json.dumps(TRACKS_QUICK))"
    shapes = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    tracks_quick = json.loads(shapes.stdout.strip().splitlines()[-1])

    assert lines[0].startswith(f"CLIPO contrastive bench on {machine()} (")
    assert f", {cores()} cores" in lines[0]

    floors = [
        re.fullmatch(
            rf"loss floor: {NUM} MB read / {NUM} GB/s = {NUM} ms; ours {NUM} ms = {NUM} x the floor",
            line,
        )
        for line in lines
        if line.startswith("loss floor:")
    ]
    assert len(floors) == len(tracks_quick) and all(floors), proc.stdout
    summary = json.loads(lines[-1])
    assert summary["bench"] == "contrastive" and summary["machine"] == machine()
    cases = {r["case"]: r for r in summary["results"]}
    # what the docstring counts: z [B, d] float32 + labels and group ids [B] int32, once each
    quick_bytes = {t: 4 * p * g * d + 8 * p * g for t, (p, g, _, d) in tracks_quick.items()}
    for track, m in zip(tracks_quick, floors):
        mb, gbs, floor, ours, times = map(float, m.groups())
        assert min(mb, gbs, floor, ours, times) > 0
        assert mb == pytest.approx(quick_bytes[track] / 1e6, rel=1e-3)
        assert floor == pytest.approx(mb / gbs, rel=2e-3)
        assert times == pytest.approx(ours / floor, rel=2e-3)
        e = cases[f"loss track {track} vs memory floor"]
        assert e["unit"] == "ms" and e["ours"] > 0 and e["baseline"] > 0
        assert e["ours"] == pytest.approx(ours, rel=1e-3) and e["baseline"] == pytest.approx(floor, rel=1e-3)
        assert e["ratio"] == pytest.approx(e["baseline"] / e["ours"], rel=2e-3)
        assert e["floor_x"] == pytest.approx(e["ours"] / e["baseline"], rel=2e-3)
        assert e["read_mb"] == pytest.approx(mb, rel=1e-3) and e["bandwidth_gbs"] > 0
