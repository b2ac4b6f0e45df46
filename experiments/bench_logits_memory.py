"""Scratch memory of the rollout and update programs for a large vocabulary, with and without
`model.logits_chunk_mb` (the LM head over response slices, recomputed in the backward).

    python experiments/bench_logits_memory.py                    # whole logits, then 256 and 64 MB slices
    python experiments/bench_logits_memory.py --chunk-mb 0,128

A random Qwen2-shaped policy and reward model (vocabulary 151,936, hidden 128, 2 layers: the head
is nearly all of the model, as the logits are of the memory), made once under ~/.cache/jaxppo/;
batch 16, 32 prompt + 128 response tokens, 1 epoch x 2 minibatches: one minibatch's float32
logits are 594 MB. One JSON line per setting: the XLA scratch (`memory_analysis().temp_size_in_bytes`)
of the programs that hold logits (the rollout's `sample` and `score`, reference and reward
forwards, which run one after the other: the larger of the two; `policy_update`, the policy's
optimiser steps), and the seconds of 3 updates and 3 rollouts after the first.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

B, P, R, VOCAB = 16, 32, 128, 151936


def models() -> Path:
    from jaxppo.models.tiny import main as tiny
    from jaxppo.runtime import cache_root

    root = cache_root() / "bigvocab-qwen2"
    shape = ["--arch", "qwen2", "--vocab-size", str(VOCAB), "--hidden-size", "128", "--num-layers", "2",
             "--num-heads", "2", "--num-kv-heads", "1", "--intermediate-size", "256", "--tie"]
    for name, extra in (("policy", []), ("reward", ["--reward-model"])):
        if not (root / name / "model.safetensors").exists():
            with contextlib.redirect_stdout(sys.stderr):        # keep stdout to the JSON lines
                tiny([str(root / name), *shape, *extra])
    return root


def measure(root: Path, chunk_mb: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxppo.config import load_config
    from jaxppo.engine import programs as iteration
    from jaxppo.run.trainer import PPOTrainer

    cfg = load_config(None, [
        f"model.policy={root}/policy", f"model.reward_model={root}/reward", "model.critic_init=reward_model",
        f"model.logits_chunk_mb={chunk_mb or 'null'}", "reward.task=null", f"rollout.max_new_tokens={R}",
        "rollout.stop_at_eos=false", "ppo.epochs=1", "ppo.num_minibatches=2", f"train.batch_size={B}",
        "logging.tensorboard=false", "logging.progress_bar=false"])
    trainer = PPOTrainer(cfg)
    programs = trainer.programs
    ids = np.random.default_rng(0).integers(10, 500, (B, P)).astype(np.int32)
    mask = np.ones_like(ids)
    key = iteration.iteration_key(programs, trainer.state)
    zeros = jnp.zeros((B,), jnp.float32)
    exp = iteration.rollout(programs, trainer.state, trainer.frozen, ids, mask, key)
    scratch = lambda compiled: round(compiled.memory_analysis().temp_size_in_bytes / 2**20, 1)
    lowered = iteration.lower(programs, trainer.state, trainer.frozen, ids, mask, key, exp, zeros)
    out = {"logits_chunk_mb": chunk_mb or None,      # the programs that hold logits: sampling + scoring, the policy's steps
           "rollout_scratch_mib": max(scratch(lowered[name].compile()) for name in ("sample", "score")),
           "update_scratch_mib": scratch(lowered["policy_update"].compile()),
           "minibatch_logits_mib": round(B // 2 * R * VOCAB * 4 / 2**20, 1)}
    times = {"update_sec": [], "rollout_sec": []}
    for i in range(4):
        t0 = time.perf_counter()
        trainer.state, metrics = iteration.update(programs, trainer.state, exp, zeros)
        jax.block_until_ready(metrics)
        t1 = time.perf_counter()
        jax.block_until_ready(iteration.rollout(programs, trainer.state, trainer.frozen, ids, mask, key))
        if i:                                           # the first call of each compiles
            times["update_sec"].append(round(t1 - t0, 3))
            times["rollout_sec"].append(round(time.perf_counter() - t1, 3))
    return {**out, **times, "loss/policy_avg": float(metrics.as_dict()["loss/policy_avg"])}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chunk-mb", default="0,256,64", help="comma-separated settings; 0 = whole logits")
    args = ap.parse_args(argv)
    root = models()
    for chunk in (int(x) for x in args.chunk_mb.split(",")):
        print(json.dumps(measure(root, chunk)), flush=True)


if __name__ == "__main__":
    main()
