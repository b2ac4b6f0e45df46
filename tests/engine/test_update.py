"""The update (`model_update` on each model's objective, `update_metrics`): token-exact gradient accumulation, the loss goes down on a fixed batch, metrics."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxppo.engine.update import (PPOBatch, UpdateSettings, model_update, policy_objective, update_metrics,
                                  value_objective)

from helpers import left_padded_batch, small_model

B, P, R = 8, 5, 6


def make_batch(seed=0):
    rng = np.random.default_rng(seed)
    ids, pmask = left_padded_batch(B=B, P=P, seed=seed)
    response = rng.integers(4, 97, size=(B, R)).astype(np.int32)
    lengths = np.array([6, 1, 3, 6, 2, 5, 4, 6])             # ragged: exactness needs token weighting
    mask = (np.arange(R)[None] < lengths[:, None]).astype(np.float32)
    tokens = np.concatenate([ids, response], axis=1)
    attn = np.concatenate([pmask, np.ones_like(response)], axis=1)
    return PPOBatch(
        tokens=jnp.asarray(tokens), attention_mask=jnp.asarray(attn), response=jnp.asarray(response),
        mask=jnp.asarray(mask),
        old_logprobs=jnp.asarray(rng.normal(-4.6, 0.3, (B, R)).astype(np.float32)) * mask,
        old_values=jnp.asarray(rng.normal(0, 0.5, (B, R)).astype(np.float32)) * mask,
        advantages=jnp.asarray(rng.normal(0, 1, (B, R)).astype(np.float32)) * mask,
        returns=jnp.asarray(rng.normal(0, 1, (B, R)).astype(np.float32)) * mask)


def models_and_sgd(lr=1e-3):
    # (not `setup`: pytest 8.0 calls a module-level `setup()` as a nose-style fixture, with the module)
    policy, critic = small_model(0), small_model(1, head="scalar")
    (pg, pp), (cg, cp) = nnx.split(policy), nnx.split(critic)
    txs = (optax.sgd(lr), optax.sgd(lr))
    return (pg, cg), (pp, cp), txs


T = 0.7   # the sampling temperature the policy objective scores under


def objectives(s: UpdateSettings):
    return policy_objective(s, T), value_objective(s)


def ppo_update(graphs, params, opts, batch, key, txs, s: UpdateSettings):
    """Both models' updates as the iteration runs them (`model_update` on each model's objective)
    and their metrics (`update_metrics`), in one call."""
    (pp, po, ps), (cp, co, cs) = [model_update(o, g, p, op, batch, key, tx, s)
                                  for o, g, p, op, tx in zip(objectives(s), graphs, params, opts, txs)]
    return (pp, cp), (po, co), update_metrics(ps, cs).as_dict()


def joint_loss(params, graphs, mb, n_tokens, s):
    """The PPO objective of both models (each model's objective share, summed) and their sums."""
    parts = [o.loss(nnx.merge(g, p), mb, n_tokens) for o, p, g in zip(objectives(s), params, graphs)]
    return parts[0][0] + parts[1][0], {**parts[0][1]._asdict(), **parts[1][1]._asdict()}


def run_update(s: UpdateSettings, batch, lr=1e-3, key=0):
    graphs, params, txs = models_and_sgd(lr)
    opts = tuple(tx.init(p) for tx, p in zip(txs, params))
    fn = jax.jit(lambda params, opts, batch, key: ppo_update(graphs, params, opts, batch, key, txs, s))
    return fn(params, opts, batch, jax.random.PRNGKey(key))


def test_grad_accumulation_equals_large_batch():
    batch = make_batch()
    base = UpdateSettings(epochs=1, num_minibatches=1, grad_accum_steps=1, ent_coef=0.01)
    p1, _, m1 = run_update(base, batch)
    for accum in (2, 8):
        pa, _, ma = run_update(dataclasses.replace(base, grad_accum_steps=accum), batch)
        for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(pa)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-7)
        for k in m1:
            if "grad_norm" not in k:
                np.testing.assert_allclose(m1[k], ma[k], rtol=2e-5, atol=1e-7, err_msg=k)


