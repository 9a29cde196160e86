"""Benchmark readers and scorers (``clipo_jax.rubrics.benchmarks``) on the hand-written fixtures
of tests/data, and ``experiments.prepare_data`` copying the benchmarks from a local directory.

Scores are checked against numbers computed in this file: by hand for RewardBench 2's best-of-N
rule, with numpy for RM-Bench's style matrix.  No network, no judge: verdicts are given.
"""

import hashlib
import json
import os

import numpy as np
import pytest

from clipo_jax.rubrics.benchmarks import (
    BENCHMARKS,
    RMBENCH_STYLES,
    TIES_REASON,
    get_benchmark,
    iter_records,
    pair_outcome,
    read_judgebench,
    read_rewardbench2,
    read_rmbench,
    rmbench_accuracy,
    rmbench_counts,
    row_result,
    score_pairwise,
    score_rewardbench2,
    score_rmbench,
)
from clipo_jax.rubrics.pairs import RowError
from experiments import prepare_data

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
RB2 = os.path.join(DATA, "rewardbench2", "sample.jsonl")
RMB = os.path.join(DATA, "rmbench", "sample.json")
PPE = os.path.join(DATA, "ppe", "sample.jsonl")


def jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


# ----------------------------------------------------------------------------------------------
# Readers.
# ----------------------------------------------------------------------------------------------
def test_registry_defaults():
    assert {k: b.error_policy for k, b in BENCHMARKS.items()} == {
        "judgebench": "exclude",
        "ppe": "exclude",
        "rewardbench2": "tie",
        "rmbench": "exclude",
    }
    with pytest.raises(ValueError, match="unknown benchmark 'rb3'"):
        get_benchmark("rb3")


def test_rewardbench2_reader_expands_rows_and_excludes_ties():
    rows = jsonl(RB2)
    got = read_rewardbench2(RB2)
    scored = [r for r in rows if r["subset"] != "Ties"]
    assert got.n_rows_read == 6 and got.n_rows == 5 and got.invalid == []
    assert got.excluded == [{"line": 3, "id": "1003", "reason": TIES_REASON}]
    # One pair per (chosen, rejected), in row order, with a stable id and the row's subset.
    expected = [
        (f"{r['id']}#c0r{j}", r["chosen"][0], x, r["subset"]) for r in scored for j, x in enumerate(r["rejected"])
    ]
    assert [(p["question_id"], p["chosen"], p["rejected"], p["query_type"]) for p in got.pairs] == expected
    assert got.pairs[4]["bench"] == {"row": "1002", "group": "Precise IF", "i": 0, "j": 1}
    assert all(p["prompt"] == rows[0]["prompt"] for p in got.pairs[:3])
    # --limit counts rows to score: the Ties row on line 3 is passed over, not counted.
    lim = read_rewardbench2(RB2, limit=3)
    assert (
        lim.n_rows == 3 and lim.n_rows_read == 4 and {p["bench"]["row"] for p in lim.pairs} == {"1001", "1002", "1004"}
    )


def test_rewardbench2_reader_several_chosen_and_judge_fields(tmp_path):
    row = dict(jsonl(RB2)[3], id=7, chosen=["9 - 3 = 6.", "Six."], rejected=["9 - 3 = 5.", "9 - 3 = 12."])
    row.update(ground_truth=6, constraints=[{"type": "word_count", "max": 10}])
    got = read_rewardbench2(write_jsonl(tmp_path / "x.jsonl", [row]))
    assert [p["question_id"] for p in got.pairs] == ["7#c0r0", "7#c0r1", "7#c1r0", "7#c1r1"]
    assert got.pairs[2]["chosen"] == "Six." and got.pairs[2]["rejected"] == "9 - 3 = 5."
    assert all(p["ground_truth"] == 6 and p["constraints"] == row["constraints"] for p in got.pairs)


