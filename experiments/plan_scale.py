r"""Memory and compute plan of one RL step at paper scale, from XLA, without weights or accelerators.

  python -m experiments.plan_scale --config=configs/clipo_gsm8k_qwen25_3b.py --shape=qwen25_3b \
      --devices=8 --mesh=data=1,fsdp=8,tensor=1
  python -m experiments.plan_scale --config=configs/clipo_math_qwen25_7b.py --shape=qwen25_7b \
      --devices=16 --mesh=data=1,fsdp=16,tensor=1 --json_out=plan.json
  python -m experiments.plan_scale --config=configs/demo.py --devices=1 --mesh=data=1 --measure

Every program of one RL step is lowered and compiled with abstract inputs (jax.ShapeDtypeStruct
with the trainer's shardings) on a mesh of --devices simulated host devices, or on the backend's
own devices with --real_devices. Nothing is allocated, so a 7B plan runs on a laptop:
  train     rl.step.train_step on one mini-batch (micro-batch scan, remat as configured), state donated
  logp      the reference (and, with several mini-batches or epochs, the old-policy) log-prob pass,
            rl.logprob_chunks passes of that many rows each
  prefill   sampling.prefill of one prefill group (Sampler's prefill_group_rows, rounded to the
            batch devices) at the rollout prompt width
  decode    sampling.decode of one rollout call (rl.rollout_chunk_prompts prompts x group_size
            rows, or the whole step), cache grown in phases as the Sampler does
  clipo     the CLIPO head step on the step's pooled states (when clipo.enabled)

Per device and program it prints XLA's memory_analysis (argument, output, temporary bytes; aliased
bytes are the donated state) and the peak a device holds while the program runs: the program's
own buffers plus the step's resident arrays it does not take as arguments (train state,
reference parameters, CLIPO head), against 80 GB (H100) and 95 GB (TPU v5p).

FLOPs per program are counted two ways:
  model   the matmul FLOPs of the transformer for the program's tokens: 2 x weights per token
          (LM head only where logits are computed), attention QK^T and PV over the grid the code
          computes (the full T x T square in training, the grown cache in decode), x3 for a
          backward pass, +1 forward for remat and the checkpointed LM-head chunks;
  xla     compiled.cost_analysis()['flops'] as XLA reports it. XLA counts a while-loop body once
          whatever its trip count (layer scan, micro-batch scan, decode loop, LM-head chunks), so
          at this scale it undercounts by orders of magnitude; printed for reference only.
The projection (--mfu, --hbm_fraction) turns the model FLOPs and the bytes each decode step must
read into an H100 step time: train and log-prob passes compute-bound at the stated MFU of 989
TFLOP/s (bf16 dense), prefill likewise, decode memory-bound at the stated fraction of 3.35 TB/s.
It is a projection from stated assumptions, not a measurement.

--measure also runs each program once on zero inputs, each in a fresh subprocess, and reports its
peak memory: the backend's peak_bytes_in_use on GPU/TPU; on CPU the growth of the process's peak
RSS over the program's call (all simulated devices together, so divide by --devices).
The last line is the JSON summary.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "config file (configs/*.py[:arg])", lock_config=False)
flags.DEFINE_string("shape", None, "model shape preset (clipo_jax.models.config.PRESETS); default: the config's model")
flags.DEFINE_integer("devices", 1, "simulated host devices (ignored with --real_devices)")
flags.DEFINE_bool("real_devices", False, "plan on the backend's own devices instead of simulated CPU devices")
flags.DEFINE_string("mesh", "data=-1", "mesh axes, e.g. data=1,fsdp=8,tensor=1 (one may be -1)")
flags.DEFINE_list("programs", ["train", "logp", "prefill", "decode", "clipo"], "programs to plan")
flags.DEFINE_bool(
    "unroll_layers", False, "plan the sampler's unrolled layer loop (the CPU default) instead of the scan"
)
flags.DEFINE_bool("measure", False, "run each program once on zero inputs (own subprocess) and report its peak memory")
flags.DEFINE_float("mfu", 0.4, "projection: assumed model-FLOPs utilisation of compute-bound programs")
flags.DEFINE_float("hbm_fraction", 0.7, "projection: assumed fraction of HBM bandwidth reached by decode steps")
flags.DEFINE_float("link_gbs", 450.0, "projection: interconnect GB/s per device and direction (H100 NVLink 4)")
flags.DEFINE_string("fit", None, "size rl.logprob_chunks and rl.rollout_chunk_prompts to fit this chip (e.g. H100)")
flags.DEFINE_float("usable", 0.9, "--fit: fraction of the chip's memory a program may use")
flags.DEFINE_string("json_out", None, "also write the JSON summary here")
flags.DEFINE_string("worker", None, "internal: run this one program and print its peak memory")

GB = 1e9
CHIPS = {"H100 80GB": 80e9, "TPU v5p 95GB": 95e9}
H100_BF16_FLOPS = 989e12  # dense, SXM
H100_HBM_BYTES_S = 3.35e12


class PlanError(ValueError):
    pass


# ---------------------------------------------------------------------------- shapes
def parse_mesh(text: str) -> dict[str, int]:
    sizes = {"data": 1, "fsdp": 1, "tensor": 1}
    for part in filter(None, text.split(",")):
        name, _, value = part.partition("=")
        if name not in sizes or not value.lstrip("-").isdigit():
            raise PlanError(f"--mesh={text!r}: expected comma-separated data=N,fsdp=N,tensor=N")
        sizes[name] = int(value)
    return sizes


def model_config(config, shape: str | None):
    """The ModelConfig the run would build, without reading weights."""
    from clipo_jax.models import PRESETS, loading

    m = config.model
    if shape:
        if shape not in PRESETS:
            raise PlanError(f"--shape={shape!r} is not one of {sorted(PRESETS)}")
        cfg = PRESETS[shape]
    elif m.source.startswith("init:"):
        from clipo_jax import trainer

        try:
            return trainer.init_model_config(config, _task_vocab(config))
        except trainer.TrainingError as e:
            raise PlanError(str(e)) from None
    else:
        path = loading.resolve_model_path(m.source) if m.source else ""
        if not path or not os.path.isfile(os.path.join(path, "config.json")):
            raise PlanError(
                f"config.model.source={m.source!r} is not an HF directory with config.json: pass --shape=<preset>"
            )
        with open(os.path.join(path, "config.json")) as f:
            cfg = loading.config_from_hf(json.load(f))
    return cfg.replace(dtype=m.dtype, attention_impl=m.get("attention_impl", "einsum"))


def _task_vocab(config) -> int:
    """The task tokenizer's vocabulary size (an init: model is built to it)."""
    import tempfile

    from clipo_jax import tasks

    with tempfile.TemporaryDirectory() as tmp:  # the synthetic task trains its tokenizer into a workdir
        return tasks.build_task(config.task, tmp).tokenizer.vocab_size


