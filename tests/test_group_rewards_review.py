"""Review of the OpenRS group-reward path (aggregation -> verdict -> group rewards -> reward term):
order invariance, the verdict threshold, and config values that silently removed the signal.
The judge is a rule-based OpenAI-compatible server on 127.0.0.1 (``judge_server``)."""

import asyncio
import json
import re

import ml_collections
import numpy as np
import pytest
from judge_server import JSONHandler, responses, serve

from clipo_jax.rewards.stage import RewardBatch, RewardContext, RewardStage
from clipo_jax.rubrics import JudgeConfig, OpenAIHTTPBackend, PairwiseJudge
from clipo_jax.rubrics.aggregation import batch_verdicts, verdict
from clipo_jax.rubrics.group_rewards import GroupRewardConfig, group_rewards

SWAP = {"first": "second", "second": "first", "same": "same"}


def _quality(text: str) -> int:
    m = re.search(r"Q(\d+)", text)
    return int(m.group(1)) if m else 0


class QualityJudge(JSONHandler):
    """A wins one core criterion (score 2) iff its ``Q<n>`` is larger; equal ``n``: S, score 0."""

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        pair = responses(body["messages"][-1]["content"])
        if pair is None:
            return self._send_chat(json.dumps({"answer": "yes"}))
        qa, qb = (_quality(t) for t in pair)
        label = "A" if qa > qb else ("B" if qb > qa else "S")
        crit = {"id": "c1", "title": "t", "type": "core", "evidence": "e", "reason": "r", "label": label}
        crit["score"] = 0 if label == "S" else 2
        intent = {"task": "t", "explicit_requirements": [], "implicit_requirements": []}
        self._send_chat(json.dumps({"intent": intent, "differences": ["d"], "criteria": [crit]}))


@pytest.fixture
def judge_url():
    with serve(type("H", (QualityJudge,), {})) as url:
        yield url + "/v1"


def _group(url, texts, judge_config, group_config):
    async def go():
        judge = PairwiseJudge(OpenAIHTTPBackend(url, "m", max_retries=0), judge_config)
        try:
            return await group_rewards(judge, "p", texts, group_config)
        finally:
            await judge.backend.aclose()

    return asyncio.run(go())


# ----------------------------------------------------------------------------------------------
# Defect: a negative verdict threshold made every double tie a win of the first response.
# ----------------------------------------------------------------------------------------------


def test_verdict_threshold_below_zero_is_rejected_and_a_swap_swaps_the_verdict():
    # reference: spec section 4, written independently of aggregation.verdict
    def ref(f, b, m):
        return "first" if f > m and b <= -m else ("second" if f <= -m and b > m else "same")

    grid = [-2.0, -1.0, -0.5, 0.0, 0.25, 0.5, 1.0, 2.0]
    for m in (0.0, 0.5, 1.0):
        for f in grid:
            for b in grid:
                assert verdict(f, b, m) == ref(f, b, m)
                assert verdict(b, f, m) == SWAP[verdict(f, b, m)]  # swapping the pair swaps the verdict
    # m < 0: f = b = 0 (a tie in both orders) used to be "first", and so was the swapped pair
    for m in (-0.5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="min_score"):
            verdict(0.0, 0.0, m)
        with pytest.raises(ValueError, match="min_score"):
            batch_verdicts(np.zeros(3), np.zeros(3), m)
    np.testing.assert_array_equal(np.asarray(batch_verdicts(np.array([1.0, -1.0]), np.array([-1.0, 1.0]))), [1, -1])


def test_a_negative_threshold_no_longer_rewards_the_first_position_of_a_group(judge_url):
    """Three equally good responses: with min_score=-0.5 the response at index 0 got 1.0 and the
    one at index 2 got 0.0 (round robin). Now the threshold is refused when the config is made."""
    texts = ["Q1 a", "Q1 b", "Q1 c"]
    # refused where it is set: the judge's config, the logit judge and the CLI flag
    for bad in (-0.5, float("nan"), None, "x"):
        with pytest.raises(ValueError, match=r"^JudgeConfig: verdict threshold min_score must be a finite number >= 0"):
            JudgeConfig(parse_attempts=1, min_score=bad)
    ok = _group(judge_url, texts, JudgeConfig(parse_attempts=1), GroupRewardConfig("round_robin"))
    np.testing.assert_allclose(ok.rewards, [0.5, 0.5, 0.5])
    assert ok.n_errors == 0 and [v for _, _, v in ok.pairs] == ["same"] * 3


# ----------------------------------------------------------------------------------------------
# Defect: GroupRewardConfig(max_pairs=0) / (bt_iters=0) silently gave every response reward 0.
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw", [dict(max_pairs=0), dict(max_pairs=-1), dict(bt_iters=0), dict(max_pairs=1.5)])
def test_group_reward_config_rejects_values_that_remove_the_signal(kw):
    with pytest.raises(ValueError, match="must be an integer >= 1"):
        GroupRewardConfig(method="bradley_terry", **kw)


def test_group_reward_config_accepts_sampled_pairs(judge_url):
    texts = ["Q3 a", "Q1 b", "Q2 c"]
    res = _group(judge_url, texts, JudgeConfig(parse_attempts=1), GroupRewardConfig("bradley_terry", max_pairs=3))
    assert res.n_pairs_judged == 3 and res.rewards[0] > res.rewards[2] > res.rewards[1]
    assert GroupRewardConfig(max_pairs=None, bt_iters=1).max_pairs is None


# ----------------------------------------------------------------------------------------------
# Checks that held: order invariance and batch independence of the reward term.
# ----------------------------------------------------------------------------------------------


def _term(url, method):
    judge = dict(backend="openai", base_url=url, model="m", max_retries=0, timeout_s=5.0, max_concurrency=4)
    block = dict(method=method, anchor="sample", anchor_index=0, judge=dict(judge, parse_attempts=1))
    cfg = ml_collections.ConfigDict(dict(terms={"pairwise_rubric": 1.0}, pairwise_rubric=block))
    return RewardStage.from_config(cfg, RewardContext())


def _values(stage, groups):
    texts = [t for _, g in groups for t in g]
    G = len(groups[0][1])
    rows = [{"prompt": p} for p, _ in groups]
    batch = RewardBatch(rows, texts, np.ones(len(texts)), np.zeros(len(texts), bool), G)
    return stage.compute(batch).per_term["pairwise_rubric"]


@pytest.mark.parametrize("method", ["round_robin", "bradley_terry"])
def test_term_rewards_permute_with_the_group_and_ignore_other_groups(judge_url, method):
    texts = ["Q3 a", "Q1 b", "Q3 a", "Q2 c", "Q0 d"]  # a duplicate and a total order
    stage = _term(judge_url, method)
    try:
        base = _values(stage, [("p", texts)])
        perm = np.array([4, 2, 0, 3, 1])
        np.testing.assert_allclose(_values(stage, [("p", [texts[i] for i in perm])]), base[perm], atol=1e-5)
        other = ["Q9 z", "Q3 a", "Q1 b", "Q7 y", "Q3 a"]  # shares responses (and cache keys) with p
        np.testing.assert_allclose(_values(stage, [("other", other), ("p", texts)])[5:], base, atol=1e-5)
    finally:
        stage.close()
    assert base[0] == base[2] and base[0] > base[3] > base[1] > base[4]
