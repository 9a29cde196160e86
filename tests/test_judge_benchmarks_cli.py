"""``python -m experiments.judge --benchmark=...`` end to end on the hand-written fixtures of PPE,
RewardBench 2 and RM-Bench (tests/data), against a real OpenAI-compatible rule judge on 127.0.0.1.

The server judges by arithmetic: a response scores +1 when it states equations ``a op b = c`` and
all of them hold, -1 when one of them is false, 0 without one; the higher score wins, equal scores
are a tie ("S").  A response text listed in ``Handler.broken`` gets prose back whenever it is shown
in slot B, so every pair that holds it is an ``"error"`` (one direction never parses).  The
expected benchmark numbers are computed here, from the fixture files and that rule, with plain
Python and numpy, not with the scorer under test.
"""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from absl import flags
from judge_server import JSONHandler, responses, rule_judgment, run_judge_cli, serve

from clipo_jax.rubrics.benchmarks import TIES_REASON
from clipo_jax.rubrics.pairs import to_pair

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(REPO, "tests", "data")
RB2 = os.path.join(DATA, "rewardbench2", "sample.jsonl")
RMB = os.path.join(DATA, "rmbench", "sample.json")
PPE = os.path.join(DATA, "ppe", "sample.jsonl")
FLAGS = flags.FLAGS

EQUATION = re.compile(r"(\d+)\s*([-+*])\s*(\d+)\s*=\s*(\d+)")
OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def arithmetic_score(text: str) -> int:
    eqs = EQUATION.findall(text)
    if not eqs:
        return 0
    return 1 if all(OPS[op](int(a), int(b)) == int(c) for a, op, b, c in eqs) else -1


def rule_label(a: str, b: str) -> str:
    sa, sb = arithmetic_score(a), arithmetic_score(b)
    return "A" if sa > sb else ("B" if sb > sa else "S")


class Handler(JSONHandler):
    requests: list = None  # (response A, response B) per judge call
    broken: set = None

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        pair = responses(body["messages"][-1]["content"])
        if pair is None:
            return self._send(400, {"error": "not a pairwise judge prompt"})
        a, b = pair
        self.requests.append((a, b))
        if b in self.broken:
            content = "Response A looks better to me."  # no JSON: never parses
        else:
            content = json.dumps(rule_judgment(rule_label(a, b)))
        self._send_chat(content)


@pytest.fixture()
def server():
    handler = type("H", (Handler,), {"requests": [], "broken": set()})
    with serve(handler) as url:
        yield url, handler


run_main = run_judge_cli


def args_for(url, bench, inp, out, *extra):
    return [
        f"--benchmark={bench}",
        f"--input={inp}",
        f"--base_url={url}",
        "--model=rule",
        f"--output_dir={out}",
        "--cache_dir=none",
        "--max_retries=0",
        "--parse_attempts=1",
        *extra,
    ]


def summary(out):
    with open(os.path.join(out, "summary.json")) as f:
        return json.load(f)


def verdicts(out):
    with open(os.path.join(out, "verdicts.jsonl")) as f:
        return [json.loads(line) for line in f]


def chosen_outcome(chosen: str, rejected: str, broken: set) -> str:
    """What the rule server makes of (chosen, rejected): win / loss / tie / error."""
    if chosen in broken or rejected in broken:
        return "error"
    return {"A": "win", "B": "loss", "S": "tie"}[rule_label(chosen, rejected)]


# ----------------------------------------------------------------------------------------------
# RewardBench 2: best-of-N, an error is a tie, the Ties subset excluded, resume re-judges errors.
# ----------------------------------------------------------------------------------------------
def rb2_expected(broken: set, policy: str) -> dict:
    rows = [json.loads(line) for line in open(RB2)]
    per_subset: dict[str, list[int]] = {}
    for r in rows:
        if r["subset"] == "Ties":
            continue
        outs = [chosen_outcome(c, x, broken) for c in r["chosen"] for x in r["rejected"]]
        if policy == "exclude" and all(o in ("win", "error") for o in outs) and "error" in outs:
            continue  # undecided: left out
        per_subset.setdefault(r["subset"], []).append(int(all(o == "win" for o in outs)))
    acc = {k: sum(v) / len(v) for k, v in per_subset.items()}
    return {"by_subset": acc, "mean": sum(acc.values()) / len(acc)}


