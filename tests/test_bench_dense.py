"""experiments/bench_dense.py --quick runs end to end: XLA's dots and the packed CPU kernel compute
the same chain, and every figure it reports is a measured, positive number."""

import json
import subprocess
import sys

import pytest

from clipo_jax import kernels


@pytest.mark.slow
def test_quick_run_reports_both_paths():
    out = subprocess.run(
        [sys.executable, "-m", "experiments.bench_dense", "--quick"], capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    summary = json.loads(lines[-1])
    assert summary["bench"] == "dense" and summary["peak_gflops"] > 0 and summary["bandwidth_gbs"] > 0
    if not kernels.available():
        assert summary["results"] == [] and "kernel unavailable" in lines[0]
        return
    cases = {r["case"]: r for r in summary["results"]}
    for m in (1, 4):
        for place in ("streamed", "resident"):
            r = cases[f"matmul chain M={m}, weights {place}"]
            assert (
                r["ours"] > 0 and r["baseline"] > 0 and r["ratio"] == pytest.approx(r["baseline"] / r["ours"], rel=1e-2)
            )
            assert r["max_rel_diff"] < 1e-4, r
        assert cases[f"matmul chain M={m}, weights streamed"]["floor_ms"] > 0
        cost = cases[f"streaming cost M={m} (streamed / resident)"]
        assert cost["ours"] > 0 and cost["baseline"] > 0
