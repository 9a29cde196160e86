r"""Review a proposed edit of a meta-rubric file (OpenRS paper, arXiv 2602.14069: meta-rubric refinement, domain principles).

    python -m experiments.review_rubric_edit --old=clipo_jax/rubrics/meta_rubrics/math.toml \
        --new=EDIT/math.toml --input=DATA/judgebench/gpt.jsonl \
        --base_url=http://127.0.0.1:8080/v1 --model=qwen3 --cache_dir=runs/review_cache

Judges every pair under the old and the new file (the judge calls are cached, so re-running a
review, or reviewing a second edit of the same file, only pays for what changed), prints the pairs
whose verdict flips (fixed / broken / changed) and the accuracy before and after.  Nothing is
recorded unless a person passes ``--accept`` or ``--reject``; then one JSON line (decision,
reviewer, file hashes, the flips) is appended to ``--record``.  The files are never modified:
commit the accepted edit to version control as usual.
"""

from __future__ import annotations

import asyncio
import getpass
import json
import logging
import os
import sys

from absl import app, flags

from clipo_jax.rubrics import JudgeConfig
from clipo_jax.rubrics.meta_rubric import MetaRubricError
from clipo_jax.rubrics.pairs import RowError
from clipo_jax.rubrics.protocol import PromptConfig
from clipo_jax.rubrics.refine import RefineError, build_judge, load_preference_pairs, review_edit, write_review_record
from experiments import judge_backend_flags

FLAGS = flags.FLAGS
judge_backend_flags.define()
flags.DEFINE_string("old", None, "Current meta-rubric file.")
flags.DEFINE_string("new", None, "Proposed meta-rubric file (same name).")
flags.DEFINE_string("input", None, "JudgeBench-format JSONL of labelled pairs.")
flags.DEFINE_string("cache_dir", os.path.expanduser("~/.cache/clipo_jax/judge"), "Judge-call cache ('none' disables).")
flags.DEFINE_bool("ground_truth", False, "Let the verifiable path decide pairs with a ground truth.")
flags.DEFINE_integer("seed", 0, "Seed of the judge and of the A/B presentation order.")
flags.DEFINE_bool("accept", False, "Record that a person accepts the edit.")
flags.DEFINE_bool("reject", False, "Record that a person rejects the edit.")
flags.DEFINE_string("reviewer", None, "Name written in the record (default: the login name).")
flags.DEFINE_string("note", "", "Free-text note for the record.")
flags.DEFINE_string("record", None, "Review log to append to (default: reviews.jsonl next to --new).")
flags.DEFINE_string("json_out", None, "Also write the full report as JSON here.")


async def run():
    cache_dir = None if FLAGS.cache_dir == "none" else FLAGS.cache_dir
    kw = judge_backend_flags.backend_kwargs(FLAGS.backend, FLAGS.model, FLAGS.base_url, cache_dir, FLAGS.workers)
    cfg = JudgeConfig(
        max_tokens=FLAGS.max_tokens,
        parse_attempts=FLAGS.parse_attempts,
        seed=FLAGS.seed,
        use_ground_truth=FLAGS.ground_truth,
        prompt=PromptConfig(compact_chars=FLAGS.compact_chars),
    )
    judge, backend = build_judge(FLAGS.backend, cfg, **kw)
    pairs = load_preference_pairs(FLAGS.input, FLAGS.limit, FLAGS.seed)
    try:
        return await review_edit(judge, FLAGS.old, FLAGS.new, pairs)
    finally:
        await backend.aclose()


def main(argv):
    del argv
    for name in ("old", "new", "input"):
        if not getattr(FLAGS, name):
            raise app.UsageError(f"--{name} is required")
    if FLAGS.accept and FLAGS.reject:
        raise app.UsageError("pass at most one of --accept / --reject")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        report = asyncio.run(run())
    except (RefineError, MetaRubricError, RowError, OSError) as e:  # bad input: one line, exit 2
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(
        f"{report.n_pairs} pairs; accuracy (ties excluded) {report.old.accuracy:.4f} -> {report.new.accuracy:.4f}; "
        f"same {report.old.same} -> {report.new.same}; {len(report.flips)} verdicts flip"
    )
    if report.flips:
        width = max(len(f.pair_id) for f in report.flips)
        print(f"{'pair':<{width}}  {'label':<6}  {'old':<6}  {'new':<6}  effect")
        for f in report.flips:
            print(f"{f.pair_id:<{width}}  {f.label:<6}  {f.old_verdict:<6}  {f.new_verdict:<6}  {f.effect}")
    if FLAGS.json_out:
        with open(FLAGS.json_out, "w", encoding="utf-8") as fh:
            json.dump(report.as_dict(), fh, indent=2)
    if FLAGS.accept or FLAGS.reject:
        record = FLAGS.record or os.path.join(os.path.dirname(os.path.abspath(FLAGS.new)), "reviews.jsonl")
        decision = "accept" if FLAGS.accept else "reject"
        write_review_record(record, report, decision, FLAGS.reviewer or getpass.getuser(), FLAGS.note)
        print(f"recorded decision {decision!r} in {record}")
    else:
        print("no decision recorded (pass --accept or --reject after reviewing the flips)")


if __name__ == "__main__":
    app.run(main)
