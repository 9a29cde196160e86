"""One decode step's attention (one query per row) over both cache layouts, against numpy.

The per-layer cache keeps keys as [B, K, hd, S]; from 8 (row, kv head) pairs a decode step
computes q.k and p.v as multiply-and-sum fusions, below that as einsums over the transposed keys.
Both, and the stacked layout's einsums, must be the same attention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clipo_jax import kernels
from clipo_jax.models import transformer
from clipo_jax.models.config import PRESETS

jax.config.update("jax_default_matmul_precision", "highest")


def _numpy_attention(q, k, v, k_pos, q_pos, scale, window, softcap):
    """q [B, H, hd], k/v [B, K, S, hd], k_pos [B, S], q_pos [B] -> [B, H * hd] (float64)."""
    B, H, hd = q.shape
    K = k.shape[1]
    out = np.zeros((B, H, hd))
    for b in range(B):
        for h in range(H):
            kv = h // (H // K)  # query heads grouped over kv heads, as the model does
            logits = k[b, kv].astype(np.float64) @ q[b, h].astype(np.float64) * scale
            if softcap is not None:
                logits = np.tanh(logits / softcap) * softcap
            ok = (k_pos[b] >= 0) & (k_pos[b] <= q_pos[b]) & (q_pos[b] - k_pos[b] < window)
            if not ok.any():
                continue  # a fully masked row attends to nothing
            w = np.exp(logits[ok] - logits[ok].max())
            out[b, h] = (w / w.sum()) @ v[b, kv][ok].astype(np.float64)
    return out.reshape(B, H * hd)


def _random_step(rng, batch, heads, kv_heads, head_dim, slots, empty_row):
    """q [B, H, hd], k / v [B, K, S, hd], key positions [B, S] and query positions [B] of one decode
    step: rows filled to different lengths (left-padded prompts, empty slots at the end), the last
    row with no valid key if empty_row (its output must be zeros), NaN keys in every masked slot."""
    q = rng.standard_normal((batch, heads, head_dim)).astype(np.float32)
    k = rng.standard_normal((batch, kv_heads, slots, head_dim)).astype(np.float32)
    v = rng.standard_normal((batch, kv_heads, slots, head_dim)).astype(np.float32)
    k_pos = np.full((batch, slots), -1, np.int32)
    for b in range(batch):
        start, n = b % 3, max(slots - 2 - (b % 4), 1)
        k_pos[b, start:n] = np.arange(n - start)
    q_pos = np.maximum(k_pos.max(axis=1), 0)
    if empty_row:
        k_pos[-1] = -1
    k[np.broadcast_to((k_pos < 0)[:, None, :, None], k.shape)] = np.nan  # masked keys must not leak
    return q, k, v, k_pos, q_pos


@pytest.mark.parametrize("batch", [1, 2, 9], ids=["einsum_1_row", "einsum_2_rows", "fused_9_rows"])
@pytest.mark.parametrize("preset", ["tiny_llama", "tiny_gemma3"])
def test_decode_step_attention_matches_numpy(preset, batch):
    cfg = PRESETS[preset]
    K, H, hd, S = cfg.n_kv_heads, cfg.n_heads, cfg.head_dim, 13
    q, k, v, k_pos, q_pos = _random_step(np.random.default_rng(batch), batch, H, K, hd, S, empty_row=batch > 1)
    window = cfg.sliding_window or int(np.iinfo(np.int32).max)
    ref = _numpy_attention(q, k, v, k_pos, q_pos, cfg.scale, window, cfg.attn_logit_softcap)
    pos, qp = jnp.asarray(k_pos), jnp.asarray(q_pos)[:, None]
    stacked = transformer.Segment(jnp.asarray(k), jnp.asarray(v), pos)
    per_layer = transformer.Segment(jnp.asarray(k.swapaxes(2, 3)), jnp.asarray(v), pos, k_transposed=True)
    fused = batch * K >= transformer._FUSED_DECODE_MIN_PAIRS
    assert fused == (batch == 9 or (batch == 2 and K >= 4))
    for seg in (stacked, per_layer):
        out = transformer._attention_einsum(cfg, jnp.asarray(q)[:, None], [seg], qp, window)
        np.testing.assert_allclose(np.asarray(out)[:, 0], ref, rtol=2e-5, atol=2e-5, err_msg=str(seg.k_transposed))
    if batch > 1:
        assert not np.any(np.asarray(out)[-1])


@pytest.mark.skipif(kernels._compiler() is None, reason="no C++ compiler to build the CPU kernel")
@pytest.mark.parametrize(
    "batch,heads,kv_heads,head_dim,slots,window,softcap",
    [
        (9, 4, 2, 16, 13, None, None),  # tiny_llama's shapes
        (3, 9, 3, 64, 176, None, None),  # SmolLM2's heads, 11 full vectors of slots
        (2, 5, 1, 32, 37, 7, 30.0),  # 5 query heads per kv head (blocks of 3 and 2), window, cap
        (4, 4, 4, 48, 64, 20, None),  # one query head per kv head, head_dim of 3 vectors
        (1, 8, 2, 16, 5, None, 50.0),  # fewer slots than one vector
    ],
)
def test_cpu_kernel_matches_numpy(batch, heads, kv_heads, head_dim, slots, window, softcap):
    """clipo_jax.kernels.decode_attention through the model's attention (cfg.cpu_decode_kernel),
    against numpy in float64: masks (left padding, empty slots, a window, a row with no key), the
    tanh cap, and head counts that exercise every block size of the kernel."""
    assert kernels.available(), kernels.unavailable_reason()
    cfg = PRESETS["tiny_llama"].replace(
        n_heads=heads, n_kv_heads=kv_heads, head_dim=head_dim, attn_logit_softcap=softcap, cpu_decode_kernel=True
    )
    rng = np.random.default_rng(slots)
    q, k, v, k_pos, q_pos = _random_step(rng, batch, heads, kv_heads, head_dim, slots, empty_row=batch > 2)
    window = window or int(np.iinfo(np.int32).max)
    ref = _numpy_attention(q, k, v, k_pos, q_pos, cfg.scale, window, softcap)
    seg = transformer.Segment(jnp.asarray(k.swapaxes(2, 3)), jnp.asarray(v), jnp.asarray(k_pos), k_transposed=True)
    attend = jax.jit(
        lambda q, k, v, kp, qp: transformer._attention_einsum(cfg, q, [seg._replace(k=k, v=v, pos=kp)], qp, window)
    )
    args = (jnp.asarray(q)[:, None], seg.k, seg.v, seg.pos, jnp.asarray(q_pos)[:, None])
    assert kernels.TARGET in attend.lower(*args).as_text()  # the kernel, not XLA's fusions
    out = np.asarray(attend(*args))[:, 0]
    np.testing.assert_allclose(out, ref, rtol=2e-5, atol=2e-5)
    xla = transformer._attention_einsum(
        cfg.replace(cpu_decode_kernel=False), jnp.asarray(q)[:, None], [seg], jnp.asarray(q_pos)[:, None], window
    )
    np.testing.assert_allclose(out, np.asarray(xla)[:, 0], rtol=1e-5, atol=1e-6)
    if batch > 2:
        assert not np.any(out[-1])


def test_cpu_kernel_needs_head_dim_in_vectors():
    with pytest.raises(Exception, match="multiple of 16"):
        PRESETS["tiny_llama"].replace(head_dim=24, cpu_decode_kernel=True)


def test_cpu_kernel_propagates_nan_and_checks_its_output_shape():
    """A NaN key in an allowed slot makes the output NaN, as XLA's path does (a clamp in the
    kernel's exp once turned it into a finite weight of e^88 and a plausible, wrong output); a
    masked NaN slot changes nothing. A direct call with the wrong output shape is an error, not
    an out-of-bounds write."""
    assert kernels.available(), kernels.unavailable_reason()
    B, K, G, D, S = 2, 1, 1, 16, 4
    q = jnp.ones((B, K, G, D), jnp.float32)
    k = np.ones((B, K, D, S), np.float32)
    k[0, 0, 3, 2] = np.nan  # row 0: slot 2 is allowed (position 2 <= 3)
    k[1, 0, 3, 3] = np.nan  # row 1: slot 3 is masked (empty slot)
    v = jnp.asarray(np.arange(B * S * D, dtype=np.float32).reshape(B, K, S, D))
    k_pos = jnp.asarray([[0, 1, 2, 3], [0, 1, 2, -1]], jnp.int32)
    q_pos = jnp.asarray([3, 2], jnp.int32)
    out = np.asarray(kernels.decode_attention(q, jnp.asarray(k), v, k_pos, q_pos, 1 << 30, scale=0.25))
    assert np.isnan(out[0]).all()
    assert np.isfinite(out[1]).all()
    with pytest.raises(Exception, match="inconsistent shapes"):
        call = jax.ffi.ffi_call(kernels.TARGET, jax.ShapeDtypeStruct((1, 1, 1, D), jnp.float32))
        window = jnp.asarray([1 << 30], jnp.int32)
        jax.block_until_ready(
            call(q, jnp.asarray(k), v, k_pos, q_pos, window, scale=np.float32(0.25), softcap=np.float32(0.0))
        )
