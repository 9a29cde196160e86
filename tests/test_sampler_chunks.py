"""Per-row sampling keys and chunked sampling: a large rollout batch taken in chunks of prompts
gives the samples of one call (SamplingConfig.row_keys, Sampler(..., chunk_prompts=k))."""

import json
import os
import subprocess
import sys
from dataclasses import replace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clipo_jax import sampling
from clipo_jax.models import transformer
from clipo_jax.models.config import PRESETS

jax.config.update("jax_default_matmul_precision", "highest")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# 7 prompts of different lengths; the longest (18 tokens) sets the length bucket 20, which
# chunks without it would not pick on their own (16)
PROMPTS_7 = [
    [5, 9, 17, 3, 44, 2, 8],
    [7, 1],
    [100, 101, 102, 103],
    [4] * 18,
    [9, 8, 7, 6, 5],
    [11] * 12,
    [3, 1, 4, 1, 5, 9, 2, 6],
]
SAMPLED = sampling.SamplingConfig(max_new_tokens=8, temperature=1.0, n_samples=4, stop_ids=(3, 5), row_keys=True)


@pytest.fixture(scope="module")
def model():
    cfg = PRESETS["tiny_llama"]
    # a milder init than test_sampling's peaky one: the samples of a prompt really differ
    params = transformer.init_params(cfg, jax.random.key(0), std=0.2)
    return cfg, params, sampling.Sampler(cfg)


