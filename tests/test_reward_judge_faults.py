"""The pairwise_rubric reward term against a judge server that misbehaves in the ways real ones
do (a real OpenAI-compatible server on 127.0.0.1): an answer cut at max_tokens, a malformed
usage field, an unparseable answer followed by good ones; and the settings and data rows that
must fail with a one-line error. Each fault must be counted and must never become a verdict."""

import json

import ml_collections
import numpy as np
import pytest
from judge_server import JSONHandler, responses, serve

from clipo_jax.rewards.stage import RewardBatch, RewardContext, RewardError, RewardStage, merge_round_metrics


def _criterion(i, label, score, kind):
    return {"id": str(i), "title": "t", "type": kind, "evidence": "e", "reason": "r", "label": label, "score": score}


class FaultyJudge(JSONHandler):
    """The GOOD response wins two core criteria; the other wins one highlight, listed first.
    ``mode`` (a class attribute) picks the fault; constraint checks answer "no" for a response
    containing EMOJI."""

    mode = "ok"
    pair_requests = 0

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        user = body["messages"][-1]["content"]
        pair = responses(user)
        if pair is None:  # a yes / no constraint check on one response
            return self._send_chat(json.dumps({"answer": "no" if "EMOJI" in user else "yes"}))
        type(self).pair_requests += 1
        a, b = pair
        good, bad = ("A", "B") if "GOOD" in a and "GOOD" not in b else ("B", "A")
        if "GOOD" in a and "GOOD" in b:
            crits = [_criterion(1, "S", 0, "core")]
        else:
            crits = [_criterion(1, bad, 1, "highlight"), _criterion(2, good, 2, "core"), _criterion(3, good, 2, "core")]
        intent = {"task": "t", "explicit_requirements": [], "implicit_requirements": []}
        text = json.dumps({"intent": intent, "differences": [], "criteria": crits})
        usage = {"prompt_tokens": 10, "completion_tokens": 5}
        finish = "stop"
        if self.mode == "cut" and len(crits) > 1:  # max_tokens reached after the first criterion
            text, finish = text[: text.index(', {"id": "2"')], "length"
        elif self.mode == "bad_usage":
            usage = {"prompt_tokens": "n/a", "completion_tokens": [5]}
        elif self.mode == "junk":
            text = "I cannot decide."
        choice = {"message": {"role": "assistant", "content": text}, "finish_reason": finish}
        self._send(200, {"choices": [choice], "usage": usage})


@pytest.fixture
def judge_url():
    handler = type("H", (FaultyJudge,), {"mode": "ok", "pair_requests": 0})
    with serve(handler) as url:
        yield url, handler


def _stage(url, tmp_path, **term):
    judge = dict(backend="openai", base_url=url, model="m", max_retries=0, timeout_s=10.0, parse_attempts=1)
    judge.update(term.pop("judge", {}))
    block = {"method": "round_robin", "judge": judge, **term}
    cfg = ml_collections.ConfigDict(dict(terms={"pairwise_rubric": 1.0}, pairwise_rubric=block))
    return RewardStage.from_config(cfg, RewardContext(workdir=str(tmp_path)))  # the disk cache lives there


def _score(stage, texts, row=None, step=0):
    row = row or {"prompt": "p"}
    lengths = np.array([len(t) for t in texts])
    r = stage.compute(RewardBatch([row], texts, lengths, np.zeros(len(texts), bool), len(texts), None, step))
    metrics = {k.rsplit("/", 1)[-1]: v for k, v in r.metrics.items() if k.startswith("reward/pairwise_rubric/")}
    return r.per_term["pairwise_rubric"].tolist(), metrics


def test_an_answer_cut_at_max_tokens_is_a_counted_error_not_a_reversed_verdict(judge_url, tmp_path):
    url, handler = judge_url
    stage = _stage(url, tmp_path)
    try:
        assert _score(stage, ["GOOD one", "bad two"])[0] == [1.0, 0.0]  # the whole answer
        handler.mode = "cut"  # parsed, the first criterion alone would make "bad two" win
        values, m = _score(stage, ["GOOD three", "bad four"], step=1)
        assert values == [0.5, 0.5]  # an error counts as a tie (error_policy "tie")
        assert m["errors"] == 1 and m["parse_failures"] == 1 and m["failures"] == 2
    finally:
        stage.close()


def test_a_malformed_usage_field_still_gives_the_verdict(judge_url, tmp_path):
    url, handler = judge_url
    handler.mode = "bad_usage"
    stage = _stage(url, tmp_path, down_after_steps=1)
    try:
        for step in range(3):  # a down judge would end the run at the first step
            values, m = _score(stage, [f"GOOD {step}", f"bad {step}"], step=step)
            assert values == [1.0, 0.0] and m["errors"] == 0 and m["calls"] == 1
        backend = stage.terms["pairwise_rubric"].backend
        assert backend.stats.bad_usage == 6 and backend.stats.prompt_tokens == 0  # 2 directions x 3 steps
    finally:
        stage.close()


