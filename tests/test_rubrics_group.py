"""Group rewards for RL (OpenRS paper, arXiv 2602.14069: OpenRS as an RL reward) and the judge CLI, against the local canned HTTP server."""

import asyncio
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from test_judge_backend import server  # noqa: F401  (the real local HTTP server fixture)

from clipo_jax.rubrics import JudgeConfig, OpenAIHTTPBackend, PairwiseJudge
from clipo_jax.rubrics.group_rewards import GroupRewardConfig, fit_bradley_terry, group_rewards, pairwise_rewards

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def newton_bt_reference(wins, prior=0.1, iters=100):
    """Independent reference: Newton's method on the BT log-likelihood with the same prior,
    with the gauge fixed by pinning the last log-strength and centring at the end."""
    g = wins.shape[0]
    w = (wins + 0.5 * prior) * (1 - np.eye(g))
    n = w + w.T
    theta = np.zeros(g)
    for _ in range(iters):
        p = 1 / (1 + np.exp(-(theta[:, None] - theta[None, :])))  # P(i beats j)
        grad = (w - n * p).sum(1)
        hess = -(n * p * (1 - p))
        hess[np.diag_indices(g)] = -hess.sum(1)  # Laplacian of the information matrix
        h, gr = hess[:-1, :-1], grad[:-1]
        theta[:-1] += np.linalg.solve(h, gr)
    return theta - theta.mean()


def test_bradley_terry_matches_newton_reference():
    rng = np.random.default_rng(0)
    for g in (2, 4, 7):
        wins = rng.integers(0, 4, size=(g, g)).astype(np.float32) * (1 - np.eye(g, dtype=np.float32))
        got = np.asarray(fit_bradley_terry(wins, num_iters=500))
        np.testing.assert_allclose(got, newton_bt_reference(wins), atol=2e-3)


def test_bradley_terry_default_iterations_converge_on_a_total_order():
    """The slowest case for the MM fit: every response beats every later one. With its default
    iterations the fit (and so the group reward) is the likelihood optimum, for groups up to 32."""
    for g in (8, 16, 32):
        wins = np.triu(np.ones((g, g), np.float32), 1)
        np.testing.assert_allclose(np.asarray(fit_bradley_terry(wins)), newton_bt_reference(wins), atol=1e-3)


def test_bradley_terry_batched_and_ordering():
    # Response 0 beats everyone, 2 loses to everyone: strengths must be ordered.
    wins = np.array([[0, 1, 1], [0, 0, 1], [0, 0, 0]], np.float32)
    batch = np.stack([wins, wins.T])
    out = np.asarray(fit_bradley_terry(batch))
    assert out.shape == (2, 3) and out[0, 0] > out[0, 1] > out[0, 2] and out[1, 2] > out[1, 1] > out[1, 0]
    np.testing.assert_allclose(out.mean(-1), 0, atol=1e-5)


def test_pairwise_reward_formulas():
    cfg = GroupRewardConfig()
    triples = [(0, 1, "first"), (0, 2, "same"), (1, 2, "second")]
    np.testing.assert_allclose(pairwise_rewards("round_robin", 3, triples, cfg), [0.75, 0.0, 0.75])
    anchor = [(1, 0, "first"), (2, 0, "second"), (3, 0, "same")]
    np.testing.assert_allclose(pairwise_rewards("anchor", 4, anchor, cfg), [0, 1, -1, 0])
    with pytest.raises(ValueError, match="unknown group reward method"):
        pairwise_rewards("elo", 3, triples, cfg)


@pytest.mark.parametrize("method", ["anchor", "round_robin", "bradley_terry"])
def test_group_rewards_over_http(server, method):  # noqa: F811
    url, st = server
    judge = PairwiseJudge(OpenAIHTTPBackend(url, "slow-ok"), JudgeConfig())
    responses = ["bad", "GOOD", "bad", "meh"]
    res = asyncio.run(group_rewards(judge, "q?", responses, GroupRewardConfig(method=method, anchor_index=0)))
    assert np.argmax(res.rewards) == 1  # the canned judge prefers GOOD
    n_pairs = 3 if method == "anchor" else 6
    assert len(res.pairs) == n_pairs
    # one call per pair of distinct texts: "bad" vs "bad" needs none, and "bad"/"GOOD" met at two
    # positions (and in both orders) is judged once
    distinct = {frozenset((responses[i], responses[j])) for i, j, _ in res.pairs if responses[i] != responses[j]}
    assert res.n_pairs_judged == len(distinct) == (2 if method == "anchor" else 3)
    assert res.n_pairs_deduplicated == n_pairs - len(distinct)
    if method != "anchor":  # the anchor's own reward is not comparable with the others'
        assert res.rewards[0] == res.rewards[2]  # identical responses, identical rewards
    assert 0 < res.same_ratio < 1
    # Two HTTP calls (both orders) per judged pair.
    assert len(st.requests) == 2 * res.n_pairs_judged


