"""One PPO iteration as a few jitted programs around the host's reward functions.

    experience = programs.rollout(state, frozen, prompt_ids, prompt_mask, key)   # device
    fn_scores  = reward functions on decoded text                               # host (optional)
    state, metrics = programs.update(state, experience, fn_scores)              # device, state donated

`rollout`:  `sample` (R tokens with a KV cache), then `score` (reference log-probs and
            reward-model scores, no grad, optionally in micro-batches) on the policy's devices
            and `values` (the critic's forward) on the critic's.
`evaluate`: the same sampling and reference / reward-model forwards for held-out prompts, without
            the critic; one batch of any size (its own program, compiled once).
`update`:   `prepare` (scores -> missing-EOS penalty, clip, running normalisation -> shape_rewards
            -> gae -> whiten) -> `policy_update` and `critic_update` (each model's E x M optimiser
            steps, `update.model_update`) -> `finish` (metrics, KL controller). An optimiser step
            whose loss or gradients are not finite is skipped for that model; an iteration with any
            skipped step leaves the KL controller and reward statistics as they were and reports
            `nonfinite` = 1 (the trainer logs it and stops after a streak).

Placement (`train.placement`): with "separate" the critic and its optimiser state live on devices
of their own, so `critic_update` (and `values`) run beside the policy's programs instead of after
them; XLA:CPU runs one program's operations one at a time, so on a CPU this is what puts two cores
to work on the two models at once. The batch rows cross between the two device sets (a few KB);
the parameters never do. With "colocated" every program runs on the same devices, one after the
other. `rollout` and `update` only dispatch: the host never waits inside them.

Keys: the state holds a base key that never changes; iteration `step` uses
`fold_in(base, step)`, split once into the sampling key and the permutation key, so a resumed
run draws exactly the keys an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, struct

from jaxppo.core import rewards as rw
from jaxppo.core.gae import gae
from jaxppo.core.masked import masked_mean, masked_whiten
from jaxppo.models.transformer import last_token_index
from jaxppo.engine.optimizer import current_lr
from jaxppo.engine.sampling import SamplingParams, sample
from jaxppo.engine.mesh import batch_sharding, replicated
from jaxppo.engine.update import (CRITIC, POLICY, PPOBatch, UpdateSettings, model_update, response_logprobs,
                           response_values, update_metrics)


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
                 settings: StepSettings, updates_per_iteration: int, policy_shardings=None,
                 critic_shardings=None, policy_mesh=None, critic_mesh=None):
        """policy_shardings / critic_shardings: (params, optimiser state) shardings of each model,
        which its update program pins its outputs to (None: one device, nothing to pin).
        policy_mesh / critic_mesh: the two models' meshes (`sharding.make_meshes`); when they differ
        (`train.placement` separate), batch rows and scalars cross between the two."""
        self.graphs = (policy_graph, critic_graph)
        self.ref_graph, self.rm_graph = ref_graph, rm_graph
        self.txs, self.schedules = tuple(txs), tuple(schedules)
        self.s = settings
        self.updates_per_iteration = updates_per_iteration
        self.meshes = None if critic_mesh is None or critic_mesh is policy_mesh else (policy_mesh, critic_mesh)
        options = update_compiler_options()
        self.sample = jax.jit(self._sample)
        self.score = jax.jit(self._score)
        self.values = jax.jit(self._values)
        self.evaluate = jax.jit(self._evaluate)
        self.keys = jax.jit(self._sample_key)
        self.prepare = jax.jit(self._prepare)
        self.policy_update = jax.jit(functools.partial(self._model_update, POLICY), donate_argnums=(0, 1),
                                     out_shardings=None if policy_shardings is None else
                                     (*policy_shardings, None), compiler_options=options)
        self.critic_update = jax.jit(functools.partial(self._model_update, CRITIC), donate_argnums=(0, 1),
                                     out_shardings=None if critic_shardings is None else
                                     (*critic_shardings, None), compiler_options=options)
        self.finish = jax.jit(self._finish)

    def programs(self) -> dict:
        """Every jitted program by name (for compile counts and HLO dumps)."""
        return {"sample": self.sample, "score": self.score, "values": self.values, "prepare": self.prepare,
                "policy_update": self.policy_update, "critic_update": self.critic_update,
                "finish": self.finish, "evaluate": self.evaluate, "keys": self.keys}

    # ------------------------------------------------------------------ keys
    @staticmethod
    def iteration_keys(rng, step):
        """(sampling key, permutation key) of iteration `step`."""
        return jax.random.split(jax.random.fold_in(rng, step))

    # ------------------------------------------------------------------ rollout
    def _score_forwards(self, frozen: Frozen, response_len: int):
        """forwards(tokens, attn, response, resp_mask) -> (ref log-probs, RM scores)."""
        R = response_len
        ref = nnx.merge(self.ref_graph, frozen.ref)
        rm = None if self.rm_graph is None else nnx.merge(self.rm_graph, frozen.reward_model)
        T = self.s.sampling.temperature or 1.0

        def forwards(tokens, attn, response, resp_mask):
            ref_logprobs, _ = response_logprobs(ref, tokens, attn, response, T,
                                                chunk_bytes=self.s.update.logits_chunk_bytes)
            if rm is None:
                scores = jnp.zeros(tokens.shape[:1], jnp.float32)
            else:
                # score at the last valid token: the EOS if any, else the last sampled token
                full_mask = jnp.concatenate([attn[:, :-R], resp_mask.astype(attn.dtype)], axis=1)
                last = last_token_index(full_mask)
                scores = rm(tokens, full_mask, outputs_at=last[:, None])[:, 0].astype(jnp.float32)
            return ref_logprobs, scores

        return forwards

    @staticmethod
    def _sample_key(rng, step):
        return PPOPrograms.iteration_keys(rng, step)[0]

    def sample_key(self, state: TrainState):
        """The sampling key of the iteration `state` is at."""
        return self.keys(state.rng, state.step)

    def _sample(self, policy_params, prompt_ids, prompt_mask, key):
        """Sample R tokens (KV cache): (sample output, attention mask of prompt + response)."""
        policy = nnx.merge(self.graphs[0], policy_params)
        out = sample(policy, prompt_ids, prompt_mask, key, self.s.sampling)
        attn = jnp.concatenate([prompt_mask.astype(jnp.int32), jnp.ones_like(out.response)], axis=1)
        return out, attn

    def _score(self, frozen: Frozen, tokens, attn, response, mask):
        """The reference and reward-model forwards of a sampled batch (no grad): (ref log-probs,
        0 on padding, RM scores)."""
        forwards = self._score_forwards(frozen, response.shape[1])
        ref_logprobs, scores = _chunked(forwards, self.s.forward_batch_size, tokens, attn, response, mask)
        return ref_logprobs * mask, scores

    def _values(self, critic_params, tokens, attention_mask, mask):
        """The critic's values of a sampled batch `[B, R]` (0 on padding), on the critic's devices."""
        R = mask.shape[1]
        critic = nnx.merge(self.graphs[1], critic_params)
        values = _chunked(lambda t, a: response_values(critic, t, a, R).astype(jnp.float32),
                          self.s.forward_batch_size, tokens, attention_mask)
        return values * mask

    def _move(self, rows, scalars, to: int):
        """Batch-row arrays (split over the batch axes) and scalars / keys (replicated) onto the
        policy's (0) or the critic's (1) mesh; unchanged when both models share their devices."""
        if self.meshes is None:
            return rows, scalars
        mesh = self.meshes[to]
        rows = jax.tree.map(lambda x: jax.device_put(x, batch_sharding(mesh, x.ndim)), rows)
        return rows, jax.device_put(scalars, replicated(mesh))

    def _values_args(self, state: TrainState, tokens, attn, mask):
        """What `values` takes: the critic's params and the sampled rows on the critic's mesh."""
        rows, _ = self._move((tokens, attn, mask), (), to=1)
        return (state.critic, *rows)

    def rollout(self, state: TrainState, frozen: Frozen, prompt_ids, prompt_mask, key) -> Experience:
        """Sample a batch, then score it: the reference and reward-model forwards on the policy's
        devices and the critic's values on the critic's, side by side when those differ.
        Dispatch only: no host sync."""
        out, attn = self.sample(state.policy, prompt_ids, prompt_mask, key)
        values = self.values(*self._values_args(state, out.tokens, attn, out.mask))
        ref_logprobs, scores = self.score(frozen, out.tokens, attn, out.response, out.mask)
        values, _ = self._move(values, (), to=0)
        return Experience(tokens=out.tokens, attention_mask=attn, response=out.response, mask=out.mask,
                          logprobs=out.logprobs, ref_logprobs=ref_logprobs, values=values, rm_scores=scores,
                          num_steps=out.num_steps)

    def _evaluate(self, policy_params, frozen: Frozen, prompt_ids, prompt_mask, key) -> EvalOutput:
        """Sample with `key` (fixed by the caller) and score: what `evaluate` reports, nothing more."""
        out, attn = self._sample(policy_params, prompt_ids, prompt_mask, key)
        ref_logprobs, scores = self._score(frozen, out.tokens, attn, out.response, out.mask)
        kl = ((out.logprobs - ref_logprobs) * out.mask).sum(-1)
        return EvalOutput(response=out.response, mask=out.mask, kl=kl, rm_scores=scores)

    # ------------------------------------------------------------------ update
    @staticmethod
    def _small(state: TrainState):
        """The state `prepare` and `finish` read: KL controller, reward moments, key, step."""
        return state.kl, state.reward_moments, state.rng, state.step

    def _update_args(self, state: TrainState, batch, perm_key, plateau_value):
        """What `policy_update` and `critic_update` take, the critic's on the critic's mesh."""
        scalars = (perm_key, plateau_value, state.step * self.updates_per_iteration)
        cbatch, cscalars = self._move(batch, scalars, to=1)
        return (state.policy, state.policy_opt, batch, *scalars), (state.critic, state.critic_opt, cbatch, *cscalars)

    def update(self, state: TrainState, exp: Experience, fn_scores):
        """One PPO update: `prepare` (rewards, GAE, advantages) -> the policy's and the critic's
        optimiser steps (two programs; side by side when the critic has devices of its own) ->
        `finish` (metrics, KL controller). The state is donated. Dispatch only: no host sync."""
        small = self._small(state)
        batch, perm_key, plateau_value, aux = self.prepare(small, exp, fn_scores)
        policy_args, critic_args = self._update_args(state, batch, perm_key, plateau_value)
        policy, policy_opt, psums = self.policy_update(*policy_args)
        critic, critic_opt, csums = self.critic_update(*critic_args)
        _, csums = self._move((), csums, to=0)
        kl, moments, metrics = self.finish(small, aux, psums, csums)
        return state.replace(policy=policy, critic=critic, policy_opt=policy_opt, critic_opt=critic_opt,
                             kl=kl, reward_moments=moments, step=state.step + 1), metrics

    def lower(self, state: TrainState, frozen: Frozen, prompt_ids, prompt_mask, key, exp: Experience,
              fn_scores) -> dict:
        """The rollout's and the update's programs lowered with the arguments `rollout` and
        `update` pass them (for HLO dumps and `memory_analysis()`); nothing is donated or run
        except the small `prepare`, whose outputs the update programs take."""
        small = self._small(state)
        batch, perm_key, plateau_value, _ = self.prepare(small, exp, fn_scores)
        policy_args, critic_args = self._update_args(state, batch, perm_key, plateau_value)
        return {"sample": self.sample.lower(state.policy, prompt_ids, prompt_mask, key),
                "score": self.score.lower(frozen, exp.tokens, exp.attention_mask, exp.response, exp.mask),
                "values": self.values.lower(*self._values_args(state, exp.tokens, exp.attention_mask, exp.mask)),
                "prepare": self.prepare.lower(small, exp, fn_scores),
                "policy_update": self.policy_update.lower(*policy_args),
                "critic_update": self.critic_update.lower(*critic_args)}

    def _prepare(self, small, exp: Experience, fn_scores):
        """Scores -> shaped rewards -> GAE -> (whitened) advantages: the PPOBatch both models train
        on, the permutation key, the plateau value, and what `finish` reports."""
        s = self.s
        kl_state, moments, rng, step = small
        mask = exp.mask
        scores = exp.rm_scores + fn_scores.astype(jnp.float32)                # [B]
        raw_scores = scores
        has_eos = _has_eos(exp.response, mask, s.sampling)
        if s.missing_eos_penalty is not None:
            scores = rw.missing_eos_penalty(scores, has_eos, s.missing_eos_penalty)
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
        metrics = {
            **objective,
            "val/num_eos_tokens": has_eos.sum().astype(jnp.float32),
            "val/mean_values": masked_mean(exp.values, mask),
            "val/mean_returns": masked_mean(returns, mask),
            "response_length": mask.sum(-1).mean(),
            "kl_coef": kl_coef,
        }
        if s.normalize_rewards:
            metrics["objective/scores_normalized"] = scores.mean()
        aux = {"metrics": metrics, "moments": moments, "kl_seq_mean": kl_seq.mean(),
               "batch_size": jnp.float32(exp.tokens.shape[0])}
        return batch, self.iteration_keys(rng, step)[1], plateau_value, aux

    def _model_update(self, kind, params, opt_state, batch, perm_key, plateau_value, count):
        """One model's E x M optimiser steps (`update.model_update`), and the learning rate they
        started from (a metric)."""
        i = 0 if kind == POLICY else 1
        lr = current_lr(self.schedules[i], opt_state, count)
        params, opt_state, sums = model_update(kind, self.graphs[i], params, opt_state, batch, perm_key,
                                               self.txs[i], self.s.update, plateau_value)
        return params, opt_state, {**sums, "lr": lr}

    def _finish(self, small, aux, psums, csums):
        """Metrics, and the KL controller and reward statistics, which follow the iteration only when
        every optimiser step of both models counted."""
        kl_state, old_moments, _, _ = small
        s = self.s
        upd = update_metrics(psums, csums)
        if s.adaptive_kl is not None:
            target, horizon = s.adaptive_kl
            new_kl = rw.adaptive_kl_update(kl_state, aux["kl_seq_mean"], aux["batch_size"], target, horizon)
        else:
            new_kl = kl_state
        # Skipped optimiser steps left the weights and Adam moments alone (no copy of them is kept to
        # restore). The small state follows the whole iteration: kept only when every step counted.
        finite = (upd["nonfinite_steps"] == 0) & _all_finite((upd["loss/policy_avg"], upd["loss/value_avg"]))
        kl, moments = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                                   (new_kl, aux["moments"]), (kl_state, old_moments))
        metrics = {
            **aux["metrics"], **upd,
            "lr": psums["lr"],
            "lr_critic": csums["lr"],
            "nonfinite": 1.0 - finite.astype(jnp.float32),
        }
        return kl, moments, metrics


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
