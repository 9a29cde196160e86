r"""CLIPO contrastive loss and head step at the paper's scales: ours (JAX) vs a plain PyTorch port
of the reference's BxB computation.

  python -m experiments.bench_contrastive                 # both tracks, ~5-10 min on 2 cores
  python -m experiments.bench_contrastive --tracks=II --repeats=3
  python -m experiments.bench_contrastive --quick         # tiny shapes, 1 repeat: checks it runs

Cases (InfoNCE, group level, cosine, tau 0.05, masked_label 0, skip_trivial on, float32, CPU):
  loss: forward + backward of the batch loss w.r.t. given unit-norm embeddings [B, d].
        ours = blockwise [P, G, G] (jit); dense = our BxB formulation (jit); torch = BxB (eager).
  step: the whole head step -- projection, L2 normalisation, loss, gradient, AdamW update --
        ours = contrastive.head_step (jit) vs the same in PyTorch (nn.Linear + AdamW).
  floor: the head's two matrix products alone (forward x @ W and the weight gradient x^T @ dz),
        jit, i.e. what any implementation of the step must pay.
  loss floor: the loss against its own memory floor. Bytes counted: the loss's inputs, each read
        once -- the embeddings z [B, d] float32 (4*B*d), the labels [B] int32 and the group ids
        [B] int32 (4*B each); not counted: the gradient w.r.t. z it writes (another 4*B*d), the
        PRNG key and any re-reads, so the floor is a lower bound. Divided by the machine's read
        bandwidth, measured in the loss_ours worker process right after its timed runs: the best
        of 5 of a jitted sum over a --bandwidth_mib (1 GiB) float32 array. Printed per track as
        `loss floor: X MB read / Y GB/s = Z ms; ours W ms = R x the floor` (MB = 1e6 bytes,
        GB/s = 1e9 bytes/s, R = W / Z).
Every measurement runs in its own subprocess (so memory does not leak between cases): warmup,
then the median of --repeats runs. Memory: for JAX the compiled executable's
memory_analysis() (arguments + outputs + temporaries, what XLA plans to hold at peak); for every
case also the peak-RSS delta of the subprocess (ru_maxrss after the runs minus the RSS just
before the first call), which includes allocator overheads.
The first line names the machine (bench_common.machine(): CPU model, cores, ISA flags). The last
line is the JSON summary (ratio = baseline_time / our_time, bigger is better; for the floors the
baseline is the floor, so ratio <= 1 and the loss-floor entry adds floor_x = our_time / floor).
--quick runs tiny shapes (TRACKS_QUICK) with 1 repeat: only for checking that the bench runs.
"""

import json
import os
import resource
import subprocess
import sys

from absl import app, flags

from experiments.bench_common import cores as _cores
from experiments.bench_common import machine as _machine
from experiments.bench_common import median_seconds, read_bandwidth_gbs

FLAGS = flags.FLAGS
flags.DEFINE_string("tracks", "I,II", "comma list of tracks to run: I, II")
flags.DEFINE_integer("repeats", 5, "timed runs per measurement (median reported)")
flags.DEFINE_string("worker", None, "internal: run one measurement '<what>:<track>' and exit")
flags.DEFINE_bool("skip_torch", False, "skip the PyTorch baselines")
flags.DEFINE_bool("quick", False, "tiny shapes and 1 repeat (a smoke run; the timings mean nothing)")
flags.DEFINE_integer("bandwidth_mib", 1024, "size of the float32 array summed to measure memory bandwidth")

# prompts, group size, hidden, d_out
TRACKS = {"I": (512, 16, 2048, 512), "II": (128, 16, 3584, 2048)}
TRACKS_QUICK = {"I": (8, 16, 64, 32), "II": (4, 16, 96, 64)}
TAU, EPS = 0.05, 1e-8


def _shape(track):
    return (TRACKS_QUICK if FLAGS.quick else TRACKS)[track]


def _repeats() -> int:
    return 1 if FLAGS.quick else FLAGS.repeats


def _loss_read_bytes(track) -> int:
    """What the loss must read at least (see the module docstring): z [B, d] float32 once, plus
    the labels and group ids [B] int32."""
    p, g, _, d = _shape(track)
    b = p * g
    return 4 * b * d + 4 * b + 4 * b


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _time(fn, repeats):
    """fn() runs one iteration and blocks until done. Returns (median seconds, rss delta MiB)."""
    rss0 = _rss_mib()
    return median_seconds(fn, repeats), _peak_rss_mib() - rss0


