"""From a scored batch to the update's batch, and from the update's sums to the metrics.

`prepare`: scores (reward model + functions) -> missing-EOS penalty, clip, running normalisation
-> `shape_rewards` (KL in the reward) -> `gae` -> whitened advantages: the `PPOBatch` both models
train on. `finish`: both models' optimiser statistics -> `IterationMetrics`, and the KL
controller and reward statistics, which follow an iteration only when every step counted.
`StepSettings.from_config` is the one mapping from the config to every static setting of an
iteration's programs.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxppo.core import rewards as rw
from jaxppo.core.gae import gae
from jaxppo.core.masked import masked_mean, masked_whiten
from jaxppo.engine.sampling import SamplingParams
from jaxppo.engine.state import Experience
from jaxppo.engine.update import PPOBatch, UpdateSettings, update_metrics


@dataclasses.dataclass(frozen=True)
class StepSettings:
    """Every static setting of an iteration's programs (hashable), from the config by `from_config`."""

    sampling: SamplingParams
    update: UpdateSettings
    gamma: float = 1.0
    lam: float = 0.95
    kl_estimator: str = "k1"
    adaptive_kl: tuple[float, int] | None = None    # (target, horizon)
    whiten_advantages: bool = True
    missing_eos_penalty: float | None = None
    reward_clip: float | None = None
    normalize_rewards: bool = False
    forward_batch_size: int | None = None           # micro-batch of the no-grad forwards
    plateau_metric: str | None = None               # objective/* key driving reduce-on-plateau
    plateau_sign: float = 1.0                       # -1 for mode "max" (optax minimises)

    @classmethod
    def from_config(cls, config, eos_token_ids: tuple[int, ...], pad_token_id: int) -> StepSettings:
        """The config's settings, with the stop tokens and pad id the loaded models give."""
        p, o = config.ppo, config.optim
        return cls(
            sampling=SamplingParams.from_config(config.rollout, eos_token_ids, pad_token_id),
            update=UpdateSettings.from_config(config),
            gamma=p.gamma, lam=p.lam, kl_estimator=p.kl_estimator,
            adaptive_kl=None if p.adaptive_kl is None else (p.adaptive_kl.target, p.adaptive_kl.horizon),
            whiten_advantages=p.whiten_advantages, missing_eos_penalty=config.rollout.missing_eos_penalty,
            reward_clip=config.reward.clip, normalize_rewards=config.reward.normalize,
            forward_batch_size=config.rollout.forward_batch_size,
            plateau_metric=o.plateau.metric if o.schedule == "plateau" else None,
            plateau_sign=-1.0 if o.plateau.mode == "max" else 1.0)


# ---------------------------------------------------------------------------- metrics


class RolloutStats(NamedTuple):
    """What `prepare` reports of the sampled batch and its rewards (TRL's names in `as_dict`)."""

    kl: jax.Array                      # mean over rows of the summed per-token KL
    entropy: jax.Array                 # mean over rows of -Σ log p (sampled tokens)
    non_score_reward: jax.Array        # mean of -kl_coef Σ kl
    rlhf_reward: jax.Array             # non_score_reward + score
    scores: jax.Array                  # mean raw score (reward model + functions)
    num_eos_tokens: jax.Array
    mean_values: jax.Array
    mean_returns: jax.Array
    response_length: jax.Array
    kl_coef: jax.Array
    scores_normalized: jax.Array | None   # with reward.normalize only

    def as_dict(self) -> dict:
        d = {"objective/kl": self.kl, "objective/entropy": self.entropy,
             "objective/non_score_reward": self.non_score_reward, "objective/rlhf_reward": self.rlhf_reward,
             "objective/scores": self.scores, "val/num_eos_tokens": self.num_eos_tokens,
             "val/mean_values": self.mean_values, "val/mean_returns": self.mean_returns,
             "response_length": self.response_length, "kl_coef": self.kl_coef}
        if self.scores_normalized is not None:
            d["objective/scores_normalized"] = self.scores_normalized
        return d


class PrepareAux(NamedTuple):
    """What `prepare` hands `finish`."""

    stats: RolloutStats
    moments: Any                       # the reward statistics after this batch
    kl_seq_mean: jax.Array             # for the adaptive KL controller
    batch_size: jax.Array


class IterationMetrics(NamedTuple):
    """One iteration's metrics, pulled to the host once; `as_dict` gives the logged names."""

    rollout: RolloutStats
    update: Any                        # update.UpdateMetrics
    lr: jax.Array
    lr_critic: jax.Array
    nonfinite: jax.Array               # 1.0 when an optimiser step of either model was skipped

    def as_dict(self) -> dict:
        return {**self.rollout.as_dict(), **self.update.as_dict(), "lr": self.lr, "lr_critic": self.lr_critic,
                "nonfinite": self.nonfinite}