def test_rewardbench2_end_to_end_error_counts_as_tie_then_resume(server, tmp_path, capsys):
    url, h = server
    h.broken = {"7 + 5 = 11."}  # one rejected response of row 1001 (Factuality)
    out = tmp_path / "rb2"
    code, stdout, stderr = run_main(capsys, *args_for(url, "rewardbench2", RB2, out))
    assert code == 0, stderr
    s = summary(out)
    exp = rb2_expected(h.broken, "tie")
    assert s["benchmark"] == "rewardbench2" and s["error_policy"] == "tie"  # the benchmark's default
    assert s["n_pairs"] == 15 and s["n_rows"] == 5 and s["n_rows_read"] == 6 and s["errors"] == 1
    b = s["benchmark_scores"]
    assert {k: v["accuracy"] for k, v in b["by_subset"].items()} == pytest.approx(exp["by_subset"])
    assert s["benchmark_score"] == pytest.approx(exp["mean"]) and b["by_subset"]["Factuality"]["ties"] == 1
    assert b["rows_with_errors"] == 1 and b["error_pairs"] == 1
    # The Ties row: read, counted, excluded with its reason, never sent to the judge.
    assert s["n_excluded_rows"] == 1 and s["excluded_rows"] == [{"line": 3, "id": "1003", "reason": TIES_REASON}]
    assert "note: 1 rows excluded: subset 'Ties' not scored" in stderr
    assert not any("3 + 7 = 10." in a or "3 + 7 = 10." in b for a, b in h.requests)
    assert "benchmark rewardbench2: best-of-N: subset mean 0.200" in stdout
    ids = [f"{r}#c0r{j}" for r in ("1001", "1002", "1004", "1005", "1006") for j in range(3)]
    assert [v["pair_id"] for v in verdicts(out)] == ids
    assert [v["pair_id"] for v in verdicts(out) if v["verdict"] == "error"] == ["1001#c0r1"]

    # --resume with the server mended: only the failed pair is judged again (both orders).
    h.broken = set()
    n = len(h.requests)
    code, _, stderr = run_main(capsys, *args_for(url, "rewardbench2", RB2, out, "--resume"))
    assert code == 0, stderr
    s = summary(out)
    assert s["judged_this_run"] == 1 and s["retried_failures"] == 1 and s["errors"] == 0
    assert sorted(h.requests[n:]) == sorted([("7 + 5 = 12.", "7 + 5 = 11."), ("7 + 5 = 11.", "7 + 5 = 12.")])
    exp = rb2_expected(set(), "tie")
    assert s["benchmark_score"] == pytest.approx(exp["mean"]) == pytest.approx(0.4)
    assert s["benchmark_scores"]["by_subset"]["Factuality"]["accuracy"] == 1.0


def test_rewardbench2_exclude_policy_leaves_the_row_undecided(server, tmp_path, capsys):
    url, h = server
    h.broken = {"7 + 5 = 11."}
    out = tmp_path / "rb2x"
    code, _, stderr = run_main(capsys, *args_for(url, "rewardbench2", RB2, out, "--error_policy=exclude"))
    assert code == 0, stderr
    s = summary(out)
    exp = rb2_expected(h.broken, "exclude")
    b = s["benchmark_scores"]
    assert "Factuality" not in exp["by_subset"] and b["by_subset"]["Factuality"]["accuracy"] is None
    assert b["undecided"] == 1 and b["by_subset"]["Factuality"]["undecided"] == 1
    assert s["benchmark_score"] == pytest.approx(exp["mean"]) == pytest.approx(0.25)


# ----------------------------------------------------------------------------------------------
# RM-Bench: the 3x3 style matrix, errors left out of their cell, partial run + resume.
# ----------------------------------------------------------------------------------------------
def rmbench_expected(broken: set, domains=None) -> dict:
    rows = json.load(open(RMB))
    wins, counted = np.zeros((3, 3)), np.zeros((3, 3))
    for r in rows:
        if domains is not None and r["domain"] not in domains:
            continue
        for i in range(3):
            for j in range(3):
                o = chosen_outcome(r["chosen"][i], r["rejected"][j], broken)
                if o != "error":  # exclude: the error pair leaves only its own cell
                    counted[i, j] += 1
                    wins[i, j] += o == "win"
    with np.errstate(invalid="ignore", divide="ignore"):
        m = wins / counted
    hard = np.nanmean(m[np.triu_indices(3, 1)])
    normal = np.nanmean(np.diag(m))
    easy = np.nanmean(m[np.tril_indices(3, -1)])
    return {"hard": hard, "normal": normal, "easy": easy, "average": np.mean([hard, normal, easy]), "m": m}


def check_rmbench(got: dict, exp: dict):
    for k in ("hard", "normal", "easy", "average"):
        assert got[k] == pytest.approx(exp[k]), k
    m = np.array([[np.nan if x is None else x for x in row] for row in got["matrix"]])
    np.testing.assert_allclose(m, exp["m"])