def _inputs(track, seed=0):
    import numpy as np

    p, g, hidden, d = _shape(track)
    rng = np.random.default_rng(seed)
    b = p * g
    labels = rng.integers(0, 2, b).astype(np.int32)
    group_ids = np.repeat(np.arange(p), g).astype(np.int32)
    z = rng.normal(size=(b, d)).astype(np.float32)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    pooled = rng.normal(size=(b, hidden)).astype(np.float32)
    return z, labels, group_ids, pooled


# ------------------------------------------------------------------------------ JAX workers
def _jax_mem_mib(compiled) -> float:
    m = compiled.memory_analysis()
    return (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes) / 2**20


def _worker_jax_loss(track, dense):
    import jax
    import jax.numpy as jnp

    from clipo_jax import contrastive as C

    z, labels, group_ids, _ = _inputs(track)
    g = _shape(track)[1]
    z, labels, group_ids = map(jnp.asarray, (z, labels, group_ids))
    key = jax.random.key(0)

    def batch_loss(e):
        return C.contrastive_loss(e, labels, group_ids, rng=key, group_size=g, dense=dense)[1]

    fn = jax.jit(jax.value_and_grad(batch_loss))
    mem = _jax_mem_mib(fn.lower(z).compile())
    t, rss = _time(lambda: jax.block_until_ready(fn(z)), _repeats())
    out = {"time_s": t, "rss_mib": rss, "xla_mib": mem}
    if not dense:  # the memory floor's bandwidth, in this same process, after the timed runs
        out["read_gbs"] = read_bandwidth_gbs(FLAGS.bandwidth_mib)
    return out


def _worker_jax_step(track):
    import jax
    import jax.numpy as jnp

    from clipo_jax import contrastive as C

    _, labels, group_ids, pooled = _inputs(track)
    p, g, hidden, d = _shape(track)
    labels, group_ids, pooled = map(jnp.asarray, (labels, group_ids, pooled))
    cfg = C.ContrastiveConfig(group_size=g, d_out=d)
    state = C.init_head_state(jax.random.key(0), hidden, cfg)
    key = jax.random.key(1)
    valid = jnp.ones(labels.shape, bool)
    compiled = C._head_step_impl.lower(state, pooled, labels, group_ids, key, valid, cfg=cfg).compile()
    mem = _jax_mem_mib(compiled)
    box = [state]

    def run():
        box[0], per, loss, _ = C.head_step(box[0], pooled, labels, group_ids, key, cfg)
        jax.block_until_ready((box[0], per, loss))

    t, rss = _time(run, _repeats())
    return {"time_s": t, "rss_mib": rss, "xla_mib": mem}


def _worker_jax_floor(track):
    import jax
    import jax.numpy as jnp
    import numpy as np

    _, _, _, pooled = _inputs(track)
    p, g, hidden, d = _shape(track)
    w = jnp.asarray(np.random.default_rng(1).normal(size=(hidden, d)).astype(np.float32))
    dz = jnp.asarray(np.random.default_rng(2).normal(size=(p * g, d)).astype(np.float32))
    x = jnp.asarray(pooled)
    fn = jax.jit(lambda x, w, dz: (x @ w, x.T @ dz))
    mem = _jax_mem_mib(fn.lower(x, w, dz).compile())
    t, rss = _time(lambda: jax.block_until_ready(fn(x, w, dz)), _repeats())
    return {"time_s": t, "rss_mib": rss, "xla_mib": mem}


# ------------------------------------------------------------------------------ torch workers
def torch_clipo_loss(z, labels, group_ids, tau=TAU, eps=EPS):
    """Plain PyTorch port of the reference's BxB computation (InfoNCE, group level, cosine,
    masked_label 0, skip_trivial): z [B, d] unit-norm -> (per_sample [B], batch_loss)."""
    import torch

    b = z.shape[0]
    s = z @ z.T
    logits = (s - s.max(dim=1, keepdim=True).values.detach()) / tau
    in_group = group_ids[:, None] == group_ids[None, :]
    same = (labels[:, None] == labels[None, :]) & in_group
    eye = torch.eye(b, dtype=torch.bool)
    n_same = same.sum(1)
    n_pos, n_neg = n_same - 1, in_group.sum(1) - n_same
    pos = same & ~eye
    denom = (torch.exp(logits) * (in_group & ~eye)).sum(1)
    # one positive per anchor, uniform; rows without positives pick anything (masked below)
    pick = torch.multinomial(pos.float() + (n_pos == 0).float()[:, None], 1)
    loss = -(logits.gather(1, pick).squeeze(1) - torch.log(denom + eps))
    keep = (labels != 0) & (n_pos >= 1) & (n_neg >= 1)
    per = loss * keep
    return per, per.sum() / (keep.sum() + eps)


