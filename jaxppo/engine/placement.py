"""Where the models live: the policy's mesh and the critic's, and what crosses between them.

`train.placement`: "colocated" puts every model on one (data, fsdp) mesh over all devices;
"separate" gives the critic and its optimiser state half of the devices, so its programs run
beside the policy's (XLA:CPU runs one program's operations one at a time: on a CPU this is what
puts two cores to work on the two models at once). Only batch rows and a few scalars cross
between the halves; the parameters never do. `Placement` alone knows which it is.

On a CPU, sampling uses every device whatever the placement (`sample_mesh`, `to_sampler`): the
rollout's rows split over all of them, each with a whole replica of the policy's parameters, gathered
(colocated, FSDP) or copied (separate: to the critic's half) once per rollout, before the decode
loop, so no decode step all-gathers parameters. On a CPU a batch too small to gain from it is
sampled on the first device alone (`sampling_devices`). Accelerators sample on the policy's mesh
with its parameters as they are. The sampled rows then move to the
policy's mesh (`from_sampler`) and from there to the critic's (`to_critic`). The tokens do not
depend on the devices that ran them: JAX's random bits (threefry, partitionable) are the same
however the rows are split.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
from jax.sharding import Mesh

from jaxppo.engine.mesh import batch_sharding, make_mesh, make_meshes, on_host, replicate, replicated, tree_shardings


@dataclasses.dataclass(frozen=True)
class Placement:
    policy_mesh: Mesh          # the policy, its optimiser state, the reference and reward models
    critic_mesh: Mesh          # the critic and its optimiser state (the same mesh when colocated)

    @classmethod
    def from_config(cls, config, devices=None) -> Placement:
        """The meshes `train.mesh_data` x `train.mesh_fsdp` for `train.placement` (`make_meshes`);
        without a critic (the critic-free estimators) every model shares one mesh."""
        t = config.train
        placement = "colocated" if config.algo.critic_free else t.placement
        return cls(*make_meshes(t.mesh_data, t.mesh_fsdp, placement, devices))

    @property
    def separate(self) -> bool:
        """True when the critic has devices of its own."""
        return self.critic_mesh is not self.policy_mesh

    @functools.cached_property
    def devices(self) -> list:
        """Every device of the placement: the policy's, then the critic's when separate."""
        devices = list(self.policy_mesh.devices.flat)
        return devices + list(self.critic_mesh.devices.flat) if self.separate else devices

    def sample_mesh(self, prompts: int, generations: int = 1) -> Mesh:
        """Where a batch of `prompts` prompts (`generations` samples each) is sampled: the devices
        `sampling_devices` picks, one batch axis; the policy's mesh itself when it has those."""
        devices = sampling_devices(self.devices, list(self.policy_mesh.devices.flat), prompts, generations)
        if devices == list(self.policy_mesh.devices.flat):
            return self.policy_mesh
        return _row_mesh(tuple(devices))

    def to_sampler(self, params, prompt_ids, prompt_mask, key, base=None, generations: int = 1):
        """The sampling program's arguments, in this order, on `sample_mesh`: the policy's parameters
        whole on every device (gathered or copied once per call, not per decode step), the prompt
        rows split over the devices, the key replicated; `base` (LoRA's frozen base parameters, or
        None) the same way. Each call's copies live as long as the sampling program (a kept replica
        of a frozen base would cost a whole second base). On an accelerator the policy's mesh
        samples with its parameters as they are: gathering FSDP shards would undo their memory saving."""
        mesh = self.sample_mesh(prompt_ids.shape[0], generations)
        if mesh is self.policy_mesh and not on_host(mesh):
            return params, prompt_ids, prompt_mask, key, base
        if mesh is not self.policy_mesh:
            (prompt_ids, prompt_mask), key = self._put(mesh, (prompt_ids, prompt_mask), key)
        return replicate(params, mesh), prompt_ids, prompt_mask, key, None if base is None else replicate(base, mesh)

    def from_sampler(self, tree):
        """The sampling program's outputs (rows; a 0-d step count) onto the policy's mesh, where the
        scoring and the update read them; already there when sampled there."""
        return self._put(self.policy_mesh, tree, ())[0]

    def to_critic(self, rows=(), scalars=()):
        """Batch-row arrays (split over the batch axes) and scalars / keys (replicated) onto the
        critic's mesh; unchanged when colocated."""
        return self._put(self.critic_mesh, rows, scalars) if self.separate else (rows, scalars)

    def to_policy(self, rows=(), scalars=()):
        """The same onto the policy's mesh."""
        return self._put(self.policy_mesh, rows, scalars) if self.separate else (rows, scalars)

    @staticmethod
    def _put(mesh, rows, scalars):
        # a 0-d leaf among the rows (a sample output's step count) is replicated; an array already
        # where it is put comes back as it is
        rows = jax.tree.map(lambda x: jax.device_put(x, batch_sharding(mesh, x.ndim) if x.ndim else replicated(mesh)),
                            rows)
        return rows, jax.device_put(scalars, replicated(mesh))

    def pinned_shardings(self, params, opt_state, critic: bool):
        """The (params, optimiser state) shardings an update program pins its outputs to, or None
        on a one-device mesh (nothing to pin)."""
        mesh = self.critic_mesh if critic else self.policy_mesh
        if mesh.devices.size == 1:
            return None
        return tree_shardings(params, mesh), tree_shardings(opt_state, mesh)


# XLA:CPU (jax 0.10) runs a device's program on the process's intra-op thread pool, one thread per
# core, and hands the ops of a decode step that can run at once (the K and V cache writes, the
# residual adds, element-wise fusions it splits in two) to the other threads. With every
# core decoding for a device of its own, each hand-off waits for another device's op, and with
# few rows per device that costs more than the rows save: on 2 cores, 2 devices against 1 sample
# 16 rows 15 % slower, 32 rows 19 % faster, 64 rows 14 %, 128 rows 22 % (experiments/README.md).
MIN_ROWS_PER_HOST_DEVICE = 16


def sampling_devices(devices: list, policy_devices: list, prompts: int, generations: int = 1) -> list:
    """The devices `prompts` prompts (x `generations` decode rows each) are sampled on: all of
    `devices`, each with an equal share of the prompts; in one CPU process the first device alone
    when a share would be fewer than MIN_ROWS_PER_HOST_DEVICE decode rows; the policy's devices when
    the prompts do not split evenly over all of them (placement separate). On accelerators the
    policy's devices: an accelerator is kept busy by one model's kernels, and its parameters stay
    FSDP-sharded."""
    n = len(devices)
    if devices[0].platform != "cpu":
        return policy_devices
    if n > 1 and jax.process_count() == 1 \
            and prompts * generations < MIN_ROWS_PER_HOST_DEVICE * n:
        return devices[:1]
    return devices if prompts % n == 0 else policy_devices


@functools.cache
def _row_mesh(devices: tuple) -> Mesh:
    """A mesh of `devices` on the batch axes alone (the parameters replicated on it)."""
    return make_mesh(len(devices), 1, list(devices))
