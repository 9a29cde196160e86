"""experiments/bench_clipo_stage.py runs end to end: both ways of fetching the stage's metrics give
the same values, and every figure it reports is a measured, positive number."""

import json
import subprocess
import sys


def test_bench_reports_the_stage_and_both_fetches():
    out = subprocess.run(
        [sys.executable, "-m", "experiments.bench_clipo_stage", "--repeats=2"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["B"] == 256 and summary["H"] == 128 and summary["backend"] == "cpu"
    on, off = summary["geometry on"], summary["geometry off"]
    assert on["metrics"] > off["metrics"] > 0  # the geometry adds its metrics
    for r in (on, off):
        assert r["same_values"] is True
        for key in ("stage_ms", "fetch_per_leaf_ms", "fetch_stacked_ms"):
            assert r[key] > 0, (key, r)
