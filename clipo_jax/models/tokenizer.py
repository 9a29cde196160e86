"""Tokenizers: SentencePiece `.model`, HF `tokenizer.json`, and the vocabulary inside a GGUF file.

Every backend implements the small `Tokenizer` interface used by sampling, data and reward code:

    tok = load_tokenizer("SmolLM2-135M-Instruct.Q4_1.gguf")   # or a .model / tokenizer.json / dir
    ids = tok.encode("What is 2+2?")                            # list[int], no BOS unless asked
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    prompt_ids = tok.encode_chat([{"role": "user", "content": "hi"}])
    tok.decode(ids), tok.stop_ids, tok.pad_id
    check_vocab(tok, model_vocab_size=49152, source="model.gguf")

Chat prompts are rendered from the checkpoint's own jinja template (tokenizer_config.json,
chat_template.jinja or GGUF `tokenizer.chat_template`) in a sandbox (`chat_template.py`), with the
semantics of HF transformers' `apply_chat_template`. Only a checkpoint without a template (or a caller
that names a format) uses the built-in Python renderers in `CHAT_TEMPLATES` ("chatml", "gemma",
"plain"), picked from the vocabulary; adding one means one function plus one registry entry (and,
optionally, a marker in `_TEMPLATE_MARKERS` for auto-detection).

GGUF vocabularies are rebuilt the way llama.cpp reads them: `tokenizer.ggml.model == "gpt2"` becomes
a byte-level BPE (`tokenizers`) with the split regex named by `tokenizer.ggml.pre`
(`PRE_TOKENIZER_SPLITS`), and `"llama"` becomes a SentencePiece BPE ModelProto built from the
tokens, scores and token types (Gemma 3, Llama 2, Mistral files).
"""

from __future__ import annotations

import abc
import io
import json
import logging
import os
import re
import secrets
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from clipo_jax.models.chat_template import ChatTemplateError, JinjaChatTemplate

logger = logging.getLogger(__name__)

__all__ = [
    "CHAT_TEMPLATES",
    "PRE_TOKENIZER_SPLITS",
    "HFTokenizer",
    "SentencePieceTokenizer",
    "Tokenizer",
    "TokenizerError",
    "byte_level_alphabet",
    "check_vocab",
    "detect_chat_template",
    "load_gguf_tokenizer",
    "load_tokenizer",
    "read_gguf_metadata",
    "read_gguf_vocab",
    "render_chat",
    "train_sentencepiece",
]


class TokenizerError(ValueError):
    """A tokenizer file is missing/corrupt, or a tokenizer does not fit a model. One-line message."""


# Tokens that end an assistant turn in the chat formats we know; `stop_ids` adds the ones present.
# Llama 3.x Instruct names <|eot_id|> its EOS but also ends on <|end_of_text|> and <|eom_id|>.
END_OF_TURN_TOKENS = (
    "<|im_end|>",
    "<end_of_turn>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end_of_text|>",
    "<|endoftext|>",
    "<|end|>",
)
# Names tried for EOS when a tokenizer.json comes without a tokenizer_config.json.
_EOS_FALLBACK_NAMES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "<|im_end|>")
_BOS_FALLBACK_NAMES = ("<s>", "<bos>", "<|begin_of_text|>")


# ---------------------------------------------------------------------------------------------
# Built-in chat formats: Python renderers, picked by name. They are the fallback for checkpoints that
# carry no jinja template (e.g. the Gemma 3 GGUF) and what an explicit `chat_template=` name selects.
# ---------------------------------------------------------------------------------------------


def _check_messages(messages: Sequence[Mapping[str, Any]]) -> None:
    if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)):
        raise TokenizerError(f"chat messages must be a list of dicts, got {type(messages).__name__}")
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            raise TokenizerError(f"chat message {i} must be a dict with 'role' and 'content', got {message!r:.80}")
        if not isinstance(message["role"], str) or not isinstance(message["content"], str):
            raise TokenizerError(f"chat message {i}: 'role' and 'content' must be strings")


def render_chatml(messages, add_generation_prompt: bool, default_system: str | None) -> str:
    """ChatML (SmolLM2, Qwen2.5): `<|im_start|>role\\ncontent<|im_end|>\\n` per turn.

    `default_system` is inserted when the conversation has no system turn, as the model's own
    template does (SmolLM2: "You are a helpful AI assistant named SmolLM, ...").
    """
    parts = []
    if default_system is not None and (not messages or messages[0]["role"] != "system"):
        parts.append(f"<|im_start|>system\n{default_system}<|im_end|>\n")
    for message in messages:
        parts.append(f"<|im_start|>{message['role']}\n{message['content']}<|im_end|>\n")
    if add_generation_prompt:
        parts.append("<|im_start|>assistant\n")
    return "".join(parts)


def render_gemma(messages, add_generation_prompt: bool, default_system: str | None, bos_token: str = "<bos>") -> str:
    """Gemma: `<bos><start_of_turn>user\\n...<end_of_turn>\\n<start_of_turn>model\\n`.

    Gemma has no system role: a leading system message is prepended to the first user turn,
    separated by a blank line. Roles must alternate user/assistant; contents are stripped.
    """
    del default_system  # Gemma's template has none.
    prefix = ""
    if messages and messages[0]["role"] == "system":
        prefix = messages[0]["content"] + "\n\n"
        messages = messages[1:]
    parts = [bos_token]
    for i, message in enumerate(messages):
        if (message["role"] == "user") != (i % 2 == 0):
            raise TokenizerError(
                f"gemma chat template: message roles must alternate user/assistant, message {i} is {message['role']!r}"
            )
        role = "model" if message["role"] == "assistant" else message["role"]
        first = prefix if i == 0 else ""
        parts.append(f"<start_of_turn>{role}\n{first}{message['content'].strip()}<end_of_turn>\n")
    if add_generation_prompt:
        parts.append("<start_of_turn>model\n")
    return "".join(parts)


