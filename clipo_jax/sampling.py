"""Jit-compiled generation with a KV cache.

`prefill` (pure, jittable) runs left-padded prompts into a prompt-length cache; `decode` runs
`while_loop`s of single-token steps that stop early when every row has hit a stop token,
growing the cache in phases so early steps attend over fewer empty slots; `generate` is the
two in one function. Each prompt is prefilled once and its cache repeated for its n samples.
Besides tokens the decode returns, at no extra forward pass:
  * the per-token log-probs of the sampled tokens under the temperature-scaled policy
    (before top-k / top-p truncation: the same distribution the trainer recomputes), and
  * CLIPO's representation: the masked mean over generated tokens of the final hidden
    state (after the final norm) that the LM head read to produce each token.

`Sampler` wraps them for host code: buckets the batch to powers of two and the prompt length to
a quarter-octave grid so the number of compilations is bounded (prefill: one per (rows, length
bucket); decode: one per (batch bucket, length bucket)), prefills large batches in
length-sorted row groups each at its own length bucket, shards the batch over the mesh, picks
the layer loop (unrolled on CPU, see `generate`), and strips padding rows. With `chunk_prompts`
it samples a large batch (the paper's 512 prompts x 16 samples) in chunks of prompts, each a
separate call at the whole batch's prompt length bucket, concatenated on the host.

Sampling noise: by default one Gumbel array [B, V] is drawn per decode step from one key, so a
row's sample depends on its place in the call (and, with jax_threefry_partitionable off, on the
batch size): a chunk sampled on its own would change it. `SamplingConfig.row_keys` draws each
row's noise from its own key, fold_in(fold_in(rng, row_offset + row), step): a row's sample then
depends on its global row index only, whatever call (or chunk) it is sampled in, which chunked
sampling needs. It costs
one key derivation per row per decode step, and it draws different samples than the shared key.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from clipo_jax import kernels, parallel
from clipo_jax.models.config import ModelConfig
from clipo_jax.models.transformer import (
    KVCache,
    Params,
    compute_dtype_weights,
    extend_cache,
    forward,
    init_cache,
    logits_from_hidden,
    pack_dense_weights,
    rollout_logical_axes,
    unstack_layers,
)

POOLINGS = ("decode", "prefill_and_decode")
# The narrowest vector path (kernels.vector_bits) on which each CPU kernel beats XLA, so the
# sampler's auto mode turns it on: decode attention needs AVX-512 (its 16-float vectors spill on
# AVX2); see docs/results.md for the dense kernel's AVX2 measurement.
KERNEL_MIN_VECTOR_BITS = {"cpu_decode_kernel": 512, "cpu_dense_kernel": 512}


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 64
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    n_samples: int = 1  # responses per prompt; a prompt's samples are contiguous rows
    stop_ids: tuple[int, ...] = ()
    pad_id: int = 0
    # pooled_hidden: "decode" (the CLIPO authors' code) sums the final hidden states of the decode
    # steps (the states that produced response tokens 2..L) over the length L; "prefill_and_decode"
    # also adds the prefill state at the last prompt token (the one that produced token 1).
    pooling: str = "decode"
    # row_keys: row r of a call draws its Gumbel noise at decode step i from the key
    # fold_in(fold_in(rng, row_offset + r), i) instead of one [B, V] draw from fold_in(rng, i), so
    # its sample depends on its global row index only, not on the call's size or padding rows: the
    # outputs of `Sampler(...)(..., chunk_prompts=k)` equal one call's. Cost: one key derivation per
    # row per decode step. Off by default: every stored result was drawn with the shared key
    # (different samples). No effect at temperature 0.
    row_keys: bool = False

    def __post_init__(self):
        if self.pooling not in POOLINGS:
            raise ValueError(f"SamplingConfig.pooling must be one of {list(POOLINGS)}, got {self.pooling!r}")
        if self.max_new_tokens <= 0:
            raise ValueError(f"SamplingConfig.max_new_tokens must be positive, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"SamplingConfig.temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"SamplingConfig.top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"SamplingConfig.top_p must be in (0, 1], got {self.top_p}")
        # a list would make the config unhashable, and it keys the jit cache
        object.__setattr__(self, "stop_ids", tuple(int(i) for i in self.stop_ids))
        if self.n_samples < 1:
            raise ValueError(f"SamplingConfig.n_samples must be >= 1, got {self.n_samples}")


class SampleOutput(NamedTuple):
    """Rows are prompt-major: row = prompt * n_samples + sample.

    prompt_tokens [B, Tp] (left-padded), prompt_mask [B, Tp], tokens [B, N] (pad after stop),
    response_mask [B, N] (True up to and including the stop token), lengths [B],
    logprobs [B, N] float32 (0 where masked), pooled_hidden [B, D] float32 (see SamplingConfig.pooling),
    truncated [B] (no stop token within max_new_tokens).
    """

    prompt_tokens: jax.Array
    prompt_mask: jax.Array
    tokens: jax.Array
    response_mask: jax.Array
    lengths: jax.Array
    logprobs: jax.Array
    pooled_hidden: jax.Array
    truncated: jax.Array


def _filter_logits(logits: jax.Array, top_k: int, top_p: float) -> jax.Array:
    """Mask logits outside the top-k set and the top-p nucleus with -inf. logits [B, V]."""
    neg = jnp.finfo(logits.dtype).min
    if top_k and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, neg, logits)
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # keep the smallest prefix whose mass reaches top_p (the token crossing it included)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        keep = mass_before < top_p
        threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, neg, logits)
    return logits


def argmax_last(x: jax.Array) -> jax.Array:
    """jnp.argmax over the last axis (first index of the maximum; NaN counts as the maximum) as
    two plain reductions: XLA:CPU lowers argmax to a variadic (value, index) reduce that takes
    3.2 ms on a [32, 49152] row block, this 0.6 ms."""
    x = jnp.where(jnp.isnan(x), jnp.inf, x)
    top = jnp.max(x, axis=-1, keepdims=True)
    iota = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
    return jnp.min(jnp.where(x == top, iota, x.shape[-1]), axis=-1)


def gumbel_noise(rng, shape: tuple[int, int], row_keys: bool = False) -> jax.Array:
    """Gumbel noise [B, V] float32: one draw from the key `rng`, or with row_keys one draw of [V]
    per row from the row's own key (`rng`: B keys)."""
    if row_keys:
        return jax.vmap(lambda k: jax.random.gumbel(k, shape[1:], jnp.float32))(rng)
    return jax.random.gumbel(rng, shape, jnp.float32)


