"""Meta-rubric files, routing and the judge-output parser."""

import json
import logging

import pytest
from datadir import JUDGEBENCH
from hypothesis import given, settings
from hypothesis import strategies as st

from clipo_jax.rubrics.meta_rubric import (
    DIMENSION_TYPES,
    MetaRubricError,
    available_domains,
    builtin_meta_rubric,
    builtin_router,
    domain_for_query_type,
    load_meta_rubric,
    parse_meta_rubric,
    parse_routing,
)
from clipo_jax.rubrics.protocol import (
    JudgeParseError,
    PromptConfig,
    build_intent_messages,
    build_pairwise_messages,
    extract_json_text,
    parse_judgment,
    truncate_middle,
)

REQUIRED_DOMAINS = {
    "math",
    "code",
    "factual_qa",
    "reasoning",
    "creative_writing",
    "dialogue",
    "safety",
    "instruction_following",
    "translation",
    "summarisation",
}


def test_shipped_files_load_from_any_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # package data, never the working directory
    builtin_meta_rubric.cache_clear()
    domains = available_domains()
    assert REQUIRED_DOMAINS <= set(domains) and "general" in domains
    for name in domains:
        mr = builtin_meta_rubric(name)
        assert mr.name == name and len(mr.dimensions) >= 3
        assert all(d.type in DIMENSION_TYPES and d.items for d in mr.dimensions)
        # Critical only for factuality / harmfulness / alignment.
        assert all(
            d.critical_scope in ("factuality", "harmfulness", "alignment")
            for d in mr.dimensions
            if d.type == "critical"
        )
        # Round trip through the serialiser used by refinement.
        assert parse_meta_rubric(mr.to_toml(), expect_name=name).dimensions == mr.dimensions


def test_judgebench_query_types_route():
    with open(JUDGEBENCH) as f:
        types = {json.loads(line)["query_type"] for line in f}
    assert len(types) >= 10
    expected = {
        "livebench-math": "math",
        "livebench-reasoning": "reasoning",
        "livecodebench": "code",
        "mmlu-pro-math": "math",
        "mmlu-pro-law": "law",
        "mmlu-pro-computer science": "algorithms",
        "mmlu-pro-other": "factual_qa",
    }
    for qt in types:
        assert domain_for_query_type(qt) != "general", qt
    for qt, dom in expected.items():
        assert domain_for_query_type(qt) == dom
    for qt, dom in {
        "IFEval": "instruction_following",
        "wmt-translation": "translation",
        "cnn-summarization": "summarisation",
        "poetry": "poetry",
        "short-story": "creative_writing",
        "harmful-request": "safety",
        "multi-turn-chat": "dialogue",
    }.items():
        assert domain_for_query_type(qt) == dom


def test_fallback_is_logged(caplog):
    caplog.set_level(logging.WARNING)
    assert domain_for_query_type("some-new-benchmark-xyz") == "general"
    assert "some-new-benchmark-xyz" in caplog.text and "falling back" in caplog.text


GOOD = """name = "x"
title = "X"
description = "d"

[[dimension]]
id = "a"
title = "A"
type = "core"
items = ["one"]

[[dimension]]
id = "b"
title = "B"
type = "critical"
critical_scope = "factuality"
items = ["two"]
"""


