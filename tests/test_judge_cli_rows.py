"""The judge CLI never dies on one row: rows validated when read (file:line, skipped, listed in
summary.json), duplicate ids and empty input refused before any call, ``--resume`` judging failed
pairs again, constraint and ground-truth checks off the event loop.

Runs ``experiments.judge`` (in-process ``main`` and once as a command) against the real local
OpenAI-compatible HTTP server of ``test_judge_backend`` (its ``model`` picks the behaviour:
``ok`` judges by a rule, ``flaky`` answers HTTP 500 to its first two calls, ``junk-then-ok``
answers unparseable text to seed 0).
"""

import asyncio
import json
import os
import subprocess
import sys
import time

import pytest
from absl import flags
from judge_server import run_judge_cli
from test_judge_backend import server  # noqa: F401  (the real local HTTP server fixture)

from clipo_jax.rubrics import JudgeConfig, OpenAIHTTPBackend, PairInput, PairwiseJudge
from clipo_jax.rubrics.pairs import RowError, read_pair_rows, scan_pair_rows, validate_constraint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = flags.FLAGS


def good_row(i, **extra):
    row = {"question_id": f"q{i}", "query_type": "chat", "prompt": f"question {i}"}
    row.update(chosen=f"GOOD answer {i}", rejected=f"bad answer {i}")
    row.update(extra)
    return row


def write_lines(path, lines):
    """``lines``: dicts (JSON-encoded), str (written as is) or bytes (raw)."""
    with open(path, "wb") as f:
        for x in lines:
            if isinstance(x, dict):
                x = json.dumps(x)
            f.write((x.encode() if isinstance(x, str) else x) + b"\n")
    return path


run_main = run_judge_cli


def common(url, inp, out, model="ok", *extra):
    return [f"--input={inp}", f"--base_url={url}", f"--model={model}", f"--output_dir={out}", *extra]


def read_summary(out):
    with open(os.path.join(out, "summary.json")) as f:
        return json.load(f)


def read_verdicts(out):
    with open(os.path.join(out, "verdicts.jsonl")) as f:
        return [json.loads(line) for line in f]


# ----------------------------------------------------------------------------------------------
# Invalid rows: skipped, named by file:line, listed; the run goes on.
# ----------------------------------------------------------------------------------------------
BAD_ROWS = [
    # (line content, expected reason fragment)
    (good_row(2, constraints=[{"type": "word_count"}]), "constraints[0]: type 'word_count': needs 'min', 'max'"),
    (good_row(3, query_type=7), "field 'query_type' must be a string, got int 7"),
    (b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}', "not valid UTF-8 (byte 0xe9 at column 16)"),
    ("[" * 100_000 + "]" * 100_000, "not valid JSON (nested too deeply)"),
    ('["a list", "not an object"]', "a row must be a JSON object, got list"),
    ('{"prompt": "p", "chosen": "c"', "not valid JSON"),
    (good_row(8, constraints={"type": "no_commas"}), "field 'constraints' must be a list, got dict"),
    (good_row(9, constraints=[{"type": "nope"}]), "unknown constraint type 'nope'"),
    (good_row(10, constraints=[{"type": "keywords_include", "keywords": "GOOD"}]), "'keywords' must be a non-empty"),
    (good_row(11, constraints=[{"type": "language", "language": "xx"}]), "language 'xx' is not supported"),
    (good_row(12, constraints=[{"type": "code", "code": "def check(r) return 1"}]), "'code' does not compile"),
    (good_row(13, chosen=None), "field 'chosen' must be a string, got NoneType"),
    (good_row(14, question_id=True), "field 'question_id' must be a non-empty string or an integer"),
    (good_row(15, ground_truth=[4]), "field 'ground_truth' must be a string or a number, got list"),
]