def sample_token(rng, logits: jax.Array, scfg: SamplingConfig):
    """-> (token [B], log-prob [B] under the temperature-scaled, untruncated distribution).

    rng: one key, or with scfg.row_keys one key per row ([B] keys); unused at temperature 0."""
    if scfg.temperature == 0.0:
        # the argmax's log-prob is max - logsumexp: one shared max, no [B, V] log-softmax written
        top = jnp.max(logits, axis=-1)
        token = argmax_last(logits)
        lse = top + jnp.log(jnp.sum(jnp.exp(logits - top[:, None]), axis=-1))
        return token.astype(jnp.int32), top - lse
    else:
        scaled = logits / scfg.temperature
        logp = jax.nn.log_softmax(scaled, axis=-1)
        # Gumbel-max, as jax.random.categorical, with the faster argmax
        gumbel = gumbel_noise(rng, scaled.shape, scfg.row_keys)
        token = argmax_last(_filter_logits(scaled, scfg.top_k, scfg.top_p) + gumbel)
    return token.astype(jnp.int32), jnp.take_along_axis(logp, token[:, None], axis=-1)[:, 0]


def row_rngs(rng, row_offset, rows: int):
    """The per-row keys of a call's rows (`SamplingConfig.row_keys`): fold_in(rng, row_offset + r)."""
    idx = parallel.constrain(jnp.asarray(row_offset, jnp.int32) + jnp.arange(rows, dtype=jnp.int32), ("batch",))
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(rng, idx)


