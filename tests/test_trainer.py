"""The trainer end to end through its absl entry point (subprocesses, tiny config).

* config errors fail before any compilation with a one-line message naming the field;
* a run killed with SIGKILL and re-run with the same command reproduces the uninterrupted
  run's metrics.jsonl step for step;
* config.json / metrics.jsonl contents, the overlong-prompt counter, the NaN abort.

A per-session persistent XLA compilation cache makes the later subprocesses cheap.
"""

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ABSL_TRAILER = "Pass --helpshort or --helpfull to see help on flags."

# steps=6 with a checkpoint every 2; the entropy bonus gives a non-zero gradient even when
# every reward in a group is equal (the tiny model solves nothing), so the params move
# every step and the resume comparison is not vacuous. rl.max_prompt_len is set to the
# median prompt length of the pool (see `run_flags`) so about half the prompts are dropped.
BASE_FLAGS = [
    "--config=configs/demo.py:size=tiny",
    "--config.progress_bar=False",
    "--config.rl.steps=6",
    "--config.ckpt.every=2",
    "--config.rl.entropy_coef=0.01",
    "--config.rl.warmup_steps=0",
    "--config.eval.max_new_tokens=4",
    "--config.task.test_size=2",
]
SEED, STEPS, PROMPTS_PER_STEP = 0, 6, 4


def tiny_task(workdir):
    sys.path.insert(0, REPO)
    from clipo_jax import tasks
    from configs.demo import get_config

    return tasks.build_task(get_config("size=tiny").task, str(workdir))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    e = dict(os.environ)
    e.update(
        PYTHONPATH=REPO,
        JAX_PLATFORMS="cpu",
        JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("xla_cache")),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    )
    e.pop("XLA_FLAGS", None)
    return e


def train_cmd(workdir, *extra):
    return [sys.executable, "-m", "experiments.train", f"--workdir={workdir}", *extra]


def run_train(env, workdir, *extra, timeout=300):
    return subprocess.run(
        train_cmd(workdir, *extra), cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


def last_line(stderr: str) -> str:
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip() and ln.strip() != ABSL_TRAILER]
    return lines[-1] if lines else ""


def read_metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def comparable(rec):
    return {k: v for k, v in rec.items() if not k.startswith(("time/", "throughput/"))}


# ----------------------------------------------------------------------------- config errors
@pytest.mark.parametrize(
    "override,names",
    [
        ("--config.rl.advantage=nope", "config.rl.advantage"),
        ("--config.rl.mini_batches=3", "rl.mini_batches"),
        ("--config.rl.lr=abc", "config.rl.lr"),
        ("--config.rl.nope=1", "rl.nope"),
    ],
)
def test_config_error_is_one_line_before_compilation(env, tmp_path, override, names):
    workdir = tmp_path / "w"
    t0 = time.perf_counter()
    r = run_train(env, workdir, "--config=configs/demo.py:size=tiny", override, timeout=120)
    assert r.returncode == 1, r.stderr[-2000:]
    assert "Traceback" not in r.stderr, f"a traceback instead of a one-line error:\n{r.stderr[-1500:]}"
    assert names in last_line(r.stderr), r.stderr[-1500:]
    assert not workdir.exists(), "nothing may be written (or compiled) before the config is validated"
    print(f"{override}: {time.perf_counter() - t0:.1f}s -> {last_line(r.stderr)}")


# ----------------------------------------------------------------------------- one full run
@pytest.fixture(scope="module")
def max_prompt_len(tmp_path_factory):
    task = tiny_task(tmp_path_factory.mktemp("task"))
    return int(np.median([len(task.encode_prompt(r)) for r in task.train_rows]))


@pytest.fixture(scope="module")
def run_flags(max_prompt_len):
    return BASE_FLAGS + [f"--config.rl.max_prompt_len={max_prompt_len}"]


