"""Run by test_sharding.py in a subprocess with 8 simulated CPU devices."""

import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
import jax
import numpy as np

jax.config.update("jax_default_matmul_precision", "highest")
from clipo_jax import parallel, sampling
from clipo_jax.models import transformer
from clipo_jax.models.config import PRESETS

assert jax.device_count() == 8, jax.devices()
mesh = parallel.make_mesh(data=2, fsdp=2, tensor=2)
for name in sys.argv[1:]:
    cfg = PRESETS[name]
    params = transformer.init_params(cfg, jax.random.key(0), std=0.3)
    sharded = parallel.shard_tree(params, mesh, transformer.param_logical_axes(cfg))
    # at least one parameter must really be split over the tensor axis
    wq = sharded["layers"]["wq"]
    assert len({str(s.index) for s in wq.addressable_shards}) > 1, wq.sharding
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, (8, 12)).astype(np.int32)
    valid = np.ones((8, 12), bool)
    valid[1, :5] = False
    single, _ = jax.jit(lambda p, t, v: transformer.forward_logits(p, cfg, t, v))(params, tokens, valid)
    with parallel.use_mesh(mesh):
        bs = parallel.batch_sharding(mesh, 2, 8)
        multi, _ = jax.jit(lambda p, t, v: transformer.forward_logits(p, cfg, t, v))(
            sharded, jax.device_put(tokens, bs), jax.device_put(valid, bs)
        )
    diff = float(np.abs(np.asarray(single) - np.asarray(multi))[valid].max())
    assert diff < 1e-4, (name, diff)
    prompts = [[5, 9, 17, 3], [7, 1], [100, 101, 102], [4, 4, 4, 4, 4, 4]]
    scfg = sampling.SamplingConfig(max_new_tokens=8, temperature=0.0, n_samples=2)
    a = sampling.Sampler(cfg)(params, prompts, jax.random.key(1), scfg)
    b = sampling.Sampler(cfg, mesh)(sharded, prompts, jax.random.key(1), scfg)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-4)
    np.testing.assert_allclose(a.pooled_hidden, b.pooled_hidden, atol=1e-4)
    # a replicated compute-dtype copy of the weights (no all-gathers in the decode loop): same samples
    c = sampling.Sampler(cfg, mesh, replicate_weights=True)(sharded, prompts, jax.random.key(1), scfg)
    np.testing.assert_array_equal(a.tokens, c.tokens)
    np.testing.assert_allclose(a.logprobs, c.logprobs, atol=1e-4)
    # length-sorted prefill groups (4 rows each: one row per batch device) on the mesh
    prompts8 = prompts + [[3] * 14, [8, 2], [6] * 9, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17]]
    grouped = sampling.Sampler(cfg, mesh, prefill_group_rows=4)
    assert len(grouped.row_groups([len(p) for p in prompts8], 8)) == 2
    a = sampling.Sampler(cfg, prefill_group_rows=0)(params, prompts8, jax.random.key(2), scfg)
    b = grouped(sharded, prompts8, jax.random.key(2), scfg)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-4)
    np.testing.assert_allclose(a.pooled_hidden, b.pooled_hidden, atol=1e-4)
    print(f"{name}: forward max diff {diff:.2e}; sampler tokens identical (also with prefill groups)")
print("SHARDING OK")
