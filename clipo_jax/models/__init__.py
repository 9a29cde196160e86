"""Models: the transformer, checkpoint import and tokenizers."""

from clipo_jax.models.config import PRESETS, ModelConfig, ModelError
from clipo_jax.models.loading import load_gguf, load_hf_dir, load_model, resolve_model_path
from clipo_jax.models.transformer import (
    KVCache,
    Transformer,
    forward,
    forward_logits,
    init_params,
    logits_from_hidden,
    param_logical_axes,
    token_logprobs,
)
