r"""The trainer's CLIPO stage at the demo's shapes, and what fetching its metrics costs.

  python -m experiments.bench_clipo_stage              # configs/demo.py:clipo shapes (B = 256, H = 128)
  python -m experiments.bench_clipo_stage --repeats=5  # a smoke run

One step of `contrastive.clipo_stage` (head step, contrastive reward, per-label metrics; the
geometry metrics on and off) on random pooled states and labels, as the trainer calls it. Then the
stage's metrics dict fetched to the host two ways, side by side on the same arrays: one transfer
per scalar (`jax.device_get` of the dict) against one stacked vector (`parallel.scalars_to_host`,
which the stage uses). Median of --repeats timed calls after 3 warmups. The last line is the
JSON summary.
"""

import json
import types

import jax
import numpy as np
from absl import app, flags

from clipo_jax import contrastive, parallel
from clipo_jax.trainer import _clipo_static
from configs import demo
from experiments.bench_common import machine, median_seconds

FLAGS = flags.FLAGS
flags.DEFINE_integer("repeats", 30, "timed calls per measurement (median reported)")


def median_ms(fn, repeats: int) -> float:
    return 1e3 * median_seconds(fn, repeats, warmup=3)


def main(argv):
    del argv
    config = demo.get_config("algo=grpo,clipo")
    G = config.rl.group_size
    B, H = config.rl.prompts_per_step * G, config.model.d_model
    cfg = contrastive.ContrastiveConfig(**_clipo_static(config))
    mesh = parallel.make_mesh(1, 1, 1)
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def place(tree):
        return parallel.put_global(tree, sharding)

    rng = np.random.default_rng(0)
    out = types.SimpleNamespace(
        pooled_hidden=rng.normal(size=(B, H)).astype(np.float32), lengths=rng.integers(5, 60, B).astype(np.int32)
    )
    labels = (rng.random(B) < 0.6).astype(np.int32)
    head = place(contrastive.init_head_state(jax.random.PRNGKey(0), H, cfg))
    print(f"{machine()}; jax {jax.__version__}, {jax.default_backend()}; B={B} H={H} G={G}, {FLAGS.repeats} repeats")

    result = {"B": B, "H": H, "machine": machine(), "backend": jax.default_backend()}
    state = {"head": head, "i": 0}  # the stage donates the head: each call takes the last one's
    for geometry in (True, False):
        opts = config.clipo.copy_and_resolve_references()
        opts.log_geometry = geometry

        def stage():
            state["i"] += 1
            state["head"], _, metrics = contrastive.clipo_stage(
                state["head"], out, labels, G, jax.random.PRNGKey(state["i"]), cfg, opts, place
            )
            return metrics

        n_metrics = len(stage())
        stage_ms = median_ms(stage, FLAGS.repeats)
        # the same metrics on the device, fetched both ways
        placed = place((out.pooled_hidden, labels, out.lengths, np.ones(B, bool), jax.random.PRNGKey(0)))
        state["head"], _, metrics_d = contrastive._clipo_stage_impl(
            state["head"],
            *placed,
            np.float32(opts.lam),
            np.float32(opts.c0),
            np.float32(opts.clip_min),
            cfg=cfg,
            group_size=G,
            log_geometry=geometry,
        )
        jax.block_until_ready(metrics_d)
        one_each, stacked_values = jax.device_get(metrics_d), parallel.scalars_to_host(metrics_d)
        same = all(float(np.float32(one_each[k])) == stacked_values[k] for k in one_each)  # float32 either way
        per_leaf = median_ms(lambda: jax.device_get(metrics_d), FLAGS.repeats)
        stacked = median_ms(lambda: parallel.scalars_to_host(metrics_d), FLAGS.repeats)
        name = "geometry on" if geometry else "geometry off"
        print(
            f"{name:<13} stage {stage_ms:6.2f} ms | {n_metrics} metrics fetched: one transfer each "
            f"{per_leaf:6.3f} ms, stacked {stacked:6.3f} ms, ratio {per_leaf / stacked:5.1f}x, same values {same}"
        )
        result[name] = {
            "stage_ms": stage_ms,
            "metrics": n_metrics,
            "fetch_per_leaf_ms": per_leaf,
            "fetch_stacked_ms": stacked,
            "same_values": same,
        }
    print(json.dumps(result))


if __name__ == "__main__":
    app.run(main)
