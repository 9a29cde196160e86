"""Error semantics: a pair with a direction that failed for good (backend) or never parsed is an
``"error"`` verdict, never decided by the other direction; what an error counts as is the
consumer's error policy (``"exclude"``: left out, JudgeBench / PPE accuracy; ``"tie"``: a tie,
RewardBench v2 and RL rewards).

Everything runs against a real OpenAI-compatible HTTP server on 127.0.0.1 whose answers depend on
the responses it is shown: the response containing GOOD wins; when the response in slot B
contains BREAK the answer is prose (never parses), when it contains DOWN the server answers
HTTP 500.  So for a pair (GOOD BREAK, bad) the forward direction (A = GOOD BREAK) parses and
prefers A, and only the backward direction fails: the old rule (a failed direction scores 0) would
have let the forward direction alone decide "first".
"""

import asyncio
import json
import os

import numpy as np
import pytest
from judge_server import JSONHandler, good_label, responses, rule_judgment, serve

from clipo_jax.rubrics import (
    ERROR_POLICIES,
    JudgeConfig,
    OpenAIHTTPBackend,
    PairInput,
    PairwiseJudge,
    apply_error_policy,
    summarise,
)
from clipo_jax.rubrics.group_rewards import GroupRewardConfig, group_rewards, pairwise_rewards


class Handler(JSONHandler):
    requests: list = None

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.requests.append(body)
        user = body["messages"][-1]["content"]
        pair = responses(user)
        if pair is None:
            return self._send(400, {"error": "not a judge prompt"})
        a, b = pair
        if "DOWN" in b:
            return self._send(500, {"error": "down"})
        if "BREAK" in b:
            content = "Response A is clearly better."  # no JSON at all
        else:
            content = json.dumps(rule_judgment(good_label(a, b)))
        self._send_chat(content)


@pytest.fixture()
def server():
    handler = type("H", (Handler,), {"requests": []})
    with serve(handler) as url:
        yield url, handler.requests


def make_judge(url, **kw):
    backend = OpenAIHTTPBackend(url, "m", max_retries=0, timeout_s=10.0)
    return PairwiseJudge(backend, JudgeConfig(parse_attempts=kw.pop("parse_attempts", 2), **kw))


def judge(url, pairs, **kw):
    j = make_judge(url, **kw)

    async def go():
        try:
            return await j.judge_pairs(pairs)
        finally:
            await j.backend.aclose()

    return asyncio.run(go()), j


# ----------------------------------------------------------------------------------------------
# The judge: a failed direction makes the pair an error.
# ----------------------------------------------------------------------------------------------


def test_unparseable_direction_is_an_error_not_decided_by_the_other(server):
    url, requests = server
    (res,), j = judge(url, [PairInput("q", "GOOD BREAK", "bad", pair_id="p")])
    assert res.forward.parse_ok and res.forward.score > 0  # alone, the forward order says "first"
    assert not res.backward.parse_ok and res.backward.error_kind == "parse" and res.backward.attempts == 2
    assert res.verdict == "error" and res.path == "pairwise" and res.is_error and res.failed
    assert j.counters.parse_failures == 1 and j.counters.error_pairs == 1
    assert len(requests) == 1 + 2  # the forward call, two attempts of the backward one


def test_backend_failure_is_an_error(server):
    url, _ = server
    (res,), j = judge(url, [PairInput("q", "GOOD DOWN", "bad")])
    assert res.forward.parse_ok and res.forward.score > 0
    assert res.backward.error_kind == "http" and res.verdict == "error" and res.failed
    assert j.counters.backend_failures == 1 and j.counters.error_pairs == 1


def test_an_error_inside_the_pair_is_an_error_verdict(server):
    url, requests = server
    (res,), j = judge(url, [PairInput("q", "GOOD", "bad", query_type=5)])  # routing raises
    assert res.verdict == "error" and res.path == "error" and "AttributeError" in res.pointwise["error"]
    assert j.counters.pair_errors == 1 and j.counters.error_pairs == 1 and requests == []


