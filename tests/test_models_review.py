"""Review regressions for model import and tokenizer loading.

Each test was written against a defect found in review and fails without its fix. Oracles: files
written by the `gguf` package's own writer, configs and tokenizers from HF transformers, and the
real SmolLM2 GGUF.
"""

import json
import os

import numpy as np
import pytest

from clipo_jax.models import ModelError, load_model
from clipo_jax.models.loading import SafetensorsFile, config_from_gguf, config_from_hf, load_gguf
from clipo_jax.models.tokenizer import load_tokenizer

# ---------------------------------------------------------------------------------------------
# GGUF: RoPE variants the decoder does not implement are refused, not silently ignored.
# ---------------------------------------------------------------------------------------------


def _write_tiny_llama_gguf(path, extra_kv=(), extra_tensors=()):
    """A 1-layer llama GGUF written by the gguf package (d 32, 2 heads / 1 KV head of 16)."""
    import gguf

    d, heads, kv, head_dim, ff, vocab = 32, 2, 1, 16, 64, 50
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_context_length(128)
    w.add_embedding_length(d)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(1e4)
    w.add_vocab_size(vocab)
    for method, args in extra_kv:
        getattr(w, method)(*args)
    rng = np.random.default_rng(0)
    shapes = {
        "token_embd.weight": (vocab, d),
        "output_norm.weight": (d,),
        "blk.0.attn_norm.weight": (d,),
        "blk.0.ffn_norm.weight": (d,),
        "blk.0.attn_q.weight": (heads * head_dim, d),
        "blk.0.attn_k.weight": (kv * head_dim, d),
        "blk.0.attn_v.weight": (kv * head_dim, d),
        "blk.0.attn_output.weight": (d, heads * head_dim),
        "blk.0.ffn_gate.weight": (ff, d),
        "blk.0.ffn_up.weight": (ff, d),
        "blk.0.ffn_down.weight": (d, ff),
        **dict(extra_tensors),
    }
    for name, shape in shapes.items():
        w.add_tensor(name, rng.standard_normal(shape).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def test_gguf_plain_rope_still_loads(tmp_path, smollm2_gguf):
    import gguf

    path = _write_tiny_llama_gguf(
        tmp_path / "ok.gguf",
        [("add_rope_scaling_type", (gguf.RopeScalingType.NONE,)), ("add_rope_dimension_count", (16,))],
    )
    cfg, params = load_gguf(path)
    assert (cfg.n_layers, cfg.head_dim, cfg.rope_theta) == (1, 16, 1e4)
    # the real SmolLM2 file (rope.dimension_count 64 == head_dim) is unaffected
    cfg = config_from_gguf(gguf.GGUFReader(smollm2_gguf), smollm2_gguf)
    assert (cfg.head_dim, cfg.rope_theta) == (64, 100000.0)


@pytest.mark.parametrize(
    "case, match",
    [
        ("linear", r"llama.rope.scaling.type='linear' is not supported"),
        ("yarn", r"llama.rope.scaling.type='yarn' is not supported"),
        ("rope_freqs", r"tensor rope_freqs.weight \(RoPE frequency scaling\) is not supported"),
        ("partial", r"llama.rope.dimension_count=8 \(partial RoPE\) is not supported"),
    ],
)
def test_gguf_rope_scaling_is_refused(tmp_path, case, match):
    import gguf

    kv, tensors = [], []
    if case in ("linear", "yarn"):
        kind = gguf.RopeScalingType.LINEAR if case == "linear" else gguf.RopeScalingType.YARN
        kv = [("add_rope_scaling_type", (kind,)), ("add_rope_scaling_factor", (8.0,))]
    elif case == "rope_freqs":  # what llama.cpp's converter writes for Llama 3.1/3.2
        tensors = [("rope_freqs.weight", (8,))]
    else:
        kv = [("add_rope_dimension_count", (8,))]
    path = _write_tiny_llama_gguf(tmp_path / f"{case}.gguf", kv, tensors)
    with pytest.raises(ModelError, match=match) as e:
        load_gguf(path)
    assert path in str(e.value) and "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------
# HF config.json: Gemma 3 RoPE scaling, null and mistyped fields.
# ---------------------------------------------------------------------------------------------

_GEMMA3 = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=1,
    head_dim=32,
    sliding_window=8,
    query_pre_attn_scalar=32,
)


def _hf_config_dict(config):
    return json.loads(config.to_json_string(use_diff=True))


def test_gemma3_default_rope_loads():
    transformers = pytest.importorskip("transformers")
    cfg = config_from_hf(_hf_config_dict(transformers.Gemma3TextConfig(**_GEMMA3)))
    assert (cfg.arch, cfg.rope_theta, cfg.rope_local_theta, cfg.global_every) == ("gemma3", 1e6, 1e4, 6)


