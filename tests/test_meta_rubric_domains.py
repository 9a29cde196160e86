"""The shipped meta-rubric set: every domain loads, routes and renders under the prompt budget.

Prompt budget.  The judge puts general + domain principles into every pairwise prompt
(``protocol.build_pairwise_messages``) and never truncates them, so the files themselves must
stay small enough for:
  * the tiny judge of the integration tests (SmolLM2, llama.cpp ``--n_ctx 4096``, ``--max_tokens=200``,
    ``--max_response_chars=400``, JudgeBench queries): ``TINY_CONTEXT`` tokens in all;
  * a production judge at the default ``PromptConfig`` (query and both responses at their
    6000-character caps) with an 8192-token judgment budget in a 32k context.
Token counts are estimated conservatively at ``CHARS_PER_TOKEN`` characters per token (the
SmolLM2 tokenizer gives about 4.6 on these prompts).
"""

import dataclasses
import json
import math

import pytest
from datadir import JUDGEBENCH

from clipo_jax.rubrics.meta_rubric import (
    CRITICAL_SCOPES,
    available_domains,
    builtin_meta_rubric,
    builtin_router,
    domain_for_query_type,
    parse_meta_rubric,
)
from clipo_jax.rubrics.protocol import PromptConfig, build_pairwise_messages

CHARS_PER_TOKEN = 3.5
PRINCIPLES_BUDGET_CHARS = 12_000  # general + one domain, rendered
TINY_CONTEXT, TINY_MAX_TOKENS, TINY_RESPONSE_CHARS = 4096, 200, 400
FULL_CONTEXT, FULL_JUDGMENT_TOKENS = 32_768, 8192

# One representative query type per domain (several for the named ones of the issue).
ROUTES = {
    "math": ["livebench-math", "mmlu-pro-math", "gsm8k", "Math"],
    "code": ["livecodebench", "mbpp_plus", "humaneval", "code"],
    "reasoning": ["livebench-reasoning", "logic-puzzle"],
    "factual_qa": ["mmlu-pro-other", "mmlu_pro", "gpqa", "Factuality", "open-qa"],
    "instruction_following": ["IFEval", "ifeval", "Precise IF", "ifbench"],
    "safety": ["Safety", "safety-refuse", "safety-response", "harmful-request", "jailbreak"],
    "general": ["Focus", "Ties", "human_preference_v1", "chatbot-arena"],
    "translation": ["wmt-translation", "translation"],
    "summarisation": ["cnn-summarization", "summary"],
    "creative_writing": ["creative-writing", "story", "fiction", "continuation"],
    "dialogue": ["chat", "multi-turn-chat", "chit-chat"],
    "law": ["law", "legal-advice", "mmlu-pro-law"],
    "medicine": ["medical", "health", "pharmacy", "mmlu-pro-health"],
    "finance": ["finance", "economics", "investing", "business"],
    "psychology": ["psychology", "mental-health", "emotional-support", "mmlu-pro-psychology"],
    "education": ["education", "homework-help", "parenting"],
    "history": ["history", "world-history"],
    "politics": ["politics", "social-issues", "election"],
    "role_play": ["roleplay", "role-play", "character-chat"],
    "poetry": ["poetry", "poem", "lyrics", "couplet"],
    "rewriting": ["rewriting", "paraphrase", "text-expansion", "polish"],
    "titles_outlines": ["title-generation", "headline", "outline"],
    "news": ["news", "journalism"],
    "travel": ["travel", "travel-planning", "itinerary"],
    "games": ["game", "video-games", "board-game"],
    "philosophy": ["philosophy", "ethics"],
    "science": ["physics", "chemistry", "biology", "science"],
    "engineering": ["engineering", "energy", "environment"],
    "algorithms": ["algorithm", "data-structures"],
    "academic_writing": ["academic-paper", "thesis", "literature-review"],
    "marketing_copy": ["marketing", "copywriting", "social-media-post"],
    "workplace": ["workplace", "career", "job-interview"],
    "home_life": ["home-life", "cooking", "gardening"],
    "entertainment": ["movies", "sports", "music"],
    "geography_culture": ["geography", "culture", "festivals"],
    "literature": ["literature", "literary-analysis"],
    "text_analysis": ["reading-comprehension", "sentiment-analysis", "information-extraction"],
    "language_usage": ["idioms", "vocabulary", "grammar"],
}
# Query types of the benchmarks the paper reports (JudgeBench's are read from the sample file).
BENCHMARK_TYPES = {
    "rewardbench_v2": ["Factuality", "Precise IF", "Math", "Safety", "Focus", "Ties"],
    "rm_bench": ["chat", "math", "code", "safety-refuse", "safety-response"],
    "ppe": ["mmlu_pro", "math", "gpqa", "mbpp_plus", "ifeval", "human_preference_v1"],
}


def domains():
    return [d for d in available_domains() if d != "general"]


def test_at_least_thirty_domains_and_every_one_named_by_the_issue():
    assert len(domains()) >= 30
    assert set(ROUTES) - {"general"} == set(domains())


