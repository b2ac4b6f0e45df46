"""The packed on-disk layout of a state's leaves: every small fully replicated leaf (biases, norms,
optimiser moments of small models, counters, keys) is concatenated into one flat array per dtype;
large or sharded leaves stay arrays of their own. A JSON layout says where each leaf lives.

    arrays, layout = pack(state)                        # orbax saves `arrays`; `layout` as JSON
    problem = mismatch(layout["leaves"], wanted)        # None when the saved leaves fit the model
    arrays = <orbax restore into restore_target(layout, wanted)>
    leaves = unpack(arrays, layout, wanted)             # the model's leaves, in `wanted` order

`wanted` lists the model's leaves as `(name, abstract leaf with its sharding)` in tree order, named
by `jaxppo.engine.mesh.path_str` ("policy.layers.0.attn.qkv.kernel.value").

Why packed: orbax's cost is per array (a PPO state has ~200 leaves: ~0.66 s of CPU per save for a
tiny model, against ~0.07 s for the same bytes in three arrays), and a save every few steps on a
small model would otherwise cost a large share of the training time. Leaves over `max_elements`
and sharded leaves are not packed: they are written as orbax writes any array.

Format 1:
  layout  {"format": 1, "leaves": [entry, ...]} in tree order; an entry holds the leaf's "name",
          "shape", "dtype", and either "group" (the dtype of its packed array) + "offset", or
          "index" (its position among the unpacked arrays); a typed PRNG key also has "key_impl"
          and is stored as its raw uint32 key data (shape + the impl's trailing dims)
  arrays  {"packed": {group: flat array}, "leaves": [unpacked arrays in index order]}
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxppo.engine.mesh import path_str

PACK_MAX_ELEMENTS = 1 << 20   # default: leaves up to this size (and fully replicated) are packed

_PLANS: dict = {}   # (max_elements, treedef, leaf avals + shardings) -> packing plan; a run's state keeps one


def pack(state, max_elements: int = PACK_MAX_ELEMENTS, buffers: dict | None = None) -> tuple[dict, dict]:
    """(arrays to save, JSON layout) of a pytree of arrays. Small fully replicated leaves are copied
    to the host in one transfer and concatenated per dtype there (what orbax would copy anyway); big
    or sharded ones stay device arrays that orbax writes shard by shard.

    buffers: a dict the caller keeps between saves; the packed arrays are written into the host
    arrays it holds (made on the first call, remade when the state's structure changes) instead of
    fresh ones. A fresh array of tens of MB is fresh pages from the kernel, whose first touch cost
    ~0.15 s of a tiny PPO state's save; the caller must not pack again while a save still reads them."""
    leaves, treedef = jax.tree.flatten(state)
    leaves = [x if isinstance(x, jax.Array) else jnp.asarray(x) for x in leaves]
    layout, groups, singles, keys = _plan(leaves, treedef, state, max_elements)
    for i in keys:
        leaves[i] = jax.random.key_data(leaves[i])
    order = [i for idx in groups.values() for i in idx]
    host = dict(zip(order, jax.device_get([leaves[i] for i in order])))
    packed = {}
    for g, idx in groups.items():
        parts = [np.ravel(host[i]) for i in idx]
        n = sum(p.size for p in parts)
        if buffers is None:
            packed[g] = np.concatenate(parts)
            continue
        out = buffers.get(g)
        if out is None or out.shape != (n,) or out.dtype != parts[0].dtype:
            out = buffers[g] = np.empty(n, parts[0].dtype)
        packed[g] = np.concatenate(parts, out=out)
    return {"packed": packed, "leaves": [leaves[i] for i in singles]}, layout


def _plan(leaves, treedef, state, max_elements: int):
    """The layout and grouping of a state, computed once per structure (the per-leaf Python work
    of a save is otherwise a noticeable share of its cost)."""
    key = (max_elements, treedef, tuple((x.shape, x.dtype, x.sharding) for x in leaves))
    plan = _PLANS.get(key)
    if plan is not None:
        return plan
    layout, groups, singles, keys, sizes = [], {}, [], [], {}
    paths = [path for path, _ in jax.tree_util.tree_flatten_with_path(state)[0]]
    for i, (path, x) in enumerate(zip(paths, leaves)):
        entry = {"name": path_str(path), "shape": list(x.shape), "dtype": str(x.dtype)}
        size = x.size
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            entry["key_impl"] = str(jax.random.key_impl(x))   # stored as its raw key data
            keys.append(i)
            size *= int(np.prod(_key_tail(entry)))
        if size <= max_elements and x.sharding.is_fully_replicated:
            g = str(jax.random.key_data(x).dtype if i in keys else x.dtype)
            entry.update(group=g, offset=sizes.get(g, 0))
            sizes[g] = entry["offset"] + size
            groups.setdefault(g, []).append(i)
        else:
            entry["index"] = len(singles)
            singles.append(i)
        layout.append(entry)
    if len(_PLANS) > 8:
        _PLANS.clear()
    plan = _PLANS[key] = ({"format": 1, "leaves": layout}, groups, singles, keys)
    return plan


def _key_tail(entry) -> list:
    """The trailing dims of a typed key's raw data ([2] for threefry); [] for other leaves."""
    if "key_impl" not in entry:
        return []
    return list(jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0, impl=entry["key_impl"]))).shape)