RB2_BAD = [
    # (change to a valid row, expected reason)
    ({"chosen": "7 + 5 = 12."}, "field 'chosen' must be a list of strings, got str"),
    ({"rejected": ["a", 3]}, "field 'rejected' must be a list of strings, got an element of type int"),
    ({"rejected": []}, "field 'rejected' must hold at least one response, got an empty list"),
    ({"subset": None}, "field 'subset' must be a non-empty string, got None"),
    ({"num_correct": -1}, "field 'num_correct' must be a non-negative integer, got -1"),
    ({"models": "gpt"}, "field 'models' must be a list of strings"),
    ({"id": True}, "field 'id' must be a non-empty string or an integer, got True"),
    ({"prompt": ["p"]}, "field 'prompt' must be a string, got list"),
    ({"ground_truth": [4]}, "field 'ground_truth' must be a string or a number, got list"),
    ({"constraints": [{"type": "word_count"}]}, "constraints[0]: type 'word_count': needs 'min', 'max'"),
]


def test_rewardbench2_reader_reports_bad_rows(tmp_path):
    good = jsonl(RB2)[0]
    lines = [good] + [{**good, "id": f"b{k}", **change} for k, (change, _) in enumerate(RB2_BAD)]
    lines += ['{"id": "x", "prompt": ', "", jsonl(RB2)[3]]
    got = read_rewardbench2(write_jsonl(tmp_path / "bad.jsonl", lines))
    assert [r.line for r in got.invalid] == list(range(2, 2 + len(RB2_BAD))) + [2 + len(RB2_BAD)]
    for r, (_, reason) in zip(got.invalid, RB2_BAD):
        assert reason in r.reason, (r, reason)
    assert got.invalid[-1].reason.startswith("not valid JSON")
    assert [p["bench"]["row"] for p in got.pairs] == ["1001"] * 3 + ["1004"] * 3
    assert got.n_rows_read == len(lines) - 1  # the blank line is not a row


def test_whole_file_errors(tmp_path):
    rows = jsonl(RB2)
    with pytest.raises(RowError, match=r"dup.jsonl:3: id '1001' is already used on line 1"):
        read_rewardbench2(write_jsonl(tmp_path / "dup.jsonl", [rows[0], rows[3], dict(rows[4], id="1001")]))
    with pytest.raises(RowError, match="no rows"):
        read_rewardbench2(write_jsonl(tmp_path / "empty.jsonl", ["", "  "]))
    with pytest.raises(RowError, match=r"no row to score \(0 invalid, 1 excluded\)"):
        read_rewardbench2(write_jsonl(tmp_path / "ties.jsonl", [rows[2]]))
    with pytest.raises(RowError, match="no rows"):
        read_rmbench(write_jsonl(tmp_path / "empty_list.json", ["[ ]"]))


def element_lines(path):
    """Lines where the fixture's list elements start (json.dump(indent=2) puts each on '  {')."""
    with open(path) as f:
        return [n for n, line in enumerate(f, start=1) if line.rstrip("\n") == "  {"]


def test_rmbench_reader_json_list_and_jsonl(tmp_path):
    rows = json.load(open(RMB))
    got = read_rmbench(RMB)
    assert got.n_rows == got.n_rows_read == 5 and got.invalid == [] and len(got.pairs) == 45
    expected = [
        (f"{r['id']}#c{i}r{j}", r["chosen"][i], r["rejected"][j], r["domain"])
        for r in rows
        for i in range(3)
        for j in range(3)
    ]
    assert [(p["question_id"], p["chosen"], p["rejected"], p["query_type"]) for p in got.pairs] == expected
    assert [line for line, _, _ in iter_records(RMB)] == element_lines(RMB)
    # The same rows as JSONL (and as a list with a byte order mark) give the same pairs.
    as_jsonl = read_rmbench(write_jsonl(tmp_path / "rm.jsonl", rows))
    bom = tmp_path / "bom.json"
    bom.write_bytes(b"\xef\xbb\xbf" + open(RMB, "rb").read())
    assert as_jsonl.pairs == got.pairs == read_rmbench(bom).pairs


