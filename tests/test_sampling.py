"""The KV-cache sampler against a naive full-recompute reference."""

from dataclasses import replace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clipo_jax import kernels, sampling
from clipo_jax.models import transformer
from clipo_jax.models.config import PRESETS

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="module", params=["tiny_llama", "tiny_gemma3"])
def model(request):
    cfg = PRESETS[request.param]
    params = transformer.init_params(cfg, jax.random.key(0), std=0.5)  # peaky logits
    return cfg, params


def _naive_greedy(cfg, params, prompt, n_new):
    """Recompute the whole sequence every step; return tokens, logprobs, hidden states used."""
    # Right-padded to one fixed length so a single compilation serves every step (causal
    # attention: padding after the last real token cannot change it).
    total = 32
    fwd = jax.jit(lambda p, t, m: transformer.forward_logits(p, cfg, t, m))
    seq = list(prompt)
    toks, lps, hs = [], [], []
    for _ in range(n_new):
        t = np.zeros((1, total), np.int32)
        t[0, : len(seq)] = seq
        m = np.arange(total)[None] < len(seq)
        logits, hidden = fwd(params, jnp.asarray(t), jnp.asarray(m))
        last = np.asarray(logits[0, len(seq) - 1], np.float64)
        tok = int(np.argmax(last))
        lp = last - np.log(np.sum(np.exp(last - last.max()))) - last.max()
        toks.append(tok)
        lps.append(lp[tok])
        hs.append(np.asarray(hidden[0, len(seq) - 1]))
        seq.append(tok)
    return np.array(toks), np.array(lps), np.array(hs)


def test_greedy_matches_naive_recompute(model):
    cfg, params = model
    prompts = [[5, 9, 17, 3, 44, 2, 8], [7, 1], [100, 101, 102, 103]]  # different lengths (left-padded)
    scfg = sampling.SamplingConfig(max_new_tokens=10, temperature=0.0)
    out = sampling.Sampler(cfg)(params, prompts, jax.random.key(1), scfg)
    for i, p in enumerate(prompts):
        toks, lps, hs = _naive_greedy(cfg, params, p, 10)
        np.testing.assert_array_equal(out.tokens[i], toks)
        np.testing.assert_allclose(out.logprobs[i], lps, atol=1e-4)
        # hs[k] is the final hidden state that produced token k; hs[0] is the prefill state
        np.testing.assert_allclose(out.pooled_hidden[i], hs[1:].sum(0) / len(hs), atol=1e-4)
        assert out.lengths[i] == 10 and out.truncated[i]
    with_prefill = sampling.Sampler(cfg)(
        params, prompts, jax.random.key(1), replace(scfg, pooling="prefill_and_decode")
    )
    for i, p in enumerate(prompts):
        _, _, hs = _naive_greedy(cfg, params, p, 10)
        np.testing.assert_allclose(with_prefill.pooled_hidden[i], hs.mean(0), atol=1e-4)
        np.testing.assert_array_equal(with_prefill.tokens[i], out.tokens[i])


def test_sampling_config_checks_top_k_and_takes_a_list_of_stop_ids(model):
    with pytest.raises(ValueError, match="top_k must be >= 0"):
        sampling.SamplingConfig(4, top_k=-1)
    cfg, params = model
    scfg = sampling.SamplingConfig(4, temperature=0.0, stop_ids=[3, 7])
    assert scfg.stop_ids == (3, 7) and scfg == sampling.SamplingConfig(4, temperature=0.0, stop_ids=(3, 7))
    out = sampling.Sampler(cfg)(params, [[5, 9, 17, 3]], jax.random.key(0), scfg)  # hashable: jit-cache key
    assert out.tokens.shape == (1, 4)


def test_pooling_option_is_checked():
    with pytest.raises(ValueError, match="pooling"):
        sampling.SamplingConfig(pooling="mean")


