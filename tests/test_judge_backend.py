"""OpenAI HTTP backend and the judge against a real tiny HTTP server on 127.0.0.1.

The server speaks the OpenAI chat-completions format; its behaviour is picked by the request's
``model`` field so one server covers the healthy path and every fault: HTTP 500s, timeouts,
garbage bodies, unparseable judgments, servers without ``response_format`` support.
"""

import asyncio
import http.server
import json
import logging
import re
import threading
import time

import pytest
from judge_server import JSONHandler, good_label, responses, rule_judgment, serve

from clipo_jax.rubrics import (
    BackendError,
    CompletionRequest,
    JudgeConfig,
    OpenAIHTTPBackend,
    PairInput,
    PairwiseJudge,
    summarise,
)
from clipo_jax.rubrics.backends import Backend


def judgment_for(user_text: str) -> dict:
    """A deterministic 'judge': A wins a core criterion iff response A contains GOOD."""
    a = re.search(r"<response_a>\n(.*?)\n</response_a>", user_text, re.DOTALL).group(1)
    b = re.search(r"<response_b>\n(.*?)\n</response_b>", user_text, re.DOTALL).group(1)
    label = "A" if "GOOD" in a and "GOOD" not in b else ("B" if "GOOD" in b and "GOOD" not in a else "S")
    return {
        "intent": {"task": "t", "explicit_requirements": [], "implicit_requirements": []},
        "differences": ["d"],
        "criteria": [
            {
                "id": "c1",
                "title": "quality",
                "type": "core",
                "evidence": "e",
                "reason": "r",
                "label": label,
                "score": 0 if label == "S" else 2,
            }
        ],
    }


class State:
    def __init__(self):
        self.lock = threading.Lock()
        self.requests = []
        self.inflight = 0
        self.max_inflight = 0
        self.counter = {}