def render_plain(messages, add_generation_prompt: bool, default_system: str | None) -> str:
    """No chat format (base models, the synthetic task): message contents joined by a blank line.

    Roles are dropped; `add_generation_prompt` adds nothing (the model just continues the text).
    """
    del add_generation_prompt
    contents = [m["content"] for m in messages]
    if default_system is not None and (not messages or messages[0]["role"] != "system"):
        contents.insert(0, default_system)
    return "\n\n".join(contents)


# name -> fn(messages, add_generation_prompt, default_system) -> str
CHAT_TEMPLATES: dict[str, Callable[..., str]] = {
    "chatml": render_chatml,
    "gemma": render_gemma,
    "plain": render_plain,
}
# Substrings of a jinja template (or vocabulary tokens) that identify each format, checked in order.
_TEMPLATE_MARKERS = (("<|im_start|>", "chatml"), ("<start_of_turn>", "gemma"))

# ChatML templates spell the default system turn as a literal; the newline is either real (GGUF
# metadata) or a jinja escape "\n" (tokenizer_config.json).
_CHATML_DEFAULT_SYSTEM = re.compile(r"<\|im_start\|>system(?:\n|\\n)([^'\"{}+]+?)<\|im_end\|>")


def detect_chat_template(template: str | None, vocab: Iterable[str] = (), warn: bool = True) -> tuple[str, str | None]:
    """Pick the `CHAT_TEMPLATES` name closest to a model's jinja template (or, without one, its vocab).

    Returns `(name, default_system_prompt or None)`. Unknown templates give "plain" (with a warning
    if `warn`). Tokenizers render with the jinja template itself when there is one; this name is the
    built-in fallback.
    """
    if template:
        for marker, name in _TEMPLATE_MARKERS:
            if marker in template:
                default_system = None
                if name == "chatml":
                    match = _CHATML_DEFAULT_SYSTEM.search(template)
                    if match:
                        default_system = match.group(1).replace("\\n", "\n")
                return name, default_system
        if warn:
            logger.warning("unrecognised chat template (%.60r...); using 'plain'", template)
        return "plain", None
    vocab = set(vocab)
    for marker, name in _TEMPLATE_MARKERS:
        if marker in vocab:
            logger.info("no chat template in the tokenizer; %s found in the vocabulary -> %r", marker, name)
            return name, None
    return "plain", None


def render_chat(
    name: str, messages, add_generation_prompt: bool = True, default_system: str | None = None, **kw
) -> str:
    """Render `messages` with the `CHAT_TEMPLATES[name]` format."""
    if name not in CHAT_TEMPLATES:
        raise TokenizerError(f"unknown chat template {name!r}; known: {sorted(CHAT_TEMPLATES)}")
    _check_messages(messages)
    return CHAT_TEMPLATES[name](list(messages), add_generation_prompt, default_system, **kw)


# ---------------------------------------------------------------------------------------------
# The interface.
# ---------------------------------------------------------------------------------------------


