r"""Writes the CLIPO paper's train/test sets and the OpenRS judge benchmarks into a local directory.

    python -m experiments.prepare_data --out=DATA                    # from the authors' repositories (online)
    python -m experiments.prepare_data --out=DATA --from_dir=COPY    # from a local copy, no network
    python -m experiments.prepare_data --out=DATA --sets=ppe,rewardbench2,rmbench   # some sets only
    python -m experiments.prepare_data --fixtures=tests/data --from_dir=DATA   # rewrite the test fixtures

The files come from the CLIPO and OpenRS releases on GitHub (Qwen-Applications/CLIPO ``data/``,
Qwen-Applications/OpenRS ``data/judgebench``) at pinned commits, and every file is checked against
its SHA-256 before it is written. ``--from_dir`` takes either this script's output layout or the
two repositories' ``data/`` layout. The result:

    DATA/clipo/train/{gsm8k,math75}.parquet
    DATA/clipo/test/{gsm8k,gsm_symbolic,gsm_p1,gsm_p2,math,math_perturb_simple,...}.parquet
    DATA/judgebench/{gpt,claude}.jsonl
    DATA/ppe/ppe.jsonl                      # PPE as converted by the OpenRS release (JudgeBench format)
    DATA/rewardbench2/test.jsonl            # RewardBench 2, test split, one row per line
    DATA/rmbench/total_dataset.json         # RM-Bench, a JSON list
    DATA/manifest.json                      # per file: source, size, sha256, how it was checked

The reward-model benchmarks come from three places.  PPE: ``data/ppe/ppe.jsonl`` of the OpenRS
release at the pinned commit.  RM-Bench: ``data/total_dataset.json`` of github.com/THU-KEG/RM-Bench
at a pinned commit.  These two are checked against their git blob ids in those commits' trees (the
SHA-1 git computes over the file; read from the repositories, so no SHA-256 is needed to pin them).
RewardBench 2: the parquet of the Hugging Face dataset ``allenai/reward-bench-2``'s test split,
``https://huggingface.co/datasets/allenai/reward-bench-2/resolve/<revision>/data/test-00000-of-00001.parquet``
(``--rewardbench2_revision``, default ``main``), written as JSONL.  No hash of that file is known
here: the manifest records the SHA-256 of the parquet downloaded and of the JSONL written, and the
commit the server resolved the revision to (``X-Repo-Commit``); pass that commit as
``--rewardbench2_revision`` to fetch the same file again.  With ``--from_dir`` the files are taken
from this script's output layout, the repositories' layout (``data/ppe/ppe.jsonl``,
``data/total_dataset.json``, ``data/test-00000-of-00001.parquet``) or, for RewardBench 2, an
already-converted ``rewardbench2/test.jsonl``.  ``--noverify`` writes a copy that does not match the
pinned files (a newer export, hand-written samples) and marks it unverified in the manifest.

Configs take the directory: ``--config=configs/clipo_gsm8k_qwen25_3b.py:data=DATA/clipo``,
``python -m experiments.judge --input=DATA/judgebench/gpt.jsonl``,
``python -m experiments.judge --benchmark=rmbench --input=DATA/rmbench/total_dataset.json``.

``--fixtures`` writes the small samples the tests read (``tests/data/clipo``,
``tests/data/judgebench``): a fixed selection of rows from each file, so that a test runs the same
code on any machine. GSM-Symbolic and its P1/P2 variants (CC-BY-NC-ND-4.0) are not sampled.
The reward-model benchmark fixtures (``tests/data/{ppe,rewardbench2,rmbench}``) are hand-written
rows in the published formats, not excerpts, and are not written by ``--fixtures``.
Licences follow the original datasets (GSM8K, MATH: MIT; JudgeBench: MIT; RewardBench 2: ODC-BY).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import os
import sys
import urllib.parse
import urllib.request

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("out", None, "Directory to write the full data sets into.")
flags.DEFINE_string("from_dir", None, "Read the files from this local copy instead of downloading them.")
flags.DEFINE_string("fixtures", None, "Write the test fixtures into this directory (needs --from_dir).")
flags.DEFINE_list(
    "sets", None, "Sets to write with --out (default all): clipo, judgebench, ppe, rewardbench2, rmbench."
)
flags.DEFINE_string("rewardbench2_revision", "main", "Revision (branch, tag or commit) of allenai/reward-bench-2.")
flags.DEFINE_bool(
    "verify", True, "Refuse a file that does not match its pinned hash (--noverify: record it unverified)."
)

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

# The reward-model benchmarks.  A git blob id is read from the source repository's tree at the
# pinned commit; None where no hash of the file is known (the manifest records what was fetched).
RMBENCH_COMMIT = "73c52d7b27b361621361ec959ac6c0eb9bb7a689"
REWARDBENCH2_URL = "https://huggingface.co/datasets/allenai/reward-bench-2/resolve/{revision}/{path}"


@dataclasses.dataclass(frozen=True)
class BenchFile:
    set: str
    local: str  # path under --out
    url: str  # may hold {revision}
    upstream: str  # path in the source repository
    git_blob: str | None  # git blob id of the file at the pinned commit, or None (unknown)
    pinned: str  # what the url is pinned to, for the manifest
    parquet_to_jsonl: bool = False


BENCH_FILES = [
    BenchFile(
        "ppe",
        "ppe/ppe.jsonl",
        RAW.format(repo="OpenRS", commit=OPENRS_COMMIT, path="data/ppe/ppe.jsonl"),
        "data/ppe/ppe.jsonl",
        "595a1cb3c88256cb7479cb6633c98cd1852e0f3d",
        f"Qwen-Applications/OpenRS@{OPENRS_COMMIT}",
    ),
    BenchFile(
        "rmbench",
        "rmbench/total_dataset.json",
        f"https://raw.githubusercontent.com/THU-KEG/RM-Bench/{RMBENCH_COMMIT}/data/total_dataset.json",
        "data/total_dataset.json",
        "75d9c1eab827fa32bfb684fc6554f96dee69f66a",
        f"THU-KEG/RM-Bench@{RMBENCH_COMMIT}",
    ),
    BenchFile(
        "rewardbench2",
        "rewardbench2/test.jsonl",
        REWARDBENCH2_URL,
        "data/test-00000-of-00001.parquet",
        None,
        "allenai/reward-bench-2@{revision}",
        parquet_to_jsonl=True,
    ),
]
SETS = ("clipo", "judgebench", "ppe", "rewardbench2", "rmbench")

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


def _write(out: str, local: str, data: bytes) -> str:
    path = os.path.join(out, local)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".part"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)  # a half-written file never carries the final name
    return path


def git_blob_id(data: bytes) -> str:
    """The id git gives a file with these bytes (SHA-1 of a ``blob <size>\\0`` header and the bytes)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _download(url: str) -> tuple[bytes, dict[str, str]]:
    """The body of ``url`` and the headers that identify it, from any response on the way (the
    Hugging Face resolve answer that names the commit is a redirect)."""
    seen: dict[str, str] = {}
    keep = ("X-Repo-Commit", "X-Linked-Etag", "ETag")

    class Redirects(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, req, fp, code, msg, headers, newurl):
            seen.update({k: headers[k] for k in keep if headers.get(k) and k not in seen})
            return super().redirect_request(req, fp, code, msg, headers, newurl)

    try:
        with urllib.request.build_opener(Redirects).open(url, timeout=300) as r:
            data = r.read()
            seen.update({k: r.headers[k] for k in keep if r.headers.get(k) and k not in seen})
    except OSError as e:
        raise DataError(f"{url}: download failed ({e}); pass --from_dir=<a local copy>") from None
    return data, seen


