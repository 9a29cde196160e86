"""Checklist rubrics (RaR explicit aggregation): validation, the formula, and the scorer against a
real rule-based OpenAI-compatible server on 127.0.0.1.

The server's "judge" rule: an item is satisfied iff the response contains the last word of the
item's criterion (case-insensitive).  Its behaviour is picked by the request's ``model`` field.
"""

import asyncio
import http.server
import json
import random
import re
import threading
import time

import pytest
from judge_server import JSONHandler

from clipo_jax.rubrics.backends import OpenAIHTTPBackend
from clipo_jax.rubrics.checklist import (
    ChecklistConfig,
    ChecklistError,
    ChecklistParseError,
    ChecklistScorer,
    RubricItem,
    checklist_schema,
    checklist_score,
    parse_checklist_answer,
    parse_rubric,
)


def rule_verdicts(user_text: str) -> list[dict]:
    response = re.search(r"<response>\n(.*?)\n</response>", user_text, re.DOTALL).group(1).lower()
    checklist = user_text.split("# Checklist\n", 1)[1].split("\n\n# Output", 1)[0]
    out = []
    for line in checklist.splitlines():
        m = re.fullmatch(r"(\d+)\. (?:\[pitfall\] )?(.*)", line)
        last = re.findall(r"\w+", m.group(2))[-1].lower()
        out.append({"id": int(m.group(1)), "satisfied": last in response})
    return out


class State:
    def __init__(self):
        self.lock = threading.Lock()
        self.bodies = []
        self.inflight = 0
        self.max_inflight = 0


class Handler(JSONHandler):
    state: State = None

    def do_POST(self):
        st = self.state
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        model = body["model"]
        with st.lock:
            st.bodies.append(body)
            st.inflight += 1
            st.max_inflight = max(st.max_inflight, st.inflight)
        try:
            if model == "slow":
                time.sleep(0.1)
            if model == "down":
                return self._send(500, {"error": "judge is down"})
            verdicts = rule_verdicts(body["messages"][-1]["content"])
            if model == "junk" or (model == "junk-then-ok" and body["seed"] == 0):
                content = "Item 1 looks fine to me, the rest I am not sure about."
            elif model == "partial":
                content = json.dumps({"items": verdicts[:1]})
            else:  # think aloud, then the answer in a fenced block
                content = "Checking each item.\n```json\n" + json.dumps({"items": verdicts}) + "\n```"
            self._send(
                200,
                {
                    "choices": [{"message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 7, "completion_tokens": 3},
                },
            )
        finally:
            with st.lock:
                st.inflight -= 1


@pytest.fixture()
def server():
    state = State()
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), type("H", (Handler,), {"state": state}))
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", state
    srv.shutdown()
    srv.server_close()


async def no_sleep(_):
    return None


def scorer(url, model, max_in_flight=64, parse_attempts=3, max_retries=0):
    backend = OpenAIHTTPBackend(url, model, max_concurrency=16, max_retries=max_retries, sleep=no_sleep)
    return ChecklistScorer(backend, ChecklistConfig(max_in_flight=max_in_flight, parse_attempts=parse_attempts))


RUBRIC = [
    {"criterion": "Names the capital, Paris", "weight": 5},
    {"criterion": "Gives a population figure", "weight": 3, "kind": "important"},
    {"criterion": "Mentions the river Seine", "weight": 2, "kind": "optional"},
    {"criterion": "Places the city in Germany", "weight": -4, "kind": "pitfall"},
]
PROMPT = "Tell me about the capital of France."


# ---- the formula --------------------------------------------------------------------------------


def reference_score(weights, satisfied):
    """Independent form: the satisfied weights summed with their signs, over the positive total."""
    signed = sum(w for w, s in zip(weights, satisfied) if s)
    return max(0.0, min(1.0, signed / sum(max(w, 0.0) for w in weights)))


