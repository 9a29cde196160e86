"""Shortcut variant of the synthetic task: answer leak, answer-copying SFT traces, leak test sets."""

import collections
import dataclasses
import hashlib
import json
import math
import os
import random
import sys

import pytest

from clipo_jax.data import synthetic as syn
from clipo_jax.rewards.synthetic import check_solution, synthetic_reward

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The demo's in-distribution family (configs/demo.py): small numbers, where answers are often reused.
DEMO = dataclasses.replace(syn.IN_DIST, num_steps=(2, 3), number_range=(2, 12), mul_range=(2, 3), max_value=60)
SHORTCUT = dataclasses.replace(DEMO, leak_share=0.5, name="train")
N = 2000


@pytest.fixture(scope="module")
def leaked():
    """Problems of the standard and the demo family, every one leaked."""
    out = []
    for base in (syn.SyntheticTask(), DEMO):
        out += syn.generate_problems(dataclasses.replace(base, leak_share=1.0), 300, seed=11)
    return out


@pytest.fixture(scope="module")
def shortcut_sets():
    return syn.test_sets(seed=5, n=200, base=SHORTCUT)


def _ids_digest(problems):
    return hashlib.sha1(",".join(p.id for p in problems).encode()).hexdigest()


# ----------------------------------------------------------------------------- generator
def test_leak_position_last_puts_the_clause_before_the_question_and_keeps_the_problems():
    anywhere = syn.generate_problems(dataclasses.replace(SHORTCUT, leak_share=1.0), 300, seed=3)
    last = syn.generate_problems(dataclasses.replace(SHORTCUT, leak_share=1.0, leak_position="last"), 300, seed=3)
    moved = 0
    for a, b in zip(anywhere, last, strict=True):
        assert (a.key, a.answer, a.leak, a.steps) == (b.key, b.answer, b.leak, b.steps)
        sa, sb = a.question.split(" . "), b.question.split(" . ")
        assert sorted(sa) == sorted(sb)  # the same sentences, one of them moved
        # the sentence before the question is the leak clause: the only one holding the leaked number
        assert str(b.leak) in sb[-2].split() and all(str(b.leak) not in s.split() for s in sb[:-2])
        moved += sa != sb
    assert moved > 100  # "anywhere" puts it elsewhere most of the time


def test_bad_leak_position_names_the_field():
    with pytest.raises(syn.SyntheticTaskError, match="leak_position"):
        dataclasses.replace(SHORTCUT, leak_position="first").validate()


def test_leak_share_zero_reproduces_the_plain_generator():
    # Digests of the ids produced before the shortcut variant existed (same seeds, same configs).
    plain = syn.generate_problems(syn.SyntheticTask(), 200, seed=0)
    assert plain[0].id == "39dd26f30eac98e9"
    assert _ids_digest(plain) == "8da78453e54e8885e0fd0eab080be94ecfba4e52"
    sets = syn.test_sets(3, 50, base=syn.PRESETS["small"])
    assert list(sets) == ["in_dist", "big_numbers", "extra_step_1", "extra_step_2", "distractor"]
    assert _ids_digest([p for v in sets.values() for p in v]) == "dc2c3a997ed5cd31476eae2ba6768b278a363959"
    explicit = syn.generate_problems(dataclasses.replace(syn.SyntheticTask(), leak_share=0.0), 200, seed=0)
    assert explicit == plain
    assert all(p.leak is None and p.base_key == p.key and '"l"' not in p.to_ground_truth() for p in plain)


@pytest.mark.parametrize("base,share", [(syn.SyntheticTask(), 0.3), (DEMO, 0.5), (DEMO, 0.05)])
def test_leak_share_is_respected_within_binomial_tolerance(base, share):
    problems = syn.generate_problems(dataclasses.replace(base, leak_share=share), N, seed=2)
    frac = sum(p.leak is not None for p in problems) / N
    assert abs(frac - share) < 4 * math.sqrt(share * (1 - share) / N)


def test_leak_is_deterministic_and_all_or_nothing_at_the_ends():
    a = syn.generate_problems(SHORTCUT, 300, seed=4)
    assert a == syn.generate_problems(SHORTCUT, 300, seed=4)
    assert a != syn.generate_problems(SHORTCUT, 300, seed=5)
    assert all(p.leak is not None for p in syn.generate_problems(dataclasses.replace(DEMO, leak_share=1.0), 300))


@pytest.mark.parametrize("share", [-0.1, 1.5])
def test_bad_leak_share_names_the_field(share):
    with pytest.raises(syn.SyntheticTaskError, match="leak_share"):
        syn.generate_problems(dataclasses.replace(DEMO, leak_share=share), 1)


