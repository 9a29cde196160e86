"""Supervised warm start: next-token loss on a task's (prompt, completion) pairs.

``run_sft`` trains; ``cached_sft`` keys the result by everything that determines it (model, SFT
settings, task, seed), so runs that differ only in their RL settings share one warm start.
"""

from __future__ import annotations

import json
import logging
import os

import jax
import numpy as np

from clipo_jax import parallel, tasks
from clipo_jax.models import ModelConfig
from clipo_jax.rl.step import TrainState, make_optimizer, sft_step

logger = logging.getLogger(__name__)


class SFTError(ValueError):
    pass


def run_sft(config, task: tasks.Task, cfg: ModelConfig, params, mesh, workdir: str):
    """Supervised warm start on the task's (prompt, completion) pairs; loss on completion tokens."""
    from tqdm import tqdm

    s = config.sft
    tok = task.tokenizer
    if not task.sft_pairs:
        raise SFTError(f"config.sft.steps={s.steps} but task {task.name!r} has no SFT pairs")
    seqs, masks = [], []
    dropped = 0
    for prompt, completion in task.sft_pairs:
        p = task.encode_prompt({"prompt": prompt})
        c = tok.encode(completion) + [tok.eos_id]
        if len(p) + len(c) > s.max_len:
            dropped += 1
            continue
        seqs.append(p + c)
        masks.append([False] * len(p) + [True] * len(c))
    if dropped:
        logger.warning(
            "SFT: dropped %d of %d pairs longer than sft.max_len=%d", dropped, len(task.sft_pairs), s.max_len
        )
    if not seqs:
        raise SFTError(
            f"config.sft.max_len={s.max_len}: every one of the {len(task.sft_pairs)} SFT pairs of task {task.name!r} "
            "is longer (prompt + completion tokens)"
        )
    if len(seqs) < s.batch_size:  # a batch is drawn without replacement
        raise SFTError(
            f"config.sft.batch_size={s.batch_size} is larger than the {len(seqs)} SFT pairs of task {task.name!r} "
            f"that fit config.sft.max_len={s.max_len}"
        )
    L = max(len(x) for x in seqs)
    tokens = np.full((len(seqs), L), tok.pad_id, np.int32)
    valid = np.zeros((len(seqs), L), bool)
    lmask = np.zeros((len(seqs), L), bool)
    for i, (x, mk) in enumerate(zip(seqs, masks)):
        tokens[i, : len(x)], valid[i, : len(x)], lmask[i, : len(x)] = x, True, mk
    opt = make_optimizer(
        s.lr,
        total_steps=s.steps,
        warmup_steps=s.warmup_steps,
        schedule="cosine",
        weight_decay=s.weight_decay,
        grad_clip=1.0,
        min_lr_ratio=0.1,
    )
    # batches and the step counter go on the mesh (with several processes: only this process's
    # rows of each batch)
    put_batch = lambda *xs: parallel.put_global(xs, parallel.batch_sharding(mesh, 2, s.batch_size))
    step0 = parallel.put_global(np.zeros((), np.int32), parallel.named_sharding(mesh, None))
    state = TrainState(params, jax.jit(opt.init)(params), step0)
    step_fn = jax.jit(lambda st, t, v, l: sft_step(st, t, v, l, cfg=cfg, optimizer=opt), donate_argnums=0)
    rng = np.random.default_rng(config.seed)
    bar = tqdm(range(s.steps), desc="sft", disable=not config.progress_bar)
    log = open(os.path.join(workdir, "sft_metrics.jsonl"), "w") if parallel.is_primary() else None
    for i in bar:
        idx = rng.choice(len(seqs), s.batch_size, replace=False)
        state, m = step_fn(state, *put_batch(tokens[idx], valid[idx], lmask[idx]))
        if i % 20 == 0 or i == s.steps - 1:
            loss = float(parallel.to_host(m["sft/loss"]))
            bar.set_postfix(loss=f"{loss:.3f}")
            if log is not None:
                log.write(json.dumps({"step": i, "loss": loss}) + "\n")
    if log is not None:
        log.close()
    return state.params