@pytest.mark.parametrize("name", available_domains())
def test_domain_is_well_formed(name):
    mr = builtin_meta_rubric(name)
    types = [d.type for d in mr.dimensions]
    # Each domain brings its own critical flaws and the three graded kinds of criteria.
    assert "critical" in types and "core" in types and "important" in types and "highlight" in types
    assert all(d.critical_scope in CRITICAL_SCOPES for d in mr.dimensions if d.type == "critical")
    assert sum(len(d.items) for d in mr.dimensions) >= 5
    assert parse_meta_rubric(mr.to_toml(), expect_name=name) == dataclasses.replace(mr, source="<string>")


def test_every_domain_routes():
    targets = {domain for _, domain in builtin_router().rules}
    assert set(domains()) <= targets  # no file is unreachable from a query type
    for domain, query_types in ROUTES.items():
        for qt in query_types:
            assert domain_for_query_type(qt) == domain, qt


def test_benchmark_query_types_never_fall_back(caplog):
    with open(JUDGEBENCH) as f:
        judgebench = sorted({json.loads(line)["query_type"] for line in f})
    caplog.set_level("WARNING")
    for qt in judgebench + [t for ts in BENCHMARK_TYPES.values() for t in ts]:
        domain_for_query_type(qt)
    assert "falling back" not in caplog.text
    # Exam subjects go to their subject's domain (the ground truth is checked in every domain).
    subjects = {
        "law": "law",
        "health": "medicine",
        "psychology": "psychology",
        "history": "history",
        "philosophy": "philosophy",
        "economics": "finance",
        "business": "finance",
        "biology": "science",
        "chemistry": "science",
        "physics": "science",
        "engineering": "engineering",
        "computer science": "algorithms",
        "math": "math",
        "other": "factual_qa",
    }
    for qt in judgebench:
        if qt.startswith("mmlu-pro-"):
            assert domain_for_query_type(qt) == subjects[qt.removeprefix("mmlu-pro-")], qt


def test_exam_subject_rows_keep_the_ground_truth_path():
    """A choice-letter ground truth is checked programmatically in the subject domains too."""
    from clipo_jax.rubrics import pvr
    from clipo_jax.rubrics.judge import ground_truth_kind

    for qt in ("mmlu-pro-law", "mmlu-pro-health", "mmlu-pro-psychology", "mmlu-pro-computer science"):
        kind = ground_truth_kind(domain_for_query_type(qt))
        assert pvr.ground_truth_score("... so the answer is (C). CCCCC", "C", kind) == 1
        assert pvr.ground_truth_score("... so the answer is (D). DDDDD", "C", kind) == -1


def _tokens(messages) -> int:
    return math.ceil(sum(len(m["content"]) for m in messages) / CHARS_PER_TOKEN)


@pytest.mark.parametrize("name", domains())
def test_domain_renders_under_the_prompt_budget(name):
    general, domain = builtin_meta_rubric("general"), builtin_meta_rubric(name)
    principles = general.render() + "\n\n" + domain.render()
    assert len(principles) <= PRINCIPLES_BUDGET_CHARS, (name, len(principles))
    with open(JUDGEBENCH) as f:
        rows = [json.loads(line) for line in f]
    longest = max(rows, key=lambda r: len(r["prompt"]))
    msgs = build_pairwise_messages(
        longest["prompt"],
        longest["chosen"],
        longest["rejected"],
        general,
        domain,
        PromptConfig(max_response_chars=TINY_RESPONSE_CHARS),
    )
    assert domain.render() in msgs[-1]["content"] and general.render() in msgs[-1]["content"]
    assert _tokens(msgs) + TINY_MAX_TOKENS <= TINY_CONTEXT, name
    cfg = PromptConfig()
    full = build_pairwise_messages(
        "q" * cfg.max_query_chars, "a" * cfg.max_response_chars, "b" * cfg.max_response_chars, general, domain, cfg
    )
    assert _tokens(full) + FULL_JUDGMENT_TOKENS <= FULL_CONTEXT, name


def test_general_rubric_covers_the_judging_principles():
    general = builtin_meta_rubric("general")
    text = general.render().lower()
    dims = {d.id: d for d in general.dimensions}
    # Ideal answer, anti-bias rules and the three-step fact-checking protocol are standing orders.
    for phrase in ("an ideal answer", "order of the responses", "length", "fact checking", "(1) list", "(3) rule"):
        assert phrase in text, phrase
    # Worked sub-cases of the three hard flaws.
    alignment = " ".join(dims["answers_the_question"].items).lower()
    for case in ("topic drift", "missed instruction", "signal-to-noise", "over-inference"):
        assert case in alignment, case
    harm = " ".join(dims["harm_avoidance"].items).lower()
    assert "intent" in harm and "context" in harm and "refusing" in harm
    assert len(dims["factual_accuracy"].items) >= 4
    assert {d.critical_scope for d in general.dimensions if d.type == "critical"} == set(CRITICAL_SCOPES)
    assert "typo" in " ".join(dims["ambiguity_handling"].items).lower()
    dialogue = " ".join(dims["dialogue_quality"].items).lower()
    assert "emotion" in dialogue and "multi-turn" in dialogue and "rhythm" in dialogue
    assert "conclusion first" in dims["clarity"].title.lower()