def test_healthy_pairs_are_unchanged(server):
    url, _ = server
    res, j = judge(url, [PairInput("q", "GOOD", "bad"), PairInput("q", "bad", "GOOD"), PairInput("q", "x", "y")])
    assert [r.verdict for r in res] == ["first", "second", "same"]
    assert not any(r.failed for r in res) and j.counters.error_pairs == 0


def test_error_policy_helper():
    assert ERROR_POLICIES == ("exclude", "tie")
    assert apply_error_policy("error", "tie") == "same" and apply_error_policy("error", "exclude") is None
    assert [apply_error_policy(v, "exclude") for v in ("first", "second", "same")] == ["first", "second", "same"]
    with pytest.raises(ValueError, match="error_policy"):
        apply_error_policy("first", "drop")
    with pytest.raises(ValueError, match="unknown verdict"):
        apply_error_policy("win", "tie")


# ----------------------------------------------------------------------------------------------
# Summary: accuracy with and without errors, and the error rate.
# ----------------------------------------------------------------------------------------------
# Three correct, one wrong, one tie, two errors; labels: the GOOD response is the correct one.
PAIRS = [
    (PairInput("q", "GOOD 1", "bad"), "first"),
    (PairInput("q", "bad", "GOOD 2"), "second"),
    (PairInput("q", "GOOD 3", "bad"), "first"),
    (PairInput("q", "GOOD 4", "bad"), "second"),  # a wrong label: the judge's verdict is a loss
    (PairInput("q", "x", "y"), "first"),  # a tie
    (PairInput("q", "GOOD BREAK", "bad"), "first"),  # error (parse)
    (PairInput("q", "bad", "GOOD DOWN"), "second"),  # error (backend)
]


def test_summary_under_both_policies(server):
    url, _ = server
    results, _ = judge(url, [p for p, _ in PAIRS])
    labels = [l for _, l in PAIRS]
    assert [r.verdict for r in results] == ["first", "second", "first", "first", "same", "error", "error"]
    ex = summarise(results, labels, error_policy="exclude")
    tie = summarise(results, labels, error_policy="tie")
    for s in (ex, tie):
        assert (s["n_pairs"], s["wins"], s["losses"], s["errors"]) == (7, 3, 1, 2)
        assert s["error_rate"] == pytest.approx(2 / 7)
        assert s["accuracy_without_errors"] == pytest.approx(3 / 4)  # errors left out, ties excluded
        assert s["accuracy_with_errors"] == pytest.approx(3 / 6)  # an error counted as a wrong verdict
        assert s["failed_pairs"] == 2
    assert ex["error_policy"] == "exclude" and tie["error_policy"] == "tie"
    # exclude: errors are not pairs of the benchmark; tie: they are ties.
    assert ex["accuracy"] == pytest.approx(3 / 4) and ex["same"] == 1 and ex["n_counted"] == 5
    assert ex["same_ratio"] == pytest.approx(1 / 5) and ex["accuracy_ties_as_wrong"] == pytest.approx(3 / 5)
    assert tie["accuracy"] == pytest.approx(3 / 4) and tie["same"] == 3 and tie["n_counted"] == 7
    assert tie["same_ratio"] == pytest.approx(3 / 7) and tie["accuracy_ties_as_wrong"] == pytest.approx(3 / 7)
    with pytest.raises(ValueError, match="error_policy"):
        summarise(results, labels, error_policy="nope")


def test_summary_when_everything_failed(server):
    url, _ = server
    results, _ = judge(url, [PairInput("q", "GOOD BREAK", "bad")])
    s = summarise(results, ["first"])
    assert s["errors"] == 1 and s["error_rate"] == 1.0 and s["accuracy"] == 0.0 and s["n_counted"] == 0
    assert s["accuracy_with_errors"] == 0.0 and s["accuracy_without_errors"] == 0.0


# ----------------------------------------------------------------------------------------------
# The CLI: --error_policy, summary.json.
# ----------------------------------------------------------------------------------------------