def test_mean_of_micro_means_would_differ():
    """Guards the test above: with ragged masks a naive average of micro-batch means is different."""
    batch = make_batch()
    graphs, params, _ = models_and_sgd()
    s = UpdateSettings()
    total = jnp.maximum(batch.mask.sum(), 1.0)
    loss = jax.jit(lambda p, mb, n: joint_loss(p, graphs, mb, n, s)[0])     # eager, it took ~30 s
    full = loss(params, batch, total)
    halves = [jax.tree.map(lambda x: x[i * 4:(i + 1) * 4], batch) for i in range(2)]
    naive = sum(loss(params, h, h.mask.sum()) for h in halves) / 2
    assert abs(float(full) - float(naive)) > 1e-4


def test_update_lowers_loss_on_fixed_batch():
    batch = make_batch(1)
    graphs, params, _ = models_and_sgd()
    s = UpdateSettings(epochs=4, num_minibatches=2, clip_eps=10.0, clip_value=10.0)
    n = batch.mask.sum()
    before, _ = joint_loss(params, graphs, batch, n, s)
    new_params, _, metrics = run_update(s, batch, lr=3e-3)
    after, _ = joint_loss(new_params, graphs, batch, n, s)
    assert float(after) < float(before) - 1e-3, (float(before), float(after))
    for k in ("loss/policy_avg", "loss/value_avg", "policy/approxkl_avg", "policy/clipfrac_avg",
              "val/clipfrac_avg", "val/ratio", "policy/entropy_avg"):
        assert np.isfinite(float(metrics[k])), k


def test_first_minibatch_ratio_is_one_and_metrics_average_all_minibatches():
    batch = make_batch(2)
    graphs, params, _ = models_and_sgd()
    s = UpdateSettings(epochs=2, num_minibatches=2)
    # old log-probs from the current policy: the first step's ratio is exactly 1
    from jaxppo.core.losses import logprobs_from_logits
    policy = nnx.merge(graphs[0], params[0])
    logits = policy(batch.tokens, batch.attention_mask)[:, -R - 1:-1]    # the positions predicting the response
    lp = logprobs_from_logits(logits / 0.7, batch.response)
    batch = batch.replace(old_logprobs=lp * batch.mask)
    _, _, m_zero_lr = run_update(s, batch, lr=0.0)
    np.testing.assert_allclose(float(m_zero_lr["val/ratio"]), 1.0, atol=1e-5)
    np.testing.assert_allclose(float(m_zero_lr["policy/clipfrac_avg"]), 0.0, atol=1e-7)


def test_no_retrace_between_iterations():
    batch = make_batch()
    graphs, params, txs = models_and_sgd()
    opts = tuple(tx.init(p) for tx, p in zip(txs, params))
    traces = []
    s = UpdateSettings(epochs=1, num_minibatches=2)

    @jax.jit
    def fn(params, opts, batch, key):
        traces.append(1)
        return ppo_update(graphs, params, opts, batch, key, txs, s)

    params, opts, _ = fn(params, opts, batch, jax.random.PRNGKey(0))
    params, opts, _ = fn(params, opts, make_batch(3), jax.random.PRNGKey(1))
    assert len(traces) == 1


def test_indivisible_batch_raises():
    batch = make_batch()
    with pytest.raises(ValueError, match="minibatches"):
        run_update(UpdateSettings(num_minibatches=3), batch)


def test_remat_under_jit_grad_of_merged_params():
    """model.remat in the trainer's setting: params split outside, merged inside jit(grad(...))."""
    from jaxppo.models.transformer import Transformer
    ids = jnp.arange(12).reshape(2, 6) % 97
    out = []
    for remat in (False, True):
        g, p = nnx.split(Transformer(small_model().config, remat=remat, rngs=nnx.Rngs(0)))
        v, grads = jax.jit(jax.value_and_grad(lambda p: nnx.merge(g, p)(ids).sum()))(p)
        out.append((v, grads))
    np.testing.assert_allclose(float(out[0][0]), float(out[1][0]), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(out[0][1]), jax.tree.leaves(out[1][1])):
        # the recomputed forward may sum in another order: float32 rounding relative to the
        # leaf's largest entry (gradients of a logit sum reach ~20 here)
        a, b = np.asarray(a), np.asarray(b)
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * max(1.0, float(np.abs(a).max())))


