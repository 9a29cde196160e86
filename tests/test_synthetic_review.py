"""Review of the synthetic task's generator, grader and evaluation loop.

Two findings are kept as strict xfail reproducers: fixing them changes the training problems
(distractor overlap) or the grades of the study's responses ("copied"), which is the study
owner's call. A fix makes them XPASS, which fails the run until the marker is removed.
"""

import dataclasses
import itertools
import json
import os
import subprocess
import sys
import types

import jax
import numpy as np
import pytest

from clipo_jax import evaluation, sampling
from clipo_jax.data import synthetic as syn
from clipo_jax.rewards.synthetic import check_solution

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# configs/demo.py's task family (the one the CLIPO study trains on)
DEMO = dataclasses.replace(syn.IN_DIST, num_steps=(2, 3), number_range=(2, 12), mul_range=(2, 3), max_value=60)

_DIGEST_SCRIPT = """
import dataclasses, hashlib
from clipo_jax.data import synthetic as syn
base = dataclasses.replace(syn.IN_DIST, num_steps=(2, 3), number_range=(2, 12), mul_range=(2, 3),
                           max_value=60, leak_share=0.5)
tests = syn.test_sets(1000, 100, base=base)
sft = syn.generate_problems(base, 600, seed=7, exclude=syn.problem_keys(tests))
recs = syn.sft_records(sft, 0.2, seed=0, copy_share=0.2)
blob = repr([(p.question, p.to_ground_truth()) for ps in tests.values() for p in ps]) + repr(recs)
print(hashlib.sha256(blob.encode()).hexdigest())
"""


def test_problems_and_sft_records_do_not_depend_on_the_hash_seed():
    """The SFT cache and a resumed run rebuild the task in another process: hash randomisation
    (str hashes, set order) must not change a problem or an SFT trace."""
    digests = set()
    for hash_seed in ("0", "12345"):
        env = dict(os.environ, PYTHONHASHSEED=hash_seed)
        out = subprocess.run(
            [sys.executable, "-c", _DIGEST_SCRIPT], cwd=REPO, env=env, capture_output=True, text=True, check=True
        )
        digests.add(out.stdout.strip())
    assert len(digests) == 1


class _EchoTokenizer:
    """Token ids are character codes (+10, clear of the stop id), so a response decodes exactly."""

    bos_id = None

    def encode(self, text, add_bos=False):
        return [ord(c) + 10 for c in text]

    def decode(self, ids):
        return "".join(chr(i - 10) for i in ids)


def test_evaluate_grades_every_problem_once_with_a_batch_remainder():
    """7 problems, 3 samples each, batches of 2 prompts (a remainder of 1): every problem is graded
    once with its own 3 responses, and the rates are over all 7."""
    problems = syn.generate_problems(DEMO, 7, seed=3)
    rows = syn.dataset_rows(problems, "in_dist")
    by_prompt = {p.question: p for p in problems}
    n, stop = 3, 1
    width = 80

    def sampler(params, prompts, key, scfg):
        tokens = np.zeros((len(prompts) * n, width), np.int32)
        lengths = np.zeros(len(prompts) * n, np.int32)
        for i, ids in enumerate(prompts):
            p = by_prompt["".join(chr(t - 10) for t in ids)]
            # sample 0 right, sample 1 a bare lucky answer, sample 2 a wrong answer
            texts = [syn.solution_text(p), f"answer {p.answer}", f"answer {p.answer + 1}"]
            for s, text in enumerate(texts):
                ids_s = [ord(c) + 10 for c in text] + [stop]
                tokens[i * n + s, : len(ids_s)] = ids_s
                lengths[i * n + s] = len(ids_s)
        return types.SimpleNamespace(tokens=tokens, lengths=lengths)

    def grader(row, response):
        g = check_solution(row["ground_truth"], response)
        return {"outcome": g["outcome"], "process": g["outcome"] and g["process"], "lucky": g["lucky"]}

    task = types.SimpleNamespace(
        test_sets={"in_dist": rows},
        tokenizer=_EchoTokenizer(),
        encode_prompt=lambda r: [ord(c) + 10 for c in r["prompt"]],
        grade=grader,
    )
    scfg = sampling.SamplingConfig(n_samples=n, stop_ids=(stop,), temperature=1.0)
    records = []
    res = evaluation.evaluate(
        task, sampler, None, scfg, rng=jax.random.PRNGKey(0), batch_size=2 * n, ks=(1, 3), records=records
    )
    assert [r["index"] for r in records] == list(range(7))
    for rec, p in zip(records, problems):
        assert rec["responses"][0] == syn.solution_text(p)
    got = res["in_dist"]
    assert got["n_problems"] == 7
    assert got["outcome"] == pytest.approx(2 / 3)
    assert got["process"] == pytest.approx(1 / 3) and got["lucky"] == pytest.approx(1 / 3)
    assert got["pass@1"] == pytest.approx(2 / 3) and got["pass@3"] == pytest.approx(1.0)


def test_hold_out_distractor_math_keeps_the_distractor_sets_math_out_of_training():
    """A distractor problem's key hashes its distractor number, so by default (as in the stored
    results) most of the set's math is in a demo-sized training pool; clause_free=True (the config's
    task.hold_out_distractor_math) leaves it out, as base_key does for the leak sets."""
    tests = syn.test_sets(1000, 200, base=DEMO)

    def seen_in(train):
        train_math = {(tuple(s.op for s in p.steps), p.quantities) for p in train}
        return [p for p in tests["distractor"] if (tuple(s.op for s in p.steps), p.quantities) in train_math]

    default = syn.generate_problems(DEMO, 5000, seed=0, exclude=syn.problem_keys(tests))
    held_out = syn.generate_problems(DEMO, 5000, seed=0, exclude=syn.problem_keys(tests, clause_free=True))
    assert len(seen_in(default)) > 50  # the documented default: the overlap is large
    assert seen_in(held_out) == []
    # the key of the bare math is what an unclaused problem with that math has
    for p in tests["distractor"][:20]:
        bare = syn._math_key([s.op for s in p.steps], p.quantities, ())
        assert p.math_key == bare != p.key
    assert all(p.math_key == p.key for p in tests["in_dist"])


