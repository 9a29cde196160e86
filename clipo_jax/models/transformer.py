"""The decoder-only transformer: Llama / Qwen2 / Gemma3 from one config.

The model is a Flax NNX module (`Transformer`) whose parameters are stacked over layers;
its computation lives in pure functions over the parameter pytree (`forward`,
`token_logprobs`) so jitted code only ever sees pytrees (`nnx.split` at the boundary).
Layers run under `jax.lax.scan`, so compile time does not grow with depth.

Parameter tree (L = n_layers, D = d_model, H/K = query/kv heads, hd = head_dim, F = d_ff):
  embed [V, D]; final_norm [D]; lm_head [D, V] (untied only)
  layers: attn_norm [L, D], wq [L, D, H*hd], wk/wv [L, D, K*hd], wo [L, H*hd, D],
          (bq [L, H*hd], bk/bv [L, K*hd]), (q_norm/k_norm [L, hd]), (post_attn_norm [L, D]),
          mlp_norm [L, D], (post_mlp_norm [L, D]), w_gate/w_up [L, D, F], w_down [L, F, D]
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from clipo_jax import kernels
from clipo_jax.models.config import ATTENTION_IMPLS, ModelConfig
from clipo_jax.parallel import constrain

Params = dict[str, Any]


# --------------------------------------------------------------------------- parameters
def param_logical_axes(cfg: ModelConfig) -> Params:
    """Logical axis names for every parameter (mapped to the mesh by parallel.LOGICAL_RULES)."""
    layers = {
        "attn_norm": ("layers", "norm"),
        "wq": ("layers", "embed", "heads"),
        "wk": ("layers", "embed", "kv_heads"),
        "wv": ("layers", "embed", "kv_heads"),
        "wo": ("layers", "heads", "embed"),
        "mlp_norm": ("layers", "norm"),
        "w_gate": ("layers", "embed", "mlp"),
        "w_up": ("layers", "embed", "mlp"),
        "w_down": ("layers", "mlp", "embed"),
    }
    if cfg.qkv_bias:
        layers.update(bq=("layers", "heads"), bk=("layers", "kv_heads"), bv=("layers", "kv_heads"))
    if cfg.qk_norm:
        layers.update(q_norm=("layers", "head_dim"), k_norm=("layers", "head_dim"))
    if cfg.post_norms:
        layers.update(post_attn_norm=("layers", "norm"), post_mlp_norm=("layers", "norm"))
    axes = {"embed": ("vocab", "embed"), "final_norm": ("norm",), "layers": layers}
    if not cfg.tie_embeddings:
        axes["lm_head"] = ("embed", "vocab")
    return axes


def rollout_logical_axes(cfg: ModelConfig) -> Params:
    """`param_logical_axes` without the FSDP split of d_model ('embed'): the layout of the rollout's
    weight copy, whole on every device of a tensor-parallel group (Sampler(replicate_weights=True))."""
    drop = lambda axes: tuple(None if a == "embed" else a for a in axes)
    return jax.tree.map(drop, param_logical_axes(cfg), is_leaf=lambda x: isinstance(x, tuple))


def param_shapes(cfg: ModelConfig) -> Params:
    L, D, F, hd = cfg.n_layers, cfg.d_model, cfg.d_ff, cfg.head_dim
    Hq, Hk = cfg.n_heads * hd, cfg.n_kv_heads * hd
    layers = {
        "attn_norm": (L, D),
        "wq": (L, D, Hq),
        "wk": (L, D, Hk),
        "wv": (L, D, Hk),
        "wo": (L, Hq, D),
        "mlp_norm": (L, D),
        "w_gate": (L, D, F),
        "w_up": (L, D, F),
        "w_down": (L, F, D),
    }
    if cfg.qkv_bias:
        layers.update(bq=(L, Hq), bk=(L, Hk), bv=(L, Hk))
    if cfg.qk_norm:
        layers.update(q_norm=(L, hd), k_norm=(L, hd))
    if cfg.post_norms:
        layers.update(post_attn_norm=(L, D), post_mlp_norm=(L, D))
    shapes = {"embed": (cfg.vocab_size, D), "final_norm": (D,), "layers": layers}
    if not cfg.tie_embeddings:
        shapes["lm_head"] = (D, cfg.vocab_size)
    return shapes


def init_params(cfg: ModelConfig, rng: jax.Array, std: float = 0.02) -> Params:
    """Random init: normal(std) matrices, unit norm scales, small random biases."""
    shapes = param_shapes(cfg)
    flat, treedef = jax.tree.flatten_with_path(shapes, is_leaf=lambda x: isinstance(x, tuple))
    keys = jax.random.split(rng, len(flat))
    dtype = jnp.dtype(cfg.param_dtype)
    leaves = []
    for (path, shape), key in zip(flat, keys):
        name = path[-1].key
        if name.endswith("norm"):
            leaves.append(jnp.ones(shape, dtype))
        elif name in ("bq", "bk", "bv"):
            leaves.append(std * jax.random.normal(key, shape, dtype))
        else:
            leaves.append(std * jax.random.normal(key, shape, dtype))
    return jax.tree.unflatten(treedef, leaves)


# --------------------------------------------------------------------------- building blocks
def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """RMSNorm in float32 (both reference families normalise in float32)."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (y * scale.astype(jnp.float32)).astype(x.dtype)


