"""Tests for clipo_jax.rewards: extraction, equivalence, choice letters, time limits, registry."""

from __future__ import annotations

import glob
import os
import random
import re
import signal
import threading
import time
from fractions import Fraction

import pytest
from datadir import CLIPO_DIR
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clipo_jax.rewards import (
    UnknownRewardError,
    VerifierPool,
    batch_math_reward,
    choice_reward,
    extract_answer,
    get_reward,
    gsm8k_reward,
    last_boxed,
    list_rewards,
    math_reward,
    register_reward,
    reset_reward_stats,
    reward_stats,
)
from clipo_jax.rewards import math as rmath
from clipo_jax.rewards.math import (
    fast_decision,
    hostile_reason,
    numbers_equal,
    reduce_ground_truth,
    strip_thinking,
    to_number,
)


def box(s: str) -> str:
    return "Some reasoning.\nSo the answer is $\\boxed{" + s + "}$."


# ---------------------------------------------------------------------------------------------
# Extraction
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, expected",
    [
        ("\\boxed{5}", "5"),
        ("a \\boxed{1} b \\boxed{2}", "2"),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("\\fbox{7}", "7"),
        ("\\boxed 5$ done", "5"),
        ("\\boxed{\\{1,2\\}}", "\\{1,2\\}"),  # escaped braces do not count
        ("\\boxed{3} then truncated \\boxed{4", "3"),  # unbalanced last box is skipped
        ("\\boxed{\\boxed{9}}", "9"),  # nested: innermost (the box that starts last)
        ("\\boxed{}", ""),
        ("no box here", None),
        ("\\boxedfoo{1}", None),  # another command
        ("\\boxed{a}\\fboxsep{2}", "a"),
    ],
)
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


def test_think_handling():
    assert extract_answer("<think>maybe \\boxed{1}</think> so \\boxed{2}") == "2"
    assert extract_answer("<think>maybe \\boxed{1}</think> no final box") is None
    assert extract_answer("<think>never closed \\boxed{1}") is None
    assert strip_thinking("plain \\boxed{3}") == "plain \\boxed{3}"
    assert math_reward("<think>\\boxed{7}</think>The answer is \\boxed{8}", "8") == 1.0
    assert math_reward("<think>\\boxed{8}</think>The answer is \\boxed{7}", "8") == 0.0


def test_gsm8k_hash_answers():
    # ground truth in GSM8K "#### N" form, response either boxed or "#### N"
    gt = "She makes 9 * 2 = $<<9*2=18>>18 every day.\n#### 18"
    assert reduce_ground_truth(gt) == "18"
    assert math_reward(box("18"), gt) == 1.0
    assert math_reward("so\n#### 18", gt) == 1.0
    assert math_reward("so\n#### 1,800", "1800") == 1.0
    assert math_reward("so\n#### 17", gt) == 0.0
    assert gsm8k_reward("The answer is 18.", gt) == 1.0
    assert gsm8k_reward("The answer is 19.", gt) == 0.0
    assert gsm8k_reward("\\boxed{\\$18.00}", "18") == 1.0
    assert gsm8k_reward("no number", "18") == 0.0


def test_full_solution_ground_truth_reduced():
    sol = "We get $a=-3$ and $b=3$. So $a+b=-3+3=\\boxed{0}$."
    assert reduce_ground_truth(sol) == "0"
    assert math_reward(box("0"), sol) == 1.0
    assert math_reward(box("6"), sol) == 0.0


