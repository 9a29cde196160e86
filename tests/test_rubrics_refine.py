"""Meta-rubric refinement (OpenRS paper, arXiv 2602.14069: meta-rubric refinement) against a real local OpenAI-compatible HTTP server.

The server is the LLM stand-in with a scripted, deterministic policy:
* judging: each query names the dimension it needs ("needs=<id>"); when the principles in the
  prompt contain that dimension the judge prefers the GOOD response, otherwise it falls for the
  longer (BAD) one.  So a rubric's accuracy is exactly the share of pairs whose dimension it has;
* proposing edits: asked for ``add_dimension`` it proposes the first needed dimension that is
  missing, asked for ``delete_dimension`` it deletes a dimension no pair needs, anything else
  gets prose (unusable, so the refiner must fall back to a programmatic mutation and count it).
"""

import http.server
import json
import os
import re
import subprocess
import sys
import threading

import pytest

from clipo_jax.rubrics import JudgeConfig, OpenAIHTTPBackend, PairwiseJudge
from clipo_jax.rubrics.meta_rubric import (
    MetaRubricError,
    builtin_meta_rubric,
    load_meta_rubric,
    parse_meta_rubric,
)
from clipo_jax.rubrics.refine import (
    MUTATIONS,
    MutationPool,
    RefineConfig,
    RefineError,
    apply_edit,
    compute_fitness,
    load_preference_pairs,
    programmatic_mutation,
    refine,
    review_edit,
    write_meta_rubric,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Needed dimensions: two already in general.toml, three only in domain files.
NEEDS = ["completeness"] * 3 + ["clarity"] * 3 + ["concision"] * 5 + ["final_answer"] * 5 + ["fluency"] * 4
TARGET_ORDER = ["concision", "final_answer", "fluency"]
POOL = {d.id: d for d in MutationPool.from_domains().dimensions}
DIM_LINE = re.compile(r"^- \[[a-z]+(?:, scope: [a-z]+)?\] ([a-z0-9_]+):", re.MULTILINE)


def principles_ids(user: str) -> set:
    return set(DIM_LINE.findall(user.split("# Procedure")[0]))


def judge_answer(user: str) -> dict:
    need = re.search(r"needs=([a-z_]+)", user).group(1)
    a = re.search(r"<response_a>\n(.*?)\n</response_a>", user, re.DOTALL).group(1)
    b = re.search(r"<response_b>\n(.*?)\n</response_b>", user, re.DOTALL).group(1)
    if need in principles_ids(user):
        label = "A" if "GOOD" in a else "B"
    else:
        label = "A" if len(a) > len(b) else "B"
    return {
        "intent": {"task": "t", "explicit_requirements": [], "implicit_requirements": []},
        "differences": ["d"],
        "criteria": [
            {"id": need, "title": need, "type": "core", "evidence": "e", "reason": "r", "label": label, "score": 2}
        ],
    }


def edit_answer(user: str) -> str:
    op = re.search(r'exactly ONE edit of kind "([a-z_]+)"', user).group(1)
    have = set(re.findall(r'^id = "([a-z0-9_]+)"', user, re.MULTILINE))
    if op == "add_dimension":
        for t in TARGET_ORDER:
            if t not in have:
                d = POOL[t]
                return json.dumps({"op": op, "dimension": d.to_dict(), "rationale": "missing"})
    if op == "delete_dimension":
        for d in sorted(have - set(NEEDS)):
            if d not in ("answers_the_question",):
                return "```json\n" + json.dumps({"op": op, "dimension_id": d}) + "\n```"
    return "I would rather not change anything."


class Handler(http.server.BaseHTTPRequestHandler):
    counts = None

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        user = body["messages"][-1]["content"]
        if "<response_a>" in user:
            content, kind = "```json\n" + json.dumps(judge_answer(user)) + "\n```", "judge"
        elif "exactly ONE edit of kind" in user:
            content, kind = edit_answer(user), "edit"
        else:
            content, kind = "{}", "other"
        with self.lock:
            self.counts[kind] = self.counts.get(kind, 0) + 1
        data = json.dumps(
            {
                "choices": [{"message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1},
            }
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture()
def server():
    counts = {}
    handler = type("H", (Handler,), {"counts": counts, "lock": threading.Lock()})
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/v1", counts
    srv.shutdown()
    srv.server_close()


def write_pairs(path, needs=NEEDS):
    with open(path, "w") as f:
        for i, need in enumerate(needs):
            f.write(
                json.dumps(
                    {
                        "question_id": f"q{i:02d}",
                        "prompt": f"Task {i} (needs={need})",
                        "chosen": f"GOOD answer {i}",
                        "rejected": f"BAD answer {i} " + "padding " * 8,
                    }
                )
                + "\n"
            )
    return path


def expected_accuracy(ids: set, pair_ids, needs=NEEDS) -> float:
    """Independent reference of the scripted judge: right iff the needed dimension is present."""
    idx = [int(p[1:]) for p in pair_ids]
    return sum(needs[i] in ids for i in idx) / len(idx)


def make_judge(url, cache_dir=None):
    backend = OpenAIHTTPBackend(url, "scripted", max_concurrency=16, cache_dir=cache_dir, json_schema=False)
    return PairwiseJudge(backend, JudgeConfig(parse_attempts=1, use_ground_truth=False)), backend


def strip_wall(lines):
    out = []
    for line in lines:
        rec = json.loads(line)
        rec.pop("wall_s", None)
        out.append(rec)
    return out


async def _refine(url, pairs_path, log_path, cfg):
    judge, backend = make_judge(url)
    pairs = load_preference_pairs(pairs_path)
    try:
        return await refine(judge, builtin_meta_rubric("general"), pairs, cfg, proposer=backend, log_path=log_path)
    finally:
        await backend.aclose()


def test_refinement_improves_and_is_reproducible(server, tmp_path):
    import asyncio

    url, counts = server
    pairs_path = write_pairs(tmp_path / "pairs.jsonl")
    cfg = RefineConfig(population=6, generations=4, elite=2, seed=3, length_penalty=0.02)
    r1 = asyncio.run(_refine(url, pairs_path, tmp_path / "log1.jsonl", cfg))
    r2 = asyncio.run(_refine(url, pairs_path, tmp_path / "log2.jsonl", cfg))
    log1 = (tmp_path / "log1.jsonl").read_text().splitlines()
    log2 = (tmp_path / "log2.jsonl").read_text().splitlines()
    assert strip_wall(log1) == strip_wall(log2)  # reproducible from the seed
    assert r1.best.rubric.to_toml() == r2.best.rubric.to_toml()
    recs = strip_wall(log1)
    assert recs[0]["event"] == "start" and recs[-1]["event"] == "end"
    assert [r["generation"] for r in recs[1:-1]] == list(range(cfg.generations + 1))

    # Fitness improves on the training split and on the held-out split.
    assert r1.best.train.fitness > r1.initial.train.fitness
    assert r1.best.heldout.accuracy > r1.initial.heldout.accuracy
    # Champions never get worse on train (elitism).
    champs = [r["champion"]["train"]["fitness"] for r in recs[1:-1]]
    assert champs == sorted(champs)

    # Logged fitness equals the independent reference for the written best file.
    path = write_meta_rubric(r1.best.rubric, tmp_path / "out")
    best = load_meta_rubric(path)
    ids = {d.id for d in best.dimensions}
    for split, pair_ids in (("train", recs[0]["train_ids"]), ("heldout", recs[0]["heldout_ids"])):
        acc = expected_accuracy(ids, pair_ids)
        got = recs[-1]["best"][split]
        assert got["accuracy"] == pytest.approx(acc)
        assert got["fitness"] == pytest.approx(acc - 0.02 * len(best.render()) / 1000)
    init_ids = {d.id for d in builtin_meta_rubric("general").dimensions}
    assert recs[0]["initial"]["train"]["accuracy"] == pytest.approx(expected_accuracy(init_ids, recs[0]["train_ids"]))
    assert set(recs[0]["train_ids"]).isdisjoint(recs[0]["heldout_ids"])
    assert len(recs[0]["train_ids"]) + len(recs[0]["heldout_ids"]) == len(NEEDS)

    # Both edit sources were used; unusable LLM answers were counted and replaced.
    c = r1.counters
    assert c.llm_accepted > 0 and c.llm_fallbacks > 0
    assert c.llm_proposals == c.llm_accepted + c.llm_fallbacks
    assert c.programmatic == c.llm_fallbacks
    sources = {v["source"] for r in recs[1:-1] for v in r["population"]}
    assert {"llm", "programmatic"} <= sources


def test_programmatic_only_needs_no_proposer(server, tmp_path):
    import asyncio

    url, counts = server
    pairs_path = write_pairs(tmp_path / "pairs.jsonl")
    cfg = RefineConfig(population=4, generations=2, seed=1, mutation="programmatic")
    r = asyncio.run(_refine(url, pairs_path, tmp_path / "log.jsonl", cfg))
    assert counts.get("edit", 0) == 0 and r.counters.llm_proposals == 0
    assert r.counters.programmatic == (cfg.population - 1) + cfg.generations * (cfg.population - cfg.elite)
    with pytest.raises(RefineError, match="needs a proposer"):
        RefineConfig(mutation="llm") and __import__("clipo_jax.rubrics.refine", fromlist=["Refiner"]).Refiner(
            None, RefineConfig(mutation="llm")
        )


def test_compute_fitness_reference():
    verdicts = ["first", "second", "same", "first", "second"]
    labels = ["first", "first", "first", "second", "second"]
    f = compute_fitness(verdicts, labels, 1500, 0.1)
    # wins 2 (0, 4), losses 2 (1, 3), same 1
    assert (f.wins, f.losses, f.same) == (2, 2, 1)
    assert f.accuracy == 0.5 and f.fitness == pytest.approx(0.5 - 0.15)
    assert f.correct == (True, False, False, False, True)
    assert compute_fitness(["same"], ["first"], 0, 0.0).accuracy == 0.0


def test_programmatic_mutations_keep_files_valid():
    import random

    pool = MutationPool.from_domains()
    for seed in range(30):
        rng = random.Random(seed)
        rubric = builtin_meta_rubric("general")
        for _ in range(8):
            new, desc = programmatic_mutation(rubric, rng, pool)
            assert new.to_toml() != rubric.to_toml() and desc
            parse_meta_rubric(new.to_toml(), "<t>", expect_name="general")
            rubric = new
    one = builtin_meta_rubric("general")
    one = one.__class__(one.name, one.title, one.description, one.dimensions[:1])
    assert MUTATIONS["delete_dimension"](one, random.Random(0), pool) is None  # never empties a file


def test_apply_edit_ops_and_errors():
    g = builtin_meta_rubric("general")
    new, _ = apply_edit(g, {"op": "add_dimension", "dimension": POOL["concision"].to_dict()})
    assert [d.id for d in new.dimensions][-1] == "concision"
    new, _ = apply_edit(g, {"op": "delete_dimension", "dimension_id": "clarity"})
    assert "clarity" not in {d.id for d in new.dimensions} and len(new.dimensions) == len(g.dimensions) - 1
    new, _ = apply_edit(g, {"op": "rewrite_item", "dimension_id": "clarity", "item_index": 0, "item": "Plain words."})
    assert dict((d.id, d) for d in new.dimensions)["clarity"].items[0] == "Plain words."
    new, _ = apply_edit(g, {"op": "delete_item", "dimension_id": "clarity", "item_index": 1})
    assert len(dict((d.id, d) for d in new.dimensions)["clarity"].items) == 1
    with pytest.raises(RefineError, match="no dimension 'nope'"):
        apply_edit(g, {"op": "delete_dimension", "dimension_id": "nope"})
    with pytest.raises(RefineError, match="item_index 9 out of range"):
        apply_edit(g, {"op": "delete_item", "dimension_id": "clarity", "item_index": 9})
    with pytest.raises(RefineError, match="schema"):
        apply_edit(g, {"op": "explode"})
    with pytest.raises(MetaRubricError, match="duplicate id 'clarity'"):
        apply_edit(
            g, {"op": "add_dimension", "dimension": {"id": "clarity", "title": "t", "type": "core", "items": ["x"]}}
        )
    with pytest.raises(MetaRubricError, match="critical_scope"):
        apply_edit(
            g, {"op": "add_dimension", "dimension": {"id": "z", "title": "t", "type": "critical", "items": ["x"]}}
        )


def test_load_preference_pairs_errors(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text(
        json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"})
        + "\n"
        + json.dumps({"prompt": "q", "chosen": 3, "rejected": "b"})
        + "\n"
    )
    with pytest.raises(RefineError, match=r"bad.jsonl:2: field 'chosen' must be a string"):
        load_preference_pairs(p)
    p.write_text("{oops\n")
    with pytest.raises(RefineError, match=r"bad.jsonl:1: not valid JSON"):
        load_preference_pairs(p)
    pairs = load_preference_pairs(write_pairs(tmp_path / "ok.jsonl"), seed=0)
    firsts = [l for _, l in pairs]
    assert set(firsts) == {"first", "second"}  # the chosen side is shuffled
    for pair, label in pairs:
        assert "GOOD" in (pair.first if label == "first" else pair.second)


# ---------------------------------------------------------------------------------------- review


def domain_edit(tmp_path):
    """old: the shipped math rubric; new: + concision, - notation."""
    old_dir, new_dir = tmp_path / "old", tmp_path / "new"
    old_dir.mkdir()
    new_dir.mkdir()
    math = builtin_meta_rubric("math")
    (old_dir / "math.toml").write_text(math.to_toml())
    dims = [d for d in math.dimensions if d.id != "notation"] + [POOL["concision"]]
    (new_dir / "math.toml").write_text(math.__class__(math.name, math.title, math.description, tuple(dims)).to_toml())
    return old_dir / "math.toml", new_dir / "math.toml"


REVIEW_NEEDS = ["concision", "notation", "final_answer", "completeness", "fluency", "concision", "notation"]


def expected_flips():
    old_ids = {d.id for d in builtin_meta_rubric("general").dimensions} | {
        d.id for d in builtin_meta_rubric("math").dimensions
    }
    new_ids = (old_ids - {"notation"}) | {"concision"}
    return {f"q{i:02d}" for i, n in enumerate(REVIEW_NEEDS) if (n in old_ids) != (n in new_ids)}


def test_review_edit_lists_exactly_the_flips(server, tmp_path):
    import asyncio

    url, counts = server
    old, new = domain_edit(tmp_path)
    pairs = load_preference_pairs(write_pairs(tmp_path / "pairs.jsonl", REVIEW_NEEDS))
    judge, backend = make_judge(url)

    async def go():
        try:
            return await review_edit(judge, old, new, pairs)
        finally:
            await backend.aclose()

    report = asyncio.run(go())
    assert {f.pair_id for f in report.flips} == expected_flips() == {"q00", "q01", "q05", "q06"}
    effects = {f.pair_id: f.effect for f in report.flips}
    assert effects == {"q00": "fixed", "q05": "fixed", "q01": "broken", "q06": "broken"}
    assert report.old.accuracy == pytest.approx(
        expected_accuracy(
            {d.id for d in builtin_meta_rubric("general").dimensions}
            | {"final_answer", "derivation_validity", "method_choice", "notation"},
            [f"q{i:02d}" for i in range(len(REVIEW_NEEDS))],
            REVIEW_NEEDS,
        )
    )


def run_cli(args):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu")
    return subprocess.run(
        [sys.executable, "-m", "experiments.review_rubric_edit", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_review_cli_records_only_on_explicit_decision(server, tmp_path):
    url, counts = server
    old, new = domain_edit(tmp_path)
    pairs_path = write_pairs(tmp_path / "pairs.jsonl", REVIEW_NEEDS)
    record = tmp_path / "reviews.jsonl"
    common = [
        f"--old={old}",
        f"--new={new}",
        f"--input={pairs_path}",
        f"--base_url={url}",
        "--model=scripted",
        f"--cache_dir={tmp_path / 'cache'}",
        f"--record={record}",
        "--parse_attempts=1",
    ]
    out = run_cli(common + [f"--json_out={tmp_path / 'report.json'}"])
    assert out.returncode == 0, out.stderr[-2000:]
    flipped = expected_flips()
    listed = {line.split()[0] for line in out.stdout.splitlines() if re.match(r"^q\d\d ", line)}
    assert listed == flipped
    assert {f["pair_id"] for f in json.loads((tmp_path / "report.json").read_text())["flips"]} == flipped
    assert "no decision recorded" in out.stdout and not record.exists()
    judge_calls = counts["judge"]
    assert judge_calls == 2 * 2 * len(REVIEW_NEEDS)  # two rubrics x two orders

    out = run_cli(common + ["--accept", "--reviewer=alice", "--note=looks right"])
    assert out.returncode == 0, out.stderr[-2000:]
    assert counts["judge"] == judge_calls  # second run served entirely from the cache
    recs = [json.loads(l) for l in record.read_text().splitlines()]
    assert len(recs) == 1 and recs[0]["decision"] == "accept" and recs[0]["reviewer"] == "alice"
    assert {f["pair_id"] for f in recs[0]["flips"]} == flipped
    import hashlib

    assert recs[0]["new_sha256"] == hashlib.sha256(new.read_bytes()).hexdigest()

    bad = run_cli(common + ["--accept", "--reject"])
    assert bad.returncode != 0 and "at most one" in (bad.stderr + bad.stdout)


def test_refine_cli_end_to_end(server, tmp_path):
    url, counts = server
    pairs_path = write_pairs(tmp_path / "pairs.jsonl")
    out_dir = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.refine_rubrics",
            f"--input={pairs_path}",
            f"--base_url={url}",
            "--model=scripted",
            f"--output_dir={out_dir}",
            "--population=4",
            "--generations=2",
            "--seed=5",
            "--parse_attempts=1",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    best = load_meta_rubric(out_dir / "general.toml")  # a valid meta-rubric file
    summary = json.loads((out_dir / "summary.json").read_text())
    recs = [json.loads(l) for l in (out_dir / "generations.jsonl").read_text().splitlines()]
    assert [r["event"] for r in recs] == ["start", "generation", "generation", "generation", "end"]
    assert summary["best"]["id"] == recs[-1]["best"]["id"]
    ids = {d.id for d in best.dimensions}
    assert summary["best"]["heldout"]["accuracy"] == pytest.approx(expected_accuracy(ids, recs[0]["heldout_ids"]))
    assert summary["best"]["heldout"]["fitness"] >= summary["initial"]["heldout"]["fitness"]
    assert counts["edit"] == summary["counters"]["llm_proposals"] > 0


@pytest.mark.parametrize("module", ["experiments.refine_rubrics", "experiments.review_rubric_edit"])
def test_cli_bad_pairs_file_is_one_line_and_exit_2(module, tmp_path):
    bad = tmp_path / "pairs.jsonl"
    bad.write_text(json.dumps({"prompt": "q", "chosen": 3, "rejected": "r"}) + "\n")
    rubric = write_meta_rubric(builtin_meta_rubric("general"), tmp_path)
    args = [f"--input={bad}", "--base_url=http://127.0.0.1:9", "--model=m", "--parse_attempts=1"]
    args += (
        [f"--output_dir={tmp_path / 'out'}"]
        if module.endswith("refine_rubrics")
        else [f"--old={rubric}", f"--new={rubric}"]
    )
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu")
    out = subprocess.run(
        [sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip() == f"error: {bad}:1: field 'chosen' must be a string, got int"
