"""Synthetic arithmetic task: generator, test sets, lucky SFT traces, verifier, tokenizer."""

import dataclasses
import operator
import random
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clipo_jax.data import synthetic as syn
from clipo_jax.rewards.synthetic import (
    REWARDS,
    SyntheticMetaError,
    check_solution,
    grade_rates,
    parse_meta,
    synthetic_process_reward,
    synthetic_reward,
)

N_TEST = 120


@pytest.fixture(scope="module")
def sets():
    return syn.test_sets(seed=7, n=N_TEST)


# ----------------------------------------------------------------------------- reference checker
# Written independently of the verifier: str.split parsing, operator module arithmetic, and the
# canonical "L<op>R=V ; ... ; answer N" format only (the verifier also tolerates extra spaces).
_OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul}


def _to_int(s):
    body = s[1:] if s.startswith("-") else s
    return int(s) if body.isdigit() and body.isascii() else None


def _ref_step(seg):
    lhs, eq, rhs = seg.partition("=")
    if not eq:
        return None
    for pos in range(1, len(lhs)):  # first operator char after the (possibly signed) left number
        if lhs[pos] in "+-*/":
            left, op, right = _to_int(lhs[:pos]), lhs[pos], _to_int(lhs[pos + 1 :])
            value = _to_int(rhs)
            if None in (left, right, value):
                return None
            return left, op, right, value
    return None


def _ref_true_value(left, op, right):
    if op == "/":
        return left // right if right and left % right == 0 else None
    return _OPS[op](left, right)


def ref_check(quantities, answer, text):
    segs = [s.strip() for s in text.split(";")]
    last = segs[-1].split(" ")
    stated = _to_int(last[1]) if len(last) == 2 and last[0] == "answer" else None
    outcome = stated is not None and stated == answer
    steps = [_ref_step(s) for s in segs[:-1]]
    process = stated is not None and len(steps) > 0 and None not in steps
    if process:
        known = list(quantities)
        for left, op, right, value in steps:
            if left not in known or right not in known or _ref_true_value(left, op, right) != value:
                process = False
                break
            known.append(value)
        process = process and stated == steps[-1][3]
    return outcome, process


# ----------------------------------------------------------------------------- generator
def test_generator_is_deterministic_from_seed():
    cfg = syn.SyntheticTask()
    a = syn.generate_problems(cfg, 50, seed=3)
    b = syn.generate_problems(cfg, 50, seed=3)
    c = syn.generate_problems(cfg, 50, seed=4)
    assert a == b
    assert [p.question for p in a] != [p.question for p in c]
    assert syn.test_sets(1, 10) == syn.test_sets(1, 10)


def test_gold_program_matches_question_and_arithmetic(sets):
    for name, problems in sets.items():
        cfg = syn.TEST_SET_CONFIGS[name]
        assert len({p.key for p in problems}) == len(problems) == N_TEST
        for p in problems:
            numbers = [int(x) for x in re.findall(r"\d+", p.question)]
            # The question states exactly the quantities (in order) plus the distractors.
            assert [x for x in numbers if x not in p.distractors] == list(p.quantities)
            assert sorted(numbers) == sorted(list(p.quantities) + list(p.distractors))
            value = p.quantities[0]
            for i, s in enumerate(p.steps):
                assert s.left == value and s.right == p.quantities[i + 1]
                value = _ref_true_value(s.left, s.op, s.right)
                assert s.result == value and 1 <= value <= cfg.max_value
            assert p.answer == value
            assert syn.solution_text(p).endswith(f"answer {p.answer}")


@pytest.mark.parametrize("name", list(syn.TEST_SET_CONFIGS))
def test_every_gold_solution_passes_outcome_and_process(sets, name):
    for p in sets[name]:
        text = syn.solution_text(p)
        assert check_solution(p, text) == {"outcome": True, "process": True, "lucky": False, "parse_ok": True}
        assert ref_check(p.quantities, p.answer, text) == (True, True)


