"""Regression tests from a correctness review of meta-rubric refinement, the benchmark readers and
replay: each test failed before its fix.  Real components only: a rule-based OpenAI-compatible
server on 127.0.0.1 (``tests/judge_server.py``), real files, the real parsers."""

import asyncio
import json

import pytest
from judge_server import JSONHandler, good_label, responses, rule_judgment, serve

from clipo_jax.rubrics import JudgeConfig, OpenAIHTTPBackend, PairwiseJudge
from clipo_jax.rubrics.meta_rubric import builtin_meta_rubric
from clipo_jax.rubrics.refine import RefineConfig, RefineError, apply_edit, load_preference_pairs, refine
from clipo_jax.rubrics.replay import ReplayBackend, load_transcript, request_key
from clipo_jax.rubrics.types import CompletionRequest


# ----------------------------------------------------------------------------------------------
# Refinement: an LLM edit whose item_index is a JSON number like 1.0.
# ----------------------------------------------------------------------------------------------
def test_apply_edit_integral_float_index_is_an_index():
    r = builtin_meta_rubric("general")
    d = r.dimensions[0]
    new, _ = apply_edit(r, {"op": "delete_item", "dimension_id": d.id, "item_index": 1.0})
    assert new.dimensions[0].items == d.items[:1] + d.items[2:]  # the same edit as item_index 1
    new, _ = apply_edit(r, {"op": "rewrite_item", "dimension_id": d.id, "item_index": 0.0, "item": "Be brief."})
    assert new.dimensions[0].items == ("Be brief.",) + d.items[1:]
    with pytest.raises(RefineError, match="0.5 is not of type 'integer'"):  # the schema's own check
        apply_edit(r, {"op": "delete_item", "dimension_id": d.id, "item_index": 0.5})


class FloatIndexProposer(JSONHandler):
    """Judges by the GOOD rule; every edit request gets a delete_item edit with ``item_index: 1.0``
    (valid JSON Schema: 1.0 is an integer there) for the first dimension of the prompt's rubric."""

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        user = body["messages"][-1]["content"]
        ab = responses(user)
        if ab is not None:
            self._send_chat(json.dumps(rule_judgment(good_label(*ab))))
            return
        first = user.split('id = "', 1)[1].split('"', 1)[0]
        self._send_chat(json.dumps({"op": "delete_item", "dimension_id": first, "item_index": 1.0}))


def test_refinement_survives_a_float_item_index_from_the_proposer(tmp_path):
    path = tmp_path / "pairs.jsonl"
    with open(path, "w") as f:
        for i in range(6):
            f.write(json.dumps({"question_id": f"q{i}", "prompt": f"p{i}", "chosen": "GOOD", "rejected": "BAD"}) + "\n")
    pairs = load_preference_pairs(path)
    cfg = RefineConfig(population=3, generations=1, elite=1, seed=0, mutation="llm", ops=("delete_item",))

    async def go(url):
        backend = OpenAIHTTPBackend(url + "/v1", "m", max_concurrency=4, json_schema=False)
        judge = PairwiseJudge(backend, JudgeConfig(parse_attempts=1, use_ground_truth=False))
        try:
            return await refine(judge, builtin_meta_rubric("general"), pairs, cfg, proposer=backend)
        finally:
            await backend.aclose()

    with serve(FloatIndexProposer) as url:
        res = asyncio.run(go(url))
    c = res.counters
    n_children = (cfg.population - 1) + cfg.generations * (cfg.population - cfg.elite)
    assert c.llm_proposals == n_children and c.llm_accepted == n_children and c.llm_fallbacks == 0
    assert res.best.train.accuracy == 1.0


# ----------------------------------------------------------------------------------------------
# Replay: a transcript line whose response is not a recorded completion.
# ----------------------------------------------------------------------------------------------
REQ = CompletionRequest(messages=[{"role": "user", "content": "hi"}])


@pytest.mark.parametrize(
    "response, why",
    [
        (None, "response"),
        ("just text", "response"),
        ({"txt": "x"}, "text"),
        ({"text": 3}, "text"),
        ({"text": "ok", "prompt_tokens": None}, "prompt_tokens"),
        ({"text": "ok", "completion_tokens": "many"}, "completion_tokens"),
    ],
)
def test_a_malformed_transcript_line_is_a_one_line_error_when_loaded(tmp_path, response, why):
    path = tmp_path / "t.jsonl"
    good = {"key": request_key(REQ), "response": {"text": "fine"}}
    path.write_text(json.dumps(good) + "\n" + json.dumps({"key": "k2", "response": response}) + "\n")
    with pytest.raises(ValueError) as e:
        load_transcript(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}:2: ") and why in msg and "\n" not in msg
    with pytest.raises(ValueError, match=f"{path}:2: "):
        ReplayBackend(path)


def test_a_well_formed_transcript_replays(tmp_path):
    path = tmp_path / "t.jsonl"
    rec = {"key": request_key(REQ), "response": {"text": "fine", "prompt_tokens": 7, "finish_reason": "stop"}}
    path.write_text(json.dumps(rec) + "\n")
    out = asyncio.run(ReplayBackend(path).complete(REQ))
    assert (out.text, out.prompt_tokens, out.completion_tokens, out.finish_reason) == ("fine", 7, 0, "stop")


