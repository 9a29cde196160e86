r"""Writes the CLIPO paper's train/test sets and the OpenRS judge benchmarks into a local directory.

    python -m experiments.prepare_data --out=DATA                    # from the authors' repositories (online)
    python -m experiments.prepare_data --out=DATA --from_dir=COPY    # from a local copy, no network
    python -m experiments.prepare_data --fixtures=tests/data --from_dir=DATA   # rewrite the test fixtures

The files come from the CLIPO and OpenRS releases on GitHub (Qwen-Applications/CLIPO ``data/``,
Qwen-Applications/OpenRS ``data/judgebench``) at pinned commits, and every file is checked against
its SHA-256 before it is written. ``--from_dir`` takes either this script's output layout or the
two repositories' ``data/`` layout. The result:

    DATA/clipo/train/{gsm8k,math75}.parquet
    DATA/clipo/test/{gsm8k,gsm_symbolic,gsm_p1,gsm_p2,math,math_perturb_simple,...}.parquet
    DATA/judgebench/{gpt,claude}.jsonl

Configs take the directory: ``--config=configs/clipo_gsm8k_qwen25_3b.py:data=DATA/clipo``,
``python -m experiments.judge --input=DATA/judgebench/gpt.jsonl``.

``--fixtures`` writes the small samples the tests read (``tests/data/clipo``,
``tests/data/judgebench``): a fixed selection of rows from each file, so that a test runs the same
code on any machine. GSM-Symbolic and its P1/P2 variants (CC-BY-NC-ND-4.0) are not sampled.
Licences follow the original datasets (GSM8K, MATH: MIT; JudgeBench: MIT).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import urllib.parse
import urllib.request

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("out", None, "Directory to write the full data sets into.")
flags.DEFINE_string("from_dir", None, "Read the files from this local copy instead of downloading them.")
flags.DEFINE_string("fixtures", None, "Write the test fixtures into this directory (needs --from_dir).")

CLIPO_COMMIT = "13c5fd6b44bfb861857f87f41832bf7d3049d9b7"
OPENRS_COMMIT = "4c7f22b570753630e91d8450205d33f1580a00df"
RAW = "https://raw.githubusercontent.com/Qwen-Applications/{repo}/{commit}/{path}"


def _clipo(name: str, upstream: str, sha: str) -> tuple[str, str, str, str]:
    return f"clipo/{name}", RAW.format(repo="CLIPO", commit=CLIPO_COMMIT, path=upstream), upstream, sha


# (local path, url, path in the authors' repository, sha256)
FILES = [
    _clipo("train/gsm8k.parquet", "data/train/gsm8k.parquet", "9cb7d545e54c40af527cb88f66391e1d26d6a884077e4aee168424d098ff84ac"),
    _clipo("train/math75.parquet", "data/train/math75.parquet", "15099fa7d2d60aa51096ad03bdac46d2e02236d49627a631cc259297f3dd96d2"),
    _clipo("test/aime.parquet", "data/test/aime.parquet", "dec227a19dd501aae645a765ab360199531d599b9860468e2f7fc5bec1a240ff"),
    _clipo("test/aime2025.parquet", "data/test/aime2025.parquet", "152c8bf9dd1269eab08e850ef76056aff1b3bdddc509018504c89c8d279c8023"),
    _clipo("test/amc.parquet", "data/test/amc.parquet", "073577e3c69cea7e05e6ebaba024fd09b3f732ad6dc404426b0ec2db18d4f159"),
    _clipo("test/commonsense_qa.parquet", "data/test/commonsense_qa.parquet", "acd6719c36dbc1c531f7c7809e090dce6d969c8b23371bceade41e1ec3aa4533"),
    _clipo("test/gsm8k.parquet", "data/test/gsm8k.parquet", "bd6f977eecbe4422f1d67159cea796e0c6e5060e5709b99e4afbe622f0498523"),
    _clipo("test/gsm_p1.parquet", "data/test/gsm_p1.parquet", "3b26b2f4d06c7ea1626614670321f1ead903b380107b2081c89b7edc1a188788"),
    _clipo("test/gsm_p2.parquet", "data/test/gsm_p2.parquet", "2284a83686ac78f006d6839b9f0bcc5a2bf989ac6aa0200a0ab9e5326e441ea7"),
    _clipo("test/gsm_symbolic.parquet", "data/test/gsm_symbolic.parquet", "59fb519fbfe1d04d4989b0793754b712761c807eab56a9a6c21a31cbb2a3f180"),
    _clipo("test/math.parquet", "data/test/math.parquet", "2f9bd008d0a7ff0b421a03ec8ae5af22172cc488c411198d32808413a7efd5fe"),
    _clipo("test/math_perturb_hard.parquet", "data/test/math_perturb_hard.parquet", "ad9734d1cc7cc02b3d03df0b40386b611cfc1c20234465884319853e95e6bff2"),
    _clipo("test/math_perturb_simple.parquet", "data/test/math_perturb_simple.parquet", "d9a8a5c7db7bf70939220e394fc75b55b741846b3d5cf38278e60c81138655c4"),
    _clipo("test/mmlu2k.parquet", "data/test/mmlu2k.parquet", "994660b24751ab432058ee8c9b2ab0ec3a7730a50414da406cc15b6976d40a0b"),
    # Upstream names these two "theoremqa*2" / "truthfulqa*2" (each is its set twice over).
    _clipo("test/theoremqa_x2.parquet", "data/test/theoremqa*2.parquet", "38d3eac6f3571e1695e0e678e63c227d3b7b9a8b803c1e620b1155722bc98d53"),
    _clipo("test/truthfulqa_x2.parquet", "data/test/truthfulqa*2.parquet", "a88f382fa1e537831a040b272ef8f40d96814ceb0abf5c6ff0599628384a5866"),
    (
        "judgebench/gpt.jsonl",
        RAW.format(repo="OpenRS", commit=OPENRS_COMMIT, path="data/judgebench/gpt.jsonl"),
        "data/judgebench/gpt.jsonl",
        "0585f737413c90fb7e3e2a756ead4c0d238dbdc4d7339ce0a0a8b5dab3cbdfec",
    ),
    (
        "judgebench/claude.jsonl",
        RAW.format(repo="OpenRS", commit=OPENRS_COMMIT, path="data/judgebench/claude.jsonl"),
        "data/judgebench/claude.jsonl",
        "0960f3754780a2f14e0f2dc43c1638af54a1c2fef268904baf8bbb8ef4d8fb33",
    ),
]  # fmt: skip

NOT_SAMPLED = {"gsm_symbolic", "gsm_p1", "gsm_p2"}  # CC-BY-NC-ND-4.0: no derived excerpts
ROWS_PER_SET = 12
JUDGEBENCH_PAIRS = 40


class DataError(RuntimeError):
    pass


def _read_source(local: str, upstream: str, url: str, from_dir: str | None) -> bytes:
    if from_dir is None:
        quoted = url.replace(upstream, urllib.parse.quote(upstream))
        try:
            with urllib.request.urlopen(quoted, timeout=60) as r:
                return r.read()
        except OSError as e:
            raise DataError(f"{url}: download failed ({e}); pass --from_dir=<a local copy>") from None
    candidates = [os.path.join(from_dir, local), os.path.join(from_dir, upstream)]
    candidates += [os.path.join(from_dir, upstream.removeprefix("data/"))]
    for path in candidates:
        if os.path.isfile(path):
            with open(path, "rb") as f:
                return f.read()
    raise DataError(f"{local}: not found under {from_dir} (looked for {', '.join(candidates)})")


def prepare(out: str, from_dir: str | None) -> list[str]:
    """Writes every file of FILES under ``out``, each checked against its SHA-256."""
    written = []
    for local, url, upstream, sha in FILES:
        data = _read_source(local, upstream, url, from_dir)
        got = hashlib.sha256(data).hexdigest()
        if got != sha:
            raise DataError(
                f"{local}: sha256 {got[:16]}... is not the pinned {sha[:16]}... (a different or damaged copy)"
            )
        path = os.path.join(out, local)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = path + ".part"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)  # a half-written file never carries the final name
        written.append(path)
    return written


def _fixture_rows(name: str, table) -> list[int]:
    """Row numbers sampled from one CLIPO set: the first rows, the last row, and for math75 the
    rows whose solution has an empty \\boxed{} (the reader must skip exactly those)."""
    n = table.num_rows
    rows = set(range(min(ROWS_PER_SET - 1, n))) | {n - 1}
    if name == "math75":
        gts = table.column("reward_model").to_pylist()
        rows |= {i for i, rm in enumerate(gts) if "\\boxed{}" in rm["ground_truth"]}
    return sorted(rows)


def write_fixtures(fixtures: str, from_dir: str) -> list[str]:
    import pyarrow.parquet as pq

    written = []
    for local, _url, upstream, _sha in FILES:
        src = None
        for path in (os.path.join(from_dir, local), os.path.join(from_dir, upstream)):
            if os.path.isfile(path):
                src = path
                break
        if src is None:
            raise DataError(f"{local}: not found under {from_dir}; run --out={from_dir} first")
        dst = os.path.join(fixtures, local)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        name = os.path.splitext(os.path.basename(local))[0]
        if local.startswith("clipo/"):
            if name in NOT_SAMPLED:
                continue
            table = pq.read_table(src)
            pq.write_table(table.take(_fixture_rows(name, table)), dst)
        elif local == "judgebench/gpt.jsonl":
            with open(src) as f:
                rows = [json.loads(line) for line in f if line.strip()]
            by_type: dict[str, list[dict]] = {}
            for r in rows:
                by_type.setdefault(r["query_type"], []).append(r)
            picked, k = [], 0  # round-robin over query types, in file order: every type is represented
            while len(picked) < JUDGEBENCH_PAIRS and any(k < len(v) for v in by_type.values()):
                picked += [v[k] for v in by_type.values() if k < len(v)][: JUDGEBENCH_PAIRS - len(picked)]
                k += 1
            dst = os.path.join(fixtures, "judgebench", "gpt_sample.jsonl")
            with open(dst, "w") as f:
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in picked)
        else:
            continue
        written.append(dst)
    return written


def main(argv):
    del argv
    if not FLAGS.out and not FLAGS.fixtures:
        raise app.UsageError("give --out=DIR (full data) and/or --fixtures=DIR --from_dir=DATA")
    try:
        if FLAGS.out:
            for path in prepare(FLAGS.out, FLAGS.from_dir):
                print(path)
        if FLAGS.fixtures:
            if not FLAGS.from_dir and not FLAGS.out:
                raise app.UsageError("--fixtures needs --from_dir (or --out) holding the full data")
            for path in write_fixtures(FLAGS.fixtures, FLAGS.out or FLAGS.from_dir):
                print(path)
    except DataError as e:
        sys.exit(f"prepare_data: {e}")


if __name__ == "__main__":
    app.run(main)
