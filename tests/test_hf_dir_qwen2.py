"""A Qwen2/Qwen2.5-style HF checkpoint directory, written by HF transformers, loaded end to end.

The directory holds what a published Qwen2.5-Instruct checkpoint holds, only tiny: config.json
(model_type qwen2, q/k/v biases, GQA, rope_theta 1e6, an embedding table padded past the
tokenizer's vocabulary), safetensors sharded behind model.safetensors.index.json, tokenizer.json and a
tokenizer_config.json with a ChatML jinja chat_template. Oracle: HF transformers' Qwen2ForCausalLM
(torch, CPU) on the same token ids, and PreTrainedTokenizerFast for the prompt ids.
"""

import importlib
import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax
import jax.numpy as jnp
from test_chat_template import FAMILIES, WITH_SYSTEM, hf_ids, hf_oracle, train_tiny_tokenizer, write_tokenizer_dir

from clipo_jax import tasks, trainer
from clipo_jax.models import ModelError, load_hf_dir, load_model, transformer
from clipo_jax.models.tokenizer import check_vocab

jax.config.update("jax_default_matmul_precision", "highest")

QWEN_TEMPLATE, QWEN_SPECIAL, QWEN_ADD_BOS = FAMILIES["qwen25"]
PROMPT = [{"role": "user", "content": "What is 3 + 5? Explain step by step."}]
HF_LAYER_NAMES = {
    "attn_norm": "input_layernorm.weight",
    "mlp_norm": "post_attention_layernorm.weight",
    "wq": "self_attn.q_proj.weight",
    "wk": "self_attn.k_proj.weight",
    "wv": "self_attn.v_proj.weight",
    "wo": "self_attn.o_proj.weight",
    "bq": "self_attn.q_proj.bias",
    "bk": "self_attn.k_proj.bias",
    "bv": "self_attn.v_proj.bias",
    "w_gate": "mlp.gate_proj.weight",
    "w_up": "mlp.up_proj.weight",
    "w_down": "mlp.down_proj.weight",
}


def _write_checkpoint(directory, tokenizer_json, *, tied: bool, dtype) -> "transformers.Qwen2ForCausalLM":
    """Tiny random Qwen2 saved in `dtype` over several shards, plus the tokenizer files. Returns the
    float32 HF model holding exactly the saved values (bf16 -> f32 is exact)."""
    from tokenizers import Tokenizer

    n_tokens = Tokenizer.from_file(str(tokenizer_json)).get_vocab_size(with_added_tokens=True)
    vocab = -(-n_tokens // 64) * 64 + 64  # padded like Qwen2.5's table (151936 rows for 151665 tokens)
    config = transformers.Qwen2Config(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        rope_theta=1e6,
        tie_word_embeddings=tied,
        use_sliding_window=False,
    )
    torch.manual_seed(0 if tied else 1)
    model = transformers.Qwen2ForCausalLM(config).eval()
    with torch.no_grad():  # non-trivial norms and q/k/v biases (HF initialises biases to zero)
        for name, p in model.named_parameters():
            if "norm" in name or "bias" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.to(dtype).save_pretrained(directory, max_shard_size="100KB")
    write_tokenizer_dir(directory, tokenizer_json, QWEN_TEMPLATE, QWEN_SPECIAL, QWEN_ADD_BOS)
    return model.float()


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_tiny_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def checkpoints(tokenizer_json, tmp_path_factory):
    """Tied embeddings saved in float32 (Qwen2.5-0.5B/1.5B/3B tie them); untied in bfloat16 (7B, and
    the dtype published checkpoints use). name -> (directory, float32 HF model)."""
    out = {}
    for name, tied, dtype in [("tied_f32", True, torch.float32), ("untied_bf16", False, torch.bfloat16)]:
        directory = tmp_path_factory.mktemp(name)
        out[name] = directory, _write_checkpoint(directory, tokenizer_json, tied=tied, dtype=dtype)
    return out


@pytest.fixture(params=["tied_f32", "untied_bf16"])
def checkpoint(request, checkpoints):
    return request.param, *checkpoints[request.param]


def test_directory_layout_is_sharded(checkpoint):
    _, directory, model = checkpoint
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) >= 2 and all((directory / s).is_file() for s in shards)
    assert ("lm_head.weight" in index["weight_map"]) == (not model.config.tie_word_embeddings)
    hf_config = json.loads((directory / "config.json").read_text())
    assert hf_config["model_type"] == "qwen2"


