"""Pointwise verifiable rubrics and the checker sandbox."""

import pytest

from clipo_jax.rubrics import pvr


def test_ground_truth_choice_bold_math():
    assert pvr.ground_truth_score("so the answer is HHHHH", "H") == 1
    assert pvr.ground_truth_score("my guess: CCCCC", "H") == -1
    assert pvr.ground_truth_score("no idea", "H") is None  # -> LLM check fallback
    assert pvr.ground_truth_score("... so there are **4** pieces", "4", "bold") == 1
    assert pvr.ground_truth_score("**5**", "4", "bold") == -1
    assert pvr.ground_truth_score("thus $\\boxed{\\dfrac{2}{2x+1}}$.", "\\frac{2}{2x+1}", "math") == 1
    assert pvr.ground_truth_score("thus \\boxed{3}", "4", "math") == -1
    with pytest.raises(ValueError, match="unknown ground-truth kind"):
        pvr.ground_truth_score("x", "y", "nope")


def test_boxed_extraction_nested():
    assert pvr._last_boxed("a \\boxed{1} then \\boxed{\\frac{a}{b}} end") == "\\frac{a}{b}"


def test_no_extractable_answer_is_none_so_the_llm_check_runs():
    """The math verifier scores a response without a final answer 0.0, which used to become -1
    (wrong), so the judge's LLM answer check never ran; and factual-QA text answers went to
    the math verifier ("auto")."""
    from clipo_jax.rubrics.judge import ground_truth_kind

    assert pvr.ground_truth_score("So x = 7.", "7", "math") is None
    assert pvr.ground_truth_score("Adding them gives 42.", "42", "auto") is None
    assert pvr.ground_truth_score("<think>unfinished \\boxed{42}", "42", "math") is None
    assert pvr.ground_truth_score("so x = \\boxed{7}", "7", "math") == 1
    assert pvr.ground_truth_score("so x = \\boxed{8}", "7", "math") == -1
    kind = ground_truth_kind("factual_qa")
    assert pvr.ground_truth_score("The capital of Australia is Canberra.", "Canberra", kind) is None
    assert pvr.ground_truth_score("Sydney.", "Canberra", kind) is None
    assert pvr.ground_truth_score("Canberra", "Canberra", kind) == 1
    assert pvr.ground_truth_score("... so the answer is (C). CCCCC", "C", kind) == 1
    assert pvr.ground_truth_score("... so the answer is (D). DDDDD", "C", kind) == -1


def test_choice_letter_boxed_first_and_upper_case_only():
    """ "answer is a bit" used to read as choice A, and beat a later boxed C."""
    assert pvr.extract_choice("The answer is a bit subtle... I pick \\boxed{C}.") == "C"
    assert pvr.extract_choice("The answer is a bit subtle.") is None
    assert pvr.extract_choice("I think AAAAA. Final: \\boxed{(D)}") == "D"
    assert pvr.extract_choice("The answer is (B).") == "B"
    assert pvr.extract_choice("the answer is: **E**") == "E"
    assert pvr.extract_choice("so GGGGG") == "G"
    assert pvr.ground_truth_score("The answer is a bit subtle... I pick \\boxed{C}.", "C") == 1


# Hand-written cases: (response, constraint, expected).
CASES = [
    ("one two three", {"type": "word_count", "max": 3}, True),
    ("one two three four", {"type": "word_count", "max": 3}, False),
    ("It rains. It pours! Why?", {"type": "sentence_count", "equals": 3}, True),
    ("p1\n\np2\n\n\np3", {"type": "paragraph_count", "min": 3}, True),
    ("- a\n- b\n* c\n1. d", {"type": "bullet_count", "equals": 4}, True),
    ("- a\n- b", {"type": "bullet_count", "min": 3}, False),
    ("Paris is in France", {"type": "keywords_include", "keywords": ["paris", "France"]}, True),
    ("Paris is in France", {"type": "keywords_exclude", "keywords": ["london"]}, True),
    ("cat, cat and CAT; category", {"type": "keyword_count", "keyword": "cat", "equals": 3}, True),
    ('```json\n{"a": 1}\n```', {"type": "json_format"}, True),
    ("{a: 1}", {"type": "json_format"}, False),
    ("all lower here", {"type": "all_lowercase"}, True),
    ("Not lower", {"type": "all_lowercase"}, False),
    ("LOUD", {"type": "all_uppercase"}, True),
    ("Dear Sir, hello", {"type": "starts_with", "phrase": "dear sir"}, True),
    ("hello. Any questions?", {"type": "ends_with", "phrase": "Any questions?"}, True),
    ("no commas here", {"type": "no_commas"}, True),
    ("The cat is on the mat and it is happy with the sun.", {"type": "language", "language": "en"}, True),
    ("Le chat est sur le tapis avec une souris grise aujourd'hui.", {"type": "language", "language": "en"}, False),
    ("Кошка сидит на ковре.", {"type": "language", "language": "ru"}, True),
    ("这是一个测试句子。", {"type": "language", "language": "zh"}, True),
    ("这是一个测试句子。", {"type": "language", "language": "en"}, False),
]


@pytest.mark.parametrize("response,constraint,expected", CASES)
def test_constraints(response, constraint, expected):
    assert pvr.check_constraint(response, constraint) is expected


def test_constraint_errors():
    with pytest.raises(pvr.ConstraintError, match="unknown constraint type 'nope'"):
        pvr.check_constraint("x", {"type": "nope"})
    with pytest.raises(pvr.ConstraintError, match="missing the parameter 'keywords'"):
        pvr.check_constraint("x", {"type": "keywords_include"})
    with pytest.raises(pvr.ConstraintError, match="needs 'min', 'max' or 'equals'"):
        pvr.check_constraint("x", {"type": "word_count"})


def test_guardrails():
    loop = "I am not sure what to say here. " * 30
    assert pvr.guardrail_flags(loop)["repetition_loop"]
    normal = " ".join(f"word{i}" for i in range(200))
    assert not pvr.guardrail_flags(normal)["repetition_loop"]
    assert pvr.guardrail_flags("  \n")["empty"]
    assert pvr.guardrail_flags(
        "Bonjour tout le monde, comment allez-vous aujourd'hui mes amis?", expected_language="zh"
    )["wrong_language"]
    assert not pvr.guardrail_flags("Hello there, this is a reply in English.", expected_language="en")["wrong_language"]


# The checker sandbox is tested, attacked, in tests/test_sandbox.py.