def test_rmbench_end_to_end_partial_run_resume_and_error_cells(server, tmp_path, capsys):
    url, h = server
    broken = {"Multiplying 6 by 7 gives 6 * 7 = 48."}  # rejected style 1 of the math row
    h.broken = set(broken)
    out = tmp_path / "rmb"
    # A partial run: the first two rows (chat, code), 18 pairs.
    code, _, stderr = run_main(capsys, *args_for(url, "rmbench", RMB, out, "--limit=2"))
    assert code == 0, stderr
    first = {v["pair_id"]: v for v in verdicts(out)}
    assert sorted(first) == sorted(f"{r}#c{i}r{j}" for r in ("chat/0", "code/0") for i in range(3) for j in range(3))
    assert summary(out)["n_pairs"] == 18 and len(h.requests) == 36
    done_texts = {
        frozenset((r["chosen"][i], r["rejected"][j]))
        for r in json.load(open(RMB))[:2]
        for i in range(3)
        for j in range(3)
    }

    # --resume over the whole file: the 18 finished pairs are kept as they were, the 27 others judged.
    n = len(h.requests)
    code, stdout, stderr = run_main(capsys, *args_for(url, "rmbench", RMB, out, "--resume"))
    assert code == 0, stderr
    s = summary(out)
    assert s["n_pairs"] == 45 and s["judged_this_run"] == 27 and len(h.requests) - n == 54
    assert not any(frozenset(p) in done_texts for p in h.requests[n:])
    now = {v["pair_id"]: v for v in verdicts(out)}
    assert all(now[k] == v for k, v in first.items())
    # Pairs are shown both ways round, by a coin seeded per pair id.
    labels = {v["label"] for v in now.values()}
    assert labels == {"first", "second"}
    rows = {r["id"]: r for r in json.load(open(RMB))}
    for pid, v in now.items():
        rid, ij = pid.split("#")
        i, j = int(ij[1]), int(ij[3])
        row = {"question_id": pid, "prompt": "", "chosen": rows[rid]["chosen"][i], "rejected": rows[rid]["rejected"][j]}
        assert v["label"] == to_pair(row, 0)[1] and v["bench"] == {
            "row": rid,
            "group": rows[rid]["domain"],
            "i": i,
            "j": j,
        }

    assert s["error_policy"] == "exclude" and s["errors"] == 3
    b = s["benchmark_scores"]
    check_rmbench(b, rmbench_expected(broken))
    assert b["counted"][1][1] == 4 and b["counted"][0][0] == 5  # the math row left out of column 1 only
    assert b["rows_with_errors"] == 1 and b["error_pairs"] == 3 and b["rows"] == 5
    check_rmbench(b["by_domain"]["math"], rmbench_expected(broken, {"math"}))
    assert b["by_domain"]["math"]["matrix"][0][1] is None  # no counted row: left out of the hard mean
    check_rmbench(b["by_domain_group"]["safety"], rmbench_expected(broken, {"safety-refuse", "safety-response"}))
    assert s["benchmark_score"] == pytest.approx(rmbench_expected(broken)["average"])
    assert f"hard {b['hard']:.3f}  normal {b['normal']:.3f}" in stdout

    # Mended server: the 3 error pairs of the math row are judged again, and only they.
    h.broken = set()
    n = len(h.requests)
    code, _, stderr = run_main(capsys, *args_for(url, "rmbench", RMB, out, "--resume"))
    assert code == 0, stderr
    s = summary(out)
    assert s["judged_this_run"] == 3 and len(h.requests) - n == 6 and s["errors"] == 0
    check_rmbench(s["benchmark_scores"], rmbench_expected(set()))


# ----------------------------------------------------------------------------------------------
# PPE: JudgeBench-format pairs, ground truth checked programmatically, pairwise accuracy.
# ----------------------------------------------------------------------------------------------
def test_ppe_end_to_end_partial_run_and_resume(server, tmp_path, capsys):
    url, h = server
    out = tmp_path / "ppe"
    code, _, stderr = run_main(capsys, *args_for(url, "ppe", PPE, out, "--limit=4"))
    assert code == 0, stderr
    first = {v["pair_id"]: v for v in verdicts(out)}
    assert list(first) == ["ppe-mmlu-pro-0001", "ppe-math-0001", "ppe-gpqa-0001", "ppe-ifeval-0001"]
    assert len(h.requests) == 2  # the three ground-truth rows need no call
    code, stdout, stderr = run_main(capsys, *args_for(url, "ppe", PPE, out, "--resume"))
    assert code == 0, stderr
    s = summary(out)
    assert s["benchmark"] == "ppe" and s["error_policy"] == "exclude" and s["judged_this_run"] == 2
    assert all({v["pair_id"]: v for v in verdicts(out)}[k] == v for k, v in first.items())
    assert len(h.requests) == 6  # two more pairwise rows, both orders
    # Expected from the rule: ground-truth rows right, "Yes: 15 - 6 = 9." wins, "Bonjour !" vs "Hola." ties.
    assert s["paths"]["ground_truth"] == 3 and s["wins"] == 5 and s["losses"] == 0 and s["same"] == 1
    assert s["benchmark_score"] == s["accuracy"] == 1.0
    assert s["benchmark_scores"]["n_pairs"] == 6 and s["by_source"]["human_preference"] == 1.0
    assert "benchmark ppe: pairwise accuracy 1.000 over 5 decided pairs" in stdout


