"""Constraints written in words and ground-truth checks for every domain, against a real
OpenAI-compatible HTTP server on 127.0.0.1 that answers by rule:

* a pairwise judgment prefers the response containing GOOD;
* a yes/no constraint check answers "yes" when the response contains CITY at all (a loose rule),
  and prose without yes or no when it contains UNSURE;
* a request for checker code returns ``check`` counting exactly two CITY (so its verdict differs
  from the yes/no rule on "CITY CITY CITY"), or code that does not compile / raises when the
  constraint's text says BROKEN_COMPILE / BROKEN_RUN;
* an answer check against a ground truth says "correct" when the response contains the reference
  or EQUIV, prose when it contains UNDECIDED, "wrong" otherwise.
"""

import asyncio
import http.server
import json
import re
import threading

import pytest

from clipo_jax.rubrics import JudgeConfig, OpenAIHTTPBackend, PairInput, PairwiseJudge
from clipo_jax.rubrics.pairs import validate_constraint, validate_row
from clipo_jax.rubrics.sandbox import detect_layers

needs_sandbox = pytest.mark.skipif(not detect_layers().usable, reason="no usable sandbox: checkers are refused")

TWO_CITIES = "```python\nimport re\n\ndef check(response):\n    return len(re.findall(r'CITY', response)) == 2\n```"
NO_COMPILE = "```python\ndef check(response):\n    return (\n```"
RAISES = "```python\ndef check(response):\n    raise ValueError('boom')\n```"


def judgment(label: str) -> dict:
    crit = {"id": "c1", "title": "t", "type": "core", "evidence": "e", "reason": "r", "label": label}
    crit["score"] = 0 if label == "S" else 2
    return {
        "intent": {"task": "t", "explicit_requirements": [], "implicit_requirements": []},
        "differences": ["d"],
        "criteria": [crit],
    }


def tag(text: str, name: str) -> str | None:
    m = re.search(rf"<{name}>\n(.*?)\n</{name}>", text, re.DOTALL)
    return m.group(1) if m else None