def test_load_model_config_and_tokenizer(checkpoint, tokenizer_json):
    name, directory, model = checkpoint
    cfg, params, tok = load_model(str(directory))
    hf = model.config
    assert (cfg.arch, cfg.qkv_bias, cfg.qk_norm, cfg.post_norms) == ("qwen2", True, False, False)
    assert (cfg.vocab_size, cfg.d_model, cfg.n_layers, cfg.d_ff) == (
        hf.vocab_size,
        hf.hidden_size,
        hf.num_hidden_layers,
        hf.intermediate_size,
    )
    assert (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim) == (4, 2, 16)
    assert cfg.rope_theta == 1e6 and cfg.norm_eps == 1e-6 and cfg.max_seq_len == 512
    assert cfg.tie_embeddings == (name == "tied_f32") and ("lm_head" in params) == (name != "tied_f32")
    assert params["layers"]["bq"].shape == (2, 64) and params["layers"]["bk"].shape == (2, 32)
    # Every tensor equals HF's (bf16 values arrive exactly as float32); matrices are stored [in, out].
    sd = {k: v.float().numpy() for k, v in model.state_dict().items()}
    np.testing.assert_array_equal(params["embed"], sd["model.embed_tokens.weight"])
    np.testing.assert_array_equal(params["final_norm"], sd["model.norm.weight"])
    if "lm_head" in params:
        np.testing.assert_array_equal(params["lm_head"], sd["lm_head.weight"].T)
    for ours, theirs in HF_LAYER_NAMES.items():
        for i in range(cfg.n_layers):
            want = sd[f"model.layers.{i}.{theirs}"]
            np.testing.assert_array_equal(params["layers"][ours][i], want.T if want.ndim == 2 else want)
    assert set(params["layers"]) == set(HF_LAYER_NAMES)
    # The tokenizer: fewer ids than embedding rows (padded table), ChatML from the checkpoint's template.
    assert tok.vocab_size < cfg.vocab_size
    check_vocab(tok, cfg.vocab_size, str(directory))
    assert cfg.output_vocab == tok.vocab_size  # the padded rows are never sampled
    assert tok.chat_format == "jinja" and tok.bos_id is None
    assert tok.id_to_token(tok.eos_id) == "<|im_end|>" and tok.id_to_token(tok.pad_id) == "<|endoftext|>"
    assert {tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")} <= set(tok.stop_ids)
    oracle = hf_oracle(tokenizer_json, QWEN_TEMPLATE, QWEN_SPECIAL)
    for conversation in (PROMPT, WITH_SYSTEM):
        assert tok.encode_chat(conversation) == hf_ids(oracle, conversation, True)


def test_logits_match_hf(checkpoint):
    _, directory, model = checkpoint
    cfg, params, tok = load_model(str(directory))
    prompt = tok.encode_chat(PROMPT)
    rng = np.random.default_rng(0)
    B, T = 3, len(prompt)
    tokens = rng.integers(0, cfg.vocab_size, size=(B, T))  # includes the padded rows past the tokenizer
    tokens[0] = prompt
    mask = np.ones((B, T), np.int64)
    mask[1, :4] = 0  # left padding of different lengths
    mask[2, :9] = 0
    pos = np.maximum(np.cumsum(mask, -1) - 1, 0)
    with torch.no_grad():
        ref = model(
            input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos)
        ).logits.numpy()
    logits, _ = jax.jit(lambda p, t, m: transformer.forward_logits(p, cfg, t, m))(
        params, jnp.asarray(tokens), jnp.asarray(mask.astype(bool))
    )
    assert logits.shape[-1] == tok.vocab_size  # the table's padded rows are left out (cfg.output_vocab)
    diff = np.abs(np.asarray(logits) - ref[..., : tok.vocab_size])[mask.astype(bool)].max()
    assert diff < 1e-4, f"max |logit diff| {diff}"