def test_checklist_score_matches_independent_formula():
    rng = random.Random(0)
    for _ in range(500):
        n = rng.randint(1, 8)
        weights = [rng.choice([-1, 1]) * rng.uniform(0.1, 10) for _ in range(n)]
        weights[rng.randrange(n)] = rng.uniform(0.1, 10)  # at least one positive
        satisfied = [rng.random() < 0.5 for _ in range(n)]
        items = [RubricItem(f"c{i}", w, "pitfall" if w < 0 else "criterion") for i, w in enumerate(weights)]
        assert checklist_score(items, satisfied) == pytest.approx(reference_score(weights, satisfied), abs=1e-12)
    items = parse_rubric(RUBRIC)
    assert checklist_score(items, [True, True, True, False]) == 1.0
    assert checklist_score(items, [True, False, True, False]) == pytest.approx(0.7)
    assert checklist_score(items, [True, False, False, True]) == pytest.approx(0.1)
    assert checklist_score(items, [False, False, True, True]) == 0.0  # 2 - 4 < 0: clipped
    with pytest.raises(ValueError, match="4 items but 3"):
        checklist_score(items, [True, True, True])


# ---- rubric validation --------------------------------------------------------------------------


def test_parse_rubric_defaults_and_kinds():
    items = parse_rubric([{"criterion": "  Says hi ", "weight": 2}, {"criterion": "Is rude", "weight": -1.5}])
    assert items == [RubricItem("Says hi", 2.0, "criterion"), RubricItem("Is rude", -1.5, "pitfall")]
    assert parse_rubric(items, "row 0") == items  # parsed items pass through
    assert [it.kind for it in parse_rubric(RUBRIC)] == ["criterion", "important", "optional", "pitfall"]


@pytest.mark.parametrize(
    "rubric, message",
    [
        ("Mentions X", "row 12 rubric: expected a list of items, got str"),
        ({"criterion": "x", "weight": 1}, "row 12 rubric: expected a list of items, got dict"),
        ([], "row 12 rubric: no items"),
        ([{"criterion": "a", "weight": 1}, "b"], "row 12 rubric item 2: expected an object"),
        ([{"criterion": "a", "weight": 1, "note": 1}], "row 12 rubric item 1: unknown field(s) 'note'"),
        ([{"weight": 1}], "row 12 rubric item 1: 'criterion' must be a non-empty string (missing)"),
        ([{"criterion": 3, "weight": 1}], "row 12 rubric item 1: 'criterion' must be a non-empty string (got int)"),
        (
            [{"criterion": "a", "weight": 1}, {"criterion": " \n", "weight": 1}],
            "row 12 rubric item 2: 'criterion' is empty",
        ),
        ([{"criterion": "a"}], "row 12 rubric item 1: 'weight' is missing"),
        ([{"criterion": "a", "weight": "5"}], "row 12 rubric item 1: 'weight' must be a number, got '5'"),
        ([{"criterion": "a", "weight": True}], "row 12 rubric item 1: 'weight' must be a number, got True"),
        ([{"criterion": "a", "weight": None}], "row 12 rubric item 1: 'weight' must be a number, got None"),
        ([{"criterion": "a", "weight": float("nan")}], "row 12 rubric item 1: 'weight' must be finite, got nan"),
        ([{"criterion": "a", "weight": float("inf")}], "row 12 rubric item 1: 'weight' must be finite, got inf"),
        ([{"criterion": "a", "weight": 1}, {"criterion": "b", "weight": 0}], "row 12 rubric item 2: 'weight' is 0"),
        ([{"criterion": "a", "weight": -2}], "row 12 rubric: needs at least one item with a positive weight"),
        ([{"criterion": "a", "weight": 1, "kind": "bonus"}], "row 12 rubric item 1: 'kind' must be one of"),
        ([{"criterion": "a", "weight": 1, "kind": "pitfall"}], "row 12 rubric item 1: kind 'pitfall' needs a negative"),
        (
            [{"criterion": "a", "weight": 1}, {"criterion": "b", "weight": -1, "kind": "essential"}],
            "row 12 rubric item 2: kind 'essential' needs a positive",
        ),
    ],
)
def test_parse_rubric_errors_are_one_line_and_name_the_item(rubric, message):
    with pytest.raises(ChecklistError) as e:
        parse_rubric(rubric, where="row 12")
    assert str(e.value).startswith(message) and "\n" not in str(e.value)
    assert isinstance(e.value, ValueError)