def iteration_keys(rng, step):
    """(sampling key, permutation key) of iteration `step`."""
    return jax.random.split(jax.random.fold_in(rng, step))


def sampling_key(rng, step):
    return iteration_keys(rng, step)[0]


def has_eos(response, mask, eos_token_ids: tuple[int, ...]):
    """[B] bool: the response holds one of `eos_token_ids` among its valid tokens."""
    if not eos_token_ids:
        return jnp.zeros(response.shape[:1], bool)
    eos = jnp.isin(response, jnp.asarray(eos_token_ids, response.dtype)) & (mask > 0)
    return eos.any(-1)


def prepare(s: StepSettings, small, exp: Experience, fn_scores):
    """Scores -> shaped rewards -> GAE -> (whitened) advantages: the PPOBatch both models train
    on, the permutation key, the plateau value (None without a plateau schedule), and PrepareAux."""
    kl_state, moments, rng, step = small
    mask = exp.mask
    scores = exp.rm_scores + fn_scores.astype(jnp.float32)                # [B]
    raw_scores = scores
    eos = has_eos(exp.response, mask, s.sampling.eos_token_ids)
    if s.missing_eos_penalty is not None:
        scores = rw.missing_eos_penalty(scores, eos, s.missing_eos_penalty)
    if s.reward_clip:
        scores = rw.clip_rewards(scores, s.reward_clip)
    if s.normalize_rewards:
        moments = rw.update_running_moments(moments, scores)
        scores = rw.normalize_scores(moments, scores)

    kl_coef = kl_state.value
    rewards, kl = rw.shape_rewards(scores, exp.logprobs, exp.ref_logprobs, mask, kl_coef, s.kl_estimator)
    advantages, returns = gae(rewards, exp.values, mask, s.gamma, s.lam)
    if s.whiten_advantages:
        advantages = masked_whiten(advantages, mask) * mask

    batch = PPOBatch(tokens=exp.tokens, attention_mask=exp.attention_mask, response=exp.response,
                     mask=mask, old_logprobs=exp.logprobs, old_values=exp.values,
                     advantages=advantages, returns=returns)
    kl_seq = kl.sum(-1)                                                    # [B] per-sequence KL
    non_score = (-kl_coef * kl).sum(-1)
    stats = RolloutStats(
        kl=kl_seq.mean(), entropy=(-exp.logprobs * mask).sum(-1).mean(), non_score_reward=non_score.mean(),
        rlhf_reward=(non_score + scores).mean(), scores=raw_scores.mean(),
        num_eos_tokens=eos.sum().astype(jnp.float32), mean_values=masked_mean(exp.values, mask),
        mean_returns=masked_mean(returns, mask), response_length=mask.sum(-1).mean(), kl_coef=kl_coef,
        scores_normalized=scores.mean() if s.normalize_rewards else None)
    plateau_value = None
    if s.plateau_metric is not None:
        plateau_value = s.plateau_sign * stats.as_dict()[s.plateau_metric]
    aux = PrepareAux(stats=stats, moments=moments, kl_seq_mean=kl_seq.mean(),
                     batch_size=jnp.float32(exp.tokens.shape[0]))
    return batch, iteration_keys(rng, step)[1], plateau_value, aux


def finish(s: StepSettings, small, aux: PrepareAux, policy_out, critic_out):
    """Metrics, and the KL controller and reward statistics, which follow the iteration only when
    every optimiser step of both models counted."""
    kl_state, old_moments, _, _ = small
    (pstats, plr), (cstats, clr) = policy_out, critic_out
    upd = update_metrics(pstats, cstats)
    if s.adaptive_kl is not None:
        target, horizon = s.adaptive_kl
        new_kl = rw.adaptive_kl_update(kl_state, aux.kl_seq_mean, aux.batch_size, target, horizon)
    else:
        new_kl = kl_state
    # Skipped optimiser steps left the weights and Adam moments alone (no copy of them is kept to
    # restore). The small state follows the whole iteration: kept only when every step counted.
    finite = (upd.nonfinite_steps == 0) & _all_finite((upd.policy_loss, upd.value_loss))
    kl, moments = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                               (new_kl, aux.moments), (kl_state, old_moments))
    metrics = IterationMetrics(rollout=aux.stats, update=upd, lr=plr, lr_critic=clr,
                               nonfinite=1.0 - finite.astype(jnp.float32))
    return kl, moments, metrics


def _all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
              if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)
