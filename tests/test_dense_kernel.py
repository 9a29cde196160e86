"""clipo_jax.kernels.dense (x @ W over column panels) against a float64 numpy product, and its
packing; the sampler-level parity is tests/test_sampling.py::test_cpu_kernels_change_nothing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clipo_jax import kernels

pytestmark = pytest.mark.skipif(kernels._compiler() is None, reason="no C++ compiler to build the CPU kernels")


@pytest.mark.parametrize(
    "lead,K,N",
    [
        ((1,), 576, 192),  # batch-1 decode, 48-wide panels
        ((8,), 64, 96),
        ((9,), 33, 80),  # a row block of 8 then 1; 16-wide panels
        ((3, 11), 5, 32),  # prefill shape [B, T, K]; 32-wide panel
        ((33,), 130, 48 * 7),  # more rows than 4 blocks, odd K
        ((2,), 1, 16),
    ],
)
def test_dense_matches_numpy(lead, K, N):
    assert kernels.available(), kernels.unavailable_reason()
    rng = np.random.default_rng(K * 1000 + N)
    x = rng.standard_normal((*lead, K)).astype(np.float32)
    w = rng.standard_normal((K, N)).astype(np.float32)
    packed = jax.jit(kernels.pack_dense)(jnp.asarray(w))
    assert packed.panels.shape[0] * packed.panels.shape[2] == N and packed.panels.shape[2] in (16, 32, 48)
    np.testing.assert_array_equal(np.asarray(kernels.unpack_dense(packed)), w)
    fn = jax.jit(kernels.dense)
    assert kernels.DENSE_TARGET in fn.lower(jnp.asarray(x), packed).as_text()  # the kernel, not XLA's dot
    out = np.asarray(fn(jnp.asarray(x), packed))
    ref = x.astype(np.float64) @ w.astype(np.float64)
    assert out.shape == (*lead, N)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=2e-5 * np.sqrt(K))


def test_dense_empty_contraction_and_bad_shapes():
    assert kernels.available(), kernels.unavailable_reason()
    packed = kernels.pack_dense(jnp.ones((0, 32), jnp.float32))
    out = jax.jit(kernels.dense)(jnp.ones((4, 0), jnp.float32), packed)
    np.testing.assert_array_equal(np.asarray(out), np.zeros((4, 32), np.float32))
    assert not kernels.can_pack(jnp.ones((8, 20))) and kernels.can_pack(jnp.ones((8, 48)))
    with pytest.raises(ValueError, match="multiple of 16"):
        kernels.pack_dense(jnp.ones((8, 20)))
    with pytest.raises(ValueError, match="K = 8"):
        kernels.dense(jnp.ones((2, 7)), kernels.pack_dense(jnp.ones((8, 16))))