def step_rngs(rng, i, scfg: SamplingConfig):
    """The key(s) of decode step i: fold_in(rng, i), or per row with row_keys (rng: the row keys)."""
    if scfg.row_keys and scfg.temperature > 0.0:
        return jax.vmap(jax.random.fold_in, in_axes=(0, None))(rng, i)
    return jax.random.fold_in(rng, i)


TRACE_COUNT = {"generate": 0, "prefill": 0, "decode": 0}  # incremented at trace time only: counts compilations


def _constrain_cache(cache: KVCache) -> KVCache:
    per_layer = isinstance(cache.k, tuple)
    return KVCache(
        *(
            tuple(parallel.constrain(x, ax) for x in c) if isinstance(c, tuple) else parallel.constrain(c, ax)
            for c, ax in zip(cache, KVCache.logical_axes(per_layer))
        )
    )


def prefill(
    params: Params, prompt_tokens: jax.Array, prompt_mask: jax.Array, *, cfg: ModelConfig, unroll_layers: bool = False
) -> tuple[KVCache, jax.Array]:
    """Run left-padded prompts [B, Tp] through the model into a prompt-length KV cache (attention
    over the prompt only). -> (cache with Tp slots, final hidden state of each row's last token
    [B, D] float32: what the LM head reads for the first new token)."""
    TRACE_COUNT["prefill"] += 1
    prompt_tokens = parallel.constrain(prompt_tokens, ("batch", None))
    prompt_mask = parallel.constrain(prompt_mask.astype(bool), ("batch", None))
    B, Tp = prompt_tokens.shape
    if unroll_layers:
        params = unstack_layers(params)
    cache = _constrain_cache(init_cache(cfg, B, Tp, per_layer=unroll_layers))
    hidden, cache = forward(params, cfg, prompt_tokens, prompt_mask, cache=cache, write_index=0)
    # left padding: the last column is every row's last token
    return _constrain_cache(cache), hidden[:, -1].astype(jnp.float32)


def cache_growth_sizes(prompt_len: int, n_new: int, steps_per_octave: int) -> list[int]:
    """Cache lengths the decode loop runs at: it starts with room for the first few tokens and
    grows the cache (one copy) at each point of the `bucket` grid, up to prompt_len + n_new, so
    attention reads only slots that are or will soon be filled; steps_per_octave = 0: one phase
    at the full length. Each size is one more compiled copy of the decode step."""
    total = prompt_len + n_new
    if steps_per_octave <= 0:
        return [total]
    sizes, size = [], prompt_len
    while size < total:
        size = min(bucket(size + 1, 1, steps_per_octave), total)
        sizes.append(size)
    return sizes