# ---------------------------------------------------------------------------------------------
# Equivalence table: (gold, prediction) both directions
# ---------------------------------------------------------------------------------------------
EQUAL = [
    ("025", "25"),
    ("142.0", "142"),
    ("\\frac{1}{2}", "\\dfrac{1}{2}"),
    ("\\frac12", "\\frac{1}{2}"),
    ("\\frac{1}{2}", "0.5"),
    ("50\\%", "50"),
    ("90^\\circ", "90"),
    ("90", "90^{\\circ}"),
    ("1,000", "1000"),
    ("10", "10 \\text{ cm}"),
    ("18", "\\$18"),
    ("18", "18 dollars"),
    ("(1,2)", "(1, 2)"),
    ("[0,5]", "[0, 5]"),
    ("(-\\infty, 3)", "(-\\infty,3)"),
    ("\\text{Evelyn}", "Evelyn"),
    ("\\text{(C)}", "C"),
    ("x=3", "3"),
    ("\\sqrt{3}/2", "\\frac{\\sqrt{3}}{2}"),
    ("2\\sqrt{39}-2", "-2+2\\sqrt{39}"),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})"),
    ("p - q", "p-q"),
    ("3\\pi", "3 \\pi"),
    ("-\\frac{1}{3}", "\\frac{-1}{3}"),
    ("0.25", "\\frac{1}{4}"),
    ("1/4", "\\frac14"),
    ("5", "5.000"),
    ("x^2+2x+1", "(x+1)^2"),
    ("\\{1,2\\}", "\\{2,1\\}"),
    ("0 or 4", "0, 4"),
    ("6-\\sqrt{5}", "-\\sqrt{5}+6"),
    ("1.5", "\\frac{3}{2}"),
    ("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "\\begin{pmatrix}1\\\\2\\end{pmatrix}"),
    ("\\tfrac{3}{4}", "0.75"),
    ("-7", "- 7"),
    ("10\\%", "10 \\%"),
    ("11\\sqrt{3}/2", "\\frac{11\\sqrt3}{2}"),
    ("\\frac{\\pi}{4}", "\\pi/4"),
    ("3.50", "3.5"),
    ("1,234,567", "1234567"),
    ("\\$1,000", "1000"),
    ("45^{\\circ}", "45^\\circ"),
    ("y = 2x + 3", "2x+3"),
    ("\\infty", "\\infty"),
    ("e^{2}", "e^2"),
    # Unit words after a number are dropped ...
    ("5", "5 dollars"),
    ("3", "3 meters"),
    ("3", "3 times"),  # a count ("how many times")
    ("60", "60 km/h"),
    ("12", "12 square feet"),
    ("5", "5 \\text{ m}^{2}"),
    ("7", "7 sq. ft"),
    # ... but operator words between two operands are operators: "2 times 3" denotes 6, as
    # 2 \times 3 does (decided: equal to 6, never to 2).
    ("6", "2 times 3"),
    ("6", "2 \\text{ times } 3"),
    ("8", "2 multiplied by 4"),
    ("5", "2 plus 3"),
    ("6", "10 minus 4"),
    ("3", "6 divided by 2"),
    ("3", "6 over 2"),
    ("2", "\\frac{1}{2} times 4"),
]
UNEQUAL = [
    ("25", "26"),
    ("025", "250"),
    ("142", "142.5"),
    ("1,000", "1"),
    ("(1,2)", "(2,1)"),
    ("[0,5]", "(0,5]"),
    ("\\frac{1}{2}", "\\frac{2}{1}"),
    ("\\text{Evelyn}", "Nevely"),
    ("C", "D"),
    ("x^2", "x^3"),
    ("\\sqrt{2}", "1.414"),
    ("50", "5"),
    ("90^\\circ", "9"),
    ("\\pi", "3.14"),
    ("1/3", "0.33"),
    ("-5", "5"),
    ("12", "1,2"),
    ("3", "3x"),
    ("4", "x=5"),
    ("10^{5}", "10^{6}"),
    ("\\{1,2\\}", "\\{1,3\\}"),
    ("2\\sqrt{2}", "\\sqrt{2}"),
    ("\\frac{1}{3}", "\\frac{1}{4}"),
    ("x+1", "x-1"),
    ("1000", "100"),
    ("\\text{odd}", "even"),
    ("(3,4)", "(3,5)"),
    ("5", ""),
    # Unit stripping must not eat operators, a second quantity or anything else that changes the value.
    ("2", "2 times 3"),
    ("3", "2 times 3"),
    ("2", "2 Times 3"),
    ("2", "2 plus 3"),
    ("6", "6 divided by 2"),
    ("6", "6 over 2"),
    ("10", "10 minus 4"),
    ("2", "2 m times 3"),
    ("2", "2 dollars minus 1"),
    ("2", "2 hours 30 minutes"),
    ("5", "5 dollars 50 cents"),
    ("5", "5 dollars fifty"),
    ("3", "3 feet 6 inches"),
    ("2", "2 hours and a half"),
    ("2", "2 percent of 50"),
    ("4", "4 point 5"),
    ("2", "2 in 3"),
    ("3", "3 squared"),
    ("5", "5 million dollars"),
]


# the sympy step's soft deadline (1 s by default) returns 0.0 when it fires: the first symbolic
# comparison of a process takes 0.3 s on a loaded 2-core host, so the tests that expect 1.0 give
# it room; the default stays in the tests of hostile input
ROOMY = 5.0