class Tokenizer(abc.ABC):
    """Text <-> ids. `source` names the file it came from (used in every error message).

    Subclasses implement `_encode`, `_decode`, `vocab_size`, `token_to_id`, `id_to_token`,
    `special_ids`; everything else (BOS handling, chat, stop ids, range checks) lives here.
    """

    def __init__(
        self,
        *,
        source: str,
        bos_id: int | None,
        eos_id: int,
        pad_id: int | None = None,
        add_bos_token: bool = False,
        chat_template: str = "plain",
        default_system: str | None = None,
        jinja_template: JinjaChatTemplate | None = None,
        extra_stop_ids: Sequence[int] = (),
    ):
        if chat_template not in CHAT_TEMPLATES:
            raise TokenizerError(f"{source}: unknown chat template {chat_template!r}; known: {sorted(CHAT_TEMPLATES)}")
        self.source = source
        self._bos_id = bos_id
        self._eos_id = eos_id
        self._pad_id = pad_id
        # Whether the model was trained with BOS in front of every sequence (GGUF add_bos_token).
        self.add_bos_token = add_bos_token
        # The checkpoint's own template renders chat prompts when present; `chat_template` names the
        # built-in format used without one (and the closest built-in format otherwise).
        self.chat_template = chat_template
        self.default_system = default_system
        self.jinja_template = jinja_template
        self._extra_stop_ids = tuple(int(i) for i in extra_stop_ids)  # generation_config.json's eos_token_id

    # --- backend hooks ---
    @abc.abstractmethod
    def _encode(self, text: str, parse_special: bool) -> list[int]: ...

    @abc.abstractmethod
    def _decode(self, ids: list[int], skip_special_tokens: bool) -> str: ...

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Number of ids (including special/added tokens): every id is in [0, vocab_size)."""

    @abc.abstractmethod
    def token_to_id(self, token: str) -> int | None: ...

    @abc.abstractmethod
    def id_to_token(self, token_id: int) -> str: ...

    def _special_texts(self) -> list[str]:
        """The texts that ``encode(parse_special=True)`` turns into control ids."""
        return []

    # --- public API ---
    @property
    def bos_id(self) -> int | None:
        return self._bos_id

    @property
    def eos_id(self) -> int:
        return self._eos_id

    @property
    def pad_id(self) -> int:
        """Padding id; EOS when the tokenizer defines none (padding is always masked out)."""
        return self._eos_id if self._pad_id is None else self._pad_id

    @property
    def stop_ids(self) -> list[int]:
        """Ids that end generation, sorted: EOS, the ids of generation_config.json's eos_token_id
        next to an HF tokenizer, and any end-of-turn token in the vocabulary."""
        ids = {self._eos_id, *self._extra_stop_ids}
        for token in END_OF_TURN_TOKENS:
            token_id = self.token_to_id(token)
            if token_id is not None:
                ids.add(token_id)
        return sorted(ids)

    def encode(self, text: str, add_bos: bool = False, *, parse_special: bool = True) -> list[int]:
        """`text` -> ids `[seq]`. Special tokens written in the text (e.g. `<|im_start|>`) become
        their ids unless `parse_special=False` (use that for untrusted user content)."""
        if not isinstance(text, str):
            raise TokenizerError(f"{self.source}: encode expects str, got {type(text).__name__}")
        ids = self._encode(text, parse_special)
        if add_bos:
            if self._bos_id is None:
                raise TokenizerError(f"{self.source}: add_bos=True but this tokenizer has no BOS token")
            ids = [self._bos_id] + ids
        return ids

    def encode_batch(
        self, texts: Sequence[str], add_bos: bool = False, *, parse_special: bool = True
    ) -> list[list[int]]:
        """Encode each text; ragged `[batch][seq_i]` (pad later with `pad_id`)."""
        return [self.encode(t, add_bos, parse_special=parse_special) for t in texts]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """ids `[seq]` -> text. Out-of-range ids raise TokenizerError."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise TokenizerError(f"{self.source}: token id {bad[0]} out of range [0, {self.vocab_size})")
        return self._decode(ids, skip_special_tokens)

    @property
    def chat_format(self) -> str:
        """What renders chat prompts: "jinja" (the checkpoint's template) or a `CHAT_TEMPLATES` name."""
        return "jinja" if self.jinja_template is not None else self.chat_template

    def template_special_tokens(self) -> dict[str, str]:
        """Special-token strings a jinja template sees as variables (bos_token, eos_token, pad_token)."""
        out = {}
        for key, token_id in (("bos_token", self._bos_id), ("eos_token", self._eos_id), ("pad_token", self._pad_id)):
            if token_id is not None:
                out[key] = self.id_to_token(token_id)
        return out

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        *,
        tokenize: bool = False,
        **template_vars: Any,
    ):
        """Render a conversation `[{"role", "content"}, ...]` in this model's chat format (text, or
        ids with `tokenize=True`). `template_vars` reach a jinja template as variables (e.g. `tools`,
        `enable_thinking`, `date_string`); the built-in formats ignore them."""
        if tokenize:
            return self.encode_chat(messages, add_generation_prompt, **template_vars)
        _check_messages(messages)
        if self.jinja_template is not None:
            try:
                return self.jinja_template.render(
                    messages, add_generation_prompt, self.template_special_tokens(), **template_vars
                )
            except ChatTemplateError as e:
                raise TokenizerError(str(e)) from None
        kw = {}
        if self.chat_template == "gemma":
            kw["bos_token"] = self.id_to_token(self._bos_id) if self._bos_id is not None else ""
        return render_chat(self.chat_template, messages, add_generation_prompt, self.default_system, **kw)

    def encode_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        *,
        literal_content: bool = False,
        **template_vars: Any,
    ) -> list[int]:
        """Chat prompt ids: the rendered text with its special tokens parsed. BOS is added only if the
        model wants one and the template has not written it (templates normally write it themselves,
        and then the ids equal HF's `apply_chat_template(..., tokenize=True)`).

        ``literal_content=True``: special-token text inside a message's content (``<|im_end|>``
        typed by a policy whose response a judge reads) stays plain text, so it cannot close its
        turn and write the judge's answer; only the template's own markup becomes control ids.
        Without it the ids are HF's, which parse specials everywhere."""
        if literal_content:
            text, literals = self.chat_text_with_literals(messages, add_generation_prompt, **template_vars)
        else:
            text, literals = self.apply_chat_template(messages, add_generation_prompt, **template_vars), {}
        return self.encode_with_literals(text, literals, add_bos=self.wants_bos(text))

    def wants_bos(self, text: str) -> bool:
        """Whether ``text`` (a rendered chat prompt) needs a BOS id in front: the model wants one and
        the template has not written it."""
        bos_text = self.id_to_token(self._bos_id) if self._bos_id is not None else None
        return self.add_bos_token and bos_text is not None and not text.startswith(bos_text)

    def chat_text_with_literals(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True, **template_vars: Any
    ) -> tuple[str, dict[str, str]]:
        """The rendered chat text with every special-token text of the messages' contents replaced
        by a marker, and {marker: the text it stands for}; ``encode_with_literals`` encodes the
        markers as plain text. The markers carry a random nonce, so content cannot forge one."""
        texts = sorted(set(self._special_texts()), key=len, reverse=True)
        literals: dict[str, str] = {}
        if texts:
            pattern = re.compile("|".join(map(re.escape, texts)))
            nonce = secrets.token_hex(8)

            def mark(match):
                marker = f"\ue000{nonce}:{len(literals)}\ue001"
                literals[marker] = match.group()
                return marker

            messages = [
                {**m, "content": pattern.sub(mark, m["content"])}
                if isinstance(m, Mapping) and isinstance(m.get("content"), str)
                else m
                for m in messages
            ]
        return self.apply_chat_template(messages, add_generation_prompt, **template_vars), literals

    def encode_with_literals(self, text: str, literals: Mapping[str, str], add_bos: bool = False) -> list[int]:
        """``encode(text)`` with each marker of ``literals`` encoded as its plain text
        (``parse_special=False``)."""
        if not literals:
            return self.encode(text, add_bos=add_bos)
        ids = [self._bos_id] if add_bos else []
        start = 0
        for match in re.finditer("|".join(map(re.escape, literals)), text):
            ids += self.encode(text[start : match.start()])
            ids += self.encode(literals[match.group()], parse_special=False)
            start = match.end()
        return ids + self.encode(text[start:])

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(source={self.source!r}, vocab_size={self.vocab_size}, bos={self._bos_id}, "
            f"eos={self._eos_id}, pad={self.pad_id}, chat_format={self.chat_format!r})"
        )


