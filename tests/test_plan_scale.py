"""The memory/compute plan (experiments/plan_scale.py) and the chunked log-prob pass it sizes.

The plan's numbers are checked against things that could disagree with it: XLA's own FLOP count
on programs without loops, the state's bytes counted with numpy, a real run's measured peak
memory, and the chunk sizes it picks against the cap it was given.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clipo_jax import parallel, trainer
from clipo_jax.models import transformer
from clipo_jax.models.config import ModelConfig
from clipo_jax.rl import update
from clipo_jax.rl.step import response_logprobs
from experiments import plan_scale

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = ModelConfig(vocab_size=512, d_model=64, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=128)


def _demo_config(**rl):
    from configs.demo import get_config

    config = get_config()
    config.rl.update(rl)
    return config


def test_chunked_logprobs_equal_one_pass():
    params = transformer.init_params(CFG, jax.random.key(0))
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, CFG.vocab_size, (8, 24)).astype(np.int32)
    valid = np.ones((8, 24), bool)
    valid[3, :7] = False  # left padding on one row
    fn = jax.jit(lambda p, t, v: response_logprobs(p, CFG, t, v, 10))
    put = lambda tree: tree
    one = update.sequence_logprobs(fn, {"ref": params}, tokens, valid, put, np.asarray)
    four = update.sequence_logprobs(fn, {"ref": params}, tokens, valid, put, np.asarray, chunks=4)
    assert one["ref"].shape == (8, 10)
    np.testing.assert_allclose(four["ref"], one["ref"], atol=1e-6)
    with pytest.raises(ValueError, match="do not split into 3"):
        update.sequence_logprobs(fn, {"ref": params}, tokens, valid, put, np.asarray, chunks=3)


def test_trainer_rejects_logprob_chunks_that_do_not_divide_the_step():
    config = _demo_config(logprob_chunks=7)  # 32 prompts x 8 samples = 256 rows
    with pytest.raises(trainer.TrainingError, match="logprob_chunks=7 does not divide the step's 256 rows"):
        trainer.validate_config(config)
    trainer.validate_config(_demo_config(logprob_chunks=8))


def _xla_flops(compiled) -> float:
    cost = compiled.cost_analysis()
    return float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])


def test_model_flops_formula_matches_xla_on_loop_free_programs():
    """One layer and one LM-head chunk: XLA's count has no loop to undercount, so the plan's
    matmul formula must agree with it up to the elementwise work it leaves out."""
    B, T = 8, 64
    params = transformer.init_params(CFG, jax.random.key(0))
    tokens, valid = jnp.zeros((B, T), jnp.int32), jnp.ones((B, T), bool)
    fwd = jax.jit(lambda p: response_logprobs(p, CFG, tokens, valid, 16)).lower(params).compile()
    want = B * plan_scale.model_flops_per_sequence(CFG, T, lm_head_tokens=T, passes=1, lm_head_passes=1)
    assert _xla_flops(fwd) == pytest.approx(want, rel=0.1)
    # forward + backward (3 passes), the checkpointed LM-head chunk recomputed (4 passes)
    loss = lambda p: jnp.sum(response_logprobs(p, CFG, tokens, valid, 16))
    grad = jax.jit(jax.grad(loss)).lower(params).compile()
    want = B * plan_scale.model_flops_per_sequence(CFG, T, lm_head_tokens=T, passes=3, lm_head_passes=4)
    assert _xla_flops(grad) == pytest.approx(want, rel=0.1)


def _planner(config, cfg=None):
    cfg = cfg or plan_scale.model_config(config, None)
    return plan_scale.Planner(config, cfg, parallel.make_mesh(1, 1, 1)), cfg


def test_resident_bytes_count_params_and_adam_moments():
    config = _demo_config()
    planner, cfg = _planner(config)
    n = sum(
        int(np.prod(s)) for s in jax.tree.leaves(transformer.param_shapes(cfg), is_leaf=lambda x: isinstance(x, tuple))
    )
    # float32 params + AdamW mu and nu (+ a few scalar counters)
    assert 12 * n <= planner.resident["train state"] <= 12 * n + 64
    assert planner.resident["reference params"] == (4 * n if config.rl.kl_coef else 0)


def test_fit_chunks_keeps_every_program_under_the_cap():
    config = _demo_config()
    planner, cfg = _planner(config)
    logp = plan_scale.compile_program(planner, "logp")["peak_bytes"]
    decode = plan_scale.compile_program(planner, "decode")["peak_bytes"]
    cap = 0.6 * min(logp, decode)
    chosen = plan_scale.fit_chunks(config, cfg, parallel.make_mesh(1, 1, 1), cap)
    assert chosen["logprob_chunks"] > 1 and chosen["rollout_chunk_prompts"] < config.rl.prompts_per_step
    again, _ = _planner(config, cfg)  # config now carries the chosen sizes
    for program in ("logp", "decode"):
        assert plan_scale.compile_program(again, program)["peak_bytes"] <= cap
    with pytest.raises(plan_scale.PlanError, match="use more chips"):
        plan_scale.fit_chunks(_demo_config(), cfg, parallel.make_mesh(1, 1, 1), 1000.0)


def _plan_cli(tmp_path, *args, name="plan.json"):
    out = tmp_path / name
    cmd = [sys.executable, "-m", "experiments.plan_scale", "--config=configs/demo.py", f"--json_out={out}", *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(out.read_text())
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == summary
    return summary, proc.stdout


def test_plan_cli_on_a_simulated_mesh_splits_the_state(tmp_path):
    args = ["--programs=train", "--config.rl.max_new_tokens=16", "--config.rl.prompts_per_step=8"]
    one, _ = _plan_cli(tmp_path, "--devices=1", "--mesh=data=1", *args, name="one.json")
    four, text = _plan_cli(tmp_path, "--devices=4", "--mesh=data=1,fsdp=4", *args, name="four.json")
    assert four["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
    ratio = one["resident_bytes"]["train state"] / four["resident_bytes"]["train state"]
    assert 3.5 < ratio <= 4.0  # norms and counters stay replicated
    (train,) = four["programs"]
    assert train["program"] == "train" and train["alias_bytes"] > 0  # the donated state
    assert train["flops"] == pytest.approx(one["programs"][0]["flops"] / 4)
    assert "projected H100 seconds per RL step" in text


@pytest.mark.slow
def test_plan_matches_the_measured_peak_memory(tmp_path):
    """--measure runs each program in its own process: planned and measured peaks agree."""
    summary, text = _plan_cli(
        tmp_path,
        "--devices=1",
        "--mesh=data=1",
        "--measure",
        "--programs=train,decode",
        "--config.rl.prompts_per_step=16",
    )
    for rec in summary["programs"]:
        measured, planned = rec["measured_peak_bytes"], rec["total_bytes"]
        assert measured and planned > 0, rec
        assert 0.5 < measured / planned < 2.0, (rec["program"], measured, planned)
    assert "measured GB" in text


def test_projection_counts_decode_all_gathers_unless_the_rollout_weights_are_replicated(tmp_path):
    args = ["--devices=2", "--mesh=data=1,fsdp=2", "--programs=prefill,decode", "--config.rl.max_new_tokens=16"]
    sharded, _ = _plan_cli(tmp_path, *args, name="sharded.json")
    replicated, text = _plan_cli(
        tmp_path, *args, "--config.rl.rollout_replicate_weights=True", "--link_gbs=100", name="replicated.json"
    )
    s = sharded["step"]
    # sharded float32 weights: each device receives the other half of them in every decode step
    state = sharded["resident_bytes"]["train state"]  # params + two AdamW moments, half on each device
    gathered = state / 3  # the other device's half of the float32 params (+ a few scalar bytes)
    want = s["rollout_calls"] * s["new_tokens"] * gathered / 450e9
    assert sharded["projection_s"]["interconnect_s"]["decode"] == pytest.approx(want, rel=0.01)
    # a replicated compute-dtype copy: one gather per rollout call, none per decode step
    assert replicated["projection_s"]["interconnect_s"]["decode"] == 0
    assert replicated["projection_s"]["interconnect_s"]["prefill"] > 0
    decode = {r["program"]: r for r in replicated["programs"]}["decode"]
    assert decode["argument_bytes"] > {r["program"]: r for r in sharded["programs"]}["decode"]["argument_bytes"]
    assert "rollout weights replicated" in text and "all-gathers at 100 GB/s" in text


def test_reference_comparison_on_a_track_config(tmp_path):
    """A paper-track config is compared with the authors' published setup (8 GPUs, at most 5,120
    tokens per GPU in a train micro-batch for Track I)."""
    out = tmp_path / "track.json"
    cmd = [
        sys.executable,
        "-m",
        "experiments.plan_scale",
        "--config=configs/clipo_gsm8k_qwen25_3b.py",
        "--shape=tiny_qwen2",
        "--devices=2",
        "--mesh=data=1,fsdp=2",
        "--programs=train",
        "--config.rl.max_new_tokens=64",
        "--config.rl.prompts_per_step=8",
        "--config.rl.micro_batches=4",
        f"--json_out={out}",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ref = json.loads(out.read_text())["reference_comparison"]
    assert ref["chips"] == {"ours": 2, "reference": 8, "ratio": 0.25}
    # 8 prompts x 16 samples / 2 mini-batches / 4 micro-batches / 2 devices = 8 rows of 512 + 64 tokens
    assert ref["train_tokens_per_device_per_micro_batch"]["ours"] == 8 * 576
    assert ref["train_tokens_per_device_per_micro_batch"]["ratio"] == pytest.approx(8 * 576 / 5120)
    # a quarter of the chips and the full attention grid instead of its causal half: 4x to 8x slower
    assert 4.0 < ref["train_and_logp_s"]["ratio"] < 8.0
    assert "reference setup (the authors' verl script): 8 GPUs" in proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize(
    "track, shape, mesh",
    [
        ("clipo_gsm8k_qwen25_3b", "qwen25_3b", "data=1,fsdp=8,tensor=1"),
        ("clipo_math_qwen25_7b", "qwen25_7b", "data=1,fsdp=2,tensor=4"),
    ],
)
def test_paper_track_sizes_fit_an_h100_on_their_mesh(tmp_path, track, shape, mesh):
    """The micro-batch, log-prob chunk and rollout chunk sizes in the track configs keep every
    program of a step within 90% of 80 GB per chip on the 8-chip mesh their docstring names."""
    out = tmp_path / "plan.json"
    cmd = [sys.executable, "-m", "experiments.plan_scale", f"--config=configs/{track}.py", f"--shape={shape}"]
    cmd += ["--devices=8", f"--mesh={mesh}", f"--json_out={out}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(out.read_text())
    assert {r["program"] for r in summary["programs"]} == {"train", "logp", "prefill", "decode", "clipo"}
    for rec in summary["programs"]:
        assert 0 < rec["peak_bytes"] <= 0.9 * 80e9, (rec["program"], rec["peak_bytes"] / 1e9)
    assert summary["step"]["rollout_calls"] > 1 and summary["step"]["logp_chunks"] > 1


def test_logprob_passes_count_the_old_policy_pass_of_the_kl_in_the_reward():
    # the trainer runs an old-policy pass for the KL in the reward even with one mini-batch and epoch
    base = dict(mini_batches=1, epochs=1, kl_coef=0.1)
    assert _planner(_demo_config(**base, kl_in_reward=False))[0].sizes["logp_passes"] == 1
    assert _planner(_demo_config(**base, kl_in_reward=True))[0].sizes["logp_passes"] == 2
    assert _planner(_demo_config(mini_batches=1, epochs=1, kl_coef=0.0, kl_in_reward=True))[0].sizes["logp_passes"] == 0


GATHER_ON_MESHES = r"""
import json, os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
import jax
from clipo_jax import parallel
from clipo_jax.models import transformer
from configs.demo import get_config
from experiments import plan_scale
config = get_config()
cfg = plan_scale.model_config(config, None)
out = {}
for f, t in ((1, 4), (2, 2), (1, 2), (4, 1)):
    p = plan_scale.Planner(config, cfg, parallel.make_mesh(1, f, t, jax.devices()[: f * t]))
    out[f"{f},{t}"] = [p.gathered_bytes(), plan_scale._device_bytes(p.params)]
