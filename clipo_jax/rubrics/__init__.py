"""OpenRS: meta-rubrics, the pairwise adaptive judge, aggregation, PVRs, backends, group rewards.

Plain entry points: ``score_comparison(criteria) -> float`` and
``verdict(forward, backward, min_score=0.0) -> "first" | "second" | "same"``.

Modules: ``types`` (shared types: completion request / response, backend contract and error,
pair input / result, verdicts and error policies), ``backends`` (HTTP), ``local_backends``
(in-process and logit backends), ``registry`` (backend names -> factories), ``judge`` (the
pairwise judge), ``logit_judge`` (the generation-free judge), ``aggregation``, ``protocol``,
``meta_rubric``, ``pvr``, ``sandbox``, ``checklist``, ``pairs`` (JudgeBench-format rows),
``benchmarks`` (JudgeBench, PPE, RewardBench 2 and RM-Bench readers and scoring), ``group_rewards``, ``replay``,
``refine`` (a package: mutations, the evolution loop, human review).

The names below are loaded on first use, so importing one module of the package does not pull in
the others (JAX and the model code come only with the modules that need them).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "aggregation": ("aggregate_scores", "batch_verdicts", "pad_criteria", "score_comparison", "verdict"),
    "types": (
        "Backend",
        "BackendError",
        "CompletionRequest",
        "CompletionResponse",
        "DirectionResult",
        "LogitBackend",
        "PairInput",
        "PairResult",
        "DEFAULT_JUDGE_MAX_TOKENS",
        "ERROR_POLICIES",
        "apply_error_policy",
    ),
    "backends": ("OpenAIHTTPBackend",),
    "registry": ("BACKENDS", "make_backend", "build_judge"),
    "judge": ("JudgeConfig", "PairwiseJudge", "summarise"),
    "local_backends": ("InProcessBackend", "LogitVerdictBackend"),
    "logit_judge": ("LogitJudge",),
    "meta_rubric": (
        "MetaRubric",
        "MetaRubricError",
        "available_domains",
        "builtin_meta_rubric",
        "domain_for_query_type",
        "load_meta_rubric",
    ),
    "protocol": ("JudgeParseError", "parse_judgment"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    module = _WHERE.get(name)
    if module is None:
        try:  # a submodule not imported yet: clipo_jax.rubrics.<name>
            return importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