def test_cli_summary_reports_errors_per_policy(server, tmp_path):
    import subprocess
    import sys

    url, _ = server
    rows = [
        {"question_id": "a", "prompt": "q", "chosen": "GOOD a", "rejected": "bad"},
        {"question_id": "b", "prompt": "q", "chosen": "GOOD b", "rejected": "bad"},
        {"question_id": "c", "prompt": "q", "chosen": "bad c", "rejected": "GOOD c"},  # a loss
        {"question_id": "d", "prompt": "q", "chosen": "GOOD BREAK", "rejected": "bad"},  # an error
    ]
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = {}
    for policy in ERROR_POLICIES:
        d = tmp_path / policy
        cmd = [
            sys.executable,
            "-m",
            "experiments.judge",
            f"--input={inp}",
            f"--base_url={url}",
            "--model=m",
            f"--output_dir={d}",
            "--max_retries=0",
            "--parse_attempts=1",
            "--cache_dir=none",
            f"--error_policy={policy}",
        ]
        r = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        out[policy] = json.loads((d / "summary.json").read_text())
        assert "errors 1 (rate 0.250)" in r.stdout, r.stdout
        verdicts = [json.loads(l) for l in (d / "verdicts.jsonl").read_text().splitlines()]
        assert {v["pair_id"]: v["verdict"] == "error" for v in verdicts} == {
            "a": False,
            "b": False,
            "c": False,
            "d": True,
        }
    ex, tie = out["exclude"], out["tie"]
    assert ex["error_policy"] == "exclude" and tie["error_policy"] == "tie"
    for s in (ex, tie):
        assert s["errors"] == 1 and s["error_rate"] == 0.25
        assert s["accuracy_without_errors"] == pytest.approx(2 / 3)
        assert s["accuracy_with_errors"] == pytest.approx(2 / 4)
        assert s["judge"]["error_pairs"] == 1 and s["max_tokens"] == 8192
    assert ex["accuracy"] == pytest.approx(2 / 3) and ex["same"] == 0 and ex["n_counted"] == 3
    assert tie["accuracy"] == pytest.approx(2 / 3) and tie["same"] == 1 and tie["n_counted"] == 4
    assert ex["by_source"] == {"none": pytest.approx(2 / 3)}


# ----------------------------------------------------------------------------------------------
# RL: group rewards.
# ----------------------------------------------------------------------------------------------


def test_pairwise_rewards_error_policies():
    g = 3
    triples = [(0, 1, "first"), (0, 2, "error"), (1, 2, "second")]
    tie = pairwise_rewards("round_robin", g, triples, GroupRewardConfig(method="round_robin", error_policy="tie"))
    ex = pairwise_rewards("round_robin", g, triples, GroupRewardConfig(method="round_robin", error_policy="exclude"))
    # tie: 0 beat 1 and half-beat 2 -> 1.5/2; exclude: 0 played only 1 and won -> 1.0
    np.testing.assert_allclose(tie, [0.75, 0.0, 0.75])
    np.testing.assert_allclose(ex, [1.0, 0.0, 1.0])
    same = [(i, j, "same" if v == "error" else v) for i, j, v in triples]
    np.testing.assert_allclose(pairwise_rewards("round_robin", g, same, GroupRewardConfig()), tie)
    anchor = [(1, 0, "error"), (2, 0, "first")]
    for policy in ERROR_POLICIES:
        cfg = GroupRewardConfig(method="anchor", error_policy=policy)
        assert pairwise_rewards("anchor", g, anchor, cfg).tolist() == [0.0, 0.0, 1.0]
    bt_tie = pairwise_rewards("bradley_terry", g, triples, GroupRewardConfig(error_policy="tie"))
    bt_ex = pairwise_rewards("bradley_terry", g, triples, GroupRewardConfig(error_policy="exclude"))
    assert bt_ex[0] > bt_tie[0] and bt_ex[2] > bt_tie[2]  # an excluded comparison costs no half-loss
    with pytest.raises(ValueError, match="unknown verdict"):
        pairwise_rewards("round_robin", g, [(0, 1, "win")], GroupRewardConfig())
    with pytest.raises(ValueError, match="error_policy"):
        GroupRewardConfig(error_policy="skip")