out["full"] = sum(4 * x.size for x in jax.tree.leaves(jax.eval_shape(lambda: transformer.init_params(cfg, jax.random.key(0)))))
print("RESULT " + json.dumps(out))
"""


def test_fsdp_all_gather_receives_the_fsdp_split_only():
    """An FSDP all-gather gives a device the other FSDP shards of its tensor slice, never the other
    tensor slices: with fsdp=1 nothing is gathered, and on fsdp=2 x tensor=2 a device ends up with
    what a device of the tensor=2 mesh without FSDP holds."""
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    r = subprocess.run(
        [sys.executable, "-c", GATHER_ON_MESHES], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, r.stderr[-3000:]
    out = json.loads(lines[0][len("RESULT ") :])
    assert out["1,4"][0] == 0 and out["1,2"][0] == 0
    gathered, shard = out["2,2"]
    assert gathered + shard == out["1,2"][1]  # the tensor=2 slice, whole
    gathered, shard = out["4,1"]
    assert gathered + shard == out["full"]  # no tensor axis: every float32 parameter


@pytest.mark.parametrize("preset", ["tiny_llama", "tiny_qwen2", "tiny_gemma3", "qwen25_0_5b", "qwen25_7b"])
def test_num_params_counts_every_weight_the_model_has(preset):
    from clipo_jax.models import PRESETS

    cfg = PRESETS[preset]
    shapes = jax.eval_shape(lambda: transformer.init_params(cfg, jax.random.key(0)))
    assert cfg.num_params() == sum(x.size for x in jax.tree.leaves(shapes))
    if preset == "qwen25_7b":  # the published count (q/k/v biases included)
        assert cfg.num_params() == 7_615_616_512