@pytest.mark.parametrize("gold, pred", EQUAL)
def test_equal_pairs_both_directions(gold, pred):
    assert math_reward(box(pred), gold, timeout=ROOMY) == 1.0
    assert math_reward(box(gold), pred, timeout=ROOMY) == 1.0


@pytest.mark.parametrize("gold, pred", UNEQUAL)
def test_unequal_pairs_both_directions(gold, pred):
    assert math_reward(box(pred), gold) == 0.0
    if gold and pred:
        assert math_reward(box(gold), pred) == 0.0


def test_table_size():
    assert len(EQUAL) + len(UNEQUAL) >= 40


def _reference_number(s: str):
    """Independent plain-Python reading of simple numerals: '025', '1,000', '142.0', '-3/4'."""
    s = s.replace(",", "").strip()
    if re.fullmatch(r"-?\d+/\d+", s):
        a, b = s.split("/")
        return Fraction(int(a), int(b))
    return Fraction(s)


@settings(max_examples=150, deadline=None)
@given(st.integers(-(10**6), 10**6), st.integers(0, 3), st.integers(0, 2))
def test_numeric_renderings_match_reference(n, zeros, style):
    """Random integers rendered with leading zeros / '.0' / thousands separators: reward matches
    an independent Fraction comparison."""
    forms = [("0" * zeros + str(abs(n))) if n >= 0 else str(n), f"{n}.0", f"{n:,}"]
    pred = forms[style]
    for gold in (str(n), str(n + 1)):
        want = float(_reference_number(pred) == _reference_number(gold))
        assert math_reward(box(pred), gold) == want


def test_to_number_reference():
    for s, ref in [
        ("025", 25),
        ("142.0", 142),
        ("-\\frac{3}{4}", Fraction(-3, 4)),
        ("1/8", Fraction(1, 8)),
        ("1.5e2", 150),
        ("\\$1,000", 1000),
    ]:
        assert to_number(s) == Fraction(ref)
    assert to_number("x+1") is None and to_number("1" * 200) is None


# ---------------------------------------------------------------------------------------------
# Multiple choice
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "response, gold, want",
    [
        ("... \\boxed{B}", "B", 1.0),
        ("\\boxed{(B)}", "B", 1.0),
        ("\\boxed{B. bank}", "B", 1.0),
        ("\\boxed{\\text{B}}", "B", 1.0),
        ("The answer is (B).", "B", 1.0),
        ("Answer: B", "(B)", 1.0),
        ("so the answer is B", "B", 1.0),
        ("Reasoning...\n(B)", "B", 1.0),
        ("Reasoning...\nB.", "B", 1.0),
        ("\\boxed{C}", "B", 0.0),
        ("the answer is a bank", "A", 0.0),
        ("no letter at all", "A", 0.0),
        ("<think>\\boxed{A}</think>\\boxed{D}", "D", 1.0),
        ("<think>\\boxed{A}", "A", 0.0),
        ("I think the answer is B, no wait, the answer is C", "C", 1.0),
        ("\\boxed{bank}", "A", 0.0),
    ],
)
def test_choice_reward(response, gold, want):
    assert choice_reward(response, gold) == want


# ---------------------------------------------------------------------------------------------
# CLIPO test sets: every ground truth verifies against itself and against re-formattings
# ---------------------------------------------------------------------------------------------
def _clipo_rows(path):
    import pyarrow.parquet as pq

    return [r["ground_truth"] for r in pq.read_table(path, columns=["reward_model"]).column("reward_model").to_pylist()]


def _reformat(gt: str) -> list[str]:
    """Equivalent renderings of a ground truth (what a model might write)."""
    out = [" " + gt + " ", "$" + gt + "$"]
    if re.fullmatch(r"\d+", gt):
        out += [gt.lstrip("0") or "0", gt + ".0", "0" + gt]
        if len(gt.lstrip("0")) > 3:
            out.append(f"{int(gt):,}")
    if re.fullmatch(r"-?\d+\.0+", gt):
        out.append(gt.split(".")[0])
    if "\\frac" in gt:
        out.append(gt.replace("\\frac", "\\dfrac"))
    if re.fullmatch(r"[A-J]", gt):
        out += [f"({gt})", f"{gt}.", f"\\text{{{gt}}}"]
    return out


TEST_FILES = sorted(glob.glob(os.path.join(CLIPO_DIR, "test", "*.parquet")))


