"""Masked reductions over response tokens.

Every token statistic in PPO for language models must ignore the padding after the first EOS,
otherwise the loss and the whitening depend on how much padding a batch happens to carry.
`mask` is 1.0 on valid tokens and 0.0 elsewhere (any float weight works for the sums and
means). All functions are safe on an all-zero mask: they return 0, never NaN, and values in
the masked-out positions (NaN or inf included) never reach the result.

The semantics follow TRL (`trl.trainer.utils.masked_mean/var/whiten`), which in turn follows
OpenAI's lm-human-preferences `whiten`.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp

Axis = Optional[Union[int, Sequence[int]]]

# Added to the variance before the inverse square root when whitening (TRL's constant).
WHITEN_EPS = 1e-8


def check_shape(name: str, x: jax.Array, *, ndim: Optional[int] = None,
                shape: Optional[Sequence[int]] = None) -> None:
    """Raise `ValueError` naming `name` if `x` has the wrong rank or shape (static check)."""
    x_shape = tuple(jnp.shape(x))
    if ndim is not None and len(x_shape) != ndim:
        raise ValueError(f"{name}: expected rank {ndim}, got shape {x_shape}")
    if shape is not None and x_shape != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {x_shape}")


def _prepare(x: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    x = jnp.asarray(x)
    mask = jnp.asarray(mask)
    check_shape("mask", mask, shape=x.shape)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.float32)
    return x, mask.astype(x.dtype)


def safe_div(num: jax.Array, den: jax.Array) -> jax.Array:
    """num / den, and 0 where den == 0 (both branches finite, so gradients stay finite too)."""
    nonzero = den != 0
    return jnp.where(nonzero, num / jnp.where(nonzero, den, 1.0), 0.0)


def masked_sum(x: jax.Array, mask: jax.Array, axis: Axis = None) -> jax.Array:
    """sum_i mask_i * x_i over `axis` (all axes by default). `x` and `mask` have equal shapes.

    Positions with mask 0 contribute exactly 0 even if `x` holds NaN/inf there.
    """
    x, mask = _prepare(x, mask)
    return jnp.sum(jnp.where(mask != 0, x * mask, 0.0), axis=axis)


def masked_mean(x: jax.Array, mask: jax.Array, axis: Axis = None) -> jax.Array:
    """sum(mask * x) / sum(mask) over `axis`; 0 where the mask sums to 0."""
    x, mask = _prepare(x, mask)
    return safe_div(masked_sum(x, mask, axis=axis), jnp.sum(mask, axis=axis))


def masked_var(x: jax.Array, mask: jax.Array, unbiased: bool = True) -> jax.Array:
    """Variance of the valid entries of `x` (a scalar, over all axes).

        var = masked_mean((x - masked_mean(x))^2)            (population variance)
        var *= n / (n - 1)   if unbiased, with n = sum(mask)  (Bessel, as TRL)

    Safe for n <= 1: the correction is skipped (TRL would divide by zero), so one valid
    token gives 0 and an all-zero mask gives 0.
    """
    x, mask = _prepare(x, mask)
    mean = masked_mean(x, mask)
    var = masked_mean(jnp.square(x - mean), mask)
    if unbiased:
        n = jnp.sum(mask)
        var = var * jnp.where(n > 1, n / jnp.where(n > 1, n - 1, 1.0), 1.0)
    return var


def masked_whiten(x: jax.Array, mask: jax.Array, shift_mean: bool = True) -> jax.Array:
    """Whiten `x` with the statistics of its valid entries (TRL / lm-human-preferences).

        w = (x - mean) * rsqrt(var + 1e-8)       mean, var = masked_mean, masked_var(unbiased)
        w = w + mean                             if not shift_mean (only rescale)

    Differs from TRL in one respect only: masked-out positions are set to 0 (TRL zeroes the
    advantages on padding right after whitening anyway), so padding never carries large values.
    """
    x, mask = _prepare(x, mask)
    mean = masked_mean(x, mask)
    var = masked_var(x, mask, unbiased=True)
    whitened = (x - mean) * jax.lax.rsqrt(var + WHITEN_EPS)
    if not shift_mean:
        whitened = whitened + mean
    return jnp.where(mask != 0, whitened, 0.0)
