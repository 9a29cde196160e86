"""One process of a multi-host RL train-step check (launched by tests/test_trainer.py).

  python tests/multihost_worker.py --out=DIR [--coordinator=127.0.0.1:PORT --num_processes=2 --process_id=i]
                                   [--local_devices=2]

Every process builds the same tiny model, optimizer and global batch from fixed seeds,
feeds only its own rows (jax.make_array_from_process_local_data) to a batch sharded over
the global ('data', 'fsdp') mesh axes, runs two jitted train steps (Adam, 2 micro-batches,
KL + entropy terms) and writes the replicated new params and metrics to
OUT/result_<process_id>.npz. With --num_processes=1 it is the single-process reference.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--coordinator", default=None)
    ap.add_argument("--num_processes", type=int, default=1)
    ap.add_argument("--process_id", type=int, default=0)
    ap.add_argument("--local_devices", type=int, default=1)
    args = ap.parse_args()

    import jax

    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", args.local_devices)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU cross-process collectives
    from clipo_jax import parallel

    parallel.initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    assert jax.process_count() == args.num_processes, jax.process_count()

    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from clipo_jax.models.config import ModelConfig
    from clipo_jax.models.transformer import init_params, param_logical_axes
    from clipo_jax.rl.step import RLBatch, StepConfig, TrainState, make_optimizer, train_step

    cfg = ModelConfig(vocab_size=48, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=8, d_ff=32)
    B, TP, N = 8, 5, 6
    T = TP + N
    rng = np.random.default_rng(0)  # the same global batch on every process
    tokens = rng.integers(1, cfg.vocab_size, (B, T)).astype(np.int32)
    prompt_len = rng.integers(1, TP + 1, B)
    resp_len = rng.integers(1, N + 1, B)
    valid = np.zeros((B, T), bool)
    resp = np.zeros((B, N), bool)
    for i in range(B):
        valid[i, TP - prompt_len[i] : TP + resp_len[i]] = True
        resp[i, : resp_len[i]] = True
    tokens = np.where(valid, tokens, 0)
    lp = lambda: rng.normal(-np.log(cfg.vocab_size), 0.3, (B, N)).astype(np.float32)
    host_batch = RLBatch(tokens, valid, resp, rng.normal(size=B).astype(np.float32), lp(), lp(), lp())

    mesh = parallel.make_mesh(data=-1)  # all devices of all processes
    # this process's rows: the union of its devices' slices of the batch dimension
    bsh = parallel.batch_sharding(mesh, 2, B)
    idx = bsh.addressable_devices_indices_map((B, T)).values()
    starts = sorted({(s[0].start or 0, s[0].stop or B) for s in idx})
    local_rows = np.concatenate([np.arange(a, b) for a, b in starts])

    def to_global(x):
        sh = parallel.batch_sharding(mesh, x.ndim, B)
        return jax.make_array_from_process_local_data(sh, x[local_rows], x.shape)

    batch = jax.tree.map(to_global, host_batch)  # optional fields (None) stay None
    host_params = jax.device_get(init_params(cfg, jax.random.key(0), std=0.2))
    p_shard = parallel.tree_shardings(mesh, param_logical_axes(cfg), host_params)
    params = jax.tree.map(
        lambda x, s: jax.make_array_from_callback(x.shape, s, lambda i, x=x: x[i]), host_params, p_shard
    )
    opt = make_optimizer(1e-2, total_steps=10, weight_decay=0.01)
    scfg = StepConfig(
        micro_batches=2,
        kl_coef=0.05,
        entropy_coef=0.01,
        policy_loss_opts=(("dual_clip", 3.0), ("eps_high", 0.28), ("eps_low", 0.2)),
    )
    # every leaf on the global mesh (a plain jit(opt.init) would put the step counts on one device)
    replicated = NamedSharding(mesh, P())
    state = TrainState(
        params,
        jax.jit(opt.init, out_shardings=replicated)(params),
        jax.jit(lambda: jnp.zeros((), jnp.int32), out_shardings=replicated)(),
    )
    shardings = jax.tree.map(lambda x: x.sharding, state)
    step = jax.jit(
        functools.partial(train_step, cfg=cfg, scfg=scfg, optimizer=opt),
        in_shardings=(shardings, None),
        out_shardings=(shardings, None),
        donate_argnums=0,
    )
    metrics = []
    for _ in range(2):
        state, m = step(state, batch)
        metrics.append({k: float(np.asarray(v.addressable_data(0))) for k, v in m.items()})

    # params are replicated (fsdp = tensor = 1): each process holds the full arrays
    flat, _ = jax.tree.flatten_with_path(state.params)
    arrays = {jax.tree_util.keystr(k): np.asarray(v.addressable_data(0)) for k, v in flat}
    for k, v in metrics[-1].items():
        arrays["metric:" + k] = np.asarray(v)
    arrays["meta:max_update"] = np.asarray(
        max(
            float(np.max(np.abs(np.asarray(v.addressable_data(0)) - h)))
            for v, h in zip(jax.tree.leaves(state.params), jax.tree.leaves(host_params))
        )
    )
    arrays["meta:devices"] = np.asarray(jax.device_count())
    arrays["meta:local_rows"] = local_rows
    arrays["meta:step"] = np.asarray(int(np.asarray(state.step.addressable_data(0))))
    os.makedirs(args.out, exist_ok=True)
    np.savez(os.path.join(args.out, f"result_{args.process_id}.npz"), **arrays)
    print(f"process {args.process_id}/{args.num_processes}: {jax.device_count()} devices, rows {local_rows.tolist()}")
    if args.num_processes > 1:
        jax.distributed.shutdown()


if __name__ == "__main__":
    main()