def sft_cache_dir(config, workdir: str) -> str:
    """Where the SFT result lives: keyed by everything that determines it, so runs that differ
    only in their RL settings (e.g. GRPO vs GRPO+CLIPO on one seed) share one warm start."""
    import hashlib

    key = json.dumps(
        {
            "model": config.model.to_dict(),
            "sft": {k: v for k, v in config.sft.to_dict().items() if k != "cache_dir"},
            "task": config.task.to_dict(),
            "seed": config.seed,
        },
        sort_keys=True,
    )
    digest = hashlib.sha1(key.encode()).hexdigest()[:12]
    root = config.sft.get("cache_dir") or os.path.join(workdir, "sft")
    return os.path.abspath(os.path.join(root, digest))


def cached_sft(config, task: tasks.Task, cfg: ModelConfig, params, mesh, workdir: str):
    """run_sft, or restore its result if this exact SFT was already done (see sft_cache_dir).

    The cache is verified before it is used: its files against the sha256 manifest written after
    the save (``checkpoints.write_manifest``). A cache that does not verify or does not restore
    is reported in one line, moved aside (``params.rejected``) and trained again, so a damaged
    cache never loads silently and never stops a run. A cache from before manifests existed is
    used if it restores, and gets its manifest then."""
    import orbax.checkpoint as ocp

    from clipo_jax.checkpoints import MANIFEST, error_line, verify_files, write_manifest

    path = sft_cache_dir(config, workdir)
    params_dir = os.path.join(path, "params")
    ckptr = ocp.StandardCheckpointer()
    restored, problem, legacy = None, None, False
    if os.path.exists(params_dir):
        legacy = not os.path.exists(os.path.join(params_dir, MANIFEST))
        problem = None if legacy else verify_files(params_dir)
        if problem is None:
            try:
                restored = ckptr.restore(params_dir, jax.tree.map(ocp.utils.to_shape_dtype_struct, params))
            except Exception as e:  # noqa: BLE001 - orbax raises many types for a damaged file
                problem = f"does not restore ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})"
    # every process has looked before process 0 moves anything, and all follow process 0's verdict
    if parallel.agree(restored is not None):
        if restored is None:  # process 0 restored the cache that this process cannot read
            raise RuntimeError(
                f"SFT cache {params_dir}: usable on process 0, not on process "
                f"{jax.process_index()}: {problem or 'missing'}"
            )
        print(f"SFT: reusing {path}")
        if legacy and parallel.is_primary():
            write_manifest(params_dir)
        parallel.barrier("sft_cache_manifest")
        return restored
    if problem is not None:
        logger.warning("SFT cache %s is unusable: %s; moved aside and training again", params_dir, problem)
    if parallel.is_primary() and os.path.exists(params_dir):
        _move_aside(params_dir)
    parallel.barrier("sft_cache_checked")
    params = run_sft(config, task, cfg, params, mesh, workdir)
    try:  # a full disk or an I/O error: one line naming the cache (orbax raises from its writer threads)
        os.makedirs(path, exist_ok=True)
        ckptr.save(params_dir, params)
        ckptr.wait_until_finished()
        if parallel.is_primary():
            write_manifest(params_dir)
    except Exception as e:  # noqa: BLE001
        raise SFTError(
            f"SFT cache {params_dir}: saving the trained parameters failed ({error_line(e)}); "
            "fix the cause and re-run the same command"
        ) from None
    parallel.barrier("sft_cache_saved")
    return params


def _move_aside(params_dir: str) -> str:
    target, n = params_dir + ".rejected", 1
    while os.path.exists(target):
        target, n = f"{params_dir}.rejected.{n}", n + 1
    os.replace(params_dir, target)
    return target
