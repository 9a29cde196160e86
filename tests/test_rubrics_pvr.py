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


# ----------------------------------------------------------------------------------------------
# Regressions against the IFEval reference checkers.
# ----------------------------------------------------------------------------------------------
EN = "The weather today is sunny and warm, and I plan to walk to the park with my dog after lunch."
EN_LIST = "Shopping list: apples, bananas, cherries, grapes, lemons, oranges, peaches, plums."
EN_HEADLINE = "Quarterly Revenue Grows Twelve Percent Despite Supply Chain Disruptions Worldwide"
DE = "Ich weiß nicht, was du an dem Tag in der Stadt gemacht hast, aber es war sicher schön."
RU = "Привет, как у тебя дела? Сегодня хорошая погода, и мы пойдём гулять в парк."
ZH = "今天天气很好，我们去公园散步吧。"


def _ifeval_language(text: str, lang: str) -> bool:
    """IFEval's ``language:response_language``: langdetect (seed 0) names the language."""
    langdetect = pytest.importorskip("langdetect")
    langdetect.DetectorFactory.seed = 0
    return langdetect.detect(text).split("-")[0] == lang


@pytest.mark.parametrize("text", [EN, EN_LIST, EN_HEADLINE, DE, RU])
@pytest.mark.parametrize("lang", ["en", "fr", "de", "es", "it", "pt", "ru", "uk"])
def test_language_tells_same_script_languages_apart(text, lang):
    assert pvr.detect_language_ok(text, lang) is _ifeval_language(text, lang)
    assert pvr.guardrail_flags(text, lang)["wrong_language"] is not _ifeval_language(text, lang)


def test_language_cjk_and_short_texts():
    pytest.importorskip("langdetect")
    assert pvr.detect_language_ok(ZH, "zh") and not pvr.detect_language_ok(ZH, "ja")  # kanji only: not Japanese
    assert pvr.detect_language_ok("今日は天気がいいですね。公園に行きましょう。", "ja")
    # Under MIN_DETECT_LETTERS letters language ID guesses ("Call me later" -> it): the script decides.
    assert pvr.detect_language_ok("Call me later", "en") and pvr.detect_language_ok("Call me later", "it")
    assert not pvr.detect_language_ok("Call me later", "ru")


@pytest.mark.parametrize("blank", ["", "   ", "\n\t "])
def test_a_blank_response_follows_no_constraint(blank):
    for c in (
        {"type": "no_commas"},
        {"type": "keywords_exclude", "keywords": ["however"]},
        {"type": "word_count", "max": 5},
        {"type": "all_lowercase"},
        {"type": "code", "code": "def check(response):\n    return True\n"},
    ):
        assert pvr.check_constraint(blank, c) is False, c
    assert not pvr.constraints_pass(blank, [{"type": "no_commas"}])
    with pytest.raises(pvr.ConstraintError, match="missing the parameter 'keywords'"):  # the dry run still validates
        pvr.check_constraint(blank, {"type": "keywords_exclude"})


def _ifeval_end_checker(response: str, phrase: str) -> bool:
    """IFEval's ``startend:end_checker``."""
    return response.strip().strip('"').lower().endswith(phrase.strip().lower())


@pytest.mark.parametrize(
    "response,phrase",
    [
        ("Sure, here it is. Any other questions?", "Any other questions? "),
        ('"Here it is. Any other questions?"', "Any other questions?"),
        ("Here it is. Any other questions?  \n", "any other questions?"),
        ("Here it is.", "Any other questions?"),
    ],
)
def test_ends_with_strips_like_ifeval(response, phrase):
    assert pvr.check_constraint(response, {"type": "ends_with", "phrase": phrase}) is _ifeval_end_checker(
        response, phrase
    )


@pytest.mark.parametrize("tag", ["json", "JSON", "Json", ""])
def test_json_fence_tag_is_case_insensitive(tag):
    assert pvr.check_constraint(f'```{tag}\n{{"a": 1}}\n```', {"type": "json_format"})
    assert not pvr.check_constraint(f"```{tag}\n{{a: 1}}\n```", {"type": "json_format"})


def test_keywords_exclude_and_count_match_whole_words():
    assert pvr.check_constraint("Let's start the party early.", {"type": "keywords_exclude", "keywords": ["art"]})
    assert not pvr.check_constraint("Modern ART is here.", {"type": "keywords_exclude", "keywords": ["art"]})
    assert not pvr.check_constraint("I code in C++ daily.", {"type": "keywords_exclude", "keywords": ["C++"]})
    assert pvr.check_constraint("I code in C daily.", {"type": "keywords_exclude", "keywords": ["C++"]})
    assert pvr.check_constraint("I like C++ and C++ likes me.", {"type": "keyword_count", "keyword": "C++", "min": 2})