def test_rmbench_reader_reports_bad_elements_by_line(tmp_path):
    rows = json.load(open(RMB))
    rows[1] = dict(rows[1], chosen=rows[1]["chosen"][:2])
    rows[3] = dict(rows[3], domain="")
    path = tmp_path / "rm.json"
    path.write_text(json.dumps(rows, indent=2) + "\n")
    got = read_rmbench(path)
    starts = element_lines(path)
    assert [(r.line, r.reason) for r in got.invalid] == [
        (starts[1], "field 'chosen' must hold 3 responses, got 2"),
        (starts[3], "field 'domain' must be a non-empty string, got ''"),
    ]
    assert got.n_rows == 3 and len(got.pairs) == 27
    # A syntax error inside the list ends reading: the file is refused, naming the line.
    text = json.dumps(json.load(open(RMB)), indent=2).splitlines()
    k = next(n for n, line in enumerate(text) if '"domain": "math"' in line)
    text[k] += ",,"
    path.write_text("\n".join(text) + "\n")
    with pytest.raises(RowError, match=rf"rm.json:{k + 1}: not valid JSON .*past a syntax error"):
        read_rmbench(path)


def test_ppe_reader_is_the_judgebench_reader():
    got = get_benchmark("ppe").read(PPE, 0)
    rows = jsonl(PPE)
    assert [p["question_id"] for p in got.pairs] == [r["question_id"] for r in rows]
    assert got.n_rows == got.n_rows_read == 6 and got.excluded == [] and "bench" not in got.pairs[0]
    assert read_judgebench(PPE, 2).n_rows == 2


# ----------------------------------------------------------------------------------------------
# Scoring.
# ----------------------------------------------------------------------------------------------
def verdict_for(outcome, label):
    """The verdict that gives ``outcome`` for the chosen response when ``label`` is right."""
    other = "second" if label == "first" else "first"
    return {"win": label, "loss": other, "tie": "same", "error": "error"}[outcome]


def test_pair_outcome_and_row_result():
    assert pair_outcome("first", "first", "tie") == "win" and pair_outcome("second", "first", "tie") == "loss"
    assert pair_outcome("error", "first", "tie") == "tie" and pair_outcome("error", "first", "exclude") is None
    assert row_result(["win", "win", "win"]) == "win"
    assert row_result(["win", "tie", "win"]) == "tie"
    assert row_result(["win", None, "loss"]) == "loss"
    assert row_result(["win", None, "win"]) == "undecided"


def test_rewardbench2_scoring_best_of_n_by_hand():
    pairs = read_rewardbench2(RB2).pairs
    table = {  # chosen's outcome per pair, row by row (3 rejected each)
        "1001": ["win", "win", "win"],  # Factuality: a win
        "1002": ["win", "tie", "win"],  # Precise IF: a tie is no win
        "1004": ["win", "win", "error"],  # Math: tie under 'tie', undecided under 'exclude'
        "1005": ["win", "loss", "win"],  # Safety: a loss
        "1006": ["error", "error", "error"],  # Focus: tie / undecided
    }
    labels = ["first", "second", "second"] * 5  # the scorer must compare with each pair's label
    verdicts = [verdict_for(table[p["bench"]["row"]][p["bench"]["j"]], l) for p, l in zip(pairs, labels)]
    tie = score_rewardbench2(pairs, verdicts, labels, "tie")
    assert {k: v["accuracy"] for k, v in tie["by_subset"].items()} == {
        "Factuality": 1.0,
        "Precise IF": 0.0,
        "Math": 0.0,
        "Safety": 0.0,
        "Focus": 0.0,
    }
    assert tie["score"] == pytest.approx(1 / 5) and tie["accuracy"] == pytest.approx(1 / 5)
    assert (tie["wins"], tie["ties"], tie["losses"], tie["undecided"]) == (1, 3, 1, 0)
    assert tie["win_rate_ties_excluded"] == pytest.approx(1 / 2)
    assert tie["rows_with_errors"] == 2 and tie["error_pairs"] == 4
    ex = score_rewardbench2(pairs, verdicts, labels, "exclude")
    assert ex["by_subset"]["Math"]["accuracy"] is None and ex["by_subset"]["Focus"]["undecided"] == 1
    assert ex["score"] == pytest.approx(1 / 3) and ex["accuracy"] == pytest.approx(1 / 3) and ex["undecided"] == 2
    # All pairs won: every row is a win.
    allwin = [verdict_for("win", l) for l in labels]
    assert score_rewardbench2(pairs, allwin, labels, "tie")["score"] == 1.0
    with pytest.raises(ValueError, match="15 pairs, 14 verdicts"):
        score_rewardbench2(pairs, allwin[:-1], labels, "tie")