def test_stop_tokens_mask_and_pooling(model):
    cfg, params = model
    prompts = [[5, 9, 17], [7, 1, 2, 3]]
    scfg = sampling.SamplingConfig(max_new_tokens=12, temperature=0.0)
    free = sampling.Sampler(cfg)(params, prompts, jax.random.key(0), scfg)
    stop = int(free.tokens[0, 3])  # make the 4th greedy token of row 0 a stop token
    scfg_stop = sampling.SamplingConfig(max_new_tokens=12, temperature=0.0, stop_ids=(stop,), pad_id=0)
    out = sampling.Sampler(cfg)(params, prompts, jax.random.key(0), scfg_stop)
    for i in range(2):
        ref = list(free.tokens[i])
        first = ref.index(stop) if stop in ref else None
        L = 12 if first is None else first + 1
        assert out.lengths[i] == L
        np.testing.assert_array_equal(out.tokens[i, :L], free.tokens[i, :L])
        assert np.all(out.tokens[i, L:] == 0)
        assert out.response_mask[i].sum() == L and out.response_mask[i, :L].all()
        assert np.all(out.logprobs[i, L:] == 0)
        _, _, hs = _naive_greedy(cfg, params, prompts[i], L)
        np.testing.assert_allclose(out.pooled_hidden[i], hs[1:].sum(0) / L, atol=1e-4)
        assert bool(out.truncated[i]) == (first is None)


