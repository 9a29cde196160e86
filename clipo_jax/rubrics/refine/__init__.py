"""Meta-rubric refinement (OpenRS paper, arXiv 2602.14069: meta-rubric refinement).

Modules: ``fitness`` (labelled pairs, fitness, judging under a rubric), ``mutations`` (one
edit: programmatic or LLM-proposed), ``evolution`` (the loop), ``review`` (a person reviews a
domain edit).  Every public name is importable from ``clipo_jax.rubrics.refine``.

General principles — automated evolutionary refinement (``refine``):
  a population of meta-rubric variants; a child is its parent with ONE edit (add / delete /
  rewrite a dimension or a sub-item) proposed by an LLM through any ``Backend``, or, when no
  proposer is given or its answer is unusable, by a deterministic programmatic mutation drawn
  from the shipped domain rubrics (so refinement runs without a capable LLM);
  fitness = judge accuracy on labelled preference pairs (ties excluded, a failed judgment
  counted as wrong) minus ``length_penalty`` per 1000 characters of the rendered rubric;
  elitism + tournament
  selection on the training split; the returned variant is the generation champion with the
  best fitness on a held-out split, the initial rubric included (guards against overfitting
  the training pairs: the result is never worse than the start on held-out pairs).  Every
  random choice comes from ``random.Random`` seeded by (seed, generation, child) so a run is
  reproducible from its seed with a deterministic judge; each generation is one JSONL record.

Domain principles — human in the loop (``review_edit``):
  judge the same pairs with the old and the proposed file (judge calls are cached by the
  backend) and list the pairs whose verdict flips; a person accepts or rejects, and
  ``write_review_record`` appends that decision.

The judge is anything with ``async judge_pairs(list[PairInput]) -> list[PairResult]``
(``PairwiseJudge`` or ``logit_judge.LogitJudge``); ``build_judge`` (from ``registry``) makes one
from a backend name.
"""

from clipo_jax.rubrics.refine.evolution import (
    RefineConfig,
    RefineCounters,
    Refiner,
    RefineResult,
    Variant,
    refine,
    split_pairs,
    write_meta_rubric,
)
from clipo_jax.rubrics.refine.fitness import (
    Fitness,
    RefineError,
    compute_fitness,
    judge_under,
    load_preference_pairs,
    rubric_id,
    rubric_length,
    with_rubric,
)
from clipo_jax.rubrics.refine.mutations import (
    EDIT_PROMPT,
    EDIT_SCHEMA,
    LLM_OPS,
    MUTATIONS,
    REWRITABLE_TYPES,
    MutationPool,
    apply_edit,
    build_edit_messages,
    mutate_add_dimension,
    mutate_add_item,
    mutate_delete_dimension,
    mutate_delete_item,
    mutate_rewrite_dimension,
    programmatic_mutation,
)
from clipo_jax.rubrics.refine.review import Flip, ReviewReport, review_edit, write_review_record
from clipo_jax.rubrics.registry import build_judge

__all__ = [
    "EDIT_PROMPT",
    "EDIT_SCHEMA",
    "LLM_OPS",
    "MUTATIONS",
    "REWRITABLE_TYPES",
    "Fitness",
    "Flip",
    "MutationPool",
    "RefineConfig",
    "RefineCounters",
    "RefineError",
    "RefineResult",
    "Refiner",
    "ReviewReport",
    "Variant",
    "apply_edit",
    "build_edit_messages",
    "build_judge",
    "compute_fitness",
    "judge_under",
    "load_preference_pairs",
    "mutate_add_dimension",
    "mutate_add_item",
    "mutate_delete_dimension",
    "mutate_delete_item",
    "mutate_rewrite_dimension",
    "programmatic_mutation",
    "refine",
    "review_edit",
    "rubric_id",
    "rubric_length",
    "split_pairs",
    "with_rubric",
    "write_meta_rubric",
    "write_review_record",
]