def test_global_norm_equals_optax_tree_norm():
    from jaxppo.engine.optimizer import global_norm

    tree = {"w": jax.random.normal(jax.random.PRNGKey(0), (3, 7, 5)), "b": jnp.arange(4.0),
            "s": jnp.float32(2.0), "h": jax.random.normal(jax.random.PRNGKey(1), (6, 1))}
    np.testing.assert_allclose(global_norm(tree), optax.tree.norm(tree), rtol=1e-6)


def test_a_non_finite_step_is_skipped_and_the_others_apply():
    """One row's advantage is nan: the policy skips the optimiser step of the minibatch holding it
    (weights and optimiser state untouched) and the other minibatch's step applies as if it were
    alone; the critic, whose loss does not read advantages, takes both steps."""
    batch = make_batch(4)
    batch = batch.replace(advantages=batch.advantages.at[0, 0].set(jnp.nan))
    s = UpdateSettings(epochs=1, num_minibatches=2)
    graphs, params, _ = models_and_sgd()
    txs = (optax.adam(1e-3), optax.adam(1e-3))
    opts = tuple(tx.init(p) for tx, p in zip(txs, params))
    key = jax.random.PRNGKey(0)
    new_params, new_opts, m = jax.jit(lambda p, o, b: ppo_update(graphs, p, o, b, key, txs, s))(params, opts, batch)
    assert float(m["nonfinite_steps"]) == 1.0
    assert [int(o[0].count) for o in new_opts] == [1, 2]      # the policy's Adam counted one step, the critic's two
    assert not np.isfinite(float(m["loss/policy_avg"]))       # the skipped step's loss shows in the means

    perm = np.asarray(jax.random.permutation(jax.random.split(key, 1)[0], B)).reshape(2, B // 2)
    clean = perm[1] if 0 in perm[0] else perm[0]
    alone = jax.tree.map(lambda x: x[np.sort(clean)], batch)
    one = dataclasses.replace(s, num_minibatches=1)
    ref_params, _, _ = jax.jit(lambda p, o, b: ppo_update(graphs, p, o, b, key, txs, one))(params, opts, alone)
    for a, b, p0 in zip(jax.tree.leaves(new_params[0]), jax.tree.leaves(ref_params[0]), jax.tree.leaves(params[0])):
        assert np.all(np.isfinite(np.asarray(a)))
        # Adam moves each weight by ~1e-3 per step; summation order differs between the two runs
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=2e-5)
    assert any(not np.array_equal(np.asarray(a), np.asarray(p0))
               for a, p0 in zip(jax.tree.leaves(new_params[0]), jax.tree.leaves(params[0])))
    # the critic's two steps: as an update of the critic alone on the whole batch
    full, _, _ = jax.jit(lambda p, o, b: ppo_update(graphs, p, o, b, key, txs, s))(
        params, opts, batch.replace(advantages=jnp.nan_to_num(batch.advantages)))
    for a, b in zip(jax.tree.leaves(new_params[1]), jax.tree.leaves(full[1])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _policy_objective(graph, batch, chunk_bytes):
    """A loss on the response log-probs and entropies: (value, (logprobs, entropy))."""
    from jaxppo.engine.scoring import response_logprobs

    def f(params):
        policy = nnx.merge(graph, params)
        lp, ent = response_logprobs(policy, batch.tokens, batch.attention_mask, batch.response, T,
                                    entropy=True, chunk_bytes=chunk_bytes)
        return ((lp * batch.advantages + 0.1 * ent) * batch.mask).sum(), (lp, ent)
    return f


@pytest.mark.parametrize("positions", [1, 4])      # R = 6: six slices; two slices, the last one padded
def test_logits_in_slices_equal_the_whole_with_their_gradients(positions):
    batch = make_batch(3)
    graphs, params, _ = models_and_sgd()
    V = nnx.merge(graphs[0], params[0]).config.vocab_size
    chunk = positions * B * V * 4
    (v0, (lp0, ent0)), g0 = jax.jit(jax.value_and_grad(_policy_objective(graphs[0], batch, None), has_aux=True))(params[0])
    f = _policy_objective(graphs[0], batch, chunk)
    assert "remat" in str(jax.make_jaxpr(jax.grad(lambda p: f(p)[0]))(params[0]))   # really sliced
    (v1, (lp1, ent1)), g1 = jax.jit(jax.value_and_grad(f, has_aux=True))(params[0])
    assert lp1.shape == ent1.shape == (B, R)
    np.testing.assert_allclose(np.asarray(lp1), np.asarray(lp0), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(ent1), np.asarray(ent0), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(float(v1), float(v0), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_an_update_with_sliced_logits_equals_the_whole():
    batch = make_batch(5)
    s = UpdateSettings(epochs=2, num_minibatches=2, ent_coef=0.01)
    p0, _, m0 = run_update(s, batch)
    p1, _, m1 = run_update(dataclasses.replace(s, logits_chunk_bytes=2 * (B // 2) * 97 * 4), batch)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p0)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    for k in m0:
        np.testing.assert_allclose(float(m1[k]), float(m0[k]), rtol=1e-5, atol=1e-7, err_msg=k)


def test_sliced_logits_bound_the_backward_memory():
    """A vocabulary-heavy shape (8192 tokens, 4 x 64 response positions: 8 MiB of logits): the
    compiled gradient's scratch with 1 MiB slices is a fraction of the whole computation's."""
    from jaxppo.models.transformer import Transformer

    from helpers import small_config

    rng = np.random.default_rng(0)
    model = Transformer(dataclasses.replace(small_config(vocab=8192), hidden_size=16, head_dim=4, num_layers=1),
                        rngs=nnx.Rngs(0))
    graph, params = nnx.split(model)
    b, r = 4, 64
    tokens = jnp.asarray(rng.integers(4, 8192, (b, 8 + r)), jnp.int32)
    batch = PPOBatch(tokens=tokens, attention_mask=jnp.ones_like(tokens), response=tokens[:, 8:],
                     mask=jnp.ones((b, r)), old_logprobs=jnp.zeros((b, r)), old_values=jnp.zeros((b, r)),
                     advantages=jnp.asarray(rng.normal(size=(b, r)), jnp.float32), returns=jnp.zeros((b, r)))
    scratch = {}
    for chunk in (None, 2**20):
        grad = jax.jit(jax.grad(lambda p, chunk=chunk: _policy_objective(graph, batch, chunk)(p)[0]))
        scratch[chunk] = grad.lower(params).compile().memory_analysis().temp_size_in_bytes
    logits = b * r * 8192 * 4
    assert scratch[None] > 2 * logits, scratch           # the whole logits and their softmax
    assert scratch[2**20] < scratch[None] / 4, scratch


@pytest.mark.parametrize("arch,backend", [("llama", "cpu"), ("gpt2", "cpu"), ("llama", "gpu")])
def test_the_last_token_is_never_run(monkeypatch, arch, backend):
    """It predicts nothing and, under the causal mask, nothing attends to it: the policy and the
    critic run their trunks on the P+R-1 prefix, and the log-probs and values equal a full
    forward's at the R positions that predict the response (left-padded rows included). On an
    accelerator, where P+R is a multiple of SEQ_ALIGN (here made 11 = P+R), the whole sequence
    runs instead, with the same results."""
    from jaxppo.engine import scoring
    from jaxppo.engine.scoring import response_logprobs, response_values
    from jaxppo.models.transformer import Transformer

    if backend != "cpu":
        monkeypatch.setattr(scoring.jax, "default_backend", lambda: backend)
        monkeypatch.setattr(scoring, "SEQ_ALIGN", P + R)

    batch = make_batch(2)
    policy, critic = small_model(0, arch=arch), small_model(1, arch=arch, head="scalar")
    full_logits = policy(batch.tokens, batch.attention_mask)[:, -R - 1:-1] / 0.7
    want_lp = jnp.take_along_axis(jax.nn.log_softmax(full_logits, -1), batch.response[..., None], -1)[..., 0]
    want_values = critic(batch.tokens, batch.attention_mask)[:, -R - 1:-1]
    seen = []
    real = Transformer.hidden_states

    def spy(self, input_ids, attention_mask=None, **kw):
        seen.append(input_ids.shape)
        return real(self, input_ids, attention_mask, **kw)

    monkeypatch.setattr(Transformer, "hidden_states", spy)
    lp, _ = response_logprobs(policy, batch.tokens, batch.attention_mask, batch.response, 0.7)
    values = response_values(critic, batch.tokens, batch.attention_mask, R)
    run = P + R - (backend == "cpu")
    assert seen == [(B, run), (B, run)]
    np.testing.assert_allclose(np.asarray(lp), np.asarray(want_lp), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(values), np.asarray(want_values), rtol=1e-5, atol=1e-5)


def test_forward_length():
    from jaxppo.engine.scoring import SEQ_ALIGN, forward_length

    assert forward_length(384, "cpu") == 383 and forward_length(48, "cpu") == 47
    assert forward_length(384, "gpu") == 384 and forward_length(384, "tpu") == 384
    assert forward_length(SEQ_ALIGN * 3 + 1, "gpu") == SEQ_ALIGN * 3   # dropping the last token aligns it
    assert forward_length(SEQ_ALIGN * 3 + 5, "gpu") == SEQ_ALIGN * 3 + 4
    assert forward_length(11) == 10                                   # this suite runs on the CPU


def test_response_shapes_are_checked():
    from jaxppo.engine.scoring import response_logprobs, response_values

    batch = make_batch(0)
    policy = small_model(0)
    with pytest.raises(ValueError, match=r"\(8, 11\) and \(8, 10\)"):
        response_logprobs(policy, batch.tokens, batch.attention_mask[:, 1:], batch.response, 1.0)
    with pytest.raises(ValueError, match="R = 11"):
        response_values(policy, batch.tokens, batch.attention_mask, 11)


def policy_only(s: UpdateSettings, batch, accum: int = 1, lr: float = 1e-3):
    """The policy's update alone (`model_update` on `policy_objective`), as a critic-free run does."""
    graphs, params, txs = models_and_sgd(lr)
    s = dataclasses.replace(s, grad_accum_steps=accum)
    fn = jax.jit(lambda p, o, b: model_update(policy_objective(s, T), graphs[0], p, o, b, jax.random.PRNGKey(0),
                                              txs[0], s))
    params, _, stats = fn(params[0], txs[0].init(params[0]), batch)
    return params, update_metrics(stats, None).as_dict()


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                                  "seq-mean-token-sum-norm"])
def test_every_loss_aggregation_accumulates_exactly(mode):
    """Each micro-batch's share is divided by the whole minibatch's denominator (`aggregate_*`), so
    the accumulated gradient equals the big batch's, whatever the mode, the KL in the loss, the
    clip-higher and the dual-clip."""
    ref = jnp.asarray(np.random.default_rng(9).normal(-4.6, 0.3, (B, R)).astype(np.float32))
    batch = make_batch().replace(old_values=None, returns=None, ref_logprobs=ref * make_batch().mask)
    s = UpdateSettings(epochs=1, num_minibatches=1, loss_agg=mode, kl_coef=0.1, kl_estimator="k3",
                       clip_eps_high=0.28, dual_clip=3.0, ent_coef=0.01)
    p1, m1 = policy_only(s, batch)
    for accum in (2, 4):
        pa, ma = policy_only(s, batch, accum)
        for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(pa)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-7)
        for k in ("loss/policy_avg", "policy/kl_avg", "clip_ratio/low_mean", "clip_ratio/high_mean"):
            np.testing.assert_allclose(m1[k], ma[k], rtol=2e-5, atol=1e-7, err_msg=k)
    assert "loss/value_avg" not in m1 and m1["policy/kl_avg"] > 0


def test_the_kl_term_in_the_loss_pulls_towards_the_reference():
    """With ppo.kl_in=loss the policy loss carries kl_coef x KL(k3) per token: with zero advantages
    only that term moves the weights, and one step lowers the KL to the reference."""
    from jaxppo.core.rewards import kl_per_token
    from jaxppo.engine.scoring import response_logprobs

    batch = make_batch()
    graphs, params, _ = models_and_sgd()
    policy = nnx.merge(graphs[0], params[0])
    ref = jnp.asarray(np.random.default_rng(4).normal(-4.6, 0.3, (B, R)).astype(np.float32)) * batch.mask
    batch = batch.replace(advantages=jnp.zeros_like(batch.advantages), ref_logprobs=ref,
                          old_logprobs=response_logprobs(policy, batch.tokens, batch.attention_mask, batch.response,
                                                         T)[0] * batch.mask)

    def kl_after(params):
        lp, _ = response_logprobs(nnx.merge(graphs[0], params), batch.tokens, batch.attention_mask, batch.response, T)
        return float((kl_per_token(lp, ref, "k3") * batch.mask).sum())

    s = UpdateSettings(epochs=1, num_minibatches=1, kl_coef=1.0, kl_estimator="k3")
    moved, _ = policy_only(s, batch, lr=1e-1)
    still, _ = policy_only(dataclasses.replace(s, kl_coef=0.0, loss_agg="seq-mean-token-mean"), batch, lr=1e-1)
    assert kl_after(moved) < kl_after(params[0])
    for a, b in zip(jax.tree.leaves(still), jax.tree.leaves(params[0])):      # no advantage, no KL: no step
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-7)


def test_bf16_compute_with_float32_masters_moves_the_weights_like_float32():
    """model.dtype=bfloat16 is the compute dtype only: with float32 master weights one Adam step at
    lr 1e-6 moves every weight matrix as the float32 model's step does, where bf16 weights (the old
    behaviour, param_dtype following dtype) round almost every such step back to where it was."""
    from jaxppo.models.transformer import Transformer
    from helpers import small_config

    batch = make_batch(2)
    s = UpdateSettings(epochs=1, num_minibatches=1)

    def step(dtype, param_dtype):
        model = Transformer(small_config(), dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0))
        graph, params = nnx.split(model)
        tx = optax.adam(1e-6)
        new, _, _ = jax.jit(lambda p, o: model_update(policy_objective(s, T), graph, p, o, batch, jax.random.PRNGKey(0),
                                                      tx, s))(params, tx.init(params))
        return {k: (np.asarray(b, np.float32) - np.asarray(a, np.float32))
                for (k, a), (_, b) in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                                          jax.tree_util.tree_flatten_with_path(new)[0])
                if np.ndim(a) == 2 and "kernel" in jax.tree_util.keystr(k)}     # (embedding rows: only seen tokens)

    f32 = step(jnp.float32, jnp.float32)
    mixed = step(jnp.bfloat16, jnp.float32)
    old = step(jnp.bfloat16, jnp.bfloat16)
    assert len(f32) >= 8                                         # every block's kernels and the head
    for k, ref in f32.items():
        assert (np.abs(ref) > 0).mean() > 0.99, k
        assert (np.abs(mixed[k]) > 0).mean() > 0.99, k
        rel = np.linalg.norm(mixed[k] - ref) / np.linalg.norm(ref)
        assert rel < 0.2, (k, rel)                               # bf16 compute noise flips a few small gradients
        assert (np.abs(old[k]) > 0).mean() < 0.2, k              # bf16 weights: most steps round away