def test_n_samples_contiguous_and_reproducible(model):
    cfg, params = model
    prompts = [[5, 9, 17], [7, 1]]
    scfg = sampling.SamplingConfig(max_new_tokens=6, temperature=4.0, n_samples=4)
    s = sampling.Sampler(cfg)
    a = s(params, prompts, jax.random.key(3), scfg)
    b = s(params, prompts, jax.random.key(3), scfg)
    c = s(params, prompts, jax.random.key(4), scfg)
    assert a.tokens.shape == (8, 6)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert not np.array_equal(a.tokens, c.tokens)
    # rows 0-3 share prompt 0, rows 4-7 prompt 1
    for r in range(8):
        p = prompts[r // 4]
        assert list(a.prompt_tokens[r][a.prompt_mask[r]]) == p


def test_top_k_one_is_greedy(model):
    cfg, params = model
    prompts = [[5, 9, 17], [7, 1]]
    g = sampling.Sampler(cfg)(params, prompts, jax.random.key(0), sampling.SamplingConfig(8, temperature=0.0))
    k1 = sampling.Sampler(cfg)(params, prompts, jax.random.key(9), sampling.SamplingConfig(8, temperature=0.7, top_k=1))
    np.testing.assert_array_equal(g.tokens, k1.tokens)


def test_sampled_logprobs_match_trainer_recompute(model):
    cfg, params = model
    prompts = [[5, 9, 17, 3], [7, 1]]
    T = 0.8
    out = sampling.Sampler(cfg)(
        params, prompts, jax.random.key(5), sampling.SamplingConfig(7, temperature=T, n_samples=2)
    )
    full = np.concatenate([out.prompt_tokens, out.tokens], 1)
    valid = np.concatenate([out.prompt_mask, out.response_mask], 1)
    targets = np.roll(full, -1, 1)
    lp = np.asarray(
        transformer.token_logprobs(
            params, cfg, jnp.asarray(full), jnp.asarray(valid), jnp.asarray(targets), temperature=T
        )
    )
    Tp = out.prompt_tokens.shape[1]
    recomputed = lp[:, Tp - 1 : Tp - 1 + 7]
    np.testing.assert_allclose(recomputed * out.response_mask, out.logprobs, atol=1e-4)


def test_output_vocab_never_samples_the_padded_rows_and_scores_like_the_trainer(model):
    """An embedding table padded past the tokenizer (ModelConfig.output_vocab): no sampled id is
    >= output_vocab, and the sampler's log-probs are those of a softmax over the kept columns, as
    a numpy reference from the full-width logits and the trainer's recompute both give."""
    cfg, params = model
    prompts = [[5, 9, 17, 3], [7, 1]]
    scfg = sampling.SamplingConfig(6, temperature=1.0, n_samples=8)
    wide_out = sampling.Sampler(cfg)(params, prompts, jax.random.key(3), scfg)
    keep = int(wide_out.tokens[wide_out.response_mask].max())  # the full table samples id `keep`
    assert keep >= 2
    narrow = cfg.replace(output_vocab=keep)
    out = sampling.Sampler(narrow)(params, prompts, jax.random.key(3), scfg)
    assert (out.tokens[out.response_mask] < keep).all()
    full = np.concatenate([out.prompt_tokens, out.tokens], 1)
    valid = np.concatenate([out.prompt_mask, out.response_mask], 1)
    logits = np.asarray(transformer.forward_logits(params, cfg, jnp.asarray(full), jnp.asarray(valid))[0], np.float64)
    assert logits.shape[-1] == cfg.vocab_size
    kept = logits[..., :keep]
    ref = kept - kept.max(-1, keepdims=True)
    ref = ref - np.log(np.exp(ref).sum(-1, keepdims=True))
    Tp, N = out.prompt_tokens.shape[1], out.tokens.shape[1]
    want = np.take_along_axis(ref[:, Tp - 1 : Tp - 1 + N], out.tokens[..., None].astype(np.int64), -1)[..., 0]
    np.testing.assert_allclose(out.logprobs, want * out.response_mask, atol=1e-4)
    lp = transformer.token_logprobs(
        params, narrow, jnp.asarray(full), jnp.asarray(valid), jnp.asarray(np.roll(full, -1, 1))
    )
    np.testing.assert_allclose(np.asarray(lp)[:, Tp - 1 : Tp - 1 + N] * out.response_mask, out.logprobs, atol=1e-4)


def test_fit_output_vocab_limits_a_padded_table_to_the_tokenizer(tiny):
    from clipo_jax.models.loading import fit_output_vocab
    from clipo_jax.models.tokenizer import TokenizerError

    tok = tiny[1].tokenizer
    cfg = tiny[2]
    assert fit_output_vocab(cfg, tok, "m") == cfg  # the table fits the tokenizer: unchanged
    padded = fit_output_vocab(cfg.replace(vocab_size=tok.vocab_size + 64), tok, "m")
    assert padded.output_vocab == tok.vocab_size and padded.vocab_size == tok.vocab_size + 64
    with pytest.raises(TokenizerError, match="has only"):
        fit_output_vocab(cfg.replace(vocab_size=tok.vocab_size - 1), tok, "m")


def test_top_p_filter_against_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(5, 30)).astype(np.float32) * 3
    for p in (0.1, 0.5, 0.9):
        got = np.asarray(sampling._filter_logits(jnp.asarray(logits), 0, p)) > -1e30
        for row, keep in zip(logits, got):
            order = np.argsort(-row)
            probs = np.exp(row[order] - row.max())
            probs /= probs.sum()
            n_keep = int(np.searchsorted(np.cumsum(probs), p) + 1)
            want = np.zeros(30, bool)
            want[order[:n_keep]] = True
            np.testing.assert_array_equal(keep, want)


def test_one_compilation_per_bucket():
    """The prefill compiles once per (rows, length bucket) and the decode loop once per (batch
    bucket, length bucket), whatever the prompts inside the buckets."""
    cfg = PRESETS["tiny_llama"]
    params = transformer.init_params(cfg, jax.random.key(0))
    s = sampling.Sampler(cfg)
    scfg = sampling.SamplingConfig(max_new_tokens=4, temperature=0.0)
    count = lambda: (sampling.TRACE_COUNT["prefill"], sampling.TRACE_COUNT["decode"])
    p0, d0 = count()
    s(params, [[1, 2, 3]], jax.random.key(0), scfg)  # length bucket 16, batch 1
    s(params, [[1, 2, 3, 4, 5, 6, 7, 8, 9]], jax.random.key(0), scfg)  # same buckets
    s(params, [[1] * 15], jax.random.key(1), scfg)
    assert count() == (p0 + 1, d0 + 1)
    s(params, [[1] * 17], jax.random.key(1), scfg)  # length bucket 20
    s(params, [[1], [2], [3]], jax.random.key(1), scfg)  # batch bucket 4
    s(params, [[1], [2], [3], [4]], jax.random.key(1), scfg)  # still batch bucket 4
    assert count() == (p0 + 3, d0 + 3)