def test_test_sets_differ_as_described(sets):
    def steps(name):
        return [len(p.steps) for p in sets[name]]

    lo, hi = syn.IN_DIST.num_steps
    assert min(steps("in_dist")) == lo and max(steps("in_dist")) == hi
    for k in (1, 2):
        counts = steps(f"extra_step_{k}")
        assert min(counts) == lo + k and max(counts) == hi + k
    add_sub = lambda p: [p.quantities[0]] + [s.right for s in p.steps if s.op in "+-"]  # noqa: E731
    assert max(max(add_sub(p)) for p in sets["in_dist"]) <= 99
    assert min(min(add_sub(p)) for p in sets["big_numbers"]) >= 100
    for name in ("in_dist", "big_numbers", "extra_step_1", "extra_step_2"):
        assert all(p.distractors == () for p in sets[name])
    for p in sets["distractor"]:
        (d,) = p.distractors
        assert re.search(rf"\b{d}\b", p.question)
        used = {x for s in p.steps for x in (s.left, s.right, s.result)}
        assert d not in used and d not in p.quantities
        # The clause is irrelevant: dropping it leaves an in-distribution-style question.
        assert sum(1 for x in re.findall(r"\d+", p.question) if int(x) == d) == 1
        assert ref_check(p.quantities, p.answer, syn.solution_text(p)) == (True, True)
    # The distractor set's math otherwise follows in_dist: same step range, same number range.
    assert min(steps("distractor")) == lo and max(steps("distractor")) == hi


def test_train_test_disjoint_by_key():
    # A tiny space (one "+" step, start/addend in 10..14) makes collisions certain without exclude.
    tiny = syn.SyntheticTask(num_steps=(1, 1), number_range=(10, 14), ops=("+",), max_value=99)
    tests = syn.test_sets(seed=0, n=8, base=tiny)
    test_keys = syn.problem_keys(tests)
    naive = syn.generate_problems(tiny, 15, seed=0)
    assert syn.problem_keys(naive) & test_keys, "the tiny space should collide without exclude"
    train = syn.generate_problems(tiny, 10, seed=0, exclude=test_keys)
    assert not syn.problem_keys(train) & test_keys
    questions = {p.question for ps in tests.values() for p in ps}
    assert not {p.question for p in train} & questions
    with pytest.raises(syn.SyntheticTaskError, match="distinct problems"):
        syn.generate_problems(tiny, 100, seed=0)  # only 25 distinct problems exist


def test_division_steps_are_exact():
    cfg = syn.SyntheticTask(ops=("+", "/"), mul_range=(2, 4))
    problems = syn.generate_problems(cfg, 200, seed=0)
    divs = [s for p in problems for s in p.steps if s.op == "/"]
    assert divs and all(s.left == s.result * s.right for s in divs)
    for p in problems:
        assert check_solution(p, syn.solution_text(p))["process"]


@pytest.mark.parametrize(
    "field,kwargs",
    [
        ("num_steps", {"num_steps": (3, 2)}),
        ("ops", {"ops": ("^",)}),
        ("mul_range", {"mul_range": (1, 3)}),
        ("max_value", {"max_value": 50}),
        ("extra_steps", {"extra_steps": -1}),
        ("ops", {"ops": ("*",)}),
    ],
)
def test_bad_config_names_the_field(field, kwargs):
    with pytest.raises(syn.SyntheticTaskError, match=f"SyntheticTask.{field}"):
        syn.generate_problems(dataclasses.replace(syn.SyntheticTask(), **kwargs), 1, seed=0)


# ----------------------------------------------------------------------------- SFT traces
@pytest.mark.parametrize("share", [0.0, 0.1, 0.3, 1.0])
def test_lucky_share_is_exact_and_every_lucky_trace_is_lucky(sets, share):
    problems = sets["in_dist"] + sets["distractor"]
    records = syn.sft_records(problems, lucky_share=share, seed=5)
    assert len(records) == len(problems)
    assert sum(r.lucky for r in records) == round(share * len(problems))
    for r, p in zip(records, problems):
        assert r.prompt == p.question and r.problem_id == p.id
        graded = check_solution(p, r.completion)
        ref = ref_check(p.quantities, p.answer, r.completion)
        if r.lucky:
            assert graded == {"outcome": True, "process": False, "lucky": True, "parse_ok": True}, r
            assert ref == (True, False)
        else:
            assert r.completion == syn.solution_text(p) and graded["process"] and graded["outcome"]
    pairs = syn.sft_traces(problems, lucky_share=share, seed=5)
    assert pairs == [(r.prompt, r.completion) for r in records]