def test_valid_file_and_errors_name_file_line_field(tmp_path):
    p = tmp_path / "x.toml"
    p.write_text(GOOD)
    assert [d.id for d in load_meta_rubric(p).dimensions] == ["a", "b"]
    cases = [
        (GOOD.replace('type = "core"', 'type = "major"'), 8, "dimension[0].type"),
        (GOOD.replace('critical_scope = "factuality"\n', ""), 11, "dimension[1].critical_scope"),
        (GOOD.replace('items = ["two"]', "items = []"), 16, "dimension[1].items"),
        (GOOD.replace('id = "b"', 'id = "a"'), 12, "dimension[1].id"),
        (GOOD.replace('name = "x"', 'name = "y"'), 1, "name"),
        (GOOD.replace('title = "X"\n', ""), 1, "title"),
        (GOOD.replace('type = "core"', 'type = "core"\nweight = 3'), 9, "dimension[0].weight"),
    ]
    for text, line, field in cases:
        p.write_text(text)
        with pytest.raises(MetaRubricError) as e:
            load_meta_rubric(p)
        msg = str(e.value)
        assert msg.startswith(f"{p}:{line}: field '{field}'"), msg
    p.write_text(GOOD.replace('title = "A"', 'title = "A'))
    with pytest.raises(MetaRubricError, match=r"x.toml: TOML syntax error.*line 7"):
        load_meta_rubric(p)
    with pytest.raises(MetaRubricError, match="cannot read"):
        load_meta_rubric(tmp_path / "missing.toml")


def test_routing_validation():
    with pytest.raises(MetaRubricError, match=r"<r>:3: field 'route\[0\].domain'"):
        parse_routing(
            'fallback = "general"\n[[route]]\ndomain = "nope"\npattern = "x"\n', "<r>", known_domains=["general"]
        )
    with pytest.raises(MetaRubricError, match="invalid regular expression"):
        parse_routing('[[route]]\npattern = "("\ndomain = "general"\n', "<r>", known_domains=["general"])
    assert builtin_router().fallback == "general"


# ---- prompts and parsing -----------------------------------------------------------------------


def test_prompt_contains_principles_and_both_responses():
    general, math = builtin_meta_rubric("general"), builtin_meta_rubric("math")
    msgs = build_pairwise_messages("What is 2+2?", "four", "five", general, math)
    user = msgs[-1]["content"]
    assert "final_answer" in user and "answers_the_question" in user
    assert user.index("<query>") < user.index("<response_a>\nfour") < user.index("<response_b>\nfive")
    intent_user = build_intent_messages("What is 2+2?")[-1]["content"]
    assert "four" not in intent_user and "What is 2+2?" in intent_user
    msgs = build_pairwise_messages("q", "a" * 100, "b", general, None, PromptConfig(max_response_chars=30))
    assert "characters omitted" in msgs[-1]["content"]


def test_truncate_keeps_head_and_tail():
    t = truncate_middle("H" * 50 + "T" * 50, 30)
    assert t.startswith("H" * 20) and t.endswith("T" * 10) and "70 characters omitted" in t


VALID = {
    "intent": {"task": "t", "explicit_requirements": [], "implicit_requirements": []},
    "differences": [],
    "criteria": [{"id": "c", "title": "t", "type": "core", "evidence": "e", "reason": "r", "label": "A", "score": 2}],
}


def test_parse_last_fenced_block_and_repair():
    text = 'draft:\n```json\n{"criteria": []}\n```\nfinal:\n```json\n' + json.dumps(VALID) + "\n```"
    assert parse_judgment(text)["criteria"][0]["label"] == "A"
    broken = json.dumps(VALID)[:-2]  # truncated: missing closing braces
    assert parse_judgment("```json\n" + broken)["criteria"][0]["score"] == 2
    trailing = json.dumps(VALID).replace('"score": 2}', '"score": 2,}')  # trailing comma
    assert parse_judgment(trailing)["criteria"][0]["score"] == 2
    lower = json.dumps(VALID).replace('"label": "A"', '"label": "a"').replace('"score": 2', '"score": "2"')
    assert parse_judgment(lower)["criteria"][0] == {**VALID["criteria"][0]}


def test_parse_failures_are_typed():
    for bad, match in [
        ("", "empty"),
        ("no json at all", "not a JSON object"),
        (json.dumps({**VALID, "criteria": [{**VALID["criteria"][0], "label": "X"}]}), "criteria/0/label"),
        (json.dumps({**VALID, "criteria": [{**VALID["criteria"][0], "score": 3}]}), "criteria/0/score"),
        (json.dumps({"differences": []}), "required"),
    ]:
        with pytest.raises(JudgeParseError, match=match):
            parse_judgment(bad)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300))