def step_sizes(config, sampler) -> dict[str, int]:
    """Rows and lengths of one RL step as the trainer and this Sampler would run them."""
    from clipo_jax import sampling

    rl = config.rl
    P, G = rl.prompts_per_step, rl.group_size
    Tp = sampler.length_bucket(rl.max_prompt_len)
    N = rl.max_new_tokens
    chunk = min(rl.get("rollout_chunk_prompts", 0) or P, P)
    rows = sampling.bucket(chunk, 1)
    while (rows * G) % sampler.min_batch_bucket:  # as Sampler._sample pads a call's prompts
        rows *= 2
    prefill_rows = len(sampler.row_groups([Tp] * chunk, rows)[0])
    logp_chunks = rl.get("logprob_chunks", 1) or 1
    return dict(
        prompts=P,
        group_size=G,
        prompt_width=Tp,
        new_tokens=N,
        seq=Tp + N,
        minibatch_rows=P * G // rl.mini_batches,
        mini_batches=rl.mini_batches,
        micro_batches=rl.micro_batches,
        rollout_calls=-(-P // chunk),
        rollout_prompts_per_call=rows,
        decode_rows=rows * G,
        prefill_rows=prefill_rows,
        prefill_calls_per_rollout=rows // prefill_rows,
        logp_rows=P * G // logp_chunks,
        logp_chunks=logp_chunks,
        logp_passes=(1 if rl.kl_coef else 0)
        + (1 if (rl.epochs > 1 or rl.mini_batches > 1 or (rl.kl_coef and rl.get("kl_in_reward", False))) else 0),
        steps_per_rl_step=rl.epochs * rl.mini_batches,
        epochs=rl.epochs,
    )


# ---------------------------------------------------------------------------- programs
def _abstract(tree, shardings):
    import jax

    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _device_bytes(tree) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs (the largest shard)."""
    import jax
    import numpy as np

    total = 0
    for x in jax.tree.leaves(tree):
        shard = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
        total += int(np.prod(shard, dtype=np.int64)) * np.dtype(x.dtype).itemsize
    return total


class Planner:
    """Abstract state of a run (sharded, nothing allocated) and the jitted programs of one step."""

    def __init__(self, config, cfg, mesh, unroll_layers: bool = False):
        import jax
        import jax.numpy as jnp
        from jax.sharding import NamedSharding
        from jax.sharding import PartitionSpec as P

        from clipo_jax import contrastive, parallel, sampling, trainer
        from clipo_jax.models import transformer
        from clipo_jax.rl.step import TrainState, make_optimizer

        self.config, self.cfg, self.mesh, self.unroll = config, cfg, mesh, unroll_layers
        rl = config.rl
        self.sizes = step_sizes(config, sampling.Sampler(cfg, mesh, unroll_layers=unroll_layers))
        self.replicated = NamedSharding(mesh, P())
        shapes = jax.eval_shape(lambda: transformer.init_params(cfg, jax.random.key(0)))
        p_sh = parallel.tree_shardings(mesh, transformer.param_logical_axes(cfg), shapes)
        self.params = _abstract(shapes, p_sh)
        self.optimizer = make_optimizer(
            rl.lr, total_steps=rl.steps, warmup_steps=rl.warmup_steps, schedule=rl.schedule,
            weight_decay=rl.weight_decay, grad_clip=rl.grad_clip,
        )  # fmt: skip
        opt_shapes = jax.eval_shape(self.optimizer.init, shapes)
        opt_sh = trainer.opt_state_shardings(self.optimizer, opt_shapes, p_sh, self.replicated)
        self.state = TrainState(
            self.params, _abstract(opt_shapes, opt_sh), jax.ShapeDtypeStruct((), jnp.int32, sharding=self.replicated)
        )
        self.step_cfg = trainer.step_config(rl)
        self.clipo_cfg = None
        self.head = None
        if config.clipo.enabled:
            self.clipo_cfg = contrastive.ContrastiveConfig(**trainer._clipo_static(config))
            head = jax.eval_shape(lambda: contrastive.init_head_state(jax.random.key(0), cfg.d_model, self.clipo_cfg))
            self.head = _abstract(head, jax.tree.map(lambda _: self.replicated, head))
        # the rollout reads a replicated compute-dtype copy (rl.rollout_replicate_weights) or the
        # FSDP-sharded training parameters themselves (all-gathered inside every decode step)
        self.replicate_rollout = bool(rl.get("rollout_replicate_weights", False))
        if self.replicate_rollout:
            cast = jax.eval_shape(lambda p: transformer.compute_dtype_weights(p, cfg), shapes)
            r_sh = parallel.tree_shardings(mesh, transformer.rollout_logical_axes(cfg), cast)
            self.rollout_params = _abstract(cast, r_sh)
        else:
            self.rollout_params = self.params
        self.resident = {
            "train state": _device_bytes(self.state),
            "reference params": _device_bytes(self.params) if rl.kl_coef else 0,
            "CLIPO head": _device_bytes(self.head) if self.head is not None else 0,
        }

    def _batch(self, shape, dtype):
        import jax

        from clipo_jax import parallel

        return jax.ShapeDtypeStruct(shape, dtype, sharding=parallel.batch_sharding(self.mesh, len(shape), shape[0]))

    def programs(self) -> dict[str, tuple]:
        """name -> a builder returning (jitted fn, abstract args, resident bytes among the args, model
        FLOPs, decode bytes per step), or None when the program does not apply."""
        return {
            "train": self._train,
            "logp": self._logp,
            "prefill": self._prefill,
            "decode": self._decode,
            "clipo": self._clipo,
        }

    def _train(self):
        import jax
        import jax.numpy as jnp

        from clipo_jax.rl.step import RLBatch, train_step

        s = self.sizes
        R, T, N = s["minibatch_rows"], s["seq"], s["new_tokens"]
        f32 = jnp.float32
        batch = RLBatch(
            tokens=self._batch((R, T), jnp.int32),
            valid=self._batch((R, T), jnp.bool_),
            response_mask=self._batch((R, N), jnp.bool_),
            advantages=self._batch((R,), f32),
            old_logp=self._batch((R, N), f32),
            ref_logp=self._batch((R, N), f32),
            sampler_logp=self._batch((R, N), f32),
        )
        cfg, scfg, opt = self.cfg, self.step_cfg, self.optimizer
        state_sh = jax.tree.map(lambda x: x.sharding, self.state)
        fn = jax.jit(
            lambda st, b: train_step(st, b, cfg=cfg, scfg=scfg, optimizer=opt),
            in_shardings=(state_sh, None),
            out_shardings=(state_sh, None),
            donate_argnums=0,
        )
        passes = 3 + (1 if scfg.remat else 0)  # forward, backward (2x), remat recompute
        flops = R * model_flops_per_sequence(self.cfg, T, lm_head_tokens=T, passes=passes, lm_head_passes=4)
        return fn, (self.state, batch), _device_bytes(self.state), flops, 0

    def _logp(self):
        import jax
        import jax.numpy as jnp

        from clipo_jax.rl.step import response_logprobs

        s = self.sizes
        R, T, N = s["logp_rows"], s["seq"], s["new_tokens"]
        cfg, temp = self.cfg, self.step_cfg.temperature
        fn = jax.jit(lambda p, t, v: response_logprobs(p, cfg, t, v, N, temp))
        args = (self.params, self._batch((R, T), jnp.int32), self._batch((R, T), jnp.bool_))
        flops = R * model_flops_per_sequence(cfg, T, lm_head_tokens=T, passes=1, lm_head_passes=1)
        return fn, args, _device_bytes(self.params), flops, 0

    def _prefill(self):
        import jax
        import jax.numpy as jnp

        from clipo_jax import sampling

        s = self.sizes
        R, Tp = s["prefill_rows"], s["prompt_width"]
        cfg, unroll = self.cfg, self.unroll
        fn = jax.jit(lambda p, t, m: sampling.prefill(p, t, m, cfg=cfg, unroll_layers=unroll))
        args = (self.rollout_params, self._batch((R, Tp), jnp.int32), self._batch((R, Tp), jnp.bool_))
        flops = R * model_flops_per_sequence(cfg, Tp, lm_head_tokens=0, passes=1, lm_head_passes=0)
        return fn, args, self._rollout_resident(), flops, 0

    def _rollout_resident(self) -> int:
        """Resident bytes among a rollout program's arguments: the training parameters, unless the
        rollout reads its own replicated copy (an argument that lives only during the rollout)."""
        return 0 if self.replicate_rollout else _device_bytes(self.params)

    def gathered_bytes(self) -> int:
        """Bytes of float32 parameters one device must receive for a layer's FSDP all-gather: the
        'embed' (fsdp) split is gathered, the tensor split stays (the rollout layout, in float32)."""
        return self._tensor_only_bytes() - _device_bytes(self.params)

    def _tensor_only_bytes(self) -> int:
        """Bytes of the float32 parameters one device holds once the FSDP split is gathered."""
        from clipo_jax import parallel
        from clipo_jax.models import transformer

        sh = parallel.tree_shardings(self.mesh, transformer.rollout_logical_axes(self.cfg), self.params)
        return _device_bytes(_abstract(self.params, sh))

    def _decode(self):
        import jax
        import jax.numpy as jnp
        import numpy as np

        from clipo_jax import sampling
        from clipo_jax.models.transformer import KVCache

        s = self.sizes
        Pc, Tp, N, G = s["rollout_prompts_per_call"], s["prompt_width"], s["new_tokens"], s["group_size"]
        cfg, rl = self.cfg, self.config.rl
        unroll = self.unroll
        scfg = sampling.SamplingConfig(
            max_new_tokens=N, temperature=rl.temperature, top_p=rl.top_p, n_samples=G, stop_ids=(0,), pad_id=0
        )
        cache = jax.eval_shape(lambda: sampling.init_cache(cfg, Pc, Tp, per_layer=unroll))
        axes = KVCache.logical_axes(unroll)
        cache = KVCache(
            *(
                jax.tree.map(lambda x, a=a: self._named(x, a), c)
                if not isinstance(c, tuple)
                else tuple(self._named(x, a) for x in c)
                for c, a in zip(cache, axes)
            )
        )
        h = self._batch((Pc, cfg.d_model), jnp.float32)
        tokens, mask = self._batch((Pc, Tp), jnp.int32), self._batch((Pc, Tp), jnp.bool_)
        rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=self.replicated)

        def fn(p, c, hh, t, m, r):
            if unroll:
                p = sampling.unstack_layers(p)
            return sampling.decode(
                p, c, hh, t, m, r, cfg=cfg, scfg=scfg, unroll_layers=unroll, cache_steps_per_octave=4
            )

        B = Pc * G
        sizes = sampling.cache_growth_sizes(Tp, N, 4)
        flops, kv_read = 0.0, 0.0
        prev = Tp
        for size in sizes:  # the steps of each phase attend over that phase's cache size
            steps = size - prev
            flops += steps * B * model_flops_per_token_decode(cfg, size)
            kv_read += steps * B * kv_bytes_per_slot(cfg) * size
            prev = size
        # a decode step reads the weights it computes with: the local copy, or the gathered layers
        weights = _device_bytes(self.rollout_params) if self.replicate_rollout else self._tensor_only_bytes()
        # the cache's per-device share (a KV-head count the tensor axis does not divide stays replicated)
        k_full = sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(cache.k))
        bytes_per_step = weights + kv_read / N * _device_bytes(cache.k) / k_full
        args = (self.rollout_params, cache, h, tokens, mask, rng)
        return jax.jit(fn), args, self._rollout_resident(), flops, bytes_per_step

    def _named(self, x, axes):
        import jax

        from clipo_jax import parallel

        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=parallel.named_sharding(self.mesh, axes, x.shape))

    def _clipo(self):
        import jax
        import jax.numpy as jnp

        from clipo_jax import contrastive

        if self.clipo_cfg is None:
            return None
        s = self.sizes
        B, D, G = s["prompts"] * s["group_size"], self.cfg.d_model, s["group_size"]
        rep = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=self.replicated)
        args = (
            self.head,
            rep((B, D), jnp.float32),
            rep((B,), jnp.int32),
            rep((B,), jnp.int32),
            jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=self.replicated),
            rep((B,), jnp.bool_),
        )
        ccfg = self.clipo_cfg
        fn = jax.jit(lambda st, z, y, g, r, v: contrastive._head_step_impl(st, z, y, g, r, v, ccfg))
        d_out = ccfg.d_out
        flops = 3 * 2 * B * D * d_out + 3 * 2 * B * G * d_out  # head matmul + group similarities, fwd+bwd
        return fn, args, _device_bytes(self.head), float(flops), 0


def model_flops_per_sequence(
    cfg, T: int, *, lm_head_tokens: int, passes: int, lm_head_passes: int, causal: bool = False
) -> float:
    """Matmul FLOPs of `passes` forward-equivalents over one sequence of T tokens (attention over
    the full T x T grid as our code computes it, or its causal half)."""
    d, f, hd, L = cfg.d_model, cfg.d_ff, cfg.head_dim, cfg.n_layers
    layer_weights = d * hd * (2 * cfg.n_heads + 2 * cfg.n_kv_heads) + 3 * d * f
    attn = 4 * T * T * cfg.n_heads * hd * (0.5 if causal else 1.0)  # QK^T and PV, one layer
    per_pass = 2 * T * L * layer_weights + L * attn
    return float(passes * per_pass + lm_head_passes * 2 * lm_head_tokens * d * cfg.vocab_size)


def model_flops_per_token_decode(cfg, cache_len: int) -> float:
    d, f, hd, L = cfg.d_model, cfg.d_ff, cfg.head_dim, cfg.n_layers
    layer_weights = d * hd * (2 * cfg.n_heads + 2 * cfg.n_kv_heads) + 3 * d * f
    return float(2 * L * layer_weights + 2 * d * cfg.vocab_size + L * 4 * cache_len * cfg.n_heads * hd)


def kv_bytes_per_slot(cfg) -> float:
    import numpy as np

    return float(2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * np.dtype(cfg.dtype).itemsize)


# ---------------------------------------------------------------------------- compile and report
def compile_program(planner: Planner, name: str) -> dict[str, Any]:
    import time

    from clipo_jax import parallel

    made = planner.programs()[name]()
    if made is None:
        return {"program": name, "skipped": "clipo.enabled is False"}
    fn, args, resident_args, flops, bytes_per_step = made
    t0 = time.perf_counter()
    with parallel.use_mesh(planner.mesh):
        compiled = fn.lower(*args).compile()
    seconds = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    n = planner.mesh.size
    rec = {
        "program": name,
        "argument_bytes": int(mem.argument_size_in_bytes),
        "output_bytes": int(mem.output_size_in_bytes),
        "temp_bytes": int(mem.temp_size_in_bytes),
        "alias_bytes": int(mem.alias_size_in_bytes),
        "total_bytes": int(
            mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes - mem.alias_size_in_bytes
        ),
        "flops": flops / n,  # model FLOPs per device
        "xla_flops_raw": float((cost or {}).get("flops", 0.0)),
        "compile_s": round(seconds, 1),
        "measured_peak_bytes": None,
    }
    rec["peak_bytes"] = rec["total_bytes"] + sum(planner.resident.values()) - resident_args
    rec["fits"] = {chip: rec["peak_bytes"] <= cap for chip, cap in CHIPS.items()}
    if bytes_per_step:
        rec["decode_bytes_per_step"] = bytes_per_step
    return rec


def projection(planner: Planner, recs: dict[str, dict], mfu: float, hbm_fraction: float, link: float) -> dict:
    """Seconds per RL step on H100s of this mesh size: compute-bound programs at `mfu`, decode at
    `hbm_fraction` of HBM bandwidth, and separately the interconnect: parameter all-gathers
    (FSDP) and, with a tensor axis, activation all-reduces, over links of `link` bytes/s per
    device, counted as if nothing overlapped them."""
    s = planner.sizes
    compute = mfu * H100_BF16_FLOPS
    gather = planner.gathered_bytes()
    remat = 1 if planner.step_cfg.remat else 0
    time, comm = {}, {}
    if "train" in recs:  # per micro-batch: gathers for forward, remat and backward, grads reduce-scattered
        time["train"] = s["steps_per_rl_step"] * recs["train"]["flops"] / compute
        comm["train"] = s["steps_per_rl_step"] * s["micro_batches"] * (3 + remat) * gather / link
    if "logp" in recs:
        passes = s["logp_passes"] * s["logp_chunks"]
        time["logp"] = passes * recs["logp"]["flops"] / compute
        comm["logp"] = passes * gather / link
    calls = s["rollout_calls"]
    if planner.replicate_rollout:  # one replicated compute-dtype copy per Sampler call (all its chunks)
        full = _device_bytes(planner.rollout_params)
        rollout_gather = {"prefill": full, "decode": 0.0}
    else:  # the sharded weights are gathered in every prefill call and every decode step
        rollout_gather = {
            "prefill": calls * s["prefill_calls_per_rollout"] * gather,
            "decode": calls * s["new_tokens"] * gather,
        }
    if "prefill" in recs:
        time["prefill"] = calls * s["prefill_calls_per_rollout"] * recs["prefill"]["flops"] / compute
        comm["prefill"] = rollout_gather["prefill"] / link
    if "decode" in recs:
        r = recs["decode"]
        per_call = max(
            s["new_tokens"] * r["decode_bytes_per_step"] / (hbm_fraction * H100_HBM_BYTES_S), r["flops"] / compute
        )
        time["decode"] = calls * per_call
        comm["decode"] = rollout_gather["decode"] / link
    # tensor parallelism: two activation all-reduces per layer (attention and MLP outputs) for
    # every token a device's batch shard processes, per forward-equivalent pass
    t = planner.mesh.shape["tensor"]
    if t > 1:
        import numpy as np

        cfg = planner.cfg
        bd = planner.mesh.shape["data"] * planner.mesh.shape["fsdp"]
        per_token = cfg.n_layers * 2 * cfg.d_model * np.dtype(cfg.dtype).itemsize * 2 * (t - 1) / t
        tokens = {
            "train": (2 + remat) * s["steps_per_rl_step"] * s["minibatch_rows"] / bd * s["seq"],
            "logp": s["logp_passes"] * s["prompts"] * s["group_size"] / bd * s["seq"],
            "prefill": calls * s["prefill_calls_per_rollout"] * s["prefill_rows"] / bd * s["prompt_width"],
            "decode": calls * s["decode_rows"] / bd * s["new_tokens"],
        }
        for name, n in tokens.items():
            if name in comm:
                comm[name] += n * per_token / link
    time["total"] = sum(time.values())
    comm["total"] = sum(comm.values())
    return {"compute_or_memory_s": time, "interconnect_s": comm}


# The CLIPO authors' verl launch scripts (scripts/train_gsm8k.sh and scripts/train_math.sh of
# github Qwen-Applications/CLIPO): one node of 8 GPUs, FSDP with gradient checkpointing, sglang
# rollouts (tensor parallel 1), dynamic batching with at most max_tokens_per_gpu tokens per GPU
# in a train micro-batch, log-prob micro-batches of micro_rows_per_gpu rows.
REFERENCE_SETUPS = {
    "clipo_gsm8k_qwen25_3b": dict(gpus=8, micro_rows_per_gpu=32, max_tokens_per_gpu=5120),
    "clipo_math_qwen25_7b": dict(gpus=8, micro_rows_per_gpu=16, max_tokens_per_gpu=9216),
}


def reference_comparison(planner: Planner, recs: dict[str, dict], config_name: str, mfu: float) -> dict | None:
    """Our planned step next to the reference's published setup for the same track: chips, tokens
    per device per train micro-batch, and the compute-bound programs (train and log-prob passes)
    at the same MFU, theirs with causal attention (flash attention skips the upper triangle; our
    attention computes the full T x T grid). Rollouts are not compared: sglang's paged cache holds
    real lengths, not the padded ones a plan can know."""
    ref = REFERENCE_SETUPS.get(config_name)
    if ref is None or "train" not in recs:
        return None
    s, cfg = planner.sizes, planner.cfg
    batch_devices = planner.mesh.shape["data"] * planner.mesh.shape["fsdp"]
    ours_tokens = s["minibatch_rows"] // s["micro_batches"] // batch_devices * s["seq"]
    passes = 3 + (1 if planner.step_cfg.remat else 0)
    rows = s["prompts"] * s["group_size"]
    T = s["seq"]

    def step_flops(causal: bool) -> float:
        train = (
            rows
            * s["epochs"]
            * model_flops_per_sequence(cfg, T, lm_head_tokens=T, passes=passes, lm_head_passes=4, causal=causal)
        )
        logp = (
            s["logp_passes"]
            * rows
            * model_flops_per_sequence(cfg, T, lm_head_tokens=T, passes=1, lm_head_passes=1, causal=causal)
        )
        return train + logp

    compute = mfu * H100_BF16_FLOPS
    ours_s = step_flops(False) / (planner.mesh.size * compute)
    theirs_s = step_flops(True) / (ref["gpus"] * compute)
    return {
        "reference": ref,
        "chips": {"ours": planner.mesh.size, "reference": ref["gpus"], "ratio": planner.mesh.size / ref["gpus"]},
        "train_tokens_per_device_per_micro_batch": {
            "ours": ours_tokens,
            "reference_max": ref["max_tokens_per_gpu"],
            "ratio": ours_tokens / ref["max_tokens_per_gpu"],
        },
        "train_and_logp_s": {"ours": ours_s, "reference": theirs_s, "ratio": ours_s / theirs_s},
    }


def fit_chunks(config, cfg, mesh, cap: float, unroll: bool = False) -> dict[str, int]:
    """The fewest train micro-batches and log-prob chunks and the most rollout prompts per call
    (powers of two) whose programs' peak per device is at most `cap` bytes; sets them on config
    and returns them."""
    rl = config.rl
    rows = rl.prompts_per_step * rl.group_size
    mini_rows = rows // rl.mini_batches
    batch_devices = mesh.shape["data"] * mesh.shape["fsdp"]
    micro = [m for m in _powers_of_two(mini_rows // batch_devices) if mini_rows % m == 0]
    chosen = {}
    for key, program, candidates in (
        ("micro_batches", "train", micro),
        ("logprob_chunks", "logp", [c for c in _powers_of_two(rows) if rows % c == 0]),
        ("rollout_chunk_prompts", "decode", list(reversed(_powers_of_two(rl.prompts_per_step)))),
    ):
        for value in candidates:
            rl[key] = value
            rec = compile_program(Planner(config, cfg, mesh, unroll), program)
            print(f"  fit {key}={value}: {program} peak {fmt_gb(rec['peak_bytes'])} GB (cap {cap / GB:.1f})")
            if rec["peak_bytes"] <= cap:
                chosen[key] = value
                break
        else:
            raise PlanError(f"no {key} makes {program} fit in {cap / GB:.1f} GB per device: use more chips")
    return chosen


def _powers_of_two(n: int) -> list[int]:
    out, v = [], 1
    while v <= n:
        out.append(v)
        v *= 2
    return out


def fmt_gb(x) -> str:
    return "-" if x is None else f"{x / GB:.2f}"


def run_worker(planner: Planner, name: str) -> None:
    """Allocate zero inputs, run the program once, print its peak memory (one JSON line)."""
    import jax
    import jax.numpy as jnp

    from clipo_jax import parallel

    fn, args, *_ = planner.programs()[name]()

    def zeros(x):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.device_put(jax.random.key(0), x.sharding)
        return jax.device_put(jnp.zeros(x.shape, x.dtype), x.sharding)

    with parallel.use_mesh(planner.mesh):
        compiled = fn.lower(*args).compile()
        concrete = jax.tree.map(zeros, args)
        jax.block_until_ready(concrete)
        stats = jax.devices()[0].memory_stats()
        if stats is None:
            before = _rss_hwm_reset()
            jax.block_until_ready(compiled(*concrete))
            peak = _read_status("VmHWM") - before
        else:
            jax.block_until_ready(compiled(*concrete))
            peak = max(d.memory_stats().get("peak_bytes_in_use", 0) for d in planner.mesh.devices.flat)
    print(json.dumps({"program": name, "measured_peak_bytes": int(peak)}))


def _read_status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _rss_hwm_reset() -> int:
    """Reset the peak-RSS mark to the current RSS (Linux clear_refs) and return it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    return _read_status("VmRSS")


def measure(name: str, argv: list[str]) -> int | None:
    """The program's peak memory from a fresh subprocess (nothing else allocated there)."""
    cmd = [sys.executable, "-m", "experiments.plan_scale", *argv, f"--worker={name}", "--nomeasure"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)["measured_peak_bytes"]
    print(f"  measure {name}: worker failed (rc {proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
    return None


def main(argv):
    if FLAGS.config is None:
        sys.exit("error: --config is required")
    if not FLAGS.real_devices:
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={FLAGS.devices}"
        )
        os.environ["JAX_PLATFORMS"] = "cpu"
    import jax

    from clipo_jax import parallel
    from experiments.bench_common import machine

    try:
        mesh_sizes = parse_mesh(FLAGS.mesh)
        devices = jax.devices()
        mesh = parallel.make_mesh(mesh_sizes["data"], mesh_sizes["fsdp"], mesh_sizes["tensor"], devices)
        cfg = model_config(FLAGS.config, FLAGS.shape)
        unknown = sorted(set(FLAGS.programs) - {"train", "logp", "prefill", "decode", "clipo"})
        if unknown:
            raise PlanError(f"--programs: unknown {unknown}")
        planner = Planner(FLAGS.config, cfg, mesh, unroll_layers=FLAGS.unroll_layers)
    except (PlanError, parallel.ParallelError, ValueError) as e:
        sys.exit(f"error: {e}")
    if FLAGS.worker:
        run_worker(planner, FLAGS.worker)
        return

    print(f"# {machine()}; jax {jax.__version__}; backend {jax.default_backend()}, {len(devices)} devices")
    print(
        f"# model {cfg.arch} d={cfg.d_model} L={cfg.n_layers} heads={cfg.n_heads}/{cfg.n_kv_heads} "
        f"vocab={cfg.vocab_size}: {cfg.num_params() / 1e9:.2f}B params, compute {cfg.dtype}, "
        f"attention {cfg.attention_impl}; mesh {dict(mesh.shape)}"
    )
    if FLAGS.fit:
        chip = next((c for c in CHIPS if c.lower().startswith(FLAGS.fit.lower())), None)
        if chip is None:
            sys.exit(f"error: --fit={FLAGS.fit!r} is not one of {list(CHIPS)}")
        try:
            chosen = fit_chunks(FLAGS.config, cfg, mesh, FLAGS.usable * CHIPS[chip], FLAGS.unroll_layers)
        except PlanError as e:
            sys.exit(f"error: {e}")
        print("# fitted to " + chip + ": " + " ".join(f"--config.rl.{k}={v}" for k, v in chosen.items()))
        planner = Planner(FLAGS.config, cfg, mesh, unroll_layers=FLAGS.unroll_layers)
    s = planner.sizes
    print("# step: " + ", ".join(f"{k}={v}" for k, v in s.items()))
    print("# resident per device (GB): " + ", ".join(f"{k} {fmt_gb(v)}" for k, v in planner.resident.items()))
    recs = {}
    for name in FLAGS.programs:
        rec = compile_program(planner, name)
        if "skipped" in rec:
            print(f"  {name}: skipped ({rec['skipped']})")
            continue
        if FLAGS.measure:
            rec["measured_peak_bytes"] = measure(name, [a for a in sys.argv[1:] if not a.startswith("--json_out")])
        recs[name] = rec
    head = f"{'program':<9}{'args GB':>9}{'out GB':>8}{'temp GB':>9}{'alias GB':>9}{'peak GB':>9}"
    head += f"{'H100':>6}{'v5p':>5}{'TFLOP/dev':>11}{'xla raw':>10}{'compile s':>10}"
    if FLAGS.measure:
        head += f"{'measured GB':>12}"
    print("\nper device (peak = program buffers + resident arrays it does not take as arguments)")
    print(head)
    for name, r in recs.items():
        row = (
            f"{name:<9}{fmt_gb(r['argument_bytes']):>9}{fmt_gb(r['output_bytes']):>8}{fmt_gb(r['temp_bytes']):>9}"
            f"{fmt_gb(r['alias_bytes']):>9}{fmt_gb(r['peak_bytes']):>9}"
            f"{'yes' if r['fits']['H100 80GB'] else 'NO':>6}{'yes' if r['fits']['TPU v5p 95GB'] else 'NO':>5}"
            f"{r['flops'] / 1e12:>11.1f}{r['xla_flops_raw'] / 1e12:>10.3f}{r['compile_s']:>10.1f}"
        )
        if FLAGS.measure:
            row += f"{fmt_gb(r['measured_peak_bytes']):>12}"
        print(row)
    link = FLAGS.link_gbs * 1e9
    proj = projection(planner, recs, FLAGS.mfu, FLAGS.hbm_fraction, link)
    print(
        f"\nprojected H100 seconds per RL step on {mesh.size} chips (a projection, not a measurement: "
        f"train/logp/prefill at {FLAGS.mfu:.0%} MFU of 989 TFLOP/s, decode at {FLAGS.hbm_fraction:.0%} of 3.35 TB/s"
        f"{', rollout weights replicated in ' + cfg.dtype if planner.replicate_rollout else ', rollout weights FSDP-sharded'})"
    )
    for kind, label in (
        ("compute_or_memory_s", "compute/HBM"),
        ("interconnect_s", f"all-gathers at {FLAGS.link_gbs:.0f} GB/s"),
    ):
        print(f"  {label:<28}" + ", ".join(f"{k} {v:.1f}" for k, v in proj[kind].items()))
    config_name = os.path.splitext(os.path.basename(config_flags.get_config_filename(FLAGS["config"])))[0]
    ref = reference_comparison(planner, recs, config_name, FLAGS.mfu)
    if ref is not None:
        r = ref["reference"]
        print(
            f"reference setup (the authors' verl script): {r['gpus']} GPUs, train micro-batches of at most "
            f"{r['max_tokens_per_gpu']} tokens per GPU, log-prob micro-batches of {r['micro_rows_per_gpu']} rows per GPU\n"
            f"  chips ours/reference {ref['chips']['ours']}/{ref['chips']['reference']} = {ref['chips']['ratio']:.2f}; "
            f"train tokens per device per micro-batch {ref['train_tokens_per_device_per_micro_batch']['ours']} vs "
            f"<= {r['max_tokens_per_gpu']} ({ref['train_tokens_per_device_per_micro_batch']['ratio']:.1f}x)\n"
            f"  train + log-prob passes at the same MFU: ours {ref['train_and_logp_s']['ours']:.1f} s vs reference "
            f"{ref['train_and_logp_s']['reference']:.1f} s with causal attention ({ref['train_and_logp_s']['ratio']:.2f}x)"
        )
    fits_all = {chip: all(r["fits"][chip] for r in recs.values()) for chip in CHIPS}
    summary = {
        "machine": machine(),
        "jax": jax.__version__,
        "model": {"arch": cfg.arch, "params_b": round(cfg.num_params() / 1e9, 3), "dtype": cfg.dtype},
        "mesh": dict(mesh.shape),
        "step": s,
        "resident_bytes": planner.resident,
        "programs": list(recs.values()),
        "fits": fits_all,
        "projection_s": proj,
        "reference_comparison": ref,
        "assumptions": {
            "mfu": FLAGS.mfu,
            "hbm_fraction": FLAGS.hbm_fraction,
            "link_gbs": FLAGS.link_gbs,
            "h100_flops": H100_BF16_FLOPS,
            "h100_hbm_bytes_s": H100_HBM_BYTES_S,
        },
    }
    if FLAGS.json_out:
        with open(FLAGS.json_out, "w") as f:
            json.dump(summary, f, indent=1)
    print(json.dumps(summary))


if __name__ == "__main__":
    app.run(main)
