"""Bad checkpoints fail with one line naming the file and the tensor."""

import json
import os

import jax
import numpy as np
import pytest

from clipo_jax.models import ModelConfig, ModelError, load_gguf, load_hf_dir, load_model
from clipo_jax.models.config import PRESETS
from clipo_jax.models.transformer import init_params


def _write_hf(tmp_path, cfg: ModelConfig, drop=None, reshape=None, model_type="llama"):
    from safetensors.numpy import save_file

    params = jax.tree.map(np.asarray, init_params(cfg, jax.random.key(0)))
    t = {"model.embed_tokens.weight": params["embed"], "model.norm.weight": params["final_norm"]}
    names = {
        "attn_norm": "input_layernorm.weight",
        "mlp_norm": "post_attention_layernorm.weight",
        "wq": "self_attn.q_proj.weight",
        "wk": "self_attn.k_proj.weight",
        "wv": "self_attn.v_proj.weight",
        "wo": "self_attn.o_proj.weight",
        "w_gate": "mlp.gate_proj.weight",
        "w_up": "mlp.up_proj.weight",
        "w_down": "mlp.down_proj.weight",
    }
    for i in range(cfg.n_layers):
        for k, n in names.items():
            w = params["layers"][k][i]
            t[f"model.layers.{i}.{n}"] = np.ascontiguousarray(w.T if w.ndim == 2 else w)
    if drop:
        del t[drop]
    if reshape:
        t[reshape] = t[reshape][:-1]
    save_file(t, str(tmp_path / "model.safetensors"))
    hf = dict(
        model_type=model_type,
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        intermediate_size=cfg.d_ff,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
    )
    (tmp_path / "config.json").write_text(json.dumps(hf))
    return tmp_path


CFG = PRESETS["tiny_llama"]


def test_good_checkpoint_loads(tmp_path):
    cfg, params = load_hf_dir(str(_write_hf(tmp_path, CFG)))
    assert cfg.n_layers == CFG.n_layers and params["layers"]["wq"].shape == (2, 64, 64)


def test_unknown_architecture(tmp_path):
    d = _write_hf(tmp_path, CFG, model_type="mamba")
    with pytest.raises(ModelError, match=r"config.json: unknown architecture model_type='mamba'"):
        load_hf_dir(str(d))


def test_missing_tensor_named(tmp_path):
    d = _write_hf(tmp_path, CFG, drop="model.layers.1.mlp.up_proj.weight")
    with pytest.raises(ModelError, match=r"missing tensor 'model.layers.1.mlp.up_proj.weight'") as e:
        load_hf_dir(str(d))
    assert str(tmp_path) in str(e.value) and "\n" not in str(e.value)


def test_misshapen_tensor_named(tmp_path):
    d = _write_hf(tmp_path, CFG, reshape="model.layers.0.self_attn.k_proj.weight")
    with pytest.raises(
        ModelError, match=r"'model.layers.0.self_attn.k_proj.weight' has shape \(31, 64\), expected \(32, 64\)"
    ):
        load_hf_dir(str(d))


def test_corrupt_safetensors(tmp_path):
    d = _write_hf(tmp_path, CFG)
    (d / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ModelError, match="model.safetensors: cannot read safetensors"):
        load_hf_dir(str(d))


def test_truncated_gguf(tmp_path, smollm2_gguf):
    bad = tmp_path / "trunc.gguf"
    with open(smollm2_gguf, "rb") as f:
        bad.write_bytes(f.read(20_000_000))
    with pytest.raises(ModelError, match=r"trunc.gguf: corrupt or truncated GGUF"):
        load_gguf(str(bad))


def test_corrupt_gguf_header(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"NOTAGGUF" + os.urandom(1000))
    with pytest.raises(ModelError, match=r"bad.gguf: corrupt or truncated GGUF"):
        load_gguf(str(bad))


def test_missing_file_and_bad_name():
    with pytest.raises(ModelError, match="no such file or directory"):
        load_model("/nonexistent/model.gguf")
    with pytest.raises(ModelError, match="no such file or directory"):
        load_model("not-a-model")


def test_tokenizer_vocab_mismatch(tmp_path, smollm2_gguf):
    # An HF checkpoint whose embedding table is smaller than the tokenizer's vocabulary.
    from clipo_jax.models.tokenizer import TokenizerError, load_tokenizer

    d = _write_hf(tmp_path, CFG)
    tok = load_tokenizer(smollm2_gguf)
    # the real SmolLM2 vocabulary saved as tokenizer.json next to tiny weights (vocab 128)
    tok.tk.save(str(d / "tokenizer.json"))
    with pytest.raises(TokenizerError, match=r"has 49152 ids but the model .* has only 128 rows"):
        load_model(str(d))


def test_bad_config_values():
    with pytest.raises(ModelError, match="n_heads=5 is not a multiple of n_kv_heads=2"):
        CFG.replace(n_heads=5)
    with pytest.raises(ModelError, match="unknown architecture 'gpt9'"):
        CFG.replace(arch="gpt9")