def _clause_numbers(p):
    """Numbers of the irrelevant clauses: the question's numbers less its quantities."""
    numbers = collections.Counter(int(t) for t in p.question.split() if t.isdigit())
    return sorted((numbers - collections.Counter(p.quantities)).elements())


def test_leaked_clause_carries_the_answer_and_is_listed_as_a_distractor(leaked):
    for p in leaked:
        assert p.leak == p.answer == p.distractors[-1]
        assert _clause_numbers(p) == [p.answer], p.question
        # The leaked answer is never a quantity or an earlier result, so no valid step can use it.
        assert p.answer not in p.quantities and p.answer not in {s.result for s in p.steps[:-1]}
        assert json.loads(p.to_ground_truth())["l"] == p.answer
        assert p.key != p.base_key
        assert check_solution(p, syn.solution_text(p)) == {
            "outcome": True,
            "process": True,
            "lucky": False,
            "parse_ok": True,
        }


def test_leak_together_with_a_distractor_clause():
    cfg = dataclasses.replace(syn.SyntheticTask(), distractor=True, leak_share=1.0)
    for p in syn.generate_problems(cfg, 200, seed=1):
        assert len(p.distractors) == 2 and p.distractors[-1] == p.leak == p.answer
        assert sorted(_clause_numbers(p)) == sorted(p.distractors)
        assert p.base_key == syn._math_key([s.op for s in p.steps], p.quantities, p.distractors[:1])


def test_verifier_grades_copying_the_leak_as_lucky(leaked):
    for p in leaked[:100]:
        q0, q1 = p.quantities[:2]
        broken = f"{q0}+{q1}={q0 + q1 + 1} ; answer {p.leak}"  # a slip, then the copied number
        uses_leak = f"{p.leak}+{q0}={p.leak + q0} ; {p.leak + q0}-{q0}={p.leak} ; answer {p.leak}"  # valid math
        for text in (broken, uses_leak, f"answer {p.leak}"):
            assert check_solution(p, text) == {
                "outcome": True,
                "process": False,
                "lucky": True,
                "parse_ok": True,
            }, text
            assert synthetic_reward(text, p.to_ground_truth()) == 1.0  # outcome-only RL pays for it


def test_key_distinguishes_leaked_from_plain_and_decoy_from_distractor():
    p = syn.generate_problems(dataclasses.replace(DEMO, leak_share=1.0), 1, seed=0)[0]
    ops = [s.op for s in p.steps]
    assert p.key != syn._math_key(ops, p.quantities, p.distractors)  # not a plain distractor problem
    assert p.base_key == syn._math_key(ops, p.quantities, [])


def test_train_excludes_test_math_with_or_without_the_leak(shortcut_sets):
    keys = syn.problem_keys(shortcut_sets)
    assert {p.base_key for p in shortcut_sets["leak"]} <= keys
    # A tiny space, so that collisions certainly happen without the exclusion.
    tiny = dataclasses.replace(SHORTCUT, num_steps=(2, 2), number_range=(2, 5), ops=("+", "-"))
    test = syn.test_sets(seed=1, n=30, base=tiny)
    test_keys = syn.problem_keys(test)
    train = syn.generate_problems(tiny, 60, seed=0, exclude=test_keys)
    assert not ({p.key for p in train} | {p.base_key for p in train}) & test_keys
    assert len({p.base_key for p in train}) == len(train)  # one copy of a math problem, leaked or not


# ----------------------------------------------------------------------------- test sets
def test_shortcut_test_sets_are_added_and_the_five_are_unchanged(shortcut_sets):
    assert list(shortcut_sets) == [*syn.TEST_SET_CONFIGS, "leak", "leak_decoy"]
    plain = syn.test_sets(seed=5, n=200, base=DEMO)
    assert list(plain) == list(syn.TEST_SET_CONFIGS)
    for name in plain:
        assert shortcut_sets[name] == plain[name]
        assert all(p.leak is None for p in plain[name])
    assert all(p.leak == p.answer and p.source == "leak" for p in shortcut_sets["leak"])
    assert all(p.leak is not None and p.source == "leak_decoy" for p in shortcut_sets["leak_decoy"])
    # default base: only with leak_sets=True
    assert list(syn.test_sets(seed=0, n=3)) == list(syn.TEST_SET_CONFIGS)
    assert list(syn.test_sets(seed=0, n=3, leak_sets=True))[-2:] == list(syn.LEAK_TEST_SET_CONFIGS)


