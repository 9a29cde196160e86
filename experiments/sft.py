r"""Supervised warm start only (the SFT phase of a config), then greedy eval on the task's test sets.

  python -m experiments.sft --config=configs/demo.py --workdir=runs/clipo_sft

The result is stored under <workdir>/sft/<hash> (or config.sft.cache_dir), where
experiments.train with the same model/sft/task/seed settings picks it up instead of re-running.
"""

import sys

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "config file (configs/*.py[:arg])", lock_config=True)
flags.DEFINE_string("workdir", None, "run directory", required=True)
flags.mark_flags_as_required(["config"])


def main(argv):
    del argv
    import os

    import jax

    from clipo_jax import parallel, sampling, sft, tasks, trainer
    from clipo_jax.models import transformer

    config = FLAGS.config
    try:
        trainer.validate_config(config)
        if config.sft.steps <= 0:
            raise trainer.TrainingError("config.sft.steps must be > 0 for experiments.sft")
        os.makedirs(FLAGS.workdir, exist_ok=True)
        mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
        task = tasks.build_task(config.task, FLAGS.workdir)
        root = jax.random.key(config.seed)
        cfg, params = trainer.build_model(config, task.tokenizer.vocab_size, jax.random.fold_in(root, 1))
        params = parallel.shard_tree(params, mesh, transformer.param_logical_axes(cfg))
        params = sft.cached_sft(config, task, cfg, params, mesh, FLAGS.workdir)
    except (trainer.TrainingError, ValueError) as e:
        sys.exit(f"error: {e}")
    tok = task.tokenizer
    scfg = sampling.SamplingConfig(
        max_new_tokens=config.eval.max_new_tokens, temperature=0.0, stop_ids=tuple(tok.stop_ids), pad_id=tok.pad_id
    )
    res = trainer.evaluate(task, sampling.Sampler(cfg, mesh), params, scfg, jax.random.fold_in(root, 3))
    print(trainer.format_eval(None, res, task.grade_keys, before_only=True))


if __name__ == "__main__":
    app.run(main)