def _worker_torch_loss(track):
    import torch

    torch.set_num_threads(_cores())
    z, labels, group_ids, _ = _inputs(track)
    z0 = torch.from_numpy(z)
    labels, group_ids = torch.from_numpy(labels), torch.from_numpy(group_ids)

    def run():
        e = z0.clone().requires_grad_(True)
        _, loss = torch_clipo_loss(e, labels, group_ids)
        loss.backward()
        return e.grad

    t, rss = _time(run, _repeats())
    return {"time_s": t, "rss_mib": rss, "xla_mib": None}


def _worker_torch_step(track):
    import torch

    torch.set_num_threads(_cores())
    _, labels, group_ids, pooled = _inputs(track)
    p, g, hidden, d = _shape(track)
    torch.manual_seed(0)
    head = torch.nn.Linear(hidden, d, bias=False)
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    x = torch.from_numpy(pooled)
    labels, group_ids = torch.from_numpy(labels), torch.from_numpy(group_ids)

    def run():
        z = torch.nn.functional.normalize(head(x), dim=-1)
        per, loss = torch_clipo_loss(z, labels, group_ids)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return per.detach()

    t, rss = _time(run, _repeats())
    return {"time_s": t, "rss_mib": rss, "xla_mib": None}


def _worker_torch_floor(track):
    import torch

    torch.set_num_threads(_cores())
    _, _, _, pooled = _inputs(track)
    p, g, hidden, d = _shape(track)
    x = torch.from_numpy(pooled)
    w = torch.randn(hidden, d)
    dz = torch.randn(p * g, d)
    t, rss = _time(lambda: (x @ w, x.T @ dz), _repeats())
    return {"time_s": t, "rss_mib": rss, "xla_mib": None}


WORKERS = {
    "loss_ours": lambda tr: _worker_jax_loss(tr, dense=False),
    "loss_dense": lambda tr: _worker_jax_loss(tr, dense=True),
    "loss_torch": _worker_torch_loss,
    "step_ours": _worker_jax_step,
    "step_torch": _worker_torch_step,
    "floor_jax": _worker_jax_floor,
    "floor_torch": _worker_torch_floor,
}


