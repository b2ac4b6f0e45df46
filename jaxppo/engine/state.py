"""The arrays an iteration carries: the trained state, the frozen parameters, a scored batch.

`TrainState` is what a checkpoint holds and the update donates; `Frozen` never changes;
`Experience` is one sampled and scored batch, `EvalOutput` what an evaluation batch returns.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import struct

from jaxppo.core import rewards as rw


@struct.dataclass
class TrainState:
    policy: Any               # nnx.State of the policy
    critic: Any               # nnx.State of the critic; None for the critic-free estimators
    policy_opt: Any           # optax state
    critic_opt: Any           # None without a critic
    kl: Any                   # rewards.KLControllerState
    reward_moments: Any       # rewards.RunningMoments
    rng: jax.Array            # base key, constant; per-iteration keys are fold_in(rng, step)
    step: jax.Array           # [] int32, completed iterations


@struct.dataclass
class Frozen:
    """Parameters that never change during training."""

    ref: Any                  # nnx.State of the reference policy (with LoRA: the base the adapters sit on)
    reward_model: Any         # nnx.State of the reward model, or None
    critic_base: Any = None   # with a LoRA critic: its frozen backbone (on the critic's devices), else None


@struct.dataclass
class Experience:
    tokens: jax.Array          # [B, P+R]
    attention_mask: jax.Array  # [B, P+R]
    response: jax.Array        # [B, R]
    mask: jax.Array            # [B, R]
    logprobs: jax.Array        # [B, R] sampler log-probs (temperature-scaled)
    ref_logprobs: jax.Array    # [B, R]
    values: jax.Array | None   # [B, R]; None without a critic
    rm_scores: jax.Array       # [B] reward-model score at the last response token (0 without one)
    num_steps: jax.Array       # [] decode steps run


@struct.dataclass
class EvalOutput:
    response: jax.Array        # [B, R]
    mask: jax.Array            # [B, R]
    kl: jax.Array              # [B] sum over the response of the per-token KL (ppo.kl_estimator)
    rm_scores: jax.Array       # [B] reward-model score (0 without one)


class ModelGraphs(NamedTuple):
    """The static NNX graphs the programs merge parameters into (`nnx.split(model)[0]`)."""

    policy: Any
    critic: Any                # None for the critic-free estimators
    ref: Any
    reward_model: Any          # None without a reward model
    lora: bool = False         # the policy's trained params are adapters over `Frozen.ref` (model.lora)
    critic_lora: bool = False  # the critic's are adapters (+ value head) over `Frozen.critic_base`

    def policy_base(self, frozen: Frozen):
        """What the policy's trained params are merged with: the frozen base with LoRA, else None."""
        return frozen.ref if self.lora else None

    def critic_base(self, frozen: Frozen):
        return frozen.critic_base if self.critic_lora else None


def init_train_state(policy_params, critic_params, txs, seed: int, kl_coef: float) -> TrainState:
    return TrainState(
        policy=policy_params, critic=critic_params,
        policy_opt=txs[0].init(policy_params),
        critic_opt=None if critic_params is None else txs[1].init(critic_params),
        kl=rw.KLControllerState(value=jnp.float32(kl_coef)),
        reward_moments=rw.init_running_moments(),
        rng=jax.random.PRNGKey(seed),   # raw uint32[2]: plain array, checkpoints as is
        step=jnp.int32(0),
    )
