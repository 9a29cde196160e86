"""CPU kernels called from jitted code through the JAX FFI, built on first use.

`decode_attention` is one decode step's attention over the per-layer KV cache (keys transposed),
its (row, kv head) pairs shared out over XLA's intra-op thread pool: XLA:CPU runs the same
arithmetic as fusions on one thread (`experiments/bench_decode_attention.py` times both). The C++
source ships with the package and is compiled with the host's C++ compiler (`$CXX`, else `g++`
or `c++`) for its own CPU (-march=native) into a cache directory, keyed by the source, the
compiler, the flags, jaxlib's version and the CPU. Without a compiler, or where the build fails,
`available()` is False (the reason is logged once and kept in `unavailable_reason()`) and the
callers keep XLA's path. `CLIPO_JAX_CPU_KERNELS=0` turns the kernels off;
`CLIPO_JAX_KERNEL_CACHE` moves the cache (default `~/.cache/clipo_jax/kernels`).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("decode_attention.cc")
TARGET = "clipo_jax_decode_attention"
FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-std=c++17", "-shared", "-fPIC", "-w")
LANES = 16  # the kernel's vector width in floats: head_dim must be a multiple of it

_unavailable: str | None = None


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "g++", "c++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_id() -> str:
    """What -march=native depends on: the CPU model and its flags."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    fields = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return f"{fields.get('model name', '')}|{fields.get('flags', '')}"


def _build(cxx: str) -> Path:
    import jaxlib

    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=True).stdout
    key = hashlib.sha256(
        "\0".join([SOURCE.read_text(), version, " ".join(FLAGS), jaxlib.__version__, _cpu_id()]).encode()
    ).hexdigest()[:16]
    cache = Path(os.environ.get("CLIPO_JAX_KERNEL_CACHE") or Path.home() / ".cache" / "clipo_jax" / "kernels")
    lib = cache / f"decode_attention-{key}.so"
    if lib.exists():
        return lib
    cache.mkdir(parents=True, exist_ok=True)
    # build next to the target, then rename: concurrent processes never load a half-written file
    fd, tmp = tempfile.mkstemp(dir=cache, suffix=".so.tmp")
    os.close(fd)
    try:
        cmd = [cxx, *FLAGS, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed: {done.stderr.strip()[-2000:]}")
        os.replace(tmp, lib)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return lib


@functools.cache
def _register() -> bool:
    global _unavailable
    if os.environ.get("CLIPO_JAX_CPU_KERNELS", "1") == "0":
        _unavailable = "CLIPO_JAX_CPU_KERNELS=0"
        return False
    cxx = _compiler()
    if cxx is None:
        _unavailable = "no C++ compiler ($CXX, g++, c++) on PATH"
    else:
        try:
            handle = ctypes.cdll.LoadLibrary(str(_build(cxx)))
            jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(handle.ClipoDecodeAttention), platform="cpu")
            return True
        except (OSError, RuntimeError, subprocess.SubprocessError, AttributeError) as e:
            _unavailable = f"the CPU decode-attention kernel did not build or load: {e}"
    logger.warning("%s; decode attention stays on XLA's path", _unavailable)
    return False


def available() -> bool:
    """Whether the CPU decode-attention kernel is built and registered (builds it on first call)."""
    return _register()


def unavailable_reason() -> str | None:
    """Why `available()` is False (None when it is True or has not been asked)."""
    return _unavailable


def decode_attention(q, k, v, k_pos, q_pos, window, *, scale: float, softcap: float | None = None):
    """One query per row over a single cache segment, on the CPU.

    q: [B, K, G, hd] float32 (G query heads per kv head); k: [B, K, hd, S] (keys transposed);
    v: [B, K, S, hd]; k_pos: [B, S] int32 key positions (-1 = empty slot); q_pos: [B] int32;
    window: int32 scalar (keys at distance >= window are masked). Returns [B, K, G, hd] float32:
    softmax(cap(scale q.k)) over the allowed keys (position <= q_pos, within the window) times v,
    zeros for a query with no allowed key. `available()` must be True.
    """
    B, K, G, hd = q.shape
    if hd % LANES:
        raise ValueError(f"decode_attention: head_dim {hd} is not a multiple of {LANES}")
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((B, K, G, hd), jnp.float32))
    return call(
        q.astype(jnp.float32),
        k.astype(jnp.float32),
        v.astype(jnp.float32),
        k_pos.astype(jnp.int32),
        q_pos.astype(jnp.int32),
        jnp.asarray(window, jnp.int32).reshape(1),
        scale=np.float32(scale),
        softcap=np.float32(softcap or 0.0),
    )
