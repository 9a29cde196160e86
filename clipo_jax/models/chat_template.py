"""A checkpoint's own jinja chat template, compiled and rendered in a sandbox.

Chat templates ship inside checkpoints (tokenizer_config.json, chat_template.jinja, GGUF
`tokenizer.chat_template`), so they are untrusted code: they run in jinja2's
`ImmutableSandboxedEnvironment`, and everything they can see is rebuilt from plain JSON values.

The environment follows the conventions that chat templates are written for (those of HF
transformers' `apply_chat_template`), so a template renders the same text here as there:

- `trim_blocks=True, lstrip_blocks=True`: the newline after a block tag and the indentation before
  one are dropped, which multi-line templates rely on;
- the `loopcontrols` extension (`{% break %}`, `{% continue %}`) and a `{% generation %}` tag that
  renders its body (templates use it to mark assistant text for training masks);
- `raise_exception(message)` aborts rendering with the template's own message;
- `tojson` returns plain JSON (no HTML escaping; `indent`, `separators`, `sort_keys` accepted);
- `strftime_now(format)` gives today's date (Llama 3.1+ templates print it unless the caller passes
  `date_string`);
- the variables are `messages`, `add_generation_prompt`, `tools=None`, `documents=None`, the
  special-token strings (`bos_token`, `eos_token`, `pad_token` where defined) and any extra
  variables the caller passes (e.g. `enable_thinking=False`).

Errors (syntax, `raise_exception`, sandbox violations, type errors inside the template) raise
`ChatTemplateError` with a one-line message.
"""

from __future__ import annotations

import datetime
import functools
import json
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["ChatTemplateError", "JinjaChatTemplate"]


class ChatTemplateError(ValueError):
    """A chat template does not compile or fails while rendering. One-line message."""


class _TemplateRaised(Exception):
    """Raised by the template's own `raise_exception(...)`; kept apart so its message is reported as is."""


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text[:limit]


def _raise_exception(message):
    raise _TemplateRaised(str(message))


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # jinja's own tojson HTML-escapes <, > and & (it is meant for HTML pages); prompts need the raw JSON.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.datetime.now().strftime(str(fmt))


def _make_dict(*args, **kwargs):
    # Templates get a function, not the `dict` type itself, so they cannot reach type attributes.
    return dict(*args, **kwargs)


@functools.lru_cache(maxsize=1)
def _environment():
    import jinja2
    import jinja2.ext
    from jinja2 import nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    from jinja2.utils import Namespace

    class GenerationTag(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` renders its body in its own scope."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.Scope(body, lineno=lineno)

    # A plain function, not a method: Namespace routes attribute reads to its stored attributes.
    def _check_name(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} starts with an underscore")

    class SafeNamespace(Namespace):
        """`namespace(...)` that refuses underscore names, which could shadow its internals."""

        def __init__(self, *args, **kwargs):
            attrs = dict(*args, **kwargs)
            for name in attrs:
                _check_name(name)
            super().__init__(attrs)

        def __setitem__(self, name, value):  # {% set ns.name = value %}
            _check_name(name)
            super().__setitem__(name, value)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals.update(
        raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_make_dict, namespace=SafeNamespace
    )
    return env


def _plain(value: Any, what: str) -> Any:
    """A JSON-only copy of `value`: no object with methods of its own reaches the sandbox."""
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as e:
        raise ChatTemplateError(f"{what} must be plain JSON data ({_one_line(e)})") from None


class JinjaChatTemplate:
    """A compiled chat template. `source` is the jinja text; `origin` names where it came from."""

    def __init__(self, source: str, origin: str = "chat template"):
        import jinja2

        if not isinstance(source, str) or not source.strip():
            raise ChatTemplateError(f"{origin}: chat template must be a non-empty string, got {source!r:.60}")
        self.source = source
        self.origin = origin
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise ChatTemplateError(
                f"{origin}: chat template syntax error at line {e.lineno}: {_one_line(e.message or e)}"
            ) from None
        except jinja2.TemplateError as e:  # e.g. an unknown extension tag
            raise ChatTemplateError(f"{origin}: chat template does not compile: {_one_line(e)}") from None

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = False,
        special_tokens: Mapping[str, str] | None = None,
        **variables: Any,
    ) -> str:
        """The prompt text. `variables` override the defaults (`tools`, `documents`, special tokens)."""
        import jinja2

        context: dict[str, Any] = {"tools": None, "documents": None, **dict(special_tokens or {})}
        context.update({k: _plain(v, f"{self.origin}: template variable {k!r}") for k, v in variables.items()})
        if isinstance(messages, (str, bytes)) or not all(isinstance(m, Mapping) for m in messages):
            raise ChatTemplateError(f"{self.origin}: chat messages must be a list of dicts")
        # Keys set to None are dropped: templates test whether a key is there, not whether it is None.
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
        context["messages"] = _plain(messages, f"{self.origin}: chat messages")
        context["add_generation_prompt"] = bool(add_generation_prompt)
        try:
            return self._template.render(**context)
        except _TemplateRaised as e:
            raise ChatTemplateError(f"{self.origin}: chat template raised: {_one_line(e)}") from None
        except jinja2.exceptions.SecurityError as e:
            raise ChatTemplateError(f"{self.origin}: chat template blocked by the sandbox: {_one_line(e)}") from None
        except Exception as e:  # TemplateError, TypeError from `'a' + 1`, ... anything the template does wrong
            raise ChatTemplateError(
                f"{self.origin}: chat template failed ({type(e).__name__}: {_one_line(e)})"
            ) from None

    def __repr__(self) -> str:
        return f"JinjaChatTemplate(origin={self.origin!r}, {len(self.source)} chars)"