@pytest.mark.parametrize("form", ["rope_parameters", "rope_scaling"])
def test_gemma3_rope_scaling_is_refused(form):
    # Gemma 3 4B/12B/27B scale the global layers' RoPE linearly (factor 8); the decoder cannot.
    transformers = pytest.importorskip("transformers")
    if form == "rope_parameters":  # transformers v5 writes one dict per attention type
        hf = _hf_config_dict(
            transformers.Gemma3TextConfig(**_GEMMA3, rope_scaling={"rope_type": "linear", "factor": 8.0})
        )
        assert hf["rope_parameters"]["full_attention"]["rope_type"] == "linear"
    else:  # the published Gemma 3 4B text_config (written by transformers v4)
        hf = dict(_GEMMA3, model_type="gemma3_text", rope_scaling={"factor": 8.0, "rope_type": "linear"})
    with pytest.raises(ModelError, match=rf"{form} .*linear.* is not supported \(only default RoPE\)"):
        config_from_hf(hf)


_LLAMA = dict(
    model_type="llama",
    vocab_size=128,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    tie_word_embeddings=True,
)


def test_null_num_key_value_heads_means_mha_as_in_hf():
    transformers = pytest.importorskip("transformers")
    hf = dict(_LLAMA, num_key_value_heads=None, head_dim=None)
    ref = transformers.LlamaConfig.from_dict(hf)
    cfg = config_from_hf(hf)
    assert (cfg.n_kv_heads, cfg.head_dim) == (ref.num_key_value_heads, ref.head_dim) == (4, 16)


@pytest.mark.parametrize(
    "key, value",
    [
        ("hidden_size", "64"),
        ("num_attention_heads", 0),
        ("num_attention_heads", None),
        ("vocab_size", "128"),
        ("num_hidden_layers", 2.5),
        ("rms_norm_eps", "1e-5"),
        ("intermediate_size", True),
    ],
)
def test_mistyped_config_fields_are_one_line_errors(key, value):
    with pytest.raises(ModelError, match=rf"config.json: (missing field '{key}'|{key}=.* must be a positive)"):
        config_from_hf(dict(_LLAMA, **{key: value}))


# ---------------------------------------------------------------------------------------------
# safetensors: a malformed header entry is a one-line ModelError.
# ---------------------------------------------------------------------------------------------


# Both entries raised a raw ValueError (a traceback) before the fix.
@pytest.mark.parametrize(
    "entry",
    [
        {"dtype": "F32", "shape": [-2, -1], "data_offsets": [0, 8]},
        {"dtype": "F32", "shape": [-1, 2], "data_offsets": [8, 0]},
    ],
)
def test_safetensors_negative_shape_or_offsets(tmp_path, entry):
    from safetensors.numpy import save_file

    path = str(tmp_path / "model.safetensors")
    save_file({"w": np.arange(4, dtype=np.float32)}, path)  # a valid file from the reference writer
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header, data = json.loads(f.read(n)), f.read()
    header["w"] = entry
    raw = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw + data)
    with pytest.raises(ModelError, match="tensor 'w' has a malformed header entry"):
        SafetensorsFile(path).get("w")


# ---------------------------------------------------------------------------------------------
# Tokenizer directories: chat_template.jinja wins over tokenizer_config.json, as in HF.
# ---------------------------------------------------------------------------------------------


def test_chat_template_file_takes_priority_like_hf(tmp_path, smollm2_gguf):
    transformers = pytest.importorskip("transformers")
    load_tokenizer(smollm2_gguf).tk.save(str(tmp_path / "tokenizer.json"))  # the real SmolLM2 vocabulary
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "chat_template": "OLD{% for m in messages %}{{ m['content'] }}{% endfor %}",
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "chat_template.jinja").write_text(
        "NEW{% for m in messages %}<|im_start|>{{ m['content'] }}{% endfor %}"
    )
    messages = [{"role": "user", "content": "hi"}]
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    ours = load_tokenizer(tmp_path)
    assert (
        ours.apply_chat_template(messages) == ref.apply_chat_template(messages, tokenize=False) == "NEW<|im_start|>hi"
    )
    assert ours.encode_chat(messages) == list(ref.apply_chat_template(messages, tokenize=True, return_dict=False))


# ---------------------------------------------------------------------------------------------
# load_model: a preset name gets the message meant for it.
# ---------------------------------------------------------------------------------------------


def test_load_model_preset_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no file called tiny_llama here
    assert not os.path.exists("tiny_llama")
    with pytest.raises(ModelError, match="tiny_llama is a shape preset, not a checkpoint"):
        load_model("tiny_llama")


def test_tie_word_embeddings_defaults_as_in_hf():
    """A config without tie_word_embeddings: HF unties Llama and Qwen2 and ties Gemma 3. Tying a
    Llama config by default ignored its lm_head.weight and used the embedding instead."""
    transformers = pytest.importorskip("transformers")
    llama = {k: v for k, v in _LLAMA.items() if k != "tie_word_embeddings"}
    assert config_from_hf(llama).tie_embeddings is transformers.LlamaConfig.from_dict(llama).tie_word_embeddings
    assert config_from_hf(llama).tie_embeddings is False
    qwen = dict(llama, model_type="qwen2")
    assert config_from_hf(qwen).tie_embeddings is transformers.Qwen2Config.from_dict(qwen).tie_word_embeddings
    gemma = dict(_GEMMA3, model_type="gemma3_text")
    assert config_from_hf(gemma).tie_embeddings is transformers.Gemma3TextConfig(**_GEMMA3).tie_word_embeddings
    assert config_from_hf(gemma).tie_embeddings is True
