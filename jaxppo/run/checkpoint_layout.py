"""Reading a checkpoint's state back: restore target, unpacking, fit check and read errors.

`jaxppo.run.checkpoint` packs every small replicated leaf of a `TrainState` into one flat array per
dtype and writes a `layout/` JSON that says where each leaf lives (packed group + offset, or its
own array). This module holds the other half, which `Checkpointer.restore` uses:

  _abstract          restore targets with this process's shardings
  _check_compatible  the saved layout against the model, naming the first leaf that differs
  _restore_target    the abstract arrays orbax reads (packed groups, single leaves)
  _unpack            the model's leaves sliced back out of the packed groups
  _key_tail          the trailing dims of a typed PRNG key's raw data (the packing uses it too)

and the errors a restore raises: `CheckpointError`, `_UnreadableCheckpoint` (with `_one_line`
for their messages). `jaxppo.run.checkpoint` re-exports every name here, so it stays the one import.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxppo.errors import JaxppoError

__all__ = ["CheckpointError"]


class CheckpointError(JaxppoError, ValueError):
    """A checkpoint that is missing, unreadable, or made for a different model."""


class _UnreadableCheckpoint(CheckpointError):
    """A step folder that exists but cannot be read; `restore(None, ...)` falls back past it."""


def _abstract(tree):
    """ShapeDtypeStruct leaves with a sharding, so arrays restore onto this process's devices
    rather than onto the devices named in the checkpoint (which may not exist here)."""
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])

    def leaf(x):
        if isinstance(x, jax.ShapeDtypeStruct):
            if x.sharding is not None:
                return x
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=default, weak_type=x.weak_type)
        if isinstance(x, jax.Array):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        if isinstance(x, (np.ndarray, np.generic, int, float, bool)):   # restored as arrays
            x = np.asarray(x)
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=default)
        return x

    return jax.tree.map(leaf, tree)


def _restore_target(layout, wanted):
    """Abstract arrays for orbax: packed groups on one device of this process, single leaves with
    the model's shardings."""
    leaves = layout["leaves"]
    by_name = dict(wanted)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    sizes, singles = {}, {}
    for e in leaves:
        if "group" in e:
            sizes[e["group"]] = max(sizes.get(e["group"], 0), e["offset"] + int(np.prod(e["shape"] + _key_tail(e))))
        else:
            want = by_name[e["name"]]
            dtype = jnp.uint32 if "key_impl" in e else want.dtype
            singles[e["index"]] = jax.ShapeDtypeStruct(tuple(e["shape"]) + tuple(_key_tail(e)), dtype,
                                                       sharding=want.sharding)
    return {"packed": {g: jax.ShapeDtypeStruct((n,), jnp.dtype(g), sharding=device) for g, n in sizes.items()},
            "leaves": [singles[i] for i in range(len(singles))]}


def _key_tail(entry) -> list:
    """The trailing dims of a typed key's raw data ([2] for threefry); [] for other leaves."""
    if "key_impl" not in entry:
        return []
    return list(jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0, impl=entry["key_impl"]))).shape)


def _unpack(arrays, layout, wanted) -> list:
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


def _check_compatible(saved: list, wanted: list, where: Path):
    """Raises CheckpointError naming the first leaf whose name, shape or dtype differ."""
    head = f"checkpoint {where} does not fit this model"
    entries = {e["name"]: e for e in saved}
    for name, want in wanted:
        got = entries.get(name)
        if got is None:
            raise CheckpointError(f"{head}: {name} is in the model but not in the checkpoint")
        want_shape, got_shape = tuple(want.shape), tuple(got["shape"])
        if want_shape != got_shape:
            raise CheckpointError(f"{head}: {name} has shape {got_shape} in the checkpoint "
                                  f"but {want_shape} in the model")
        if str(want.dtype) != got["dtype"]:
            raise CheckpointError(f"{head}: {name} has dtype {got['dtype']} in the checkpoint "
                                  f"but {want.dtype} in the model")
    names = {name for name, _ in wanted}
    for e in saved:
        if e["name"] not in names:
            raise CheckpointError(f"{head}: {e['name']} is in the checkpoint but not in the model")


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200] if text else ''}"