@pytest.mark.parametrize("path", TEST_FILES, ids=os.path.basename)
def test_clipo_ground_truths_self_verify_full(path):
    """Every row of every test file (about 21k; ~5 s: nearly all take the fast path)."""
    rows = _clipo_rows(path)
    bad = [gt for gt in rows if math_reward(box(reduce_ground_truth(gt)), gt) != 1.0]
    bad += [
        (gt, alt) for gt in set(rows) for alt in _reformat(reduce_ground_truth(gt)) if math_reward(box(alt), gt) != 1.0
    ]
    assert not bad, bad[:10]


@pytest.mark.slow
@pytest.mark.parametrize("path", TEST_FILES, ids=os.path.basename)
def test_sympy_path_self_verifies_full(path):
    """Every distinct ground truth through math-verify itself (~15 s for all files)."""
    from clipo_jax.rewards.math import _decide_in_process

    gts = sorted(set(map(reduce_ground_truth, _clipo_rows(path))))
    bad = [g for g in gts if _decide_in_process(g, g, 5.0)[0] != 1.0]
    assert not bad, bad[:10]


def test_sympy_path_self_verifies_math500_sample():
    """The same answers through math-verify (not the string fast path)."""
    from clipo_jax.rewards.math import _decide_in_process

    rows = sorted(set(map(reduce_ground_truth, _clipo_rows(os.path.join(CLIPO_DIR, "test", "math.parquet")))))
    for g in random.Random(1).sample(rows, min(40, len(rows))):
        assert _decide_in_process(g, g, 5.0)[0] == 1.0, g


# ---------------------------------------------------------------------------------------------
# Fuzzing the extractor
# ---------------------------------------------------------------------------------------------
def _balanced(s: str) -> bool:
    depth, i = 0, 0
    while i < len(s):
        if s[i] == "\\":
            i += 2
            continue
        depth += {"{": 1, "}": -1}.get(s[i], 0)
        if depth < 0:
            return False
        i += 1
    return depth == 0


def _reference_last_box(text: str):
    """Independent brute force: scan box commands from the last one back; first balanced wins."""
    starts = [m.start() for m in re.finditer(r"\\(?:boxed|fbox)(?![A-Za-z])", text)]
    for s in reversed(starts):
        rest = text[s:]
        m = re.match(r"\\(?:boxed|fbox)[ \t]*\{", rest)
        if m:
            depth, i = 0, m.end() - 1
            while i < len(rest):
                if rest[i] == "\\":
                    i += 2
                    continue
                depth += {"{": 1, "}": -1}.get(rest[i], 0)
                if depth == 0:
                    return rest[m.end() : i]
                i += 1
            continue
        m = re.match(r"\\(?:boxed|fbox)[ \t]+([^\s$]+)", rest)
        # braceless form: only a token that can be an answer (not prose such as "\boxed as")
        if m and (m.group(1)[0] in "0123456789+-.\\" or re.fullmatch(r"\(?[A-Z][.)]?", m.group(1))):
            return m.group(1)
    return None


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.sampled_from(
            [
                "\\boxed{",
                "\\fbox{",
                "{",
                "}",
                "\\{",
                "\\}",
                "x",
                "1",
                " ",
                "\\boxed ",
                "$",
                "\\",
                "\\boxed",
                "\n",
                "B",
                "-",
            ]
        ),
        max_size=30,
    )
)
def test_extractor_fuzz(tokens):
    """Never raises; returns the last box with balanced braces (innermost when nested)."""
    text = "".join(tokens)
    got = last_boxed(text)
    assert got == _reference_last_box(text)
    if got is not None and ("\\boxed{" + got + "}") in text:
        assert _balanced(got)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_rewards_never_raise_on_random_text(text):
    assert math_reward(text, "5", isolate=False) in (0.0, 1.0)
    assert choice_reward(text, "A") in (0.0, 1.0)
    assert gsm8k_reward(text, "5") in (0.0, 1.0)


# ---------------------------------------------------------------------------------------------
# Time limits and hostile input
# ---------------------------------------------------------------------------------------------
HOSTILE = [
    "10^{10^{10^{10}}}",
    "9^{9^{9}}",
    "(10^{9999})^{9999}",
    "\\left(10^{99}\\right)^{9999}",
    "2^{2^{30}}",
    "10^{100000000}",
    "100000!",
    "(" * 500 + "1" + ")" * 500,
    "\\frac{" * 60 + "1" + "}{2}" * 60,
    "1" * 1_000_000,
    "x" * 5000 + "^" * 5000,
]