def decode(
    params: Params,
    cache: KVCache,
    last_hidden: jax.Array,
    prompt_tokens: jax.Array,
    prompt_mask: jax.Array,
    rng: jax.Array,
    row_offset: jax.Array | int = 0,
    *,
    cfg: ModelConfig,
    scfg: SamplingConfig,
    unroll_layers: bool = False,
    cache_steps_per_octave: int = 0,
) -> SampleOutput:
    """Sample n_samples continuations of each prefilled prompt (`prefill`'s cache and last hidden
    state, one row per prompt: the prompt is run once and its cache repeated for its samples).

    row_offset: with scfg.row_keys, the index of this call's first row in the whole batch (a traced
      int32: chunks share one compilation); row r draws from fold_in(rng, row_offset + r).
    cache_steps_per_octave: grow the cache in phases (`cache_growth_sizes`) instead of allocating
      prompt + max_new_tokens slots up front: the attention of early steps reads fewer empty slots.
    """
    TRACE_COUNT["decode"] += 1
    n, N = scfg.n_samples, scfg.max_new_tokens
    rep = lambda x: parallel.constrain(jnp.repeat(x, n, axis=0), ("batch",) + (None,) * (x.ndim - 1))
    prompt_tokens, prompt_mask = rep(prompt_tokens), rep(prompt_mask.astype(bool))
    h = rep(last_hidden)
    if n > 1:
        cache = jax.tree.map(lambda x, axis: jnp.repeat(x, n, axis=axis), cache, cache.batch_axes())
    cache = _constrain_cache(cache)
    if unroll_layers:
        params = unstack_layers(params)
    B, Tp = prompt_tokens.shape
    next_pos = jnp.sum(prompt_mask, axis=-1).astype(jnp.int32)
    stop_ids = jnp.asarray(scfg.stop_ids or (-1,), jnp.int32)
    if scfg.row_keys and scfg.temperature > 0.0:
        rng = row_rngs(rng, row_offset, B)  # once; each step then folds in its index per row

    class Carry(NamedTuple):
        i: jax.Array
        cache: KVCache
        h: jax.Array
        done: jax.Array
        tokens: jax.Array
        logprobs: jax.Array
        pooled: jax.Array

    def body(c: Carry):
        logits = logits_from_hidden(params, cfg, c.h)
        token, logp = sample_token(step_rngs(rng, c.i, scfg), logits, scfg)
        alive = ~c.done
        token = jnp.where(alive, token, scfg.pad_id)
        tokens = c.tokens.at[:, c.i].set(token)
        logprobs = c.logprobs.at[:, c.i].set(jnp.where(alive, logp, 0.0))
        pooled_now = alive if scfg.pooling == "prefill_and_decode" else alive & (c.i > 0)
        pooled = c.pooled + jnp.where(pooled_now[:, None], c.h, 0.0)
        done = c.done | jnp.isin(token, stop_ids)
        hidden, cache = forward(
            params,
            cfg,
            token[:, None],
            jnp.ones((B, 1), bool),
            positions=(next_pos + c.i)[:, None],
            cache=c.cache,
            write_index=Tp + c.i,
        )
        return Carry(c.i + 1, cache, hidden[:, 0].astype(jnp.float32), done, tokens, logprobs, pooled)

    c = Carry(
        jnp.int32(0),
        cache,
        h,
        jnp.zeros((B,), bool),
        jnp.full((B, N), scfg.pad_id, jnp.int32),
        jnp.zeros((B, N), jnp.float32),
        jnp.zeros((B, h.shape[-1]), jnp.float32),
    )
    for size in cache_growth_sizes(Tp, N, cache_steps_per_octave):
        # a phase's last step writes slot size - 1; later phases skip at once when every row is done
        c = c._replace(cache=_constrain_cache(extend_cache(c.cache, size - c.cache.pos.shape[1])))
        c = jax.lax.while_loop(lambda c, end=size - Tp: (c.i < end) & ~jnp.all(c.done), body, c)
    out = c
    # Response mask: every step before (and including) the first stop token.
    is_stop = jnp.isin(out.tokens, stop_ids) & (jnp.arange(N)[None] < out.i)
    before_stop = jnp.cumsum(is_stop, axis=-1) - is_stop  # stops strictly before t
    response_mask = (before_stop == 0) & (jnp.arange(N)[None] < out.i)
    lengths = jnp.sum(response_mask, axis=-1).astype(jnp.int32)
    pooled = out.pooled / jnp.maximum(lengths, 1)[:, None]
    truncated = ~jnp.any(is_stop, axis=-1)
    return SampleOutput(prompt_tokens, prompt_mask, out.tokens, response_mask, lengths, out.logprobs, pooled, truncated)


