"""OpenRS: meta-rubrics, the pairwise adaptive judge, aggregation, PVRs, backends, group rewards.

Plain entry points: ``score_comparison(criteria) -> float`` and
``verdict(forward, backward, min_score=0.0) -> "first" | "second" | "same"``.
"""

from clipo_jax.rubrics.aggregation import aggregate_scores, batch_verdicts, pad_criteria, score_comparison, verdict
from clipo_jax.rubrics.backends import (
    BACKENDS,
    Backend,
    BackendError,
    CompletionRequest,
    CompletionResponse,
    LogitBackend,
    OpenAIHTTPBackend,
    make_backend,
)
from clipo_jax.rubrics.judge import JudgeConfig, PairInput, PairResult, PairwiseJudge, summarise
from clipo_jax.rubrics.local_backends import InProcessBackend, LogitJudge, LogitVerdictBackend
from clipo_jax.rubrics.meta_rubric import (
    MetaRubric,
    MetaRubricError,
    available_domains,
    builtin_meta_rubric,
    domain_for_query_type,
    load_meta_rubric,
)
from clipo_jax.rubrics.protocol import JudgeParseError, parse_judgment