@pytest.mark.parametrize("h", HOSTILE, ids=range(len(HOSTILE)))
def test_prefilter_catches_known_blowups(h):
    assert hostile_reason(h) is not None


def test_hostile_inputs_return_fast_and_are_counted():
    reset_reward_stats()
    for h in HOSTILE:
        t = time.monotonic()
        assert math_reward(box(h), "5") == 0.0
        assert math_reward(box("5"), h) == 0.0
        assert time.monotonic() - t < 5.0
    stats = reward_stats()
    assert stats["prefiltered"] >= len(HOSTILE)
    assert stats["calls"] == 2 * len(HOSTILE)


def test_megabyte_response_is_cheap():
    big = "x" * 2_000_000 + "\\boxed{42}"
    t = time.monotonic()
    assert math_reward(big, "42") == 1.0
    assert math_reward("\\boxed{" * 200_000, "42") == 0.0
    assert time.monotonic() - t < 5.0


def test_reasonable_answers_pass_prefilter():
    for ok in [
        "e^{x^2}",
        "(x^2+1)^2",
        "2^{10}",
        "x^{100}y^{200}",
        "10!",
        "\\frac{1}{2}",
        "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}",
        "(x^2)^3",
    ]:
        assert hostile_reason(ok) is None, ok


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.sampled_from(
            [
                "10",
                "^",
                "{",
                "}",
                "9",
                "!",
                "(",
                ")",
                "**",
                "x",
                "\\frac",
                "\\sqrt",
                "99999",
                "\\left(",
                "\\right)",
                "+",
                "e",
            ]
        ),
        min_size=1,
        max_size=30,
    )
)
def test_random_hostile_strings_return_within_limit(tokens):
    """Random expression soup: math_reward (in-process signal deadline) returns in time."""
    s = "".join(tokens)
    t = time.monotonic()
    assert math_reward(box(s), "7", timeout=0.5, isolate=False) in (0.0, 1.0)
    assert time.monotonic() - t < 3.0


def test_signal_deadline_restores_outer_handler():
    """Our SIGALRM use must not clobber a handler the caller installed."""
    calls = []
    old = signal.signal(signal.SIGALRM, lambda *a: calls.append(1))
    try:
        assert math_reward(box("x^2+2x+1"), "(x+1)^2", isolate=False, timeout=ROOMY) == 1.0
        assert signal.getsignal(signal.SIGALRM) is not None and not calls
    finally:
        signal.signal(signal.SIGALRM, old)


# ---------------------------------------------------------------------------------------------
# Worker pool: batches, threads, hard kill
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pool():
    # generous limits: on a loaded 2-core machine even "3" == "3" through sympy can take > 0.5 s
    p = VerifierPool(num_workers=1, timeout=2.0, hard_grace=1.0)
    yield p
    p.close()


def test_batch_matches_single_calls():
    pairs = EQUAL[:12] + UNEQUAL[:12] + [("18", "18"), (HOSTILE[0], "5")]
    responses = [box(p) for _, p in pairs]
    golds = [g for g, _ in pairs]
    got = batch_math_reward(responses, golds, num_workers=2)
    want = [math_reward(r, g, isolate=False) for r, g in zip(responses, golds)]
    assert got == want
    assert got[:12] == [1.0] * 12 and got[12:24] == [0.0] * 12
    with pytest.raises(ValueError, match="2 responses but 1"):
        batch_math_reward(["a", "b"], ["a"])


def test_math_reward_from_threads_uses_worker():
    out = {}

    def run(i, pred, gold):
        out[i] = math_reward(box(pred), gold, timeout=ROOMY)

    threads = [threading.Thread(target=run, args=(i, p, g)) for i, (g, p) in enumerate(EQUAL[25:31] + UNEQUAL[:4])]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [out[i] for i in range(10)] == [1.0] * 6 + [0.0] * 4


def test_pool_hard_kills_a_frozen_worker(pool):
    """A worker that stops answering (SIGSTOP: a real frozen process) is killed at the hard
    deadline, the pair scores 0, and the pool recovers with a fresh worker."""
    assert pool.decide([("3", "3")]) == [(1.0, "verifier_calls")]
    worker = pool._workers[0]
    os.kill(worker.proc.pid, signal.SIGSTOP)
    t = time.monotonic()
    assert pool.decide([("x+1", "1+x")]) == [(0.0, "hard_kills")]
    assert time.monotonic() - t < 8.0
    assert worker.proc.poll() is not None  # the frozen worker is gone
    assert pool.decide([("x+1", "1+x"), ("x", "y")]) == [(1.0, "verifier_calls"), (0.0, "verifier_calls")]