# ----------------------------------------------------------------------------------------------
# Refinement: a variant under which the judge fails on the hard pairs must not win by it.
# ----------------------------------------------------------------------------------------------
class ContextLimitJudge(JSONHandler):
    """A judge with a context limit: a prompt longer than ``limit`` characters gets HTTP 400 (as a
    server answers a prompt over its context), else the longer response wins (so it is right on
    the short pairs, where the GOOD answer is the longer one, and wrong on the long pairs)."""

    limit = 10**9
    seen: list

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        user = body["messages"][-1]["content"]
        self.seen.append(len(user))
        if len(user) > self.limit:
            self._send(400, {"error": {"message": "maximum context length exceeded"}})
            return
        a, b = responses(user)
        self._send_chat(json.dumps(rule_judgment("A" if len(a) > len(b) else "B")))


def test_a_variant_that_makes_the_judge_fail_scores_below_the_initial_rubric(tmp_path):
    from clipo_jax.rubrics.refine import Refiner

    path = tmp_path / "pairs.jsonl"
    rows = [{"question_id": f"s{i}", "prompt": "p", "chosen": "GOOD answer.", "rejected": "BAD"} for i in range(6)]
    rows += [
        {"question_id": f"l{i}", "prompt": "p", "chosen": "GOOD " + "x" * 300, "rejected": "BAD " + "y" * 400}
        for i in range(4)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs = load_preference_pairs(path)
    initial = builtin_meta_rubric("general")
    extra = {"id": "extra_rule", "title": "An extra rule", "type": "important", "items": ["Check it twice."]}
    grown, _ = apply_edit(initial, {"op": "add_dimension", "dimension": extra})
    seen: list = []
    handler = type("H", (ContextLimitJudge,), {"seen": seen})

    async def fitness(url, rubric):
        backend = OpenAIHTTPBackend(url + "/v1", "m", max_concurrency=4, json_schema=False, max_retries=0)
        judge = PairwiseJudge(backend, JudgeConfig(parse_attempts=1, use_ground_truth=False))
        try:
            return await Refiner(judge, RefineConfig(length_penalty=0.0, mutation="programmatic")).fitness(
                rubric, pairs, "all"
            )
        finally:
            await backend.aclose()

    with serve(handler) as url:
        before = asyncio.run(fitness(url, initial))
        handler.limit = max(seen) + 10  # the initial rubric's longest prompt just fits
        base = asyncio.run(fitness(url, initial))
        big = asyncio.run(fitness(url, grown))
    # Independent expectations: under the initial rubric every prompt fits: 6 wins, 4 losses.
    assert (before.wins, before.losses, before.errors) == (6, 4, 0) and base == before
    # Under the grown rubric the 4 long pairs no longer fit: 6 wins, 4 errors, the same accuracy
    # over decided pairs as reported ...
    assert (big.wins, big.losses, big.errors) == (6, 0, 4) and big.accuracy == 1.0
    # ... but a failed judgment is no evidence for the rubric: fitness counts it as wrong.
    assert big.fitness == pytest.approx(6 / 10) and base.fitness == pytest.approx(6 / 10)
    assert big.fitness <= base.fitness


# ----------------------------------------------------------------------------------------------
# Benchmark readers: a compact JSON list (json.dump's default layout) of rows without ids.
# ----------------------------------------------------------------------------------------------
def test_compact_json_list_without_ids_reads_every_row(tmp_path):
    from clipo_jax.rubrics.benchmarks import read_rewardbench2, read_rmbench

    def rm(d):
        return {"prompt": f"p {d}", "chosen": ["a", "b", "c"], "rejected": ["x", "y", "z"], "domain": d}

    path = tmp_path / "rm.json"
    path.write_text(json.dumps([rm("chat"), rm("math"), rm("code")]))  # one line
    got = read_rmbench(path)
    assert got.n_rows == 3 and len(got.pairs) == 27 and not got.invalid
    assert sorted({p["bench"]["row"] for p in got.pairs}) == ["row1", "row1_2", "row1_3"]
    assert [p["query_type"] for p in got.pairs[::9]] == ["chat", "math", "code"]
    # A pretty-printed list keeps its ids (the line each element starts on), as before.
    path.write_text(json.dumps([rm("chat"), rm("math")], indent=1))
    lines = path.read_text().splitlines()
    starts = [n for n, line in enumerate(lines, 1) if line == " {"]
    assert sorted({p["bench"]["row"] for p in read_rmbench(path).pairs}) == sorted(f"row{n}" for n in starts)

    rb = {"prompt": "p", "chosen": ["a"], "rejected": ["x", "y", "z"], "subset": "Math"}
    path = tmp_path / "rb.json"
    path.write_text(json.dumps([rb, rb]))
    got = read_rewardbench2(path)
    assert got.n_rows == 2 and len(got.pairs) == 6


# ----------------------------------------------------------------------------------------------
# Meta-rubric files: any text an edit can carry round-trips through to_toml.
# ----------------------------------------------------------------------------------------------
def test_to_toml_round_trips_control_characters_quotes_and_unicode(tmp_path):
    import dataclasses

    from clipo_jax.rubrics.meta_rubric import load_meta_rubric

    r = builtin_meta_rubric("general")
    text = 'bell \x07 del \x7f tab \t cr \r quote " backslash \\ newline \n café 数学 \U0001f600'
    d = dataclasses.replace(r.dimensions[0], items=(text,) + r.dimensions[0].items[1:])
    r2 = dataclasses.replace(r, description=text, dimensions=(d,) + tuple(r.dimensions[1:]))
    path = tmp_path / "general.toml"
    path.write_text(r2.to_toml(), encoding="utf-8")
    back = load_meta_rubric(path)
    assert back.description == text and back.dimensions[0].items[0] == text
    assert back.to_toml() == r2.to_toml()