def test_lucky_traces_use_every_kind_and_are_seeded(sets):
    problems = sets["in_dist"] + sets["distractor"]
    records = syn.sft_records(problems, lucky_share=1.0, seed=0)
    assert {r.kind for r in records} == set(syn.LUCKY_KINDS)
    detours = [(r, p) for r, p in zip(records, problems) if r.kind == "distractor_detour"]
    assert all(str(p.distractors[0]) in r.completion for r, p in detours)
    assert syn.sft_records(problems, 0.5, seed=1) == syn.sft_records(problems, 0.5, seed=1)
    assert syn.sft_records(problems, 0.5, seed=1) != syn.sft_records(problems, 0.5, seed=2)
    with pytest.raises(syn.SyntheticTaskError, match="lucky_share"):
        syn.sft_records(problems, 1.5, seed=0)


# ----------------------------------------------------------------------------- verifier
GT = '{"q":[23,3,17],"d":[41],"a":52}'


@pytest.mark.parametrize(
    "text,expected",
    [
        ("23*3=69 ; 69-17=52 ; answer 52", (True, True, True)),
        ("23 * 3 = 69 ;69 - 17 = 52;answer 52", (True, True, True)),  # spacing tolerated
        ("23*3=68 ; 69-17=52 ; answer 52", (True, False, True)),  # slip, recovered
        ("23*3=68 ; 68-17=52 ; answer 52", (True, False, True)),  # compensating errors
        ("23*3=69 ; 69-17=51 ; answer 52", (True, False, True)),  # answer patched
        ("23*3=69 ; 69-17=52 ; answer 51", (False, False, True)),  # answer != last step
        ("23*3=69 ; 69-41=28 ; answer 28", (False, False, True)),  # distractor used
        ("17-3=14 ; 14+23=37 ; answer 37", (False, True, True)),  # valid steps, wrong program
        ("answer 52", (True, False, True)),  # no work shown
        ("23*3=69 ; 69-17=52 ; answer 52 ;", (False, False, False)),  # trailing separator
        ("23*3=69 ; because ; answer 52", (True, False, False)),
        ("", (False, False, False)),
        ("23*3=69 ; 69-17=5", (False, False, False)),  # truncated
    ],
)
def test_verifier_on_hand_checked_cases(text, expected):
    graded = check_solution(GT, text)
    assert (graded["outcome"], graded["process"], graded["parse_ok"]) == expected
    assert graded["lucky"] == (expected[0] and not expected[1])
    assert synthetic_reward(text, GT) == float(expected[0])
    assert synthetic_process_reward(text, GT) == float(expected[0] and expected[1])


def _corruptions(p, rng):
    """(name, text) pairs, each of which must not pass outcome AND process."""
    steps = [s.text() for s in p.steps]
    gold = syn.solution_text(p)
    i = rng.randrange(len(p.steps))
    wrong = list(steps)
    wrong[i] = p.steps[i].text(result=p.steps[i].result + rng.choice([-3, -1, 1, 2, 11]))
    yield "wrong_arithmetic", syn._join(wrong, p.answer)
    yield "wrong_final_line", syn._join(steps, p.answer + rng.choice([-2, 1, 7]))
    if p.distractors:
        d = p.distractors[0]
        used = list(p.steps[:i])
        value = used[-1].result if used else p.quantities[0]
        texts = steps[:i] + [f"{value}+{d}={value + d}"]
        value += d
        for s in p.steps[i + 1 :]:
            new = _ref_true_value(value, s.op, s.right)
            if new is None:
                break
            texts.append(f"{value}{s.op}{s.right}={new}")
            value = new
        yield "distractor_used", syn._join(texts, value)
    yield "garbage", "".join(rng.choice("abc 0123456789+-*=;") for _ in range(rng.randint(1, 40)))
    yield "empty", ""
    cut = rng.randrange(len(gold))
    yield "truncated", gold[:cut]
    # Skipping step 1 is only an error when its result is not also a quantity (values are
    # matched by value, so a coincidentally equal quantity would make the shortcut valid).
    if len(steps) > 1 and p.steps[0].result not in p.quantities:
        yield "dropped_step", syn._join(steps[1:], p.answer)


