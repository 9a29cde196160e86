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


def load_transcript(path: str | os.PathLike) -> dict[str, dict]:
    """key -> response record; later lines win over earlier ones with the same key."""
    out: dict[str, dict] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                out[rec["key"]] = rec["response"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{lineno}: not a transcript line ({e})") from None
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
