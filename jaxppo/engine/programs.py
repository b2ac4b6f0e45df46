"""One RL iteration as a few compiled programs around the host's reward functions.

    programs = make_programs(settings, graphs, optimizers, placement)   # jitted once
    exp = rollout(programs, state, frozen, prompt_ids, prompt_mask)     # device
    fn_scores = reward functions on decoded text                        # host (optional)
    state, metrics = update(programs, state, exp, fn_scores)            # device, state donated

`rollout` = `sample` (R tokens with a KV cache), then `score` (reference log-probs and
reward-model scores, no grad) on the policy's devices beside `values` (the critic's forward) on
the critic's. `update` = `prepare` (scores -> missing-EOS penalty, clip, running normalisation ->
`shape_rewards` -> `gae` -> whitening) -> `policy_update` and `critic_update` (each model's
E x M optimiser steps on its objective, `update.model_update`) -> `finish` (metrics, KL
controller). An optimiser step whose loss or gradients are not finite is skipped for that model;
an iteration with any skipped step leaves the KL controller and reward statistics as they were
and reports `nonfinite` = 1 (the trainer logs it and stops after a streak). `evaluate` samples
held-out prompts and scores them without the critic. Each phase below is a pure function of its
arguments; `make_programs` jits them with their static settings bound; `rollout` and `update`
only dispatch (the host never waits inside them), moving rows between the models' devices when
the `Placement` separates them.

Keys: the state holds a base key that never changes; iteration `step` uses
`fold_in(base, step)`, split once into the sampling key and the permutation key, so a resumed
run draws exactly the keys an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxppo.core.rewards import kl_per_token
from jaxppo.engine.mesh import replicated
from jaxppo.engine.optimizer import current_lr
from jaxppo.engine.placement import Placement
from jaxppo.engine.sampling import SamplingParams, sample
from jaxppo.engine.scoring import chunked, response_logprobs, response_values, reward_model_scores
from jaxppo.engine.shaping import IterationMetrics, StepSettings, finish, prepare, sampling_key
from jaxppo.engine.state import EvalOutput, Experience, Frozen, ModelGraphs, TrainState
from jaxppo.engine.update import Objective, UpdateSettings, model_update, policy_objective, value_objective
from jaxppo.models import lora
from jaxppo.runtime import update_compiler_options


# ---------------------------------------------------------------------------- the phases


def sample_phase(policy_graph, sampling: SamplingParams, policy_params, prompt_ids, prompt_mask, key, base=None):
    """Sample R tokens (KV cache), G per prompt: (sample output, attention mask of prompt + response),
    `[B*G, ...]` rows. `base`: the frozen base of LoRA adapters (`policy_params`), else None."""
    policy = lora.merge(policy_graph, policy_params, base)
    out = sample(policy, prompt_ids, prompt_mask, key, sampling)
    if sampling.num_generations > 1:
        prompt_mask = jnp.repeat(prompt_mask, sampling.num_generations, axis=0)      # [B*G, P]
    attn = jnp.concatenate([prompt_mask.astype(jnp.int32), jnp.ones_like(out.response)], axis=1)
    return out, attn


def score_phase(ref_graph, rm_graph, s: StepSettings, frozen: Frozen, tokens, attn, response, mask):
    """The reference and reward-model forwards of a sampled batch (no grad): (ref log-probs, 0 on
    padding; RM scores, 0 without a reward model), in micro-batches of `forward_batch_size`."""
    ref = nnx.merge(ref_graph, frozen.ref)
    rm = None if rm_graph is None else nnx.merge(rm_graph, frozen.reward_model)

    def forwards(tokens, attn, response, resp_mask):
        ref_logprobs, _ = response_logprobs(ref, tokens, attn, response, s.sampling.scoring_temperature,
                                            chunk_bytes=s.update.logits_chunk_bytes)
        scores = (jnp.zeros(tokens.shape[:1], jnp.float32) if rm is None
                  else reward_model_scores(rm, tokens, attn, resp_mask))
        return ref_logprobs, scores

    ref_logprobs, scores = chunked(forwards, s.forward_batch_size, tokens, attn, response, mask)
    return ref_logprobs * mask, scores


def values_phase(critic_graph, forward_batch_size, critic_params, tokens, attention_mask, mask, base=None):
    """The critic's values of a sampled batch `[B, R]` (0 on padding), on the critic's devices."""
    R = mask.shape[1]
    critic = lora.merge(critic_graph, critic_params, base)
    values = chunked(lambda t, a: response_values(critic, t, a, R).astype(jnp.float32),
                     forward_batch_size, tokens, attention_mask)
    return values * mask


def evaluate_phase(graphs: ModelGraphs, s: StepSettings, policy_params, frozen: Frozen, prompt_ids, prompt_mask,
                   key) -> EvalOutput:
    """Sample one response per prompt with `key` (fixed by the caller) and score it: what an
    evaluation reports, nothing more."""
    sampling = dataclasses.replace(s.sampling, num_generations=1)
    out, attn = sample_phase(graphs.policy, sampling, policy_params, prompt_ids, prompt_mask, key,
                             graphs.policy_base(frozen))
    ref_logprobs, scores = score_phase(graphs.ref, graphs.reward_model, s, frozen, out.tokens, attn, out.response,
                                       out.mask)
    kl = (kl_per_token(out.logprobs, ref_logprobs, s.kl_estimator) * out.mask).sum(-1)   # as training's objective/kl
    return EvalOutput(response=out.response, mask=out.mask, kl=kl, rm_scores=scores)


def optimise(objective: Objective, graph, tx, schedule, s: UpdateSettings, dropout: bool, params, opt_state, batch,
             perm_key, plateau_value, count, base=None):
    """One model's E x M optimiser steps (`update.model_update`; with LoRA `params` are the adapters
    and `base` their frozen base), and the learning rate they started from (a metric)."""
    lr = current_lr(schedule, opt_state, count)
    params, opt_state, stats = model_update(objective, graph, params, opt_state, batch, perm_key, tx, s,
                                            plateau_value, base=base, dropout=dropout)
    return params, opt_state, (stats, lr)


# ---------------------------------------------------------------------------- the programs


class Optimizers(NamedTuple):
    """Each trained model's optax chain and learning-rate schedule (`optimizer.make_optimizer`)."""

    policy_tx: Any
    policy_schedule: Callable
    critic_tx: Any = None          # None for the critic-free estimators
    critic_schedule: Callable | None = None