def test_invalid_rubric_in_score_many_raises_before_any_call(server):
    url, st = server
    s = scorer(url, "ok")
    bad = [{"criterion": "a", "weight": 1}, {"criterion": "b", "weight": 0}]
    with pytest.raises(ChecklistError, match=r"^request 1 rubric item 2: 'weight' is 0"):
        asyncio.run(s.score_many([(PROMPT, "Paris", RUBRIC), (PROMPT, "Paris", bad)]))
    assert st.bodies == [] and s.counters.calls == 0


# ---- answer parsing -----------------------------------------------------------------------------


def test_parse_checklist_answer_variants():
    good = '{"items": [{"id": 2, "satisfied": false}, {"id": 1, "satisfied": true}]}'
    assert parse_checklist_answer(good, 2) == [True, False]  # any order
    assert parse_checklist_answer("thinking...\n```json\n" + good + "\n```", 2) == [True, False]
    assert parse_checklist_answer('{"items": [{"id": "1", "satisfied": "yes"}, {"id": 2, "satisfied": "no"},]}', 2) == [
        True,
        False,
    ]  # repaired trailing comma, string forms
    assert parse_checklist_answer('[{"id": 1, "satisfied": true}]', 1) == [True]  # bare list
    for text, match in [
        ("", "empty"),
        ("no json at all", "no 'items' list"),
        ('{"items": [{"id": 1, "satisfied": true}]}', "misses item"),
        ('{"items": [{"id": 3, "satisfied": true}]}', "expected 1..2"),
        ('{"items": [{"id": 1, "satisfied": "maybe"}]}', "expected true/false"),
        ('{"items": [{"id": 1, "satisfied": true}, {"id": 1, "satisfied": false}]}', "both"),
    ]:
        with pytest.raises(ChecklistParseError, match=match):
            parse_checklist_answer(text, 2)


@pytest.mark.parametrize(
    "raw_id, want",
    [("2", 2), (" 2 ", 2), ("2.0", None), ("+2", None), ("-1", None), ("0", None), ("x", None)]
    + [(2, 2), (2.0, 2), (1.5, None), (True, None), (None, None), ([2], None)],
)
def test_parse_checklist_answer_item_ids(raw_id, want):
    """An item id is an integer 1..n written as a JSON number or a decimal string; anything else
    (a bool, a fraction, a signed or negative string, an id out of range) is a parse error that
    quotes the id as the judge wrote it."""
    other = {"id": 1, "satisfied": True}
    text = json.dumps({"items": [other, {"id": raw_id, "satisfied": False}]})
    if want is None:
        with pytest.raises(ChecklistParseError, match=r"^items\[1\] has id .*, expected 1\.\.2$"):
            parse_checklist_answer(text, 2)
    else:
        assert parse_checklist_answer(text, 2) == [True, False]


