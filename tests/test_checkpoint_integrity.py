"""Checkpoint manifests: every saved step carries the sha256 of each of its files; a corrupt,
partial or unreadable newest step is reported in one line naming the step and the file, moved to
checkpoints.rejected/, and the run resumes from the newest good step (or starts fresh). A step
that orbax finished but that has no manifest yet is sealed and used (tests/test_resume_review.py)."""

import json
import logging
import os
import shutil
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from clipo_jax import checkpoints
from clipo_jax.checkpoints import MANIFEST, RunCheckpoints

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tree(step):
    return {"w": jnp.full((64, 32), float(step), jnp.float32), "b": jnp.arange(8, dtype=jnp.int32) + step}


def meta(step):
    return {"data_position": 10 * step, "consecutive_skips": 0, "counters": {"empty_batches": step}}


def save_steps(workdir, steps, keep=3):
    ckpt = RunCheckpoints(str(workdir), keep)
    for s in steps:
        ckpt.save(s, tree(s), tree(-s), {"h": jnp.ones((3,))}, meta(s))
    ckpt.wait()
    return ckpt


def reopen(workdir, caplog, keep=3):
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="clipo_jax.checkpoints"):
        ckpt = RunCheckpoints(str(workdir), keep)
    lines = [r.getMessage() for r in caplog.records if r.name == "clipo_jax.checkpoints"]
    return ckpt, lines


def restore(ckpt, step):
    return ckpt.restore(step, tree(0), tree(0), {"h": jnp.zeros((3,))})


def largest_chunk(step_dir):
    """The biggest file of the state item's data (an OCDBT chunk under state/.../d/)."""
    files = [
        os.path.join(root, f) for root, _, fs in os.walk(os.path.join(step_dir, "state")) for f in fs if "/d" in root
    ]
    return max(files, key=os.path.getsize)


@pytest.fixture
def run4(tmp_path):
    save_steps(tmp_path, [0, 2, 4])
    return tmp_path, tmp_path / "checkpoints"


def test_every_step_gets_a_manifest_that_matches(run4):
    _, d = run4
    assert checkpoints.step_dirs(str(d)) == [0, 2, 4]
    for s in (0, 2, 4):  # the last step too: wait() commits the in-flight save
        with open(d / str(s) / MANIFEST) as f:
            files = json.load(f)["files"]
        assert any(k.startswith("state/") for k in files) and "meta/metadata" in files
        assert checkpoints.verify_step(str(d / str(s))) is None


def test_good_newest_step_restores_without_warnings(run4, caplog):
    workdir, _ = run4
    ckpt, lines = reopen(workdir, caplog)
    assert lines == [] and ckpt.latest_step() == 4
    state, ref, _, m = restore(ckpt, 4)
    np.testing.assert_array_equal(state["w"], np.full((64, 32), 4.0))
    assert m == meta(4)


def flip_byte(step_dir):
    path = largest_chunk(step_dir)
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0x01]))
    return os.path.relpath(path, step_dir), "sha256 differs"


def truncate(step_dir):
    path = largest_chunk(step_dir)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    return os.path.relpath(path, step_dir), "truncated"


def delete_state(step_dir):
    shutil.rmtree(os.path.join(step_dir, "state"))
    return "state/", "missing"


def empty_dir(step_dir):
    shutil.rmtree(step_dir)
    os.makedirs(step_dir)
    return MANIFEST, "the save did not complete"


def no_manifest_uncommitted(step_dir):  # no manifest and no orbax commit marker: not a finished save
    os.remove(os.path.join(step_dir, MANIFEST))
    os.remove(os.path.join(step_dir, checkpoints.ORBAX_COMMITTED))
    return MANIFEST, "the save did not complete"


def meta_wrong_types(step_dir):
    path = os.path.join(step_dir, "meta", "metadata")
    with open(path, "w") as f:
        json.dump({"data_position": "40", "consecutive_skips": 0, "counters": {}}, f)
    return "meta/metadata", f"in {MANIFEST} (truncated or overwritten)"  # another size


def meta_wrong_types_consistent_manifest(step_dir):  # a step written with bad meta by a faulty writer
    meta_wrong_types(step_dir)
    checkpoints.write_manifest(step_dir)
    return "meta/metadata", "data_position='40' is not an integer >= 0"


def manifest_garbage(step_dir):
    with open(os.path.join(step_dir, MANIFEST), "w") as f:
        f.write("{not json")
    return MANIFEST, "unreadable"


def manifest_wrong_shape(step_dir):  # JSON, but 'files' is not an object (was an AttributeError traceback)
    with open(os.path.join(step_dir, MANIFEST), "w") as f:
        f.write('{"files": null}')
    return MANIFEST, "unreadable (TypeError)"