class Programs(NamedTuple):
    """The jitted phases of an iteration (one compile each), and what `rollout`/`update` need to
    route between them."""

    sample: Callable          # (policy params, prompt ids, prompt mask, key) -> (SampleOutput, attention mask)
    score: Callable           # (frozen, tokens, attn, response, mask) -> (ref log-probs, RM scores)
    values: Callable | None   # (critic params, tokens, attn, mask) -> values; None without a critic
    evaluate: Callable        # (policy params, frozen, prompt ids, prompt mask, key) -> EvalOutput
    sampling_key: Callable    # (rng, step) -> key
    prepare: Callable         # (small state, Experience, fn scores) -> (PPOBatch, perm key, plateau value, aux)
    policy_update: Callable   # (params, opt, batch, perm key, plateau value, count) -> (params, opt, out); donated
    critic_update: Callable | None
    finish: Callable          # (small state, aux, policy out, critic out) -> (kl, moments, step, IterationMetrics)
    placement: Placement
    settings: StepSettings
    graphs: ModelGraphs       # (with LoRA, which frozen params each trained model merges with)

    @property
    def steps_per_iteration(self) -> int:
        return self.settings.update.steps_per_iteration

    @property
    def has_critic(self) -> bool:
        return self.critic_update is not None

    def jitted(self) -> dict:
        """Every jitted program by name (for compile counts and HLO dumps)."""
        names = ("sample", "score", "values", "prepare", "policy_update", "critic_update", "finish", "evaluate",
                 "sampling_key")
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}


