"""Schedules and the optimiser chain against hand-computed values."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxppo.config import OptimConfig, PlateauConfig
from jaxppo.engine import optimizer as optim
from jaxppo.engine.optimizer import clip_by_global_norm, current_lr, make_optimizer, make_schedule, plateau_scale


def cfg(**kw):
    return OptimConfig(**kw)


def test_constant_with_warmup():
    s = make_schedule(cfg(lr=1e-3, schedule="constant", warmup_steps=4), total_updates=20)
    np.testing.assert_allclose([float(s(i)) for i in (0, 1, 2, 4, 10, 19)],
                               [0.0, 2.5e-4, 5e-4, 1e-3, 1e-3, 1e-3], rtol=1e-6)


def test_linear_decays_to_min_ratio():
    s = make_schedule(cfg(lr=1.0, schedule="linear", warmup_steps=0, min_lr_ratio=0.1), total_updates=10)
    np.testing.assert_allclose([float(s(i)) for i in (0, 5, 10)], [1.0, 0.55, 0.1], rtol=1e-6)


def test_cosine_after_warmup():
    s = make_schedule(cfg(lr=2.0, schedule="cosine", warmup_steps=2, min_lr_ratio=0.0), total_updates=12)
    # after warmup: 2 * 0.5 * (1 + cos(pi * t / 10))
    for t in (0, 3, 5, 10):
        expect = 2.0 * 0.5 * (1 + np.cos(np.pi * t / 10))
        np.testing.assert_allclose(float(s(2 + t)), expect, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(float(s(1)), 1.0, rtol=1e-6)


def test_clipping_and_adamw_step():
    tx, _ = make_optimizer(cfg(lr=0.1, max_grad_norm=1.0), total_updates=10)
    params = {"w": jnp.array([1.0, 2.0])}
    state = tx.init(params)
    grads = {"w": jnp.array([30.0, 40.0])}          # norm 50 -> clipped to [0.6, 0.8]
    updates, state = tx.update(grads, state, params)
    # first Adam step moves each coordinate by -lr * sign(g) (bias-corrected m/sqrt(v) = +-1)
    np.testing.assert_allclose(np.asarray(updates["w"]), [-0.1, -0.1], rtol=1e-4)


def test_plateau_reduces_lr_after_patience():
    c = cfg(lr=1.0, schedule="plateau", plateau=PlateauConfig(factor=0.5, patience=2, rtol=1e-4, atol=0.0))
    tx, sched = make_optimizer(c, total_updates=100, updates_per_iteration=2)
    params = {"w": jnp.zeros(3)}
    state = tx.init(params)
    g = {"w": jnp.ones(3)}
    scales = []
    for it in range(6):                             # the monitored value never improves after the first
        for _ in range(2):                          # 2 updates per iteration feed one decision
            _, state = tx.update(g, state, params, value=jnp.float32(1.0))
        scales.append(float(plateau_scale(state)))
    assert scales[0] == 1.0
    assert min(scales) < 1.0, scales
    np.testing.assert_allclose(float(current_lr(sched, state, 0)), scales[-1], rtol=1e-6)


def test_plateau_scale_is_one_without_plateau():
    tx, _ = make_optimizer(cfg(lr=1.0), total_updates=10)
    assert float(plateau_scale(tx.init({"w": jnp.zeros(2)}))) == 1.0


def plateau_scales(mode, metrics, **plateau):
    """The plateau scale after each value of `metrics`, fed as the update does (negated for max)."""
    c = cfg(lr=1.0, schedule="plateau", plateau=PlateauConfig(mode=mode, **plateau))
    tx, _ = make_optimizer(c, total_updates=100)
    sign = -1.0 if mode == "max" else 1.0             # shaping.StepSettings.plateau_sign
    params, g = {"w": jnp.zeros(2)}, {"w": jnp.ones(2)}
    state, scales = tx.init(params), []
    for m in metrics:
        _, state = tx.update(g, state, params, value=jnp.float32(sign * m))
        scales.append(float(plateau_scale(state)))
    return scales


@pytest.mark.parametrize("rising", [[1.0, 0.95, 1.05, 1.2, 1.25],          # metrics above zero
                                    [-1.0, -1.05, -0.95, -0.85, -0.8]])     # and below
def test_plateau_rtol_is_an_improvement_by_more_than_rtol_of_the_best_in_both_modes(rising):
    """An improvement is a move in the mode's direction by more than rtol x |best| + atol.
    rtol 0.1, patience 2: from best 1.0, 0.95 (worse) and 1.05 (better by 5 % < 10 %) are two
    checks without improvement -> halved; 1.2 improves (best 1.2); 1.25 needs > 1.32. Below zero
    the same: from -1.0, -0.95 is not above -0.9; -0.85 is; -0.8 is not above -0.765."""
    expect = [1.0, 1.0, 0.5, 0.5, 0.5]
    kw = dict(factor=0.5, patience=2, rtol=0.1, atol=0.0, min_scale=0.01)
    assert plateau_scales("max", rising, **kw) == expect
    ours = make_optimizer(cfg(schedule="plateau", plateau=PlateauConfig(**kw)), 10)[0].init({"w": jnp.zeros(2)})[-1]
    theirs = optax.contrib.reduce_on_plateau(**kw).init({"w": jnp.zeros(2)})
    assert jax.tree.structure(ours) == jax.tree.structure(theirs)        # checkpoints unchanged
    assert plateau_scales("min", [-m for m in rising], **kw) == expect
    # atol adds to the threshold: from best 1.0 with atol 0.05, 1.14 is not > 1.0 + 0.1 + 0.05
    kw.update(atol=0.05, patience=1)
    assert plateau_scales("max", [1.0, 1.14, 1.16], **kw) == [1.0, 0.5, 0.5]
    assert plateau_scales("min", [-1.0, -1.14, -1.16], **kw) == [1.0, 0.5, 0.5]


def test_plateau_equals_optax_where_optax_is_right():
    """Values above zero, minimised: the decisions, cooldown and accumulation are optax's."""
    kw = dict(factor=0.5, patience=2, rtol=0.05, atol=0.01, cooldown=1, accumulation_size=2, min_scale=0.2)
    values = np.abs(np.random.default_rng(0).normal(1.0, 0.3, 40)).astype(np.float32)
    ours, theirs = optim.reduce_on_plateau(**kw), optax.contrib.reduce_on_plateau(**kw)
    params, g = {"w": jnp.zeros(2)}, {"w": jnp.ones(2)}
    a, b = ours.init(params), theirs.init(params)
    for v in values:
        _, a = ours.update(g, a, params, value=v)
        _, b = theirs.update(g, b, params, value=v)
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6)
    assert float(a.scale) < 1.0