# ---------------------------------------------------------------------------------------------
# Backend (a): SentencePiece.
# ---------------------------------------------------------------------------------------------


class SentencePieceTokenizer(Tokenizer):
    """A `sentencepiece` processor. Control pieces (`<bos>`, `<start_of_turn>`, ...) written in the
    text are matched here (SentencePiece itself only matches user-defined pieces), as llama.cpp does;
    each text span between them is encoded separately."""

    def __init__(self, processor, *, source: str, **kw):
        self.sp = processor
        n = processor.get_piece_size()
        self._control = {i for i in range(n) if processor.is_control(i)}
        pieces = sorted((processor.id_to_piece(i) for i in self._control), key=len, reverse=True)
        pieces = [p for p in pieces if p]
        self._special_re = re.compile("|".join(map(re.escape, pieces))) if pieces else None
        self._control_pieces = pieces
        self._piece_to_control = {processor.id_to_piece(i): i for i in self._control}
        defaults = dict(
            bos_id=_none_if_negative(processor.bos_id()),
            eos_id=processor.eos_id(),
            pad_id=_none_if_negative(processor.pad_id()),
        )
        defaults.update(kw)
        if defaults["eos_id"] is None or defaults["eos_id"] < 0:
            raise TokenizerError(f"{source}: SentencePiece model has no EOS piece")
        super().__init__(source=source, **defaults)

    @classmethod
    def from_file(cls, path: str, **kw) -> SentencePieceTokenizer:
        import sentencepiece as spm

        processor = spm.SentencePieceProcessor()
        try:
            with open(path, "rb") as f:
                processor.LoadFromSerializedProto(f.read())
        except OSError as e:
            raise TokenizerError(f"{path}: cannot read tokenizer file ({e.strerror})") from None
        except Exception as e:  # sentencepiece raises RuntimeError/OSError with multi-line text
            raise TokenizerError(f"{path}: not a valid SentencePiece model ({_one_line(e)})") from None
        return cls(processor, source=str(path), **kw)

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def token_to_id(self, token: str) -> int | None:
        token_id = self.sp.piece_to_id(token)
        # piece_to_id returns unk for unknown pieces.
        return token_id if self.sp.id_to_piece(token_id) == token else None

    def id_to_token(self, token_id: int) -> str:
        return self.sp.id_to_piece(token_id)

    def _special_texts(self) -> list[str]:
        return list(self._control_pieces)

    def _encode(self, text: str, parse_special: bool) -> list[int]:
        if not parse_special or self._special_re is None:
            return self.sp.encode(text) if text else []
        ids: list[int] = []
        start = 0
        for match in self._special_re.finditer(text):
            if match.start() > start:
                ids.extend(self.sp.encode(text[start : match.start()]))
            ids.append(self._piece_to_control[match.group()])
            start = match.end()
        if start < len(text):
            ids.extend(self.sp.encode(text[start:]))
        return ids

    def _decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        if skip_special_tokens:
            return self.sp.decode([i for i in ids if i not in self._control])
        # Keep control pieces as text: decode the spans between them.
        out, span = [], []
        for i in ids:
            if i in self._control:
                if span:
                    out.append(self.sp.decode(span))
                    span = []
                out.append(self.sp.id_to_piece(i))
            else:
                span.append(i)
        if span:
            out.append(self.sp.decode(span))
        return "".join(out)


def _none_if_negative(x: int) -> int | None:
    return None if x < 0 else x


def train_sentencepiece(
    lines: Iterable[str],
    vocab_size: int,
    out_path: str,
    *,
    model_type: str = "bpe",
    user_defined_symbols: Sequence[str] = (),
    control_symbols: Sequence[str] = (),
    unk_id: int = 0,
    bos_id: int = 1,
    eos_id: int = 2,
    pad_id: int = 3,
    add_dummy_prefix: bool = False,
    byte_fallback: bool = True,
    chat_template: str = "plain",
    **options: Any,
) -> SentencePieceTokenizer:
    """Train a SentencePiece model on `lines` and write it to `out_path` (deterministic: one thread,
    no sampling/shuffling of the input). Ids for unk/bos/eos/pad are fixed by the arguments (-1 to
    drop one); `user_defined_symbols` are always single tokens (e.g. "<answer>"); extra `options`
    go to `SentencePieceTrainer.train` (e.g. `character_coverage=0.9995`, `hard_vocab_limit=False`).
    """
    import sentencepiece as spm

    model = io.BytesIO()
    settings = dict(
        vocab_size=vocab_size,
        model_type=model_type,
        user_defined_symbols=list(user_defined_symbols),
        control_symbols=list(control_symbols),
        unk_id=unk_id,
        bos_id=bos_id,
        eos_id=eos_id,
        pad_id=pad_id,
        add_dummy_prefix=add_dummy_prefix,
        byte_fallback=byte_fallback,
        character_coverage=1.0,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        # Determinism: no random subsampling or shuffling, single-threaded merges.
        input_sentence_size=0,
        shuffle_input_sentence=False,
        num_threads=1,
        minloglevel=2,
    )
    settings.update(options)
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model, **settings)
    except Exception as e:
        raise TokenizerError(f"train_sentencepiece({out_path}): {_one_line(e)}") from None
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(out_path, "wb") as f:
        f.write(model.getvalue())
    return load_tokenizer(out_path, chat_template=chat_template)


# ---------------------------------------------------------------------------------------------
# Backend (b): HF `tokenizers`.
# ---------------------------------------------------------------------------------------------


