"""The logit-verdict judge: a pair judged without free-form generation.

Each dimension of the routed meta-rubric (domain first, then general) is one criterion; a
``local_backends.LogitVerdictBackend`` labels every criterion of both orders from its next-token
distribution over "A" / "B" / "S" in one batched forward pass; the labels are aggregated
(``score_comparison``) and the two orders give the verdict (``verdict``), as in ``PairwiseJudge``.

Critical dimensions are asked of every pair, flaw or not, so a near-uniform distribution whose
argmax is A or B would veto everything else on noise.  A critical dimension therefore vetoes
only when its label's probability exceeds ``critical_min_prob`` (default 0.5: more likely than
the two other labels together); below that it counts as an ``important`` criterion (weight 2,
the type keeps its original name in ``given_type``).  ``critical_min_prob=0`` restores the plain
argmax veto.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Sequence

from clipo_jax.rubrics.aggregation import check_min_score, score_comparison, verdict
from clipo_jax.rubrics.meta_rubric import builtin_meta_rubric, domain_for_query_type
from clipo_jax.rubrics.types import DirectionResult, PairInput, PairResult

if TYPE_CHECKING:  # annotations only: the backend module imports this one
    from clipo_jax.rubrics.local_backends import LogitVerdictBackend


class LogitJudge:
    """A generation-free judge: the meta-rubric's dimensions (general + domain) are the criteria,
    each labelled by ``LogitVerdictBackend.criterion_labels``; both orders (A/B swap), criterion
    aggregation and the verdict as in ``PairwiseJudge``.
    Same ``judge_pair`` / ``judge_pairs`` interface and ``PairResult`` as ``PairwiseJudge`` (the
    pairwise path only: no ground-truth or constraint shortcuts)."""

    def __init__(
        self,
        backend: LogitVerdictBackend,
        min_score: float = 0.0,
        strong: float = 0.8,
        max_pairs_per_pass: int = 8,
        max_criteria: int | None = None,
        critical_min_prob: float = 0.5,
    ):
        if not 0.0 <= critical_min_prob <= 1.0:
            raise ValueError(f"critical_min_prob must be in [0, 1], got {critical_min_prob}")
        self.backend = backend
        self.critical_min_prob = float(critical_min_prob)
        self.min_score = check_min_score(min_score)
        self.strong = strong
        self.max_pairs_per_pass = max_pairs_per_pass
        self.max_criteria = max_criteria  # the first k dimensions, domain before general (cost: 2k prompts a pair)

    def _criteria(self, pair: PairInput) -> tuple[str, list[dict[str, Any]]]:
        domain_name = pair.domain or domain_for_query_type(pair.query_type)
        general = pair.general or builtin_meta_rubric("general")
        domain = pair.meta_rubric or (None if domain_name == "general" else builtin_meta_rubric(domain_name))
        dims = (list(domain.dimensions) if domain is not None else []) + list(general.dimensions)
        if self.max_criteria:
            dims = dims[: self.max_criteria]
        return domain_name, [d.to_dict() for d in dims]

    def _gate_critical(self, criterion: dict[str, Any]) -> dict[str, Any]:
        """A critical criterion whose A / B label is not more likely than ``critical_min_prob``
        becomes an ``important`` one (no veto); any other criterion is returned unchanged."""
        label = criterion.get("label")
        if criterion.get("type") != "critical" or label not in ("A", "B"):
            return criterion
        if float((criterion.get("probs") or {}).get(label, 1.0)) > self.critical_min_prob:
            return criterion
        return {**criterion, "type": "important", "given_type": "critical"}

    def judge_pairs_sync(self, pairs: Sequence[PairInput]) -> list[PairResult]:
        results = []
        for start in range(0, len(pairs), self.max_pairs_per_pass):
            chunk = pairs[start : start + self.max_pairs_per_pass]
            items, spans = [], []
            for p in chunk:
                domain_name, crits = self._criteria(p)
                lo = len(items)
                items += [(p.query, p.first, p.second, c) for c in crits]
                items += [(p.query, p.second, p.first, c) for c in crits]
                spans.append((domain_name, lo, len(crits)))
            labelled = [self._gate_critical(c) for c in self.backend.criterion_labels(items, self.strong)]
            for p, (domain_name, lo, k) in zip(chunk, spans):
                fwd, bwd = labelled[lo : lo + k], labelled[lo + k : lo + 2 * k]
                f, b = score_comparison(fwd), score_comparison(bwd)
                results.append(
                    PairResult(
                        verdict(f, b, self.min_score),
                        "pairwise",
                        domain_name,
                        forward=DirectionResult(f, fwd, True),
                        backward=DirectionResult(b, bwd, True),
                        pair_id=p.pair_id,
                    )
                )
        return results

    async def judge_pairs(self, pairs: Sequence[PairInput], **_) -> list[PairResult]:
        return await asyncio.to_thread(self.judge_pairs_sync, list(pairs))

    async def judge_pair(self, pair: PairInput) -> PairResult:
        return (await self.judge_pairs([pair]))[0]
