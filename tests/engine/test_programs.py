"""The phases of `engine.programs` on small random models."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxppo.engine.programs import evaluate_phase, sample_phase, score_phase
from jaxppo.engine.sampling import SamplingParams
from jaxppo.engine.shaping import StepSettings
from jaxppo.engine.state import Frozen, ModelGraphs
from jaxppo.engine.update import UpdateSettings

from helpers import left_padded_batch, small_model


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_evaluation_kl_follows_the_kl_estimator(estimator):
    """Evaluation's per-response KL uses the estimator training's `objective/kl` uses."""
    (pg, pp), (rg, rp) = nnx.split(small_model(0)), nnx.split(small_model(1))   # the reference differs
    graphs = ModelGraphs(policy=pg, critic=None, ref=rg, reward_model=None)
    frozen = Frozen(ref=rp, reward_model=None)
    s = StepSettings(sampling=SamplingParams(max_new_tokens=6, temperature=0.9, pad_token_id=1, eos_token_ids=(3,)),
                     update=UpdateSettings(), kl_estimator=estimator)
    ids, mask = (jnp.asarray(x) for x in left_padded_batch(B=3, P=5))
    key = jax.random.PRNGKey(2)
    out = jax.jit(lambda *a: evaluate_phase(graphs, s, *a))(pp, frozen, ids, mask, key)
    sampled, attn = sample_phase(pg, s.sampling, pp, ids, mask, key)
    ref, _ = score_phase(rg, None, s, frozen, sampled.tokens, attn, sampled.response, sampled.mask)
    d = np.asarray(sampled.logprobs, np.float64) - np.asarray(ref, np.float64)       # [B, R]
    per_token = d if estimator == "k1" else np.expm1(-d) + d                          # k3 = (r - 1) - log r
    expect = (per_token * np.asarray(sampled.mask)).sum(-1)
    np.testing.assert_allclose(np.asarray(out.kl), expect, rtol=1e-4, atol=1e-5)
    assert np.abs(expect).max() > 1e-3