class HFTokenizer(Tokenizer):
    """A `tokenizers.Tokenizer` (tokenizer.json, or a BPE rebuilt from GGUF). Its post-processor is
    never used: BOS is added by `encode(add_bos=True)` only."""

    def __init__(self, tokenizer, *, source: str, missing_bytes: bytes = b"", **kw):
        self.tk = tokenizer
        self._plain = None  # a copy that treats special-token text as plain text (parse_special=False)
        # Byte-level vocabularies may lack a few bytes (SmolLM2: some ASCII controls and the UTF-8
        # lead bytes of planes 4-16); those bytes are dropped by BPE, so count them and warn once.
        self.missing_bytes = bytes(missing_bytes)
        self.dropped_bytes = 0
        super().__init__(source=source, **kw)

    def _count_dropped(self, text: str) -> None:
        if self.missing_bytes:
            raw = text.encode("utf-8", "surrogatepass")
            n = len(raw) - len(raw.translate(None, self.missing_bytes))
            if n:
                if self.dropped_bytes == 0:
                    logger.warning(
                        "%s: dropping bytes that have no token (e.g. in %.40r); counted in dropped_bytes",
                        self.source,
                        text,
                    )
                self.dropped_bytes += n

    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.tk.token_to_id(token)

    def id_to_token(self, token_id: int) -> str:
        return self.tk.id_to_token(token_id)

    def _special_texts(self) -> list[str]:
        # the added tokens that parse_special=False (encode_special_tokens) leaves as plain text
        return [t.content for t in self.tk.get_added_tokens_decoder().values() if t.special and t.content]

    def _plain_tokenizer(self):
        if self._plain is None:
            from tokenizers import Tokenizer as TkTokenizer

            self._plain = TkTokenizer.from_str(self.tk.to_str())
            self._plain.encode_special_tokens = True
        return self._plain

    def _encode(self, text: str, parse_special: bool) -> list[int]:
        self._count_dropped(text)
        tk = self.tk if parse_special else self._plain_tokenizer()
        return tk.encode(text, add_special_tokens=False).ids

    def encode_batch(
        self, texts: Sequence[str], add_bos: bool = False, *, parse_special: bool = True
    ) -> list[list[int]]:
        # The Rust batch encoder runs in parallel threads.
        if add_bos and self._bos_id is None:
            raise TokenizerError(f"{self.source}: add_bos=True but this tokenizer has no BOS token")
        for text in texts:
            self._count_dropped(text)
        tk = self.tk if parse_special else self._plain_tokenizer()
        bos = [self._bos_id] if add_bos else []
        return [bos + e.ids for e in tk.encode_batch(list(texts), add_special_tokens=False)]

    def _decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        return self.tk.decode(ids, skip_special_tokens=skip_special_tokens)

    @classmethod
    def from_file(cls, path: str, chat_template: str | None = None) -> HFTokenizer:
        """Load tokenizer.json; special tokens and chat template from tokenizer_config.json /
        chat_template.jinja next to it when present."""
        from tokenizers import Tokenizer as TkTokenizer

        try:
            tk = TkTokenizer.from_file(path)
        except Exception as e:
            if not os.path.exists(path):
                raise TokenizerError(f"{path}: tokenizer file not found") from None
            raise TokenizerError(f"{path}: not a valid tokenizer.json ({_one_line(e)})") from None
        config = _read_tokenizer_config(os.path.dirname(os.path.abspath(path)))
        vocab = tk.get_vocab(with_added_tokens=True)

        def token_id(key: str, fallbacks: Sequence[str]) -> int | None:
            name = _token_content(config.get(key))
            if name is not None:
                if name not in vocab:
                    raise TokenizerError(f"{path}: tokenizer_config.json {key}={name!r} is not in the vocabulary")
                return vocab[name]
            return next((vocab[n] for n in fallbacks if n in vocab), None)

        eos_id = token_id("eos_token", _EOS_FALLBACK_NAMES)
        if eos_id is None:
            raise TokenizerError(f"{path}: no EOS token (add tokenizer_config.json with eos_token)")
        bos_id = token_id("bos_token", _BOS_FALLBACK_NAMES if not config else ())
        pad_id = token_id("pad_token", ())
        name, default_system, jinja = _resolve_template(chat_template, config.get("chat_template"), vocab, path)
        n_ids = tk.get_vocab_size(with_added_tokens=True)
        extra_stops = [i for i in _generation_eos_ids(os.path.dirname(os.path.abspath(path))) if 0 <= i < n_ids]
        return cls(
            tk,
            source=str(path),
            bos_id=bos_id,
            eos_id=eos_id,
            pad_id=pad_id,
            add_bos_token=bool(config.get("add_bos_token", False)) and bos_id is not None,
            chat_template=name,
            default_system=default_system,
            jinja_template=jinja,
            extra_stop_ids=extra_stops,
        )


def _generation_eos_ids(directory: str) -> list[int]:
    """eos_token_id (an int or a list) of generation_config.json in `directory`, [] without one:
    the ids HF's generate stops on, which can be more than tokenizer_config.json's one EOS."""
    path = os.path.join(directory, "generation_config.json")
    if not os.path.exists(path):
        return []
    try:
        with open(path) as f:
            value = json.load(f).get("eos_token_id")
    except (OSError, json.JSONDecodeError, AttributeError) as e:
        raise TokenizerError(f"{path}: cannot parse generation config ({_one_line(e)})") from None
    values = value if isinstance(value, list) else [value]
    return [int(v) for v in values if isinstance(v, int) and not isinstance(v, bool)]


def _token_content(value) -> str | None:
    # tokenizer_config.json writes a special token as a string or as {"content": ..., ...}.
    if isinstance(value, dict):
        return value.get("content")
    return value


def _read_tokenizer_config(directory: str) -> dict:
    config: dict = {}
    path = os.path.join(directory, "tokenizer_config.json")
    if os.path.exists(path):
        try:
            with open(path) as f:
                config = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise TokenizerError(f"{path}: cannot parse tokenizer config ({_one_line(e)})") from None
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        by_name = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        config["chat_template"] = by_name.get("default") or next(iter(by_name.values()), None)
    jinja_path = os.path.join(directory, "chat_template.jinja")
    if os.path.exists(jinja_path):  # as in HF transformers, the file takes priority over the config entry
        with open(jinja_path) as f:
            config["chat_template"] = f.read()
    return config


