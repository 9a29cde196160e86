"""Prompt rendering with a tokenizer's chat template, and prompt-length filtering.

``tokenizer`` is anything with ``apply_chat_template(messages, tokenize=False,
add_generation_prompt=True) -> str`` (HF tokenizers do) and, for ``filter_overlong``, an
``encode(text) -> list[int]`` (or being callable ``tokenizer(text)["input_ids"]``).
"""

from __future__ import annotations

import logging
from typing import Sequence

from clipo_jax.data.datasets import Example

logger = logging.getLogger(__name__)


def render_prompt(tokenizer, example: Example, chat: bool = True) -> str:
    """The prompt string the policy sees.

    ``chat=True``: the model's chat template with the generation prompt appended (the assistant
    turn is opened). ``chat=False``: message contents joined by blank lines (base models).
    """
    if chat:
        if not hasattr(tokenizer, "apply_chat_template"):
            raise TypeError(
                f"render_prompt(chat=True): {type(tokenizer).__name__} has no "
                "apply_chat_template; pass chat=False for base models"
            )
        text = tokenizer.apply_chat_template(example.prompt_messages, tokenize=False, add_generation_prompt=True)
        if not isinstance(text, str):
            raise TypeError(f"apply_chat_template returned {type(text).__name__}, expected str")
        return text
    return "\n\n".join(m["content"] for m in example.prompt_messages)


def count_tokens(tokenizer, text: str) -> int:
    """Number of tokens of an already rendered prompt (no extra special tokens added)."""
    if hasattr(tokenizer, "encode"):
        try:
            ids = tokenizer.encode(text, add_special_tokens=False)
        except TypeError:  # encoders without that keyword (sentencepiece-style)
            ids = tokenizer.encode(text)
    else:
        ids = tokenizer(text)["input_ids"]
    if hasattr(ids, "ids"):  # tokenizers.Encoding
        ids = ids.ids
    return len(ids)


def filter_overlong(
    examples: Sequence[Example], tokenizer, max_prompt_tokens: int, chat: bool = True
) -> tuple[list[Example], int]:
    """(examples whose rendered prompt fits in ``max_prompt_tokens``, number dropped)."""
    if max_prompt_tokens <= 0:
        raise ValueError(f"filter_overlong: max_prompt_tokens must be > 0, got {max_prompt_tokens}")
    kept = [ex for ex in examples if count_tokens(tokenizer, render_prompt(tokenizer, ex, chat)) <= max_prompt_tokens]
    n_dropped = len(examples) - len(kept)
    if n_dropped:
        logger.info(
            "filter_overlong: dropped %d of %d prompts longer than %d tokens",
            n_dropped,
            len(examples),
            max_prompt_tokens,
        )
    return kept, n_dropped


__all__ = ["count_tokens", "filter_overlong", "render_prompt"]
