"""Where tests read data: the small fixtures under tests/data (written by
``python -m experiments.prepare_data --fixtures=tests/data --from_dir=DATA``), or, with
CLIPO_JAX_TEST_DATA=DATA, the full sets that ``experiments.prepare_data --out=DATA`` writes."""

import os

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
DATA_DIR = os.environ.get("CLIPO_JAX_TEST_DATA") or FIXTURES
FULL = DATA_DIR != FIXTURES
CLIPO_DIR = os.path.join(DATA_DIR, "clipo")
JUDGEBENCH = os.path.join(DATA_DIR, "judgebench", "gpt.jsonl" if FULL else "gpt_sample.jsonl")

if not os.path.isdir(CLIPO_DIR) or not os.path.isfile(JUDGEBENCH):  # a missing fixture fails, never skips
    raise FileNotFoundError(f"test data missing: {CLIPO_DIR} / {JUDGEBENCH}")