CORRUPTIONS = [
    flip_byte,
    truncate,
    delete_state,
    empty_dir,
    no_manifest_uncommitted,
    meta_wrong_types,
    meta_wrong_types_consistent_manifest,
    manifest_garbage,
    manifest_wrong_shape,
]


@pytest.mark.parametrize("corrupt", CORRUPTIONS, ids=[c.__name__ for c in CORRUPTIONS])
def test_bad_newest_step_is_reported_once_and_the_previous_good_one_restores(run4, caplog, corrupt):
    workdir, d = run4
    fname, why = corrupt(str(d / "4"))
    ckpt, lines = reopen(workdir, caplog)
    assert len(lines) == 1, lines
    line = lines[0]
    assert line.startswith(f"checkpoint step 4 in {d} is unusable: "), line
    assert fname in line and why in line, line
    assert line.endswith(f"moved to {workdir / 'checkpoints.rejected' / '4'}"), line
    assert "\n" not in line
    assert ckpt.latest_step() == 2
    assert checkpoints.step_dirs(str(d)) == [0, 2]
    state, ref, head, m = restore(ckpt, 2)
    np.testing.assert_array_equal(state["w"], np.full((64, 32), 2.0))
    np.testing.assert_array_equal(ref["b"], np.arange(8) - 2)
    assert m == meta(2)
    # training goes on from step 2: step 4 is written again, next to the rejected copy
    ckpt.save(4, tree(40), tree(-40), {"h": jnp.ones((3,))}, meta(4))
    ckpt.wait()
    ckpt, lines = reopen(workdir, caplog)
    assert lines == [] and ckpt.latest_step() == 4
    np.testing.assert_array_equal(restore(ckpt, 4)[0]["w"], np.full((64, 32), 40.0))


def test_several_bad_steps_fall_back_past_each_with_one_line_each(run4, caplog):
    workdir, d = run4
    flip_byte(str(d / "4"))
    delete_state(str(d / "2"))
    os.makedirs(d / "6")  # an empty step directory
    ckpt, lines = reopen(workdir, caplog)
    assert [ln.split(" is unusable")[0] for ln in lines] == [f"checkpoint step {s} in {d}" for s in (6, 4, 2)]
    assert ckpt.latest_step() == 0
    assert sorted(os.listdir(workdir / "checkpoints.rejected")) == ["2", "4", "6"]


def test_no_good_step_starts_fresh_with_a_warning(run4, caplog):
    workdir, d = run4
    for s in (0, 2, 4):
        no_manifest_uncommitted(str(d / str(s)))
    ckpt, lines = reopen(workdir, caplog)
    assert len(lines) == 4 and lines[-1] == f"no usable checkpoint in {d}; starting fresh"
    assert ckpt.latest_step() is None and checkpoints.step_dirs(str(d)) == []


def test_keep_counts_good_steps_only(tmp_path, caplog):
    save_steps(tmp_path, [0, 2, 4, 6], keep=2)
    d = tmp_path / "checkpoints"
    assert checkpoints.step_dirs(str(d)) == [4, 6]
    # step 8 is not a finished save (no manifest, no orbax commit marker): it is not counted as a
    # good step, it is rejected, and both kept good steps are still there
    ckpt = RunCheckpoints(str(tmp_path), 2)
    ckpt.save(8, tree(8), tree(8), {"h": jnp.ones((3,))}, meta(8))
    ckpt.manager.wait_until_finished()  # the process dies here, before commit() writes the manifest
    os.remove(d / "8" / checkpoints.ORBAX_COMMITTED)
    assert checkpoints.step_dirs(str(d)) == [4, 6, 8]
    ckpt, lines = reopen(tmp_path, caplog, keep=2)
    assert len(lines) == 1 and "checkpoint step 8" in lines[0] and MANIFEST in lines[0]
    assert ckpt.latest_step() == 6


def test_restore_params_uses_the_newest_good_step(tmp_path, caplog):
    from clipo_jax import trainer

    ckpt = RunCheckpoints(str(tmp_path), 3)
    for s in (2, 4):
        ckpt.save(s, {"params": tree(s)}, tree(0), {"h": jnp.ones((3,))}, meta(s))
    ckpt.wait()
    d = tmp_path / "checkpoints"
    np.testing.assert_array_equal(trainer.restore_params(str(tmp_path), tree(0))["w"], np.full((64, 32), 4.0))
    fname, _ = flip_byte(str(d / "4"))
    with caplog.at_level(logging.WARNING, logger="clipo_jax.checkpoints"):
        params = trainer.restore_params(str(tmp_path), tree(0))
    np.testing.assert_array_equal(params["w"], np.full((64, 32), 2.0))
    assert [r.getMessage() for r in caplog.records if "checkpoint step 4" in r.getMessage() and fname in r.getMessage()]
    assert checkpoints.step_dirs(str(d)) == [2, 4]  # evaluation moves nothing