def _no_nan(v):
    """JSON has no NaN: a float NaN (a missing value in a parquet float column) becomes null."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _no_nan(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_no_nan(x) for x in v]
    return v


def parquet_to_jsonl(data: bytes) -> bytes:
    """One JSON object per parquet row, columns in the file's order."""
    import pyarrow.parquet as pq

    try:  # a damaged download (an HTML error page) or a column JSON cannot hold: one line, no traceback
        rows = pq.read_table(io.BytesIO(data)).to_pylist()
        return "".join(json.dumps(_no_nan(r), ensure_ascii=False) + "\n" for r in rows).encode("utf-8")
    except (ValueError, TypeError, OSError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise DataError(f"not a parquet file that converts to JSONL ({type(e).__name__}: {e})") from None


def _bench_source(bf: BenchFile, from_dir: str | None, revision: str) -> tuple[bytes, str, dict, bool]:
    """(bytes, where they came from, identifying headers, whether they are parquet to convert)."""
    if from_dir is None:
        url = bf.url.format(revision=urllib.parse.quote(revision, safe=""), path=bf.upstream)
        data, headers = _download(url)
        return data, url, headers, bf.parquet_to_jsonl
    name = os.path.basename(bf.upstream)
    candidates = [bf.local, bf.upstream, bf.upstream.removeprefix("data/"), os.path.join(bf.set, name)]
    for rel in dict.fromkeys(candidates):
        path = os.path.join(from_dir, rel)
        if os.path.isfile(path):
            with open(path, "rb") as f:
                return f.read(), path, {}, bf.parquet_to_jsonl and path.endswith(".parquet")
    looked = ", ".join(os.path.join(from_dir, c) for c in dict.fromkeys(candidates))
    raise DataError(f"{bf.local}: not found under {from_dir} (looked for {looked})")


def prepare_benchmark(bf: BenchFile, out: str, from_dir: str | None, verify: bool, revision: str) -> tuple[str, dict]:
    """Writes one reward-model benchmark file; returns its path and manifest entry."""
    data, source, headers, convert = _bench_source(bf, from_dir, revision)
    entry = {"set": bf.set, "source": source, "pinned": bf.pinned.format(revision=revision)}
    if bf.git_blob is not None:
        got = git_blob_id(data)
        entry.update(check=f"git blob {bf.git_blob}", verified=got == bf.git_blob)
        if got != bf.git_blob and verify:
            raise DataError(
                f"{bf.local}: git blob id {got[:12]}... is not the pinned {bf.git_blob[:12]}... "
                f"({bf.pinned}; a different or damaged copy; --noverify records it unverified)"
            )
    else:
        entry.update(check="none: no hash of this file is known; sha256 recorded from this copy", verified=False)
    if headers.get("X-Repo-Commit"):
        entry["resolved_revision"] = headers["X-Repo-Commit"]
    if headers.get("X-Linked-Etag") or headers.get("ETag"):
        entry["server_etag"] = (headers.get("X-Linked-Etag") or headers["ETag"]).strip('"')
    if convert:
        entry["converted_from"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        try:
            data = parquet_to_jsonl(data)
        except DataError as e:
            raise DataError(f"{bf.local} from {source}: {e}") from None
    entry.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    return _write(out, bf.local, data), entry


def _read_manifest(out: str) -> dict:
    """DIR/manifest.json ({} if there is none); DataError if it cannot be read."""
    path = os.path.join(out, "manifest.json")
    manifest = {}
    if os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as f:
                manifest = json.load(f)
        except (ValueError, OSError) as e:  # JSONDecodeError / UnicodeDecodeError are ValueErrors
            raise DataError(f"{path}: cannot read the manifest ({e}); move it away to start a new one") from None
        if not isinstance(manifest, dict):
            raise DataError(f"{path}: the manifest is not a JSON object; move it away to start a new one")
    return manifest


def _write_manifest(out: str, entries: dict[str, dict]) -> None:
    """Adds ``entries`` (local path -> entry) to DIR/manifest.json, keeping the other files' entries."""
    manifest = _read_manifest(out)
    manifest.update(entries)
    _write(out, "manifest.json", (json.dumps(dict(sorted(manifest.items())), indent=2) + "\n").encode())


def prepare(
    out: str,
    from_dir: str | None,
    sets: list[str] | tuple[str, ...] = SETS,
    verify: bool = True,
    rewardbench2_revision: str = "main",
) -> list[str]:
    """Writes every file of the chosen sets under ``out``, each checked against its SHA-256 (CLIPO,
    JudgeBench) or git blob id (PPE, RM-Bench) unless ``verify`` is off, and records what was written
    in ``out/manifest.json``. The manifest is updated after each file, so that when a later file
    fails it still describes every file on disk (none carries a stale entry from an earlier run)."""
    unknown = sorted(set(sets) - set(SETS))
    if unknown:
        raise DataError(f"unknown sets {unknown} (known: {', '.join(SETS)})")
    _read_manifest(out)  # an unreadable manifest fails before any file is written
    written = []
    for local, url, upstream, sha in FILES:
        if local.split("/")[0] not in sets:
            continue
        data = _read_source(local, upstream, url, from_dir)
        got = hashlib.sha256(data).hexdigest()
        if got != sha and verify:
            raise DataError(
                f"{local}: sha256 {got[:16]}... is not the pinned {sha[:16]}... (a different or damaged copy)"
            )
        written.append(_write(out, local, data))
        entry = {"source": url if from_dir is None else from_dir, "check": f"sha256 {sha}"}
        entry.update(verified=got == sha, bytes=len(data), sha256=got)
        _write_manifest(out, {local: entry})
    for bf in BENCH_FILES:
        if bf.set in sets:
            path, entry = prepare_benchmark(bf, out, from_dir, verify, rewardbench2_revision)
            written.append(path)
            _write_manifest(out, {bf.local: entry})
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
            sets = FLAGS.sets or SETS
            for path in prepare(FLAGS.out, FLAGS.from_dir, sets, FLAGS.verify, FLAGS.rewardbench2_revision):
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
