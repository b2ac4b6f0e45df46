"""Optax chains for the policy and the critic.

    clip_by_global_norm(max_grad_norm) -> adamw(schedule) [-> reduce_on_plateau]

Schedules count optimiser steps (one per minibatch, after gradient accumulation):
`total_updates = train.total_steps * ppo.epochs * ppo.num_minibatches`.

- constant: warmup (linear from 0) then `lr`
- linear:   warmup then linear decay to `lr * min_lr_ratio`
- cosine:   warmup then cosine decay to `lr * min_lr_ratio`
- plateau:  warmup then constant, times the scale of `reduce_on_plateau` (optax's, with `rtol`
            relative to |best| in both modes), driven once per PPO iteration by a metric known
            before the update (the caller passes `value=`).

The clip takes the norm as the `grad_norm` extra argument when the caller has it: `ppo_update`
computes every step's gradient norm anyway (for the metrics and the non-finite check), and a
second `optax.tree.norm` is a set of slow reductions on XLA:CPU.

Gradient accumulation is not an optax wrapper here: `update.ppo_update` sums token-weighted
micro-batch gradients before one optimiser step, which is exact when response lengths differ
(optax.MultiSteps averages micro-batch means, which is not).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from jaxppo.core import kernels


def global_norm(tree) -> jax.Array:
    """sqrt(sum over leaves of sum(x^2)), squares summed in float32 (`optax.tree.norm`). On the CPU
    (`kernels.matmul_reductions()`) a matrix's sum runs as `kernels.column_sum` then a sum over its
    last axis: XLA:CPU runs a plain sum over a weight matrix as a slow reduce-window."""
    cpu = kernels.matmul_reductions()
    total = jnp.float32(0)
    for x in jax.tree.leaves(tree):
        x = x.astype(jnp.float32)
        sq = x * x
        total += (kernels.column_sum(sq.reshape(-1, sq.shape[-1])) if cpu and sq.ndim >= 2 else sq).sum()
    return jnp.sqrt(total)


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformationExtraArgs:
    """`optax.clip_by_global_norm`: the same maths and the same (empty) state, so checkpoints are
    unchanged. `update(..., grad_norm=n)` uses `n` as the norm of the updates it receives (the
    caller's own, computed once); without it the norm is computed here."""

    def update_fn(updates, state, params=None, *, grad_norm=None, **extra_args):
        del params, extra_args
        norm = global_norm(updates) if grad_norm is None else grad_norm
        small = norm < max_norm
        clipped = jax.tree.map(lambda t: jax.lax.select(small, t, (t / norm.astype(t.dtype)) * max_norm), updates)
        return clipped, state

    def init_fn(params):
        del params
        return optax.EmptyState()    # (optax.init_empty_state only exists from optax 0.2.6)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def make_schedule(optim_cfg, total_updates: int, lr: float | None = None) -> optax.Schedule:
    """Learning-rate schedule over `total_updates` optimiser steps."""
    peak = float(optim_cfg.lr if lr is None else lr)
    warmup = int(optim_cfg.warmup_steps)
    end = peak * float(optim_cfg.min_lr_ratio)
    decay_steps = max(total_updates - warmup, 1)
    kind = optim_cfg.schedule
    if kind in ("constant", "plateau"):
        main = optax.constant_schedule(peak)
    elif kind == "linear":
        main = optax.linear_schedule(peak, end, decay_steps)
    elif kind == "cosine":
        main = optax.cosine_decay_schedule(peak, decay_steps, alpha=float(optim_cfg.min_lr_ratio))
    else:
        raise ValueError(f"optim.schedule must be constant|linear|cosine|plateau, got {kind!r}")
    if warmup <= 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), main], [warmup])