def test_invalid_rows_are_skipped_named_and_listed(server, tmp_path, capsys):  # noqa: F811
    url, st = server
    math_row = {
        "question_id": 99,  # an integer id is fine
        "query_type": "livebench-math",
        "prompt": "2 + 2?",
        "chosen": "\\boxed{4}",
        "rejected": "\\boxed{5}",
        "ground_truth": 4,  # a number: compared as "4"
    }
    constrained = good_row(20, constraints=[{"type": "keywords_include", "keywords": ["GOOD"]}])
    lines = [good_row(1)] + [x for x, _ in BAD_ROWS] + ["", math_row, constrained]
    inp = write_lines(tmp_path / "in.jsonl", lines)
    out = tmp_path / "out"
    code, stdout, stderr = run_main(capsys, *common(url, inp, out, "ok", "--cache_dir=none"))
    assert code == 0, stderr
    s = read_summary(out)
    # The three valid rows were judged and all judged right, by three different paths.
    assert s["n_pairs"] == 3 and s["accuracy"] == 1.0 and s["wins"] == 3
    assert s["paths"] == {"ground_truth": 1, "constraints": 1, "pairwise": 1, "error": 0}
    assert len(st.requests) == 2  # only the pairwise row asked the server (both orders)
    # Every invalid row: counted, listed with its line and reason, named file:line on stderr.
    assert s["n_invalid_rows"] == len(BAD_ROWS) and s["n_rows_read"] == len(BAD_ROWS) + 3
    assert [r["line"] for r in s["invalid_rows"]] == list(range(2, 2 + len(BAD_ROWS)))
    for listed, (_, fragment) in zip(s["invalid_rows"], BAD_ROWS):
        assert fragment in listed["reason"], listed
        assert f"{inp}:{listed['line']}: {listed['reason']}" in stderr
    assert "invalid rows skipped 14" in stdout
    verdicts = read_verdicts(out)
    assert sorted(v["pair_id"] for v in verdicts) == ["99", "q1", "q20"]
    assert all(v["correct"] for v in verdicts)