def mismatch(saved: list, wanted: list[tuple[str, Any]]) -> str | None:
    """The first difference between the saved layout entries and the model's leaves ("policy.x has
    shape (3,) in the checkpoint but (4,) in the model"), or None when every name, shape and dtype
    agree."""
    entries = {e["name"]: e for e in saved}
    for name, want in wanted:
        got = entries.get(name)
        if got is None:
            return f"{name} is in the model but not in the checkpoint"
        want_shape, got_shape = tuple(want.shape), tuple(got["shape"])
        if want_shape != got_shape:
            return f"{name} has shape {got_shape} in the checkpoint but {want_shape} in the model"
        if str(want.dtype) != got["dtype"]:
            return f"{name} has dtype {got['dtype']} in the checkpoint but {want.dtype} in the model"
    names = {name for name, _ in wanted}
    for e in saved:
        if e["name"] not in names:
            return f"{e['name']} is in the checkpoint but not in the model"
    return None


def restore_target(layout: dict, wanted: list[tuple[str, Any]]) -> dict:
    """The abstract arrays orbax reads: packed groups on one device of this process, the other
    leaves with the model's shardings."""
    by_name = dict(wanted)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    sizes, singles = {}, {}
    for e in layout["leaves"]:
        if "group" in e:
            sizes[e["group"]] = max(sizes.get(e["group"], 0), e["offset"] + int(np.prod(e["shape"] + _key_tail(e))))
        else:
            want = by_name[e["name"]]
            dtype = jnp.uint32 if "key_impl" in e else want.dtype
            singles[e["index"]] = jax.ShapeDtypeStruct(tuple(e["shape"]) + tuple(_key_tail(e)), dtype,
                                                       sharding=want.sharding)
    return {"packed": {g: jax.ShapeDtypeStruct((n,), jnp.dtype(g), sharding=device) for g, n in sizes.items()},
            "leaves": [singles[i] for i in range(len(singles))]}


def unpack(arrays: dict, layout: dict, wanted: list[tuple[str, Any]]) -> list:
    """The model's leaves, in `wanted` order, placed with their target shardings."""
    packed = {g: np.asarray(a) for g, a in arrays["packed"].items()}   # small: one host copy, then slices
    entries = {e["name"]: e for e in layout["leaves"]}
    out = []
    for name, want in wanted:
        e = entries[name]
        shape = tuple(e["shape"]) + tuple(_key_tail(e))
        if "group" in e:
            n = int(np.prod(shape))
            x = jax.device_put(packed[e["group"]][e["offset"]:e["offset"] + n].reshape(shape), want.sharding)
        else:
            x = arrays["leaves"][e["index"]]
        if "key_impl" in e:
            x = jax.random.wrap_key_data(x, impl=e["key_impl"])
        out.append(x)
    return out