def rope(x: jax.Array, positions: jax.Array, theta: jax.Array | float) -> jax.Array:
    """Rotary embedding, half-split ("rotate_half") layout. x: [B, T, N, hd]; positions: [B, T]."""
    hd = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / hd))
    ang = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, hd/2]
    cos = jnp.cos(ang)[:, :, None, :]
    sin = jnp.sin(ang)[:, :, None, :]
    x32 = x.astype(jnp.float32)
    x1, x2 = x32[..., : hd // 2], x32[..., hd // 2 :]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def _act(cfg: ModelConfig, x):
    if cfg.activation == "silu":
        return jax.nn.silu(x)
    return jax.nn.gelu(x, approximate=True)


class KVCache(NamedTuple):
    """Per-layer keys/values plus the position of every slot (-1 = empty).

    k, v: [L, B, K, S, hd] stacked over layers (head-major so attention reads each head's keys
    contiguously with no transpose), or, for the unrolled layer loop (`unstack_layers`), tuples of
    L per-layer buffers: keys transposed, [B, K, hd, S], values [B, K, S, hd]; pos: [B, S] int32.
    With the slot axis last, a decode step's q.k is a sum over head_dim of rows that run along
    the slots, one fused reduction (see `_attention_einsum`); over [S, hd] keys XLA:CPU lowers it
    to one small single-threaded dot per (row, kv head), 3 output columns each. The fused form is
    1.2-1.4x faster at batch 8-32 (experiments/bench_decode_attention.py) but still runs mostly
    on one core: XLA:CPU gives the reduction to YNNPACK. With `ModelConfig.cpu_decode_kernel`
    (the sampler's CPU default) the step goes to `clipo_jax.kernels.decode_attention`, which
    reads this layout and shares the (row, kv head) pairs out over every core.
    """

    k: Any
    v: Any
    pos: jax.Array

    @staticmethod
    def logical_axes(per_layer: bool = False):
        kv = ("batch", "kv_head", "cache_seq", "head_dim")
        if per_layer:
            return KVCache(k=("batch", "kv_head", "head_dim", "cache_seq"), v=kv, pos=("batch", "cache_seq"))
        return KVCache(k=("layers",) + kv, v=("layers",) + kv, pos=("batch", "cache_seq"))

    def batch_axes(self) -> "KVCache":
        """The batch axis of every buffer, in the cache's own structure (0 for per-layer [B, K, S, hd]
        buffers and pos [B, S], 1 for stacked [L, B, ...]): for jax.tree.map over rows."""
        per_layer = isinstance(self.k, tuple)
        kv = tuple(0 for _ in self.k) if per_layer else 1
        return KVCache(kv, kv, 0)


def init_cache(cfg: ModelConfig, batch: int, length: int, dtype=None, per_layer: bool = False) -> KVCache:
    dtype = jnp.dtype(dtype or cfg.dtype)
    pos = jnp.full((batch, length), -1, jnp.int32)
    if per_layer:
        k_shape = (batch, cfg.n_kv_heads, cfg.head_dim, length)
        v_shape = (batch, cfg.n_kv_heads, length, cfg.head_dim)
        return KVCache(
            tuple(jnp.zeros(k_shape, dtype) for _ in range(cfg.n_layers)),
            tuple(jnp.zeros(v_shape, dtype) for _ in range(cfg.n_layers)),
            pos,
        )
    shape = (cfg.n_layers, batch, cfg.n_kv_heads, length, cfg.head_dim)
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), pos)