def test_grouped_prefill_compiles_per_group_shape():
    cfg = PRESETS["tiny_llama"]
    params = transformer.init_params(cfg, jax.random.key(0))
    s = sampling.Sampler(cfg, prefill_group_rows=2)
    scfg = sampling.SamplingConfig(max_new_tokens=3, temperature=0.0)
    count = lambda: (sampling.TRACE_COUNT["prefill"], sampling.TRACE_COUNT["decode"])
    p0, d0 = count()
    s(params, [[1] * 3, [2] * 20, [3] * 5, [4] * 18], jax.random.key(0), scfg)  # groups at 16 and 20
    assert count() == (p0 + 2, d0 + 1)
    s(params, [[5] * 19, [6] * 2, [7] * 17, [8] * 9], jax.random.key(0), scfg)  # the same group shapes
    assert count() == (p0 + 2, d0 + 1)
    s(params, [[5] * 19, [6] * 17, [7] * 17, [8] * 18], jax.random.key(0), scfg)  # both groups at 20
    assert count() == (p0 + 2, d0 + 1)


def _assert_same_samples(a, b, atol=1e-4):
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.response_mask, b.response_mask)
    np.testing.assert_array_equal(a.prompt_tokens, b.prompt_tokens)
    np.testing.assert_array_equal(a.prompt_mask, b.prompt_mask)
    np.testing.assert_allclose(a.logprobs, b.logprobs, atol=atol)
    np.testing.assert_allclose(a.pooled_hidden, b.pooled_hidden, atol=atol)


PROMPTS_8 = [
    [5, 9, 17, 3, 44, 2, 8] * 3,
    [7, 1],
    [100, 101, 102, 103],
    [4] * 18,
    [9, 8, 7, 6, 5],
    [11] * 30,
    [3, 1, 4, 1, 5, 9, 2, 6],
    [2, 7],
]


@pytest.mark.parametrize(
    "scfg",
    [
        sampling.SamplingConfig(max_new_tokens=40, temperature=0.0),
        sampling.SamplingConfig(max_new_tokens=40, temperature=0.9, top_k=30, n_samples=3, stop_ids=(3, 5)),
    ],
)
def test_grouped_prefill_and_cache_growth_change_nothing(model, scfg):
    """Length-sorted prefill groups (each at its own length bucket, caches moved back to row order)
    and a decode cache grown in phases give the same samples as one prefill over the whole batch
    and a full-length cache from the start."""
    cfg, params = model
    plain = sampling.Sampler(cfg, prefill_group_rows=0, cache_steps_per_octave=0)
    ref = plain(params, PROMPTS_8, jax.random.key(7), scfg)
    for kw in (
        {"prefill_group_rows": 2},
        {"cache_steps_per_octave": 4},
        {"prefill_group_rows": 4, "cache_steps_per_octave": 1},
    ):
        s = sampling.Sampler(cfg, **kw)
        if "prefill_group_rows" in kw:
            assert len(s.row_groups([len(p) for p in PROMPTS_8], 8)) == 8 // kw["prefill_group_rows"]
        _assert_same_samples(s(params, PROMPTS_8, jax.random.key(7), scfg), ref)
    # the pure generate() (one jit: prefill + decode) is the same computation again
    tokens, mask = sampling.left_pad(PROMPTS_8, plain.length_bucket(30), scfg.pad_id)
    gen = jax.jit(lambda p, t, m, r: sampling.generate(p, t, m, r, cfg=cfg, scfg=scfg, cache_steps_per_octave=2))
    _assert_same_samples(jax.tree.map(np.asarray, gen(params, tokens, mask, jax.random.key(7))), ref)


