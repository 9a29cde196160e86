r"""RL training entry point (absl flags over an ml-collections config).

  python -m experiments.train --config=configs/demo.py --workdir=/tmp/clipo_demo
  python -m experiments.train --config=configs/demo.py:clipo --workdir=/tmp/d --config.rl.lr=3e-5

Re-running the same command with the same --workdir resumes from the last checkpoint.
Multi-host: pass --coordinator_address=host:port --num_processes=N --process_id=i.
"""
import logging
import sys

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "config file (configs/*.py[:arg])", lock_config=True)
flags.DEFINE_string("workdir", None, "run directory (checkpoints, metrics.jsonl, tb/)", required=True)
flags.DEFINE_string("coordinator_address", None, "jax.distributed coordinator host:port (multi-host)")
flags.DEFINE_integer("num_processes", None, "number of processes (multi-host)")
flags.DEFINE_integer("process_id", None, "this process's id (multi-host)")
flags.mark_flags_as_required(["config"])


def main(argv):
  del argv
  logging.getLogger("absl").setLevel(logging.WARNING)
  from clipo_jax import parallel, trainer
  parallel.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  try:
    trainer.run(FLAGS.config, FLAGS.workdir)
  except (trainer.TrainingError, ValueError) as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  app.run(main)
