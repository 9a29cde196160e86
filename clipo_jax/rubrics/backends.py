"""The HTTP judge backend: ``OpenAIHTTPBackend`` for any OpenAI-compatible server (vLLM, SGLang,
llama.cpp, OpenAI).

``Backend`` (in ``types.py``, re-exported here) is the contract every judge backend implements:
an async ``complete(request) -> response`` plus capability flags.  The local backends live in
``local_backends.py``; ``registry.py`` maps backend names to factories (``BACKENDS``,
``make_backend``).  Local backends:

* in-process generation with our own sampler (``supports_json_schema`` False unless it grows a
  grammar; ``complete`` runs ``sampling.generate`` in a worker thread);
* a logit verdict backend, which additionally implements ``LogitBackend.choice_logprobs`` to read
  the verdict off the next-token distribution instead of parsing generated JSON.

Failures after all retries raise ``BackendError``; the judge turns that into an ``"error"`` verdict.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import random
import time
from typing import Any, Callable

import aiohttp

from clipo_jax.rubrics.cache import DiskCache
from clipo_jax.rubrics.types import (  # noqa: F401 - re-exported for callers that import them from here
    Backend,
    BackendError,
    CompletionRequest,
    CompletionResponse,
    LogitBackend,
)

log = logging.getLogger(__name__)


@dataclasses.dataclass
class BackendStats:
    requests: int = 0  # HTTP requests sent (retries included)
    completed: int = 0  # successful completions returned (cache hits included)
    cache_hits: int = 0
    retries: int = 0
    timeouts: int = 0
    http_errors: int = 0
    garbage: int = 0  # bodies that are not an OpenAI completion
    bad_usage: int = 0  # completions whose usage token counts are not non-negative integers
    failures: int = 0  # calls that raised BackendError
    prompt_tokens: int = 0
    completion_tokens: int = 0
    schema_fallbacks: int = 0

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


SCHEMA_STYLES: dict[str, Callable[[CompletionRequest], dict[str, Any]]] = {
    "json_schema": lambda req: {
        "type": "json_schema",
        "json_schema": {"name": req.schema_name, "schema": req.json_schema, "strict": True},
    },
    "json_object": lambda req: {"type": "json_object", "schema": req.json_schema},
}


def _token_count(usage, key: str) -> int | None:
    """A usage token count: 0 when the server sends no usage (or no such key), None when it sends
    something that is not a non-negative integer (counted as ``bad_usage``, never an error: the
    completion itself is intact)."""
    if usage is None:
        return 0
    if not isinstance(usage, dict):
        return None
    v = usage.get(key)
    if v is None:
        return 0
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or v != int(v):
        return None
    return int(v)


def _retryable_status(code: int) -> bool:
    return code == 408 or code == 429 or code >= 500


class OpenAIHTTPBackend:
    """Any OpenAI-compatible ``/v1/chat/completions`` server over an aiohttp session.

    aiohttp rather than httpx: on a 2-core host httpx spent about 2 ms of client CPU a call,
    which made 256 concurrent judge calls cost more than one call's latency.

    Args:
      base_url: e.g. "http://127.0.0.1:8080/v1" (a missing "/v1" is added).
      model: model name sent in the request.
      api_key_env: environment variable holding the API key (read once; never logged).
      max_concurrency: in-flight requests at most (one semaphore per backend).
      timeout_s: per-request timeout.
      max_retries: retries after the first attempt for timeouts, transport errors, 408/429/5xx
        and garbage bodies; exponential backoff with full jitter.
      json_schema: "auto" sends ``response_format`` with the schema, switches style or drops it
        for good when the server rejects it (an error that names response_format); True always
        sends it; False never.
      schema_style: "json_schema" (OpenAI style) or "json_object" (llama-cpp-python style) to
        fix the response_format shape; None tries them in that order under "auto".
      cache_dir: directory of the on-disk cache, or None for no cache.  Entries are keyed by
        the request's content, the model name and the server URL (``cache_identity``): two
        servers that serve different weights under one model name never share answers.
    """

    name = "openai"
    supports_logprobs = True

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str = "OPENAI_API_KEY",
        max_concurrency: int = 8,
        timeout_s: float = 120.0,
        max_retries: int = 10,
        backoff_base_s: float = 0.5,
        backoff_max_s: float = 30.0,
        json_schema: bool | str = "auto",
        schema_style: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        rng_seed: int = 0,
        sleep: Callable[[float], Any] | None = None,
    ):
        base = base_url.rstrip("/")
        self.base_url = base if base.endswith("/v1") else base + "/v1"
        self.model = model
        # Which judge answers, besides the model name, in the cache key (see cache_dir).
        self.cache_identity = self.base_url
        self._api_key = os.environ.get(api_key_env) or None
        self.max_concurrency = int(max_concurrency)
        self.timeout_s = float(timeout_s)
        self.max_retries = int(max_retries)
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        if json_schema not in ("auto", True, False):
            raise ValueError(f"json_schema must be 'auto', True or False, got {json_schema!r}")
        self._schema_mode = json_schema
        self.supports_json_schema = json_schema is not False
        # How response_format carries the schema: OpenAI / vLLM / SGLang take "json_schema";
        # llama-cpp-python takes {"type": "json_object", "schema": ...}.  "auto" walks this list
        # when a server rejects a style.
        if schema_style is not None and schema_style not in SCHEMA_STYLES:
            raise ValueError(f"schema_style must be one of {sorted(SCHEMA_STYLES)}, got {schema_style!r}")
        self._schema_styles = [schema_style] if schema_style else list(SCHEMA_STYLES)
        self.cache = DiskCache(cache_dir) if cache_dir else None
        self.stats = BackendStats()
        self._rng = random.Random(rng_seed)
        self._sleep = sleep or asyncio.sleep
        self._client: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sem: asyncio.Semaphore | None = None
        self._inflight = 0
        self.max_inflight_seen = 0

    def __repr__(self) -> str:  # never show the key
        return f"OpenAIHTTPBackend(base_url={self.base_url!r}, model={self.model!r}, key={'set' if self._api_key else 'unset'})"

    def _ensure_client(self) -> None:
        loop = asyncio.get_running_loop()
        if self._client is None or self._loop is not loop:
            headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}
            self._client = aiohttp.ClientSession(
                headers=headers,
                connector=aiohttp.TCPConnector(limit=self.max_concurrency),
                timeout=aiohttp.ClientTimeout(total=self.timeout_s),
            )
            self._sem = asyncio.Semaphore(self.max_concurrency)
            self._loop = loop

    async def aclose(self) -> None:
        if self._client is not None:
            try:
                await self._client.close()
            except RuntimeError:  # its loop is gone
                pass
            self._client = None

    def _payload(self, request: CompletionRequest, use_schema: bool) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "messages": list(request.messages),
            "max_tokens": request.max_tokens,
            "temperature": request.temperature,
            "top_p": request.top_p,
            "seed": request.seed,
        }
        if use_schema and request.json_schema is not None and self._schema_styles:
            body["response_format"] = SCHEMA_STYLES[self._schema_styles[0]](request)
        return body

    def _backoff(self, attempt: int) -> float:
        return self._rng.uniform(0, min(self.backoff_max_s, self.backoff_base_s * 2**attempt))

    async def complete(self, request: CompletionRequest) -> CompletionResponse:
        self._ensure_client()
        use_schema = bool(self.supports_json_schema and request.json_schema is not None)
        key = request.cache_key(self.model, use_schema, self.cache_identity)
        if self.cache is not None and (hit := self.cache.get(key)) is not None:
            self.stats.cache_hits += 1
            self.stats.completed += 1
            return CompletionResponse(
                text=hit["text"],
                prompt_tokens=hit.get("prompt_tokens", 0),
                completion_tokens=hit.get("completion_tokens", 0),
                finish_reason=hit.get("finish_reason"),
                cached=True,
            )
        assert self._sem is not None
        async with self._sem:
            self._inflight += 1
            self.max_inflight_seen = max(self.max_inflight_seen, self._inflight)
            try:
                response = await self._complete_with_retries(request, use_schema)
            finally:
                self._inflight -= 1
        if self.cache is not None:
            self.cache.put(
                key,
                {
                    "text": response.text,
                    "prompt_tokens": response.prompt_tokens,
                    "completion_tokens": response.completion_tokens,
                    "finish_reason": response.finish_reason,
                },
            )
        return response

    def forget(self, request: CompletionRequest) -> None:
        """Drops the cached completion of ``request``: its caller could not use it (an answer that
        does not parse), and a cached one would come back on every retry, every later step and
        after a resume."""
        if self.cache is not None:
            for use_schema in (True, False):  # the schema may have been switched off since
                self.cache.delete(request.cache_key(self.model, use_schema, self.cache_identity))

    async def _complete_with_retries(self, request: CompletionRequest, use_schema: bool) -> CompletionResponse:
        url = f"{self.base_url}/chat/completions"
        last = "no attempt"
        kind = "error"
        start = time.perf_counter()
        attempt = 0
        while attempt <= self.max_retries:
            if attempt:
                self.stats.retries += 1
                await self._sleep(self._backoff(attempt - 1))
            attempt += 1
            self.stats.requests += 1
            use_schema = use_schema and self.supports_json_schema  # another call may have switched it off
            style = self._schema_styles[0] if (use_schema and self._schema_styles) else None
            try:
                async with self._client.post(url, json=self._payload(request, use_schema)) as r:  # type: ignore[union-attr]
                    status, raw = r.status, await r.read()
            except asyncio.TimeoutError:
                self.stats.timeouts += 1
                last, kind = f"timeout after {self.timeout_s:.1f}s", "timeout"
                continue
            except aiohttp.ClientError as e:
                self.stats.http_errors += 1
                last, kind = f"transport error: {type(e).__name__}", "http"
                continue
            r_text = raw.decode("utf-8", errors="replace")
            if status != 200:
                self.stats.http_errors += 1
                last, kind = f"HTTP {status}: {r_text[:200]!r}", "http"
                if (
                    use_schema
                    and self._schema_mode == "auto"
                    and status in (400, 422, 500)
                    and "response_format" in r_text
                ):
                    # This server wants another response_format style (or none at all).
                    if self._schema_styles and self._schema_styles[0] == style:
                        # Only the first call to see this style rejected switches (calls race).
                        self.stats.schema_fallbacks += 1
                        self._schema_styles.pop(0)
                    rejected = style
                    if not self._schema_styles:
                        log.warning("server rejected every response_format style; continuing without JSON schema")
                        self.supports_json_schema = False
                        use_schema = False
                    else:
                        log.warning(
                            "server rejected response_format style %r; trying %r", rejected, self._schema_styles[0]
                        )
                    attempt -= 1  # not a transient fault; do not spend a retry
                    continue
                if _retryable_status(status):
                    continue
                self.stats.failures += 1
                raise BackendError(f"{url}: {last} (not retryable)", kind="http")
            try:
                body = json.loads(r_text)
                choice = body["choices"][0]
                text = choice["message"]["content"]
                if not isinstance(text, str):
                    raise TypeError("content is not a string")
            except (ValueError, KeyError, IndexError, TypeError) as e:
                self.stats.garbage += 1
                last, kind = f"malformed completion body ({type(e).__name__}): {r_text[:120]!r}", "garbage"
                continue
            usage = body.get("usage")
            prompt_tokens, completion_tokens = (
                _token_count(usage, "prompt_tokens"),
                _token_count(usage, "completion_tokens"),
            )
            if None in (prompt_tokens, completion_tokens):  # the answer is fine; only its accounting is not
                self.stats.bad_usage += 1
                prompt_tokens, completion_tokens = prompt_tokens or 0, completion_tokens or 0
            self.stats.completed += 1
            self.stats.prompt_tokens += prompt_tokens
            self.stats.completion_tokens += completion_tokens
            return CompletionResponse(
                text=text,
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
                finish_reason=choice.get("finish_reason"),
                latency_s=time.perf_counter() - start,
                attempts=attempt,
            )
        self.stats.failures += 1
        raise BackendError(f"{url}: giving up after {attempt} attempts; last: {last}", kind=kind)
