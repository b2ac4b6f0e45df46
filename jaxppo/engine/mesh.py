"""Device mesh and partition rules: data parallel x FSDP over all local devices.

    mesh = make_mesh(data=1, fsdp=-1)             # every device on the fsdp axis
    state = shard_tree(state, mesh)               # params + optimiser state: FSDP rules below
    ids = shard_batch(ids, mesh)                  # [B, ...] split over (data, fsdp)

`make_meshes` gives the policy and the critic their meshes: the same one (`train.placement`
colocated), or each a half of the devices (separate), so that their programs run side by side.

The batch is split over both axes (every device holds B / n rows); parameters and their Adam
moments are split over `fsdp` along one dimension chosen by the rules, and XLA's SPMD partitioner
inserts the all-gathers (forward) and reduce-scatters (gradients). On one device everything is
replicated and the programs are the single-device ones.

Rules, by parameter family (path regex -> preferred dimension to split):

    embed / pos_embed  [V, H]       vocab rows
    qkv, fc_in         [H, k*H]     output columns (the fused q|k|v and gate|up)
    out, fc_out        [k*H, H]     input rows
    lm_head            [H, V]       vocab columns
    norms, biases, score, scalars   replicated

A dimension is only split when the fsdp size divides it; otherwise the leaf is replicated (tiny
test vocabularies such as 97 stay whole). Optimiser-state leaves follow the parameter whose path
they end with.

Several hosts: call `jaxppo.runtime.initialize_distributed()` before building the trainer on every
host (`JAXPPO_DISTRIBUTED=1` makes `PPOTrainer` do it); the mesh then spans all processes' devices,
every process feeds the same global batch (`shard_batch` takes its own devices' rows) and reads
arrays back whole with `to_host` (rows on other processes' devices all-gathered).
"""

from __future__ import annotations

import functools
import re

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxppo.config.devices import resolve_placement  # a pure config rule; also importable from here

DATA, FSDP = "data", "fsdp"
BATCH_AXES = (DATA, FSDP)

# (regex on the "a.b.c" path of a leaf, dimension to split over fsdp; None = replicate)
PARTITION_RULES: list[tuple[str, int | None]] = [
    (r"(^|\.)(embed|pos_embed)\.embedding", 0),
    (r"\.(qkv|fc_in)\.kernel", 1),
    (r"\.(out|fc_out)\.kernel", 0),
    (r"(^|\.)lm_head\.kernel", 1),
    (r"(^|\.)score\.kernel", None),
    (r"(norm|bias|scale)", None),
]


def make_mesh(data: int = 1, fsdp: int = -1, devices=None) -> Mesh:
    """A 2-D mesh (data, fsdp); -1 takes the devices left over. data * fsdp must use them all."""
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if data == -1 and fsdp == -1:
        raise ValueError("only one of data and fsdp can be -1")
    if data == -1:
        data = n // fsdp
    if fsdp == -1:
        fsdp = n // data
    if data * fsdp != n:
        raise ValueError(f"mesh data={data} x fsdp={fsdp} does not use the {n} devices")
    return Mesh(np.asarray(devices).reshape(data, fsdp), (DATA, FSDP))


def make_meshes(data: int, fsdp: int, placement: str, devices=None) -> tuple[Mesh, Mesh]:
    """(policy mesh, critic mesh): the same mesh twice when colocated; with "separate" the first
    half of the devices for the policy (and the reference and reward models), the second half for
    the critic, each shaped data x fsdp."""
    devices = list(jax.devices() if devices is None else devices)
    if resolve_placement(placement, len(devices), devices[0].platform, jax.process_count()) != "separate":
        mesh = make_mesh(data, fsdp, devices)
        return mesh, mesh
    half = len(devices) // 2
    return make_mesh(data, fsdp, devices[:half]), make_mesh(data, fsdp, devices[half:])


def path_str(path) -> str:
    """'policy.layers.0.attn.qkv.kernel.value' for a pytree key path."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return ".".join(parts)


def spec_for(path: str, shape: tuple[int, ...], fsdp_size: int) -> P:
    """The PartitionSpec the rules give a leaf of this path and shape."""
    if len(shape) == 0 or fsdp_size == 1:
        return P()
    for pattern, dim in PARTITION_RULES:
        if re.search(pattern, path):
            if dim is None or dim >= len(shape) or shape[dim] % fsdp_size:
                return P()
            spec = [None] * len(shape)
            spec[dim] = FSDP
            return P(*spec)
    return P()


def tree_shardings(tree, mesh: Mesh):
    """NamedShardings for every leaf of a params / optimiser-state / TrainState pytree."""
    fsdp_size = mesh.shape[FSDP]

    def one(path, leaf):
        shape = tuple(getattr(leaf, "shape", ()))
        return NamedSharding(mesh, spec_for(path_str(path), shape, fsdp_size))

    return jax.tree_util.tree_map_with_path(one, tree)


def shard_tree(tree, mesh: Mesh):
    return jax.device_put(tree, tree_shardings(tree, mesh))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def shard_batch(x, mesh: Mesh):
    """Split the leading (batch) axis over every device."""
    x = np.asarray(x) if not isinstance(x, jax.Array) else x
    n = mesh.devices.size
    if x.shape[0] % n:
        raise ValueError(f"batch of {x.shape[0]} rows does not split over {n} devices")
    if jax.process_count() == 1:
        return jax.device_put(x, batch_sharding(mesh, x.ndim))
    # several hosts: every process holds the same global batch and supplies its own devices' rows
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, batch_sharding(mesh, x.ndim), lambda idx: x[idx])


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def on_host(mesh: Mesh) -> bool:
    """True when `mesh` is made of CPU (host) devices."""
    return mesh.devices.flat[0].platform == "cpu"


def replicate(tree, mesh: Mesh):
    """`tree` whole on every device of `mesh` (FSDP shards all-gathered, leaves on other devices
    copied over): one program or transfer per call. Leaves already there come back as they are."""
    leaves = jax.tree.leaves(tree)
    target = replicated(mesh)
    if all(x.sharding.is_equivalent_to(target, x.ndim) for x in leaves):
        return tree
    devices = set(mesh.devices.flat)
    if all(x.sharding.device_set == devices for x in leaves):
        return _gather_program(mesh)(tree)        # the same devices: an all-gather (spans hosts)
    return jax.device_put(tree, target)           # other devices (one process: placement separate)


@functools.cache
def _gather_program(mesh: Mesh):
    """A compiled identity whose outputs are replicated on `mesh` (one per mesh and tree shape)."""
    return jax.jit(lambda tree: tree, out_shardings=replicated(mesh))


def to_host(tree):
    """NumPy copies of a pytree of arrays, whole on every process. One process: `jax.device_get`.
    Several: an array with rows (or FSDP shards) on other processes' devices is all-gathered
    (`multihost_utils.process_allgather`, a collective: every process calls it, in one order);
    a replicated one is read from a local copy."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    def one(x):
        if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
            return np.asarray(x)
        return multihost_utils.process_allgather(x, tiled=True)

    return jax.tree.map(one, tree)