def test_random_corruptions_are_caught(sets):
    rng = random.Random(0)
    seen = set()
    for p in sets["in_dist"] + sets["distractor"]:
        for name, text in _corruptions(p, rng):
            seen.add(name)
            graded = check_solution(p, text)
            assert not (graded["outcome"] and graded["process"]), (name, text)
            assert (graded["outcome"], graded["process"]) == ref_check(p.quantities, p.answer, text), (name, text)
    assert seen == {
        "wrong_arithmetic",
        "wrong_final_line",
        "distractor_used",
        "garbage",
        "empty",
        "truncated",
        "dropped_step",
    }


def test_every_proper_prefix_of_a_gold_solution_fails(sets):
    for p in sets["extra_step_1"][:20]:
        gold = syn.solution_text(p)
        for cut in range(len(gold)):
            graded = check_solution(p, gold[:cut])
            assert not (graded["outcome"] and graded["process"]), gold[:cut]


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_parser_never_crashes_on_arbitrary_text(text):
    graded = check_solution(GT, text)
    assert set(graded) == {"outcome", "process", "lucky", "parse_ok"}
    assert all(isinstance(v, bool) for v in graded.values())
    assert graded["lucky"] == (graded["outcome"] and not graded["process"])
    assert not graded["process"] or graded["parse_ok"]


_piece = st.one_of(
    st.sampled_from(["23", "3", "17", "41", "52", "69", "68", "0", "-5", "99999999999999999999999"]),
    st.integers(-200, 2000).map(str),
)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(_piece, st.sampled_from("+-*/"), _piece, _piece), max_size=5),
    st.one_of(_piece, st.just("x")),
    st.sampled_from([" ; ", ";", " ;  "]),
)
def test_verifier_agrees_with_reference_on_structured_fuzz(steps, answer, sep):
    text = sep.join([f"{a}{op}{b}={c}" for a, op, b, c in steps] + [f"answer {answer}"])
    graded = check_solution(GT, text)
    assert (graded["outcome"], graded["process"]) == ref_check([23, 3, 17], 52, text)


@settings(max_examples=100, deadline=None)
@given(st.text(alphabet="0123456789+-*/=; answer\n", max_size=80))
def test_parser_never_crashes_on_near_miss_text(text):
    graded = check_solution(GT, text)
    assert not graded["process"] or graded["parse_ok"]


@pytest.mark.parametrize(
    "bad,field",
    [
        ("not json", "not JSON"),
        ('{"a": 1}', "'q'"),
        ('{"q": [1]}', "'a'"),
        ('{"q": [1, "x"], "a": 1}', "'q'"),
        ('{"q": [1], "a": 1.5}', "'a'"),
        ('{"q": [1], "d": 3, "a": 1}', "'d'"),
        ("[1, 2]", "JSON object"),
    ],
)
def test_malformed_ground_truth_raises_named_error(bad, field):
    with pytest.raises(SyntheticMetaError, match=re.escape(field)):
        synthetic_reward("answer 1", bad)


def test_dataset_rows_round_trip_through_the_reward(sets):
    problems = sets["distractor"][:30]
    rows = syn.dataset_rows(problems)
    assert REWARDS["synthetic"] is synthetic_reward
    for i, (row, p) in enumerate(zip(rows, problems)):
        assert row.keys() == {"prompt", "ground_truth", "reward_fn", "source", "index"}
        assert (row["prompt"], row["reward_fn"], row["source"], row["index"]) == (
            p.question,
            "synthetic",
            "distractor",
            i,
        )
        meta = parse_meta(row["ground_truth"])
        assert (meta.quantities, meta.distractors, meta.answer) == (p.quantities, p.distractors, p.answer)
        fn = REWARDS[row["reward_fn"]]
        assert fn(syn.solution_text(p), row["ground_truth"], source=row["source"], index=i) == 1.0
        assert fn(f"answer {p.answer + 1}", row["ground_truth"]) == 0.0
    assert syn.dataset_rows(problems, source="x")[0]["source"] == "x"


# ----------------------------------------------------------------------------- tokenizer
@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    import sentencepiece as spm

    path = syn.train_task_tokenizer(tmp_path_factory.mktemp("sp"), vocab_size=512, seed=0, n_problems=800)
    return path, spm.SentencePieceProcessor(model_file=path)


