"""What one checker call costs in the sandbox (clipo_jax/rubrics/sandbox.py), per set of layers.

  python -m experiments.bench_sandbox [--repeats=10]

Side by side in one process: the floor (a bare `python -I -S -c pass` subprocess, what any
process-isolated checker pays at least), `run_checker` with seccomp + rlimits (+ nobody for a root
caller) and `run_checker` with bubblewrap on top (for a root caller: the launcher that starts
bubblewrap as the host's nobody). Prints the CPU, each median and its ratio to the floor.
"""

import subprocess

from absl import app, flags

from clipo_jax.rubrics import sandbox
from experiments.bench_common import machine, median_seconds

FLAGS = flags.FLAGS
flags.DEFINE_integer("repeats", 10, "timed calls per variant (median)")

CHECKER = "def check(response):\n    return len(response.split()) <= 5\n"


def main(argv):
    del argv
    print(machine())
    python = sandbox._interpreter()
    floor = median_seconds(lambda: subprocess.run([python, "-I", "-S", "-c", "pass"], check=True), FLAGS.repeats)
    print(f"floor (bare interpreter start): {1e3 * floor:.1f} ms")
    for name, use_bwrap in (("seccomp", False), ("bubblewrap", True)):
        layers = sandbox.detect_layers(use_bubblewrap=use_bwrap)
        if not layers.usable or (use_bwrap and not layers.bubblewrap):
            print(f"{name}: unavailable here ({layers.reason})")
            continue

        def call():
            result = sandbox.run_checker(CHECKER, "a short answer", layers=layers)
            assert result.ok and result.value is True, result

        t = median_seconds(call, FLAGS.repeats)
        print(f"{name}: {layers.describe()}")
        print(f"  run_checker {1e3 * t:.1f} ms = {t / floor:.1f}x the floor")


if __name__ == "__main__":
    app.run(main)