class Handler(JSONHandler):
    state: State = None

    def do_POST(self):
        st = self.state
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        model = body["model"]
        with st.lock:
            st.requests.append({"body": body, "auth": self.headers.get("Authorization")})
            st.inflight += 1
            st.max_inflight = max(st.max_inflight, st.inflight)
            n = st.counter[model] = st.counter.get(model, 0) + 1
        try:
            if model == "slow-ok":
                time.sleep(0.2)
            if model == "flaky" and n <= 2:
                return self._send(500, {"error": "boom"})
            if model == "timeout":
                time.sleep(1.0)
            if model == "garbage":
                return self._send(200, b"<html>not json", "text/html")
            if model == "bad4xx":
                return self._send(401, {"error": "unauthorized"})
            if model == "no-schema" and "response_format" in body:
                return self._send(400, {"error": "response_format is not supported"})
            if model == "llama-style" and body.get("response_format", {}).get("type") != "json_object":
                return self._send(500, {"error": "response_format.type: Input should be 'text' or 'json_object'"})
            user = body["messages"][-1]["content"]
            if model == "junk-json":
                content = "I think A is better, no JSON here"
            elif model == "junk-then-ok" and body.get("seed", 0) == 0:
                content = '```json\n{"criteria": [{"label": "Q"}]}\n```'
            elif user.startswith("Analyse the following user query"):
                content = json.dumps({"task": "t", "explicit_requirements": ["x"], "implicit_requirements": []})
            elif "<response_a>" in user:
                content = "Let me think.\n```json\n" + json.dumps(judgment_for(user)) + "\n```"
            else:
                content = json.dumps({"echo": user[:20]})
            self._send(
                200,
                {
                    "choices": [{"message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 10, "completion_tokens": 5},
                },
            )
        finally:
            with st.lock:
                st.inflight -= 1


@pytest.fixture()
def server():
    state = State()
    handler = type("H", (Handler,), {"state": state})
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    srv.daemon_threads = True
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", state
    srv.shutdown()
    srv.server_close()


def no_sleep(_):
    async def _s():
        return None

    return _s()


def req(text="hi", schema=None, seed=0):
    return CompletionRequest(messages=[{"role": "user", "content": text}], max_tokens=16, seed=seed, json_schema=schema)


def test_backend_satisfies_protocol():
    assert isinstance(OpenAIHTTPBackend("http://x", "m"), Backend)


def test_retries_500_then_succeeds(server):
    url, st = server
    be = OpenAIHTTPBackend(url, "flaky", sleep=no_sleep, max_retries=3)
    resp = asyncio.run(be.complete(req()))
    assert json.loads(resp.text)["echo"] == "hi"
    assert resp.attempts == 3 and be.stats.retries == 2 and be.stats.http_errors == 2
    assert be.stats.prompt_tokens == 10 and be.stats.completion_tokens == 5


def test_gives_up_after_max_retries_and_non_retryable(server):
    url, st = server
    be = OpenAIHTTPBackend(url, "garbage", sleep=no_sleep, max_retries=2)
    with pytest.raises(BackendError, match="after 3 attempts") as e:
        asyncio.run(be.complete(req()))
    assert e.value.kind == "garbage" and be.stats.garbage == 3
    be = OpenAIHTTPBackend(url, "bad4xx", sleep=no_sleep, max_retries=5)
    with pytest.raises(BackendError, match="HTTP 401"):
        asyncio.run(be.complete(req()))
    assert st.counter["bad4xx"] == 1  # 401 is not retried


def test_per_call_timeout(server):
    url, st = server
    be = OpenAIHTTPBackend(url, "timeout", timeout_s=0.2, max_retries=1, sleep=no_sleep)
    t0 = time.perf_counter()
    with pytest.raises(BackendError) as e:
        asyncio.run(be.complete(req()))
    assert e.value.kind == "timeout" and be.stats.timeouts == 2
    assert time.perf_counter() - t0 < 1.5  # did not wait for the 1 s responses


def test_bounded_concurrency(server):
    url, st = server
    be = OpenAIHTTPBackend(url, "slow-ok", max_concurrency=3)

    async def many():
        return await asyncio.gather(*(be.complete(req(f"q{i}")) for i in range(9)))

    out = asyncio.run(many())
    assert len(out) == 9 and st.max_inflight == 3 and be.max_inflight_seen == 3


def test_disk_cache_by_content_hash(server, tmp_path):
    url, st = server
    be = OpenAIHTTPBackend(url, "slow-ok", cache_dir=tmp_path)
    a = asyncio.run(be.complete(req("same")))
    be2 = OpenAIHTTPBackend(url, "slow-ok", cache_dir=tmp_path)  # a fresh process would do the same
    b = asyncio.run(be2.complete(req("same")))
    c = asyncio.run(be2.complete(req("other")))
    assert b.cached and not a.cached and not c.cached and a.text == b.text
    assert st.counter["slow-ok"] == 2 and be2.stats.cache_hits == 1


def test_json_schema_sent_and_auto_fallback(server):
    url, st = server
    schema = {"type": "object"}
    be = OpenAIHTTPBackend(url, "slow-ok")
    asyncio.run(be.complete(req(schema=schema)))
    rf = st.requests[-1]["body"]["response_format"]
    assert rf["type"] == "json_schema" and rf["json_schema"]["schema"] == schema
    be = OpenAIHTTPBackend(url, "no-schema", sleep=no_sleep, max_retries=0)
    resp = asyncio.run(be.complete(req(schema=schema)))  # both styles rejected -> no response_format
    assert resp.text and not be.supports_json_schema and be.stats.schema_fallbacks == 2
    assert "response_format" not in st.requests[-1]["body"]
    be = OpenAIHTTPBackend(url, "llama-style", sleep=no_sleep, max_retries=0)
    resp = asyncio.run(be.complete(req(schema=schema)))  # llama-cpp-python style accepted
    assert resp.text and be.supports_json_schema and be.stats.schema_fallbacks == 1
    assert st.requests[-1]["body"]["response_format"] == {"type": "json_object", "schema": schema}
    asyncio.run(be.complete(req("again", schema=schema)))  # remembered: no second rejection
    assert be.stats.schema_fallbacks == 1 and be.stats.retries == 0


def test_api_key_from_env_never_logged(server, monkeypatch, caplog):
    url, st = server
    monkeypatch.setenv("MY_JUDGE_KEY", "sk-secret-123")
    be = OpenAIHTTPBackend(url, "garbage", api_key_env="MY_JUDGE_KEY", max_retries=0, sleep=no_sleep)
    caplog.set_level(logging.DEBUG)
    with pytest.raises(BackendError) as e:
        asyncio.run(be.complete(req()))
    assert st.requests[-1]["auth"] == "Bearer sk-secret-123"
    assert "sk-secret" not in repr(be) and "sk-secret" not in str(e.value) and "sk-secret" not in caplog.text


# ---- the judge over the same server ------------------------------------------------------------

PAIRS = [
    PairInput("Say something good.", "GOOD answer", "bad answer", query_type="chat"),
    PairInput("Say something good.", "meh", "GOOD one", query_type="chat"),
    PairInput("Say something.", "same", "same", query_type="zzz-unknown"),
]


def test_judge_end_to_end_over_http(server):
    url, st = server
    judge = PairwiseJudge(OpenAIHTTPBackend(url, "slow-ok"), JudgeConfig())
    results = asyncio.run(judge.judge_pairs(PAIRS))
    assert [r.verdict for r in results] == ["first", "second", "same"]
    assert results[0].forward.score > 0 and results[0].backward.score < 0
    assert results[2].domain == "general" and results[0].domain == "dialogue"
    s = summarise(results, ["first", "second", "first"])
    assert s["accuracy"] == 1.0 and s["same_ratio"] == pytest.approx(1 / 3) and s["parse_failure_rate"] == 0
    # Both orders were asked: A/B swapped.
    users = [r["body"]["messages"][-1]["content"] for r in st.requests]
    assert sum("<response_a>\nGOOD answer" in u for u in users) == 1
    assert sum("<response_b>\nGOOD answer" in u for u in users) == 1


def test_judge_counts_failures_as_errors(server):
    url, st = server
    be = OpenAIHTTPBackend(url, "junk-json", sleep=no_sleep)
    judge = PairwiseJudge(be, JudgeConfig(parse_attempts=2))
    res = asyncio.run(judge.judge_pairs(PAIRS[:2]))
    assert all(r.verdict == "error" for r in res)
    assert judge.counters.parse_failures == 4 and judge.counters.parse_retries == 4
    assert judge.counters.error_pairs == 2
    s = summarise(res)
    assert s["parse_failure_rate"] == 1.0 and s["errors"] == 2 and s["error_rate"] == 1.0
    be = OpenAIHTTPBackend(url, "garbage", sleep=no_sleep, max_retries=1)
    judge = PairwiseJudge(be, JudgeConfig())
    res = asyncio.run(judge.judge_pairs(PAIRS[:1]))
    assert res[0].verdict == "error" and judge.counters.backend_failures == 2
    assert summarise(res)["backend_failure_rate"] == 1.0
    assert summarise(res, error_policy="tie")["same"] == 1  # a tie under the "tie" policy


def test_judge_parse_retry_uses_new_seed(server):
    url, st = server
    judge = PairwiseJudge(OpenAIHTTPBackend(url, "junk-then-ok"), JudgeConfig())
    res = asyncio.run(judge.judge_pair(PAIRS[0]))
    assert res.verdict == "first" and res.forward.attempts == 2 and judge.counters.parse_failures == 0


def test_two_stage_intent_is_answer_blind_and_shared(server):
    url, st = server
    judge = PairwiseJudge(OpenAIHTTPBackend(url, "slow-ok"), JudgeConfig(protocol="two_stage"))
    asyncio.run(judge.judge_pairs(PAIRS[:2]))  # same query twice
    intent_calls = [
        r for r in st.requests if r["body"].get("response_format", {}).get("json_schema", {}).get("name") == "intent"
    ]
    assert len(intent_calls) == 1
    assert "GOOD" not in intent_calls[0]["body"]["messages"][-1]["content"]


def test_a_failed_intent_analysis_is_asked_again_for_the_next_pair(server):
    url, st = server  # "flaky": the first two requests get HTTP 500
    judge = PairwiseJudge(
        OpenAIHTTPBackend(url, "flaky", max_retries=0), JudgeConfig(protocol="two_stage", parse_attempts=1)
    )
    asyncio.run(judge.judge_pair(PAIRS[0]))  # the intent call fails (and one direction)
    assert judge.counters.intent_failures == 1
    res = asyncio.run(judge.judge_pair(PAIRS[1]))  # the same query: its intent is asked again
    intent_calls = [
        r for r in st.requests if r["body"].get("response_format", {}).get("json_schema", {}).get("name") == "intent"
    ]
    assert len(intent_calls) == 2 and judge.counters.intent_failures == 1 and res.verdict == "second"


def test_ground_truth_path_decides_without_llm(server):
    url, st = server
    judge = PairwiseJudge(OpenAIHTTPBackend(url, "slow-ok"), JudgeConfig())
    pair = PairInput(
        "Pick one.\n(A) x\n(B) y", "The answer is BBBBB", "AAAAA", query_type="mmlu-pro-law", ground_truth="B"
    )
    res = asyncio.run(judge.judge_pair(pair))
    assert res.verdict == "first" and res.path == "ground_truth" and st.requests == []
    pair = PairInput("Pick one.", "BBBBB", "BBBBB", query_type="mmlu-pro-law", ground_truth="B")
    res = asyncio.run(judge.judge_pair(pair))
    assert res.path == "pairwise"  # equal ground-truth scores fall through


def test_constraint_path(server):
    url, st = server
    judge = PairwiseJudge(OpenAIHTTPBackend(url, "slow-ok"), JudgeConfig())
    pair = PairInput(
        "Answer in at most 3 words.",
        "one two three four five",
        "just three words",
        constraints=[{"type": "word_count", "max": 3}],
    )
    res = asyncio.run(judge.judge_pair(pair))
    assert res.verdict == "second" and res.path == "constraints"


# ---- regressions: cache identity, answer-check fallback, parsing ------------------------------


def preferring(letter: str):
    """A judge server that always prefers the response ``letter`` ("X" or "Y")."""

    class H(JSONHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            a, _ = responses(body["messages"][-1]["content"])
            self._send_chat(json.dumps(rule_judgment("A" if (a == letter) else "B")))

    return H


def test_disk_cache_is_per_server(tmp_path):
    """Two servers under one model name used to share cached answers: the second server's
    verdict was the first one's, read from the cache without a request."""

    async def verdict(url):
        be = OpenAIHTTPBackend(url, "judge", cache_dir=tmp_path, max_retries=0)
        try:
            r = await PairwiseJudge(be, JudgeConfig()).judge_pair(PairInput("q", "X", "Y", query_type="chat"))
        finally:
            await be.aclose()
        return r.verdict, be.stats.cache_hits

    with serve(preferring("X")) as url_x, serve(preferring("Y")) as url_y:
        assert asyncio.run(verdict(url_x)) == ("first", 0)
        assert asyncio.run(verdict(url_y)) == ("second", 0)
        assert asyncio.run(verdict(url_x)) == ("first", 2)  # the same server still reads its cache


def test_llm_answer_check_runs_when_the_verifier_finds_no_answer():
    """Math / factual QA: a response without a final answer the verifier can extract used to
    score -1 (wrong) and decide the pair without asking the LLM answer check."""
    asked = []

    class H(JSONHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            user = body["messages"][-1]["content"]
            if "reference answer that is known to be correct" in user:
                asked.append(user)
                return self._send_chat(json.dumps({"verdict": "correct"}))
            self._send_chat(json.dumps(rule_judgment(good_label(*responses(user)))))

    async def go(url):
        be = OpenAIHTTPBackend(url, "judge", max_retries=0)
        judge = PairwiseJudge(be, JudgeConfig())
        try:
            return [
                await judge.judge_pair(PairInput("q", a, b, query_type=qt, ground_truth=gt))
                for qt, a, b, gt in [
                    ("livebench-math", "The two numbers sum to 7, so x = 7.", "x = \\boxed{7}", "7"),
                    ("gpqa", "The capital of Australia is Canberra.", "The answer is: Canberra", "Canberra"),
                ]
            ]
        finally:
            await be.aclose()

    with serve(H) as url:
        math, factual = asyncio.run(go(url))
    assert math.pointwise["ground_truth"] == [1, 1] and math.path == "pairwise" and math.verdict == "same"
    assert factual.pointwise["ground_truth"] == [1, 1] and factual.path == "pairwise"
    assert len(asked) == 3  # one check for the unboxed math answer, two for the text answers


def test_judgment_quoting_a_fence_parses_and_unknown_types_are_counted():
    """A schema-valid judgment whose evidence quotes a fenced code block used to fail every
    parse attempt (an "error" pair); a criterion type outside the four counts as important."""

    class H(JSONHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            j = rule_judgment(good_label(*responses(body["messages"][-1]["content"])))
            j["criteria"][0]["evidence"] = "Response A: ```python\ndef f(x):\n    return x\n```"
            j["criteria"][0]["type"] = "major"
            self._send_chat(json.dumps(j))

    async def go(url):
        be = OpenAIHTTPBackend(url, "judge", max_retries=0)
        judge = PairwiseJudge(be, JudgeConfig())
        try:
            return await judge.judge_pair(PairInput("Write f.", "GOOD f", "bad f", query_type="chat")), judge
        finally:
            await be.aclose()

    with serve(H) as url:
        res, judge = asyncio.run(go(url))
    assert res.verdict == "first" and res.forward.attempts == 1 and res.backward.attempts == 1
    assert judge.counters.parse_failures == 0 and judge.counters.parse_retries == 0
    assert judge.counters.unknown_criterion_types == 2
    assert res.forward.criteria[0]["type"] == "important" and res.forward.score == pytest.approx(2.0, abs=1e-5)
