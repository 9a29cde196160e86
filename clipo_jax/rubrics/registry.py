"""The registry of judge backends, and judge construction from a backend name.

``BACKENDS`` maps a name to a factory ``(**kwargs) -> Backend``:

* ``"openai"``: ``backends.OpenAIHTTPBackend`` (any OpenAI-compatible server);
* ``"in-process"``: ``local_backends.InProcessBackend`` (our sampler on a local checkpoint);
* ``"logit"``: ``local_backends.LogitVerdictBackend`` (labels from next-token logits).

The local backends are imported on use: they pull in the model code and JAX.  Add a backend by
adding an entry.  ``build_judge`` gives the judge that goes with a backend: a generation-free
``LogitJudge`` for ``"logit"``, a ``PairwiseJudge`` for anything else.
"""

from __future__ import annotations

from typing import Callable

from clipo_jax.rubrics.backends import OpenAIHTTPBackend
from clipo_jax.rubrics.types import Backend


def _local_backend(class_name: str) -> Callable[..., Backend]:
    def make(**kwargs) -> Backend:
        from clipo_jax.rubrics import local_backends

        return getattr(local_backends, class_name)(**kwargs)

    make.__name__ = f"make_{class_name}"
    return make


BACKENDS: dict[str, Callable[..., Backend]] = {
    "openai": OpenAIHTTPBackend,
    "in-process": _local_backend("InProcessBackend"),
    "logit": _local_backend("LogitVerdictBackend"),
}


def make_backend(name: str, **kwargs) -> Backend:
    if name not in BACKENDS:
        raise ValueError(f"unknown judge backend {name!r} (available: {sorted(BACKENDS)})")
    return BACKENDS[name](**kwargs)


def build_judge(backend_name: str, judge_config=None, **backend_kwargs):
    """(judge, backend) for a registry name: ``logit`` gives a generation-free ``LogitJudge``,
    anything else a ``PairwiseJudge`` over that backend."""
    from clipo_jax.rubrics.judge import JudgeConfig, PairwiseJudge

    backend = make_backend(backend_name, **backend_kwargs)
    judge_config = judge_config or JudgeConfig()
    if backend_name == "logit":
        from clipo_jax.rubrics.logit_judge import LogitJudge

        return LogitJudge(backend, min_score=judge_config.min_score), backend
    return PairwiseJudge(backend, judge_config), backend
