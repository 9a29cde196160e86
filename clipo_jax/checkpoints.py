"""The run's orbax checkpoints, each step verified by a sha256 manifest.

Layout: ``<workdir>/checkpoints/<step>/`` is one orbax step (items ``state``, ``ref``, ``head``,
``meta``) plus ``sha256_manifest.json``: the size and sha256 of every other file in the step
directory. The manifest is written after the (asynchronous) orbax save has finished and its step
directory has its final name (``commit``), so a step with a manifest is a complete step.

At start-up the newest step is verified against its manifest (every file present, same size,
same sha256) and its meta is checked for the fields and types the trainer reads. A step that
fails (a missing, truncated or changed file; an unreadable manifest; bad meta; no manifest and
no orbax commit marker) is reported in one warning line naming the step and the file, moved to
``<workdir>/checkpoints.rejected/<step>`` (the newest ``REJECTED_KEEP`` copies are kept there)
and the next older step is tried; with no good step the run starts fresh.  The temporary
directories of saves that never finished (``<step>.orbax-checkpoint-tmp*``, left by a kill during
a save) are deleted when the run starts.

A step without a manifest whose directory has its final name and orbax's ``commit_success.txt``
was saved completely (orbax writes into ``<step>.orbax-checkpoint-tmp`` and renames it last):
the run was stopped after the save and before the next step's ``commit`` wrote its manifest,
which is most of a step's time. That step is sealed (its manifest written now), reported in one
line and resumed from, instead of being thrown away with ``ckpt.every`` steps of work.

A save that fails (a full disk, an I/O error) raises ``CheckpointError`` in one line naming the
step and the cause; the steps before it are untouched and the run resumes from them.

Retention: orbax itself deletes nothing (``max_to_keep=None``); after each manifest is written
the newest ``keep`` manifested steps are kept and older step directories are deleted, so a step
still being written (or one that never got its manifest) never pushes the last good steps out.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np

from clipo_jax import parallel

logger = logging.getLogger(__name__)

MANIFEST = "sha256_manifest.json"
MANIFEST_TMP = MANIFEST + ".tmp"  # left in a step directory by a kill inside write_manifest
ORBAX_COMMITTED = "commit_success.txt"  # orbax writes it into the step before the final rename
REJECTED = "checkpoints.rejected"
REJECTED_KEEP = 3  # rejected step copies kept for inspection; each is a full step, so older go


class CheckpointError(RuntimeError):
    """A one-line error about the run's checkpoints."""


# ------------------------------------------------------------------------------- manifests
def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _step_files(step_dir: str) -> list[str]:
    """Every file under step_dir except the manifest (and its temporary file), as sorted
    relative paths."""
    out = []
    for root, _, files in os.walk(step_dir):
        for name in files:
            rel = os.path.relpath(os.path.join(root, name), step_dir)
            if rel not in (MANIFEST, MANIFEST_TMP):
                out.append(rel)
    return sorted(out)


def write_manifest(step_dir: str) -> None:
    """{relative path: [size, sha256]} of every file in step_dir, written atomically."""
    files = {
        rel: [os.path.getsize(os.path.join(step_dir, rel)), _sha256(os.path.join(step_dir, rel))]
        for rel in _step_files(step_dir)
    }
    tmp = os.path.join(step_dir, MANIFEST_TMP)
    with open(tmp, "w") as f:
        json.dump({"files": files}, f, indent=0, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(step_dir, MANIFEST))