def make_optimizer(optim_cfg, total_updates: int, lr: float | None = None, *,
                   updates_per_iteration: int = 1):
    """The full chain; returns (optax transformation, schedule)."""
    schedule = make_schedule(optim_cfg, total_updates, lr)
    parts = []
    if optim_cfg.max_grad_norm:
        parts.append(clip_by_global_norm(float(optim_cfg.max_grad_norm)))
    parts.append(optax.adamw(schedule, b1=float(optim_cfg.adam_b1), b2=float(optim_cfg.adam_b2),
                             eps=float(optim_cfg.adam_eps), weight_decay=float(optim_cfg.weight_decay)))
    if optim_cfg.schedule == "plateau":
        p = optim_cfg.plateau
        # every minibatch of one iteration sees the same value; accumulate them into one decision
        parts.append(reduce_on_plateau(
            factor=float(p.factor), patience=int(p.patience), rtol=float(p.rtol), atol=float(p.atol),
            cooldown=int(p.cooldown), accumulation_size=int(updates_per_iteration),
            min_scale=float(p.min_scale)))
    return optax.chain(*parts), schedule


def reduce_on_plateau(*, factor: float, patience: int, rtol: float, atol: float, cooldown: int,
                      accumulation_size: int, min_scale: float) -> optax.GradientTransformationExtraArgs:
    """`optax.contrib.reduce_on_plateau` (the same state, so checkpoints are unchanged) with an
    improvement that means one thing whatever the sign: the mean `value` of `accumulation_size`
    updates improves when it is below the best by more than `rtol x |best| + atol`. optax tests
    `avg < (1 - rtol) x best - atol`, which loosens instead of tightening when the best is negative,
    as a `mode: max` metric above zero is once negated (`shaping.StepSettings.plateau_sign`)."""
    init = optax.contrib.reduce_on_plateau(factor=factor, patience=patience, rtol=rtol, atol=atol,
                                           cooldown=cooldown, accumulation_size=accumulation_size,
                                           min_scale=min_scale).init

    def decide(state):
        best, avg = state.best_value, state.avg_value
        # the first decision always improves on the initial +inf (inf - rtol x inf would be nan)
        improved = avg < jnp.where(jnp.isfinite(best), best - rtol * jnp.abs(best) - atol, best)
        plateau = jnp.where(improved, 0, state.plateau_count + 1)
        cooling = state.cooldown_count > 0                 # a cooldown ignores the bad checks
        reduce = ~cooling & (plateau == patience)
        scale = jnp.where(reduce, jnp.maximum(state.scale * factor, min_scale), state.scale)
        return state._replace(
            best_value=jnp.where(improved, avg, best).astype(best.dtype),
            plateau_count=jnp.where(cooling | reduce, 0, plateau).astype(jnp.int32),
            scale=scale.astype(state.scale.dtype),
            cooldown_count=jnp.where(cooling, state.cooldown_count - 1, jnp.where(reduce, cooldown, 0)).astype(jnp.int32),
            count=jnp.zeros_like(state.count), avg_value=jnp.zeros_like(avg))

    def update_fn(updates, state, params=None, *, value, **extra_args):
        del params, extra_args
        count = state.count + 1
        avg = (state.count * state.avg_value + jnp.asarray(value, state.avg_value.dtype)) / count
        state = state._replace(avg_value=avg.astype(state.avg_value.dtype), count=count)
        state = jax.lax.cond(count == accumulation_size, decide, lambda s: s, state)
        return jax.tree.map(lambda g: state.scale * g, updates), state

    return optax.GradientTransformationExtraArgs(init, update_fn)


def plateau_scale(opt_state) -> jnp.ndarray:
    """The reduce-on-plateau multiplier inside `opt_state` (1.0 when there is none)."""
    scales = [s.scale for s in _walk(opt_state) if isinstance(s, optax.contrib.ReduceLROnPlateauState)]
    return jnp.asarray(scales[0], jnp.float32) if scales else jnp.float32(1.0)


def current_lr(schedule, opt_state, count) -> jnp.ndarray:
    """The learning rate the next optimiser step uses: schedule(count) x plateau scale."""
    return jnp.asarray(schedule(count), jnp.float32) * plateau_scale(opt_state)


def _walk(state):
    if isinstance(state, optax.contrib.ReduceLROnPlateauState):
        yield state
    elif isinstance(state, (tuple, list)):
        for s in state:
            yield from _walk(s)
