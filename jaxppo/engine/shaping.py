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

from jaxppo.core import advantages as adv
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
    kl_in: str = "reward"                           # reward: a per-token penalty; loss: in the policy loss
    advantage: str = "gae"                          # gae | grpo | rloo | reinforce_pp | reinforce_pp_baseline
    scale_rewards: str = "group"                    # grpo's std: group | batch | none
    overlong: tuple[int, int, float] | None = None  # (max_length, buffer, penalty)
    adaptive_kl: tuple[float, int] | None = None    # (target, horizon)
    whiten_advantages: bool = True
    missing_eos_penalty: float | None = None
    reward_clip: float | None = None
    normalize_rewards: bool = False
    forward_batch_size: int | None = None           # micro-batch of the no-grad forwards
    plateau_metric: str | None = None               # objective/* key driving reduce-on-plateau
    plateau_sign: float = 1.0                       # -1 for mode "max" (optax minimises)

    @property
    def group_size(self) -> int:
        return self.sampling.num_generations

    @property
    def critic_free(self) -> bool:
        return self.advantage != "gae"

    @classmethod
    def from_config(cls, config, eos_token_ids: tuple[int, ...], pad_token_id: int) -> StepSettings:
        """The config's settings, with the stop tokens and pad id the loaded models give."""
        p, o = config.ppo, config.optim
        return cls(
            sampling=SamplingParams.from_config(config.rollout, eos_token_ids, pad_token_id),
            update=UpdateSettings.from_config(config),
            gamma=p.gamma, lam=p.lam, kl_estimator=config.kl_estimator, kl_in=p.kl_in,
            advantage=config.algo.advantage, scale_rewards=config.algo.scale_rewards,
            overlong=None if config.reward.overlong is None else
            (config.reward.overlong.max_length, config.reward.overlong.buffer, config.reward.overlong.penalty),
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
    mean_values: jax.Array | None      # without a critic: None
    mean_returns: jax.Array | None
    response_length: jax.Array
    kl_coef: jax.Array
    scores_normalized: jax.Array | None   # with reward.normalize only
    group: dict | None = None          # G > 1 / critic-free: TRL GRPO's names (reward, reward_std, ...)

    def as_dict(self) -> dict:
        d = {"objective/kl": self.kl, "objective/entropy": self.entropy,
             "objective/non_score_reward": self.non_score_reward, "objective/rlhf_reward": self.rlhf_reward,
             "objective/scores": self.scores, "val/num_eos_tokens": self.num_eos_tokens,
             "val/mean_values": self.mean_values, "val/mean_returns": self.mean_returns,
             "response_length": self.response_length, "kl_coef": self.kl_coef,
             "objective/scores_normalized": self.scores_normalized, **(self.group or {})}
        return {k: v for k, v in d.items() if v is not None}


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
        d = {**self.rollout.as_dict(), **self.update.as_dict(), "lr": self.lr, "lr_critic": self.lr_critic,
             "nonfinite": self.nonfinite}
        if self.rollout.group is not None:
            d["entropy"] = self.update.entropy          # TRL GRPO's: the training forward's mean entropy
        return {k: v for k, v in d.items() if v is not None}


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


def gae_advantages(s: StepSettings, scores, exp: Experience, kl_coef):
    """PPO: the KL penalty per token in the reward, the score at the last token, GAE over the
    critic's values, whitened: (advantages, returns, per-token KL)."""
    rewards, kl = rw.shape_rewards(scores, exp.logprobs, exp.ref_logprobs, exp.mask, kl_coef, s.kl_estimator)
    advantages, returns = gae(rewards, exp.values, exp.mask, s.gamma, s.lam)
    if s.whiten_advantages:
        advantages = masked_whiten(advantages, exp.mask) * exp.mask
    return advantages, returns, kl


def sequence_advantages(estimate):
    """A critic-free estimator of one advantage per response (`estimate(s, rewards [N]) -> [N]`),
    broadcast over its valid tokens; with the KL in the reward, the reward is the score minus
    kl_coef x the response's summed KL (as OpenRLHF's RLOO)."""

    def advantages(s: StepSettings, scores, exp: Experience, kl_coef):
        kl = rw.kl_per_token(exp.logprobs, exp.ref_logprobs, s.kl_estimator) * exp.mask
        rewards = scores - kl_coef * kl.sum(-1) if s.kl_in == "reward" else scores
        return adv.broadcast_to_tokens(estimate(s, rewards), exp.mask), None, kl

    return advantages


def reinforce_pp_advantages(baseline: bool):
    """REINFORCE++ (OpenRLHF): per-token rewards (the score at the last token, the KL penalty per
    token when it is in the reward), discounted returns whitened over the batch; with `baseline`
    the score first loses its group's mean (REINFORCE++-baseline)."""

    def advantages(s: StepSettings, scores, exp: Experience, kl_coef):
        if baseline:
            scores = adv.group_baseline(scores, s.group_size)
        coef = kl_coef if s.kl_in == "reward" else 0.0
        rewards, kl = rw.shape_rewards(scores, exp.logprobs, exp.ref_logprobs, exp.mask, coef, s.kl_estimator)
        advantages, _ = adv.reinforce_pp(rewards, exp.mask, s.gamma)
        return advantages, None, kl

    return advantages


# algo.advantage -> (settings, scores [N], Experience, kl coefficient) -> (advantages, returns or None, kl)
ESTIMATORS = {
    "gae": gae_advantages,
    "grpo": sequence_advantages(lambda s, r: adv.grpo(r, s.group_size, scale=s.scale_rewards)),
    "rloo": sequence_advantages(lambda s, r: adv.rloo(r, s.group_size)),
    "reinforce_pp": reinforce_pp_advantages(baseline=False),
    "reinforce_pp_baseline": reinforce_pp_advantages(baseline=True),
}


def group_metrics(scores, mask, kl, group_size: int) -> dict:
    """TRL GRPO's rollout metrics: reward, reward_std (mean over groups of the group's std, ddof 1),
    frac_reward_zero_std, completions/mean_length, kl (mean per valid token)."""
    out = {"reward": scores.mean(), "completions/mean_length": mask.sum(-1).mean(), "kl": masked_mean(kl, mask)}
    if group_size > 1:
        std, frac_zero_std = adv.group_stats(scores, group_size)                  # [N / G], []
        out.update({"reward_std": std.mean(), "frac_reward_zero_std": frac_zero_std})
    return out


def prepare(s: StepSettings, small, exp: Experience, fn_scores):
    """Scores -> (missing-EOS penalty, overlong punishment, clip, normalisation) -> advantages by
    `s.advantage` (`ESTIMATORS`): the PPOBatch the models train on, the permutation key, the
    plateau value (None without a plateau schedule), and PrepareAux."""
    kl_state, moments, rng, step = small
    mask = exp.mask
    scores = exp.rm_scores + fn_scores.astype(jnp.float32)                # [B]
    raw_scores = scores
    eos = has_eos(exp.response, mask, s.sampling.eos_token_ids)
    if s.missing_eos_penalty is not None:
        scores = rw.missing_eos_penalty(scores, eos, s.missing_eos_penalty)
    if s.overlong is not None:
        scores = scores + rw.overlong_penalty(mask.sum(-1), *s.overlong)
    if s.reward_clip:
        scores = rw.clip_rewards(scores, s.reward_clip)
    if s.normalize_rewards:
        moments = rw.update_running_moments(moments, scores)
        scores = rw.normalize_scores(moments, scores)

    kl_coef = kl_state.value
    advantages, returns, kl = ESTIMATORS[s.advantage](s, scores, exp, kl_coef)
    batch = PPOBatch(tokens=exp.tokens, attention_mask=exp.attention_mask, response=exp.response,
                     mask=mask, old_logprobs=exp.logprobs, old_values=exp.values,
                     advantages=advantages, returns=returns,
                     ref_logprobs=exp.ref_logprobs if s.kl_in == "loss" else None)
    kl_seq = kl.sum(-1)                                                    # [B] per-sequence KL
    non_score = (-kl_coef * kl).sum(-1) if s.kl_in == "reward" else jnp.zeros_like(kl_seq)
    stats = RolloutStats(
        kl=kl_seq.mean(), entropy=(-exp.logprobs * mask).sum(-1).mean(), non_score_reward=non_score.mean(),
        rlhf_reward=(non_score + scores).mean(), scores=raw_scores.mean(),
        num_eos_tokens=eos.sum().astype(jnp.float32),
        mean_values=None if exp.values is None else masked_mean(exp.values, mask),
        mean_returns=None if returns is None else masked_mean(returns, mask), response_length=mask.sum(-1).mean(),
        kl_coef=kl_coef, scores_normalized=scores.mean() if s.normalize_rewards else None,
        group=group_metrics(raw_scores, mask, kl, s.group_size) if s.critic_free or s.group_size > 1 else None)
    plateau_value = None
    if s.plateau_metric is not None:
        plateau_value = s.plateau_sign * stats.as_dict()[s.plateau_metric]
    aux = PrepareAux(stats=stats, moments=moments, kl_seq_mean=kl_seq.mean(),
                     batch_size=jnp.float32(exp.tokens.shape[0]))
    return batch, iteration_keys(rng, step)[1], plateau_value, aux


def finish(s: StepSettings, small, aux: PrepareAux, policy_out, critic_out):
    """Metrics, the next step count, and the KL controller and reward statistics, which follow the
    iteration only when every optimiser step of both models counted."""
    kl_state, old_moments, _, step = small
    pstats, plr = policy_out
    cstats, clr = (None, None) if critic_out is None else critic_out
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
    return kl, moments, step + 1, metrics


def _all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
              if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)
