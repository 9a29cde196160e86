"""Recorded judge transcripts: replay them without a server, or record them from a live backend.

A transcript is a JSON-lines file, one completion per line::

    {"key": "<sha256 of the request>", "request": {...}, "response": {"text": ..., ...}}

``key`` is ``CompletionRequest.cache_key("", use_schema=True)``: a content hash of everything in
the request (messages, max_tokens, temperature, top_p, seed, JSON schema), independent of the
server's model name. ``ReplayBackend`` answers a request from the transcript and raises
``BackendError(kind="replay_miss")`` for a request it has not seen (a changed prompt, schema or
seed), so a stale transcript fails loudly instead of judging with someone else's answer.
``RecordingBackend`` wraps any backend and appends each completion it returns.

    backend = ReplayBackend("notebooks/data/openrs_judge_transcript.jsonl")
    judge = PairwiseJudge(backend, config)  # the same judge, no server
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading

from clipo_jax.rubrics.types import Backend, BackendError, CompletionRequest, CompletionResponse, forget_cached


def request_key(request: CompletionRequest) -> str:
    """The transcript key of a request: a content hash of the request alone."""
    return request.cache_key("", use_schema=True)


def request_record(request: CompletionRequest) -> dict:
    return {
        "messages": list(request.messages),
        "max_tokens": request.max_tokens,
        "temperature": request.temperature,
        "top_p": request.top_p,
        "seed": request.seed,
        "schema_name": request.schema_name,
        "json_schema": request.json_schema,
    }


def _response_record(resp: CompletionResponse) -> dict:
    return {
        "text": resp.text,
        "prompt_tokens": resp.prompt_tokens,
        "completion_tokens": resp.completion_tokens,
        "finish_reason": resp.finish_reason,
        "latency_s": round(resp.latency_s, 3),
    }


def _transcript_line_reason(rec) -> str | None:
    """Why a parsed transcript line is not ``{"key": str, "response": {"text": str, ...}}``."""
    if not isinstance(rec, dict):
        return f"a line must be a JSON object, got {type(rec).__name__}"
    if not isinstance(rec.get("key"), str) or not rec["key"]:
        return f"field 'key' must be a non-empty string, got {rec.get('key')!r}"[:200]
    resp = rec.get("response")
    if not isinstance(resp, dict):
        return f"field 'response' must be an object, got {type(resp).__name__}"
    if not isinstance(resp.get("text"), str):
        return f"field 'response.text' must be a string, got {type(resp.get('text')).__name__}"
    for k in ("prompt_tokens", "completion_tokens"):
        v = resp.get(k, 0)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            return f"field 'response.{k}' must be a non-negative integer, got {v!r}"[:200]
    fr = resp.get("finish_reason")
    if fr is not None and not isinstance(fr, str):
        return f"field 'response.finish_reason' must be a string or null, got {type(fr).__name__}"
    return None


def load_transcript(path: str | os.PathLike) -> dict[str, dict]:
    """key -> response record; later lines win over earlier ones with the same key.  A line that
    is not a recorded completion raises ``ValueError`` naming ``file:line`` and the field."""
    out: dict[str, dict] = {}
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid UTF-8 (byte 0x{raw[e.start]:02x})") from None
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except (json.JSONDecodeError, RecursionError) as e:
                raise ValueError(f"{path}:{lineno}: not a transcript line (not valid JSON: {e})") from None
            reason = _transcript_line_reason(rec)
            if reason is not None:
                raise ValueError(f"{path}:{lineno}: not a transcript line ({reason})")
            out[rec["key"]] = rec["response"]
    return out


class ReplayBackend:
    """Answers each request from a recorded transcript (implements ``Backend``)."""

    name = "replay"
    supports_json_schema = True  # the recorded answers came from schema-constrained decoding
    supports_logprobs = False

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        self.responses = load_transcript(path)
        self.hits = 0
        self.misses = 0

    async def complete(self, request: CompletionRequest) -> CompletionResponse:
        rec = self.responses.get(request_key(request))
        if rec is None:
            self.misses += 1
            raise BackendError(
                f"request {request_key(request)[:12]} is not in the transcript {self.path} "
                "(prompt, schema or seed changed: record it again)",
                kind="replay_miss",
            )
        self.hits += 1
        return CompletionResponse(
            text=rec["text"],
            prompt_tokens=int(rec.get("prompt_tokens", 0)),
            completion_tokens=int(rec.get("completion_tokens", 0)),
            finish_reason=rec.get("finish_reason"),
            cached=True,
            latency_s=0.0,
        )

    async def aclose(self) -> None:
        return None


class RecordingBackend:
    """Passes requests to ``inner`` and appends every successful completion to ``path``."""

    name = "recording"

    def __init__(self, inner: Backend, path: str | os.PathLike):
        self.inner = inner
        self.path = str(path)
        self.supports_json_schema = inner.supports_json_schema
        self.supports_logprobs = False
        self._lock = threading.Lock()
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)

    async def complete(self, request: CompletionRequest) -> CompletionResponse:
        resp = await self.inner.complete(request)
        line = {"key": request_key(request), "request": request_record(request), "response": _response_record(resp)}
        with self._lock, open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(line, ensure_ascii=False) + "\n")
        return dataclasses.replace(resp)

    def forget(self, request: CompletionRequest) -> None:
        forget_cached(self.inner, request)

    async def aclose(self) -> None:
        await self.inner.aclose()
