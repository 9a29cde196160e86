"""ModelConfig.attention_impl: "dot_product" (jax.nn.dot_product_attention) against the einsum path."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clipo_jax import sampling
from clipo_jax.models import transformer
from clipo_jax.models.config import ATTENTION_IMPLS, PRESETS, ModelConfig, ModelError, available_attention_impls

CONFIGS = {
    "llama_gqa": PRESETS["tiny_llama"],  # 4 query heads over 2 kv heads
    "qwen2_bias": PRESETS["tiny_qwen2"],  # q/k/v biases, untied head
    # Gemma3-like: a window shorter than the sequences, two sliding layers then a global one,
    # GQA groups of 2, qk-norm, post-norms, GeGLU, its own query scale
    "gemma3_window": PRESETS["tiny_gemma3"].replace(n_layers=3, n_kv_heads=2, sliding_window=4, global_every=3),
}


@functools.cache
def _model(name):
    cfg = CONFIGS[name]
    return name, cfg, transformer.init_params(cfg, jax.random.key(0), std=0.5)  # peaky logits: mistakes show


@pytest.fixture(params=sorted(CONFIGS))
def model(request):
    return _model(request.param)


# The q/k/v biases act before attention, so the cache test leaves the Qwen2-like model out (compile time).
@pytest.fixture(params=["gemma3_window", "llama_gqa"])
def cache_model(request):
    return _model(request.param)


def _both(cfg):
    return cfg.replace(attention_impl="einsum"), cfg.replace(attention_impl="dot_product")


def _padded_batch(vocab):
    """Left-padded rows of different lengths (as the sampler pads), a right-padded row (as the
    trainer pads prompt + response) and an all-padding row (every query fully masked)."""
    T = 24
    tokens = np.array(jax.random.randint(jax.random.key(1), (5, T), 1, vocab), np.int32)
    valid = np.zeros((5, T), bool)
    valid[0] = True
    valid[1, 9:] = True
    valid[2, 20:] = True
    valid[3, :15] = True
    tokens[~valid] = 0
    return jnp.asarray(tokens), jnp.asarray(valid)


def test_unknown_impl_is_a_one_line_error():
    with pytest.raises(ModelError, match=r"ModelConfig\.attention_impl='flash' is unknown") as err:
        ModelConfig(attention_impl="flash")
    assert "\n" not in str(err.value) and "dot_product" in str(err.value)
    with pytest.raises(ModelError, match="attn_logit_softcap") as err:
        ModelConfig(attention_impl="dot_product", attn_logit_softcap=50.0)
    assert "\n" not in str(err.value)
    assert ModelConfig().attention_impl == "einsum" and set(ATTENTION_IMPLS) == {"einsum", "dot_product", "cudnn"}


def test_forward_on_padded_batch_matches_einsum(model):
    name, cfg, params = model
    tokens, valid = _padded_batch(cfg.vocab_size)
    (le, he), (ld, hd) = (
        jax.jit(transformer.forward_logits, static_argnums=1)(params, c, tokens, valid) for c in _both(cfg)
    )
    np.testing.assert_allclose(hd, he, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ld, le, rtol=1e-5, atol=1e-4)
    if name == "gemma3_window":  # the window really cuts keys here, so the comparison covers it
        unwindowed, _ = transformer.forward_logits(params, cfg.replace(sliding_window=None), tokens, valid)
        assert float(jnp.max(jnp.abs(unwindowed - le))) > 1e-2


@pytest.mark.parametrize("unroll_layers", [True, False], ids=["per_layer_cache", "stacked_cache"])
def test_greedy_sampling_through_the_cache_matches_einsum(cache_model, unroll_layers):
    """Prefill + decode steps past the sliding window. The stacked cache attends over two segments
    (read-only cache + new tokens), the per-layer cache over one updated buffer."""
    _, cfg, params = cache_model
    prompts = [[5, 9, 17, 3, 44, 2, 8], [7, 1], [100, 101, 102, 103]]
    scfg = sampling.SamplingConfig(max_new_tokens=8, temperature=0.0)
    e, d = (
        sampling.Sampler(c, unroll_layers=unroll_layers, cache_steps_per_octave=0)(
            params, prompts, jax.random.key(1), scfg
        )
        for c in _both(cfg)
    )
    np.testing.assert_array_equal(d.tokens, e.tokens)
    np.testing.assert_array_equal(d.lengths, e.lengths)
    np.testing.assert_allclose(d.logprobs, e.logprobs, atol=1e-4)
    np.testing.assert_allclose(d.pooled_hidden, e.pooled_hidden, rtol=1e-5, atol=1e-5)


def test_gradients_match_einsum(model):
    name, cfg, params = model
    tokens, valid = _padded_batch(cfg.vocab_size)
    targets = jnp.roll(tokens, -1, axis=1)
    remat = name == "llama_gqa"  # the trainer's rematerialised layer scan, once

    def loss(p, c):
        lp = transformer.token_logprobs(p, c, tokens, valid, targets, remat=remat, chunk=8)
        return jnp.sum(jnp.where(valid, lp, 0.0)) / jnp.sum(valid)

    ge, gd = (jax.jit(jax.grad(loss), static_argnums=1)(params, c) for c in _both(cfg))
    for path, a, b in zip(
        [jax.tree_util.keystr(k) for k, _ in jax.tree.leaves_with_path(ge)], jax.tree.leaves(ge), jax.tree.leaves(gd)
    ):
        scale = float(jnp.max(jnp.abs(a)))
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4 * scale, err_msg=path)


def test_bfloat16_compute_stays_close():
    """The trainer computes in bfloat16: both impls there, each within bf16 noise of float32 einsum."""
    cfg = CONFIGS["gemma3_window"]
    params = transformer.init_params(cfg, jax.random.key(0), std=0.5)
    tokens, valid = _padded_batch(cfg.vocab_size)
    ref, _ = transformer.forward_logits(params, cfg, tokens, valid)
    for c in _both(cfg.replace(dtype="bfloat16")):
        logits, _ = transformer.forward_logits(params, c, tokens, valid)
        err = float(jnp.max(jnp.abs(logits - ref)) / jnp.max(jnp.abs(ref)))
        assert err < 0.02, (c.attention_impl, err)


def test_attention_memory_report_shapes_only():
    report = transformer.attention_memory_report(PRESETS["tiny_llama"], batch=1, seq=64)
    assert set(report) == set(available_attention_impls(jax.default_backend())) - {"cudnn"}  # float32 model
    for stats in report.values():
        assert stats["temp_bytes"] > 0 and stats["argument_bytes"] > 0 and stats["output_bytes"] == 64 * 64 * 4


def test_trainer_config_selects_the_attention(tmp_path):
    """config.model.attention_impl reaches the model; an unknown one fails before compilation."""
    import jax

    from clipo_jax import trainer
    from configs import demo

    c = demo.get_config("size=tiny")
    assert c.model.attention_impl == "einsum"
    c.model.attention_impl = "dot_product"
    cfg, _ = trainer.build_model(c, 64, jax.random.key(0))
    assert cfg.attention_impl == "dot_product"
    c.model.attention_impl = "flash"
    with pytest.raises(trainer.TrainingError, match="model.attention_impl"):
        trainer.validate_config(c)


def test_cudnn_needs_half_precision_and_a_gpu():
    """attention_impl='cudnn' is cuDNN's flash attention: a float32 model is a config error, and on
    a backend without cuDNN the trainer refuses it before compiling anything."""
    with pytest.raises(ModelError, match="'cudnn' needs a bfloat16 or float16 compute dtype"):
        ModelConfig(attention_impl="cudnn")
    assert "cudnn" not in available_attention_impls("cpu") and "cudnn" in available_attention_impls("gpu")
    if jax.default_backend() == "gpu":
        return
    from clipo_jax import trainer
    from configs.demo import get_config

    config = get_config()
    config.model.attention_impl = "cudnn"
    with pytest.raises(trainer.TrainingError, match="attention_impl='cudnn' needs a GPU backend"):
        trainer.validate_config(config)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN flash attention runs on NVIDIA GPUs only")
def test_cudnn_matches_einsum_on_gpu():
    """On a GPU host (experiments/device_check.sh runs this file's parity tests): cuDNN's kernel
    gives the einsum's logits within bfloat16 noise, with GQA, left padding and a sliding window."""
    cfg = CONFIGS["gemma3_window"].replace(dtype="bfloat16")
    params = transformer.init_params(cfg, jax.random.key(0), std=0.5)
    tokens, valid = _padded_batch(cfg.vocab_size)
    ref, _ = transformer.forward_logits(params, cfg, tokens, valid)
    got, _ = transformer.forward_logits(params, cfg.replace(attention_impl="cudnn"), tokens, valid)
    keep = np.asarray(valid)
    err = float(np.max(np.abs(np.asarray(got - ref))[keep]) / np.max(np.abs(np.asarray(ref))[keep]))
    assert err < 0.02, err