def test_the_demo_config_holds_out_distractor_math_only_when_asked(tmp_path):
    sys.path.insert(0, REPO)
    from clipo_jax import tasks
    from configs.demo import get_config

    plain = get_config("size=tiny")
    assert "hold_out_distractor_math" not in plain.task  # an absent key keeps existing SFT cache digests
    built = {}
    for name, arg in (("default", "size=tiny"), ("holdout", "size=tiny,holdout")):
        config = get_config(arg)
        config.task.update(train_size=3000, test_size=200)
        built[name] = tasks.build_task(config.task, str(tmp_path / name))

    def math_of(row):  # quantities and answer: what a problem's bare math determines
        gt = json.loads(row["ground_truth"])
        return tuple(gt["q"]), gt["a"]

    default = [r["ground_truth"] for r in built["default"].train_rows]
    held_out = [r["ground_truth"] for r in built["holdout"].train_rows]
    removed = [json.loads(gt) for gt in set(default) - set(held_out)]
    assert set(held_out) <= set(default) and len(removed) > 20
    distractor_math = {math_of(r) for r in built["default"].test_sets["distractor"]}
    # every problem the option removed has the bare math of a distractor test problem
    assert all((tuple(gt["q"]), gt["a"]) in distractor_math for gt in removed)
    assert built["holdout"].test_sets == built["default"].test_sets


@pytest.fixture(scope="module")
def decoy_hits(tmp_path_factory):
    """(task, [(leak_decoy row, response)]): responses whose steps are all valid arithmetic on the
    problem's quantities (a wrong choice of operations) and whose result is the decoy number."""
    sys.path.insert(0, REPO)
    from clipo_jax import tasks
    from configs.demo import get_config

    config = get_config("size=tiny,shortcut=0.5")
    config.task.test_size = 200  # the study's test size
    task = tasks.build_task(config.task, str(tmp_path_factory.mktemp("review")))
    hits = []
    for row in task.test_sets["leak_decoy"]:
        gt = json.loads(row["ground_truth"])
        hits += [(row, text) for text in _valid_chains_to(gt["q"], gt["l"])]
    return task, hits


def _valid_chains_to(quantities, target):
    """Chains over the quantities in their order, any of + - * per step, every step's arithmetic
    right, ending on ``target``."""
    for ops in itertools.product("+-*", repeat=len(quantities) - 1):
        value, texts = quantities[0], []
        for op, q in zip(ops, quantities[1:]):
            new = {"+": value + q, "-": value - q, "*": value * q}[op]
            texts.append(f"{value}{op}{q}={new}")
            value = new
        if value == target:
            yield " ; ".join([*texts, f"answer {value}"])


def test_decoy_is_reachable_by_valid_arithmetic_on_some_problems(decoy_hits):
    """Precondition of the xfail below: such responses exist and the verifier accepts their process."""
    _, hits = decoy_hits
    assert len({row["index"] for row, _ in hits}) >= 10
    for row, text in hits:
        graded = check_solution(row["ground_truth"], text)
        assert graded["process"] and not graded["outcome"]


def test_copied_unworked_does_not_fire_on_an_answer_the_response_computed(decoy_hits):
    """On leak_decoy, 'copied' (the answer is the clause's number) also fires on a response whose
    answer is the result of its own valid arithmetic; 'copied_unworked' does not, and still counts
    a bare copy and a chain that ends elsewhere."""
    task, hits = decoy_hits
    copied = [(row["index"], text) for row, text in hits if task.grade(row, text)["copied"]]
    assert len(copied) == len(hits)  # 'copied' counts them all
    unworked = [(row["index"], text) for row, text in hits if task.grade(row, text)["copied_unworked"]]
    assert unworked == [], f"{len(unworked)} computed answers graded as copied_unworked, e.g. {unworked[:2]}"
    row, text = hits[0]
    decoy = json.loads(row["ground_truth"])["l"]
    assert task.grade(row, f"answer {decoy}")["copied_unworked"]
    chain_elsewhere = text.rsplit(";", 1)[0].rsplit("=", 1)[0] + f"={decoy + 100} ; answer {decoy}"
    assert task.grade(row, chain_elsewhere)["copied_unworked"]
    assert "copied_unworked" in task.grade_keys


def test_a_workdir_tokenizer_trained_with_other_settings_is_an_error(tmp_path):
    """build_synthetic reused whatever tokenizer the workdir held: a config with another vocab_size
    or task seed silently kept the old one."""
    sys.path.insert(0, REPO)
    from clipo_jax import tasks
    from configs.demo import get_config

    config = get_config("size=tiny")
    config.task.update(train_size=200, test_size=20, sft_size=50)
    first = tasks.build_task(config.task, str(tmp_path))
    again = tasks.build_task(config.task, str(tmp_path))  # the same settings: reused
    assert again.tokenizer.vocab_size == first.tokenizer.vocab_size
    config.task.vocab_size = 600
    with pytest.raises(
        ValueError, match=r"the task tokenizer was trained with .*'vocab_size': 512.*use another --workdir"
    ):
        tasks.build_task(config.task, str(tmp_path))
