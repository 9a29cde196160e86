"""One process of the two-process SFT-cache check (launched by tests/test_trainer_files.py).

  python tests/sft_cache_worker.py --cache_dir=C --task_dir=T --out=DIR \
      --coordinator=127.0.0.1:PORT --num_processes=2 --process_id=i [--delay_s=S]

Every process builds the tiny demo task, model and mesh and calls ``sft.cached_sft`` on the same
cache directory; this process first waits ``--delay_s`` seconds, so that it looks at the cache
after its peer may already have moved a damaged one aside. It writes the SFT params it got to
OUT/result_<i>.npz.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cache_dir", required=True)
    ap.add_argument("--task_dir", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--coordinator", required=True)
    ap.add_argument("--num_processes", type=int, default=2)
    ap.add_argument("--process_id", type=int, default=0)
    ap.add_argument("--delay_s", type=float, default=0.0)
    args = ap.parse_args()

    import jax

    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    from clipo_jax import parallel

    parallel.initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    import numpy as np

    from clipo_jax import sft, tasks, trainer
    from clipo_jax.models import transformer
    from configs.demo import get_config

    config = get_config("size=tiny")
    config.sft.cache_dir = args.cache_dir
    config.progress_bar = False
    task = tasks.build_task(config.task, os.path.join(args.task_dir, str(args.process_id)))
    mesh = parallel.make_mesh()
    cfg, params = trainer.build_model(config, task.tokenizer.vocab_size, jax.random.key(0))
    params = parallel.shard_tree(params, mesh, transformer.param_logical_axes(cfg))
    time.sleep(args.delay_s)
    out = sft.cached_sft(config, task, cfg, params, mesh, os.path.join(args.task_dir, str(args.process_id)))
    leaves = [np.asarray(x) for x in jax.tree.leaves(parallel.to_host(out))]
    np.savez(os.path.join(args.out, f"result_{args.process_id}.npz"), *leaves)


if __name__ == "__main__":
    main()