def test_leak_decoy_is_a_wrong_number_near_the_answer(shortcut_sets):
    offsets = collections.Counter()
    for p, twin in zip(shortcut_sets["leak_decoy"], shortcut_sets["leak"]):
        used = set(p.quantities) | {s.result for s in p.steps}
        assert p.leak != p.answer and p.leak not in used and p.leak >= 1
        assert p.distractors[-1] == p.leak and _clause_numbers(p) == [p.leak]
        offsets[p.leak - p.answer] += 1
        copied = check_solution(p, syn.solution_text(p).rsplit("answer", 1)[0] + f"answer {p.leak}")
        assert not copied["outcome"] and not copied["lucky"]
        assert synthetic_reward(f"answer {p.leak}", p.to_ground_truth()) == 0.0
        assert check_solution(p, syn.solution_text(p))["process"]
        # paired: the same problem as in "leak" but for the clause's number
        assert p.base_key == twin.base_key and p.answer == twin.answer
        assert p.question.replace(f" {p.leak} ", f" {twin.leak} ") == twin.question
    assert set(offsets) <= set(syn._DECOY_OFFSETS) and len(offsets) >= 6


def test_decoy_avoids_taken_values_in_a_crowded_range():
    # answer 6 with 3..9 and 16 taken: no listed offset is free, so one of the 4 nearest free values
    steps = [syn.Step("+", 3, 3, 6)]
    assert syn._decoy_number([3, 3], steps, taken=[1, 4, 5, 7, 8, 9, 16]) in {2, 10, 11, 12}
    cfg = dataclasses.replace(syn.PRESETS["small"], leak_share=1.0, leak_decoy=True)
    for p in syn.generate_problems(cfg, 300, seed=0):
        assert p.leak != p.answer and p.leak not in set(p.quantities) | {s.result for s in p.steps}


# ----------------------------------------------------------------------------- SFT traces
@pytest.mark.parametrize("copy_share", [0.1, 0.3, 1.0])
def test_answer_copied_traces_are_lucky_and_at_the_configured_share(copy_share):
    problems = syn.generate_problems(SHORTCUT, 1000, seed=7)
    n_leaked = sum(p.leak is not None for p in problems)
    records = syn.sft_records(problems, lucky_share=0.2, seed=3, copy_share=copy_share)
    by_id = {p.id: p for p in problems}
    copied = [r for r in records if r.kind == syn.COPY_KIND]
    assert len(copied) == round(copy_share * n_leaked)
    assert sum(r.lucky and r.kind != syn.COPY_KIND for r in records) == round(0.2 * len(problems))
    for r in copied:
        p = by_id[r.problem_id]
        assert r.lucky and p.leak == p.answer
        assert check_solution(p, r.completion)["lucky"]
        chain_end = int(r.completion.split(" ; ")[-2].split("=")[-1])
        assert chain_end != p.answer and r.completion.endswith(f"answer {p.leak}")  # the answer ignores the chain
    assert all(check_solution(by_id[r.problem_id], r.completion)["lucky"] == r.lucky for r in records)


def test_bare_copy_style_is_the_answer_line_alone_and_lucky():
    problems = syn.generate_problems(dataclasses.replace(SHORTCUT, leak_share=1.0), 400, seed=21)
    records = syn.sft_records(problems, lucky_share=0.1, seed=4, copy_share=0.5, copy_style="bare")
    slip = syn.sft_records(problems, lucky_share=0.1, seed=4, copy_share=0.5)
    by_id = {p.id: p for p in problems}
    copied = [r for r in records if r.kind == syn.COPY_KIND]
    assert len(copied) == 200 and [r.problem_id for r in copied] == [
        r.problem_id for r in slip if r.kind == syn.COPY_KIND
    ]  # the same problems copy in either style
    for r in copied:
        assert r.completion == f"answer {by_id[r.problem_id].leak}"
        assert check_solution(by_id[r.problem_id], r.completion) == {
            "outcome": True,
            "process": False,
            "lucky": True,
            "parse_ok": True,
        }
    with pytest.raises(syn.SyntheticTaskError, match="copy style 'none'"):
        syn.sft_records(problems, lucky_share=0.1, seed=4, copy_share=0.5, copy_style="none")


def test_copy_share_zero_leaves_sft_records_unchanged():
    problems = syn.generate_problems(SHORTCUT, 400, seed=7)
    assert syn.sft_records(problems, 0.2, seed=1) == syn.sft_records(problems, 0.2, seed=1, copy_share=0.0)
    assert syn.sft_records(problems, 0.2, seed=1, copy_share=0.5) == syn.sft_records(
        problems, 0.2, seed=1, copy_share=0.5
    )
    with pytest.raises(syn.SyntheticTaskError, match="copy_share"):
        syn.sft_records(problems, 0.2, seed=1, copy_share=1.5)


