"""Resume and checkpoint faults, each with the real components (orbax, files, the SFT code):

- a step that orbax finished but that has no manifest yet (the run was killed during the step
  after it, before ``commit``) is sealed and resumed from, not rejected with ``ckpt.every`` steps
  of work (the end-to-end kill is in tests/test_reproducibility.py);
- a save that fails (a file-size limit here, like a full disk) is one CheckpointError naming the
  step and the cause, raised once: the trainer's final wait neither raises a FileNotFoundError
  over it nor writes a manifest for a step that does not exist; the steps before it resume;
- a manifest written over the temporary file of a killed ``write_manifest`` does not list it;
- SFT: a config that leaves no pair, or fewer pairs than a batch, and a failed save of the SFT
  cache are one-line SFTErrors.
"""

import json
import logging
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clipo_jax import checkpoints, parallel, sft, trainer
from clipo_jax.checkpoints import MANIFEST, REJECTED, RunCheckpoints

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tree(step):
    return {"w": jnp.full((64, 32), float(step), jnp.float32), "b": jnp.arange(8, dtype=jnp.int32) + step}


def meta(step):
    return {"data_position": 10 * step, "consecutive_skips": 0, "counters": {"empty_batches": step}}


def save(ckpt, step):
    ckpt.save(step, {"params": tree(step)}, tree(-step), {"h": jnp.ones((3,))}, meta(step))


def reopen(workdir, caplog, keep=3):
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="clipo_jax.checkpoints"):
        ckpt = RunCheckpoints(str(workdir), keep)
    return ckpt, [r.getMessage() for r in caplog.records if r.name == "clipo_jax.checkpoints"]


def restore(ckpt, step):
    return ckpt.restore(step, {"params": tree(0)}, tree(0), {"h": jnp.zeros((3,))})


# ----------------------------------------------------------------------- saved, no manifest yet
def test_a_step_saved_before_its_manifest_is_sealed_and_resumed_from(tmp_path, caplog):
    ckpt = RunCheckpoints(str(tmp_path), 3)
    for s in (0, 2, 4):
        save(ckpt, s)
    ckpt.wait()
    save(ckpt, 6)
    ckpt.manager.wait_until_finished()  # killed in the next step: orbax finished, commit() never ran
    d = tmp_path / "checkpoints"
    assert (d / "6").is_dir() and not (d / "6" / MANIFEST).exists()

    # evaluation reads the newest step and writes nothing
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="clipo_jax.checkpoints"):
        params = trainer.restore_params(str(tmp_path), tree(0))
    np.testing.assert_array_equal(params["w"], np.full((64, 32), 6.0))
    assert any("checkpoint step 6" in r.getMessage() and "used without one" in r.getMessage() for r in caplog.records)
    assert not (d / "6" / MANIFEST).exists()

    ckpt, lines = reopen(tmp_path, caplog)
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"checkpoint step 6 in {d}: saved completely"), lines[0]
    assert MANIFEST in lines[0] and lines[0].endswith("written now, resuming from it"), lines[0]
    assert ckpt.latest_step() == 6 and checkpoints.step_dirs(str(d)) == [0, 2, 4, 6]
    assert not (tmp_path / REJECTED).exists()
    assert checkpoints.verify_step(str(d / "6")) is None
    state, ref, _, m = restore(ckpt, 6)
    np.testing.assert_array_equal(state["params"]["w"], np.full((64, 32), 6.0))
    np.testing.assert_array_equal(ref["b"], np.arange(8) - 6)
    assert m == meta(6)
    ckpt, lines = reopen(tmp_path, caplog)  # sealed once: a good step from now on
    assert lines == [] and ckpt.latest_step() == 6


def test_a_manifest_written_over_a_killed_writes_temporary_file_verifies(tmp_path, caplog):
    ckpt = RunCheckpoints(str(tmp_path), 3)
    for s in (0, 2):
        save(ckpt, s)
    ckpt.wait()
    step_dir = tmp_path / "checkpoints" / "2"
    os.remove(step_dir / MANIFEST)
    (step_dir / (MANIFEST + ".tmp")).write_text('{"files": {"state/_METAD')  # killed inside write_manifest
    checkpoints.write_manifest(str(step_dir))  # it listed its own temporary file, gone after the rename
    assert checkpoints.verify_step(str(step_dir)) is None
    with open(step_dir / MANIFEST) as f:
        assert not [k for k in json.load(f)["files"] if MANIFEST in k]

    os.remove(step_dir / MANIFEST)  # the same through a restart: sealed, then good
    (step_dir / (MANIFEST + ".tmp")).write_text('{"files": {"state/_METAD')
    ckpt, lines = reopen(tmp_path, caplog)
    assert len(lines) == 1 and "saved completely" in lines[0] and ckpt.latest_step() == 2
    ckpt, lines = reopen(tmp_path, caplog)
    assert lines == [] and ckpt.latest_step() == 2


# ----------------------------------------------------------------------- a save that fails
FAILING_SAVE = r"""
import json, resource, signal, sys
import jax.numpy as jnp, numpy as np
from clipo_jax.checkpoints import RunCheckpoints

def tree(n, seed):  # random floats: orbax's zstd does not shrink them under the limit
    return {"w": jnp.asarray(np.random.default_rng(seed).normal(size=n).astype(np.float32))}

meta = {"data_position": 0, "consecutive_skips": 0, "counters": {}}
ckpt = RunCheckpoints(sys.argv[1], 2)
ckpt.save(0, tree(100, 0), tree(100, 1), tree(3, 2), meta)
ckpt.wait()
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
ckpt.save(2, tree(500_000, 3), tree(100, 4), tree(3, 5), meta)
out = {}
for name, call in (("commit", ckpt.commit), ("wait", ckpt.wait)):  # the trainer's loop, then its finally
    try:
        call()
        out[name] = None
    except Exception as e:
        out[name] = f"{type(e).__name__}: {e}"
print("RESULT " + json.dumps(out), flush=True)
"""


