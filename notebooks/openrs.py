# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # OpenRS: meta-rubric -> adaptive rubric -> criteria -> aggregation -> verdict
#
# The OpenRS pairwise judge (arXiv 2602.14069, `clipo_jax/rubrics/`) on real JudgeBench pairs
# (`tests/data/judgebench/gpt_sample.jsonl`: an MMLU-Pro question, a correct GPT-4o response and an
# incorrect one). For each pair the judge
#
# 1. routes the query type to a **meta-rubric** (general principles + a domain file);
# 2. asks the LLM to write an **adaptive rubric** for this query: a few typed **criteria** chosen from
#    those principles, each compared across the two responses (label A/B/S, score 0-2);
# 3. **aggregates** the criteria outside the LLM (weights core 5 / important 2 / highlight 1, a
#    critical criterion vetoes the rest);
# 4. judges both orders (A/B swap) and turns the two scores into a **verdict**: first / second / same.
#
# **Judge.** By default the LLM calls are answered from a recorded transcript
# (`notebooks/data/openrs_judge_transcript.jsonl`: real completions of SmolLM2-135M-Instruct served
# by llama-cpp-python with JSON-schema constrained decoding), through `ReplayBackend`, so the
# notebook runs without a server. Set `OPENRS_JUDGE_URL=http://HOST:PORT/v1` (and optionally
# `OPENRS_JUDGE_MODEL`) to judge live against any OpenAI-compatible server; add
# `OPENRS_RECORD=PATH` to write a new transcript of the live calls. A 135M model is a plumbing-level
# judge: the point here is the pipeline, not its accuracy.

# %%
import asyncio
import concurrent.futures
import dataclasses
import os
import pathlib

import jax.numpy as jnp
import numpy as np

from clipo_jax.rubrics import (
    JudgeConfig,
    OpenAIHTTPBackend,
    PairwiseJudge,
    aggregate_scores,
    batch_verdicts,
    builtin_meta_rubric,
    domain_for_query_type,
    load_meta_rubric,
    pad_criteria,
    pvr,
    score_comparison,
    summarise,
    verdict,
)
from clipo_jax.rubrics.aggregation import TYPE_WEIGHTS
from clipo_jax.rubrics.pairs import scan_pair_rows, to_pair
from clipo_jax.rubrics.protocol import PromptConfig, build_pairwise_messages, judgment_schema
from clipo_jax.rubrics.replay import RecordingBackend, ReplayBackend

ROOT = next(p for p in [pathlib.Path.cwd(), *pathlib.Path.cwd().parents] if (p / "clipo_jax").is_dir())
TRANSCRIPT = ROOT / "notebooks" / "data" / "openrs_judge_transcript.jsonl"
JUDGE_URL = os.environ.get("OPENRS_JUDGE_URL")
RECORD = os.environ.get("OPENRS_RECORD")