def test_copied_solution_needs_a_true_leak(shortcut_sets):
    rng = random.Random(0)
    assert syn.copied_solution(shortcut_sets["in_dist"][0], rng) is None
    assert syn.copied_solution(shortcut_sets["leak_decoy"][0], rng) is None
    text, kind = syn.copied_solution(shortcut_sets["leak"][0], rng)
    assert kind == "answer_copied" and check_solution(shortcut_sets["leak"][0], text)["lucky"]


def test_distractor_detour_never_uses_the_leak():
    cfg = dataclasses.replace(DEMO, leak_share=1.0)
    for p in syn.generate_problems(cfg, 100, seed=0):
        assert syn._lucky_distractor_detour(p, random.Random(0)) is None


# ----------------------------------------------------------------------------- task builder
@pytest.fixture(scope="module")
def demo_tasks(tmp_path_factory):
    sys.path.insert(0, REPO)
    from clipo_jax import tasks
    from configs.demo import get_config

    workdir = str(tmp_path_factory.mktemp("shortcut"))  # one tokenizer for both builds
    plain = tasks.build_task(get_config("size=tiny").task, workdir)
    config = get_config("size=tiny,shortcut=0.5")
    assert config.task.leak_share == 0.5 and config.task.copy_share == 0.2
    assert config.task.leak_position == "anywhere" and config.task.number_range == (2, 12)
    return plain, tasks.build_task(config.task, workdir)


def test_build_synthetic_with_the_demo_shortcut_config(demo_tasks):
    plain, task = demo_tasks
    assert list(task.test_sets) == [*syn.TEST_SET_CONFIGS, "leak", "leak_decoy"]
    assert list(plain.test_sets) == list(syn.TEST_SET_CONFIGS)
    for name in plain.test_sets:
        assert task.test_sets[name] == plain.test_sets[name]
    assert plain.grade_keys == ("outcome", "process", "lucky")
    assert task.grade_keys == ("outcome", "process", "lucky", "copied", "copied_unworked")
    leaked_rows = [r for r in task.train_rows if "l" in json.loads(r["ground_truth"])]
    assert 0.35 < len(leaked_rows) / len(task.train_rows) < 0.65
    assert all('"l"' not in r["ground_truth"] for r in plain.train_rows)
    # SFT pairs contain copying traces (their answers are the leaked numbers)
    assert task.sft_pairs != plain.sft_pairs
    row = task.test_sets["leak_decoy"][0]
    leak = json.loads(row["ground_truth"])["l"]
    bare = {"outcome": 0.0, "process": 0.0, "lucky": 0.0, "copied": 1.0, "copied_unworked": 1.0}
    assert task.grade(row, f"answer {leak}") == bare
    row = task.test_sets["leak"][0]
    gt = json.loads(row["ground_truth"])
    bare = {"outcome": 1.0, "process": 0.0, "lucky": 1.0, "copied": 1.0, "copied_unworked": 1.0}
    assert task.grade(row, f"answer {gt['l']}") == bare
    assert task.grade(task.test_sets["in_dist"][0], "answer 1")["copied"] == 0.0
    assert set(plain.grade(plain.test_sets["in_dist"][0], "answer 1")) == {"outcome", "process", "lucky"}


def test_demo_config_args_of_the_shortcut_variant():
    sys.path.insert(0, REPO)
    from configs.demo import get_config

    c = get_config("size=tiny,shortcut=0.5,leak=last,copy=0.5,copy_style=bare,hard")
    assert (c.task.leak_share, c.task.leak_position, c.task.copy_share) == (0.5, "last", 0.5)
    assert c.task.copy_style == "bare" and get_config("shortcut=0.5").task.copy_style == "slip"
    assert (tuple(c.task.number_range), c.task.max_value) == ((2, 30), 200)
    assert tuple(get_config("hard").task.number_range) == (2, 30) and "leak_share" not in get_config("hard").task
    with pytest.raises(ValueError, match="leak='middle'; valid: anywhere, last"):
        get_config("shortcut=0.5,leak=middle")
    with pytest.raises(ValueError, match="apply to the shortcut variant only"):
        get_config("leak=last")
    with pytest.raises(ValueError, match="copy_style='none'; valid: slip, bare"):
        get_config("shortcut=0.5,copy_style=none")


def test_build_synthetic_passes_the_copy_style(tmp_path):
    sys.path.insert(0, REPO)
    from clipo_jax import tasks
    from configs.demo import get_config

    task = tasks.build_task(get_config("size=tiny,shortcut=0.5,copy=0.5,copy_style=bare").task, str(tmp_path))
    bare = [c for _, c in task.sft_pairs if c.startswith("answer ")]
    assert len(bare) > 20 and all(len(c.split()) == 2 for c in bare)
