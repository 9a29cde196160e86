"""Shared fixtures. Under CI (CI=true) the property tests draw the same examples on every run: a clean checkout
has no example database, and a random draw that fails once would make CI flaky instead of
failing the change that caused it. Locally they keep exploring."""

import os

import pytest

try:
    from hypothesis import settings
except ImportError:  # hypothesis is a test extra; its tests skip without it
    settings = None

if settings is not None:
    settings.register_profile("ci", derandomize=True, database=None)
    if os.environ.get("CI", "").lower() == "true":
        settings.load_profile("ci")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(config, task, model config, random params) of configs/demo.py:size=tiny."""
    import jax

    from clipo_jax import tasks, trainer
    from configs.demo import get_config

    config = get_config("size=tiny")
    task = tasks.build_task(config.task, str(tmp_path_factory.mktemp("tiny")))
    cfg, params = trainer.build_model(config, task.tokenizer.vocab_size, jax.random.key(0))
    return config, task, cfg, params
