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
