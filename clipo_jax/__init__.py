"""clipo_jax: RLVR post-training of language models in JAX (CLIPO, OpenRS)."""

__version__ = "0.1.0"