# ----------------------------------------------------------------------------------------------
# Row problems through the CLI.
# ----------------------------------------------------------------------------------------------
def test_bad_rows_skipped_and_whole_file_errors(server, tmp_path, capsys):
    url, h = server
    rows = [json.loads(line) for line in open(RB2)]
    bad = dict(rows[0], id="2001", chosen="7 + 5 = 12.")  # a string, not a list
    inp = tmp_path / "rb2.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in [rows[0], bad, rows[3]]))
    out = tmp_path / "out"
    code, _, stderr = run_main(capsys, *args_for(url, "rewardbench2", inp, out))
    assert code == 0, stderr
    assert f"{inp}:2: field 'chosen' must be a list of strings, got str (row skipped)" in stderr
    s = summary(out)
    assert s["invalid_rows"] == [{"line": 2, "reason": "field 'chosen' must be a list of strings, got str"}]
    assert s["n_pairs"] == 6 and s["n_rows"] == 2 and s["n_rows_read"] == 3

    # Duplicate ids and a JSON list that does not parse stop the run before any call.
    n = len(h.requests)
    inp.write_text("".join(json.dumps(r) + "\n" for r in [rows[0], rows[3], rows[0]]))
    code, _, stderr = run_main(capsys, *args_for(url, "rewardbench2", inp, tmp_path / "o2"))
    assert code == 2 and f"{inp}:3: id '1001' is already used on line 1" in stderr
    broken_list = tmp_path / "rm.json"
    broken_list.write_text(open(RMB).read().replace('"domain": "code"', '"domain": "code",,'))
    code, _, stderr = run_main(capsys, *args_for(url, "rmbench", broken_list, tmp_path / "o3"))
    assert code == 2 and f"{broken_list}:" in stderr and "a JSON list cannot be read past a syntax error" in stderr
    assert len(h.requests) == n


def test_command_line_rmbench(server, tmp_path):
    url, _ = server
    out = tmp_path / "cmd"
    r = subprocess.run(
        [sys.executable, "-m", "experiments.judge", *args_for(url, "rmbench", RMB, out, "--limit=1")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    s = summary(out)
    assert s["benchmark"] == "rmbench" and s["n_pairs"] == 9 and s["n_rows"] == 1
    exp = rmbench_expected(set(), {"chat"})
    check_rmbench(s["benchmark_scores"], exp)
    assert "benchmark rmbench: hard" in r.stdout


def test_resume_with_another_seed_rejudges_the_pairs_shown_the_other_way(server, tmp_path, capsys):
    url, h = server
    out, fresh = tmp_path / "resumed", tmp_path / "fresh"
    code, _, stderr = run_main(capsys, *args_for(url, "rmbench", RMB, out, "--limit=2", "--seed=0"))
    assert code == 0, stderr
    seed0 = {v["pair_id"]: v["label"] for v in verdicts(out)}
    code, _, stderr = run_main(capsys, *args_for(url, "rmbench", RMB, fresh, "--limit=2", "--seed=1"))
    assert code == 0, stderr
    seed1 = {v["pair_id"]: v["label"] for v in verdicts(fresh)}
    flipped = sum(seed0[k] != seed1[k] for k in seed0)
    assert 0 < flipped < len(seed0)  # the seed changes the presentation order of some pairs

    # a verdict of seed 0 names the response shown first under seed 0: scored against seed 1's
    # labels it would be wrong, so those pairs are judged again and the scores are seed 1's own
    n = len(h.requests)
    code, _, stderr = run_main(capsys, *args_for(url, "rmbench", RMB, out, "--limit=2", "--seed=1", "--resume"))
    assert code == 0, stderr
    s = summary(out)
    assert s["rejudged_other_order"] == flipped and s["judged_this_run"] == flipped
    assert len(h.requests) - n == 2 * flipped
    assert {v["pair_id"]: v["label"] for v in verdicts(out)} == seed1
    assert s["benchmark_scores"] == summary(fresh)["benchmark_scores"]