@pytest.mark.parametrize("scale", [0.01, 100.0])            # below and above the clip
def test_clip_equals_optax_and_takes_the_callers_norm(scale):
    rng = np.random.default_rng(0)
    tree = {"w": jnp.asarray(rng.normal(size=(7, 5)) * scale, jnp.float32), "b": jnp.asarray(rng.normal(size=(5,)) * scale, jnp.float32)}
    want, _ = optax.clip_by_global_norm(1.0).update(tree, optax.EmptyState())
    ours = clip_by_global_norm(1.0)
    state = ours.init(tree)
    assert jax.tree.structure(state) == jax.tree.structure(optax.clip_by_global_norm(1.0).init(tree))  # checkpoints unchanged
    got, _ = ours.update(tree, state)
    given, _ = ours.update(tree, state, grad_norm=optax.tree.norm(tree))
    for a, b, c in zip(jax.tree.leaves(got), jax.tree.leaves(given), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(c), rtol=1e-6)
        np.testing.assert_allclose(np.asarray(b), np.asarray(c), rtol=1e-6)
    half, _ = ours.update(tree, state, grad_norm=jnp.float32(2.0))   # a norm of 2 halves every leaf
    np.testing.assert_allclose(np.asarray(half["w"]), np.asarray(tree["w"]) / 2, rtol=1e-6)


def test_the_update_computes_each_norm_once(monkeypatch):
    """The update passes the norm it computed (metrics, non-finite check) to the clip."""
    from test_update import make_batch, models_and_sgd, ppo_update

    from jaxppo.engine.update import UpdateSettings

    graphs, params, _ = models_and_sgd()
    txs = tuple(make_optimizer(cfg(lr=1e-3, max_grad_norm=1.0), total_updates=10)[0] for _ in range(2))
    opts = tuple(tx.init(p) for tx, p in zip(txs, params))
    calls = []
    real = optim.global_norm
    monkeypatch.setattr(optim, "global_norm", lambda t: calls.append(1) or real(t))
    jax.make_jaxpr(lambda p, o, b: ppo_update(graphs, p, o, b, jax.random.PRNGKey(0), txs,
                                              UpdateSettings(epochs=1, num_minibatches=2)))(params, opts, make_batch(0))
    assert calls == []                                  # the clip never computed its own
