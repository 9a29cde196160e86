"""Parity of our transformer with HF transformers (torch, CPU) as the independent oracle."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax
import jax.numpy as jnp

from clipo_jax.models import loading, transformer

jax.config.update("jax_default_matmul_precision", "highest")


def _hf_tiny(arch):
    common = dict(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    if arch == "llama":
        cfg = transformers.LlamaConfig(**common, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True)
        return transformers.LlamaForCausalLM(cfg)
    if arch == "qwen2":
        cfg = transformers.Qwen2Config(**common, rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=False)
        return transformers.Qwen2ForCausalLM(cfg)
    if arch == "gemma3":
        common.update(num_hidden_layers=7, num_key_value_heads=1, head_dim=32)
        cfg = transformers.Gemma3TextConfig(
            **common, rms_norm_eps=1e-6, sliding_window=5, query_pre_attn_scalar=24, sliding_window_pattern=6
        )
        return transformers.Gemma3ForCausalLM(cfg)
    raise ValueError(arch)


@pytest.fixture(scope="module", params=["llama", "qwen2", "gemma3"])
def tiny_pair(request, tmp_path_factory):
    torch.manual_seed(0)
    model = _hf_tiny(request.param).float().eval()
    with torch.no_grad():  # non-trivial norms and biases so the test sees them
        for name, p in model.named_parameters():
            if "norm" in name or "bias" in name:
                p.add_(0.1 * torch.randn_like(p))
    d = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(d)
    cfg, params = loading.load_hf_dir(str(d))
    return request.param, model, cfg, params


def test_config_mapping(tiny_pair):
    arch, model, cfg, _ = tiny_pair
    assert cfg.arch == arch
    assert cfg.n_layers == model.config.num_hidden_layers
    if arch == "gemma3":
        assert cfg.sliding_window == 5 and cfg.global_every == 6
        assert [cfg.layer_is_global(i) for i in range(7)] == [t == "full_attention" for t in model.config.layer_types]


def test_logits_match_hf_padded_batch(tiny_pair):
    arch, model, cfg, params = tiny_pair
    rng = np.random.default_rng(0)
    B, T = 3, 12
    tokens = rng.integers(0, cfg.vocab_size, size=(B, T))
    mask = np.ones((B, T), np.int64)
    mask[1, :4] = 0  # left padding of different lengths
    mask[2, :7] = 0
    with torch.no_grad():
        pos = np.maximum(np.cumsum(mask, -1) - 1, 0)
        ref = model(
            input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos)
        ).logits.numpy()
    logits, _ = jax.jit(lambda p, t, m: transformer.forward_logits(p, cfg, t, m))(
        params, jnp.asarray(tokens), jnp.asarray(mask.astype(bool))
    )
    logits = np.asarray(logits)
    valid = mask.astype(bool)
    diff = np.abs(logits - ref)[valid].max()
    assert diff < 1e-4, f"{arch}: max |logit diff| {diff}"


def test_token_logprobs_consistent_with_logits(tiny_pair):
    _, _, cfg, params = tiny_pair
    rng = np.random.default_rng(1)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, size=(2, 9)))
    valid = jnp.ones((2, 9), bool)
    targets = jnp.roll(tokens, -1, axis=1)
    lp = transformer.token_logprobs(params, cfg, tokens, valid, targets, chunk=4)
    logits, _ = transformer.forward_logits(params, cfg, tokens, valid)
    ref = np.take_along_axis(np.asarray(jax.nn.log_softmax(logits)), np.asarray(targets)[..., None], -1)[..., 0]
    np.testing.assert_allclose(np.asarray(lp), ref, atol=1e-5)


def test_sharded_safetensors_index_loads(tmp_path):
    torch.manual_seed(1)
    model = _hf_tiny("qwen2").float().eval()
    model.save_pretrained(tmp_path, max_shard_size="50KB")  # many shards + model.safetensors.index.json
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    cfg, params = loading.load_hf_dir(str(tmp_path))
    tokens = np.arange(10)[None] % cfg.vocab_size
    with torch.no_grad():
        ref = model(input_ids=torch.tensor(tokens)).logits.numpy()
    logits, _ = transformer.forward_logits(params, cfg, jnp.asarray(tokens), jnp.ones((1, 10), bool))
    assert np.abs(np.asarray(logits) - ref).max() < 1e-4


def test_nnx_module_splits_into_pure_state(tiny_pair):
    from flax import nnx

    _, _, cfg, params = tiny_pair
    model = transformer.Transformer(cfg, params=params)
    graphdef, state = nnx.split(model)
    tokens = jnp.asarray([[1, 2, 3, 4]])
    valid = jnp.ones((1, 4), bool)

    @jax.jit
    def apply(state, tokens, valid):  # the jit boundary sees only the pytree
        return nnx.merge(graphdef, state)(tokens, valid)[0]

    want, _ = transformer.forward_logits(params, cfg, tokens, valid)
    np.testing.assert_allclose(np.asarray(apply(state, tokens, valid)), np.asarray(want), atol=1e-5)
    axes = [
        p.get_metadata().get("logical_axes")
        for p in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    ]
    assert ("layers", "embed", "heads") in axes
