"""Shared by the experiments/bench_*.py scripts: what machine the numbers come from."""
import os
import platform


def cores() -> int:
  """CPU cores this process may run on."""
  return len(os.sched_getaffinity(0))


def machine() -> str:
  """'<cpu model>, <n> cores' for the benchmark summary line."""
  model = platform.processor() or "cpu"
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          model = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  return f"{model}, {cores()} cores"
