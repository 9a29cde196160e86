"""Multiple-choice reward: hedged answers name no letter; a lower-case letter counts where it can
only be an option (alone in a box, alone after an "Answer:" label), never in free prose."""

import time

import pytest

from clipo_jax.rewards import choice_reward, extract_choice


@pytest.mark.parametrize(
    "response",
    [
        "\\boxed{A or B}",
        "\\boxed{A and C}",
        "\\boxed{A/B}",
        "\\boxed{(A) or (B)}",
        "\\boxed{\\text{A or B}}",
        "\\boxed{A \\text{ or } B}",
        "\\boxed{a or b}",
        "Answer: A or B",
        "The answer is A or B.",
        "The answer is (A) or (C), depending on the reading.",
        "the answer is A/B",
        "So the answer is $\\boxed{A}$ or $\\boxed{B}$.",
    ],
)
def test_a_hedge_between_two_letters_scores_for_neither(response):
    """Naming two different letters as the final answer is no answer: neither letter is credited."""
    assert extract_choice(response) is None
    for gold in "ABC":
        assert choice_reward(response, gold) == 0.0, (response, gold)


@pytest.mark.parametrize(
    "response, letter",
    [
        ("\\boxed{b}", "B"),
        ("\\boxed{(c)}", "C"),
        ("\\boxed{d.}", "D"),
        ("\\boxed{b) bank}", "B"),
        ("Answer: (c)", "C"),
        ("answer: d", "D"),
        ("**Answer:** (b)", "B"),
        ("Reasoning first.\nFinal answer: a.", "A"),
    ],
)
def test_a_lower_case_letter_alone_in_a_box_or_after_an_answer_label_counts(response, letter):
    assert extract_choice(response) == letter
    assert choice_reward(response, letter) == 1.0
    other = "A" if letter != "A" else "B"
    assert choice_reward(response, other) == 0.0


@pytest.mark.parametrize(
    "response",
    [
        "the answer is a bit unclear",
        "Answer: a bit unclear",
        "The answer is a bit unclear.\na",
        "\\boxed{a bank}",
        "\\boxed{i.e. the first one}",
    ],
)
def test_lower_case_prose_is_not_a_letter(response):
    assert extract_choice(response) is None
    assert choice_reward(response, "A") == 0.0


@pytest.mark.parametrize(
    "response, letter",
    [
        ("The answer is B and C is wrong.", "B"),  # "and C is ..." continues the sentence: no hedge
        ("\\boxed{B. bank or river}", "B"),  # "or" inside the option's text
        ("\\boxed{A}, but on reflection \\boxed{B}", "B"),  # a correction, the last box counts
        ("\\boxed{A} or \\boxed{A}", "A"),  # the same letter twice
        ("The answer is A or B. No: the answer is (C).", "C"),  # a later, single answer
    ],
)
def test_not_a_hedge(response, letter):
    assert extract_choice(response) == letter


def test_choice_extraction_stays_linear_on_long_inputs():
    """Runs of spaces cost linear time (before, 60 spaces after "answer is" took ~1 s and 100
    took 25 s: optional spaces between optional marks backtracked polynomially)."""
    long_inputs = [
        "answer is" + " " * 60 + "$ 1",
        "Answer:" + " " * 120 + "1",
        "\\boxed{A" + " or   B  " * 1000 + "q}",
        "The answer is A" + " or      B       " * 1000 + "xyz",
        "Answer: a" + " " * 9000 + "x",
        "\\boxed{" + " " * 9000 + "x",
        "\\boxed{A}" + " " * 9000 + " or " + " " * 9000,
    ]
    start = time.perf_counter()
    for s in long_inputs:
        extract_choice(s)
    assert time.perf_counter() - start < 2.0


@pytest.mark.parametrize(
    "response, letter",
    [
        ("The answer is B and/or C.", None),  # "and/or" joins two letters: a hedge
        ("\\boxed{B and/or C}", None),
        ("The answer is A, B or C.", None),  # three letters are a hedge too
        ("The answer is (**B**) or (**C**).", None),
        ("**Answer**: B", "B"),  # a bold label before its colon
        ("**Answer**: (c)", "C"),
        ("Thinking it over... BBBBB", "B"),  # JudgeBench / MMLU-Pro: the letter five times
        ("I first thought AAAAA, but the answer is \\boxed{D}", "D"),  # a box still comes first
        ("AAAAA or BBBBB", None),  # a hedge of five-fold letters
        ("AAAAA or B.", None),
        ("AAAAA\nAnswer: B", "B"),  # the later of a five-fold letter and an answer label counts
        ("Answer: B\nAAAAA", "A"),
        ("ZZZZZ", None),  # five-fold letters name options A-J
    ],
)
def test_hedges_bold_labels_and_fivefold_letters(response, letter):
    assert extract_choice(response) == letter


def test_openrs_reads_a_letter_exactly_as_the_choice_reward():
    """One letter reader: OpenRS's pointwise ground-truth check and the choice reward agree on
    every form either file tests (they were two readers that disagreed on hedges and labels)."""
    from clipo_jax.rubrics import pvr

    forms = [
        "\\boxed{B. bank}",
        "\\boxed{b}",
        "Answer: (c)",
        "**Answer**: B",
        "The answer is A, B or C.",
        "The answer is B and/or C.",
        "The answer is (B).",
        "the answer is: **E**",
        "so GGGGG",
        "The answer is a bit subtle.",
        "<think>the answer is A</think>The answer is C",
        "Final line:\n(D)",
    ]
    for text in forms:
        assert pvr.extract_choice(text) == extract_choice(text), text
    assert pvr.ground_truth_score("**Answer**: B", "B", kind="choice") == 1
    assert pvr.ground_truth_score("The answer is B and/or C.", "B", kind="choice") is None
