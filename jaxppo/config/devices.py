"""What a config asks of the devices: `resolve_placement` decides where the critic trains, and
`check_devices` refuses a mesh or batch size that does not fit the devices, before any model loads.
Both take plain numbers (device count, platform name, process count), never JAX objects, so the
config layer stays free of JAX; `jaxppo.engine.mesh` builds the meshes from the same rule."""

from __future__ import annotations

from jaxppo.config.sections import PPOConfig
from jaxppo.errors import ConfigError


def resolve_placement(placement: str, num_devices: int, platform: str, num_processes: int = 1) -> str:
    """`train.placement` -> "colocated" or "separate". "auto" is separate on one CPU process with
    an even number >= 2 of devices (XLA:CPU runs one program's operations one at a time, so the
    policy's and the critic's programs only share the cores when they run on different devices),
    else colocated (an accelerator is kept busy by one model's kernels; FSDP over all of them)."""
    if placement != "auto":
        return placement
    cpu = platform == "cpu" and num_processes == 1
    return "separate" if cpu and num_devices >= 2 and num_devices % 2 == 0 else "colocated"


def check_devices(config: PPOConfig, num_devices: int, platform: str = "cpu", num_processes: int = 1) -> None:
    """Raises ConfigError unless the device mesh and the batch sizes fit `num_devices` devices.

    With `train.placement` separate the devices split into two halves (policy, critic), and each
    half gets the mesh. The mesh (train.mesh_data x train.mesh_fsdp, -1 = the devices left over)
    must use every device of its half, and each batch is split evenly over them: train.batch_size
    and train.eval_batch_size must be multiples of that count. Called by `PPOTrainer` before it
    loads any model.
    """
    t = config.train
    if t.placement == "separate" and (num_devices < 2 or num_devices % 2):
        raise ConfigError(f"train.placement=separate needs an even number of devices >= 2, found {num_devices} "
                          "(on a CPU: XLA_FLAGS=--xla_force_host_platform_device_count=2)", keys=("train.placement",))
    separate = (not config.algo.critic_free
                and resolve_placement(t.placement, num_devices, platform, num_processes) == "separate")
    if separate and num_processes > 1:
        raise ConfigError(f"train.placement={t.placement} puts the critic on devices of its own, which is not "
                          f"supported across {num_processes} processes: use train.placement=colocated",
                          keys=("train.placement",))
    n = int(num_devices) // (2 if separate else 1)
    per_model = " per model, train.placement separate" if separate else ""
    data, fsdp = t.mesh_data, t.mesh_fsdp
    keys = ("train.mesh_data", "train.mesh_fsdp")
    for key, value in zip(keys, (data, fsdp)):
        if value == 0:
            raise ConfigError(f"{key}=0: expected a device count >= 1, or -1 for the devices left over", keys=(key,))
    if data == -1 and fsdp == -1:
        raise ConfigError("train.mesh_data=-1 and train.mesh_fsdp=-1: at most one axis can take the devices "
                          "left over", keys=keys)
    used = data * fsdp if -1 not in (data, fsdp) else max(data, fsdp)
    if (-1 in (data, fsdp) and n % used) or (-1 not in (data, fsdp) and used != n):
        raise ConfigError(f"train.mesh_data={data} x train.mesh_fsdp={fsdp} does not fit the {n} device(s)"
                          f"{per_model}: the mesh must use them all", keys=keys)
    if t.batch_size % n:
        raise ConfigError(f"train.batch_size={t.batch_size} is not divisible by the number of devices ({n}{per_model}): "
                          "each device takes an equal share of every batch", keys=("train.batch_size",))
    if t.eval_batch_size is not None and t.eval_batch_size % n:
        raise ConfigError(f"train.eval_batch_size={t.eval_batch_size} is not divisible by the number of devices "
                          f"({n}{per_model}): each device takes an equal share of every batch",
                          keys=("train.eval_batch_size",))