def numpy_rmbench(outcomes: np.ndarray, policy: str) -> dict:
    """outcomes[row, i, j] in {'win', 'loss', 'tie', 'error'} -> hard / normal / easy (numpy)."""
    counted = np.ones(outcomes.shape) if policy == "tie" else (outcomes != "error").astype(float)
    wins = (outcomes == "win").astype(float)
    m = wins.sum(0) / counted.sum(0)
    hard = m[np.triu_indices(3, 1)].mean()
    normal = np.diag(m).mean()
    easy = m[np.tril_indices(3, -1)].mean()
    return {"m": m, "hard": hard, "normal": normal, "easy": easy, "average": (hard + normal + easy) / 3}


@pytest.mark.parametrize("policy", ["exclude", "tie"])
def test_rmbench_scoring_matches_numpy(policy):
    rng = np.random.default_rng(7)
    rows = json.load(open(RMB)) * 3  # 15 rows: ids made unique below
    outcomes = rng.choice(["win", "loss", "tie", "error"], p=[0.55, 0.2, 0.15, 0.1], size=(len(rows), 3, 3))
    pairs, verdicts, labels = [], [], []
    for n, r in enumerate(rows):
        for i in range(3):
            for j in range(3):
                label = "first" if (n + i + 2 * j) % 3 else "second"
                pairs.append(
                    {"question_id": f"{n}#c{i}r{j}", "bench": {"row": str(n), "group": r["domain"], "i": i, "j": j}}
                )
                verdicts.append(verdict_for(outcomes[n, i, j], label))
                labels.append(label)
    got = score_rmbench(pairs, verdicts, labels, policy)
    exp = numpy_rmbench(outcomes, policy)
    for k in ("hard", "normal", "easy", "average"):
        assert got[k] == pytest.approx(exp[k]), k
    np.testing.assert_allclose(np.array(got["matrix"], dtype=float), exp["m"])
    assert got["score"] == pytest.approx(exp["average"]) and got["rows"] == 15 and got["styles"] == list(RMBENCH_STYLES)
    assert got["error_pairs"] == int((outcomes == "error").sum())
    assert got["rows_with_errors"] == int((outcomes == "error").any(axis=(1, 2)).sum())
    math_rows = [n for n, r in enumerate(rows) if r["domain"] == "math"]
    exp_math = numpy_rmbench(outcomes[math_rows], policy)
    assert got["by_domain"]["math"]["hard"] == pytest.approx(exp_math["hard"])
    safety_rows = [n for n, r in enumerate(rows) if r["domain"].startswith("safety")]
    assert got["by_domain_group"]["safety"]["easy"] == pytest.approx(
        numpy_rmbench(outcomes[safety_rows], policy)["easy"]
    )
    assert got["by_domain_group"]["safety"]["rows"] == 6


def test_rmbench_without_errors_is_the_published_formula():
    # No errors: M = wins / rows; hard = sum of the upper triangle / 3 (RM-Bench's definition).
    rng = np.random.default_rng(3)
    wins = rng.integers(0, 11, size=(3, 3))
    got = rmbench_accuracy(wins.tolist(), [[10] * 3] * 3)
    m = wins / 10
    assert got["hard"] == pytest.approx(np.triu(m, 1).sum() / 3)
    assert got["normal"] == pytest.approx(np.trace(m) / 3)
    assert got["easy"] == pytest.approx(np.tril(m, -1).sum() / 3)
    # A cell with no counted row is None and left out of its triangle's mean.
    w, c = rmbench_counts([(0, 1, None), (0, 2, "win"), (1, 2, "tie"), (1, 1, "loss")])
    got = rmbench_accuracy(w, c)
    assert got["matrix"][0][1] is None and got["hard"] == pytest.approx(0.5) and got["normal"] == 0.0
    assert got["easy"] is None and got["average"] == pytest.approx(0.25)


def test_pairwise_scoring_is_summarise_accuracy():
    verdicts = ["first", "second", "same", "error", "first"]
    labels = ["first", "first", "first", "first", "second"]
    for policy in ("exclude", "tie"):
        s = score_pairwise([{}] * 5, verdicts, labels, policy)
        assert s["score"] == pytest.approx(1 / 3) and (s["wins"], s["losses"], s["errors"]) == (1, 2, 1)
    assert score_pairwise([{}] * 5, verdicts, labels, "tie")["same"] == 2


