"""OpenRS: meta-rubrics, the pairwise adaptive judge, aggregation, PVRs, backends, group rewards."""
from clipo_jax.rubrics.aggregation import (aggregate_scores, batch_verdicts, pad_criteria,
                                           score_comparison, verdict)
