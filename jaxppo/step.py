"""One PPO iteration as two jitted programs around the host's reward functions.

    experience = programs.rollout(state, frozen, prompt_ids, prompt_mask)   # device
    fn_scores  = reward functions on decoded text                          # host (optional)
    state, metrics = programs.update(state, experience, fn_scores)         # device, state donated

`rollout`:  sample R tokens (KV cache) -> reference log-probs, critic values, reward-model
            scores (no grad, optionally in micro-batches).
`evaluate`: the same sampling and reference / reward-model forwards for held-out prompts, without
            the critic; one batch of any size (its own program, compiled once).
`update`:   scores -> (missing-EOS penalty, clip, running normalisation) -> shape_rewards
            -> gae -> whiten -> ppo_update -> KL controller. An optimiser step whose loss or
            gradients are not finite is skipped inside the program (`ppo_update`); an iteration
            with any skipped step leaves the KL controller and reward statistics as they were
            and reports `nonfinite` = 1 (the trainer logs it and stops after a streak).

Keys: the state holds a base key that never changes; iteration `step` uses
`fold_in(base, step)`, split once into the sampling key and the permutation key, so a resumed
run draws exactly the keys an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, struct

from jaxppo import rewards as rw
from jaxppo.gae import gae
from jaxppo.masked import masked_mean, masked_whiten
from jaxppo.models.transformer import last_token_index
from jaxppo.optim import current_lr
from jaxppo.rollout import SamplingParams, sample
from jaxppo.update import PPOBatch, UpdateSettings, ppo_update, response_logprobs, response_values


@struct.dataclass
class TrainState:
    policy: Any               # nnx.State of the policy
    critic: Any               # nnx.State of the critic
    policy_opt: Any           # optax state
    critic_opt: Any
    kl: Any                   # rewards.KLControllerState
    reward_moments: Any       # rewards.RunningMoments
    rng: jax.Array            # base key, constant; per-iteration keys are fold_in(rng, step)
    step: jax.Array           # [] int32, completed iterations


@struct.dataclass
class Frozen:
    """Parameters that never change during training."""

    ref: Any                  # nnx.State of the reference policy
    reward_model: Any         # nnx.State of the reward model, or None


@struct.dataclass
class Experience:
    tokens: jax.Array          # [B, P+R]
    attention_mask: jax.Array  # [B, P+R]
    response: jax.Array        # [B, R]
    mask: jax.Array            # [B, R]
    logprobs: jax.Array        # [B, R] sampler log-probs (temperature-scaled)
    ref_logprobs: jax.Array    # [B, R]
    values: jax.Array          # [B, R]
    rm_scores: jax.Array       # [B] reward-model score at the last response token (0 without one)
    num_steps: jax.Array       # [] decode steps run


@struct.dataclass
class EvalOutput:
    response: jax.Array        # [B, R]
    mask: jax.Array            # [B, R]
    kl: jax.Array              # [B] sum over the response of log pi - log pi_ref (k1)
    rm_scores: jax.Array       # [B] reward-model score (0 without one)


@dataclasses.dataclass(frozen=True)
class StepSettings:
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


def _chunked(fn, batch_size: int | None, *arrays):
    """Apply `fn` over the leading axis in chunks of `batch_size` (lax.map), to bound memory."""
    B = arrays[0].shape[0]
    if not batch_size or batch_size >= B:
        return fn(*arrays)
    if B % batch_size:
        raise ValueError(f"rollout.forward_batch_size={batch_size} must divide the batch size {B}")
    chunks = [a.reshape((B // batch_size, batch_size) + a.shape[1:]) for a in arrays]  # [n, f, ...]
    out = jax.lax.map(lambda xs: fn(*xs), chunks)
    return jax.tree.map(lambda y: y.reshape((B,) + y.shape[2:]), out)


class PPOPrograms:
    """The compiled phases of an iteration, built once per trainer (one compile each)."""

    def __init__(self, *, policy_graph, critic_graph, ref_graph, rm_graph, txs, schedules,
                 settings: StepSettings, updates_per_iteration: int, state_shardings=None):
        self.graphs = (policy_graph, critic_graph)
        self.ref_graph, self.rm_graph = ref_graph, rm_graph
        self.txs, self.schedules = tuple(txs), tuple(schedules)
        self.s = settings
        self.updates_per_iteration = updates_per_iteration
        self.rollout = jax.jit(self._rollout)
        self.evaluate = jax.jit(self._evaluate)
        self.sample_key = jax.jit(self._sample_key)
        # pinning the state's output shardings to its input ones keeps one compiled program and
        # the FSDP layout from iteration to iteration (None: single device, nothing to pin)
        out = None if state_shardings is None else (state_shardings, None)
        self.update = jax.jit(self._update, donate_argnames=("state",), out_shardings=out,
                              compiler_options=update_compiler_options())

    # ------------------------------------------------------------------ keys
    @staticmethod
    def iteration_keys(state: TrainState):
        return jax.random.split(jax.random.fold_in(state.rng, state.step))

    # ------------------------------------------------------------------ rollout
    def _score_forwards(self, critic_params, frozen: Frozen, response_len: int):
        """forwards(tokens, attn, response, resp_mask) -> (ref log-probs, values, RM scores);
        values are None when `critic_params` is None (evaluation)."""
        R = response_len
        ref = nnx.merge(self.ref_graph, frozen.ref)
        critic = None if critic_params is None else nnx.merge(self.graphs[1], critic_params)
        rm = None if self.rm_graph is None else nnx.merge(self.rm_graph, frozen.reward_model)
        T = self.s.sampling.temperature or 1.0

        def forwards(tokens, attn, response, resp_mask):
            ref_logprobs, _ = response_logprobs(ref, tokens, attn, response, T,
                                                chunk_bytes=self.s.update.logits_chunk_bytes)
            values = None if critic is None else response_values(critic, tokens, attn, R).astype(jnp.float32)
            if rm is None:
                scores = jnp.zeros(tokens.shape[:1], jnp.float32)
            else:
                # score at the last valid token: the EOS if any, else the last sampled token
                full_mask = jnp.concatenate([attn[:, :-R], resp_mask.astype(attn.dtype)], axis=1)
                last = last_token_index(full_mask)
                scores = rm(tokens, full_mask, outputs_at=last[:, None])[:, 0].astype(jnp.float32)
            return ref_logprobs, values, scores

        return forwards

    def _sample_key(self, state: TrainState):
        return self.iteration_keys(state)[0]

    def _sample_and_score(self, policy_params, critic_params, frozen: Frozen, prompt_ids, prompt_mask, key):
        """Sample, then the no-grad forwards: (sample output, attention mask, ref log-probs,
        values or None without `critic_params`, RM scores)."""
        policy = nnx.merge(self.graphs[0], policy_params)
        out = sample(policy, prompt_ids, prompt_mask, key, self.s.sampling)
        attn = jnp.concatenate([prompt_mask.astype(jnp.int32), jnp.ones_like(out.response)], axis=1)
        forwards = self._score_forwards(critic_params, frozen, out.response.shape[1])
        ref_logprobs, values, scores = _chunked(forwards, self.s.forward_batch_size,
                                                out.tokens, attn, out.response, out.mask)
        return out, attn, ref_logprobs, values, scores

    def _rollout(self, state: TrainState, frozen: Frozen, prompt_ids, prompt_mask, key):
        out, attn, ref_logprobs, values, scores = self._sample_and_score(
            state.policy, state.critic, frozen, prompt_ids, prompt_mask, key)
        return Experience(tokens=out.tokens, attention_mask=attn, response=out.response, mask=out.mask,
                          logprobs=out.logprobs, ref_logprobs=ref_logprobs * out.mask,
                          values=values * out.mask, rm_scores=scores, num_steps=out.num_steps)

    def _evaluate(self, policy_params, frozen: Frozen, prompt_ids, prompt_mask, key) -> EvalOutput:
        """Sample with `key` (fixed by the caller) and score: what `evaluate` reports, nothing more."""
        out, _, ref_logprobs, _, scores = self._sample_and_score(
            policy_params, None, frozen, prompt_ids, prompt_mask, key)
        kl = ((out.logprobs - ref_logprobs) * out.mask).sum(-1)
        return EvalOutput(response=out.response, mask=out.mask, kl=kl, rm_scores=scores)

    # ------------------------------------------------------------------ update
    def _update(self, state: TrainState, exp: Experience, fn_scores):
        s = self.s
        mask = exp.mask
        scores = exp.rm_scores + fn_scores.astype(jnp.float32)                # [B]
        raw_scores = scores
        has_eos = _has_eos(exp.response, mask, s.sampling)
        if s.missing_eos_penalty is not None:
            scores = rw.missing_eos_penalty(scores, has_eos, s.missing_eos_penalty)
        if s.reward_clip:
            scores = rw.clip_rewards(scores, s.reward_clip)
        moments = state.reward_moments
        if s.normalize_rewards:
            moments = rw.update_running_moments(moments, scores)
            scores = rw.normalize_scores(moments, scores)

        kl_coef = state.kl.value
        rewards, kl = rw.shape_rewards(scores, exp.logprobs, exp.ref_logprobs, mask, kl_coef, s.kl_estimator)
        advantages, returns = gae(rewards, exp.values, mask, s.gamma, s.lam)
        if s.whiten_advantages:
            advantages = masked_whiten(advantages, mask) * mask

        batch = PPOBatch(tokens=exp.tokens, attention_mask=exp.attention_mask, response=exp.response,
                         mask=mask, old_logprobs=exp.logprobs, old_values=exp.values,
                         advantages=advantages, returns=returns)
        kl_seq = kl.sum(-1)                                                    # [B] per-sequence KL
        non_score = (-kl_coef * kl).sum(-1)
        objective = {
            "objective/kl": kl_seq.mean(),
            "objective/entropy": (-exp.logprobs * mask).sum(-1).mean(),
            "objective/non_score_reward": non_score.mean(),
            "objective/rlhf_reward": (non_score + scores).mean(),
            "objective/scores": raw_scores.mean(),
        }
        plateau_value = None
        if s.plateau_metric is not None:
            plateau_value = s.plateau_sign * objective[s.plateau_metric]

        perm_key = self.iteration_keys(state)[1]
        params, opts, upd = ppo_update(self.graphs, (state.policy, state.critic),
                                       (state.policy_opt, state.critic_opt), batch, perm_key,
                                       self.txs, s.update, plateau_value)
        if s.adaptive_kl is not None:
            target, horizon = s.adaptive_kl
            new_kl = rw.adaptive_kl_update(state.kl, kl_seq.mean(), exp.tokens.shape[0], target, horizon)
        else:
            new_kl = state.kl

        new_state = state.replace(policy=params[0], critic=params[1], policy_opt=opts[0],
                                  critic_opt=opts[1], kl=new_kl, reward_moments=moments,
                                  step=state.step + 1)
        # Skipped optimiser steps left the weights and Adam moments alone (no copy of them is kept to
        # restore). The small state follows the whole iteration: kept only when every step counted.
        finite = (upd["nonfinite_steps"] == 0) & _all_finite((upd["loss/policy_avg"], upd["loss/value_avg"]))
        small = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                             (new_kl, moments), (state.kl, state.reward_moments))
        kept = new_state.replace(kl=small[0], reward_moments=small[1])

        count = state.step * self.updates_per_iteration
        metrics = {
            **objective, **upd,
            "val/num_eos_tokens": has_eos.sum().astype(jnp.float32),
            "val/mean_values": masked_mean(exp.values, mask),
            "val/mean_returns": masked_mean(returns, mask),
            "response_length": mask.sum(-1).mean(),
            "lr": current_lr(self.schedules[0], state.policy_opt, count),
            "lr_critic": current_lr(self.schedules[1], state.critic_opt, count),
            "kl_coef": kl_coef,
            "nonfinite": 1.0 - finite.astype(jnp.float32),
        }
        if s.normalize_rewards:
            metrics["objective/scores_normalized"] = scores.mean()
        return kept, metrics


def update_compiler_options() -> dict | None:
    """XLA options of the update program alone. On the CPU its matmuls (hundreds of rows) go to
    YNNPACK, ~5-8 % faster than XLA's own there (experiments/README.md); the rollout keeps XLA's,
    whose one-token decode matmuls YNNPACK runs ~10 % slower. Nothing when the user set the YNN
    flag in XLA_FLAGS, or off the CPU."""
    import jaxppo

    if jaxppo.USER_SET_YNN or jax.default_backend() != "cpu":
        return None
    return {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}


def _has_eos(response, mask, sampling: SamplingParams):
    if not sampling.eos_token_ids:
        return jnp.zeros(response.shape[:1], bool)
    eos = jnp.isin(response, jnp.asarray(sampling.eos_token_ids, response.dtype)) & (mask > 0)
    return eos.any(-1)


def _all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
              if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def init_train_state(policy_params, critic_params, txs, seed: int, kl_coef: float) -> TrainState:
    return TrainState(
        policy=policy_params, critic=critic_params,
        policy_opt=txs[0].init(policy_params), critic_opt=txs[1].init(critic_params),
        kl=rw.KLControllerState(value=jnp.float32(kl_coef)),
        reward_moments=rw.init_running_moments(),
        rng=jax.random.PRNGKey(seed),   # raw uint32[2]: plain array, checkpoints as is
        step=jnp.int32(0),
    )