def test_pool_soft_timeout_on_slow_sympy(pool):
    # Unfiltered power tower sent straight to the pool: the worker's own deadline answers.
    t = time.monotonic()
    ((reward, status),) = pool.decide([("10^{10^{7}}", "5")])
    assert reward == 0.0 and status in ("timeouts", "hard_kills", "verifier_calls")
    assert time.monotonic() - t < 8.0


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------
def test_registry():
    assert {"math", "choice", "gsm8k", "rgym"} <= set(list_rewards())
    assert get_reward("math") is math_reward and get_reward("choice") is choice_reward
    with pytest.raises(UnknownRewardError, match=r"unknown reward 'nope'; valid: .*choice.*math"):
        get_reward("nope")

    @register_reward("test_exact_tmp")
    def exact(response, ground_truth, **row):
        return float(response == ground_truth)

    assert get_reward("test_exact_tmp")("a", "a", meta={}) == 1.0
    with pytest.raises(ValueError, match="already registered"):
        register_reward("test_exact_tmp")(lambda r, g, **k: 0.0)


# ---------------------------------------------------------------------------------------------
# Grading defects found in review (each test failed before its fix)
# ---------------------------------------------------------------------------------------------
def test_markdown_hash_headings_are_not_answers():
    """'####' is a GSM8K answer marker only before a numeric payload; Markdown headings are not."""
    headings = "#### 1. Understand\n...\n#### 2. Set up\n...\n#### 3. Solve for x\nWe get 3x = "
    assert extract_answer(headings) is None
    assert math_reward(headings, "3") == 0.0
    assert math_reward("#### 4) Final check\nThe answer must be 7", "4") == 0.0
    assert extract_answer("#### Step 5\nso 5") is None
    # numeric payloads still count: sign, $, thousands commas, decimals, fractions, a unit word
    for payload in ["18", "-3", "$1,800.", "\\$18.00", "0.5", "3/4", "\\frac{3}{4}", "5 apples", "50\\%"]:
        assert extract_answer("work\n#### " + payload + "\n") == payload, payload
    assert math_reward("so\n#### $1,800.", "1800") == 1.0
    assert math_reward("#### 3. Solve for x\n...\n#### 12 apples", "12") == 1.0  # the last numeric one


def test_trailing_text_unit_words_after_a_number():
    """\\text{<noun>} after a number is a unit, not a product of symbols (math-verify itself
    returns 1.0 on the raw pair '12 \\text{ pencils}' / '12')."""
    for noun in ("pencils", "bags", "cars", "distinct integers", "ways."):
        assert math_reward(box("12 \\text{ " + noun + "}"), "12") == 1.0, noun
        assert math_reward(box("12"), "12\\text{ " + noun + "}") == 1.0, noun
    assert math_reward(box("x = 12 \\text{ pencils}"), "12") == 1.0
    assert math_reward(box("1.85\\ \\text{USD}."), "1.85\\ \\text{USD}") == 1.0
    assert math_reward(box("12 \\text{ apples}"), "13") == 0.0
    # words that change the value are kept
    assert math_reward(box("5 \\text{ million}"), "5") == 0.0
    assert math_reward(box("2 \\text{ times } 3"), "2") == 0.0


def test_comma_space_lists_are_not_thousands():
    """'81, 256' is a list of two numbers; only '1,000' (no space, 3-digit groups) is one number.
    math-verify itself returns 1.0 for '256, 81' / '81, 256' and 0.0 for '81256' / '81, 256'."""
    assert math_reward(box("256, 81"), "81, 256", timeout=ROOMY) == 1.0
    assert math_reward(box("81256"), "81, 256", timeout=ROOMY) == 0.0
    assert math_reward(box("120^\\circ, 60^\\circ"), "60^\\circ, 120^\\circ", timeout=ROOMY) == 1.0
    assert math_reward(box("60120"), "60^\\circ, 120^\\circ", timeout=ROOMY) == 0.0
    # thousands separators still work, also with LaTeX thin spaces (MATH golds write 11,\! 111)
    assert math_reward(box("1,234,567"), "1234567") == 1.0
    assert math_reward(box("11111111100"), "11,\\! 111,\\! 111,\\! 100") == 1.0
    assert math_reward(box("\\$32,\\!348"), "32348") == 1.0
    # the same digits and commas with spacing differences still match a list gold
    assert math_reward(box("81,256"), "81, 256") == 1.0
    assert math_reward(box("45^\\circ,135^\\circ,225^\\circ"), "45^\\circ, 135^\\circ, 225^\\circ") == 1.0


