"""CPU kernels called from jitted code through the JAX FFI, built on first use.

- `decode_attention`: one decode step's attention over the per-layer KV cache (keys transposed),
  its (row, kv head) pairs shared out over XLA's intra-op thread pool: XLA:CPU runs the same
  arithmetic as fusions on one thread (`experiments/bench_decode_attention.py` times both).
- `dense`: x @ W with W packed in column panels (`pack_dense`), the panels shared out over the
  same pool. The panels stream from memory sequentially and are prefetched ahead of the
  arithmetic; XLA:CPU's dots read W in place, a new page every row, well below the FMA peak at
  the sampler's batch sizes (`experiments/bench_sampler.py` prints both matmul chains).

The C++ sources ship with the package and are compiled together with the host's C++ compiler
(`$CXX`, else `g++` or `c++`) for its own CPU (-march=native) into a cache directory, keyed by the
sources, the compiler, the flags, jaxlib's version and the CPU. Without a compiler, or where the build fails,
`available()` is False (the reason is logged once and kept in `unavailable_reason()`) and the
callers keep XLA's path. `CLIPO_JAX_KERNEL_MARCH` sets another target ISA than the host's
(e.g. `x86-64-v3`, AVX2 + FMA). `CLIPO_JAX_CPU_KERNELS=0` turns the kernels off;
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
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from clipo_jax.models.config import CPU_KERNEL_LANES

logger = logging.getLogger(__name__)

SOURCES = tuple(Path(__file__).with_name(name) for name in ("decode_attention.cc", "dense.cc"))
HEADERS = (Path(__file__).with_name("units.h"),)  # included by the sources: part of the build key
TARGET = "clipo_jax_decode_attention"
DENSE_TARGET = "clipo_jax_dense"
# the target ISA: this CPU's by default; e.g. x86-64-v3 (AVX2 + FMA) builds what a CPU without
# AVX-512 runs (with XLA_FLAGS=--xla_cpu_max_isa=AVX2, an AVX-512 host times both paths as one)
MARCH = os.environ.get("CLIPO_JAX_KERNEL_MARCH", "native")
FLAGS = ("-O3", f"-march={MARCH}", "-fno-math-errno", "-std=c++17", "-shared", "-fPIC", "-w")
LANES = CPU_KERNEL_LANES  # the kernels' vector width in floats: head_dim and a packed W's columns are multiples of it

_unavailable: str | None = None
_vector_bits = 0


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
        "\0".join(
            [*(src.read_text() for src in SOURCES + HEADERS), version, " ".join(FLAGS), jaxlib.__version__, _cpu_id()]
        ).encode()
    ).hexdigest()[:16]
    cache = Path(os.environ.get("CLIPO_JAX_KERNEL_CACHE") or Path.home() / ".cache" / "clipo_jax" / "kernels")
    lib = cache / f"cpu_kernels-{key}.so"
    if lib.exists():
        return lib
    cache.mkdir(parents=True, exist_ok=True)
    # build next to the target, then rename: concurrent processes never load a half-written file
    fd, tmp = tempfile.mkstemp(dir=cache, suffix=".so.tmp")
    os.close(fd)
    try:
        cmd = [cxx, *FLAGS, f"-I{jax.ffi.include_dir()}", *map(str, SOURCES), "-o", tmp]
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
    global _unavailable, _vector_bits
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
            jax.ffi.register_ffi_target(DENSE_TARGET, jax.ffi.pycapsule(handle.ClipoDense), platform="cpu")
            _vector_bits = int(handle.ClipoKernelVectorBits())
            return True
        except (OSError, RuntimeError, subprocess.SubprocessError, AttributeError) as e:
            _unavailable = f"the CPU kernels did not build or load: {e}"
    logger.warning("%s; decode attention and the sampler's matmuls stay on XLA's path", _unavailable)
    return False


def has_avx512() -> bool:
    """Whether this CPU lists AVX-512 (avx512f in /proc/cpuinfo)."""
    return "avx512f" in _cpu_id().partition("|")[2].split()


def vector_bits() -> int:
    """The vector path the kernels were built with (builds them on first call): 512 (AVX-512, 32
    registers of 16 floats: what both kernels are written for), 256 (AVX2 + FMA: `dense` runs
    8-float register blocks; `decode_attention` keeps its 16-float vectors, which spill out of the
    16 registers and run several times slower than XLA's fusions), 0 (neither, or not built).
    The sampler's auto mode reads it."""
    return _vector_bits if _register() else 0


def available() -> bool:
    """Whether the CPU kernels are built and registered (builds them on first call)."""
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


class PackedDense(NamedTuple):
    """A weight W [K, N] as `dense` reads it: panels [N / P, K, P] (panel p holds columns
    p*P .. p*P + P - 1, row after row), P = 48, 32 or 16, the widest that divides N."""

    panels: jax.Array


def can_pack(w) -> bool:
    """Whether `pack_dense` takes w: a matrix whose column count is a multiple of LANES."""
    return w.ndim == 2 and w.shape[1] % LANES == 0 and w.shape[1] > 0


def pack_dense(w: jax.Array) -> PackedDense:
    """W [K, N] (N a multiple of 16) -> its float32 panels (one transpose; jit it with the rest
    of the weight preparation)."""
    if not can_pack(w):
        raise ValueError(f"pack_dense: W {w.shape} must be [K, N] with N a positive multiple of {LANES}")
    K, N = w.shape
    P = next(p for p in (3 * LANES, 2 * LANES, LANES) if N % p == 0)
    return PackedDense(w.astype(jnp.float32).reshape(K, N // P, P).transpose(1, 0, 2))


def unpack_dense(w: PackedDense) -> jax.Array:
    """`pack_dense`'s inverse: W [K, N] float32."""
    n_panels, K, P = w.panels.shape
    return w.panels.transpose(1, 0, 2).reshape(K, n_panels * P)


def dense(x: jax.Array, w: PackedDense) -> jax.Array:
    """x [..., K] @ W -> [..., N] float32 on the CPU (`available()` must be True)."""
    n_panels, K, P = w.panels.shape
    if x.shape[-1] != K:
        raise ValueError(f"dense: x {x.shape} does not match the packed weight's K = {K}")
    lead = x.shape[:-1]
    M = int(np.prod(lead, dtype=np.int64))
    call = jax.ffi.ffi_call(DENSE_TARGET, jax.ShapeDtypeStruct((M, n_panels * P), jnp.float32))
    return call(x.reshape(M, K).astype(jnp.float32), w.panels).reshape(*lead, n_panels * P)