def make_programs(settings: StepSettings, graphs: ModelGraphs, optimizers: Optimizers, placement: Placement,
                  policy_shardings=None, critic_shardings=None, lora_dropout: bool = False) -> Programs:
    """Jit every phase with its static settings bound. policy_shardings / critic_shardings: the
    (params, optimiser state) shardings each update program pins its outputs to
    (`Placement.pinned_shardings`; None: one device, nothing to pin); `lora_dropout`: the adapters'
    dropout is on in the update's training forwards (`model.lora.dropout` > 0). Without a critic
    (`graphs.critic` None: the critic-free estimators) there are no `values` and `critic_update`."""
    s, options = settings, update_compiler_options()
    critic = graphs.critic is not None

    def update_program(objective, graph, tx, schedule, shardings, dropout=False):
        return jax.jit(functools.partial(optimise, objective, graph, tx, schedule, s.update, dropout),
                       donate_argnums=(0, 1), out_shardings=None if shardings is None else (*shardings, None),
                       compiler_options=options)

    o = optimizers
    return Programs(
        sample=jax.jit(functools.partial(sample_phase, graphs.policy, s.sampling)),
        score=jax.jit(functools.partial(score_phase, graphs.ref, graphs.reward_model, s), compiler_options=options),
        values=jax.jit(functools.partial(values_phase, graphs.critic, s.forward_batch_size),
                       compiler_options=options) if critic else None,
        evaluate=jax.jit(functools.partial(evaluate_phase, graphs, s), compiler_options=options),
        sampling_key=jax.jit(functools.partial(sampling_key)),   # (a partial: jit caches per function object)
        prepare=jax.jit(functools.partial(prepare, s)),
        policy_update=update_program(policy_objective(s.update, s.sampling.scoring_temperature), graphs.policy,
                                     o.policy_tx, o.policy_schedule, policy_shardings, lora_dropout),
        critic_update=update_program(value_objective(s.update), graphs.critic, o.critic_tx, o.critic_schedule,
                                     critic_shardings, lora_dropout and graphs.critic_lora) if critic else None,
        finish=jax.jit(functools.partial(finish, s)),
        placement=placement, settings=s, graphs=graphs)


# ---------------------------------------------------------------------------- an iteration


def _small(state: TrainState):
    """The state `prepare` and `finish` read: KL controller, reward moments, key, step."""
    return state.kl, state.reward_moments, state.rng, state.step


def _sample_args(p: Programs, state: TrainState, frozen: Frozen, prompt_ids, prompt_mask, key):
    """What `sample` takes, on the devices `Placement.sample_mesh` picks (`Placement.to_sampler`)."""
    return p.placement.to_sampler(state.policy, prompt_ids, prompt_mask, key, p.graphs.policy_base(frozen),
                                  p.settings.sampling.num_generations)


def _values_args(p: Programs, state: TrainState, frozen: Frozen, tokens, attn, mask):
    """What `values` takes: the critic's params and the sampled rows on the critic's mesh."""
    rows, _ = p.placement.to_critic((tokens, attn, mask))
    return (state.critic, *rows, p.graphs.critic_base(frozen))


def _update_args(p: Programs, state: TrainState, frozen: Frozen, batch, perm_key, plateau_value):
    """What `policy_update` and `critic_update` take, the critic's on the critic's mesh."""
    scalars = (perm_key, plateau_value, state.step * p.steps_per_iteration)
    policy = (state.policy, state.policy_opt, batch, *scalars, p.graphs.policy_base(frozen))
    if not p.has_critic:
        return policy, None
    cbatch, cscalars = p.placement.to_critic(batch, scalars)
    return policy, (state.critic, state.critic_opt, cbatch, *cscalars, p.graphs.critic_base(frozen))