# ----------------------------------------------------------------------------- end to end
FLAGS = [
    "--config=configs/demo.py:size=tiny",
    "--config.progress_bar=False",
    "--config.rl.steps=4",
    "--config.ckpt.every=2",
    "--config.ckpt.keep=3",
    "--config.sft.steps=0",
    "--config.eval.max_new_tokens=4",
    "--config.task.test_size=2",
]


def test_trainer_resumes_from_the_previous_good_step_after_a_bit_flip(tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    workdir = tmp_path / "run"
    cmd = [sys.executable, "-m", "experiments.train", f"--workdir={workdir}", *FLAGS]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    d = workdir / "checkpoints"
    assert checkpoints.step_dirs(str(d)) == [0, 2, 4]
    assert all(checkpoints.verify_step(str(d / str(s))) is None for s in (0, 2, 4))
    fname, _ = flip_byte(str(d / "4"))
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    bad = [ln for ln in r.stderr.splitlines() if "checkpoint step 4" in ln]
    assert len(bad) == 1 and fname in bad[0] and "sha256 differs" in bad[0], r.stderr[-2000:]
    assert "resumed from step 2" in r.stdout
    assert checkpoints.step_dirs(str(d)) == [0, 2, 4]
    assert checkpoints.verify_step(str(d / "4")) is None  # written again by the resumed run
    with open(workdir / "metrics.jsonl") as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2, 3, 4]


def test_params_digest_sees_every_bit_and_position():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(4, 6)).astype(np.float32)
    params = {"layer": {"w": jnp.asarray(w), "b": jnp.zeros(6, jnp.bfloat16)}, "emb": jnp.asarray(w[0])}
    digest = checkpoints.params_digest(params)
    assert checkpoints.params_digest({k: v for k, v in params.items()}) == digest  # same values: same digest
    changed = w.copy()
    changed[2, 3] = np.nextafter(changed[2, 3], np.float32(np.inf))  # one ulp
    swapped = w.copy()
    swapped[0, [1, 4]] = swapped[0, [4, 1]]  # two elements trade places
    for other in (changed, swapped, w.reshape(6, 4)):
        assert checkpoints.params_digest({**params, "layer": {**params["layer"], "w": jnp.asarray(other)}}) != digest
    assert checkpoints.params_digest({**params, "layer": {**params["layer"], "b": jnp.zeros(6, jnp.float16)}}) != digest
    assert checkpoints.params_digest({"renamed": params["layer"], "emb": params["emb"]}) != digest


def test_rejected_copies_are_bounded_and_unfinished_saves_are_cleaned(tmp_path, caplog):
    """Every rejection moved a whole step into checkpoints.rejected/ and a kill during a save left
    its orbax temporary directory; neither was ever deleted, so repeated crashes filled the disk."""
    save_steps(tmp_path, [0, 2])
    d, rejected = tmp_path / "checkpoints", tmp_path / "checkpoints.rejected"
    kept = []  # the rejected copies, oldest first
    for round_ in range(checkpoints.REJECTED_KEEP + 2):
        ckpt = RunCheckpoints(str(tmp_path), 3)
        ckpt.save(4, tree(4), tree(4), {"h": jnp.ones((3,))}, meta(4))
        ckpt.commit()
        flip_byte(str(d / "4"))  # step 4 goes bad each time
        ckpt, lines = reopen(tmp_path, caplog)
        moved = [ln.rsplit("moved to ", 1)[1] for ln in lines if "moved to" in ln]
        assert ckpt.latest_step() == 2 and len(moved) == 1, lines
        kept.append(moved[0])
        assert len(os.listdir(rejected)) == min(round_ + 1, checkpoints.REJECTED_KEEP)
    assert sorted(str(rejected / n) for n in os.listdir(rejected)) == sorted(kept[-checkpoints.REJECTED_KEEP :])
    assert any("deleted the rejected checkpoint copy" in ln for ln in lines)
    # a save killed before orbax's final rename leaves <step>.orbax-checkpoint-tmp-<n>
    tmp_dir = d / "6.orbax-checkpoint-tmp-1234567"
    shutil.copytree(d / "2", tmp_dir)
    os.remove(tmp_dir / MANIFEST)
    ckpt, lines = reopen(tmp_path, caplog)
    ckpt.save(6, tree(6), tree(6), {"h": jnp.ones((3,))}, meta(6))  # waits for orbax's clean-up
    ckpt.wait()
    assert not tmp_dir.exists() and checkpoints.step_dirs(str(d)) == [0, 2, 6]
