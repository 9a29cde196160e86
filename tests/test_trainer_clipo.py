"""The CLIPO hook inside the real trainer: the contrastive reward is added before the advantage."""

import dataclasses
import json
import os

import pytest

from clipo_jax import tasks, trainer
from clipo_jax.rewards import list_rewards, register_reward


def _even_length_reward(response, ground_truth, **row):
    return 1.0 if len(response) % 2 == 0 else 0.0  # about half the random rollouts succeed


if "test_even_length" not in list_rewards():
    register_reward("test_even_length")(_even_length_reward)


def _build_even_task(cfg, workdir):
    task = tasks.build_synthetic(cfg, workdir)
    rows = [dict(r, reward_fn="test_even_length") for r in task.train_rows]
    return dataclasses.replace(task, train_rows=rows)


if "test_even" not in tasks.TASKS:
    tasks.register_task("test_even")(_build_even_task)


@pytest.mark.parametrize("algo", ["grpo", pytest.param("gspo", marks=pytest.mark.slow)])
def test_clipo_reward_reaches_the_advantage(tmp_path, algo):
    from configs import demo

    c = demo.get_config(f"size=tiny,clipo,algo={algo}")
    c.task.name = "test_even"
    c.rl.steps = 2
    c.sft.steps = 0
    c.clipo.d_out = 8
    c.progress_bar = False
    out = trainer.run(c, str(tmp_path))
    rows = [json.loads(l) for l in open(os.path.join(tmp_path, "metrics.jsonl"))]
    assert len(rows) == 2
    for r in rows:
        assert r["contrastive/num_anchors"] > 0  # correct responses with positives and negatives
        # reward = outcome + contrastive reward (<= 0, only on correct responses)
        assert r["reward/mean"] == pytest.approx(r["reward/outcome_mean"] + r["contrastive/reward_mean"], abs=1e-5)
        assert r["contrastive/reward_mean"] < 0
        assert r["clipo/reward/incorrect/min"] == 0.0 and r["clipo/reward/incorrect/max"] == 0.0
        assert -0.5 <= r["clipo/reward/correct/min"] <= r["clipo/reward/correct/max"] <= 0.0
    # the head was trained and checkpointed with the run
    assert int(out["state"].step) == 2


def test_clipo_warmup_freezes_policy(tmp_path):
    from configs import demo

    c = demo.get_config("size=tiny,clipo")
    c.task.name = "test_even"
    c.rl.steps, c.sft.steps, c.clipo.warmup_steps, c.progress_bar = 2, 0, 2, False
    out = trainer.run(c, str(tmp_path))
    rows = [json.loads(l) for l in open(os.path.join(tmp_path, "metrics.jsonl"))]
    assert all(r["actor/frozen"] == 1.0 for r in rows)
    assert int(out["state"].step) == 0  # no policy update during the warmup
    assert all(r["contrastive/num_anchors"] > 0 for r in rows)


def test_clipo_head_export_load_and_label_metrics(tmp_path):
    """export_every writes the head every n steps; head_init_path starts a new run from such a file;
    per-label metrics are logged with log_geometry off."""
    import numpy as np

    from clipo_jax import contrastive
    from configs import demo

    c = demo.get_config("size=tiny,clipo")
    c.task.name = "test_even"
    c.rl.steps, c.sft.steps, c.progress_bar = 2, 0, False
    c.clipo.d_out, c.clipo.export_every, c.clipo.log_geometry = 8, 1, False
    first = tmp_path / "first"
    trainer.run(c, str(first))
    files = sorted(os.listdir(first / "clipo_head"))
    assert files == ["step_1.safetensors", "step_2.safetensors"]
    rows = [json.loads(l) for l in open(first / "metrics.jsonl")]
    assert all("clipo/loss/correct/mean" in r and "clipo/count/incorrect" in r for r in rows)
    assert not any(k.startswith("clipo/geometry") for r in rows for k in r)
    cfg = contrastive.ContrastiveConfig(group_size=c.rl.group_size, d_out=8)
    hidden = c.model.d_model
    h1, h2 = (contrastive.load_head(str(first / "clipo_head" / f), hidden, cfg) for f in files)
    assert not np.allclose(h1["proj"]["kernel"], h2["proj"]["kernel"])  # the head trained between exports

    # a second run starts from the exported head; with a fixed head its first export is that head
    c.clipo.head_init_path = str(first / "clipo_head" / "step_2.safetensors")
    c.clipo.fixed_head, c.rl.steps = True, 1
    second = tmp_path / "second"
    trainer.run(c, str(second))
    again = contrastive.load_head(str(second / "clipo_head" / "step_1.safetensors"), hidden, cfg)
    np.testing.assert_array_equal(again["proj"]["kernel"], h2["proj"]["kernel"])

    c.clipo.head_init_path = str(tmp_path / "missing.safetensors")
    with pytest.raises(trainer.TrainingError, match="head_init_path"):
        trainer.run(c, str(tmp_path / "third"))