def test_command_line_run_with_a_bad_row(server, tmp_path):  # noqa: F811
    url, _ = server
    inp = write_lines(tmp_path / "in.jsonl", [good_row(1), good_row(2, query_type=["chat"]), good_row(3)])
    out = tmp_path / "out"
    r = subprocess.run(
        [sys.executable, "-m", "experiments.judge", *common(url, inp, out, "ok", "--cache_dir=none")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"{inp}:2: field 'query_type' must be a string, got list" in r.stderr
    s = read_summary(out)
    assert s["n_pairs"] == 2 and s["accuracy"] == 1.0
    assert s["invalid_rows"] == [{"line": 2, "reason": "field 'query_type' must be a string, got list ['chat']"}]


# ----------------------------------------------------------------------------------------------
# Whole-file errors: before any call, exit status 2.
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "rows, expected",
    [
        ([good_row(1), good_row(2, question_id="q1")], [":2: question_id 'q1' is already used on line 1"]),
        # 7 and "7" are the same pair id; so are a default id (row<line>) and an explicit one.
        (
            [good_row(1, question_id=7), good_row(2, question_id="row4"), good_row(3, question_id="7")]
            + [{"prompt": "p", "chosen": "c", "rejected": "r"}],
            [":3: question_id '7' is already used on line 1", ":4: question_id 'row4' is already used on line 2"],
        ),
    ],
)
def test_duplicate_ids_are_an_error_naming_both_lines(server, tmp_path, capsys, rows, expected):  # noqa: F811
    url, st = server
    inp = write_lines(tmp_path / "in.jsonl", rows)
    code, _, stderr = run_main(capsys, *common(url, inp, tmp_path / "out"))
    assert code == 2
    assert "duplicate question_id" in stderr
    for fragment in expected:
        assert f"{inp}{fragment}" in stderr
    assert st.requests == [] and not (tmp_path / "out" / "summary.json").exists()


@pytest.mark.parametrize(
    "lines, expected",
    [
        ([], "no rows (the file is empty)"),
        (["", "   "], "no rows (the file is empty)"),
        (["not json", good_row(2, query_type=1)], "no valid rows (2 invalid)"),
    ],
)
def test_empty_or_all_invalid_input_is_an_error(server, tmp_path, capsys, lines, expected):  # noqa: F811
    url, st = server
    inp = write_lines(tmp_path / "in.jsonl", lines)
    code, stdout, stderr = run_main(capsys, *common(url, inp, tmp_path / "out"))
    assert code == 2 and expected in stderr, stderr
    assert "accuracy" not in stdout and st.requests == []
    if "invalid" in expected:
        assert f"{inp}:1: not valid JSON" in stderr and f"{inp}:2: field 'query_type'" in stderr


def test_library_readers(tmp_path):
    rows = [good_row(1), good_row(2, query_type=2), good_row(3), good_row(4)]
    path = write_lines(tmp_path / "x.jsonl", rows)
    with pytest.raises(RowError, match=r"x.jsonl:2: field 'query_type' must be a string"):
        read_pair_rows(path)  # strict: the first invalid row raises
    scan = scan_pair_rows(path, limit=2)  # the first two valid rows
    assert [r["question_id"] for r in scan.rows] == ["q1", "q3"] and scan.lines == [1, 3]
    assert [(r.line, r.reason[:22]) for r in scan.invalid] == [(2, "field 'query_type' mus")]
    assert validate_constraint({"type": "word_count", "min": 2, "max": 5}) is None
    assert "'min' 5 is above 'max' 2" in validate_constraint({"type": "word_count", "min": 5, "max": 2})
    assert "cannot set sandbox limits" in validate_constraint({"type": "code", "code": "x=1", "limits": {}})


# ----------------------------------------------------------------------------------------------
# --resume judges failed pairs again.
# ----------------------------------------------------------------------------------------------
def test_resume_retries_backend_failures(server, tmp_path, capsys):  # noqa: F811
    url, st = server
    inp = write_lines(tmp_path / "in.jsonl", [good_row(i) for i in range(3)])
    out = tmp_path / "out"
    args = common(url, inp, out, "flaky", "--max_retries=0", "--workers=1")
    code, _, stderr = run_main(capsys, *args)
    assert code == 0, stderr
    first = read_summary(out)
    # The server's first two calls fail with HTTP 500 and no retries are allowed.
    assert first["backend"]["failures"] >= 1 and first["backend_failure_rate"] > 0
    n_failed = first["failed_pairs"]
    assert 1 <= n_failed <= 2
    failed_ids = {v["pair_id"] for v in read_verdicts(out) if v["forward"]["error_kind"] or v["backward"]["error_kind"]}
    assert len(failed_ids) == n_failed
    n_calls = len(st.requests)

    code, stdout, stderr = run_main(capsys, *args, "--resume")
    assert code == 0, stderr
    s = read_summary(out)
    assert s["retried_failures"] == n_failed and s["judged_this_run"] == n_failed
    assert len(st.requests) - n_calls == 2 * n_failed  # only the failed pairs were asked again
    asked_again = {r["body"]["messages"][-1]["content"] for r in st.requests[n_calls:]}
    assert all(any(f"question {pid[1:]}" in m for m in asked_again) for pid in failed_ids)
    assert s["failed_pairs"] == 0 and s["backend_failure_rate"] == 0 and s["accuracy"] == 1.0
    verdicts = read_verdicts(out)
    assert [v["pair_id"] for v in verdicts] == ["q0", "q1", "q2"]  # one line per pair, input order
    assert {v["pair_id"]: v["round"] for v in verdicts} == {f"q{i}": int(f"q{i}" in failed_ids) for i in range(3)}

    # A third resume has nothing left to do.
    n_calls = len(st.requests)
    code, _, _ = run_main(capsys, *args, "--resume")
    assert code == 0 and len(st.requests) == n_calls and read_summary(out)["judged_this_run"] == 0


def test_resume_retries_parse_failures_past_the_cache(server, tmp_path, capsys):  # noqa: F811
    url, st = server
    inp = write_lines(tmp_path / "in.jsonl", [good_row(i) for i in range(2)])
    out = tmp_path / "out"
    # One parse attempt per direction; the completion cache is on (DIR/cache).
    args = common(url, inp, out, "junk-then-ok", "--parse_attempts=1")
    code, _, stderr = run_main(capsys, *args)
    assert code == 0, stderr
    first = read_summary(out)
    assert first["parse_failure_rate"] == 1.0 and first["failed_pairs"] == 2 and first["errors"] == 2
    assert first["error_rate"] == 1.0 and first["same"] == 0  # errors are left out by default
    assert {r["body"]["seed"] for r in st.requests} == {0}

    code, _, stderr = run_main(capsys, *args, "--resume")
    assert code == 0, stderr
    s = read_summary(out)
    assert s["retried_failures"] == 2 and s["failed_pairs"] == 0 and s["parse_failure_rate"] == 0
    assert s["accuracy"] == 1.0 and s["backend"]["cache_hits"] == 0
    assert {r["body"]["seed"] for r in st.requests[4:]} == {1}  # fresh seeds, not the cached junk


def test_resume_without_failures_asks_nothing(server, tmp_path, capsys):  # noqa: F811
    url, st = server
    inp = write_lines(tmp_path / "in.jsonl", [good_row(i) for i in range(2)])
    out = tmp_path / "out"
    args = common(url, inp, out, "ok", "--cache_dir=none")
    assert run_main(capsys, *args)[0] == 0 and len(st.requests) == 4
    with open(out / "verdicts.jsonl", "a") as f:
        f.write('{"pair_id": "q1", "verdi')  # a line cut by a kill
    assert run_main(capsys, *args, "--resume")[0] == 0
    s = read_summary(out)
    assert len(st.requests) == 4 and s["judged_this_run"] == 0 and s["accuracy"] == 1.0


# ----------------------------------------------------------------------------------------------
# The judge itself: checks off the event loop, one bad pair never ends a batch.
# ----------------------------------------------------------------------------------------------
SLOW_CHECKER = "def check(r):\n    import time\n    time.sleep(1.5)\n    return 'GOOD' in r\n"


def test_constraint_checks_run_off_the_event_loop(server):  # noqa: F811
    url, st = server
    judge = PairwiseJudge(OpenAIHTTPBackend(url, "ok"), JudgeConfig())
    cons = [{"type": "code", "code": SLOW_CHECKER}]
    pairs = [PairInput(f"q{i}", f"GOOD {i}", f"bad {i}", constraints=cons, pair_id=f"p{i}") for i in range(2)]
    gaps = []

    async def ticker(stop):
        last = time.perf_counter()
        while not stop.is_set():
            await asyncio.sleep(0.02)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    async def main():
        stop = asyncio.Event()
        tick = asyncio.ensure_future(ticker(stop))
        t0 = time.perf_counter()
        results = await judge.judge_pairs(pairs)
        wall = time.perf_counter() - t0
        stop.set()
        await tick
        return results, wall

    results, wall = asyncio.run(main())
    assert [r.verdict for r in results] == ["first", "first"]
    assert all(r.path == "constraints" and r.pointwise["constraints"] == [True, False] for r in results)
    assert st.requests == []
    # Four sandboxed checks of >= 1.5 s each: on the loop they would take >= 6 s and stall the
    # ticker for >= 1.5 s at a time; in threads they overlap (each sandbox start takes 0.1-0.5 s
    # on a loaded 2-core host) and the loop keeps ticking.
    assert wall < 4.5, wall
    assert max(gaps) < 0.4, max(gaps)


def test_one_bad_pair_never_ends_the_batch(server):  # noqa: F811
    url, _ = server
    judge = PairwiseJudge(OpenAIHTTPBackend(url, "ok"), JudgeConfig())
    pairs = [
        PairInput("q0", "GOOD", "bad", pair_id="ok"),
        PairInput("q1", "GOOD", "bad", query_type=5, pair_id="bad-query-type"),  # not validated here
        PairInput("q2", "GOOD", "bad", constraints=[{"type": "nope"}], pair_id="bad-constraint"),
    ]
    results = asyncio.run(judge.judge_pairs(pairs))
    assert results[0].verdict == "first" and not results[0].failed
    assert results[1].path == "error" and results[1].verdict == "error" and results[1].failed
    assert "AttributeError" in results[1].pointwise["error"]
    # A constraint that cannot be checked is skipped; the pair is judged pairwise.
    assert results[2].path == "pairwise" and results[2].verdict == "first"
    assert judge.counters.pair_errors == 1 and judge.counters.constraint_errors == 1


def test_in_process_backend_from_the_cli(tmp_path, capsys):
    """--backend=in-process loads a local checkpoint (no server); a ground-truth pair is decided
    without a call, and the backend's own counters land in summary.json."""
    from clipo_jax.models.loading import resolve_model_path

    try:
        resolve_model_path("smollm2")
    except Exception as e:
        pytest.fail(f"the SmolLM2 model package is part of the test install: {e}")
    src = os.path.join(os.path.dirname(__file__), "data", "judgebench", "gpt_sample.jsonl")
    out = tmp_path / "run"
    code, _, err = run_judge_cli(
        capsys, f"--input={src}", f"--output_dir={out}", "--backend=in-process", "--model=smollm2", "--limit=1"
    )
    assert code == 0, err
    s = json.load(open(out / "summary.json"))
    assert s["judge_backend"] == "in-process" and s["n_pairs"] == 1
    assert s["paths"]["ground_truth"] == 1 and s["accuracy"] == 1.0
    assert s["calls"] == 0 and s["backend"]["sampler_calls"] == 0
    from absl import app

    with pytest.raises(app.UsageError, match="--base_url is required with --backend=openai"):
        run_judge_cli(capsys, f"--input={src}", f"--output_dir={out}", "--backend=openai", "--model=m")