def extend_cache(cache: KVCache, n: int, before: int = 0) -> KVCache:
    """The cache with n more empty slots at the end (e.g. a prompt-length prefill cache made room
    for the decode steps: the prefill then attends over the prompt only, not the empty slots) and
    `before` at the start (a left-padded prompt's cache moved to a longer padded length)."""

    def pad(x, slot_axis):
        widths = [(0, 0)] * x.ndim
        widths[slot_axis] = (before, n)
        return jnp.pad(x, widths)

    if isinstance(cache.k, (list, tuple)):  # per-layer: keys [B, K, hd, S], values [B, K, S, hd]
        k, v = tuple(pad(a, -1) for a in cache.k), tuple(pad(a, -2) for a in cache.v)
    else:
        k, v = pad(cache.k, -2), pad(cache.v, -2)
    return KVCache(k, v, jnp.pad(cache.pos, ((0, 0), (before, n)), constant_values=-1))


def compute_dtype_weights(params: Params, cfg: ModelConfig) -> Params:
    """The parameters as the forward pass reads them: matrices, embeddings and biases cast to the
    compute dtype (every use casts them so: the outputs are unchanged), norm scales as stored
    (they are read in float32). A bfloat16 rollout copy is half a float32 one: small enough to
    replicate on every device, so decode steps read local weights instead of all-gathering
    FSDP shards every token (see Sampler(replicate_weights=True))."""
    dt = jnp.dtype(cfg.dtype)

    def cast(path, x):
        name = path[-1].key if hasattr(path[-1], "key") else ""
        return x if name.endswith("norm") else x.astype(dt)

    return jax.tree_util.tree_map_with_path(cast, params)


def unstack_layers(params: Params) -> Params:
    """The same parameters with `layers` as a list of L per-layer dicts instead of [L, ...] stacks.

    `forward` then runs the layers as an unrolled Python loop over separate buffers. XLA:CPU
    copies every dynamic slice a layer scan takes (each layer's weights, and its K/V cache slice
    when the cache is stacked), which was ~40% of a SmolLM2 decode step at batch 32; the
    unrolled loop reads the buffers in place. Costs one copy of the layer weights and a compile
    time that grows with depth, so the sampler uses it on CPU (`Sampler(unroll_layers=...)`) and
    the trainer keeps the scan.
    """
    layers = params["layers"]
    if isinstance(layers, (list, tuple)):
        return params
    n = jax.tree.leaves(layers)[0].shape[0]
    return {**params, "layers": [jax.tree.map(lambda a: a[l], layers) for l in range(n)]}


DENSE_WEIGHTS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")


def pack_dense_weights(params: Params, cfg: ModelConfig) -> Params:
    """Unstacked float32 parameters (`unstack_layers`) with every layer matrix and the LM head
    (the embedding's transpose when tied, as `lm_head`) in `kernels.pack_dense`'s panels, for
    `kernels.dense`: the CPU sampler's weights (`Sampler(cpu_dense_kernel=...)`). A matrix whose
    column count is not a multiple of `kernels.LANES` stays as it is (XLA's matmul). Each packed
    matrix replaces its unstacked copy: no more memory than `unstack_layers`, plus the tied head.
    """
    if jnp.dtype(cfg.dtype) != jnp.float32:
        raise ValueError(f"pack_dense_weights: the packed kernel computes in float32, not {cfg.dtype}")
    if not isinstance(params["layers"], (list, tuple)):
        raise ValueError("pack_dense_weights: unstack the layers first (unstack_layers)")
    pack = lambda w: kernels.pack_dense(w) if kernels.can_pack(w) else w
    layers = [{k: pack(w) if k in DENSE_WEIGHTS else w for k, w in lp.items()} for lp in params["layers"]]
    head = params["embed"].T if cfg.tie_embeddings else params["lm_head"]
    packed = {**params, "layers": layers}
    if kernels.can_pack(head):
        packed["lm_head"] = kernels.pack_dense(head)
    return packed