def _assert_same(a, b, atol=1e-5):
    for name in ("tokens", "response_mask", "lengths", "truncated", "prompt_tokens", "prompt_mask"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    np.testing.assert_allclose(a.logprobs, b.logprobs, atol=atol)
    np.testing.assert_allclose(a.pooled_hidden, b.pooled_hidden, atol=atol)


def test_row_keys_default_off():
    assert sampling.SamplingConfig().row_keys is False


@pytest.mark.parametrize("chunk", [1, 2, 3, 7])
def test_chunked_equals_one_call(model, chunk):
    cfg, params, s = model
    ref = s(params, PROMPTS_7, jax.random.key(11), SAMPLED)
    assert ref.tokens.shape == (7 * 4, 8) and ref.prompt_tokens.shape[1] == s.length_bucket(18) == 20
    # not vacuous: a prompt's samples differ, and some rows stop early
    assert len({tuple(t) for t in ref.tokens[:4]}) > 1 and (~ref.truncated).any()
    _assert_same(s(params, PROMPTS_7, jax.random.key(11), SAMPLED, chunk_prompts=chunk), ref)


def test_chunks_share_one_decode_compilation(model):
    """row_offset is traced: chunks of the same size reuse one compiled decode."""
    cfg, params, s = model
    scfg = replace(SAMPLED, max_new_tokens=5)
    s(params, PROMPTS_7[2:4], jax.random.key(0), scfg)  # compiles the 2-prompt decode at length bucket 20
    d0 = sampling.TRACE_COUNT["decode"]
    s(params, PROMPTS_7[:6], jax.random.key(1), scfg, chunk_prompts=2)  # three chunks of 2
    assert sampling.TRACE_COUNT["decode"] == d0


def test_row_keys_make_samples_batch_size_invariant(model):
    """A prompt's samples are the same alone (1 row group, no padding) as first in a batch of 5
    (padded to 8); the first 3 prompts' samples are the same in a batch of 3 as in a batch of 7."""
    cfg, params, s = model
    short = [p for p in PROMPTS_7 if len(p) <= 16]  # one length bucket (16) for every subset
    key = jax.random.key(5)
    alone = s(params, short[:1], key, SAMPLED)
    batch5 = s(params, short[:5], key, SAMPLED)
    n = SAMPLED.n_samples
    _assert_same(alone, jax.tree.map(lambda x: x[:n], batch5))
    batch3 = s(params, short[:3], key, SAMPLED)
    _assert_same(batch3, jax.tree.map(lambda x: x[: 3 * n], batch5))
    # the shared key draws one [B, V] array: a row's noise is that of its position in the call, so
    # prompt 1 sampled in a call of its own (as a chunk would be) changes its samples
    shared = replace(SAMPLED, row_keys=False)
    a, b = s(params, short[1:2], key, shared), s(params, short[:5], key, shared)
    assert not np.array_equal(a.tokens, b.tokens[n : 2 * n])


def test_chunking_without_row_keys_is_an_error(model):
    cfg, params, s = model
    with pytest.raises(ValueError, match="row_keys"):
        s(params, PROMPTS_7, jax.random.key(0), replace(SAMPLED, row_keys=False), chunk_prompts=3)
    with pytest.raises(ValueError, match="chunk_prompts"):
        s(params, PROMPTS_7, jax.random.key(0), SAMPLED, chunk_prompts=-1)
    # a chunk at least as large as the batch is one call: no row keys needed
    s(params, PROMPTS_7[:2], jax.random.key(0), replace(SAMPLED, row_keys=False, max_new_tokens=2), chunk_prompts=2)


@pytest.mark.parametrize("row_keys", [False, True])
def test_greedy_chunked_equals_one_call(model, row_keys):
    cfg, params, s = model
    scfg = sampling.SamplingConfig(max_new_tokens=8, temperature=0.0, stop_ids=(3, 5), row_keys=row_keys)
    ref = s(params, PROMPTS_7, jax.random.key(0), scfg)
    _assert_same(s(params, PROMPTS_7, jax.random.key(0), scfg, chunk_prompts=3), ref)


def test_row_key_noise_is_the_documented_key_and_samples_softmax():
    """Row r at step i draws Gumbel noise [V] from fold_in(fold_in(rng, row_offset + r), i); over
    many rows a fixed logits vector is sampled with the softmax's frequencies."""
    rng, offset, step, V = jax.random.key(42), 5, 3, 8
    scfg = sampling.SamplingConfig(temperature=0.7, row_keys=True)
    keys = sampling.step_rngs(sampling.row_rngs(rng, offset, 4), step, scfg)
    got = sampling.gumbel_noise(keys, (4, V), row_keys=True)
    for r in range(4):
        want = jax.random.gumbel(jax.random.fold_in(jax.random.fold_in(rng, offset + r), step), (V,), jnp.float32)
        np.testing.assert_array_equal(np.asarray(got[r]), np.asarray(want))

    B = 40000
    logits = jnp.asarray([2.0, 1.0, 0.5, 0.0, -1.0, 1.5, -3.0, 0.2], jnp.float32)
    batch = jnp.broadcast_to(logits, (B, V))
    keys = sampling.step_rngs(sampling.row_rngs(rng, 0, B), step, scfg)
    token, logp = jax.jit(lambda k, x: sampling.sample_token(k, x, scfg))(keys, batch)
    p = np.asarray(jax.nn.softmax(logits / scfg.temperature))
    freq = np.bincount(np.asarray(token), minlength=V) / B
    # 5 standard errors of a frequency (<= 0.0125 here): a wrong distribution (e.g. temperature
    # 1 instead of 0.7, or the same noise for every row) fails by far more
    np.testing.assert_allclose(freq, p, atol=5 * np.sqrt(p * (1 - p) / B).max())
    np.testing.assert_allclose(np.asarray(logp), np.log(p)[np.asarray(token)], atol=1e-5)
    # top-k still truncates with row keys
    token_k, _ = sampling.sample_token(keys, batch, replace(scfg, top_k=2))
    assert set(np.unique(np.asarray(token_k))) == {0, 5}


# ----------------------------------------------------------------------------- trainer
def _train(workdir, *extra):
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    flags = [
        "--config=configs/demo.py:size=tiny",
        "--config.progress_bar=False",
        "--config.rl.steps=2",
        "--config.sft.steps=0",
        "--config.eval.max_new_tokens=2",
        "--config.task.test_size=2",
        "--config.ckpt.every=100",
    ]
    cmd = [sys.executable, "-m", "experiments.train", f"--workdir={workdir}", *flags, *extra]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_trainer_chunked_rollouts_match_one_call_with_row_keys(tmp_path):
    """rl.rollout_chunk_prompts=3 of rl.prompts_per_step=4 (chunks of 3 and 1) gives the metrics of
    one rollout call with rl.rollout_row_keys=True: rewards, outcomes, response lengths and the
    policy entropy over the sampled tokens (which tells the samples apart: the tiny model earns no
    reward, but the shared-key run's entropy differs in the 6th digit) are equal; the sampler's
    log-probs may differ by float rounding (the chunks' batch shapes differ)."""
    chunked = _train(tmp_path / "chunked", "--config.rl.rollout_chunk_prompts=3")
    one = _train(tmp_path / "one", "--config.rl.rollout_row_keys=True")
    assert [r["step"] for r in chunked] == [r["step"] for r in one] == [1, 2]
    for a, b in zip(chunked, one):
        assert sorted(a) == sorted(b)
        assert any(k.startswith("reward/") for k in a) and "actor/entropy" in a, sorted(a)
        for k in a:
            if k.startswith(("time/", "throughput/")):
                continue
            if k.startswith("actor/logprob_gap/"):  # sampler vs trainer log-probs: rounding only
                np.testing.assert_allclose(a[k], b[k], atol=1e-5, err_msg=k)
            else:
                assert a[k] == b[k], (a["step"], k, a[k], b[k])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_replicated_compute_dtype_weights_give_the_same_samples(model, dtype):
    """Sampler(replicate_weights=True) samples from a compute-dtype copy of the weights (norm
    scales kept as stored): every matmul already casts its weights, so the samples are the same."""
    cfg, params, _ = model
    cfg = cfg.replace(dtype=dtype)
    copy = transformer.compute_dtype_weights(params, cfg)
    assert copy["layers"]["wq"].dtype == jnp.dtype(dtype) and copy["layers"]["attn_norm"].dtype == jnp.float32
    a = sampling.Sampler(cfg)(params, PROMPTS_7, jax.random.key(5), SAMPLED)
    b = sampling.Sampler(cfg, replicate_weights=True)(params, PROMPTS_7, jax.random.key(5), SAMPLED)
    _assert_same(a, b, atol=0)
