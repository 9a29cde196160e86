"""Building and loading the CPU kernels (clipo_jax.kernels): the cache, and the fallback to XLA's
path when the kernel cannot be built. Each case runs in a fresh interpreter: a registered FFI
target and the availability answer last for the life of a process."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from clipo_jax import kernels, sampling

ROOT = Path(__file__).resolve().parents[1]

PROBE = textwrap.dedent(
    """
    import json, logging
    logging.basicConfig(level=logging.WARNING)
    from clipo_jax import kernels, sampling
    from clipo_jax.models.config import PRESETS
    ok = kernels.available()
    out = {"available": ok, "reason": kernels.unavailable_reason(), "bits": kernels.vector_bits(),
           "auto": sampling.Sampler(PRESETS["tiny_llama"]).cpu_decode_kernel,
           "auto_dense": sampling.Sampler(PRESETS["tiny_llama"]).cpu_dense_kernel}
    try:
        sampling.Sampler(PRESETS["tiny_llama"], cpu_decode_kernel=True)
        out["forced"] = "ok"
    except ValueError as e:
        out["forced"] = str(e)
    print(json.dumps(out))
    """
)


def _probe(tmp_path, **env):
    full = {**os.environ, "JAX_PLATFORMS": "cpu", "CLIPO_JAX_KERNEL_CACHE": str(tmp_path / "cache"), **env}
    done = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=ROOT, env=full, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


def test_switched_off_keeps_xla_path(tmp_path):
    out, _ = _probe(tmp_path, CLIPO_JAX_CPU_KERNELS="0")
    assert out == {
        "available": False,
        "reason": "CLIPO_JAX_CPU_KERNELS=0",
        "bits": 0,
        "auto": False,
        "auto_dense": False,
        "forced": "Sampler(cpu_decode_kernel=True): CLIPO_JAX_CPU_KERNELS=0",
    }
    assert not (tmp_path / "cache").exists()


def test_failed_build_is_logged_and_falls_back(tmp_path):
    """A compiler that fails: one warning naming the command, XLA's path, a clear error if forced."""
    cxx = tmp_path / "broken-cxx"
    cxx.write_text("#!/bin/sh\n[ \"$1\" = --version ] && echo broken 1.0 && exit 0\necho 'no such luck' >&2\nexit 1\n")
    cxx.chmod(0o755)
    out, stderr = _probe(tmp_path, CXX=str(cxx))
    assert out["available"] is False and out["auto"] is False and out["auto_dense"] is False and out["bits"] == 0
    assert "did not build or load" in out["reason"] and "no such luck" in out["reason"]
    assert out["forced"].startswith("Sampler(cpu_decode_kernel=True): the CPU kernels did not build")
    assert stderr.count("stay on XLA's path") == 1
    assert not list((tmp_path / "cache").glob("*.so*"))  # no half-written library left behind


@pytest.mark.skipif(kernels._compiler() is None, reason="no C++ compiler to build the CPU kernel")
def test_build_is_cached_per_source_and_cpu(tmp_path):
    out, _ = _probe(tmp_path)
    # auto mode: on where the kernels' vector path is wide enough
    bits = out.pop("bits")
    want = {k: bits >= v for k, v in sampling.KERNEL_MIN_VECTOR_BITS.items()}
    assert out == {
        "available": True,
        "reason": None,
        "auto": want["cpu_decode_kernel"],
        "auto_dense": want["cpu_dense_kernel"],
        "forced": "ok",
    }
    if kernels.MARCH == "native":
        assert bits == (512 if kernels.has_avx512() else 256)
    (lib,) = (tmp_path / "cache").glob("cpu_kernels-*.so")
    stamp = lib.stat().st_mtime_ns
    out, _ = _probe(tmp_path)  # a second process loads the same file, no rebuild
    assert out["available"] and lib.stat().st_mtime_ns == stamp
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [lib.name]


@pytest.mark.skipif(kernels._compiler() is None, reason="no C++ compiler to build the CPU kernel")
@pytest.mark.skipif("avx2" not in kernels._cpu_id(), reason="the CPU has no AVX2")
def test_an_avx2_build_reports_its_vector_path(tmp_path):
    """CLIPO_JAX_KERNEL_MARCH=x86-64-v3 builds what a CPU without AVX-512 runs (its own cached
    library): 256-bit vectors, so the decode-attention kernel (16-float vectors) stays off in auto
    mode and can still be forced."""
    out, _ = _probe(tmp_path, CLIPO_JAX_KERNEL_MARCH="x86-64-v3")
    assert out["available"] and out["bits"] == 256 and out["forced"] == "ok"
    assert out["auto"] is False
    assert out["auto_dense"] == (256 >= sampling.KERNEL_MIN_VECTOR_BITS["cpu_dense_kernel"])