class Segment(NamedTuple):
    """Keys and values attended to, with each key's position (-1 = empty slot). k: [B, K, S, hd],
    or [B, K, hd, S] with k_transposed (the per-layer decode cache); v: [B, K, S, hd]; pos: [B, S]."""

    k: jax.Array
    v: jax.Array
    pos: jax.Array
    k_transposed: bool = False


_FUSED_DECODE_MIN_PAIRS = 8  # (row, kv head) pairs from which a decode step uses the fused form


def _attention_einsum(cfg: ModelConfig, q, segments, q_pos, window):
    """q: [B, T, H, hd]; segments: `Segment`s attended jointly (one softmax over all their keys),
    e.g. the read-only cache and the new tokens."""
    B, T, H, hd = q.shape
    K = segments[0].v.shape[1]
    q = q.reshape(B, T, K, H // K, hd)
    qp = q_pos[:, None, None, :, None]
    # One query per row over transposed keys (a decode step): the dots as a multiply and a sum
    # over head_dim / slots (float32 products, as the einsums' preferred_element_type): XLA:CPU
    # runs the batched einsums as one small single-threaded dot per (row, kv head), the fusions
    # faster from 8 such pairs up (SmolLM2 shapes, bench_decode_attention); below, the dots win.
    decode = T == 1 and B * K >= _FUSED_DECODE_MIN_PAIRS and all(s.k_transposed for s in segments)
    if T == 1 and cfg.cpu_decode_kernel and len(segments) == 1 and segments[0].k_transposed:
        # the same arithmetic, its (row, kv head) pairs shared out over every core
        seg = segments[0]
        out = kernels.decode_attention(
            q[:, 0], seg.k, seg.v, seg.pos, q_pos[:, 0], window, scale=cfg.scale, softcap=cfg.attn_logit_softcap
        )
        return out.astype(seg.v.dtype).reshape(B, T, H * hd)
    all_logits, all_allowed = [], []
    for seg in segments:
        if decode:
            prod = q[:, 0, :, :, :, None].astype(jnp.float32) * seg.k[:, :, None].astype(jnp.float32)
            logits = jnp.sum(prod, axis=-2)[:, :, :, None, :]  # [B, K, G, 1, S]
        else:
            spec = "btkgd,bkds->bkgts" if seg.k_transposed else "btkgd,bksd->bkgts"
            logits = jnp.einsum(spec, q, seg.k, preferred_element_type=jnp.float32)
        logits = logits * cfg.scale
        if cfg.attn_logit_softcap is not None:
            logits = jnp.tanh(logits / cfg.attn_logit_softcap) * cfg.attn_logit_softcap
        kp = seg.pos[:, None, None, None, :]
        allowed = (kp >= 0) & (kp <= qp) & ((qp - kp) < window)
        all_logits.append(jnp.where(allowed, logits, -1e30))
        all_allowed.append(allowed)
    logits = jnp.concatenate(all_logits, axis=-1)
    allowed = jnp.concatenate(all_allowed, axis=-1)
    probs = jax.nn.softmax(logits, axis=-1)
    # Fully-masked query rows (padding) would average garbage; zero them explicitly.
    probs = jnp.where(jnp.any(allowed, axis=-1, keepdims=True), probs, 0.0)
    out, start = 0.0, 0
    for seg in segments:
        S = seg.v.shape[2]
        p = probs[..., start : start + S]
        if decode:
            prod = p[:, :, :, 0, :, None] * seg.v[:, :, None].astype(jnp.float32)
            out = out + jnp.sum(prod, axis=-2)[:, :, :, None, :].astype(seg.v.dtype)  # [B, K, G, 1, hd]
        else:
            # [b,k] batches of a plain [g*t, s] @ [s, d] matmul; the small output is transposed after
            out = out + jnp.einsum("bkgts,bksd->bkgtd", p.astype(seg.v.dtype), seg.v)
        start += S
    return out.transpose(0, 3, 1, 2, 4).reshape(B, T, H * hd)


def _attention_dot_product(cfg: ModelConfig, q, segments, q_pos, window, implementation=None):
    """`_attention_einsum`'s contract computed by jax.nn.dot_product_attention.

    The mask is built from positions, not indices: with left padding, the read-only cache plus the
    new tokens as separate segments, and left-extended caches, a key's slot index is not its
    position, so the API's index-based is_causal / local_window_size / *_seq_lengths cannot
    express it. The boolean mask is [B, 1, T, S] (shared by all heads), never per head.
    """
    B, T, H, hd = q.shape
    # the API attends over one key axis of [B, S, K, hd] keys: lay the segments side by side
    k = jnp.concatenate([s.k.swapaxes(2, 3) if s.k_transposed else s.k for s in segments], axis=2)
    v = jnp.concatenate([s.v for s in segments], axis=2)
    k_pos = jnp.concatenate([s.pos for s in segments], axis=1)
    kp = k_pos[:, None, None, :]
    qp = q_pos[:, None, :, None]
    allowed = (kp >= 0) & (kp <= qp) & ((qp - kp) < window)  # [B, 1, T, S]
    # GQA: the API broadcasts K kv-heads over H query heads itself (BSKH keys with H % K == 0).
    # implementation=None: JAX picks the kernel; jax 0.10 always picks XLA's (docs/parts/attention.md).
    # "cudnn" (attention_impl="cudnn"): cuDNN's fused flash attention, GPU only, bf16/fp16 inputs.
    out = jax.nn.dot_product_attention(
        q, k.swapaxes(1, 2), v.swapaxes(1, 2), mask=allowed, scale=cfg.scale, implementation=implementation
    )
    # A fully-masked query row gets uniform weights from the API; zero it like the einsum path.
    out = jnp.where(jnp.any(allowed, axis=-1)[:, 0, :, None, None], out, jnp.zeros((), out.dtype))
    return out.reshape(B, T, H * hd)


# ModelConfig.attention_impl -> the function (config.ATTENTION_IMPLS lists the same names).
_ATTENTION = {
    "einsum": _attention_einsum,
    "dot_product": _attention_dot_product,
    "cudnn": lambda *a: _attention_dot_product(*a, implementation="cudnn"),
}
assert tuple(_ATTENTION) == ATTENTION_IMPLS


def _attention(cfg: ModelConfig, q, segments, q_pos, window):
    return _ATTENTION[cfg.attention_impl](cfg, q, segments, q_pos, window)


def _dense(x, w, dt):
    """[..., D] @ [D, F] in the compute dtype dt: a `kernels.PackedDense` weight (the CPU sampler's
    copy, `pack_dense_weights`) goes to `kernels.dense`; otherwise one 2-D matmul, because XLA:CPU
    computes the weight gradient of the 3-D einsum (contracting batch and seq together) ~1.5-2x
    slower than the same product on [B*T, D]."""
    if isinstance(w, kernels.PackedDense):
        return kernels.dense(x, w).astype(dt)
    w = w.astype(dt)
    return (x.reshape(-1, x.shape[-1]) @ w).reshape(x.shape[:-1] + (w.shape[-1],))


def _layer_constants(cfg: ModelConfig) -> tuple[list[float], list[int]]:
    """Per-layer RoPE base and attention window (global layers: unbounded)."""
    big = int(np.iinfo(np.int32).max)
    theta = [
        cfg.rope_theta if cfg.layer_is_global(l) else (cfg.rope_local_theta or cfg.rope_theta)
        for l in range(cfg.n_layers)
    ]
    window = [big if cfg.layer_is_global(l) else cfg.sliding_window for l in range(cfg.n_layers)]
    return theta, window


def _block(cfg: ModelConfig, lp: Params, x, q_pos, theta, window, key_values):
    """One transformer layer over new tokens x [B, T, D] at RoPE positions q_pos.

    key_values(k, v) takes the new tokens' keys and values [B, K, T, hd] and returns (segments,
    out): the `Segment`s to attend to (see `_attention`) and whatever the caller wants back
    (e.g. the updated cache layer). Returns (x, out)."""
    dt = jnp.dtype(cfg.dtype)
    B, T, _ = x.shape
    h = rms_norm(x, lp["attn_norm"], cfg.norm_eps)
    q = _dense(h, lp["wq"], dt)
    k = _dense(h, lp["wk"], dt)
    v = _dense(h, lp["wv"], dt)
    if cfg.qkv_bias:
        q, k, v = q + lp["bq"].astype(dt), k + lp["bk"].astype(dt), v + lp["bv"].astype(dt)
    q = q.reshape(B, T, cfg.n_heads, cfg.head_dim)
    k = k.reshape(B, T, cfg.n_kv_heads, cfg.head_dim)
    v = v.reshape(B, T, cfg.n_kv_heads, cfg.head_dim).swapaxes(1, 2)
    if cfg.qk_norm:
        q = rms_norm(q, lp["q_norm"], cfg.norm_eps)
        k = rms_norm(k, lp["k_norm"], cfg.norm_eps)
    q = rope(q, q_pos, theta)
    k = rope(k, q_pos, theta).swapaxes(1, 2)  # [B, K, T, hd]
    segments, out = key_values(k, v)
    attn = _attention(cfg, q, [seg._replace(k=seg.k.astype(dt), v=seg.v.astype(dt)) for seg in segments], q_pos, window)
    attn = _dense(attn, lp["wo"], dt)
    if cfg.post_norms:
        attn = rms_norm(attn, lp["post_attn_norm"], cfg.norm_eps)
    x = x + attn
    h = rms_norm(x, lp["mlp_norm"], cfg.norm_eps)
    gate = _dense(h, lp["w_gate"], dt)
    up = _dense(h, lp["w_up"], dt)
    mlp = _dense(_act(cfg, gate) * up, lp["w_down"], dt)
    if cfg.post_norms:
        mlp = rms_norm(mlp, lp["post_mlp_norm"], cfg.norm_eps)
    x = constrain(x + mlp, ("batch", "seq", "act_embed"))
    return x, out


def positions_from_mask(valid: jax.Array) -> jax.Array:
    """Left- or right-padded [B, T] validity mask -> RoPE positions (0 at the first valid token)."""
    return jnp.maximum(jnp.cumsum(valid.astype(jnp.int32), axis=-1) - 1, 0)


def forward(
    params: Params,
    cfg: ModelConfig,
    tokens: jax.Array,
    valid: jax.Array,
    positions: jax.Array | None = None,
    cache: KVCache | None = None,
    write_index: jax.Array | int = 0,
    remat: bool = False,
):
    """Run the decoder.

    Args:
      tokens: [B, T] int token ids; valid: [B, T] bool (False = padding).
      positions: [B, T] RoPE positions; default from `valid` (cumulative count).
      cache: optional KVCache of length S; the T new keys/values are written at slots
        [write_index, write_index + T) and attention runs over the whole cache. Stacked params
        run as a layer scan with a stacked cache; `unstack_layers` params as an unrolled loop
        with a per-layer cache (`init_cache(per_layer=True)`).
    Returns:
      hidden [B, T, D] after the final norm (what the LM head reads), and the new cache (or None).
    """
    dt = jnp.dtype(cfg.dtype)
    if positions is None:
        positions = positions_from_mask(valid)
    positions = positions.astype(jnp.int32)
    x = jnp.take(params["embed"], tokens, axis=0).astype(dt)
    if cfg.embed_scale:
        x = x * jnp.asarray(cfg.d_model**0.5, dt)
    x = constrain(x, ("batch", "seq", "act_embed"))
    q_pos_masked = jnp.where(valid, positions, -1)

    block = functools.partial(_block, cfg)
    if remat:
        block = jax.checkpoint(block, prevent_cse=False, static_argnums=(5,))
    at = (0, 0, write_index, 0)
    new_pos = None if cache is None else jax.lax.dynamic_update_slice(cache.pos, q_pos_masked, (0, write_index))

    if isinstance(params["layers"], (list, tuple)):  # unrolled over per-layer buffers
        if cache is not None and not isinstance(cache.k, (list, tuple)):
            raise ValueError("forward: unstacked layers need a per-layer KV cache (init_cache(per_layer=True))")
        ks, vs = [], []
        for l, (lp, theta, window) in enumerate(zip(params["layers"], *_layer_constants(cfg))):
            if cache is None:
                kv = lambda k, v: ([Segment(k, v, q_pos_masked)], None)
            else:
                # write this layer's new keys/values first and attend over the updated buffer: nothing
                # reads the old buffer after the write, so XLA updates it in place (no per-step copy)
                def kv(k, v, k_c=cache.k[l], v_c=cache.v[l]):
                    k_at = (0, 0, 0, write_index)  # keys [B, K, hd, S]
                    k_c = jax.lax.dynamic_update_slice(k_c, k.swapaxes(2, 3).astype(k_c.dtype), k_at)
                    v_c = jax.lax.dynamic_update_slice(v_c, v.astype(v_c.dtype), at)
                    return [Segment(k_c, v_c, new_pos, k_transposed=True)], (k_c, v_c)

            x, out = block(lp, x, positions, theta, window, kv)
            if cache is not None:
                ks.append(out[0])
                vs.append(out[1])
        new_k, new_v = tuple(ks), tuple(vs)
    else:
        if cache is not None and isinstance(cache.k, (list, tuple)):
            raise ValueError("forward: a per-layer KV cache needs unstacked layers (unstack_layers)")
        thetas, windows = _layer_constants(cfg)
        thetas, windows = jnp.asarray(thetas, jnp.float32), jnp.asarray(windows, jnp.int32)
        if cache is not None:
            # The stacked cache is read-only inside the layer scan (slots being written now count as
            # empty); the new keys/values come out of the scan as [L, B, K, T, hd] and are written once
            # below, in place, instead of copying every layer's whole cache slice through the scan.
            ctx_pos = jax.lax.dynamic_update_slice(cache.pos, jnp.full(tokens.shape, -1, jnp.int32), (0, write_index))

        def body(x, layer):
            lp, theta, window, k_c, v_c = layer
            if cache is None:
                kv = lambda k, v: ([Segment(k, v, q_pos_masked)], None)
            else:
                kv = lambda k, v: ([Segment(k_c, v_c, ctx_pos), Segment(k, v, q_pos_masked)], (k, v))
            return block(lp, x, positions, theta, window, kv)

        ctx = (None, None) if cache is None else (cache.k, cache.v)
        x, new_kv = jax.lax.scan(body, x, (params["layers"], thetas, windows) + ctx)
        if cache is not None:
            new_k = jax.lax.dynamic_update_slice(cache.k, new_kv[0].astype(cache.k.dtype), (0,) + at)
            new_v = jax.lax.dynamic_update_slice(cache.v, new_kv[1].astype(cache.v.dtype), (0,) + at)
    hidden = rms_norm(x, params["final_norm"], cfg.norm_eps)
    new_cache = None
    if cache is not None:
        new_cache = KVCache(new_k, new_v, new_pos)
    return hidden, new_cache


def logits_from_hidden(params: Params, cfg: ModelConfig, hidden: jax.Array) -> jax.Array:
    """[..., D] -> float32 logits [..., V] (V = cfg.output_vocab when set: the padded rows are left out)."""
    dt = jnp.dtype(cfg.dtype)
    if isinstance(params.get("lm_head"), kernels.PackedDense):  # tied or not (`pack_dense_weights`)
        logits = kernels.dense(hidden, params["lm_head"])
    else:
        w = params["embed"].T if cfg.tie_embeddings else params["lm_head"]
        logits = jnp.einsum("...d,dv->...v", hidden.astype(dt), w.astype(dt), preferred_element_type=jnp.float32)
    if cfg.output_vocab is not None and cfg.output_vocab < logits.shape[-1]:
        logits = logits[..., : cfg.output_vocab]
    if cfg.final_logit_softcap is not None:
        logits = jnp.tanh(logits / cfg.final_logit_softcap) * cfg.final_logit_softcap
    return logits


def forward_logits(params: Params, cfg: ModelConfig, tokens, valid, positions=None):
    """Convenience: logits [B, T, V] float32 and final hidden [B, T, D]."""
    hidden, _ = forward(params, cfg, tokens, valid, positions)
    return logits_from_hidden(params, cfg, hidden), hidden


def token_logprobs(
    params: Params,
    cfg: ModelConfig,
    tokens: jax.Array,
    valid: jax.Array,
    targets: jax.Array,
    temperature: float = 1.0,
    with_entropy: bool = False,
    remat: bool = False,
    chunk: int = 128,
):
    """log p(targets[b, t] | tokens[b, :t+1]) in float32, [B, T] (and token entropy if asked).

    The [B, T, V] logits are produced chunk by chunk over the sequence so peak memory is
    [B, chunk, V], not [B, T, V] (a 49k-150k vocabulary dominates memory otherwise).
    """
    hidden, _ = forward(params, cfg, tokens, valid, remat=remat)
    B, T, D = hidden.shape
    c = min(chunk, T)
    pad = (-T) % c
    h = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    tg = jnp.pad(targets, ((0, 0), (0, pad)))
    n = (T + pad) // c
    h = h.reshape(B, n, c, D).swapaxes(0, 1)
    tg = tg.reshape(B, n, c).swapaxes(0, 1)

    @jax.checkpoint
    def one(args):
        hc, tc = args
        logits = logits_from_hidden(params, cfg, hc) / temperature
        logp_all = jax.nn.log_softmax(logits, axis=-1)
        lp = jnp.take_along_axis(logp_all, tc[..., None], axis=-1)[..., 0]
        ent = -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)
        return lp, ent

    lp, ent = jax.lax.map(one, (h, tg))
    lp = lp.swapaxes(0, 1).reshape(B, -1)[:, :T]
    ent = ent.swapaxes(0, 1).reshape(B, -1)[:, :T]
    if with_entropy:
        return lp, ent, hidden
    return lp