def test_tokenizer_round_trip_ids_and_digits(sp_model, sets):
    _, sp = sp_model
    assert (sp.pad_id(), sp.unk_id(), sp.bos_id(), sp.eos_id()) == (0, 1, 2, 3)
    assert sp.get_piece_size() == 512
    for problems in sets.values():
        records = syn.sft_records(problems, lucky_share=0.5, seed=0)
        for r in records:
            for text in (r.prompt, r.completion, r.prompt + " " + r.completion):
                ids = sp.encode(text)
                assert sp.decode(ids) == text
                assert sp.unk_id() not in ids
            # Prompt and completion can be encoded separately and concatenated.
            assert sp.encode(r.prompt) + sp.encode(r.completion) == sp.encode(r.prompt + " " + r.completion)
    # Digits are single pieces: a piece never holds two digits.
    for i in range(sp.get_piece_size()):
        assert sum(ch.isdigit() for ch in sp.id_to_piece(i)) <= 1 or sp.is_byte(i)
    # Out-of-corpus text still round-trips through byte fallback.
    assert sp.decode(sp.encode("Zoë owes 1234567 €")) == "Zoë owes 1234567 €"


def test_tokenizer_is_deterministic_and_in_dist_fits_budget(sp_model, sets, tmp_path):
    import sentencepiece as spm

    _, sp = sp_model
    again = spm.SentencePieceProcessor(
        model_file=syn.train_task_tokenizer(tmp_path, vocab_size=512, seed=0, n_problems=800)
    )
    pieces = lambda m: [(m.id_to_piece(i), m.get_score(i)) for i in range(m.get_piece_size())]  # noqa: E731
    assert pieces(sp) == pieces(again)
    stats = syn.token_length_stats(sp, sets["in_dist"])
    assert stats["max"] <= 100  # bos + prompt + gold solution + eos
    assert syn.token_length_stats(sp, sets["extra_step_2"])["p50"] > stats["p50"]
    with pytest.raises(syn.SyntheticTaskError, match="vocab_size"):
        syn.train_task_tokenizer(tmp_path, vocab_size=100)


# ----------------------------------------------------------------------------- presets
@pytest.mark.parametrize("preset", list(syn.PRESETS))
def test_presets_give_valid_test_sets(preset):
    base = syn.PRESETS[preset]
    sets_ = syn.test_sets(seed=3, n=60, base=base)
    for name, problems in sets_.items():
        for p in problems:
            assert ref_check(p.quantities, p.answer, syn.solution_text(p)) == (True, True)
            values = [p.quantities[0]] + [s.result for s in p.steps]
            assert max(values) <= (base.max_value if name != "big_numbers" else base.max_value * 10 + 9)
    assert min(p.quantities[0] for p in sets_["big_numbers"]) > base.number_range[1]
    records = syn.sft_records(sets_["in_dist"], lucky_share=0.5, seed=0)
    assert sum(check_solution(p, r.completion)["lucky"] for r, p in zip(records, sets_["in_dist"])) == 30


def test_distractor_avoids_used_values_even_in_a_crowded_range():
    # Values 1..2 are all used by the chain, so the distractor must come from above the range.
    cfg = syn.SyntheticTask(num_steps=(4, 4), number_range=(1, 2), ops=("+", "-"), max_value=10, distractor=True)
    problems = syn.generate_problems(cfg, 40, seed=0)
    assert any(p.distractors[0] > 2 for p in problems)
    for p in problems:
        used = set(p.quantities) | {s.result for s in p.steps}
        assert p.distractors[0] not in used
        assert check_solution(p, syn.solution_text(p))["process"]


def test_grade_rates_are_means_of_the_flags(sets):
    problems = sets["in_dist"][:40]
    records = syn.sft_records(problems, lucky_share=0.25, seed=0)
    texts = [r.completion for r in records]
    texts[:5] = ["garbage"] * 5  # 5 of the 40 unparsable, nothing right
    rates = grade_rates([p.to_ground_truth() for p in problems], texts)
    n_lucky_left = sum(r.lucky for r in records[5:])
    assert rates == pytest.approx(
        {"outcome": 35 / 40, "process": (35 - n_lucky_left) / 40, "lucky": n_lucky_left / 40, "parse_ok": 35 / 40}
    )
    with pytest.raises(ValueError, match="2 ground truths but 1"):
        grade_rates([GT, GT], ["x"])