def generate(
    params: Params,
    prompt_tokens: jax.Array,
    prompt_mask: jax.Array,
    rng: jax.Array,
    row_offset: jax.Array | int = 0,
    *,
    cfg: ModelConfig,
    scfg: SamplingConfig,
    unroll_layers: bool = False,
    cache_steps_per_octave: int = 0,
) -> SampleOutput:
    """Sample n_samples continuations of each left-padded prompt: `prefill` then `decode`.

    prompt_tokens: [P, Tp] int32, left-padded; prompt_mask: [P, Tp] bool.
    unroll_layers: run the layers as an unrolled loop over per-layer weight and KV-cache buffers
      (`transformer.unstack_layers`) instead of a layer scan: same results; on CPU each decode step
      no longer copies every layer's weights and cache slice, for one copy of the weights per call
      and a longer compile.
    row_offset, cache_steps_per_octave: see `decode`.
    """
    TRACE_COUNT["generate"] += 1
    if unroll_layers:
        params = unstack_layers(params)  # once, for both parts
    cache, h = prefill(params, prompt_tokens, prompt_mask, cfg=cfg, unroll_layers=unroll_layers)
    return decode(
        params,
        cache,
        h,
        prompt_tokens,
        prompt_mask,
        rng,
        row_offset,
        cfg=cfg,
        scfg=scfg,
        unroll_layers=unroll_layers,
        cache_steps_per_octave=cache_steps_per_octave,
    )


def response_text(tokenizer, out: SampleOutput, row: int, stop_ids) -> str:
    """Decoded response of one row: its generated tokens without the stop token(s)."""
    ids = [int(t) for t in out.tokens[row, : int(out.lengths[row])] if int(t) not in stop_ids]
    return tokenizer.decode(ids)


