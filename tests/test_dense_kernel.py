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


@pytest.mark.parametrize("preset", ["tiny_llama", "tiny_qwen2", "tiny_gemma3"])
def test_packed_model_matches_xla(preset):
    """transformer.pack_dense_weights: every layer matrix and the LM head packed, and the whole
    forward pass (prefill-sized M = B * T, biases, tied head, softcaps) the same as XLA's."""
    from dataclasses import replace

    from clipo_jax.models import PRESETS, transformer

    cfg = PRESETS[preset]
    params = transformer.init_params(cfg, jax.random.key(0), std=0.3)
    unstacked = transformer.unstack_layers(params)
    packed = jax.jit(lambda p: transformer.pack_dense_weights(p, cfg))(unstacked)
    for lp, lp_packed in zip(unstacked["layers"], packed["layers"]):
        for name in transformer.DENSE_WEIGHTS:
            assert isinstance(lp_packed[name], kernels.PackedDense)
            np.testing.assert_array_equal(np.asarray(kernels.unpack_dense(lp_packed[name])), np.asarray(lp[name]))
        assert all(
            np.asarray(lp_packed[k]).shape == np.asarray(lp[k]).shape for k in lp if k not in transformer.DENSE_WEIGHTS
        )
    head = unstacked["embed"].T if cfg.tie_embeddings else unstacked["lm_head"]
    np.testing.assert_array_equal(np.asarray(kernels.unpack_dense(packed["lm_head"])), np.asarray(head))

    tokens = jax.random.randint(jax.random.key(1), (3, 12), 0, cfg.vocab_size)
    valid = jnp.ones((3, 12), bool).at[0, :4].set(False)  # a left-padded row
    fwd = jax.jit(lambda p: transformer.forward_logits(p, cfg, tokens, valid))
    assert kernels.DENSE_TARGET in fwd.lower(packed).as_text()
    ref_logits, ref_hidden = fwd(unstacked)
    logits, hidden = fwd(packed)
    np.testing.assert_allclose(np.asarray(hidden), np.asarray(ref_hidden), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(ref_logits), rtol=1e-4, atol=1e-4)

    with pytest.raises(ValueError, match="float32"):
        transformer.pack_dense_weights(unstacked, replace(cfg, dtype="bfloat16"))
    with pytest.raises(ValueError, match="unstack"):
        transformer.pack_dense_weights(params, cfg)