def _resolve_template(explicit: str | None, template: str | None, vocab: Iterable[str], source: str):
    """(built-in format name, its default system prompt, compiled jinja template or None).

    The checkpoint's jinja template renders unless `explicit` names a built-in format; a template that
    does not compile is an error here, at load time, rather than at the first prompt.
    """
    if explicit is not None:
        if explicit not in CHAT_TEMPLATES:
            raise TokenizerError(f"{source}: unknown chat template {explicit!r}; known: {sorted(CHAT_TEMPLATES)}")
        detected, default_system = detect_chat_template(template, vocab, warn=False)
        return explicit, default_system if detected == explicit else None, None
    if not template:
        name, default_system = detect_chat_template(None, vocab)
        logger.info("%s: no chat template in the checkpoint; using the built-in %r format", source, name)
        return name, default_system, None
    try:
        jinja = JinjaChatTemplate(template, origin=source)
    except ChatTemplateError as e:
        raise TokenizerError(
            f"{e}; pass chat_template= one of {sorted(CHAT_TEMPLATES)} to use a built-in format instead"
        ) from None
    name, default_system = detect_chat_template(template, vocab, warn=False)
    return name, default_system, jinja


# ---------------------------------------------------------------------------------------------
# Backend (c): the vocabulary inside a GGUF file.
# ---------------------------------------------------------------------------------------------

_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# tokenizer.ggml.pre -> (list of split regexes applied in turn, ignore_merges). Llama 3 looks a word
# up whole before merging (ignore_merges), as its tokenizer.json and llama.cpp do. Unknown names
# fall back to "default" (GPT-2's regex) with a warning. Add a model by adding a row.
PRE_TOKENIZER_SPLITS: dict[str, tuple[list[str], bool]] = {
    "default": ([_GPT2_SPLIT], False),
    "gpt2": ([_GPT2_SPLIT], False),
    # StarCoder-family vocabularies (SmolLM/SmolLM2) isolate every digit before the GPT-2 split.
    "smollm": ([r"\p{N}", _GPT2_SPLIT], False),
    "starcoder": ([r"\p{N}", _GPT2_SPLIT], False),
    "llama-bpe": ([_LLAMA3_SPLIT], True),
    "llama3": ([_LLAMA3_SPLIT], True),
    "qwen2": ([_QWEN2_SPLIT], False),
    "deepseek-r1-qwen": ([_QWEN2_SPLIT], False),
}

# llama.cpp token types (same numbers as SentencePiece's ModelProto.SentencePiece.Type).
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6


# GGUF value type -> numpy dtype for fixed-size scalars (the `gguf` package's GGUFValueType numbers).
_GGUF_SCALARS = {
    0: "<u1",
    1: "<i1",
    2: "<u2",
    3: "<i2",
    4: "<u4",
    5: "<i4",
    6: "<f4",
    7: "<u1",
    10: "<u8",
    11: "<i8",
    12: "<f8",
}
_GGUF_STRING, _GGUF_ARRAY, _GGUF_BOOL = 8, 9, 7


def read_gguf_metadata(path: str, prefixes: Sequence[str] = ("tokenizer.", "general.architecture")) -> dict[str, Any]:
    """Key/value metadata of a GGUF file (little-endian v2/v3) whose keys start with one of `prefixes`.

    Reads only the header, never the tensors: `gguf.GGUFReader` builds a numpy view per array element
    and takes ~10 s on Gemma's 262k-token vocabulary; this takes a fraction of a second. Files this
    reader does not understand (big-endian, v1) go to `gguf.GGUFReader`.
    """
    import numpy as np

    if not os.path.exists(path):
        raise TokenizerError(f"{path}: tokenizer file not found")
    try:
        with open(path, "rb") as f:
            data = f.read(24)
            if len(data) < 24 or data[:4] != b"GGUF":
                raise TokenizerError(f"{path}: not a valid GGUF file (shorter than a header or no GGUF magic)")
            version, _n_tensors, n_kv = np.frombuffer(data[4:8], "<u4")[0], *np.frombuffer(data[8:24], "<u8")
            if version not in (2, 3):
                return _read_gguf_metadata_slow(path, prefixes)
            buf = memoryview(np.memmap(path, dtype=np.uint8, mode="r"))
    except OSError as e:
        raise TokenizerError(f"{path}: cannot read GGUF file ({e.strerror})") from None
    pos = 24

    def u64() -> int:
        nonlocal pos
        value = int.from_bytes(buf[pos : pos + 8], "little")
        pos += 8
        return value

    def string() -> str:
        nonlocal pos
        n = u64()
        value = str(buf[pos : pos + n], "utf-8", errors="replace")
        pos += n
        return value

    def value(vtype: int, keep: bool):
        nonlocal pos
        if vtype == _GGUF_STRING:
            return string()
        if vtype in _GGUF_SCALARS:
            dtype = np.dtype(_GGUF_SCALARS[vtype])
            x = np.frombuffer(buf[pos : pos + dtype.itemsize], dtype)[0]
            pos += dtype.itemsize
            return bool(x) if vtype == _GGUF_BOOL else x.item()
        if vtype == _GGUF_ARRAY:
            etype = int.from_bytes(buf[pos : pos + 4], "little")
            pos += 4
            n = u64()
            if etype in _GGUF_SCALARS:
                dtype = np.dtype(_GGUF_SCALARS[etype])
                arr = np.frombuffer(buf[pos : pos + n * dtype.itemsize], dtype) if keep else None
                pos += n * dtype.itemsize
                if arr is None:
                    return None
                return [bool(x) for x in arr] if etype == _GGUF_BOOL else arr.tolist()
            return [value(etype, keep) for _ in range(n)]
        raise TokenizerError(f"{path}: unknown GGUF value type {vtype} at byte {pos}")

    meta: dict[str, Any] = {}
    try:
        for _ in range(n_kv):
            key = string()
            vtype = int.from_bytes(buf[pos : pos + 4], "little")
            pos += 4
            keep = key.startswith(tuple(prefixes))
            parsed = value(vtype, keep)
            if keep:
                meta[key] = parsed
    except (IndexError, ValueError, OverflowError) as e:
        raise TokenizerError(f"{path}: not a valid GGUF file (truncated or corrupt metadata: {_one_line(e)})") from None
    if pos > len(buf):
        raise TokenizerError(f"{path}: not a valid GGUF file (metadata runs past the end of the file)")
    return meta