def test_group_rewards_count_a_failed_pair_by_policy(server):
    url, _ = server
    responses = ["GOOD BREAK", "bad", "worse"]  # (0, 1) and (0, 2) fail in the backward order

    def run(policy):
        j = make_judge(url, parse_attempts=1)

        async def go():
            try:
                return await group_rewards(
                    j, "q", responses, GroupRewardConfig(method="round_robin", error_policy=policy)
                )
            finally:
                await j.backend.aclose()

        return asyncio.run(go())

    tie, ex = run("tie"), run("exclude")
    assert [v for _, _, v in tie.pairs] == ["error", "error", "same"]
    assert tie.n_errors == 2 and ex.n_errors == 2
    # tie: every pair a tie -> 0.5 each; exclude: only (1, 2) counts, a tie -> 0.5 for 1 and 2,
    # and 0 played nothing -> 0.5
    np.testing.assert_allclose(tie.rewards, [0.5, 0.5, 0.5])
    np.testing.assert_allclose(ex.rewards, [0.5, 0.5, 0.5])
    assert tie.same_ratio == pytest.approx(1.0) and ex.same_ratio == pytest.approx(1.0)


# ----------------------------------------------------------------------------------------------
# RL: the pairwise_rubric reward term.
# ----------------------------------------------------------------------------------------------


def _term_rewards(url, policy, responses):
    import ml_collections

    from clipo_jax.rewards.stage import RewardBatch, RewardContext, RewardStage

    judge = dict(backend="openai", base_url=url, model="m", max_retries=0, timeout_s=10.0, max_concurrency=4)
    judge["parse_attempts"] = 1
    block = dict(method="round_robin", judge=judge)
    if policy is not None:
        block["error_policy"] = policy
    cfg = ml_collections.ConfigDict(dict(terms={"pairwise_rubric": 1.0}, pairwise_rubric=block))
    stage = RewardStage.from_config(cfg, RewardContext())
    try:
        lengths = np.array([len(r) for r in responses])
        batch = RewardBatch([{"prompt": "p"}], responses, lengths, np.zeros(len(responses), bool), len(responses))
        return stage.compute(batch)
    finally:
        stage.close()


def test_reward_term_counts_errors_as_ties_by_default_and_marks_them_failed(server):
    url, _ = server
    responses = ["GOOD BREAK", "bad", "GOOD x", "bad y"]
    # (0, j): the order with GOOD BREAK in slot B never parses -> errors; among 1..3, GOOD x wins
    # and "bad" vs "bad y" is a tie.
    r = _term_rewards(url, None, responses)
    v = r.per_term["pairwise_rubric"]
    # tie: 0 has three half wins; 1: half (0) + loss (2) + half (3) = 1/3; 2: half + 2 wins = 5/6
    np.testing.assert_allclose(v, [0.5, 1 / 3, 5 / 6, 1 / 3])
    m = r.metrics
    assert m["reward/pairwise_rubric/errors"] == 3.0 and m["reward/pairwise_rubric/parse_failures"] == 3.0
    assert m["reward/pairwise_rubric/failures"] == 4.0  # every response rests on a failed pair
    assert m["reward/pairwise_rubric/same_ratio"] == pytest.approx(4 / 6)

    r = _term_rewards(url, "exclude", responses)
    v = r.per_term["pairwise_rubric"]
    # exclude: 0 played nothing (0.5); 1: loss + tie = 1/4; 2: two wins = 1; 3: loss + tie = 1/4
    np.testing.assert_allclose(v, [0.5, 0.25, 1.0, 0.25])
    assert r.metrics["reward/pairwise_rubric/same_ratio"] == pytest.approx(1 / 3)


def test_reward_term_rejects_an_unknown_policy(server):
    from clipo_jax.rewards.stage import RewardError

    url, _ = server
    with pytest.raises(RewardError, match="error_policy"):
        _term_rewards(url, "drop", ["a", "b"])