def _spawn(what, track):
    cmd = [
        sys.executable,
        "-m",
        "experiments.bench_contrastive",
        f"--worker={what}:{track}",
        f"--repeats={FLAGS.repeats}",
        f"--bandwidth_mib={FLAGS.bandwidth_mib}",
    ] + (["--quick"] if FLAGS.quick else [])
    res = subprocess.run(
        cmd, capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    )
    if res.returncode != 0:
        sys.stderr.write(res.stderr[-3000:])
        raise RuntimeError(f"worker {what}:{track} failed (rc {res.returncode})")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv):
    del argv
    if FLAGS.worker:
        what, track = FLAGS.worker.split(":")
        print(json.dumps(WORKERS[what](track)))
        return
    tracks = [t.strip() for t in FLAGS.tracks.split(",") if t.strip()]
    for t in tracks:
        if t not in TRACKS:
            raise app.UsageError(f"--tracks: unknown track {t!r} (use I, II)")
    print(
        f"CLIPO contrastive bench on {_machine()} (JAX {__import__('jax').__version__}, float32, "
        f"median of {_repeats()}{', --quick: tiny shapes' if FLAGS.quick else ''}); "
        f"load average at start: {os.getloadavg()}",
        flush=True,
    )
    names = ["loss_ours", "loss_dense", "step_ours", "floor_jax"]
    if not FLAGS.skip_torch:
        names += ["loss_torch", "step_torch", "floor_torch"]
    res = {}
    for t in tracks:
        for n in names:
            print(f"running {n} track {t} ...", file=sys.stderr, flush=True)
            res[n, t] = _spawn(n, t)

    def ms(n, t):
        return res[n, t]["time_s"] * 1e3 if (n, t) in res else float("nan")

    def mib(n, t, key):
        v = res.get((n, t), {}).get(key)
        return "-" if v is None else f"{v:,.0f}"

    def loss_floor(t):
        """(MB read, GB/s, floor ms, ours ms, ours / floor) of the loss on track t."""
        mb = _loss_read_bytes(t) / 1e6
        gbs = res["loss_ours", t]["read_gbs"]
        floor = mb / gbs  # MB / (GB/s) = ms
        return mb, gbs, floor, ms("loss_ours", t), ms("loss_ours", t) / floor

    print()
    print(f"{'case':<34}{'time ms':>12}{'XLA MiB':>10}{'RSS d MiB':>11}")
    for t in tracks:
        p, g, hidden, d = _shape(t)
        print(f"-- track {t}: {p} prompts x {g} = {p * g} responses, hidden {hidden} -> {d}")
        for n in names:
            print(f"{n:<34}{ms(n, t):>12.1f}{mib(n, t, 'xla_mib'):>10}{mib(n, t, 'rss_mib'):>11}")
        if not FLAGS.skip_torch:
            print(f"{'loss: torch / ours':<34}{ms('loss_torch', t) / ms('loss_ours', t):>12.1f}x")
            print(f"{'loss: jax dense / ours':<34}{ms('loss_dense', t) / ms('loss_ours', t):>12.1f}x")
            print(f"{'step: torch / ours':<34}{ms('step_torch', t) / ms('step_ours', t):>12.1f}x")
        print(f"{'step: ours / matmul floor (jax)':<34}{ms('step_ours', t) / ms('floor_jax', t):>12.2f}x")
        mb, gbs, floor, ours, times = loss_floor(t)
        print(
            f"loss floor: {mb:.4g} MB read / {gbs:.4g} GB/s = {floor:.4g} ms; ours {ours:.4g} ms = {times:.4g} x the floor"
        )

    results = []
    for t in tracks:
        base = not FLAGS.skip_torch
        for kind in ("loss", "step"):
            ours, tb = ms(f"{kind}_ours", t), ms(f"{kind}_torch", t) if base else None
            results.append(
                {
                    "case": f"{kind} track {t}",
                    "ours": round(ours, 3),
                    "baseline": round(tb, 3) if base else None,
                    "baseline_name": "PyTorch eager BxB reference port (CPU fp32)",
                    "ratio": round(tb / ours, 2) if base else None,
                    "unit": "ms",
                }
            )
        results.append(
            {
                "case": f"step track {t} vs matmul floor",
                "ours": round(ms("step_ours", t), 3),
                "baseline": round(ms("floor_jax", t), 3),
                "baseline_name": "jit x@W + x^T@dz alone",
                "ratio": round(ms("floor_jax", t) / ms("step_ours", t), 3),
                "unit": "ms",
            }
        )
        mb, gbs, floor, ours, times = loss_floor(t)
        results.append(
            {
                "case": f"loss track {t} vs memory floor",
                "ours": float(f"{ours:.4g}"),
                "baseline": float(f"{floor:.4g}"),
                "baseline_name": "bytes read (z, labels, group ids once) / measured read bandwidth",
                "ratio": float(f"{floor / ours:.4g}"),
                "unit": "ms",
                "floor_x": float(f"{times:.4g}"),
                "read_mb": float(f"{mb:.4g}"),
                "bandwidth_gbs": round(gbs, 2),
            }
        )
        results.append(
            {
                "case": f"loss track {t} memory",
                "ours": round(res["loss_ours", t]["xla_mib"], 1),
                "baseline": round(res["loss_dense", t]["xla_mib"], 1),
                "baseline_name": "our dense BxB formulation, XLA memory_analysis",
                "ratio": round(res["loss_dense", t]["xla_mib"] / res["loss_ours", t]["xla_mib"], 1),
                "unit": "MiB",
            }
        )
        if base:
            results.append(
                {
                    "case": f"loss track {t} peak RSS delta",
                    "ours": round(res["loss_ours", t]["rss_mib"], 1),
                    "baseline": round(res["loss_torch", t]["rss_mib"], 1),
                    "baseline_name": "PyTorch BxB, peak RSS delta in a subprocess",
                    "ratio": round(res["loss_torch", t]["rss_mib"] / max(res["loss_ours", t]["rss_mib"], 1.0), 1),
                    "unit": "MiB",
                }
            )
    print(json.dumps({"bench": "contrastive", "machine": _machine(), "results": results}))


if __name__ == "__main__":
    app.run(main)
