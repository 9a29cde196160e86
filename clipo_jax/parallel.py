"""Device mesh, logical-axis rules and multi-host initialisation.

Every parameter, activation and KV-cache array carries a tuple of *logical* axis names
(e.g. ('embed', 'mlp')). One rules table maps logical names to mesh axes
('data', 'fsdp', 'tensor'); changing the parallelism means changing the mesh shape, never
the model code. On one device every rule resolves to a trivial sharding.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or tuple of mesh axes, or None = replicated)
LOGICAL_RULES: dict[str, Any] = {
    "batch": ("data", "fsdp"),
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",  # flattened n_heads * head_dim
    "kv_heads": "tensor",  # flattened n_kv_heads * head_dim
    "kv_head": "tensor",  # cache axis: n_kv_heads
    "mlp": "tensor",
    "layers": None,
    "norm": None,
    "head_dim": None,
    "seq": None,
    "cache_seq": None,
    "act_embed": None,  # activations keep d_model unsharded
    "act_vocab": "tensor",
}


class ParallelError(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    data: int = -1  # -1: whatever devices are left
    fsdp: int = 1
    tensor: int = 1


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ('data', 'fsdp', 'tensor') mesh; one axis may be -1 (fill with remaining devices)."""
    devices = list(devices if devices is not None else jax.devices())
    shape = [data, fsdp, tensor]
    for name, size in zip(MESH_AXES, shape):
        if size != -1 and size < 1:
            raise ParallelError(f"mesh {name}={size}: each axis is -1 (the remaining devices) or >= 1")
    if shape.count(-1) > 1:
        raise ParallelError(f"at most one mesh axis may be -1, got data={data} fsdp={fsdp} tensor={tensor}")
    known = int(np.prod([s for s in shape if s != -1]))
    if -1 in shape:
        if len(devices) % known:
            raise ParallelError(f"{len(devices)} devices do not divide into mesh {shape}")
        shape[shape.index(-1)] = len(devices) // known
    if int(np.prod(shape)) != len(devices):
        raise ParallelError(
            f"mesh data={shape[0]} fsdp={shape[1]} tensor={shape[2]} needs "
            f"{int(np.prod(shape))} devices, have {len(devices)}"
        )
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def logical_to_spec(
    axes: Sequence[str | None] | None, mesh: Mesh | None = None, shape: Sequence[int] | None = None
) -> P:
    """Map logical axis names to a PartitionSpec; drop a mesh axis that does not divide the dim."""
    if axes is None:
        return P()
    out, used = [], set()
    for i, name in enumerate(axes):
        mesh_axes = LOGICAL_RULES.get(name) if name is not None else None
        if mesh_axes is None:
            out.append(None)
            continue
        mesh_axes = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
        keep = []
        for ax in mesh_axes:
            if ax in used:
                continue
            size = mesh.shape[ax] if mesh is not None else 1
            dim = shape[i] if shape is not None else None
            prod = int(np.prod([mesh.shape[a] for a in keep])) if (mesh is not None and keep) else 1
            # A dimension that the axis does not divide stays replicated on that axis (e.g. 3 KV heads
            # over tensor=2): correct everywhere, just less sharded.
            if dim is not None and dim % (prod * size):
                continue
            keep.append(ax)
        used.update(keep)
        out.append(tuple(keep) if len(keep) > 1 else (keep[0] if keep else None))
    return P(*out)


def named_sharding(mesh: Mesh, axes, shape=None) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(axes, mesh, shape))


def tree_shardings(mesh: Mesh, axes_tree, shapes_tree):
    """Shardings for a pytree given a matching tree of logical axes tuples and of arrays/shapes."""
    is_axes = lambda x: x is None or (isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x))
    return jax.tree.map(
        lambda ax, arr: named_sharding(mesh, ax, np.shape(arr)), axes_tree, shapes_tree, is_leaf=is_axes
    )


def shard_tree(tree, mesh: Mesh, axes_tree):
    return put_global(tree, tree_shardings(mesh, axes_tree, tree))