SENTENCE_CASES = [
    ('He said "I am done." Then he left the room.', 2),
    ("Dr. Smith met Mr. Jones at 5 p.m. on Friday. They talked.", 2),
    ("It rains. It pours! Why?", 3),
    ("Mrs. Lee and Ms. Park came at 9 a.m. today. We use fruit, e.g. apples, i.e. food. Done.", 3),
]


@pytest.mark.parametrize("text,n", SENTENCE_CASES)
def test_regex_sentence_fallback(text, n):
    assert len(pvr.regex_sentences(text)) == n


@pytest.mark.parametrize("text,n", SENTENCE_CASES[:3])
def test_sentence_count(text, n):
    assert pvr.check_constraint(text, {"type": "sentence_count", "equals": n})
    if pvr._punkt() is not None:  # IFEval counts sentences with punkt: the same count
        assert len(pvr.sentences(text)) == len(pvr._punkt().tokenize(text))


@pytest.mark.parametrize("ctype", ["keywords_include", "keywords_exclude"])
@pytest.mark.parametrize("bad", ["apple", [], ["apple", ""], ["apple", 3]])
def test_keywords_must_be_a_list_of_words_not_a_string(ctype, bad):
    """A single string is not iterated as characters ('I like pears' holds every letter of
    'apple'; 'I like a pie' holds the word 'a'): it is rejected with one line, the same rule
    check_row applies (pairs.validate_constraint), on any response."""
    from clipo_jax.rubrics.pairs import validate_constraint

    c = {"type": ctype, "keywords": bad}
    assert "'keywords' must be a non-empty list of non-empty strings" in validate_constraint(c)
    for response in ("I like pears", "I like a pie", "I like apple pie", ""):
        with pytest.raises(
            pvr.ConstraintError, match=r"^constraint '%s': 'keywords' must be a non-empty list" % ctype
        ) as e:
            pvr.check_constraint(response, c)
        assert "\n" not in str(e.value)
    # the one-element list is what a single keyword means
    assert pvr.check_constraint("I like apple pie", {"type": ctype, "keywords": ["apple"]}) == (
        ctype == "keywords_include"
    )
    assert pvr.check_constraint("I like pears", {"type": ctype, "keywords": ["apple"]}) == (ctype == "keywords_exclude")


def test_pvr_term_check_row_names_a_mistyped_constraint():
    from clipo_jax.rewards.terms import PVRTerm, RewardError

    term = PVRTerm({"ground_truth_weight": 0.0})
    with pytest.raises(RewardError, match=r"^row 3: constraint 0 .*'keywords' must be a non-empty list"):
        term.check_row({"prompt": "p", "constraints": [{"type": "keywords_include", "keywords": "Paris"}]}, "row 3")
    with pytest.raises(RewardError, match=r"^row 3: constraint 1 .*unknown constraint type 'nope'"):
        term.check_row({"prompt": "p", "constraints": [{"type": "no_commas"}, {"type": "nope"}]}, "row 3")
    term.check_row({"prompt": "p", "constraints": [{"type": "keywords_include", "keywords": ["Paris"]}]}, "row 3")


@pytest.mark.parametrize(
    "text,letter",
    [
        ("The answer is A or B.", None),  # a hedge names no answer
        ("The answer is (A) or (B)", None),
        ("So the answer is A/B", None),
        ("The answer is A, B", None),
        ("The answer is A or A.", "A"),
        ("The answer is B and C is wrong.", "B"),  # the second letter does not end the clause
        ("The answer is **C**", "C"),
        ("The answer is **B** or **C**.", None),
        ("The answer is (**B**) or (**C**).", None),
        ("answer is: (D)", "D"),
        ("The answer is a bit subtle", None),
    ],
)
def test_extract_choice_hedges_and_plain_answers(text, letter):
    assert pvr.extract_choice(text) == letter


def test_extract_choice_is_linear_on_a_long_whitespace_run():
    import time

    text = "answer is" + " " * 50_000 + "x"
    t = time.perf_counter()
    assert pvr.extract_choice(text) is None
    assert time.perf_counter() - t < 1.0  # quadratic backtracking took minutes at this length


def test_words_treat_curly_and_straight_apostrophes_alike():
    straight, curly = "I don't think it's well-known", "I don\u2019t think it\u2019s well-known"
    assert pvr.words(straight) == ["I", "don't", "think", "it's", "well-known"]
    assert len(pvr.words(curly)) == len(pvr.words(straight)) == 5
    c = {"type": "word_count", "max": 5}
    assert pvr.check_constraint(curly, c) is True and pvr.check_constraint(straight, c) is True