def test_prefill_groups_of_padding_rows_only(model):
    """5 prompts in a batch bucket of 8 with groups of 2: the last group holds padding rows only;
    the samples equal one prefill over the whole batch."""
    cfg, params = model
    prompts = PROMPTS_8[:5]
    scfg = sampling.SamplingConfig(max_new_tokens=4, temperature=0.0)
    grouped = sampling.Sampler(cfg, prefill_group_rows=2)
    assert any(all(i >= len(prompts) for i in g) for g in grouped.row_groups([len(p) for p in prompts], 8))
    ref = sampling.Sampler(cfg, prefill_group_rows=0)(params, prompts, jax.random.key(3), scfg)
    _assert_same_samples(grouped(params, prompts, jax.random.key(3), scfg), ref)


def test_row_groups_sort_by_length_and_keep_padding_rows_last():
    s = sampling.Sampler(PRESETS["tiny_llama"], prefill_group_rows=2)
    groups = s.row_groups([5, 1, 9, 3, 7], 8)
    np.testing.assert_array_equal(np.concatenate(groups), [1, 3, 0, 4, 2, 5, 6, 7])
    assert [len(g) for g in groups] == [2, 2, 2, 2]
    assert len(s.row_groups([5, 1, 9], 2)) == 1  # fewer than two groups' worth of rows
    assert len(sampling.Sampler(PRESETS["tiny_llama"], prefill_group_rows=0).row_groups([1] * 64, 64)) == 1
    with pytest.raises(ValueError, match="prefill_group_rows"):
        sampling.Sampler(PRESETS["tiny_llama"], prefill_group_rows=-1)


@pytest.mark.parametrize(
    "prompt_len,n_new,steps", [(112, 128, 2), (112, 128, 4), (16, 7, 1), (100, 1000, 0), (5, 1, 3)]
)
def test_cache_growth_sizes(prompt_len, n_new, steps):
    sizes = sampling.cache_growth_sizes(prompt_len, n_new, steps)
    assert sizes[-1] == prompt_len + n_new and sizes == sorted(set(sizes)) and sizes[0] > prompt_len
    if steps == 0:
        assert sizes == [prompt_len + n_new]
    else:  # each size but the last is on the bucket grid; about `steps` phases per octave
        assert all(sampling.bucket(x, 1, steps) == x for x in sizes[:-1])
        octaves = np.log2((prompt_len + n_new) / prompt_len)
        assert len(sizes) <= steps * np.ceil(octaves) + 1


@pytest.mark.parametrize(
    "scfg",
    [
        sampling.SamplingConfig(max_new_tokens=9, temperature=0.0),
        sampling.SamplingConfig(max_new_tokens=9, temperature=0.8, top_k=20, top_p=0.9, n_samples=2, stop_ids=(3,)),
    ],
)
def test_unrolled_layers_match_layer_scan(model, scfg):
    """The unrolled decode loop (per-layer weight and cache buffers) is the same computation as
    the layer scan: same tokens, log-probs and pooled hidden states."""
    cfg, params = model
    prompts = [[5, 9, 17, 3, 44, 2, 8], [7, 1], [100, 101, 102, 103]]
    a = sampling.Sampler(cfg, unroll_layers=True)(params, prompts, jax.random.key(3), scfg)
    b = sampling.Sampler(cfg, unroll_layers=False)(params, prompts, jax.random.key(3), scfg)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.response_mask, b.response_mask)
    np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)
    np.testing.assert_allclose(a.pooled_hidden, b.pooled_hidden, atol=1e-5)


