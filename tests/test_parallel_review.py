"""Review of the sharding layer (clipo_jax/parallel.py): flag and mesh validation, and a train
step on meshes whose axes do not divide the model's dimensions, against the 1-device result."""

import os
import subprocess
import sys
import textwrap

import jax
import pytest

from clipo_jax import parallel


@pytest.mark.parametrize(
    "coordinator, num_processes, process_id, match",
    [
        (None, 2, 1, "needs a coordinator_address"),  # process 1 would run alone as process 0 of 1
        (None, 2, 0, "needs a coordinator_address"),
        ("127.0.0.1:1234", None, 1, "needs num_processes"),
        ("127.0.0.1:1234", None, None, "needs num_processes"),
        (None, None, 1, "process_id=1"),
        (None, 1, 1, "process_id=1"),
        ("127.0.0.1:1234", 2, None, r"needs a process_id in \[0, 2\)"),
        ("127.0.0.1:1234", 2, 2, r"needs a process_id in \[0, 2\)"),
        (None, 0, None, "num_processes=0"),
    ],
)
def test_partial_multiprocess_flags_are_an_error(coordinator, num_processes, process_id, match):
    with pytest.raises(parallel.ParallelError, match=match):
        parallel.initialize_distributed(coordinator, num_processes, process_id)
    assert jax.process_count() == 1


@pytest.mark.parametrize("args", [(None, None, None), (None, 1, 0), (None, 1, None), ("", None, None)])
def test_single_process_flags_stay_a_no_op(args):
    parallel.initialize_distributed(*args)
    assert jax.process_count() == 1


@pytest.mark.parametrize("shape, name", [((-1, 0, 1), "fsdp=0"), ((1, 1, 0), "tensor=0"), ((-2, 1, 1), "data=-2")])
def test_a_zero_or_negative_mesh_axis_is_a_one_line_error(shape, name):
    with pytest.raises(parallel.ParallelError, match=name):
        parallel.make_mesh(*shape, devices=jax.devices()[:1])


_TRAIN_STEP_CHECK = textwrap.dedent(
    """
    import functools, os
    import jax, numpy as np
    jax.config.update("jax_default_matmul_precision", "highest")
    from clipo_jax import parallel, trainer
    from clipo_jax.models.config import ModelConfig
    from clipo_jax.models.transformer import init_params, param_logical_axes
    from clipo_jax.rl.step import RLBatch, StepConfig, make_optimizer, response_logprobs, train_step

    assert jax.device_count() == 8
    # 3 heads, 1 KV head, d_ff 36, vocab 50, 6 rows: no mesh axis of 4 or 8 divides them all
    cfg = ModelConfig(vocab_size=50, d_model=24, n_layers=2, n_heads=3, n_kv_heads=1, head_dim=8, d_ff=36)
    B, TP, N = 6, 5, 6
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, cfg.vocab_size, (B, TP + N)).astype(np.int32)
    valid = np.zeros((B, TP + N), bool)
    resp = np.zeros((B, N), bool)
    for i, (p, r) in enumerate(zip(rng.integers(1, TP + 1, B), rng.integers(1, N + 1, B))):
        valid[i, TP - p : TP + r] = True
        resp[i, :r] = True
    tokens = np.where(valid, tokens, 0)
    lp = lambda: rng.normal(-np.log(cfg.vocab_size), 0.3, (B, N)).astype(np.float32)
    batch = RLBatch(tokens, valid, resp, rng.normal(size=B).astype(np.float32), lp(), lp(), lp())
    host_params = jax.device_get(init_params(cfg, jax.random.key(0), std=0.2))
    opt = make_optimizer(1e-2, total_steps=10, weight_decay=0.01)
    scfg = StepConfig(micro_batches=2, kl_coef=0.05, entropy_coef=0.01)

    def run(shape):
        mesh = parallel.make_mesh(*shape, devices=jax.devices()[: int(np.prod(shape))])
        state = trainer.new_train_state(parallel.shard_tree(host_params, mesh, param_logical_axes(cfg)), opt, mesh)
        sh = jax.tree.map(lambda x: x.sharding, state)
        step = jax.jit(
            functools.partial(train_step, cfg=cfg, scfg=scfg, optimizer=opt),
            in_shardings=(sh, None), out_shardings=(sh, None), donate_argnums=0,
        )
        b = parallel.put_global(batch, jax.tree.map(lambda x: parallel.batch_sharding(mesh, x.ndim, B), batch))
        logp = parallel.to_host(jax.jit(lambda p, t, v: response_logprobs(p, cfg, t, v, N))(state.params, b[0], b[1]))
        metrics = []
        for _ in range(2):
            state, m = step(state, b)
            metrics.append(parallel.scalars_to_host(m))
        return parallel.to_host(state.params), metrics, logp

    ref = run((1, 1, 1))
    for shape in [(2, 1, 4), (1, 8, 1)]:
        params, metrics, logp = run(shape)
        for a, r in zip(jax.tree.leaves(params), jax.tree.leaves(ref[0])):
            np.testing.assert_allclose(a, r, atol=1e-4)
        for m, r in zip(metrics, ref[1]):
            assert m.keys() == r.keys()
            for k in m:
                np.testing.assert_allclose(m[k], r[k], rtol=1e-4, atol=1e-5, err_msg=f"{shape} {k}")
        np.testing.assert_allclose(logp, ref[2], atol=1e-5)
    print("TRAIN STEP OK")
    """
)