def iteration_key(p: Programs, state: TrainState):
    """The sampling key of the iteration `state` is at. The base key and the step go in with one
    fixed (replicated) sharding, whatever program or restore produced them, so that `sampling_key`
    compiles once."""
    rng, step = jax.device_put((state.rng, state.step), replicated(p.placement.policy_mesh))
    return p.sampling_key(rng, step)


def rollout(p: Programs, state: TrainState, frozen: Frozen, prompt_ids, prompt_mask, key=None) -> Experience:
    """Sample a batch (with the iteration's key unless `key` is given), then score it: the
    reference and reward-model forwards on the policy's devices and the critic's values on the
    critic's, side by side when those differ. Dispatch only: no host sync."""
    key = iteration_key(p, state) if key is None else key
    args = _sample_args(p, state, frozen, prompt_ids, prompt_mask, key)
    out, attn = p.placement.from_sampler(p.sample(*args))      # sampled where `Placement.sample_mesh` says
    values = p.values(*_values_args(p, state, frozen, out.tokens, attn, out.mask)) if p.has_critic else None
    ref_logprobs, scores = p.score(frozen, out.tokens, attn, out.response, out.mask)
    if values is not None:
        values, _ = p.placement.to_policy(values)
    return Experience(tokens=out.tokens, attention_mask=attn, response=out.response, mask=out.mask,
                      logprobs=out.logprobs, ref_logprobs=ref_logprobs, values=values, rm_scores=scores,
                      num_steps=out.num_steps)


def update(p: Programs, state: TrainState, exp: Experience, fn_scores,
           frozen: Frozen | None = None) -> tuple[TrainState, IterationMetrics]:
    """One PPO update: `prepare` (rewards, GAE, advantages) -> the policy's and the critic's
    optimiser steps (two programs; side by side when the critic has devices of its own) ->
    `finish` (metrics, KL controller). The state is donated. Dispatch only: no host sync."""
    small = _small(state)
    batch, perm_key, plateau_value, aux = p.prepare(small, exp, fn_scores)
    if frozen is None and (p.graphs.lora or p.graphs.critic_lora):
        raise ValueError("update: LoRA adapters need `frozen` (their base parameters)")
    policy_args, critic_args = _update_args(p, state, frozen, batch, perm_key, plateau_value)
    policy, policy_opt, pout = p.policy_update(*policy_args)
    critic, critic_opt, cout = state.critic, state.critic_opt, None
    if p.has_critic:
        critic, critic_opt, cout = p.critic_update(*critic_args)
        _, cout = p.placement.to_policy(scalars=cout)
    kl, moments, step, metrics = p.finish(small, aux, pout, cout)     # the step count too: no host-side op
    return state.replace(policy=policy, critic=critic, policy_opt=policy_opt, critic_opt=critic_opt,
                         kl=kl, reward_moments=moments, step=step), metrics


def lower(p: Programs, state: TrainState, frozen: Frozen, prompt_ids, prompt_mask, key, exp: Experience,
          fn_scores) -> dict:
    """The rollout's and the update's programs lowered with the arguments `rollout` and `update`
    pass them (for HLO dumps and `memory_analysis()`); nothing is donated or run except the small
    `prepare`, whose outputs the update programs take."""
    small = _small(state)
    batch, perm_key, plateau_value, _ = p.prepare(small, exp, fn_scores)
    policy_args, critic_args = _update_args(p, state, frozen, batch, perm_key, plateau_value)
    lowered = {"sample": p.sample.lower(*_sample_args(p, state, frozen, prompt_ids, prompt_mask, key)),
               "score": p.score.lower(frozen, exp.tokens, exp.attention_mask, exp.response, exp.mask),
               "prepare": p.prepare.lower(small, exp, fn_scores),
               "policy_update": p.policy_update.lower(*policy_args)}
    if p.has_critic:
        lowered["values"] = p.values.lower(*_values_args(p, state, frozen, exp.tokens, exp.attention_mask,
                                                         exp.mask))
        lowered["critic_update"] = p.critic_update.lower(*critic_args)
    return lowered