def bucket(n: int, minimum: int = 8, steps_per_octave: int = 1) -> int:
    """Smallest size >= max(n, minimum) on a geometric grid that bounds the number of compiled
    shapes: powers of two by default; with steps_per_octave = s, also the s - 1 evenly spaced
    sizes inside each octave (s = 4: ..., 64, 80, 96, 112, 128, 160, ...), so padding wastes at
    most 1/s of the work instead of up to half of it, for s compilations per octave."""
    n = max(n, minimum, 1)
    top = 1 << (n - 1).bit_length()  # next power of two >= n
    step = max(1, -(-(top // 2) // max(steps_per_octave, 1)))
    return min(top, top // 2 + -(-(n - top // 2) // step) * step)


def left_pad(prompts: Sequence[Sequence[int]], length: int, pad_id: int, rows: int | None = None):
    """Token lists -> left-padded [rows, length] int32 tokens and bool mask (rows >= len(prompts))."""
    rows = rows or len(prompts)
    tokens = np.full((rows, length), pad_id, np.int32)
    mask = np.zeros((rows, length), bool)
    for i, p in enumerate(prompts):
        if len(p) > length:
            raise ValueError(f"prompt {i} has {len(p)} tokens, more than the length bucket {length}")
        if len(p):
            tokens[i, length - len(p) :] = p
            mask[i, length - len(p) :] = True
    # Padding rows get one dummy token so no row is fully masked.
    for i in range(len(prompts), rows):
        tokens[i, -1] = pad_id
        mask[i, -1] = True
    return tokens, mask


class Sampler:
    """Host-side driver: bucketing, sharding, one compiled function per shape bucket."""

    def __init__(
        self,
        cfg: ModelConfig,
        mesh=None,
        min_len_bucket: int = 16,
        min_batch_bucket: int = 1,
        unroll_layers: bool | None = None,
        len_steps_per_octave: int = 4,
        cache_steps_per_octave: int = 4,
        prefill_group_rows: int = 8,
        replicate_weights: bool = False,
        cpu_decode_kernel: bool | None = None,
        cpu_dense_kernel: bool | None = None,
    ):
        """Prompts are left-padded to `length_bucket` (`bucket` with len_steps_per_octave) and the
        batch to a power of two.

        unroll_layers: see `generate`; None = on for the CPU backend, where the layer scan's per-step
          weight and cache copies cost most (SmolLM2-135M, batch 32: 67 -> 49 ms per decode step).
        cache_steps_per_octave: the decode loop grows its KV cache in phases (`cache_growth_sizes`);
          0 = one phase at the full length. More phases read fewer empty slots, each one compiles
          another copy of the decode step.
        prefill_group_rows: batches of at least twice this many prompts are prefilled in groups of
          this many rows sorted by prompt length, each padded to its own length bucket instead of
          the longest prompt's (0 = one group). The decode step then runs over the whole batch.
        replicate_weights: sample from a copy of the weights in the compute dtype
          (`transformer.compute_dtype_weights`: the same outputs), made once per call, whole on
          every device except for the mesh's tensor axis, which still splits heads, MLP and vocab
          (`transformer.rollout_logical_axes`). With FSDP-sharded parameters XLA otherwise
          all-gathers every layer's weights inside every decode step (experiments/plan_scale.py:
          ~400 s of link time per Track I step on 8 H100s); the copy costs 1 / tensor of the
          compute-dtype weights on each device during the rollout.
        cpu_decode_kernel: decode steps attend through `clipo_jax.kernels.decode_attention`, which
          shares the (row, kv head) pairs out over every core (XLA:CPU runs that arithmetic on
          one). None = on where it applies: the CPU backend, the unrolled layer loop, at most one
          device in the mesh, float32 compute, head_dim a multiple of 16, the kernel built
          (`kernels.available()`) for AVX-512 (`kernels.vector_bits()` at least
          `KERNEL_MIN_VECTOR_BITS`; on AVX2 the kernel is correct but slower than XLA's fusions).
          True where it cannot apply is an error.
        cpu_dense_kernel: the layer matrices and the LM head are packed in column panels once per
          call (`transformer.pack_dense_weights`, in place of the unrolled loop's per-layer copy)
          and every matmul of prefill and decode goes through `clipo_jax.kernels.dense`, which
          streams the panels ahead of the arithmetic over every core (XLA:CPU's dots read the
          weights in place well below the FMA peak). None = on where it applies: the CPU backend,
          the unrolled layer loop, at most one device in the mesh, float32 compute, the kernels
          built for a vector path of at least `KERNEL_MIN_VECTOR_BITS`. True where it cannot
          apply is an error.
        """
        if prefill_group_rows < 0 or cache_steps_per_octave < 0:
            raise ValueError(
                f"Sampler: prefill_group_rows ({prefill_group_rows}) and cache_steps_per_octave "
                f"({cache_steps_per_octave}) must be >= 0"
            )
        self.unroll_layers = jax.default_backend() == "cpu" if unroll_layers is None else unroll_layers
        self.cpu_decode_kernel = self._use_cpu_kernel("cpu_decode_kernel", cfg, mesh, cpu_decode_kernel)
        self.cpu_dense_kernel = self._use_cpu_kernel("cpu_dense_kernel", cfg, mesh, cpu_dense_kernel)
        cfg = cfg.replace(cpu_decode_kernel=self.cpu_decode_kernel)
        self.cfg = cfg
        self.mesh = mesh
        self.len_steps_per_octave = len_steps_per_octave
        self.cache_steps_per_octave = cache_steps_per_octave
        self.min_len_bucket = min_len_bucket
        batch_devices = 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]
        self.min_batch_bucket = max(min_batch_bucket, batch_devices)
        # a group's rows split over the batch devices like the whole batch does
        self.prefill_group_rows = -(-prefill_group_rows // batch_devices) * batch_devices if prefill_group_rows else 0
        self._prefill = jax.jit(lambda p, t, m: prefill(p, t, m, cfg=cfg, unroll_layers=self.unroll_layers))
        self._left_extend = jax.jit(lambda c, n: extend_cache(c, 0, before=n), static_argnums=1)
        if self.cpu_dense_kernel:
            self._unstack = jax.jit(lambda p: pack_dense_weights(unstack_layers(p), cfg))
        else:
            self._unstack = jax.jit(unstack_layers)
        self.replicate_weights = replicate_weights
        self._replicated = None  # jitted cast + replicate, built on first use
        self._fns: dict = {}

    def _use_cpu_kernel(self, flag: str, cfg: ModelConfig, mesh, wanted: bool | None) -> bool:
        """Whether the CPU kernel behind `flag` (cpu_decode_kernel or cpu_dense_kernel) runs."""
        blockers = [
            why
            for why, blocks in (
                (f"the {jax.default_backend()} backend", jax.default_backend() != "cpu"),
                ("the layer scan (unroll_layers=False)", not self.unroll_layers),
                (f"a mesh of {mesh.size if mesh is not None else 0} devices", mesh is not None and mesh.size > 1),
                (f"compute dtype {cfg.dtype}", cfg.dtype != "float32"),
                (
                    f"head_dim {cfg.head_dim} (not a multiple of {kernels.LANES})",
                    flag == "cpu_decode_kernel" and cfg.head_dim % kernels.LANES,
                ),
            )
            if blocks
        ]
        if wanted is False or (wanted is None and blockers):
            return False
        if wanted is None and kernels.vector_bits() < KERNEL_MIN_VECTOR_BITS[flag]:
            # correct on a narrower vector path, but slower than XLA there (kernels.vector_bits)
            return False
        if blockers:
            raise ValueError(f"Sampler({flag}=True) does not apply with {', '.join(blockers)}")
        if not kernels.available():
            if wanted:
                raise ValueError(f"Sampler({flag}=True): {kernels.unavailable_reason()}")
            return False
        return True

    def length_bucket(self, n: int) -> int:
        """The padded prompt length for a longest prompt of n tokens."""
        return bucket(n, self.min_len_bucket, self.len_steps_per_octave)

    def _fn(self, scfg: SamplingConfig):
        """The jitted decode: (params, group caches, group last hiddens, row order or None, tokens,
        mask, rng, row offset) -> SampleOutput; the groups are concatenated and put back in row
        order first."""
        if scfg not in self._fns:

            def fn(params, caches, hiddens, inverse, tokens, mask, rng, row_offset):
                axes = caches[0].batch_axes()
                cache = jax.tree.map(lambda axis, *xs: jnp.concatenate(xs, axis=axis), axes, *caches)
                h = jnp.concatenate(hiddens, axis=0)
                if inverse is not None:
                    cache = jax.tree.map(lambda x, axis: jnp.take(x, inverse, axis=axis), cache, axes)
                    h = h[inverse]
                return decode(
                    params,
                    cache,
                    h,
                    tokens,
                    mask,
                    rng,
                    row_offset,
                    cfg=self.cfg,
                    scfg=scfg,
                    unroll_layers=self.unroll_layers,
                    cache_steps_per_octave=self.cache_steps_per_octave,
                )

            self._fns[scfg] = jax.jit(fn)
        return self._fns[scfg]

    def row_groups(self, lengths: Sequence[int], rows: int) -> list[np.ndarray]:
        """Row indices of each prefill group: the prompts by length (stable), then the padding rows
        (indices >= len(lengths)), in groups of prefill_group_rows; one group of all rows in order
        when the batch is too small to split."""
        g = self.prefill_group_rows
        if not g or rows < 2 * g or rows % g:
            return [np.arange(rows)]
        order = np.concatenate([np.argsort(np.asarray(lengths), kind="stable"), np.arange(len(lengths), rows)])
        return np.split(order, rows // g)

    def __call__(
        self,
        params: Params,
        prompts: Sequence[Sequence[int]],
        rng: jax.Array,
        scfg: SamplingConfig,
        chunk_prompts: int | None = None,
    ) -> SampleOutput:
        """prompts: token lists. Returns numpy arrays with len(prompts) * n_samples rows.

        chunk_prompts: sample at most this many prompts per accelerator call (None or 0 = all in
          one call): chunks in order, each at the whole batch's prompt length bucket (the same left
          padding as one call) and with the row offset of its first row, outputs concatenated.
          At temperature > 0 this needs scfg.row_keys, which makes the outputs those of one call
          (up to float rounding of the different batch shapes)."""
        P = len(prompts)
        if P == 0:
            raise ValueError("Sampler called with no prompts")
        if chunk_prompts is not None and chunk_prompts < 0:
            raise ValueError(f"Sampler: chunk_prompts must be >= 0 (0 or None = one call), got {chunk_prompts}")
        chunk = chunk_prompts or P
        if chunk < P and scfg.temperature > 0.0 and not scfg.row_keys:
            raise ValueError(
                "Sampler: chunk_prompts needs SamplingConfig(row_keys=True) at temperature > 0 "
                "(the shared-key noise depends on the batch, so chunks would change the samples)"
            )
        length = self.length_bucket(max(len(p) for p in prompts))
        with parallel.use_mesh(self.mesh):
            if self.mesh is not None:
                rng = parallel.put_global(rng, parallel.named_sharding(self.mesh, None))
            if self.replicate_weights:
                params = self._replicate(params)
            if self.unroll_layers:  # one per-layer copy of the weights for every prefill group and the decode
                params = self._unstack(params)
            outs = [
                self._sample(params, prompts[start : start + chunk], rng, scfg, length, start * scfg.n_samples)
                for start in range(0, P, chunk)
            ]
        if len(outs) == 1:
            return outs[0]
        return SampleOutput(*(np.concatenate(xs, axis=0) for xs in zip(*outs)))

    def _replicate(self, params: Params) -> Params:
        """The compute-dtype weights, split only over the mesh's tensor axis (just cast, without a mesh)."""
        if self._replicated is None:
            cast = lambda p: compute_dtype_weights(p, self.cfg)
            if self.mesh is None:
                self._replicated = jax.jit(cast)
            else:
                shardings = parallel.tree_shardings(self.mesh, rollout_logical_axes(self.cfg), params)
                self._replicated = jax.jit(cast, out_shardings=shardings)
        return self._replicated(params)

    def _sample(
        self, params: Params, prompts: Sequence[Sequence[int]], rng, scfg: SamplingConfig, length: int, row_offset: int
    ) -> SampleOutput:
        """One call (inside the mesh context, params already unstacked when unrolled): prompts
        left-padded to `length`, rows drawing from row_offset on. -> numpy, padding rows dropped."""
        P = len(prompts)
        rows = bucket(P, 1)
        # the repeated batch (rows * n) must split over the batch mesh axes
        while (rows * scfg.n_samples) % self.min_batch_bucket:
            rows *= 2
        tokens, mask = left_pad(prompts, length, scfg.pad_id, rows)
        groups = self.row_groups([len(p) for p in prompts], rows)
        put = lambda tree, n_rows: tree
        offset = np.int32(row_offset)
        if self.mesh is not None:

            def put(tree, n_rows):
                sharding = (
                    parallel.batch_sharding(self.mesh, 2, n_rows)
                    if n_rows % self.min_batch_bucket == 0
                    else parallel.named_sharding(self.mesh, None)
                )
                return parallel.put_global(tree, sharding)

            offset = parallel.put_global(offset, parallel.named_sharding(self.mesh, None))
        caches, hiddens = [], []
        for idx in groups:
            if len(groups) == 1:
                g_tokens, g_mask = tokens, mask
            else:  # the group's own length bucket; its cache is then left-extended to the batch's
                real = [prompts[i] for i in idx if i < P]  # empty for a group of padding rows only
                g_tokens, g_mask = left_pad(
                    real, self.length_bucket(max((len(p) for p in real), default=1)), scfg.pad_id, len(idx)
                )
            cache, h = self._prefill(params, *put((g_tokens, g_mask), len(idx)))
            if g_tokens.shape[1] < length:
                cache = self._left_extend(cache, length - g_tokens.shape[1])
            caches.append(cache)
            hiddens.append(h)
        inverse = None if len(groups) == 1 else np.argsort(np.concatenate(groups))
        tokens, mask = put((tokens, mask), rows)
        out = self._fn(scfg)(params, tuple(caches), tuple(hiddens), inverse, tokens, mask, rng, offset)
        keep = P * scfg.n_samples
        return SampleOutput(*(x[:keep] for x in parallel.to_host(tuple(out))))
