"""model.dtype is the compute dtype: the trained models keep float32 master weights, Adam moments
and gradients; the frozen reference and reward model may be stored in bf16; final_model holds
the float32 masters."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxppo.config import load_config
from jaxppo.run.models import tiny_model_dir
from jaxppo.run.trainer import PPOTrainer

FAST = ["model.tiny_arch=gpt2", "train.batch_size=4", "rollout.max_new_tokens=8", "ppo.epochs=1",
        "ppo.num_minibatches=2", "logging.progress_bar=false", "logging.tensorboard=false",
        "data.max_prompt_length=24", "train.eval_batch_size=4", "train.total_steps=1"]


def dtypes(tree):
    return {str(x.dtype) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)}


def test_bf16_compute_keeps_float32_masters(tmp_path):
    rm = tiny_model_dir("gpt2", reward_model=True)
    t = PPOTrainer(load_config(None, FAST + ["model.dtype=bfloat16", f"model.reward_model={rm}",
                                             f"train.output_dir={tmp_path / 'run'}"]))
    assert dtypes(t.state.policy) == dtypes(t.state.critic) == {"float32"}
    assert dtypes(t.state.policy_opt) <= {"float32"} and dtypes(t.state.critic_opt) <= {"float32"}
    assert dtypes(t.frozen.ref) == dtypes(t.frozen.reward_model) == {"bfloat16"}     # frozen: stored in bf16
    t.train()
    assert dtypes(t.state.policy) == {"float32"}
    from safetensors.numpy import load_file
    weights = load_file(str(tmp_path / "run" / "final_model" / "model.safetensors"))
    assert {str(v.dtype) for v in weights.values() if v.dtype.kind == "f"} == {"float32"}
    assert np.isfinite([r for r in t.history[0].values() if isinstance(r, float)]).all()
