"""The PPO update: epochs ⊃ minibatches ⊃ micro-batches as nested `lax.scan`.

`epochs x num_minibatches` optimiser steps for the policy and for the critic over one rollout
batch (Schulman et al. 2017, as in TRL's PPOTrainer):

    for epoch:                                    # a fresh permutation of the B rows
        for minibatch (B / M rows):
            g = sum over micro-batches of  d/dθ [ Σ pg_tok + vf_coef Σ vf_tok - ent_coef Σ ent_tok ] / N
            θ <- optax step(g)                    # N = valid tokens in the whole minibatch
                                                  # (skipped if that model's loss or g is not finite)

The policy and the critic share no parameters, so each model's gradient of that objective is the
gradient of its own terms: `model_update` runs one model's steps, and the trainer compiles one
program per model, which run side by side when the two models sit on different devices
(`train.placement`). Both draw their minibatches from the same key, so they see the same rows.

Dividing the micro-batch token sums by the minibatch's token count N makes gradient accumulation
exact: the summed gradient equals the gradient of the big minibatch's token mean, whatever the
response lengths (averaging micro-batch means would weight short responses up).

Metrics are token-weighted means over every minibatch of every epoch, not the last one.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from jaxppo.core.losses import entropy_from_logits, logprobs_from_logits, policy_loss, value_loss
from jaxppo.core.masked import masked_sum
from jaxppo.engine.optimizer import global_norm


@struct.dataclass
class PPOBatch:
    """One rollout, ready for the update. P prompt slots, R response slots."""

    tokens: jax.Array         # [B, P+R] prompt + response ids
    attention_mask: jax.Array  # [B, P+R] 0 on left padding of the prompt
    response: jax.Array       # [B, R]
    mask: jax.Array           # [B, R] float32, 1 up to and including the first EOS
    old_logprobs: jax.Array   # [B, R]
    old_values: jax.Array     # [B, R]
    advantages: jax.Array     # [B, R]
    returns: jax.Array        # [B, R]


@dataclasses.dataclass(frozen=True)
class UpdateSettings:
    epochs: int = 4
    num_minibatches: int = 2
    grad_accum_steps: int = 1
    clip_eps: float = 0.2
    clip_value: float = 0.2
    vf_coef: float = 0.1
    ent_coef: float = 0.0
    temperature: float = 0.7   # the training forward scores logits / T, as the sampler did
    logits_chunk_bytes: int | None = None   # head over response slices of this many logits bytes (None: whole)


# On a GPU or TPU a sequence length that is a multiple of this runs faster than one token fewer
# (H200, bf16, Qwen2-0.5B shape, 32 x 384 vs 32 x 383 tokens: update 2.08 vs 2.37 s), so there the
# last token is kept when that makes the length aligned. The CPU gains nothing from alignment.
SEQ_ALIGN = 16


def forward_length(total: int, backend: str | None = None) -> int:
    """How many leading tokens of a `[B, total]` sequence the scoring and training forwards run:
    `total - 1` (the last token predicts nothing), or `total` on an accelerator when `total` is a
    multiple of `SEQ_ALIGN`. `backend` defaults to JAX's default backend (read at trace time, so
    after `jax.distributed.initialize()`)."""
    backend = backend or jax.default_backend()
    return total if backend != "cpu" and total % SEQ_ALIGN == 0 else total - 1


def _predicting_prefix(tokens, attention_mask, response_len: int):
    """The `[B, S]` prefix of a `[B, P+R]` sequence (S = `forward_length(P+R)`, normally P+R-1),
    and the R positions P-1 .. P+R-2 whose outputs predict the response tokens. The last token
    predicts nothing and, under the causal mask, no earlier position attends to it, so it is not
    run (1/(P+R) of the trunk's work) unless keeping it gives an accelerator an aligned length."""
    if tokens.ndim != 2 or attention_mask.shape != tokens.shape or not 0 < response_len < tokens.shape[1]:
        raise ValueError(f"need tokens and attention_mask of one shape [B, P+R] with P >= 1 and R = "
                         f"{response_len} >= 1; got {tokens.shape} and {attention_mask.shape}")
    S, last = forward_length(tokens.shape[1]), tokens.shape[1] - 1
    return tokens[:, :S], attention_mask[:, :S], (last - response_len, last)


def response_logprobs(model, tokens, attention_mask, response, temperature: float, *,
                      entropy: bool = False, chunk_bytes: int | None = None):
    """log p(response) under softmax(logits / temperature), and the per-token entropy of that
    distribution if `entropy`: tokens [B, P+R], response [B, R] -> ([B, R], [B, R] or None), float32.

    With `chunk_bytes`, the trunk runs once and the head, the log-softmax and the entropy run over
    slices of the response positions whose float32 logits fit `chunk_bytes`, each slice recomputed
    in the backward pass (`jax.checkpoint`): memory O(B x slice x V) instead of O(B x R x V) (5 GB
    for 32 x 256 tokens of a 152k vocabulary), for one more head matmul in the backward."""
    B, R = response.shape
    tokens, attention_mask, rows = _predicting_prefix(tokens, attention_mask, R)
    h = model.hidden_states(tokens, attention_mask, outputs_at=rows)  # [B, R, H]

    def stats(h, tok):
        logits = model.apply_head(h).astype(jnp.float32) / temperature
        return logprobs_from_logits(logits, tok), entropy_from_logits(logits) if entropy else None

    size = R if chunk_bytes is None else max(1, min(R, chunk_bytes // (B * model.config.vocab_size * 4)))
    if size == R:
        return stats(h, response)
    n = -(-R // size)                                     # slices of `size` positions, the last one padded
    pad = n * size - R
    h = jnp.pad(h, ((0, 0), (0, pad), (0, 0))).reshape(B, n, size, -1).swapaxes(0, 1)    # [n, B, size, H]
    tok = jnp.pad(response, ((0, 0), (0, pad))).reshape(B, n, size).swapaxes(0, 1)     # [n, B, size]
    lp, ent = jax.lax.map(lambda xs: jax.checkpoint(stats)(*xs), (h, tok))
    unslice = lambda x: None if x is None else x.swapaxes(0, 1).reshape(B, n * size)[:, :R]
    return unslice(lp), unslice(ent)


def response_values(model, tokens, attention_mask, response_len: int):
    """Critic values for the state before each response token -> [B, R]."""
    tokens, attention_mask, rows = _predicting_prefix(tokens, attention_mask, response_len)
    return model(tokens, attention_mask, outputs_at=rows)


POLICY, CRITIC = "policy", "critic"
_SUMS = {POLICY: ("pg_loss", "pg_clipfrac", "approxkl", "ratio", "entropy", "tokens"),
         CRITIC: ("vf_loss", "vf_clipfrac", "tokens")}


def _micro_loss(kind: str, params, graphdef, mb: PPOBatch, n_tokens, s: UpdateSettings):
    """One model's share of the PPO objective on a micro-batch, divided by the minibatch's token
    count: the policy's `(Σ pg_tok - ent_coef Σ ent_tok) / N`, the critic's `vf_coef Σ vf_tok / N`.
    The two share no parameters, so each model's gradient of the joint objective is the gradient of
    its own share. Returns (loss, token sums for the metrics)."""
    model = nnx.merge(graphdef, params)
    R = mb.response.shape[1]
    if kind == CRITIC:
        values = response_values(model, mb.tokens, mb.attention_mask, R)
        _, vf = value_loss(values, mb.old_values, mb.returns, mb.mask, s.clip_value)
        sums = {"vf_loss": vf["loss_sum"], "vf_clipfrac": vf["clipfrac_sum"], "tokens": vf["count"]}
        return s.vf_coef * vf["loss_sum"] / n_tokens, sums
    logprobs, ent = response_logprobs(model, mb.tokens, mb.attention_mask, mb.response, s.temperature,
                                      entropy=True, chunk_bytes=s.logits_chunk_bytes)
    _, pg = policy_loss(logprobs, mb.old_logprobs, mb.advantages, mb.mask, s.clip_eps)
    if not s.ent_coef:
        ent = jax.lax.stop_gradient(ent)              # a metric only: no backward through the softmax
    ent_sum = masked_sum(ent, mb.mask)
    sums = {"pg_loss": pg["loss_sum"], "pg_clipfrac": pg["clipfrac_sum"], "approxkl": pg["approxkl_sum"],
            "ratio": pg["ratio_sum"], "entropy": ent_sum, "tokens": pg["count"]}
    return (pg["loss_sum"] - s.ent_coef * ent_sum) / n_tokens, sums


def _take(batch: PPOBatch, idx):
    return jax.tree.map(lambda x: x[idx], batch)


def minibatch_permutations(key, batch_size: int, s: UpdateSettings) -> jax.Array:
    """`[epochs, M, B/M]` row indices: a fresh permutation of the B rows per epoch. Both models'
    updates draw them from the same key, so they step through the same minibatches."""
    perms = [jax.random.permutation(k, batch_size) for k in jax.random.split(key, s.epochs)]
    return jnp.stack(perms).reshape(s.epochs, s.num_minibatches, batch_size // s.num_minibatches)


def model_update(kind: str, graphdef, params, opt_state, batch: PPOBatch, key, tx, s: UpdateSettings,
                 plateau_value=None):
    """All epochs and minibatches of one model's optimiser steps (`kind`: "policy" or "critic").
    Pure; jit it (the trainer does, in `step.py`, one program per model).

    A step whose loss or gradient is not finite is skipped: the weights and the optimiser state
    stay as they were (`optax.apply_if_finite`'s rule, decided before the step so that XLA can
    update every weight in place). Returns (params, opt_state, sums): each sum `[epochs, M]`,
    with `grad_norm` and `skipped` per step.
    """
    B = batch.tokens.shape[0]
    M, A = s.num_minibatches, s.grad_accum_steps
    if B % (M * A):
        raise ValueError(f"batch {B} must divide into {M} minibatches x {A} micro-batches")
    micro = B // (M * A)
    grad_fn = jax.value_and_grad(functools.partial(_micro_loss, kind), has_aux=True)
    extra = {} if plateau_value is None else {"value": plateau_value}
    tx = optax.with_extra_args_support(tx)

    def minibatch_step(carry, idx):                      # idx [B/M]
        params, opt_state = carry
        mb = _take(batch, idx)
        n_tokens = jnp.maximum(mb.mask.sum(), 1.0)
        micro_batches = jax.tree.map(lambda x: x.reshape((A, micro) + x.shape[1:]), mb)  # [A, micro, ...]

        def accumulate(acc, mbi):
            (_, sums), grads = grad_fn(params, graphdef, mbi, n_tokens, s)
            return jax.tree.map(jnp.add, acc, (grads, sums)), None

        zeros = (jax.tree.map(jnp.zeros_like, params), {k: jnp.float32(0) for k in _SUMS[kind]})
        if A == 1:
            (grads, sums), _ = accumulate(zeros, jax.tree.map(lambda x: x[0], micro_batches))
        else:
            (grads, sums), _ = jax.lax.scan(accumulate, zeros, micro_batches)
        norm = global_norm(grads)
        loss_sum = sums["pg_loss" if kind == POLICY else "vf_loss"]
        finite = jnp.isfinite(norm) & jnp.isfinite(loss_sum)

        def apply(operands):
            params, opt_state, grads = operands
            # the norm goes to optim.clip_by_global_norm (computed once); other transforms ignore it
            updates, opt_state = tx.update(grads, opt_state, params, grad_norm=norm, **extra)
            return optax.apply_updates(params, updates), opt_state

        carry = jax.lax.cond(finite, apply, lambda ops: ops[:2], (params, opt_state, grads))
        sums["grad_norm"] = norm
        sums["skipped"] = 1.0 - finite.astype(jnp.float32)
        return carry, sums

    def epoch_step(carry, perm):                         # perm [M, B/M]
        return jax.lax.scan(minibatch_step, carry, perm)

    (params, opt_state), sums = jax.lax.scan(epoch_step, (params, opt_state),
                                             minibatch_permutations(key, B, s))
    return params, opt_state, sums


def update_metrics(policy_sums, critic_sums) -> dict:
    """The update's metrics from both models' per-step sums (`model_update`): token-weighted means
    over every minibatch of every epoch, mean gradient norms, and `nonfinite_steps`, the optimiser
    steps in which either model skipped."""
    p, c = policy_sums, critic_sums
    n = jnp.maximum(p["tokens"].sum(), 1.0)
    mean = lambda x: x.sum() / n
    return {
        "loss/policy_avg": mean(p["pg_loss"]),
        "loss/value_avg": mean(c["vf_loss"]),
        "policy/approxkl_avg": mean(p["approxkl"]),
        "policy/clipfrac_avg": mean(p["pg_clipfrac"]),
        "policy/entropy_avg": mean(p["entropy"]),
        "val/clipfrac_avg": mean(c["vf_clipfrac"]),
        "val/ratio": mean(p["ratio"]),
        "policy/grad_norm": p["grad_norm"].mean(),
        "val/grad_norm": c["grad_norm"].mean(),
        "nonfinite_steps": jnp.maximum(p["skipped"], c["skipped"]).sum(),
    }


def ppo_update(graphdefs, params, opt_states, batch: PPOBatch, key, txs, s: UpdateSettings,
               plateau_value=None):
    """Both models' updates (`model_update`) and their metrics (`update_metrics`) in one call.

    graphdefs, params, opt_states, txs: pairs (policy, critic).
    Returns (params, opt_states, metrics). The trainer runs the two models as two programs, on
    their own devices when the placement is "separate" (`step.PPOPrograms`).
    """
    out = [model_update(kind, g, p, o, batch, key, tx, s, plateau_value)
           for kind, g, p, o, tx in zip((POLICY, CRITIC), graphdefs, params, opt_states, txs)]
    (pp, po, ps), (cp, co, cs) = out
    return (pp, cp), (po, co), update_metrics(ps, cs)
