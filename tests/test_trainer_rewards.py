"""Reward terms inside the real trainer (tiny demo model), with the OpenRS pairwise term against
a real local HTTP judge (the rule server of test_judge_backend): judge metrics per step, a judge
that stays down ends the run with one line, and the same command then resumes."""

import json
import os

import pytest
from test_judge_backend import server  # noqa: F401  (the real local HTTP server fixture)

from clipo_jax import trainer


def tiny_config(url, model="m", steps=2, **judge):
    from configs import demo

    c = demo.get_config("size=tiny")
    c.rl.steps = steps
    c.sft.steps = 0
    c.progress_bar = False
    c.ckpt.every = 1
    c.eval.max_new_tokens = 4
    c.task.test_size = 2
    # at most 4 in flight: the test server listens with a backlog of 5 connections
    j = dict(backend="openai", base_url=url, model=model, max_retries=0, timeout_s=5.0, max_concurrency=4, **judge)
    c.reward.terms = {"verifiable": 1.0, "pvr": 0.5, "pairwise_rubric": 0.5}
    c.reward.pvr = {"ground_truth_weight": 0.0, "guardrail_weight": 1.0}
    c.reward.pairwise_rubric = {"method": "anchor", "anchor": "greedy", "judge": j, "down_after_steps": 1}
    return c


def read_metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_pairwise_judge_in_the_loop_logs_its_metrics(server, tmp_path):  # noqa: F811
    url, state = server
    out = trainer.run(tiny_config(url), str(tmp_path))
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2]
    G, P = 4, 4  # tiny: 4 prompts x 4 samples, each judged against its prompt's greedy decode
    for r in rows:
        assert r["reward/pairwise_rubric/pairs"] == G * P
        assert (
            r["reward/pairwise_rubric/calls"]
            + r["reward/pairwise_rubric/identical_free"]
            + r["reward/pairwise_rubric/duplicates"]
            + r["reward/pairwise_rubric/cache_hits"]
            == G * P
        )
        for k in ("same_ratio", "parse_failures", "backend_failures", "latency_mean_s", "share", "mean"):
            assert f"reward/pairwise_rubric/{k}" in r
        assert "reward/pvr/guardrail_flags_mean" in r and "actor/entropy" in r and "time/reward_wait" in r
    assert sum(r["reward/pairwise_rubric/failures"] for r in rows) == 0
    sent = sum(r["reward/pairwise_rubric/calls"] for r in rows)
    assert len(state.requests) == 2 * sent  # both orders of every judged pair, nothing else
    assert out["last_metrics"]["reward/pairwise_rubric/calls"] > 0


def test_a_judge_that_stays_down_is_one_line_and_the_run_resumes(server, tmp_path):  # noqa: F811
    url, state = server
    with pytest.raises(
        trainer.TrainingError, match=r"step 0: reward term 'pairwise_rubric': the judge failed all"
    ) as e:
        trainer.run(tiny_config(url, model="bad4xx"), str(tmp_path))
    assert "\n" not in str(e.value)
    assert not os.path.exists(os.path.join(tmp_path, "metrics.jsonl")) or not read_metrics(tmp_path)
    trainer.run(tiny_config(url), str(tmp_path))  # the judge is back: the same command resumes
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]


def test_bad_reward_config_fails_before_compilation(tmp_path):
    c = tiny_config("http://127.0.0.1:9")
    c.reward.terms = {"verifiable": 1.0, "nope": 1.0}
    with pytest.raises(trainer.TrainingError, match=r"unknown term\(s\) \['nope'\]"):
        trainer.run(c, str(tmp_path))
    c = tiny_config("http://127.0.0.1:9")  # nothing listens on port 9
    with pytest.raises(Exception, match=r"judge server http://127.0.0.1:9/v1 is unreachable"):
        trainer.run(c, str(tmp_path))
    assert not os.path.exists(os.path.join(tmp_path, "checkpoints"))


def kl_config(in_reward: bool):
    from configs import demo

    c = demo.get_config("size=tiny")
    c.rl.steps = 3
    c.progress_bar = False
    c.ckpt.every = 10
    c.eval.max_new_tokens = 4
    c.task.test_size = 2
    c.rl.warmup_steps = 0
    c.rl.entropy_coef = 0.01  # the params move even where every reward of a group is equal
    c.rl.kl_coef, c.rl.kl_estimator, c.rl.kl_in_reward = 0.5, "k1", in_reward
    return c


def test_kl_in_the_reward_shapes_the_reward_and_leaves_the_loss(tmp_path):
    trainer.run(kl_config(True), str(tmp_path / "reward"))
    rows = read_metrics(tmp_path / "reward")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[0]["kl_reward/kl_seq_mean"] == 0.0  # step 0: the policy is the reference
    assert any(abs(r["kl_reward/kl_seq_mean"]) > 1e-5 for r in rows[1:])
    for r in rows:
        assert "actor/kl" not in r  # no KL loss term
        # the reward the advantages see: the verifier's minus beta * the mean summed KL
        assert r["reward/mean"] == pytest.approx(
            r["reward/verifiable/mean"] - 0.5 * r["kl_reward/kl_seq_mean"], abs=1e-6
        )

    trainer.run(kl_config(False), str(tmp_path / "loss"))
    rows = read_metrics(tmp_path / "loss")
    assert all("kl_reward/kl_seq_mean" not in r and "actor/kl" in r for r in rows)
    assert all(r["reward/mean"] == pytest.approx(r["reward/verifiable/mean"]) for r in rows)