def test_an_unparseable_answer_is_not_replayed_from_the_disk_cache(judge_url, tmp_path):
    url, handler = judge_url
    handler.mode = "junk"
    stage = _stage(url, tmp_path)
    try:
        values, m = _score(stage, ["GOOD x", "bad y"])
        assert values == [0.5, 0.5] and m["parse_failures"] == 1
        handler.mode = "ok"  # the server recovers: the same pair is asked again, and judged
        values, m = _score(stage, ["GOOD x", "bad y"], step=1)
        assert values == [1.0, 0.0] and m["errors"] == 0
        assert handler.pair_requests == 4  # two directions, twice
    finally:
        stage.close()
    # a good answer is cached: a new stage on the same run directory (a resume) asks nothing
    stage = _stage(url, tmp_path)
    try:
        assert _score(stage, ["GOOD x", "bad y"], step=2)[0] == [1.0, 0.0]
        assert handler.pair_requests == 4
    finally:
        stage.close()


def test_typed_and_written_constraints_reach_the_judge_together(judge_url, tmp_path):
    """r0 breaks the typed limit, r1 the rule in words, r2 neither: r2 beats both on constraints
    and r0 vs r1 goes to the judge (both GOOD: a tie). Dropping every constraint when one is in
    words would let the GOOD responses win instead."""
    url, _ = judge_url
    row = {"prompt": "p", "constraints": [{"type": "word_count", "max": 5}, {"rule": "no emojis"}]}
    stage = _stage(url, tmp_path)
    try:
        values, m = _score(stage, ["GOOD a b c d e f", "GOOD EMOJI", "plain"], row=row)
        np.testing.assert_allclose(values, [0.25, 0.25, 1.0])
        assert m["errors"] == 0
        # IF-style constraints are the pvr term's: accepted here and left out of the judge's
        stage.check_rows([{"prompt": "p", "constraints": [{"id": "punctuation:no_comma", "kwargs": {}}]}])
        with_if = dict(row, constraints=row["constraints"] + [{"id": "punctuation:no_comma", "kwargs": {}}])
        assert _score(stage, ["GOOD a b c d e f", "GOOD EMOJI", "plain"], row=with_if, step=1)[0] == values
        with pytest.raises(RewardError, match="'constraints' must be a list"):
            stage.check_rows([{"prompt": "p", "constraints": [{"max": 5}]}])
        with pytest.raises(RewardError, match=r"unknown constraint type\(s\) \['max_words'\]"):
            stage.check_rows([{"prompt": "p", "constraints": [{"type": "max_words", "max": 5}]}])
    finally:
        stage.close()


@pytest.mark.parametrize(
    "term,message",
    [
        (dict(judge=dict(max_concurrency=0)), "judge.max_concurrency=0: must be >= 1"),
        (dict(judge=dict(max_retries=-1)), "judge.max_retries=-1: must be >= 0"),
        (dict(judge=dict(timeout_s="soon")), "judge.timeout_s='soon': must be a number > 0"),
        (dict(judge=dict(min_criteria=4, max_criteria=3)), "min_criteria=4 > judge.max_criteria=3"),
        (dict(bt_iters=0), "pairwise_rubric.bt_iters=0: must be >= 1"),
        (dict(down_after_steps=0), "down_after_steps=0: must be >= 1"),
    ],
)
def test_bad_judge_settings_are_one_line_errors(judge_url, tmp_path, term, message):
    url, _ = judge_url
    with pytest.raises(RewardError) as e:
        _stage(url, tmp_path, **term)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_an_anchor_outside_the_group_is_a_one_line_error(judge_url, tmp_path):
    url, _ = judge_url
    stage = _stage(url, tmp_path, method="anchor", anchor="sample", anchor_index=2)
    try:
        with pytest.raises(RewardError, match="anchor_index=2 is not a response of a group of 2"):
            _score(stage, ["GOOD", "bad"])
    finally:
        stage.close()


def test_bradley_terry_of_a_lone_response_is_zero_not_a_failure(judge_url, tmp_path):
    url, _ = judge_url
    stage = _stage(url, tmp_path, method="bradley_terry")
    try:
        values, m = _score(stage, ["GOOD"])
        assert values == [0.0] and m["failures"] == 0 and m["calls"] == 0
    finally:
        stage.close()


def test_dapo_rounds_sum_the_failure_counts():
    rounds = [
        {
            "reward/pairwise_rubric/errors": 3.0,
            "reward/checklist_rubric/judge_backend_failures": 4.0,
            "reward/mean": 1.0,
        },
        {
            "reward/pairwise_rubric/errors": 0.0,
            "reward/checklist_rubric/judge_backend_failures": 0.0,
            "reward/mean": 0.0,
        },
    ]
    m = merge_round_metrics(rounds)
    assert m["reward/pairwise_rubric/errors"] == 3.0
    assert m["reward/checklist_rubric/judge_backend_failures"] == 4.0
    assert m["reward/mean"] == 0.5  # not a count: averaged


def test_a_down_judge_is_counted_per_step_not_per_dapo_round(tmp_path):
    """Two rounds of one step with every call failing are one failed step."""
    from clipo_jax.rewards.judge_terms import _DownDetector

    down = _DownDetector("pairwise_rubric", 2)
    down.update(0, 4, 4, "timeout")
    down.update(0, 2, 2, "timeout")  # a DAPO refill of step 0: still one step
    down.update(1, 3, 1, "timeout")  # step 1: some calls succeed
    down.update(2, 3, 3, "timeout")
    with pytest.raises(RewardError, match="in 2 consecutive step"):
        down.update(3, 1, 1, "timeout")