def test_checklist_shares_the_index_parser_and_stays_light():
    """One integer-id parser for the dataset readers and the checklist judge, in a module that
    imports nothing: loading the checklist does not load the dataset readers or sympy."""
    import subprocess
    import sys

    from clipo_jax.data import datasets, indices
    from clipo_jax.rubrics import checklist

    assert checklist.as_index is indices.as_index and datasets.as_index is indices.as_index
    code = (
        "import sys, clipo_jax.rubrics.checklist; "
        "print(sorted(m for m in ('sympy', 'clipo_jax.data.datasets', 'clipo_jax.rewards.math') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]"


# ---- the scorer over HTTP -----------------------------------------------------------------------


def test_scores_over_http_with_pitfalls_and_clipping(server):
    url, st = server
    s = scorer(url, "ok")
    responses = [
        "Paris, with a population figure of about two million, lies on the Seine.",  # all positive
        "Paris is on the Seine.",  # 5 + 2
        "Paris is a city in Germany.",  # 5 - 4
        "It is a German city: Germany, on the Seine.",  # 2 - 4 -> clipped to 0
        "I do not know.",
    ]
    results = asyncio.run(s.score_many([(PROMPT, r, RUBRIC) for r in responses]))
    assert [r.score for r in results] == pytest.approx([1.0, 0.7, 0.1, 0.0, 0.0])
    assert results[2].satisfied == [True, False, False, True]
    assert all(r.error_kind is None and r.attempts == 1 for r in results)
    single = asyncio.run(s.score(PROMPT, "Paris", RUBRIC))  # a second event loop works too
    assert single.score == pytest.approx(0.5) and single.satisfied == [True, False, False, False]
    c = s.counters.as_dict()
    assert c["requests"] == 6 and c["calls"] == 6 and c["scored"] == 6 and c["prompt_tokens"] == 42
    assert c["parse_failures"] == c["backend_failures"] == c["dedup_hits"] == 0 and c["latency_s"] > 0
    # Schema-constrained request; the judge sees neither weights nor kinds apart from the pitfall mark.
    body = st.bodies[0]
    assert body["response_format"]["json_schema"]["schema"] == checklist_schema(4)
    assert body["response_format"]["json_schema"]["name"] == "checklist"
    user = body["messages"][-1]["content"]
    assert "4. [pitfall] Places the city in Germany" in user and "1. Names the capital, Paris" in user
    assert "weight" not in user and "important" not in user


def test_concurrent_and_bounded(server):
    url, st = server
    s = scorer(url, "slow", max_in_flight=3)
    results = asyncio.run(s.score_many([(PROMPT, f"Paris {i}", RUBRIC) for i in range(9)]))
    assert all(r.score == pytest.approx(0.5) for r in results)
    assert st.max_inflight == 3  # concurrent, and capped by max_in_flight (the backend allows 16)
    assert s.counters.latency_s >= 9 * 0.1


def test_identical_requests_are_judged_once(server):
    url, st = server
    s = scorer(url, "ok")
    reqs = [(PROMPT, "Paris", RUBRIC)] * 3 + [(PROMPT, "Seine", RUBRIC), (PROMPT, "Paris", parse_rubric(RUBRIC))]
    results = asyncio.run(s.score_many(reqs))
    assert len(st.bodies) == 2 and s.counters.calls == 2
    assert s.counters.dedup_hits == 3 and s.counters.requests == 5
    assert [r.score for r in results] == pytest.approx([0.5, 0.5, 0.5, 0.2, 0.5])
    results[0].satisfied[0] = False  # duplicates do not share state
    assert results[1].satisfied == [True, False, False, False]


def test_junk_output_is_a_counted_parse_failure(server):
    url, st = server
    s = scorer(url, "junk", parse_attempts=2)
    results = asyncio.run(s.score_many([(PROMPT, "Paris", RUBRIC), (PROMPT, "Seine", RUBRIC)]))
    assert all(r.score is None and r.satisfied is None and r.error_kind == "parse" for r in results)
    assert all(r.attempts == 2 for r in results) and len(st.bodies) == 4
    assert s.counters.parse_failures == 2 and s.counters.parse_retries == 2 and s.counters.scored == 0
    assert sorted(b["seed"] for b in st.bodies) == [0, 0, 1, 1]  # a new seed per attempt
    s = scorer(url, "partial", parse_attempts=1)  # an answer that misses items fails too
    r = asyncio.run(s.score(PROMPT, "Paris", RUBRIC))
    assert r.score is None and r.error_kind == "parse" and "misses item(s) 2, 3, 4" in r.error
    assert s.counters.parse_failures == 1 and s.counters.parse_retries == 0


def test_parse_retry_recovers(server):
    url, st = server
    s = scorer(url, "junk-then-ok")
    r = asyncio.run(s.score(PROMPT, "Paris on the Seine", RUBRIC))
    assert r.score == pytest.approx(0.7) and r.attempts == 2 and r.error is None
    assert s.counters.parse_retries == 1 and s.counters.parse_failures == 0 and s.counters.scored == 1


def test_http_500_is_a_counted_backend_failure(server):
    url, st = server
    s = scorer(url, "down", max_retries=1)
    results = asyncio.run(s.score_many([(PROMPT, "Paris", RUBRIC), (PROMPT, "Seine", RUBRIC)]))
    assert all(r.score is None and r.error_kind == "http" and "HTTP 500" in r.error for r in results)
    assert s.counters.backend_failures == 2 and s.counters.parse_failures == 0
    assert len(st.bodies) == 4  # the backend retried each once; the scorer did not retry on top


def test_config_validation():
    with pytest.raises(ValueError, match="parse_attempts"):
        ChecklistConfig(parse_attempts=0)
    with pytest.raises(ValueError, match="max_in_flight"):
        ChecklistConfig(max_in_flight=0)