@pytest.mark.parametrize("track", ["clipo_gsm8k_qwen25_3b", "clipo_math_qwen25_7b"])
def test_track_config_accepts_the_directory(checkpoint, track, tmp_path):
    _, directory, _ = checkpoint
    config = importlib.import_module(f"configs.{track}").get_config(f"model={directory},data={tmp_path}/clipo")
    assert config.model.source == str(directory) and config.task.tokenizer == str(directory)
    trainer.validate_config(config)
    # The task's tokenizer comes from the same directory (no data files needed for that part).
    config.task.train, config.task.tests = "", ""
    task = tasks.build_task(config.task, str(tmp_path))
    assert task.tokenizer.chat_format == "jinja"
    assert task.encode_prompt({"messages": PROMPT})[:1] == [task.tokenizer.token_to_id("<|im_start|>")]
    cfg, params = trainer.build_model(config, task.tokenizer.vocab_size, jax.random.key(0))
    check_vocab(task.tokenizer, cfg.vocab_size, config.model.source)
    assert cfg.arch == "qwen2" and cfg.dtype == config.model.dtype == "bfloat16"
    ids = jnp.asarray([task.encode_prompt({"messages": PROMPT})])
    logits, _ = transformer.forward_logits(params, cfg, ids, jnp.ones(ids.shape, bool))
    assert logits.shape == (1, ids.shape[1], cfg.vocab_size) and bool(jnp.all(jnp.isfinite(logits)))


# ---------------------------------------------------------------------------------------------
# Bad directories: one line naming the file and what is wrong.
# ---------------------------------------------------------------------------------------------


@pytest.fixture()
def bad_copy(checkpoints, tmp_path):
    directory, _ = checkpoints["tied_f32"]
    copy = tmp_path / "ckpt"
    shutil.copytree(directory, copy)
    return copy


def _one_line_error(path, match):
    with pytest.raises(ModelError, match=match) as info:
        load_hf_dir(str(path))
    assert "\n" not in str(info.value)
    return str(info.value)


def _shard_of(directory, tensor):
    return json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"][tensor]


def test_missing_config(bad_copy):
    (bad_copy / "config.json").unlink()
    assert str(bad_copy) in _one_line_error(bad_copy, "not an HF checkpoint directory \\(no config.json\\)")


def test_missing_shard(bad_copy):
    shard = _shard_of(bad_copy, "model.layers.1.mlp.up_proj.weight")
    (bad_copy / shard).unlink()
    message = _one_line_error(bad_copy, f"shard '{shard}' named in the index is missing \\(1 of \\d+ shards missing\\)")
    assert "model.safetensors.index.json" in message


def test_wrong_shape_tensor(bad_copy):
    from safetensors.numpy import load_file, save_file

    name = "model.layers.0.self_attn.k_proj.weight"
    shard = bad_copy / _shard_of(bad_copy, name)
    tensors = load_file(str(shard))
    tensors[name] = tensors[name][:-1]
    save_file(tensors, str(shard), metadata={"format": "pt"})
    message = _one_line_error(bad_copy, f"tensor '{name}' has shape \\(31, 64\\), expected \\(32, 64\\)")
    assert str(bad_copy) in message


def test_truncated_shard_and_bad_index(bad_copy):
    shard = bad_copy / _shard_of(bad_copy, "model.embed_tokens.weight")
    shard.write_bytes(shard.read_bytes()[:-100])
    _one_line_error(bad_copy, "lies past the end of the file \\(truncated\\?\\)")
    (bad_copy / "model.safetensors.index.json").write_text("{not json")
    _one_line_error(bad_copy, "model.safetensors.index.json: invalid JSON")


def test_unsupported_config_features(bad_copy):
    path = bad_copy / "config.json"
    good = json.loads(path.read_text())
    for change, match in [
        ({"use_sliding_window": True}, "use_sliding_window=true is not supported"),
        (
            {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6}},
            "rope_parameters .* not supported",
        ),
        ({"hidden_act": "gelu"}, "hidden_act='gelu' is not supported"),
        ({"num_attention_heads": None}, "missing field|num_attention_heads"),
    ]:
        path.write_text(json.dumps({k: v for k, v in {**good, **change}.items() if v is not None}))
        assert "config.json" in _one_line_error(bad_copy, match)