def test_integers_compare_exactly():
    """No relative tolerance between integers or fractions (math-verify itself returns 0.0 for
    '1234567890' / '1234567891'); decimals keep the 1e-9 tolerance."""
    assert math_reward(box("1234567890"), "1234567891") == 0.0
    assert math_reward(box("11111111099"), "11,\\! 111,\\! 111,\\! 100") == 0.0
    assert math_reward(box("\\frac{1000000001}{1000000000}"), "1") == 0.0
    assert gsm8k_reward("#### 1234567890", "1234567891") == 0.0
    assert not numbers_equal(Fraction(1234567890), Fraction(1234567891))
    assert numbers_equal(Fraction(1234567890), Fraction(1234567891), approx=True)
    assert math_reward(box("0.3333333333333"), "\\frac{1}{3}") == 1.0
    assert math_reward(box("1234567890.0000000001"), "1234567890") == 1.0


def test_scientific_notation_latex_vs_e_notation():
    """TheoremQA golds write 4e-05; answers write 4 \\times 10^{-5} (math-verify itself returns 0.0
    on this raw pair: a deliberate extension)."""
    assert math_reward(box("4 \\times 10^{-5}"), "4e-05") == 1.0
    assert math_reward(box("3.54 \\times 10^{-7}"), "3.54e-07") == 1.0
    assert math_reward(box("2 \\cdot 10^3"), "2000") == 1.0
    assert math_reward(box("4 \\times 10^{-6}"), "4e-05") == 0.0
    assert math_reward(box("5 \\times 10^{-5}"), "4e-05") == 0.0


def test_letters_only_algebra_goes_to_sympy():
    """'p - q' and 'xy' are algebra, not word answers (math-verify itself returns 1.0 for
    '-q + p' / 'p - q' and 'yx' / 'xy'); real words are still compared as strings."""
    assert math_reward(box("-q + p"), "p - q", timeout=ROOMY) == 1.0
    assert math_reward(box("yx"), "xy", timeout=ROOMY) == 1.0
    assert math_reward(box("x \\cdot y"), "xy", timeout=ROOMY) == 1.0
    assert math_reward(box("p + q"), "p - q", timeout=ROOMY) == 0.0
    for gold, pred in [("Evelyn", "Nevely"), ("no", "on"), ("LQSX", "XSQL"), ("CBAD", "ABCD"), ("odd", "dod")]:
        assert math_reward(box(pred), gold) == 0.0, gold
        assert math_reward(box(gold), gold) == 1.0, gold


def test_braceless_box_needs_an_answer_token():
    """'\\boxed as requested' mentions the command; it is not a box holding 'as'."""
    text = "So the answer is \\boxed{18}. (I used \\boxed as requested.)"
    assert extract_answer(text) == "18"
    assert math_reward(text, "18") == 1.0
    assert last_boxed("the \\boxed command") is None
    for s, want in [("\\boxed 5$", "5"), ("\\boxed -2", "-2"), ("\\boxed .5", ".5"), ("\\boxed \\pi", "\\pi")]:
        assert last_boxed(s) == want, s
    assert choice_reward("so \\boxed B", "B") == 1.0


def test_spaced_digit_groups_are_not_merged():
    """'1 2' is two numbers (math-verify itself returns 0.0 for '1 2' / '12'); LaTeX thin spaces
    between digit groups are still thousands separators."""
    assert math_reward(box("1 2"), "12") == 0.0
    assert math_reward(box("12"), "1 2") == 0.0
    assert gsm8k_reward("\\boxed{1 2}", "12") == 0.0
    assert math_reward(box("11,\\! 111"), "11111") == 1.0
    assert math_reward(box("1\\,000"), "1000") == 1.0
    assert math_reward(box("1\\,000\\,000"), "1000000") == 1.0
    assert math_reward(box("1\\!000"), "1000") == 1.0


