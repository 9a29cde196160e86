"""One decoder-only transformer config covering Llama, Qwen2 and Gemma3 variants."""

from __future__ import annotations

import dataclasses
from typing import Any

# the CPU kernels' vector width in floats (clipo_jax.kernels.LANES): head_dim must be a multiple of it
CPU_KERNEL_LANES = 16


class ModelError(ValueError):
    """A one-line error about a model config, checkpoint file or tensor."""


ARCHITECTURES = ("llama", "qwen2", "gemma3")
# How the attention core is computed (transformer._ATTENTION maps each name to its function):
# "einsum" materialises the scores itself; "dot_product" calls jax.nn.dot_product_attention and
# lets JAX pick the kernel (XLA's in jax 0.10); "cudnn" forces cuDNN's fused flash attention
# (NVIDIA GPUs, bfloat16/float16 compute only; see docs/parts/attention.md).
ATTENTION_IMPLS = ("einsum", "dot_product", "cudnn")


def available_attention_impls(backend: str) -> tuple[str, ...]:
    """The impls that compile on a JAX backend ('cpu', 'gpu', 'tpu')."""
    return ATTENTION_IMPLS if backend == "gpu" else tuple(i for i in ATTENTION_IMPLS if i != "cudnn")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of the decoder. Norm weights are stored as the effective scale.

    Gemma's RMSNorm multiplies by (1 + w); we fold the 1 in at import time so every
    architecture computes `x_normed * scale` and the forward pass has no arch branches
    inside the layer loop except the ones listed here.
    """

    arch: str = "llama"
    vocab_size: int = 256
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int = 16
    d_ff: int = 128
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # Gemma3: sliding-window layers use their own RoPE base; every `global_every`-th layer
    # is global. None means every layer is global.
    rope_local_theta: float | None = None
    sliding_window: int | None = None
    global_every: int = 1
    tie_embeddings: bool = True
    qkv_bias: bool = False
    qk_norm: bool = False
    post_norms: bool = False  # Gemma: norm after attention and after the MLP, before the residual add.
    embed_scale: bool = False  # Gemma: embeddings multiplied by sqrt(d_model).
    activation: str = "silu"  # silu (SwiGLU) or gelu_tanh (GeGLU)
    query_scale: float | None = None  # attention logits scale; default head_dim ** -0.5
    final_logit_softcap: float | None = None
    attn_logit_softcap: float | None = None
    max_seq_len: int = 2048
    # the ids the model may produce: an embedding table padded past its tokenizer (Qwen2.5's 151936
    # rows for 151665 ids) would otherwise sample ids nothing can decode; logits_from_hidden keeps
    # the first output_vocab columns, so sampling, log-probs and entropy all see the same support
    output_vocab: int | None = None
    attention_impl: str = "einsum"  # one of ATTENTION_IMPLS; see docs/parts/attention.md
    # decode steps over the transposed-key cache through clipo_jax.kernels.decode_attention (CPU
    # only; the sampler turns it on where it applies, `Sampler(cpu_decode_kernel=...)`)
    cpu_decode_kernel: bool = False
    dtype: str = "float32"  # compute dtype; params stay float32
    param_dtype: str = "float32"

    def __post_init__(self):
        if self.arch not in ARCHITECTURES:
            raise ModelError(f"unknown architecture {self.arch!r}; expected one of {ARCHITECTURES}")
        if self.n_heads % self.n_kv_heads:
            raise ModelError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.activation not in ("silu", "gelu_tanh"):
            raise ModelError(f"unknown activation {self.activation!r}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ModelError(
                f"ModelConfig.attention_impl={self.attention_impl!r} is unknown; expected one of {ATTENTION_IMPLS}"
            )
        if self.cpu_decode_kernel and self.head_dim % CPU_KERNEL_LANES:
            raise ModelError(
                f"ModelConfig.cpu_decode_kernel needs a head_dim that is a multiple of {CPU_KERNEL_LANES}, "
                f"got {self.head_dim}"
            )
        if self.attention_impl == "cudnn" and self.dtype not in ("bfloat16", "float16"):
            raise ModelError(
                f"ModelConfig.attention_impl='cudnn' needs a bfloat16 or float16 compute dtype, got {self.dtype!r}"
            )
        if self.attention_impl in ("dot_product", "cudnn") and self.attn_logit_softcap is not None:
            # jax.nn.dot_product_attention takes an additive bias, not a tanh cap on the scores
            raise ModelError(
                f"ModelConfig.attention_impl={self.attention_impl!r} cannot apply attn_logit_softcap; "
                "use 'einsum' for this model"
            )
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff"):
            if int(getattr(self, name)) <= 0:
                raise ModelError(f"ModelConfig.{name} must be positive, got {getattr(self, name)}")
        if self.output_vocab is not None and not 0 < self.output_vocab <= self.vocab_size:
            raise ModelError(
                f"ModelConfig.output_vocab must be in [1, vocab_size={self.vocab_size}], got {self.output_vocab}"
            )

    @property
    def scale(self) -> float:
        return self.query_scale if self.query_scale is not None else self.head_dim**-0.5

    def layer_is_global(self, layer: int) -> bool:
        if self.sliding_window is None:
            return True
        return (layer + 1) % self.global_every == 0

    def replace(self, **kw: Any) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    def num_params(self) -> int:
        d, f, hd = self.d_model, self.d_ff, self.head_dim
        attn = d * hd * (self.n_heads * 2 + self.n_kv_heads * 2)
        if self.qkv_bias:
            attn += hd * (self.n_heads + 2 * self.n_kv_heads)
        norms = 2 * d + (2 * hd if self.qk_norm else 0) + (2 * d if self.post_norms else 0)
        per_layer = attn + 3 * d * f + norms
        emb = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        return self.n_layers * per_layer + emb + d


def llama_like(**kw) -> ModelConfig:
    return ModelConfig(arch="llama", **kw)


# Named presets. Real-model configs come from the checkpoint's metadata at import time;
# these presets give shapes for tests, benchmarks and the embedded demo.
PRESETS: dict[str, ModelConfig] = {
    "tiny_llama": ModelConfig(
        arch="llama",
        vocab_size=128,
        d_model=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        head_dim=16,
        d_ff=128,
        norm_eps=1e-5,
    ),
    "tiny_qwen2": ModelConfig(
        arch="qwen2",
        vocab_size=128,
        d_model=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        head_dim=16,
        d_ff=128,
        norm_eps=1e-6,
        rope_theta=1e6,
        tie_embeddings=False,
        qkv_bias=True,
    ),
    "tiny_gemma3": ModelConfig(
        arch="gemma3",
        vocab_size=128,
        d_model=64,
        n_layers=6,
        n_heads=4,
        n_kv_heads=1,
        head_dim=32,
        d_ff=128,
        norm_eps=1e-6,
        rope_theta=1e6,
        rope_local_theta=1e4,
        sliding_window=8,
        global_every=6,
        qk_norm=True,
        post_norms=True,
        embed_scale=True,
        activation="gelu_tanh",
        query_scale=32**-0.5,
    ),
    "smollm2_135m": ModelConfig(
        arch="llama",
        vocab_size=49152,
        d_model=576,
        n_layers=30,
        n_heads=9,
        n_kv_heads=3,
        head_dim=64,
        d_ff=1536,
        norm_eps=1e-5,
        rope_theta=100000.0,
        tie_embeddings=True,
        max_seq_len=8192,
    ),
    # Qwen2.5 shapes from their published config.json files (no weights: for plans, benches and
    # random-weight checks; real checkpoints load their own config).
    "qwen25_0_5b": ModelConfig(
        arch="qwen2",
        vocab_size=151936,
        d_model=896,
        n_layers=24,
        n_heads=14,
        n_kv_heads=2,
        head_dim=64,
        d_ff=4864,
        norm_eps=1e-6,
        rope_theta=1e6,
        tie_embeddings=True,
        qkv_bias=True,
        max_seq_len=32768,
    ),
    "qwen25_3b": ModelConfig(
        arch="qwen2",
        vocab_size=151936,
        d_model=2048,
        n_layers=36,
        n_heads=16,
        n_kv_heads=2,
        head_dim=128,
        d_ff=11008,
        norm_eps=1e-6,
        rope_theta=1e6,
        tie_embeddings=True,
        qkv_bias=True,
        max_seq_len=32768,
    ),
    "qwen25_7b": ModelConfig(
        arch="qwen2",
        vocab_size=152064,
        d_model=3584,
        n_layers=28,
        n_heads=28,
        n_kv_heads=4,
        head_dim=128,
        d_ff=18944,
        norm_eps=1e-6,
        rope_theta=1e6,
        tie_embeddings=False,
        qkv_bias=True,
        max_seq_len=32768,
    ),
}