def test_group_rewards_pvr_terms(server):  # noqa: F811
    url, st = server
    judge = PairwiseJudge(OpenAIHTTPBackend(url, "slow-ok"), JudgeConfig(use_ground_truth=False))
    loop = "again and again and again " * 20
    cfg = GroupRewardConfig(method="round_robin", ground_truth_weight=1.0, guardrail_weight=2.0)
    res = asyncio.run(group_rewards(judge, "2+2?", ["\\boxed{4}", "\\boxed{5}", loop], cfg, ground_truth="4"))
    expected = res.pairwise + np.array([1, -1, -1]) - 2 * np.array([0, 0, 1])
    np.testing.assert_allclose(res.rewards, expected)


def test_group_ground_truth_term_uses_the_query_types_kind(server):  # noqa: F811
    """The ground-truth term used to score with kind "auto" (the math verifier) whatever the
    query type: a reasoning answer in **bold** (the judge's kind there) scored -1 even when right."""
    url, st = server
    judge = PairwiseJudge(OpenAIHTTPBackend(url, "slow-ok"), JudgeConfig())
    responses = ["After checking each suspect, the thief is **Alice**.", "The thief is **Bob**."]
    cfg = GroupRewardConfig(method="round_robin", ground_truth_weight=1.0)
    res = asyncio.run(
        group_rewards(judge, "Who?", responses, cfg, query_type="livebench-reasoning", ground_truth="Alice")
    )
    np.testing.assert_allclose(res.rewards - res.pairwise, [1, -1])
    assert res.rewards[0] > res.rewards[1]


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "experiments.judge", *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )


def test_cli_end_to_end_and_resume(server, tmp_path):  # noqa: F811
    url, st = server
    rows = [
        {
            "question_id": f"q{i}",
            "query_type": "chat",
            "prompt": f"question {i}",
            "chosen": f"GOOD {i}",
            "rejected": f"bad {i}",
        }
        for i in range(4)
    ]
    inp = tmp_path / "in.jsonl"
    inp.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "out"
    common = [f"--input={inp}", f"--base_url={url}", "--model=slow-ok", f"--output_dir={out}", "--cache_dir=none"]
    r = run_cli(*common, "--limit=3")
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_pairs"] == 3 and summary["accuracy"] == 1.0 and summary["calls"] == 6
    for key in ("same_ratio", "parse_failure_rate", "wall_s", "prompt_tokens"):
        assert key in summary
    # Resume with all 4: only the new pair is judged, nothing is re-asked.
    r = run_cli(*common, "--resume")
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    lines = (out / "verdicts.jsonl").read_text().splitlines()
    assert summary["n_pairs"] == 4 and summary["judged_this_run"] == 1 and len(lines) == 4
    assert len({json.loads(l)["pair_id"] for l in lines}) == 4


def test_cli_bad_row_names_file_and_line(tmp_path):
    inp = tmp_path / "bad.jsonl"
    inp.write_text(
        json.dumps({"prompt": "p", "chosen": "c", "rejected": "r"}) + "\n" + json.dumps({"prompt": "p"}) + "\n"
    )
    r = run_cli(
        f"--input={inp}", "--base_url=http://127.0.0.1:9", "--model=m", f"--output_dir={tmp_path}/o", "--max_retries=0"
    )
    # the bad row is named, skipped and listed; the good one is judged (here: a counted backend failure)
    assert r.returncode == 0 and f"{inp}:2: field 'chosen'" in r.stderr, r.stderr[-2000:]
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert [row["line"] for row in summary["invalid_rows"]] == [2] and summary["n_pairs"] == 1
