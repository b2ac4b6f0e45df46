"""Where the models live: the policy's mesh and the critic's, and what crosses between them.

`train.placement`: "colocated" puts every model on one (data, fsdp) mesh over all devices;
"separate" gives the critic and its optimiser state half of the devices, so its programs run
beside the policy's (XLA:CPU runs one program's operations one at a time: on a CPU this is what
puts two cores to work on the two models at once). Only batch rows and a few scalars cross
between the halves; the parameters never do. `Placement` alone knows which it is.
"""

from __future__ import annotations

import dataclasses

import jax
from jax.sharding import Mesh

from jaxppo.engine.mesh import batch_sharding, make_meshes, replicated, tree_shardings


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

    def to_critic(self, rows=(), scalars=()):
        """Batch-row arrays (split over the batch axes) and scalars / keys (replicated) onto the
        critic's mesh; unchanged when colocated."""
        return self._move(self.critic_mesh, rows, scalars)

    def to_policy(self, rows=(), scalars=()):
        """The same onto the policy's mesh."""
        return self._move(self.policy_mesh, rows, scalars)

    def _move(self, mesh, rows, scalars):
        if not self.separate:
            return rows, scalars
        rows = jax.tree.map(lambda x: jax.device_put(x, batch_sharding(mesh, x.ndim)), rows)
        return rows, jax.device_put(scalars, replicated(mesh))

    def pinned_shardings(self, params, opt_state, critic: bool):
        """The (params, optimiser state) shardings an update program pins its outputs to, or None
        on a one-device mesh (nothing to pin)."""
        mesh = self.critic_mesh if critic else self.policy_mesh
        if mesh.devices.size == 1:
            return None
        return tree_shardings(params, mesh), tree_shardings(opt_state, mesh)
