"""Schedules and the optimiser chain against hand-computed values."""


import jax.numpy as jnp
import numpy as np

from jaxppo.config import OptimConfig, PlateauConfig
from jaxppo.optim import current_lr, make_optimizer, make_schedule, plateau_scale


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