# ---------------------------------------------------------------------------- multi-process
# The trainer's host-side work (data, rewards, advantages) is deterministic and runs the same on
# every process; device arrays span the devices of all processes. These helpers move values
# across that boundary and are plain device_put / np.asarray in a single process.
def put_global(tree, shardings):
    """Values that are the same on every process (numpy, or process-local jax arrays) -> global
    arrays with the given shardings (a matching tree, or one sharding for every leaf). With
    several processes each one fills only its own devices' shards, so nothing crosses hosts."""
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)
    if isinstance(shardings, jax.sharding.Sharding):
        shardings = jax.tree.map(lambda _: shardings, tree)

    def one(x, sharding):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return jax.device_put(x, sharding)  # already global: a resharding
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            # typed PRNG keys have no numpy form: move the raw key data (replicated keys only)
            data = one(jax.random.key_data(x), NamedSharding(sharding.mesh, P()))
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(one, tree, shardings)


def to_host(tree):
    """Device arrays -> numpy on every process (an all-gather across processes where a value is
    split over devices that this process cannot address)."""
    from jax.experimental import multihost_utils

    def one(x):
        if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
            return np.asarray(x)
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    return jax.tree.map(one, tree)


@jax.jit
def _stack_scalars(leaves):
    return jnp.stack([jnp.asarray(x, jnp.float32).reshape(()) for x in leaves])


def scalars_to_host(tree):
    """A pytree of scalar metrics (device arrays) -> the same tree of Python floats, fetched as one
    float32 vector: leaf by leaf costs one device-to-host transfer each (about 1 ms for the 157
    metrics of a CLIPO step on a 2-core CPU, and each transfer costs more on a GPU); one jitted
    stack and one transfer 0.2 ms (experiments/bench_clipo_stage.py)."""
    leaves, treedef = jax.tree.flatten(tree)
    if not leaves:
        return tree
    return jax.tree.unflatten(treedef, to_host(_stack_scalars(leaves)).tolist())


def is_primary() -> bool:
    """Process 0: the one that writes logs, metrics and other run files."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Every process waits here until all have arrived (no-op in a single process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def agree(flag: bool) -> bool:
    """Process 0's ``flag`` on every process (itself with one process). For decisions read from
    shared files: processes that saw them at different moments would otherwise take different
    paths and wait at different barriers. A collective, so every process must call it."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    return bool(multihost_utils.broadcast_one_to_all(np.int32(bool(flag))))


# Per thread: an in-process judge traces on the reward stage's thread while the trainer traces
# its own programs on the main thread; neither may see the other's mesh.
_MESH_STACK = threading.local()


def _mesh_stack() -> list[Mesh]:
    if not hasattr(_MESH_STACK, "stack"):
        _MESH_STACK.stack = []
    return _MESH_STACK.stack


@contextlib.contextmanager
def use_mesh(mesh: Mesh | None):
    """Activation sharding constraints inside model code refer to this mesh (in this thread)."""
    if mesh is None:
        yield
        return
    _mesh_stack().append(mesh)
    try:
        yield
    finally:
        _mesh_stack().pop()


def constrain(x, axes: Sequence[str | None]):
    """with_sharding_constraint by logical axes; a no-op without an active multi-device mesh."""
    stack = _mesh_stack()
    if not stack or stack[-1].size == 1:
        return x
    mesh = stack[-1]
    return jax.lax.with_sharding_constraint(x, named_sharding(mesh, axes, x.shape))


def batch_sharding(mesh: Mesh, ndim: int, batch_size: int | None = None) -> NamedSharding:
    return named_sharding(
        mesh, ("batch",) + (None,) * (ndim - 1), None if batch_size is None else (batch_size,) + (1,) * (ndim - 1)
    )


def initialize_distributed(
    coordinator_address: str | None, num_processes: int | None, process_id: int | None, local_device_ids=None
) -> None:
    """jax.distributed.initialize from explicit flags; a no-op for single-process runs.

    Flags that name a multi-process run only in part are an error: a process left
    uninitialised would run alone as process 0 of 1 (writing the run's files, waiting at no
    barrier) next to the real run."""
    if num_processes is None or num_processes <= 1:
        if num_processes is not None and num_processes < 1:
            raise ParallelError(f"num_processes={num_processes}: must be >= 1")
        if coordinator_address and num_processes is None:
            raise ParallelError(f"coordinator_address={coordinator_address!r} needs num_processes (> 1)")
        if process_id not in (None, 0):
            raise ParallelError(f"process_id={process_id} with num_processes={num_processes}: a single process is 0")
        return
    if not coordinator_address:
        raise ParallelError(f"num_processes={num_processes} needs a coordinator_address (host:port)")
    if process_id is None or not 0 <= process_id < num_processes:
        raise ParallelError(
            f"num_processes={num_processes} needs a process_id in [0, {num_processes}), got {process_id}"
        )
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        local_device_ids=local_device_ids,
    )
