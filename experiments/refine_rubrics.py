r"""Evolutionary refinement of the general principles (OpenRS paper, arXiv 2602.14069: meta-rubric refinement) over labelled pairs.

    python -m experiments.refine_rubrics --input=DATA/judgebench/gpt.jsonl --limit=60 \
        --backend=openai --base_url=http://127.0.0.1:8080/v1 --model=qwen3 \
        --output_dir=runs/refine --population=8 --generations=6 --seed=0

    # no server: SmolLM2 in-process reads the verdicts from its logits, programmatic edits only
    python -m experiments.refine_rubrics --input=... --backend=logit --model=smollm2 \
        --mutation=programmatic --output_dir=runs/refine_logit --limit=16

Writes ``DIR/generations.jsonl`` (one record per generation: every variant's train fitness,
the champion's held-out fitness, counters), ``DIR/general.toml`` (the best variant, a valid
meta-rubric file) and ``DIR/summary.json``.  Judge calls are cached under ``DIR/cache``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys

from absl import app, flags

from clipo_jax.rubrics import JudgeConfig, builtin_meta_rubric, load_meta_rubric
from clipo_jax.rubrics.meta_rubric import MetaRubricError
from clipo_jax.rubrics.pairs import RowError
from clipo_jax.rubrics.protocol import PromptConfig
from clipo_jax.rubrics.refine import (
    RefineConfig,
    RefineError,
    build_judge,
    load_preference_pairs,
    refine,
    write_meta_rubric,
)
from clipo_jax.rubrics.registry import make_backend
from experiments import judge_backend_flags

FLAGS = flags.FLAGS
judge_backend_flags.define()
flags.DEFINE_string("input", None, "JudgeBench-format JSONL (prompt, chosen, rejected).")
flags.DEFINE_string("output_dir", None, "Where generations.jsonl, general.toml, summary.json go.")
flags.DEFINE_string("initial", None, "Initial meta-rubric file (default: the shipped general.toml).")
flags.DEFINE_string("cache_dir", None, "Judge-call cache (default DIR/cache; 'none' disables).")
flags.DEFINE_integer("max_response_chars", 6000, "Per-response character budget in the prompt.")
flags.DEFINE_bool(
    "ground_truth",
    False,
    "Let the verifiable path decide pairs with a ground truth (off: every pair measures the rubric).",
)
flags.DEFINE_string(
    "proposer_base_url",
    None,
    "Separate OpenAI-compatible server proposing edits (default: the judge backend proposes).",
)
flags.DEFINE_string("proposer_model", None, "Model name on the proposer server.")
flags.DEFINE_enum("mutation", "auto", ["auto", "llm", "programmatic"], "Where edits come from.")
flags.DEFINE_integer("population", 8, "Variants per generation.")
flags.DEFINE_integer("generations", 6, "Generations after the initial one.")
flags.DEFINE_integer("elite", 2, "Best variants kept unchanged each generation.")
flags.DEFINE_integer("tournament", 3, "Tournament size for parent selection.")
flags.DEFINE_float("length_penalty", 0.02, "Fitness cost per 1000 characters of rubric.")
flags.DEFINE_float("heldout_fraction", 0.3, "Share of pairs held out to pick the final variant.")
flags.DEFINE_integer("seed", 0, "Seed of the split, the edits, the selection and the judge.")


async def run(out_dir: str) -> dict:
    cache_dir = None if FLAGS.cache_dir == "none" else (FLAGS.cache_dir or os.path.join(out_dir, "cache"))
    pairs = load_preference_pairs(FLAGS.input, FLAGS.limit, FLAGS.seed)
    judge_cfg = JudgeConfig(
        max_tokens=FLAGS.max_tokens,
        parse_attempts=FLAGS.parse_attempts,
        seed=FLAGS.seed,
        use_ground_truth=FLAGS.ground_truth,
        prompt=PromptConfig(compact_chars=FLAGS.compact_chars, max_response_chars=FLAGS.max_response_chars),
    )
    judge, backend = build_judge(
        FLAGS.backend,
        judge_cfg,
        **judge_backend_flags.backend_kwargs(
            FLAGS.backend, FLAGS.model, FLAGS.base_url, cache_dir, FLAGS.workers, FLAGS.seed
        ),
    )
    proposer = backend
    if FLAGS.proposer_base_url:
        proposer = make_backend(
            "openai",
            **judge_backend_flags.backend_kwargs(
                "openai", FLAGS.proposer_model, FLAGS.proposer_base_url, cache_dir, FLAGS.workers, FLAGS.seed
            ),
        )
    initial = load_meta_rubric(FLAGS.initial) if FLAGS.initial else builtin_meta_rubric("general")
    cfg = RefineConfig(
        population=FLAGS.population,
        generations=FLAGS.generations,
        elite=FLAGS.elite,
        tournament=FLAGS.tournament,
        length_penalty=FLAGS.length_penalty,
        heldout_fraction=FLAGS.heldout_fraction,
        seed=FLAGS.seed,
        mutation=FLAGS.mutation,
    )
    try:
        result = await refine(
            judge, initial, pairs, cfg, proposer=proposer, log_path=os.path.join(out_dir, "generations.jsonl")
        )
    finally:
        await backend.aclose()
        if proposer is not backend:
            await proposer.aclose()
    path = write_meta_rubric(result.best.rubric, out_dir)
    return {
        "input": FLAGS.input,
        "n_pairs": len(pairs),
        "n_train": len(result.train_ids),
        "n_heldout": len(result.heldout_ids),
        "best_file": str(path),
        "initial": result.initial.record(),
        "best": result.best.record(),
        "counters": result.counters.as_dict(),
        "backend": getattr(backend, "stats").as_dict() if hasattr(backend, "stats") else None,
    }


def main(argv):
    del argv
    if not FLAGS.input or not FLAGS.output_dir:
        raise app.UsageError("--input and --output_dir are required")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    os.makedirs(FLAGS.output_dir, exist_ok=True)
    try:
        summary = asyncio.run(run(FLAGS.output_dir))
    except (RefineError, MetaRubricError, RowError, OSError) as e:  # bad input: one line, exit 2
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    with open(os.path.join(FLAGS.output_dir, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    init, best = summary["initial"], summary["best"]
    print(
        f"initial  train fitness {init['train']['fitness']:.4f}  heldout {init['heldout']['fitness']:.4f}  "
        f"({init['length_chars']} chars)"
    )
    print(
        f"best     train fitness {best['train']['fitness']:.4f}  heldout {best['heldout']['fitness']:.4f}  "
        f"({best['length_chars']} chars, {best['mutation']})"
    )
    print(f"wrote {summary['best_file']}")


if __name__ == "__main__":
    app.run(main)