def test_train_step_on_meshes_that_do_not_divide_the_model_matches_one_device():
    """tensor=4 over 3 heads / d_ff 36 / vocab 50, fsdp=8 over d_model 24, 6 rows over 8 data
    devices: the non-dividing axes stay replicated and the step (params after two Adam steps,
    every metric, the log-probs) equals the 1-device one."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(
        os.environ,
        PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""),
        XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8",
    )
    r = subprocess.run(
        [sys.executable, "-c", _TRAIN_STEP_CHECK], capture_output=True, text=True, env=env, timeout=600, cwd=root
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "TRAIN STEP OK" in r.stdout


_CKPT_SCRIPT = textwrap.dedent(
    """
    import sys
    import jax, jax.numpy as jnp, numpy as np
    from clipo_jax import checkpoints, parallel, trainer
    from clipo_jax.models.config import ModelConfig
    from clipo_jax.models.transformer import init_params, param_logical_axes
    from clipo_jax.rl.step import make_optimizer

    cfg = ModelConfig(vocab_size=50, d_model=24, n_layers=2, n_heads=3, n_kv_heads=1, head_dim=8, d_ff=36)
    host = jax.device_get(init_params(cfg, jax.random.key(0), std=0.2))
    workdir, mode = sys.argv[1], sys.argv[2]
    if mode == "save":  # a run on a (2, 2, 2) mesh of 8 devices
        mesh = parallel.make_mesh(2, 2, 2)
        params = parallel.shard_tree(host, mesh, param_logical_axes(cfg))
        state = trainer.new_train_state(params, make_optimizer(1e-2, total_steps=10), mesh)
        ck = checkpoints.RunCheckpoints(workdir, 2)
        meta = {"data_position": 0, "consecutive_skips": 0, "counters": {}}
        ck.save(0, state, params, {"w": jnp.zeros(3)}, meta)
        ck.close()
    else:  # evaluated on one device
        out = trainer.restore_params(workdir, host)
        diff = max(float(np.abs(np.asarray(a) - b).max()) for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(host)))
        print("max diff", diff)
    """
)


def test_restore_params_reads_a_checkpoint_saved_on_another_device_count(tmp_path):
    """experiments/evaluate.py --run on 1 device of a run trained on 8 failed orbax's topology
    check: the saved shardings name the training run's devices."""
    script = tmp_path / "ckpt.py"
    script.write_text(_CKPT_SCRIPT)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def run(mode, devices):
        env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
        env["PYTHONPATH"] = repo
        return subprocess.run(
            [sys.executable, str(script), str(tmp_path / "run"), mode],
            env=env,
            cwd=repo,
            capture_output=True,
            text=True,
        )

    saved = run("save", 8)
    assert saved.returncode == 0, saved.stderr[-2000:]
    evaluated = run("eval", 1)
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    assert "max diff 0.0" in evaluated.stdout, evaluated.stdout