def test_fresh_worker_is_warm_before_its_first_pair():
    """A worker reports ready only after sympy is warm, so its first pair is not charged the
    one-time set-up (~0.3 s on a 2-core host; a warm call of this pair takes ~0.02 s): a fresh
    pool with a small limit grades the same pair identically three times. A fresh pool per try,
    up to 3 tries, so one load spike on a busy host does not fail the test; before the warm-up
    every try timed out on its first call."""
    pair = [("t^2+2t+1", "(t+1)^2")]
    assert pair[0] not in getattr(rmath, "_WARM_UP_PAIRS", ())  # a pair the warm-up did not run
    want = [(1.0, "verifier_calls")] * 3
    runs = []
    for _ in range(3):
        p = VerifierPool(num_workers=1, timeout=0.15, hard_grace=5.0)
        try:
            runs.append([p.decide(pair)[0] for _ in range(3)])
        finally:
            p.close()
        if runs[-1] == want:
            break
    assert runs[-1] == want, runs


def test_fast_path_decides_common_cases_without_sympy():
    for pred, gold in [("18", "18"), ("025", "25"), ("17", "18"), ("B", "C"), ("Evelyn", "\\text{Evelyn}")]:
        assert fast_decision(pred, gold) is not None
    assert fast_decision("x^2+2x+1", "(x+1)^2") is None


@pytest.mark.parametrize(
    "template, a, b, op",
    [
        ("The answer is {a} + {b} = {r}", 5, 3, "+"),
        ("The answer is {a} + {b} = {r}.", 17, 25, "+"),
        ("So the answer is ${a} - ${b} = ${r}.", 18, 6, "-"),
        ("The answer is {a} * {b} = {r} cookies.", 2, 4, "*"),
        ("The answer is \\${a} \\times {b} = \\${r}, as computed above.", 5, 12, "*"),
        ("The answer is {a} - {b} = {r}", 5, 8, "-"),
        ("The answer is {r} = {a} + {b}", 40, 2, "+"),
    ],
)
def test_gsm8k_answer_clause_with_an_equation_states_its_result(template, a, b, op):
    """'The answer is 5 + 3 = 8' states 8 (math-verify reads the boxed equation the same way:
    math_reward('\\boxed{5 + 3 = 8}', '8') == 1.0); the first operand is not the answer."""
    r = {"+": a + b, "-": a - b, "*": a * b}[op]
    response = template.format(a=a, b=b, r=r)
    assert gsm8k_reward(response, str(r)) == 1.0, response
    assert gsm8k_reward(response, str(a)) == 0.0, response
    assert gsm8k_reward(response, str(b)) == 0.0, response


def test_gsm8k_answer_clause_keeps_its_stated_number():
    """Without an equation the clause's leading number is the answer, and the clause ends at a
    full stop, ', ' or a line break (later numbers are not the answer)."""
    assert gsm8k_reward("The answer is x = 8", "8") == 1.0
    assert gsm8k_reward("The answer is 18 dollars per 2 weeks.", "18") == 1.0
    assert gsm8k_reward("The answer is 12, not 13.", "12") == 1.0
    assert gsm8k_reward("The answer is 12. Then 5 + 3 = 8", "12") == 1.0
    assert gsm8k_reward("The answer is 1,000 dollars", "1000") == 1.0
    assert gsm8k_reward("The answer is 12.5 - 0.5 = 12.", "12") == 1.0
    assert gsm8k_reward("The answer is 7. No wait, the answer is 4 + 4 = 8", "8") == 1.0
    assert gsm8k_reward("The answer is probably 8", "8") == 0.0
    assert math_reward(box("5 + 3 = 8"), "8") == 1.0  # the verifier's reading of an equation
    assert math_reward(box("5 + 3 = 8"), "5") == 0.0


@pytest.mark.parametrize(
    "response,answer",
    [
        ("The answer is 4 because the price per pound = $2 and he bought 8 pounds.", "4"),
        ("The answer is 40 (since 10 hours = 600 minutes)", "40"),
        ("The answer is 60 minutes = 1 hour.", "60"),
        ("The answer is 18 dollars per day = 126 per week", "18"),
        ("The answer is 5 apples and total = 12", "5"),
        ("The answer is 3 x 4 = 12", "12"),  # an expression first: its value side
        ("The answer is 9 * $2 = $18", "18"),
        ("The answer is 40 = 2 + 38", "40"),
    ],
)
def test_gsm8k_answer_clause_that_leads_with_the_answer_keeps_it(response, answer):
    """A clause that states its answer and then explains it with an equation is scored on the
    answer, not on the explanation's number; only a clause that opens with an expression states
    the value side of its equation."""
    assert gsm8k_reward(response, answer) == 1.0, response