def test_a_failed_save_is_one_error_once_and_the_run_resumes_before_it(tmp_path, caplog):
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    r = subprocess.run(
        [sys.executable, "-c", FAILING_SAVE, str(tmp_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, (r.returncode, r.stdout[-2000:], r.stderr[-3000:])
    out = json.loads(lines[0][len("RESULT ") :])
    d = tmp_path / "checkpoints"
    err = out["commit"]
    assert err and err.startswith(f"CheckpointError: checkpoint step 2 in {d}: the save failed ("), err
    assert "File too large" in err and "re-run the same command to resume" in err and "\n" not in err, err
    assert "tensorstore_spec" not in err
    assert out["wait"] is None, out["wait"]  # was: FileNotFoundError .../2/sha256_manifest.json.tmp
    assert not (d / "2").exists()

    ckpt, warned = reopen(tmp_path, caplog, keep=2)  # the limit is gone: resume from step 0
    assert warned == [] and ckpt.latest_step() == 0
    ckpt.save(2, tree(2), tree(-2), {"h": jnp.ones((3,))}, meta(2))
    ckpt.wait()
    assert checkpoints.step_dirs(str(d)) == [0, 2] and checkpoints.verify_step(str(d / "2")) is None


# ----------------------------------------------------------------------- SFT
@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"max_len": 5}, "config.sft.max_len=5: every one of the 200 SFT pairs of task 'synthetic' is longer"),
        ({"batch_size": 300}, "config.sft.batch_size=300 is larger than the 200 SFT pairs of task 'synthetic'"),
    ],
)
def test_sft_config_that_leaves_too_few_pairs_is_one_line(tiny, tmp_path, overrides, message):
    config, task, cfg, params = tiny
    config = config.copy_and_resolve_references()
    config.sft.update(overrides)
    with pytest.raises(sft.SFTError) as e:  # was: max() arg is an empty sequence / Cannot take a larger sample
        sft.run_sft(config, task, cfg, params, parallel.make_mesh(), str(tmp_path))
    assert str(e.value).startswith(message), str(e.value)
    assert "\n" not in str(e.value)


# experiments.train under a 20 kB file-size limit (set before exec: the limit and the ignored
# SIGXFSZ carry over, so a longer write fails with EFBIG, as on a full disk)
LIMITED_TRAIN = r"""
import os, resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
os.execv(sys.executable, [sys.executable, "-m", "experiments.train", *sys.argv[1:]])
"""


def test_a_failed_sft_cache_save_is_one_line_naming_the_cache(tmp_path):
    """The SFT parameters (about 75 kB here) do not fit a 20 kB file-size limit; the task's
    tokenizer and the run's JSON files do."""
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    cmd = [
        sys.executable,
        "-c",
        LIMITED_TRAIN,
        "--config=configs/demo.py:size=tiny",
        "--config.progress_bar=False",
        "--config.sft.steps=2",
        f"--workdir={tmp_path}",
    ]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 1, r.stderr[-3000:]
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1, r.stderr[-3000:]
    assert errors[0].startswith(f"error: SFT cache {tmp_path}/sft/"), errors[0]
    assert "/params: saving the trained parameters failed (" in errors[0] and "File too large" in errors[0], errors[0]
    assert not [p for p in os.listdir(tmp_path / "sft") if os.path.exists(tmp_path / "sft" / p / "params")]


# ----------------------------------------------------------------------- the run's config record
def test_a_refused_resume_keeps_the_runs_config_and_restore_params_checks_shapes(tmp_path):
    from clipo_jax import tasks
    from configs import demo

    def config(n_layers):
        c = demo.get_config("size=tiny")
        c.rl.steps, c.sft.steps, c.ckpt.every = 1, 0, 1
        c.progress_bar = False
        c.eval.max_new_tokens, c.task.test_size = 4, 2
        c.model.n_layers = n_layers
        return c

    trainer.run(config(1), str(tmp_path))
    record = (tmp_path / "config.json").read_text()
    assert json.loads(record)["model"]["n_layers"] == 1
    with pytest.raises(trainer.TrainingError):  # a 2-layer model cannot resume a 1-layer run
        trainer.run(config(2), str(tmp_path))
    # the refused command left the run's record alone (evaluate --run builds its model from it)
    assert (tmp_path / "config.json").read_text() == record
    assert not (tmp_path / "config.prev.json").exists()

    task = tasks.build_task(config(2).task, str(tmp_path))
    _, two_layers = trainer.build_model(config(2), task.tokenizer.vocab_size, jax.random.key(0))
    with pytest.raises(trainer.TrainingError, match=r"parameters do not match the run's model config \(.* is \(1, "):
        trainer.restore_params(str(tmp_path), two_layers)
    _, one_layer = trainer.build_model(config(1), task.tokenizer.vocab_size, jax.random.key(0))
    restored = trainer.restore_params(str(tmp_path), one_layer)
    assert jax.tree.structure(restored) == jax.tree.structure(one_layer)