# ----------------------------------------------------------------------------------------------
# prepare_data: the benchmarks from a local directory (no network).
# ----------------------------------------------------------------------------------------------
def copy_layout(src_dir, rb2_as_parquet=True):
    """A local copy in the source repositories' layout, holding the fixtures."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(src_dir / "data" / "ppe")
    (src_dir / "data" / "ppe" / "ppe.jsonl").write_bytes(open(PPE, "rb").read())
    (src_dir / "data" / "total_dataset.json").write_bytes(open(RMB, "rb").read())
    if rb2_as_parquet:
        pq.write_table(pa.Table.from_pylist(jsonl(RB2)), src_dir / "data" / "test-00000-of-00001.parquet")
    else:
        os.makedirs(src_dir / "rewardbench2")
        (src_dir / "rewardbench2" / "test.jsonl").write_bytes(open(RB2, "rb").read())


def sha256(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_prepare_data_copies_benchmarks_from_a_directory(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    copy_layout(src)
    sets = ["ppe", "rewardbench2", "rmbench"]
    written = prepare_data.prepare(str(out), str(src), sets, verify=False)
    assert sorted(os.path.relpath(p, out) for p in written) == [
        "ppe/ppe.jsonl",
        "rewardbench2/test.jsonl",
        "rmbench/total_dataset.json",
    ]
    assert open(out / "ppe" / "ppe.jsonl", "rb").read() == open(PPE, "rb").read()
    assert open(out / "rmbench" / "total_dataset.json", "rb").read() == open(RMB, "rb").read()
    assert jsonl(out / "rewardbench2" / "test.jsonl") == jsonl(RB2)  # parquet -> JSONL, same rows
    manifest = json.load(open(out / "manifest.json"))
    assert sorted(manifest) == ["ppe/ppe.jsonl", "rewardbench2/test.jsonl", "rmbench/total_dataset.json"]
    for local, e in manifest.items():
        assert e["sha256"] == sha256(out / local) and e["bytes"] == os.path.getsize(out / local)
        assert e["verified"] is False
    assert manifest["ppe/ppe.jsonl"]["check"] == "git blob 595a1cb3c88256cb7479cb6633c98cd1852e0f3d"
    rb = manifest["rewardbench2/test.jsonl"]
    assert rb["check"].startswith("none: no hash of this file is known")
    assert rb["converted_from"]["sha256"] == sha256(src / "data" / "test-00000-of-00001.parquet")
    # The written files read as their benchmarks.
    assert len(read_rewardbench2(out / "rewardbench2" / "test.jsonl").pairs) == 15
    assert len(read_rmbench(out / "rmbench" / "total_dataset.json").pairs) == 45

    # Verification on: a copy that is not the pinned release file is refused, naming the pin ...
    with pytest.raises(
        prepare_data.DataError, match=r"ppe/ppe.jsonl: git blob id [0-9a-f]{12}\.\.\. is not the pinned 595a1cb3c882"
    ):
        prepare_data.prepare(str(tmp_path / "o2"), str(src), ["ppe"])
    # ... while RewardBench 2, with no known hash, is written and recorded as unverified.
    src2 = tmp_path / "src2"
    copy_layout(src2, rb2_as_parquet=False)
    prepare_data.prepare(str(out), str(src2), ["rewardbench2"])
    assert open(out / "rewardbench2" / "test.jsonl", "rb").read() == open(RB2, "rb").read()
    manifest = json.load(open(out / "manifest.json"))
    assert len(manifest) == 3 and "converted_from" not in manifest["rewardbench2/test.jsonl"]  # entries kept
    with pytest.raises(prepare_data.DataError, match="not found under"):
        prepare_data.prepare(str(out), str(tmp_path / "nowhere"), ["rmbench"], verify=False)


def test_git_blob_id():
    assert prepare_data.git_blob_id(b"hello\n") == "ce013625030ba8dba906f756967f9e9ca394464a"  # git hash-object
    assert prepare_data.git_blob_id(b"") == "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391"