@pytest.fixture(scope="module")
def full_run(env, run_flags, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    r = run_train(env, workdir, *run_flags, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return workdir


def test_config_json_and_metrics_lines(full_run, max_prompt_len):
    with open(full_run / "config.json") as f:
        cfg = json.load(f)
    # the resolved config: defaults from configs/demo.py with the command-line overrides applied
    assert cfg["rl"]["steps"] == STEPS and cfg["rl"]["entropy_coef"] == 0.01
    assert cfg["rl"]["max_prompt_len"] == max_prompt_len and cfg["model"]["d_model"] == 32
    recs = read_metrics(full_run)
    assert [r["step"] for r in recs] == list(range(1, STEPS + 1))
    for r in recs:
        for key in ("reward/mean", "time/step", "time/rollout", "time/update", "actor/loss", "actor/skipped"):
            assert key in r and np.isfinite(r[key]), (r["step"], key)
        assert r["time/step"] >= r["time/update"] >= 0
    # the entropy bonus must move the params: the policy's entropy changes from step to step
    ents = [r["actor/entropy"] for r in recs]
    assert len(set(ents)) == len(ents), ents
    assert sorted(os.listdir(full_run / "checkpoints"))[-1] == str(STEPS)
    assert (full_run / "eval_before.json").exists() and (full_run / "eval_after.json").exists()


def expected_overlong_drops(workdir, n_steps, max_len):
    """Independent replay of the data stream: per-epoch permutation of the pool, skip prompts
    longer than max_len, take PROMPTS_PER_STEP per step; returns the cumulative drops."""
    task = tiny_task(workdir)  # reuses the tokenizer trained in workdir
    pool = task.train_rows
    lengths = [len(task.encode_prompt(r)) for r in pool]
    drops, pos, out = 0, 0, []
    for _ in range(n_steps):
        kept = 0
        while kept < PROMPTS_PER_STEP:
            epoch, i = divmod(pos, len(pool))
            idx = np.random.default_rng([SEED, epoch]).permutation(len(pool))[i]
            pos += 1
            if lengths[idx] > max_len:
                drops += 1
            else:
                kept += 1
        out.append(drops)
    return out, lengths


def test_overlong_prompts_are_dropped_and_counted(full_run, max_prompt_len):
    expected, lengths = expected_overlong_drops(full_run, STEPS, max_prompt_len)
    assert 0 < sum(ln > max_prompt_len for ln in lengths) < len(lengths)
    got = [r.get("counters/prompts_dropped_overlong", 0) for r in read_metrics(full_run)]
    assert expected[-1] > 0
    assert got == expected


@pytest.mark.slow
def test_evaluate_cli_on_a_run_leaves_out_and_counts_overlong_test_prompts(env, full_run, tmp_path):
    sys.path.insert(0, REPO)
    import ml_collections

    from clipo_jax import tasks

    with open(full_run / "config.json") as f:
        task = tasks.build_task(ml_collections.ConfigDict(json.load(f)).task, str(tmp_path / "task"))
    lengths = {name: [len(task.encode_prompt(r)) for r in rows] for name, rows in task.test_sets.items()}
    limit = int(np.median([n for ls in lengths.values() for n in ls]))  # about half of them go
    out = tmp_path / "eval.json"
    cmd = [sys.executable, "-m", "experiments.evaluate", f"--run={full_run}", f"--max_prompt_len={limit}"]
    r = subprocess.run(
        cmd + ["--max_new_tokens=4", f"--output={out}"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    want_dropped = {name: sum(n > limit for n in ls) for name, ls in lengths.items()}
    assert res["dropped_overlong"] == {name: n for name, n in want_dropped.items() if n}
    assert sum(want_dropped.values()) > 0  # the case is met
    kept = {name: len(ls) - want_dropped[name] for name, ls in lengths.items()}
    assert {name: v["n_problems"] for name, v in res["results"].items()} == kept  # an emptied set shows 0


def test_every_prompt_overlong_is_an_error_not_a_hang(env, run_flags, tmp_path):
    """max_prompt_len below the shortest prompt: the data stream can never fill a step. It must
    stop with a one-line error naming rl.max_prompt_len (it used to loop over the pool forever)."""
    workdir = tmp_path / "overlong"
    try:
        r = run_train(env, workdir, *run_flags, "--config.rl.max_prompt_len=5", "--config.sft.steps=0", timeout=180)
    except subprocess.TimeoutExpired:
        pytest.fail("the trainer hung: no training prompt fits rl.max_prompt_len=5 and next_prompts loops forever")
    assert r.returncode == 1, r.stderr[-2000:]
    assert "rl.max_prompt_len" in last_line(r.stderr), r.stderr[-2000:]


# ----------------------------------------------------------------------------- kill and resume
def _finished_checkpoints(ckpt_dir):
    if not os.path.isdir(ckpt_dir):
        return []
    return sorted(int(d) for d in os.listdir(ckpt_dir) if d.isdigit())


@pytest.mark.slow
def test_sigkill_and_resume_reproduces_uninterrupted_run(env, run_flags, full_run, tmp_path):
    workdir = tmp_path / "killed"
    metrics = workdir / "metrics.jsonl"
    proc = subprocess.Popen(
        train_cmd(workdir, *run_flags),
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 300
        while True:  # kill once step 2's checkpoint is final and step 3 (past it) is logged
            assert proc.poll() is None, f"run ended before it could be killed: {proc.stderr.read()[-2000:]}"
            assert time.time() < deadline, "timed out waiting for the run to reach step 3"
            n = len(metrics.read_text().splitlines()) if metrics.exists() else 0
            if n >= 3 and 2 in _finished_checkpoints(workdir / "checkpoints"):
                break
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    n_before = len(metrics.read_text().splitlines())
    latest = max(_finished_checkpoints(workdir / "checkpoints"))
    assert latest < STEPS and n_before > latest, (latest, n_before)  # lines past the checkpoint exist

    r = run_train(env, workdir, *run_flags, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed from step {latest}" in r.stdout
    resumed, reference = read_metrics(workdir), read_metrics(full_run)
    assert [x["step"] for x in resumed] == list(range(1, STEPS + 1))
    for a, b in zip(resumed, reference):
        assert comparable(a) == comparable(b), f"step {a['step']} differs"
    # the first step of each process compiles: the flag marks step 1 and the step after the resume
    firsts = [x["step"] for x in resumed if x["time/first_step_in_process"]]
    assert firsts == [1, latest + 1], firsts
    assert [x["step"] for x in reference if x["time/first_step_in_process"]] == [1]
    with open(workdir / "eval_after.json") as f, open(full_run / "eval_after.json") as g:
        assert json.load(f) == json.load(g)
    # TensorBoard: the resumed run's event file starts by purging the steps after the checkpoint
    # (a session START at latest + 1), so the killed run's later points are not shown twice
    newest = max((workdir / "tb").glob("events.out.tfevents.*"), key=os.path.getmtime)
    starts = [e.step for e in _tb_events(newest) if e.HasField("session_log") and e.session_log.status == 1]
    assert starts == [latest + 1], starts
    # both runs record the same RL start (the digest of the same parameters, each SFT'd in its run dir)
    start, other = (json.loads((w / "start.json").read_text()) for w in (workdir, full_run))
    assert start["params_digest"] == other["params_digest"] and len(start["params_digest"]) == 16
    assert os.path.basename(start["sft_cache"]) == os.path.basename(other["sft_cache"])
    assert start["sft_cache"].startswith(str(workdir))


def _tb_events(path):
    """The Event records of one TensorBoard event file (TFRecord framing: length, its CRC, the
    record, its CRC)."""
    from tensorboardX.proto import event_pb2

    data, i = path.read_bytes(), 0
    while i < len(data):
        n = struct.unpack("<Q", data[i : i + 8])[0]
        yield event_pb2.Event.FromString(data[i + 12 : i + 12 + n])
        i += 12 + n + 4


# ----------------------------------------------------------------------------- NaN abort
# lr = weight decay = 1e38 (finite, so the config checks accept them): the first update is
# computed from a finite loss and gradient (so it is applied) and overflows the params to inf;
# every later loss is NaN, each update is skipped, and the 2nd consecutive skip aborts. (A huge
# lr alone does not work: RMSNorm makes the model scale-invariant, the huge params saturate to a
# uniform policy with a finite loss; the decoupled weight decay term lr * wd * param overflows.)
NAN_FLAGS = [
    "--config.rl.lr=1e38",
    "--config.rl.weight_decay=1e38",
    "--config.rl.max_consecutive_skips=2",
    "--config.sft.steps=0",
]


def check_nan_abort(r, workdir):
    assert r.returncode == 1, (r.stdout[-1000:], r.stderr[-2000:])
    assert "2 consecutive steps had a NaN/inf loss or gradient (step 2)" in r.stderr, r.stderr[-2000:]
    recs = read_metrics(workdir)
    assert recs[0]["actor/skipped"] == 0.0 and recs[0]["counters/nonfinite_skips"] == 0
    # step 2 is skipped and logged; step 3 (the second skip) aborts before its metrics line
    assert [x["step"] for x in recs] == [1, 2]
    assert recs[1]["actor/skipped"] == 1.0 and recs[1]["counters/nonfinite_skips"] == 1


def test_consecutive_nonfinite_steps_abort(env, run_flags, tmp_path):
    workdir = tmp_path / "nan"
    r = run_train(env, workdir, *run_flags, *NAN_FLAGS, "--config.ckpt.every=1000", timeout=600)
    check_nan_abort(r, workdir)
    assert "Traceback" not in r.stderr
    line = last_line(r.stderr)
    assert line.startswith("error: 2 consecutive steps") and "rl.lr" in line, line


@pytest.mark.slow
def test_nonfinite_abort_with_checkpoint_in_flight_is_still_one_line(env, run_flags, tmp_path):
    """ckpt.every=2: the step-2 checkpoint is being written asynchronously when step 3 aborts.
    The error must still be the last line (the trainer should finish or cancel the pending
    save before exiting); without that, orbax's writer threads print tracebacks after it."""
    workdir = tmp_path / "nan_ckpt"
    r = run_train(env, workdir, *run_flags, *NAN_FLAGS, timeout=600)
    check_nan_abort(r, workdir)
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    assert last_line(r.stderr).startswith("error: 2 consecutive steps"), r.stderr[-2000:]


def test_trainer_runs_on_a_two_device_mesh(env, run_flags, tmp_path):
    """One process, 2 CPU devices: mesh data=2, the state and batches sharded over it."""
    e = dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    workdir = tmp_path / "two_devices"
    r = run_train(e, workdir, *run_flags, "--config.rl.steps=2", "--config.sft.steps=0", timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    recs = read_metrics(workdir)
    assert [x["step"] for x in recs] == [1, 2]
    assert all(x["actor/skipped"] == 0.0 and np.isfinite(x["actor/loss"]) for x in recs)


# ----------------------------------------------------------------------------- multi-host
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_workers(cmds, env, timeout=300):
    procs = [
        subprocess.Popen(
            c, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
        )
        for c in cmds
    ]
    outs = []
    try:
        deadline = time.time() + timeout
        for p in procs:
            out, _ = p.communicate(timeout=max(1, deadline - time.time()))
            outs.append(out)
    finally:  # one hung worker (e.g. its peer died) must not outlive the test
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=30)
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    return outs


def test_two_process_train_step_matches_single_process(env, tmp_path):
    """2 CPU processes x 2 devices on 127.0.0.1 (gloo collectives), batch sharded over 'data':
    two train steps give the single-process, single-device params and metrics."""
    worker = os.path.join(REPO, "tests", "multihost_worker.py")
    e = dict(env)
    e.pop("JAX_COMPILATION_CACHE_DIR")
    port = _free_port()
    _run_workers(
        [
            [
                sys.executable,
                worker,
                f"--out={tmp_path / 'multi'}",
                f"--coordinator=127.0.0.1:{port}",
                "--num_processes=2",
                f"--process_id={i}",
                "--local_devices=2",
            ]
            for i in range(2)
        ],
        e,
    )
    _run_workers([[sys.executable, worker, f"--out={tmp_path / 'single'}"]], e)
    single = np.load(tmp_path / "single" / "result_0.npz")
    multi = [np.load(tmp_path / "multi" / f"result_{i}.npz") for i in range(2)]
    assert int(single["meta:devices"]) == 1 and all(int(m["meta:devices"]) == 4 for m in multi)
    assert multi[0]["meta:local_rows"].tolist() == [0, 1, 2, 3] and multi[1]["meta:local_rows"].tolist() == [4, 5, 6, 7]
    assert int(single["meta:step"]) == 2 and all(int(m["meta:step"]) == 2 for m in multi)
    assert float(single["meta:max_update"]) > 1e-3  # the two steps moved the params
    for key in single.files:
        if key.startswith("meta:"):
            continue
        for m in multi:  # different reduction order across devices: float32 rounding only
            np.testing.assert_allclose(m[key], single[key], rtol=1e-4, atol=2e-5, err_msg=key)
        np.testing.assert_array_equal(multi[0][key], multi[1][key], err_msg=key)  # replicated


def test_two_process_trainer_matches_one_process_on_two_devices(env, run_flags, tmp_path):
    """The whole trainer (SFT, rollouts, CLIPO reward, updates, eval, checkpoints) as 2 CPU
    processes x 1 device on 127.0.0.1 (gloo) against 1 process x 2 devices: the same mesh shape,
    so the same metrics; process 0 alone writes the run files."""
    flags = [
        "--config=configs/demo.py:size=tiny,clipo",
        *(f for f in run_flags if not f.startswith("--config=")),
        "--config.rl.steps=2",
        "--config.ckpt.every=1",
        "--config.mesh.data=2",
    ]
    e = dict(env)
    e.pop("JAX_COMPILATION_CACHE_DIR")  # gloo programs are not in the single-process cache
    multi, single = tmp_path / "multi", tmp_path / "single"
    port = _free_port()
    _run_workers(
        [
            train_cmd(
                multi, *flags, f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"
            )
            for i in range(2)
        ],
        dict(e, JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo", XLA_FLAGS="--xla_force_host_platform_device_count=1"),
        timeout=900,
    )
    r = run_train(dict(e, XLA_FLAGS="--xla_force_host_platform_device_count=2"), single, *flags, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    got, want = read_metrics(multi), read_metrics(single)
    assert [x["step"] for x in got] == [x["step"] for x in want] == [1, 2]  # one writer, no duplicate lines
    for g, w in zip(got, want):
        g, w = comparable(g), comparable(w)
        assert g.keys() == w.keys()
        for k in w:  # different collectives (gloo vs in-process): float32 rounding only
            np.testing.assert_allclose(g[k], w[k], rtol=1e-3, atol=1e-5, err_msg=k)
    assert "contrastive/reward_mean" in want[0]  # the CLIPO head ran, replicated over processes
    with open(multi / "eval_after.json") as f, open(single / "eval_after.json") as g:
        assert json.load(f) == json.load(g)
    assert sorted(os.listdir(multi / "checkpoints")) == sorted(os.listdir(single / "checkpoints"))