def run(coro):
    """Runs a coroutine to completion, also inside Jupyter (whose own event loop is already running)."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


if JUDGE_URL:
    backend = OpenAIHTTPBackend(JUDGE_URL, os.environ.get("OPENRS_JUDGE_MODEL", "smollm2"), timeout_s=300)
    if RECORD:
        backend = RecordingBackend(backend, RECORD)
    print("live judge at", JUDGE_URL, "(recording to " + RECORD + ")" if RECORD else "")
else:
    backend = ReplayBackend(TRANSCRIPT)
    print(f"replaying {len(backend.responses)} recorded completions from {TRANSCRIPT.relative_to(ROOT)}")

# %% [markdown]
# ## The pairs
#
# Three JudgeBench pairs (the file's rows are validated as the judge CLI does; a row with, e.g., a
# list as its ground truth is reported and skipped). `to_pair` shows the correct ("chosen") response first or second by a
# seeded coin per pair, so a judge that always prefers one position cannot score well; `label` is
# the correct verdict.

# %%
scan = scan_pair_rows(ROOT / "tests" / "data" / "judgebench" / "gpt_sample.jsonl")  # invalid rows are listed, not kept
rows = scan.rows
wanted = ["mmlu-pro-history", "mmlu-pro-physics", "mmlu-pro-economics"]
rows = [next(r for r in rows if r["query_type"] == qt) for qt in wanted]
pairs, labels = map(list, zip(*(to_pair(r, seed=0) for r in rows)))
print(f"{len(scan.rows)} valid rows, {len(scan.invalid)} invalid")
for p, label in zip(pairs, labels):
    print(f"{p.query_type:<20} correct verdict: {label:<7} ground truth: {p.ground_truth}   query: {p.query[:70]!r}...")

# %% [markdown]
# ## The verifiable path (no LLM)
#
# These rows carry a ground truth (the MMLU-Pro letter). The judge checks a ground truth in every
# domain: its first path scores each response +1 / 0 / -1 against it (a choice letter
# programmatically, anything else with one LLM yes/no call) and decides without the pairwise
# comparison when the scores differ. Below, the programmatic check on its own.

# %%
for p, label in zip(pairs, labels):
    s = [pvr.ground_truth_score(r, p.ground_truth, "auto") for r in (p.first, p.second)]
    print(f"{p.query_type:<20} scores first/second {s}  -> correct verdict {label}")

# %% [markdown]
# To show the rubric path, the rest of the notebook judges the same pairs with the ground truth
# switched off (`use_ground_truth=False`), as for open-ended queries with no reference.
#
# ## 1. Meta-rubric
#
# The query type is routed to a domain (`meta_rubrics/routing.toml`); the prompt carries the general
# principles plus the domain's. Each dimension has a type (core / important / highlight / critical).
# The recorded transcript is keyed by the exact prompt, so this notebook judges with a snapshot of two
# meta-rubric files stored next to it (`notebooks/data/meta_rubrics/`: the general file and the
# `factual_qa` domain the transcript was recorded with), passed to the judge per pair
# (`PairInput.general`, `PairInput.meta_rubric`: the same override a meta-rubric under review uses);
# edits to the built-in files do not invalidate the transcript. The cell prints where the routing
# table sends each query type today and whether the snapshot still equals the built-in files.

# %%
for p in pairs:
    print(f"routing: {p.query_type} -> {domain_for_query_type(p.query_type)}")
domain_name = "factual_qa"  # the snapshot the transcript was recorded with, used for all three pairs
snapshot = ROOT / "notebooks" / "data" / "meta_rubrics"
general = load_meta_rubric(snapshot / "general.toml")
domain = load_meta_rubric(snapshot / f"{domain_name}.toml")
for rubric in (general, domain):
    builtin = builtin_meta_rubric(rubric.name)
    same = rubric.render() == builtin.render()  # what the prompt carries
    print(f"snapshot {rubric.name}.toml {'equals' if same else 'differs from'} the built-in file")
pairs = [dataclasses.replace(p, general=general, meta_rubric=domain, domain=domain_name) for p in pairs]
print(f"judged with the snapshot domain {domain_name!r}\n")
for rubric in (general, domain):
    print(f"{rubric.title} ({rubric.name}): {len(rubric.dimensions)} dimensions")
    for d in rubric.dimensions:
        scope = f" [{d.critical_scope}]" if d.critical_scope else ""
        print(f"  {d.type:<10} {d.id:<28} {d.title}{scope}")

# %% [markdown]
# ## 2. Adaptive rubric: the request
#
# For one order (A = first response) the judge sends the principles, the procedure (intent ->
# differences -> choose criteria -> compare) and both responses, and asks for JSON matching a schema
# (sent as `response_format`, so a llama.cpp or vLLM server decodes under that constraint). The
# settings are sized for a 135M judge on a CPU: responses cut to 400 characters (head and tail kept),
# 1-3 criteria, free-text fields of at most 40 characters.

# %%
config = JudgeConfig(
    max_tokens=300,
    parse_attempts=2,
    use_ground_truth=False,
    prompt=PromptConfig(min_criteria=1, max_criteria=3, max_response_chars=400, compact_chars=40),
)
messages = build_pairwise_messages(pairs[0].query, pairs[0].first, pairs[0].second, general, domain, config.prompt)
user = messages[1]["content"]
print(f"system: {messages[0]['content'][:120]}...\n")
print(f"user message: {len(user)} characters; the procedure part:\n")
print(user[user.index("# Procedure") : user.index("# User query")])
schema = judgment_schema(1, config.prompt.max_criteria, compact_chars=config.prompt.compact_chars)
print("criterion fields:", list(schema["properties"]["criteria"]["items"]["properties"]))

# %% [markdown]
# ## 3. Criteria: judge the pairs (both orders)

# %%
judge = PairwiseJudge(backend, config)


async def judge_all():
    try:
        return await judge.judge_pairs(pairs)
    finally:
        await backend.aclose()  # the HTTP client's session lives in this event loop


results = run(judge_all())
for p, r in zip(pairs, results):
    print(f"\n=== {p.query_type} (domain {r.domain}, path {r.path})")
    for name, d in (("forward  (A = first) ", r.forward), ("backward (A = second)", r.backward)):
        print(f"  {name}: parsed {d.parse_ok} after {d.attempts} attempt(s), {d.completion_tokens} tokens")
        for c in d.criteria or []:
            print(f"      {c['type']:<10} label {c['label']} score {c['score']:+d}  {c['title']!r}")
        if not d.parse_ok:
            print(f"      no criteria: {d.error_kind}: {str(d.error)[:100]}")
print("\njudge counters:", {k: v for k, v in judge.counters.as_dict().items() if v})
if isinstance(backend, ReplayBackend):
    print(f"transcript: {backend.hits} calls answered, {backend.misses} not found")
    assert backend.misses == 0, "the transcript does not match these requests: record it again (see top)"

# %% [markdown]
# ## 4. Aggregation
#
# One direction's A-side score: with no critical criterion, the weighted mean of label-signed
# scores, `sum_c w_c * sign_c * |score_c| / sum_c w_c` over criteria with a nonzero score; with any
# critical criterion, the sum of the critical ones alone. Below, that formula in numpy, the library's
# `score_comparison` (what the judge used) and the batched, jitted `aggregate_scores` agree.


# %%
def by_hand(criteria):
    if criteria is None:
        return 0.0
    sign = {"A": 1, "B": -1, "S": 0}
    active = [c for c in criteria if c["score"] != 0]
    crit = [sign[c["label"]] * abs(c["score"]) for c in active if c["type"] == "critical"]
    if crit:
        return float(np.sum(crit))
    w = np.array([TYPE_WEIGHTS[c["type"]] for c in active])
    v = np.array([sign[c["label"]] * abs(c["score"]) for c in active])
    return float((w * v).sum() / (w.sum() + 1e-6)) if active else 0.0


directions = [d for r in results for d in (r.forward, r.backward)]
arrays = pad_criteria([d.criteria for d in directions])
batched = np.asarray(
    aggregate_scores(*(jnp.asarray(arrays[k]) for k in ("types", "labels", "scores", "mask", "parse_ok")))
)
print(f"{'direction':<28}{'by hand':>9}{'library':>9}{'batched':>9}")
for i, d in enumerate(directions):
    hand, lib = by_hand(d.criteria), score_comparison(d.criteria)
    print(
        f"{pairs[i // 2].query_type + (' fwd' if i % 2 == 0 else ' bwd'):<28}{hand:>9.3f}{lib:>9.3f}{batched[i]:>9.3f}"
    )
    assert abs(hand - lib) < 1e-5 and abs(lib - d.score) < 1e-9 and abs(lib - batched[i]) < 1e-5

# %% [markdown]
# ## 5. Verdict
#
# `first` when the forward score is > m and the backward score <= -m (A wins in one order and loses
# in the other), `second` symmetrically, else `same` (threshold m = `min_score` = 0). A judge that
# prefers position A in both orders therefore gives `same`, not a win. A direction whose output never
# parsed (or whose call failed for good) makes the pair an `error`: the other direction alone never
# decides it. Summaries then either leave errors out (`error_policy="exclude"`, as JudgeBench reports)
# or count them as ties (`"tie"`).

# %%
fwd, bwd = batched[0::2], batched[1::2]
names = {1: "first", 0: "same", -1: "second"}
vectorised = [names[int(v)] for v in batch_verdicts(jnp.asarray(fwd), jnp.asarray(bwd))]
for p, r, label, f, b, v in zip(pairs, results, labels, fwd, bwd, vectorised):
    if r.forward.parse_ok and r.backward.parse_ok:
        assert r.verdict == verdict(r.forward.score, r.backward.score) == v
    else:
        assert r.verdict == "error"
    print(f"{p.query_type:<20} forward {f:+.2f} backward {b:+.2f} -> {r.verdict:<7} (correct: {label})")
for policy in ("exclude", "tie"):
    s = summarise(results, labels, error_policy=policy)
    print(policy, {k: s[k] for k in ("n_pairs", "n_counted", "wins", "losses", "same", "accuracy", "error_rate")})

# %% [markdown]
# The verifiable path above decided all three pairs correctly from the ground truth. The rubric path
# with a 135M judge does not: its criteria are shallow, its labels do not follow the evidence, and
# its output sometimes breaks the schema (an error verdict). The pipeline and its arithmetic are
# what this notebook demonstrates; judge accuracy needs a capable model behind `OPENRS_JUDGE_URL`,
# e.g. the JudgeBench run `python -m experiments.judge --input=tests/data/judgebench/gpt_sample.jsonl
# --base_url=URL --model=NAME --output_dir=DIR`.