def attention_memory_report(
    cfg: ModelConfig, batch: int, seq: int, impls=None, grad: bool = False, remat: bool = False
) -> dict[str, dict[str, int]]:
    """XLA's compiled memory (bytes) of one `forward` over [batch, seq] tokens, per attention impl.

    grad=True compiles the gradient of a scalar of the hidden states w.r.t. the params instead
    (what a training step holds). Nothing is allocated: params and tokens are abstract shapes and
    the numbers are the buffer assignment for the default backend. For experiments/plan_scale.py.
    """
    params = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    tokens = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
    valid = jax.ShapeDtypeStruct((batch, seq), jnp.bool_)
    from clipo_jax.models.config import available_attention_impls

    report = {}
    for impl in impls or available_attention_impls(jax.default_backend()):
        if impl == "cudnn" and cfg.dtype not in ("bfloat16", "float16"):
            continue  # cuDNN's kernel takes half-precision inputs only
        c = cfg.replace(attention_impl=impl)

        def fn(p, t, m, c=c):
            return forward(p, c, t, m, remat=remat)[0]

        if grad:
            fn = jax.grad(lambda p, t, m, f=fn: jnp.mean(jnp.square(f(p, t, m).astype(jnp.float32))))
        stats = jax.jit(fn).lower(params, tokens, valid).compile().memory_analysis()
        report[impl] = {
            "temp_bytes": int(stats.temp_size_in_bytes),
            "argument_bytes": int(stats.argument_size_in_bytes),
            "output_bytes": int(stats.output_size_in_bytes),
        }
    return report


# --------------------------------------------------------------------------- NNX module
class Transformer(nnx.Module):
    """NNX container for the parameters; the math is in the pure functions above.

    `graphdef, state = nnx.split(model)` gives a pytree for jit; `model.params()` gives the
    plain dict the pure functions take. Each nnx.Param carries its logical axes as metadata.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs | None = None, params: Params | None = None):
        self.cfg = cfg
        if params is None:
            params = init_params(cfg, (rngs or nnx.Rngs(0)).params())
        axes = param_logical_axes(cfg)
        self.weights = nnx.data(
            jax.tree.map(
                lambda p, ax: nnx.Param(p, logical_axes=ax),
                params,
                axes,
                is_leaf=lambda x: isinstance(x, tuple) and all(isinstance(a, str) for a in x),
            )
        )

    def params(self) -> Params:
        return jax.tree.map(lambda p: p[...], self.weights, is_leaf=lambda x: isinstance(x, nnx.Param))

    def __call__(self, tokens, valid, positions=None):
        return forward_logits(self.params(), self.cfg, tokens, valid, positions)