def _read_gguf_metadata_slow(path: str, prefixes: Sequence[str]) -> dict[str, Any]:
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:
        raise TokenizerError(f"{path}: not a valid GGUF file ({_one_line(e)})") from None
    return {k: f.contents() for k, f in reader.fields.items() if k.startswith(tuple(prefixes))}


def read_gguf_vocab(path: str) -> dict[str, Any]:
    """The `tokenizer.*` metadata of a GGUF file as plain Python values (keys without the prefix)."""
    meta = {k.removeprefix("tokenizer."): v for k, v in read_gguf_metadata(path).items()}
    if "ggml.tokens" not in meta:
        raise TokenizerError(f"{path}: GGUF file has no tokenizer.ggml.tokens (no vocabulary)")
    return meta


def byte_level_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character map used by byte-level BPE vocabularies: printable
    Latin-1 bytes stand for themselves, the other 68 bytes take the characters from U+0100 on."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1), *range(ord("\u00ae"), 256)]
    mapping, extra = {}, 0
    for b in range(256):
        if b in keep:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def _gguf_byte_level_bpe(meta: dict, path: str):
    """GPT-2 style byte-level BPE from GGUF tokens + merges, split as llama.cpp does for `ggml.pre`."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as TkTokenizer

    tokens: list[str] = meta["ggml.tokens"]
    if "ggml.merges" not in meta:
        raise TokenizerError(f"{path}: byte-level BPE GGUF has no tokenizer.ggml.merges")
    merges = []
    for i, merge in enumerate(meta["ggml.merges"]):
        left, sep, right = merge.partition(" ")
        if not sep:
            raise TokenizerError(f"{path}: tokenizer.ggml.merges[{i}] = {merge!r} is not 'left right'")
        merges.append((left, right))
    pre = meta.get("ggml.pre", "default")
    if pre not in PRE_TOKENIZER_SPLITS:
        logger.warning("%s: unknown tokenizer.ggml.pre %r; using GPT-2's split regex", path, pre)
        pre = "default"
    splits, ignore_merges = PRE_TOKENIZER_SPLITS[pre]
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise TokenizerError(f"{path}: tokenizer.ggml.tokens has duplicate entries")
    try:
        tk = TkTokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=ignore_merges))
    except Exception as e:
        raise TokenizerError(f"{path}: cannot build BPE from the GGUF vocabulary ({_one_line(e)})") from None
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in splits]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tk.decoder = decoders.ByteLevel()
    # Control tokens are matched whole in text and skipped by decode(skip_special_tokens=True);
    # user-defined ones are matched whole but kept, as llama.cpp does.
    types = meta.get("ggml.token_type") or [_NORMAL] * len(tokens)
    tk.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == _CONTROL]
    )
    tk.add_tokens(
        [AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == _USER_DEFINED]
    )
    if tk.get_vocab_size(with_added_tokens=True) != len(tokens):
        raise TokenizerError(f"{path}: rebuilt vocabulary has {tk.get_vocab_size()} ids, GGUF lists {len(tokens)}")
    # Bytes without a token would vanish silently in BPE; HFTokenizer counts them.
    missing = bytes(b for b, ch in byte_level_alphabet().items() if ch not in vocab)
    return tk, missing


def _gguf_sentencepiece(meta: dict, path: str):
    """SentencePiece BPE ModelProto from GGUF tokens/scores/types (llama.cpp's "llama" vocab).

    llama.cpp's SPM tokenizer merges the best-scoring adjacent pair first, with byte fallback:
    exactly SentencePiece's BPE model, so the rebuilt proto tokenizes like the original file.
    """
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb

    tokens: list[str] = meta["ggml.tokens"]
    scores = meta.get("ggml.scores") or [0.0] * len(tokens)
    types = meta.get("ggml.token_type") or [_NORMAL] * len(tokens)
    if not len(tokens) == len(scores) == len(types):
        raise TokenizerError(
            f"{path}: tokens/scores/token_type lengths differ ({len(tokens)}/{len(scores)}/{len(types)})"
        )
    existing = set(tokens)
    proto = pb.ModelProto()
    for token, score, ty in zip(tokens, scores, types):
        piece = proto.pieces.add()
        # Gemma files store whitespace-only user tokens with real spaces; SentencePiece matches
        # pieces after turning spaces into U+2581, so respell them (unless that would collide).
        if " " in token and ty != _CONTROL and token.replace(" ", "\u2581") not in existing:
            token = token.replace(" ", "\u2581")
        piece.piece = token
        piece.score = float(score)
        piece.type = int(ty) if int(ty) in (_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE) else _NORMAL

    def special(key: str) -> int:
        value = meta.get(f"ggml.{key}_token_id")
        return -1 if value is None else int(value)

    unk = special("unknown")
    if unk < 0:
        unk = next((i for i, ty in enumerate(types) if ty == _UNKNOWN), -1)
    if unk < 0:
        raise TokenizerError(f"{path}: SentencePiece GGUF vocabulary has no unknown token")
    proto.pieces[unk].type = _UNKNOWN  # SentencePiece requires exactly this piece to be UNKNOWN.
    spec = proto.trainer_spec
    spec.model_type = pb.TrainerSpec.BPE
    spec.vocab_size = len(tokens)
    spec.unk_id, spec.bos_id, spec.eos_id, spec.pad_id = unk, special("bos"), special("eos"), special("padding")
    for name, idx in (
        ("unk_piece", unk),
        ("bos_piece", spec.bos_id),
        ("eos_piece", spec.eos_id),
        ("pad_piece", spec.pad_id),
    ):
        if idx >= 0:
            setattr(spec, name, tokens[idx])
    spec.byte_fallback = any(ty == _BYTE for ty in types)
    norm = proto.normalizer_spec
    norm.name = "identity"
    norm.add_dummy_prefix = bool(meta.get("ggml.add_space_prefix", True))
    norm.remove_extra_whitespaces = False
    norm.escape_whitespaces = True
    processor = spm.SentencePieceProcessor()
    try:
        processor.LoadFromSerializedProto(proto.SerializeToString())
    except Exception as e:
        raise TokenizerError(
            f"{path}: cannot build a SentencePiece model from the GGUF vocabulary ({_one_line(e)})"
        ) from None
    return processor


def load_gguf_tokenizer(path: str, chat_template: str | None = None) -> Tokenizer:
    """Rebuild the tokenizer stored in a GGUF file's metadata."""
    meta = read_gguf_vocab(path)
    model = meta.get("ggml.model")
    tokens = meta["ggml.tokens"]
    eos = meta.get("ggml.eos_token_id")
    if eos is None:
        raise TokenizerError(f"{path}: GGUF file has no tokenizer.ggml.eos_token_id")
    bos = meta.get("ggml.bos_token_id")
    pad = meta.get("ggml.padding_token_id")
    for key, value in (("eos", eos), ("bos", bos), ("padding", pad)):
        if value is not None and not 0 <= value < len(tokens):
            raise TokenizerError(
                f"{path}: tokenizer.ggml.{key}_token_id={value} outside the vocabulary of {len(tokens)}"
            )
    name, default_system, jinja = _resolve_template(chat_template, meta.get("chat_template"), tokens, path)
    if model == "gpt2":
        backend, missing = _gguf_byte_level_bpe(meta, path)
        cls, kw = HFTokenizer, {"missing_bytes": missing}
        add_bos_default = False
    elif model == "llama":
        backend = _gguf_sentencepiece(meta, path)
        cls, kw = SentencePieceTokenizer, {}
        add_bos_default = True  # llama.cpp adds BOS to SentencePiece vocabularies unless told otherwise
    else:
        raise TokenizerError(f"{path}: unsupported tokenizer.ggml.model {model!r} (supported: 'gpt2', 'llama')")
    return cls(
        backend,
        source=str(path),
        bos_id=bos,
        eos_id=eos,
        pad_id=pad,
        add_bos_token=bool(meta.get("ggml.add_bos_token", add_bos_default)) and bos is not None,
        chat_template=name,
        default_system=default_system,
        jinja_template=jinja,
        **kw,
    )


# ---------------------------------------------------------------------------------------------
# Loading and checks.
# ---------------------------------------------------------------------------------------------


def load_tokenizer(path: str | os.PathLike, chat_template: str | None = None) -> Tokenizer:
    """Load a tokenizer from a `.model` (SentencePiece), a `tokenizer.json`, a `.gguf` file, or a
    directory holding one of those (tried in that order: tokenizer.json, tokenizer.model, one .gguf).

    `chat_template` ("chatml" / "gemma" / "plain") overrides auto-detection.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        for candidate in ("tokenizer.json", "tokenizer.model"):
            if os.path.exists(os.path.join(path, candidate)):
                return load_tokenizer(os.path.join(path, candidate), chat_template)
        ggufs = sorted(f for f in os.listdir(path) if f.endswith(".gguf"))
        if len(ggufs) == 1:
            return load_tokenizer(os.path.join(path, ggufs[0]), chat_template)
        found = f"{len(ggufs)} .gguf files" if ggufs else "nothing"
        raise TokenizerError(f"{path}: no tokenizer.json, tokenizer.model or single .gguf in directory (found {found})")
    if not os.path.exists(path):
        raise TokenizerError(f"{path}: tokenizer file not found")
    if path.endswith(".gguf"):
        return load_gguf_tokenizer(path, chat_template)
    if path.endswith(".json"):
        return HFTokenizer.from_file(path, chat_template)
    if path.endswith(".model"):
        config = _read_tokenizer_config(os.path.dirname(os.path.abspath(path)))
        tok = SentencePieceTokenizer.from_file(path)
        name, default_system, jinja = _resolve_template(
            chat_template, config.get("chat_template"), (tok.id_to_token(i) for i in range(tok.vocab_size)), path
        )
        tok.chat_template, tok.default_system, tok.jinja_template = name, default_system, jinja
        # SentencePiece models are trained with BOS in front (llama.cpp's default for them too).
        tok.add_bos_token = bool(config.get("add_bos_token", True)) and tok.bos_id is not None
        return tok
    raise TokenizerError(f"{path}: unknown tokenizer file type (expected .model, .json, .gguf or a directory)")


def check_vocab(tokenizer: Tokenizer, model_vocab_size: int, source: str) -> None:
    """Raise TokenizerError unless every tokenizer id indexes the model's embedding table
    `[model_vocab_size, d_model]`. A larger table is fine (many models pad it to a multiple of 64/128)."""
    if tokenizer.vocab_size > model_vocab_size:
        raise TokenizerError(
            f"tokenizer {tokenizer.source} has {tokenizer.vocab_size} ids but the model {source} embedding table "
            f"has only {model_vocab_size} rows; use the tokenizer that belongs to this model"
        )


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text[:200] if text else type(e).__name__
