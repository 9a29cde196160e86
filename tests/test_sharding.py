"""Forward and sampler agree on 1 device and on a (data=2, fsdp=2, tensor=2) mesh of 8 CPU devices."""

import os
import subprocess
import sys

import pytest

from clipo_jax import parallel


def test_eight_device_mesh_matches_single_device():
    env = dict(os.environ, PYTHONPATH=os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", ""))
    script = os.path.join(os.path.dirname(__file__), "sharding_check.py")
    r = subprocess.run(
        [sys.executable, script, "tiny_llama", "tiny_gemma3"], capture_output=True, text=True, env=env, timeout=900
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "SHARDING OK" in r.stdout


def test_logical_rules():
    import jax

    mesh = parallel.make_mesh(data=1, fsdp=1, tensor=1, devices=jax.devices()[:1])
    assert parallel.logical_to_spec(("embed", "mlp"), mesh, (64, 128)) == jax.sharding.PartitionSpec("fsdp", "tensor")
    assert parallel.logical_to_spec(("batch", None), mesh, (8, 3)) == jax.sharding.PartitionSpec(("data", "fsdp"), None)


def test_bad_mesh_is_one_line_error():
    import jax

    with pytest.raises(parallel.ParallelError, match="needs 8 devices, have 1"):
        parallel.make_mesh(data=2, fsdp=2, tensor=2, devices=jax.devices()[:1])


def test_scalars_to_host_fetches_a_metric_tree_as_floats():
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(0)
    values = rng.normal(size=7).astype(np.float32)
    tree = [
        {"a/loss": jnp.float32(values[0]), "a/count": jnp.int32(3), "b": jnp.asarray(values[1:2])},
        {"a/loss": jnp.float32(values[2]), "a/count": jnp.int32(-5), "b": jnp.asarray(values[3:4])},
    ]
    host = parallel.scalars_to_host(tree)
    assert host == [
        {"a/loss": float(values[0]), "a/count": 3.0, "b": float(values[1])},
        {"a/loss": float(values[2]), "a/count": -5.0, "b": float(values[3])},
    ]
    assert all(type(v) is float for d in host for v in d.values())
    assert parallel.scalars_to_host({}) == {}
    with pytest.raises(TypeError):  # a non-scalar leaf is a caller's bug, not silently truncated
        parallel.scalars_to_host({"v": jnp.zeros(3)})