def write_atomic(path: str, text: str) -> None:
    """Writes ``text`` to ``path`` through a temporary file and a rename: a reader (or a run
    resumed after a crash mid-write) sees the old file or the new one, never a cut one."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def verify_step(step_dir: str) -> str | None:
    """None if step_dir matches its manifest and its meta is usable; else the problem, naming the file."""
    return verify_files(step_dir) or check_meta(step_dir)


def verify_files(step_dir: str) -> str | None:
    """None if every file of step_dir matches its manifest; else the problem, naming the file."""
    path = os.path.join(step_dir, MANIFEST)
    if not os.path.isfile(path):
        return f"no {MANIFEST} (the save did not complete)"
    try:
        with open(path) as f:
            want = json.load(f)["files"]
        if not isinstance(want, dict):
            raise TypeError(f"'files' is {type(want).__name__}, not an object")
        want = {str(k): (int(v[0]), str(v[1])) for k, v in want.items()}
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
        return f"{MANIFEST}: unreadable ({type(e).__name__})"
    have = set(_step_files(step_dir))
    missing = sorted(set(want) - have)
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        return f"{missing[0]}{more}: missing"
    extra = sorted(have - set(want))
    if extra:
        return f"{extra[0]}: not in {MANIFEST}"
    for rel, (size, digest) in sorted(want.items()):
        full = os.path.join(step_dir, rel)
        try:
            got_size = os.path.getsize(full)
            if got_size != size:
                return f"{rel}: {got_size} bytes, {size} in {MANIFEST} (truncated or overwritten)"
            if _sha256(full) != digest:
                return f"{rel}: sha256 differs from {MANIFEST}"
        except OSError as e:
            return f"{rel}: unreadable ({e.strerror or type(e).__name__})"
    return None


def check_meta(step_dir: str) -> str | None:
    """The JSON meta item holds the fields the trainer resumes from, with their types."""
    rel = os.path.join("meta", "metadata")
    try:
        with open(os.path.join(step_dir, rel)) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        return f"{rel}: unreadable ({type(e).__name__})"
    if not isinstance(meta, dict):
        return f"{rel}: not a JSON object"
    for key in ("data_position", "consecutive_skips"):
        v = meta.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            return f"{rel}: {key}={v!r} is not an integer >= 0"
    counters = meta.get("counters", {})
    if not isinstance(counters, dict) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in counters.values()
    ):
        return f"{rel}: counters={counters!r} is not a mapping of numbers"
    return None


def step_dirs(ckpt_dir: str) -> list[int]:
    """The step numbers with a final (not orbax-temporary) directory, ascending."""
    if not os.path.isdir(ckpt_dir):
        return []
    return sorted(int(d) for d in os.listdir(ckpt_dir) if d.isdigit() and os.path.isdir(os.path.join(ckpt_dir, d)))


def saved_without_manifest(step_dir: str) -> bool:
    """orbax finished this step (final name, its commit marker) but it has no manifest yet: the
    run stopped between the end of the save and the next ``commit``."""
    return not os.path.exists(os.path.join(step_dir, MANIFEST)) and os.path.isfile(
        os.path.join(step_dir, ORBAX_COMMITTED)
    )


def newest_good_step(ckpt_dir: str, reject: bool = False) -> int | None:
    """The newest step that verifies; each bad newer step is logged in one line and, with
    reject=True, moved to the sibling checkpoints.rejected/ directory. A step that orbax saved
    completely but that has no manifest yet (``saved_without_manifest``) is used, said in one
    line, and with reject=True (the trainer, which may write) gets its manifest now."""
    for step in reversed(step_dirs(ckpt_dir)):
        step_dir = os.path.join(ckpt_dir, str(step))
        if saved_without_manifest(step_dir) and check_meta(step_dir) is None:
            if reject:
                write_manifest(step_dir)
            logger.warning(
                "checkpoint step %d in %s: saved completely (orbax's %s) but the run stopped before its %s "
                "was written; %s",
                step,
                ckpt_dir,
                ORBAX_COMMITTED,
                MANIFEST,
                "written now, resuming from it" if reject else "used without one",
            )
            return step
        problem = verify_step(step_dir)
        if problem is None:
            return step
        where = ""
        if reject:
            where = f"; moved to {_reject(ckpt_dir, step)}"
        logger.warning("checkpoint step %d in %s is unusable: %s%s", step, ckpt_dir, problem, where)
    return None


def _reject(ckpt_dir: str, step: int) -> str:
    target_root = os.path.join(os.path.dirname(ckpt_dir), REJECTED)
    os.makedirs(target_root, exist_ok=True)
    target, n = os.path.join(target_root, str(step)), 1
    while os.path.exists(target):
        target, n = os.path.join(target_root, f"{step}.{n}"), n + 1
    os.replace(os.path.join(ckpt_dir, str(step)), target)
    os.utime(target)  # its time is the rejection's: pruning keeps the latest rejected
    _prune_rejected(target_root)
    return target


def _prune_rejected(target_root: str) -> None:
    """Keep the ``REJECTED_KEEP`` most recently rejected copies: every kill or corruption moved a
    whole step there, and nothing else ever deleted them."""
    copies = sorted((os.path.join(target_root, d) for d in os.listdir(target_root)), key=os.path.getmtime, reverse=True)
    for old in copies[REJECTED_KEEP:]:
        try:
            shutil.rmtree(old) if os.path.isdir(old) else os.remove(old)
        except OSError as e:
            logger.warning("could not delete the rejected checkpoint copy %s: %s", old, e)
            continue
        logger.warning("deleted the rejected checkpoint copy %s (the newest %d are kept)", old, REJECTED_KEEP)


# ------------------------------------------------------------------------------- the manager
_UINT_OF_SIZE = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}


@jax.jit
def _leaf_checksums(leaves):
    """Two position-weighted sums of each leaf's raw bits (uint32, wrapping): any changed bit or
    swapped pair of elements changes them, and they are computed where the leaf lives."""
    sums = []
    for x in leaves:
        bits = jax.lax.bitcast_convert_type(x, _UINT_OF_SIZE[x.dtype.itemsize]).reshape(-1).astype(jnp.uint32)
        pos = jnp.arange(bits.shape[0], dtype=jnp.uint32)
        sums.append(jnp.sum(bits * (2 * pos + 1)))
        sums.append(jnp.sum((bits ^ (pos * jnp.uint32(0x9E3779B1))) * jnp.uint32(0x85EBCA6B) + pos))
    return jnp.stack(sums)


def params_digest(params) -> str:
    """A digest of a parameter tree's exact values (paths, shapes, dtypes and bits): equal digests
    mean the same parameters, e.g. two runs that started from the same SFT checkpoint. Computed on
    the devices, so a sharded model is never gathered to the host."""
    paths_leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    for path, x in paths_leaves:
        if x.dtype.itemsize not in _UINT_OF_SIZE:
            raise ValueError(
                f"params_digest: {jax.tree_util.keystr(path)} has dtype {x.dtype} (itemsize 1, 2 or 4 only)"
            )
    sums = np.asarray(parallel.to_host(_leaf_checksums([x for _, x in paths_leaves])))
    h = hashlib.sha256()
    for i, (path, x) in enumerate(paths_leaves):
        h.update(f"{jax.tree_util.keystr(path)}|{x.shape}|{x.dtype}|{sums[2 * i]}|{sums[2 * i + 1]};".encode())
    return h.hexdigest()[:16]


class RunCheckpoints:
    """Policy state, reference params, CLIPO head and JSON meta per step (orbax, async saves).

    Process 0 verifies, writes manifests, rejects and deletes; every process saves and restores.
    """

    def __init__(self, workdir: str, keep: int):
        import orbax.checkpoint as ocp

        self.ocp = ocp
        self.keep = int(keep)
        self.dir = os.path.abspath(os.path.join(workdir, "checkpoints"))
        self.primary = parallel.is_primary()
        self.pending: int | None = None  # saved, manifest not yet written
        if self.primary:
            had_steps = bool(step_dirs(self.dir))
            if newest_good_step(self.dir, reject=True) is None and had_steps:
                logger.warning("no usable checkpoint in %s; starting fresh", self.dir)
        parallel.barrier("checkpoints_verified")  # no process lists steps before the bad ones are gone
        self.manager = ocp.CheckpointManager(
            self.dir, options=ocp.CheckpointManagerOptions(max_to_keep=None, create=True, cleanup_tmp_directories=True)
        )

    def latest_step(self):
        return self.manager.latest_step()

    def save(self, step, state, ref_params, head, meta):
        self.commit()
        a = self.ocp.args
        self.manager.save(
            step,
            args=a.Composite(
                state=a.StandardSave(state),
                ref=a.StandardSave(ref_params),
                head=a.StandardSave(head),
                meta=a.JsonSave(meta),
            ),
        )
        self.pending = step

    def close(self):
        """Wait for the in-flight save and release orbax's threads (an unclosed manager's
        callbacks can fire into a closed event loop at interpreter exit)."""
        try:
            self.commit()
        finally:
            self.manager.close()

    def commit(self):
        """Wait for the in-flight save, write its manifest, delete steps past `keep` good ones.

        A save that failed (a full disk, an I/O error) raises CheckpointError naming the step and
        the cause, once: the step is forgotten, so a later commit (e.g. the trainer's final wait)
        neither raises again nor writes a manifest for it; the steps before it are intact."""
        step, self.pending = self.pending, None
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001 - orbax re-raises its writer threads' errors
            if step is None:
                raise
            raise CheckpointError(
                f"checkpoint step {step} in {self.dir}: the save failed ({error_line(e)}); "
                "the steps before it are intact: fix the cause and re-run the same command to resume"
            ) from None
        if step is None or not self.primary:
            return
        step_dir = os.path.join(self.dir, str(step))
        if not os.path.isdir(step_dir):  # orbax gave up without raising: never a manifest for nothing
            raise CheckpointError(f"checkpoint step {step} in {self.dir}: the save left no directory {step_dir}")
        try:
            write_manifest(step_dir)
        except OSError as e:
            raise CheckpointError(
                f"checkpoint step {step} in {self.dir}: writing its {MANIFEST} failed ({error_line(e)}); "
                "fix the cause and re-run the same command to resume"
            ) from None
        steps = step_dirs(self.dir)
        good = [s for s in steps if os.path.isfile(os.path.join(self.dir, str(s), MANIFEST))]
        if len(good) > self.keep:
            oldest_kept = good[-self.keep]
            for s in steps:
                if s < oldest_kept:
                    shutil.rmtree(os.path.join(self.dir, str(s)), ignore_errors=True)
            self.manager.reload()

    def restore(self, step, state_t, ref_t, head_t):
        a, abstract = self.ocp.args, lambda t: jax.tree.map(self.ocp.utils.to_shape_dtype_struct, t)
        try:
            r = self.manager.restore(
                step,
                args=a.Composite(
                    state=a.StandardRestore(abstract(state_t)),
                    ref=a.StandardRestore(abstract(ref_t)),
                    head=a.StandardRestore(abstract(head_t)),
                    meta=a.JsonRestore(),
                ),
            )
        except Exception as e:  # the files match their manifest: the run's config differs
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            raise CheckpointError(
                f"checkpoint step {step} in {self.dir} does not fit this run's config "
                f"(model, optimizer or CLIPO head changed?): {type(e).__name__}: {first}"
            ) from None
        return r.state, r.ref, r.head, r.meta

    def wait(self):
        self.commit()


def error_line(e: BaseException) -> str:
    """An exception as one short line: its type and the first line of its message, without the
    tensorstore spec that orbax's I/O errors carry (kilobytes of JSON); long messages keep both
    ends, where the file and the OS error are."""
    text = (str(e).strip().splitlines() or [""])[0]
    text = re.sub(r"\s*\[tensorstore_spec='.*?'\]", "", text)
    if len(text) > 400:
        text = text[:200] + " ... " + text[-190:]
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