def test_per_layer_cache_keeps_keys_transposed(model):
    """The unrolled path's cache holds keys as [B, K, hd, S] (slot axis last, see KVCache) and
    values as [B, K, S, hd]: the stacked cache's numbers in that layout; extend_cache pads each
    buffer along its own slot axis (empty slots: zeros, position -1)."""
    cfg, params = model
    tokens = jnp.asarray([[0, 0, 5, 9, 17], [7, 1, 2, 3, 4]], jnp.int32)
    mask = jnp.asarray([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], bool)
    stacked, h_stacked = sampling.prefill(params, tokens, mask, cfg=cfg)
    per_layer, h_per_layer = sampling.prefill(params, tokens, mask, cfg=cfg, unroll_layers=True)
    K, hd = cfg.n_kv_heads, cfg.head_dim
    assert len(per_layer.k) == len(per_layer.v) == cfg.n_layers
    for l in range(cfg.n_layers):
        assert per_layer.k[l].shape == (2, K, hd, 5) and per_layer.v[l].shape == (2, K, 5, hd)
        np.testing.assert_allclose(per_layer.k[l], np.swapaxes(stacked.k[l], -1, -2), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(per_layer.v[l], stacked.v[l], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(h_per_layer, h_stacked, rtol=1e-5, atol=1e-5)
    grown = transformer.extend_cache(per_layer, 3, before=2)
    assert grown.k[0].shape == (2, K, hd, 10) and grown.v[0].shape == (2, K, 10, hd)
    np.testing.assert_array_equal(grown.k[1][..., 2:7], per_layer.k[1])
    np.testing.assert_array_equal(grown.v[1][:, :, 2:7], per_layer.v[1])
    assert not np.any(grown.k[1][..., [0, 1, 7, 8, 9]]) and not np.any(grown.v[1][:, :, [0, 1, 7, 8, 9]])
    np.testing.assert_array_equal(grown.pos[:, [0, 1, 7, 8, 9]], -1)
    np.testing.assert_array_equal(grown.pos[:, 2:7], per_layer.pos)


def test_unstacked_layers_need_a_per_layer_cache(model):
    cfg, params = model
    tokens, valid = jnp.ones((1, 4), jnp.int32), jnp.ones((1, 4), bool)
    with pytest.raises(ValueError, match="per-layer KV cache"):
        transformer.forward(
            transformer.unstack_layers(params), cfg, tokens, valid, cache=transformer.init_cache(cfg, 1, 8)
        )
    with pytest.raises(ValueError, match="unstacked layers"):
        transformer.forward(params, cfg, tokens, valid, cache=transformer.init_cache(cfg, 1, 8, per_layer=True))


def test_argmax_last_matches_numpy():
    rng = np.random.default_rng(0)
    x = rng.integers(-3, 4, size=(64, 50)).astype(np.float32)  # many ties: the first index wins
    x[5, 7] = np.inf
    x[9, :] = -np.inf
    x[11, 30] = np.nan  # numpy: a NaN is the maximum
    np.testing.assert_array_equal(np.asarray(sampling.argmax_last(jnp.asarray(x))), np.argmax(x, axis=-1))


@pytest.mark.parametrize("minimum,steps", [(1, 1), (16, 1), (16, 4), (8, 3)])
def test_bucket_grid(minimum, steps):
    sizes = [sampling.bucket(n, minimum, steps) for n in range(1, 1100)]
    assert all(b >= max(n, minimum) for n, b in zip(range(1, 1100), sizes))
    assert sizes == sorted(sizes)  # monotone, so bucket(longest) bounds every shorter batch
    for n, b in zip(range(1, 1100), sizes):
        top = 1 << (max(n, minimum) - 1).bit_length()
        assert b <= top and (b - max(n, minimum)) < max(1, -(-(top // 2) // steps))  # waste < one grid step
    distinct = sorted(set(s for s in sizes if 256 < s <= 512))
    assert len(distinct) == steps  # compilations per octave


@pytest.mark.skipif(kernels._compiler() is None, reason="no C++ compiler to build the CPU kernel")
@pytest.mark.parametrize(
    "scfg",
    [
        sampling.SamplingConfig(max_new_tokens=9, temperature=0.0),
        sampling.SamplingConfig(max_new_tokens=9, temperature=0.8, top_k=20, n_samples=2, stop_ids=(3,)),
    ],
)
def test_cpu_kernels_change_nothing(model, scfg):
    """The CPU kernels (decode attention and the packed dense layers, on by default where they
    apply) sample what XLA does, alone and together: same tokens, log-probs and pooled states,
    left padding and empty cache slots included."""
    cfg, params = model
    prompts = [[5, 9, 17, 3, 44, 2, 8], [7, 1], [100, 101, 102, 103], [4] * 11]
    assert kernels.available(), kernels.unavailable_reason()
    auto = sampling.Sampler(cfg)  # on with AVX-512 (slower than XLA without it)
    bits = kernels.vector_bits()
    assert (
        auto.cpu_decode_kernel
        == auto.cfg.cpu_decode_kernel
        == (bits >= sampling.KERNEL_MIN_VECTOR_BITS["cpu_decode_kernel"])
    )
    assert auto.cpu_dense_kernel == (bits >= sampling.KERNEL_MIN_VECTOR_BITS["cpu_dense_kernel"])
    on = sampling.Sampler(cfg, cpu_decode_kernel=True, cpu_dense_kernel=True)  # correct on every CPU
    assert on.cfg.cpu_decode_kernel
    packed = on._unstack(params)
    assert all(isinstance(lp["w_down"], kernels.PackedDense) for lp in packed["layers"])
    assert isinstance(packed["lm_head"], kernels.PackedDense)
    off = sampling.Sampler(cfg, cpu_decode_kernel=False, cpu_dense_kernel=False)
    assert not off.cfg.cpu_decode_kernel and not isinstance(
        off._unstack(params)["layers"][0]["wq"], kernels.PackedDense
    )
    b = off(params, prompts, jax.random.key(5), scfg)
    for sampler in (
        on,
        sampling.Sampler(cfg, cpu_decode_kernel=False, cpu_dense_kernel=True),
        sampling.Sampler(cfg, cpu_decode_kernel=True, cpu_dense_kernel=False),
    ):
        a = sampler(params, prompts, jax.random.key(5), scfg)
        np.testing.assert_array_equal(a.tokens, b.tokens)
        # other summation orders and exp polynomial: log-probs of these peaky logits agree to ~3e-5
        np.testing.assert_allclose(a.logprobs, b.logprobs, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(a.pooled_hidden, b.pooled_hidden, atol=1e-5)


@pytest.mark.skipif(kernels._compiler() is None, reason="no C++ compiler to build the CPU kernel")
def test_cpu_kernels_auto_mode_needs_avx512(monkeypatch):
    """Built for a CPU without AVX-512 the kernels are correct but slower than XLA: auto leaves
    them off there, and asking for them still works."""
    cfg = PRESETS["tiny_llama"]
    assert kernels.available(), kernels.unavailable_reason()
    monkeypatch.setattr(kernels, "vector_bits", lambda: 0)
    auto = sampling.Sampler(cfg)
    assert not auto.cpu_decode_kernel and not auto.cpu_dense_kernel and not auto.cfg.cpu_decode_kernel
    forced = sampling.Sampler(cfg, cpu_decode_kernel=True, cpu_dense_kernel=True)
    assert forced.cpu_decode_kernel and forced.cpu_dense_kernel


def test_cpu_decode_kernel_where_it_cannot_apply():
    cfg = PRESETS["tiny_llama"]
    assert not sampling.Sampler(cfg, unroll_layers=False).cpu_decode_kernel  # auto: off
    with pytest.raises(ValueError, match="layer scan"):
        sampling.Sampler(cfg, unroll_layers=False, cpu_decode_kernel=True)
    with pytest.raises(ValueError, match="bfloat16"):
        sampling.Sampler(replace(cfg, dtype="bfloat16"), cpu_decode_kernel=True)
    assert not sampling.Sampler(cfg, unroll_layers=False).cpu_dense_kernel
    with pytest.raises(ValueError, match=r"cpu_dense_kernel=True\) does not apply with the layer scan"):
        sampling.Sampler(cfg, unroll_layers=False, cpu_dense_kernel=True)
    with pytest.raises(ValueError, match="bfloat16"):
        sampling.Sampler(replace(cfg, dtype="bfloat16"), cpu_dense_kernel=True)