def test_parser_never_crashes_on_arbitrary_text(text):
    try:
        out = parse_judgment(text)
    except JudgeParseError:
        return
    assert isinstance(out, dict) and "criteria" in out


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=100), st.text(max_size=100))
def test_valid_json_survives_surrounding_prose(before, after):
    text = before.replace("`", "") + "\n```json\n" + json.dumps(VALID) + "\n```\n" + after.replace("`", "")
    assert parse_judgment(text) == VALID
    assert json.loads(extract_json_text(text)) == VALID


def _with(**changes):
    """VALID with its one criterion changed."""
    return {**VALID, "criteria": [{**VALID["criteria"][0], **changes}]}


def test_label_spellings_map_to_a_b_s_and_anything_else_fails():
    """'Both' (a tie) used to become 'B' (a win for B) and 'A/B' an 'A': only A / B / S and a
    short list of spellings are labels; anything else is a parse failure of the judgment."""
    from clipo_jax.rubrics.aggregation import score_comparison

    for given_label, label in [
        ("Both", "S"),
        ("tie", "S"),
        (" Same ", "S"),
        ("EQUAL", "S"),
        ("neither", "S"),
        ("Response A", "A"),
        ("response  b", "B"),
        ("b", "B"),
    ]:
        got = parse_judgment(json.dumps(_with(label=given_label)))["criteria"][0]["label"]
        assert got == label, given_label
    both = parse_judgment(json.dumps(_with(label="Both")))["criteria"]
    assert score_comparison(both) == 0.0  # a tie, not -2 (a clear win for B)
    for bad in ["Both equal", "A/B", "Better", "Bad", "AB", ""]:
        with pytest.raises(JudgeParseError, match="criteria/0/label"):
            parse_judgment(json.dumps(_with(label=bad)))


def test_fences_inside_json_strings_do_not_break_a_valid_judgment():
    """Evidence that quotes a fenced code block (or a lone ```) used to cut the JSON at the
    quoted fence: a valid judgment never parsed, and every temperature-0 retry failed alike."""
    for evidence in ["Response A gives ```python\nprint(1)\n``` which runs", "B opens a ``` fence and stops"]:
        obj = _with(evidence=evidence)
        for text in [
            json.dumps(obj),
            json.dumps(obj, indent=2),
            "Here it is:\n```json\n" + json.dumps(obj, indent=2) + "\n```\n",
            "Here it is: ```json\n" + json.dumps(obj) + "\n```",
        ]:
            assert parse_judgment(text) == obj, text


def test_valid_judgment_followed_by_prose_with_braces():
    """Trailing prose with braces after an unfenced judgment used to defeat the parser."""
    text = json.dumps(VALID) + "\nNote: the set {x} is used; see {y: 1}."
    assert parse_judgment(text) == VALID
    draft = _with(label="B")
    text = "Draft: " + json.dumps(draft) + "\nOn reflection, final:\n" + json.dumps(VALID) + "\nDone {.}"
    assert parse_judgment(text) == VALID  # the last valid object wins


def test_unknown_criterion_type_counts_as_important():
    """Spec section 3: an unknown type counts as important; it used to fail the whole judgment."""
    from clipo_jax.rubrics.aggregation import score_comparison

    obj = {
        **VALID,
        "criteria": [
            {**VALID["criteria"][0], "type": "Major"},
            {**_with(id="d", label="B", score=1)["criteria"][0], "type": "highlight"},
        ],
    }
    got = parse_judgment(json.dumps(obj))["criteria"]
    assert got[0]["type"] == "important" and got[0]["given_type"] == "Major"
    assert "given_type" not in got[1]
    assert score_comparison(got) == pytest.approx((2 * 2 - 1 * 1) / 3, abs=1e-5)
    assert parse_judgment(json.dumps(_with(type=" CORE ")))["criteria"][0]["type"] == "core"