class Handler(http.server.BaseHTTPRequestHandler):
    requests: list = None

    def log_message(self, *args):
        pass

    def _reply(self, content: str):
        data = json.dumps(
            {
                "choices": [{"message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 10, "completion_tokens": 5},
            }
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        user = body["messages"][-1]["content"]
        a, b = tag(user, "response_a"), tag(user, "response_b")
        if a is not None and b is not None:
            self.requests.append(("pairwise", user))
            label = "A" if "GOOD" in a and "GOOD" not in b else ("B" if "GOOD" in b and "GOOD" not in a else "S")
            return self._reply(json.dumps(judgment(label)))
        if user.startswith("Write a Python function"):
            self.requests.append(("code", user))
            rule = tag(user, "constraint")
            return self._reply(
                NO_COMPILE if "BROKEN_COMPILE" in rule else RAISES if "BROKEN_RUN" in rule else TWO_CITIES
            )
        response = tag(user, "response")
        if tag(user, "constraint") is not None:
            self.requests.append(("yes_no", user))
            if "UNSURE" in response:
                return self._reply("I cannot tell.")
            return self._reply(json.dumps({"answer": "yes" if "CITY" in response else "no"}))
        reference = tag(user, "reference")
        self.requests.append(("answer_check", user))
        if "UNDECIDED" in response:
            return self._reply("It is hard to say.")
        ok = reference in response or "EQUIV" in response
        return self._reply(json.dumps({"verdict": "correct" if ok else "wrong"}))


@pytest.fixture()
def server():
    handler = type("H", (Handler,), {"requests": []})
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", handler.requests
    srv.shutdown()
    srv.server_close()


def run(url, pairs, cache_dir=None, **kw):
    backend = OpenAIHTTPBackend(url, "m", max_retries=0, timeout_s=30.0, cache_dir=cache_dir)
    judge = PairwiseJudge(backend, JudgeConfig(parse_attempts=2, **kw))

    async def go():
        try:
            return await judge.judge_pairs(pairs)
        finally:
            await backend.aclose()

    return asyncio.run(go()), judge


def kinds(requests) -> dict[str, int]:
    out: dict[str, int] = {}
    for k, _ in requests:
        out[k] = out.get(k, 0) + 1
    return out


# ----------------------------------------------------------------------------------------------
# Constraints written in words.
# ----------------------------------------------------------------------------------------------
def in_words(rule, need_code=False):
    return [{"rule": rule, "need_code": need_code}]


def test_yes_no_check_decides_the_constraint_path(server):
    url, requests = server
    rule = "The answer must mention a CITY."
    (res,), j = run(
        url, [PairInput(f"Name a place. {rule}", "no place here", "CITY of light", constraints=in_words(rule))]
    )
    assert res.path == "constraints" and res.verdict == "second" and res.pointwise["constraints"] == [False, True]
    assert kinds(requests) == {"yes_no": 2}
    # The query is shown without the constraint appended to it, the constraint on its own.
    user = requests[0][1]
    assert tag(user, "query") == "Name a place." and tag(user, "constraint") == rule
    assert j.counters.nl_constraint_checks == 2 and j.counters.checker_code_writes == 0


@needs_sandbox
def test_checker_code_runs_in_the_sandbox_and_is_written_once(server):
    url, requests = server
    rule = "The answer must mention exactly two CITY names."
    # The yes/no rule would pass all three responses; the checker passes exactly two CITY only.
    pairs = [
        PairInput("q", "CITY CITY CITY", "CITY and CITY", constraints=in_words(rule, True), pair_id=f"p{i}")
        for i in range(4)
    ] + [PairInput("q", "CITY, CITY", "just one CITY", constraints=in_words(rule, True), pair_id="p4")]
    res, j = run(url, pairs)
    assert [r.verdict for r in res] == ["second"] * 4 + ["first"]
    assert all(r.path == "constraints" for r in res)
    assert kinds(requests) == {"code": 1}  # one code-writing call for ten responses, no yes/no call
    assert j.counters.checker_code_writes == 1 and j.counters.checker_runs == 10
    assert j.counters.checker_code_failures == 0 and j.counters.nl_constraint_checks == 0


@needs_sandbox
def test_checker_code_is_kept_in_the_backend_disk_cache(server, tmp_path):
    url, requests = server
    cons = in_words("Exactly two CITY.", True)
    pair = PairInput("q", "CITY CITY CITY", "CITY CITY", constraints=cons)
    (first,), _ = run(url, [pair], cache_dir=tmp_path)
    (again,), j = run(url, [pair], cache_dir=tmp_path)  # a new judge: its memory cache is empty
    assert first.verdict == again.verdict == "second"
    assert kinds(requests) == {"code": 1} and j.counters.checker_runs == 2


def test_code_that_does_not_compile_falls_back_to_yes_no(server):
    url, requests = server
    cons = in_words("BROKEN_COMPILE: two CITY exactly.", True)
    pairs = [PairInput("q", "CITY CITY CITY", "none", constraints=cons), PairInput("q", "x", "CITY", constraints=cons)]
    res, j = run(url, pairs)
    # The yes/no rule decides (CITY present): "CITY CITY CITY" passes, which the checker would not.
    assert [(r.path, r.verdict) for r in res] == [("constraints", "first"), ("constraints", "second")]
    assert kinds(requests) == {"code": 1, "yes_no": 4}
    assert j.counters.checker_code_failures == 1 and j.counters.checker_runs == 0


@needs_sandbox
def test_checker_that_fails_to_run_falls_back_to_yes_no(server):
    url, requests = server
    cons = in_words("BROKEN_RUN: two CITY exactly.", True)
    (res,), j = run(url, [PairInput("q", "CITY CITY CITY", "none", constraints=cons)])
    assert (res.path, res.verdict) == ("constraints", "first")
    assert kinds(requests) == {"code": 1, "yes_no": 2}
    assert j.counters.checker_runs == 2 and j.counters.checker_code_failures == 2


def test_programmatic_constraints_are_the_fast_path(server):
    url, requests = server
    cons = [{"type": "keywords_exclude", "keywords": ["bad"]}, {"rule": "Mention a CITY.", "need_code": False}]
    (res,), j = run(url, [PairInput("q", "bad CITY", "a CITY", constraints=cons)])
    # The first response fails the programmatic check: no LLM call for it.
    assert (res.path, res.verdict) == ("constraints", "second")
    assert kinds(requests) == {"yes_no": 1} and j.counters.nl_constraint_checks == 1


def test_a_blank_response_follows_no_constraint(server):
    url, requests = server
    cons = [{"type": "no_commas"}, {"type": "keywords_exclude", "keywords": ["however"]}]
    (res,), _ = run(url, [PairInput("q", "  \n", "Paris is lovely in summer.", constraints=cons)])
    assert (res.path, res.verdict) == ("constraints", "second")
    assert res.pointwise["constraints"] == [False, True]
    assert kinds(requests) == {}


def test_undecided_check_goes_to_the_pairwise_protocol(server):
    url, requests = server
    cons = in_words("Mention a CITY.")
    (res,), j = run(url, [PairInput("q", "UNSURE GOOD", "no", constraints=cons)])
    assert res.path == "pairwise" and res.verdict == "first"
    assert res.pointwise["constraints"] == [None, False] and res.pointwise["constraint_check_failed"] == [True, False]
    assert j.counters.nl_constraint_check_failures == 1
    assert kinds(requests) == {"yes_no": 3, "pairwise": 2}  # two attempts for the unparseable answer


def test_a_constraint_in_words_is_a_valid_row_constraint():
    assert validate_constraint({"rule": "Mention exactly two cities.", "need_code": False}) is None
    assert validate_constraint({"rule": "Use at most 3 commas."}) is None
    assert "non-empty string" in validate_constraint({"rule": "  ", "need_code": True})
    assert "true or false" in validate_constraint({"rule": "r", "need_code": "yes"})
    assert "unknown keys" in validate_constraint({"rule": "r", "code": "x"})
    row = {"prompt": "p", "chosen": "a", "rejected": "b", "constraints": [{"rule": "r", "need_code": True}]}
    assert validate_row(row) is None


# ----------------------------------------------------------------------------------------------
# Ground truth for every domain.
# ----------------------------------------------------------------------------------------------
def test_code_row_ground_truth_is_checked_by_the_llm(server):
    url, requests = server
    pair = PairInput(
        "Return whether the XOR of derived can be zero.",
        "def f(derived):\n    return True",
        "def f(derived):\n    return not sum(derived) & 1  # EQUIV",
        query_type="livecodebench",
        ground_truth="return sum(derived) % 2 == 0",
    )
    (res,), j = run(url, [pair])
    assert (res.domain, res.path, res.verdict) == ("code", "ground_truth", "second")
    assert res.pointwise["ground_truth"] == [-1, 1]
    assert kinds(requests) == {"answer_check": 2}
    user = requests[0][1]  # the whole response and the task are shown, not an extracted answer
    assert "Return whether the XOR" in user and "def f(derived)" in user
    assert j.counters.path_ground_truth == 1


def test_unknown_domain_row_ground_truth_is_checked(server):
    url, requests = server
    pair = PairInput("Capital of France?", "It is Lyon.", "Paris.", query_type="zzz-unrouted-set", ground_truth="Paris")
    (res,), _ = run(url, [pair])
    # "Paris." equals the ground truth after normalisation (programmatic); "It is Lyon." needs the LLM.
    assert (res.domain, res.path, res.verdict) == ("general", "ground_truth", "second")
    assert kinds(requests) == {"answer_check": 1}


def test_choice_letter_is_programmatic_in_a_subject_domain(server):
    url, requests = server
    pair = PairInput("Which doctrine ...?", "The answer is AAAAA", "So: BBBBB", domain="law", ground_truth="B")
    (res,), _ = run(url, [pair])
    assert (res.domain, res.path, res.verdict) == ("law", "ground_truth", "second")
    assert requests == []


def test_failed_or_undecided_ground_truth_check_falls_back_to_pairwise(server):
    url, requests = server
    failed = PairInput("q", "UNDECIDED GOOD", "wrong", query_type="livecodebench", ground_truth="ref")
    equal = PairInput("q", "ref GOOD", "ref", query_type="livecodebench", ground_truth="ref")
    res, _ = run(url, [failed, equal])
    assert [(r.path, r.verdict) for r in res] == [("pairwise", "first"), ("pairwise", "first")]
    assert res[0].pointwise["answer_check_failed"] == [True, False] and res[0].failed
    assert res[1].pointwise["ground_truth"] == [1, 1]


def test_ground_truth_without_llm_check_is_skipped_where_no_program_can_tell(server):
    url, requests = server
    pair = PairInput("q", "GOOD code", "other code", query_type="livecodebench", ground_truth="return x")
    (res,), _ = run(url, [pair], llm_answer_check=False)
    assert res.path == "pairwise" and res.pointwise["ground_truth"] == [None, None]
    assert kinds(requests) == {"pairwise": 2}
