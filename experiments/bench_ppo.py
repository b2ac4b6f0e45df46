"""Seconds per PPO iteration on the same work as the TRL peer (`../shared/peers/trl_ppo_bench.py`).

    python experiments/bench_ppo.py --model-dir ~/.cache/jaxppo-peers/tiny-ppo-models \\
        --batch 16 --prompt-len 16 --response-length 32 --ppo-epochs 4 --num-mini-batches 2 \\
        --iters 10 --warmup 1

`--model-dir` is `make_tiny_models.py` output: policy/ (GPT-2 LM), value/ and reward/
(GPT-2 sequence classifiers), prompts.jsonl. As in the peer: a separate reference copy of the
policy, a separate value model and reward model, temperature 0.7 over the full vocabulary, no stop
token (exactly R tokens), prompts cut to their first `--prompt-len` tokens (no padding), AdamW at
lr 3e-6 with linear decay and no gradient clipping, kl_coef 0.05, clip 0.2/0.2, vf_coef 0.1,
gamma 1, lambda 0.95, whitened advantages.

One iteration = `programs.rollout` (sampling + reference/reward forwards on the policy's devices,
the value forward on the critic's) + `programs.update` (shaping and GAE, then each model's E x M
optimiser steps, side by side under `train.placement` separate, the default on a CPU) + the host's
one `device_get` of the metrics: what `PPOTrainer.train` runs per step, minus logging.

Prints one JSON line: `sec_per_iter_median`, the phase split (`rollout` = generate + scoring
forwards; `generate` timed separately with the same sampler; `scoring_forwards` = their
difference; `update`), generated tokens/s, an MFU estimate against a measured matmul peak of
this machine (f32 1024^3 on the CPU, `--dtype` 8192^3 on an accelerator), the peak RSS, and the
minor page faults and kernel CPU time of a timed iteration (medians; on the CPU each update maps
its scratch buffer afresh, see experiments/README.md, session 6). On an accelerator also: update
tokens/s and MFU, decode tokens/s against the roofline of the measured copy bandwidth (each
decode step reads the policy's weights and its KV cache once) and the device's peak memory. A
model folder without prompts.jsonl gets random prompt ids (`experiments/gpu_bench.sh`: a random
Qwen2-0.5B shape on a GPU).

`--profile DIR` then traces two more iterations with `jax.profiler` (a Perfetto trace under DIR),
writes the optimized HLO of the rollout's and the update's programs there (`NAME.hlo.txt`) and prints
the ops that took the most time to stderr: how the matmul-only backward of `core/kernels.py` was
found (copies of transposed cotangents and `reduce-window` ops used to lead that list).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time


def matmul_peak_flops(n: int = 1024, reps: int = 20, dtype: str = "float32") -> float:
    """Best-of matmul FLOP/s of this machine under XLA (the MFU denominator): an n x n x n product in
    `dtype`, with XLA's own dot and with the update program's compiler options (YNNPACK on the CPU),
    whichever is faster."""
    import jax
    import jax.numpy as jnp

    from jaxppo.runtime import update_compiler_options

    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32).astype(dtype)
    best = float("inf")
    for options in ({}, update_compiler_options() or {}):
        f = jax.jit(lambda x: x @ x, compiler_options=options)
        f(a).block_until_ready()
        for _ in range(reps):
            t0 = time.perf_counter()
            f(a).block_until_ready()
            best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def copy_bandwidth(n_bytes: int = 2 << 30, reps: int = 10) -> float:
    """Bytes/s of the best of `reps` elementwise passes over an n_bytes array (read + write counted):
    the memory roofline of the decode loop."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((n_bytes // 4,), jnp.float32)
    f = jax.jit(lambda v: v * 1.0001)
    f(x).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        f(x).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * n_bytes / best


def matmul_params(n_params: int, config, lm_head: bool) -> int:
    """The parameters of a model that are multiplied per token: all but the embedding table (a
    lookup) and GPT-2's learned positions, plus the table again where it is the tied LM head."""
    lookup = config.vocab_size * config.hidden_size
    if config.arch == "gpt2":
        lookup += config.max_position_embeddings * config.hidden_size
    return n_params - lookup + (config.vocab_size * config.hidden_size if lm_head and config.tie_word_embeddings else 0)


def device_peak_mb() -> float | None:
    """Peak bytes the accelerator's allocator handed out (None on the CPU, which reports none)."""
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    return round(stats["peak_bytes_in_use"] / 2 ** 20, 1) if "peak_bytes_in_use" in stats else None


def synthetic_prompts(n: int, prompt_len: int, vocab: int, seed: int):
    """[n, prompt_len] token ids drawn uniformly from the ordinary tokens (2 .. vocab-1) of a tiny
    tokenizer: the work of sampling does not depend on what the prompt says."""
    import numpy as np

    return np.random.default_rng(seed).integers(2, vocab, size=(n, prompt_len), dtype=np.int32)


def top_ops(trace_dir: str, n: int = 25) -> list[tuple[str, float, int]]:
    """(name, total ms, count) of the longest XLA ops in the newest perfetto trace under trace_dir."""
    import glob
    import gzip

    paths = sorted(glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True),
                   key=os.path.getmtime)
    with gzip.open(paths[-1]) as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    total: dict[str, list] = {}
    for e in events:
        name = e.get("name", "")
        if e.get("ph") != "X" or name.startswith(("$", "end:")) or "::" in name or "(" in name:
            continue
        t = total.setdefault(name, [0.0, 0])
        t[0] += e.get("dur", 0) / 1e3
        t[1] += 1
    return sorted(((k, round(v[0], 2), v[1]) for k, v in total.items()), key=lambda x: -x[1])[:n]


def profile_iterations(trace_dir, programs, trainer, frozen, ids, mask, zeros, iters: int = 2):
    import jax

    from jaxppo.engine import programs as iteration

    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        for _ in range(iters):
            exp = iteration.rollout(programs, trainer.state, frozen, ids, mask)
            trainer.state, metrics = iteration.update(programs, trainer.state, exp, zeros)
            jax.device_get(metrics)
    lowered = iteration.lower(programs, trainer.state, frozen, ids, mask,
                             iteration.iteration_key(programs, trainer.state), exp, zeros)
    for name, low in lowered.items():
        with open(os.path.join(trace_dir, f"{name}.hlo.txt"), "w") as f:
            f.write(low.compile().as_text())
    print(f"top ops over {iters} iterations (name, ms, count); optimized HLO in {trace_dir}:", file=sys.stderr)
    for row in top_ops(trace_dir):
        print(f"  {row[0]:60s} {row[1]:9.2f} {row[2]:6d}", file=sys.stderr)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--response-length", type=int, default=32)
    ap.add_argument("--ppo-epochs", type=int, default=4)
    ap.add_argument("--num-mini-batches", type=int, default=2)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--lr", type=float, default=3e-6)
    ap.add_argument("--kl-coef", type=float, default=0.05)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--logits-chunk-mb", type=int, metavar="MB",
                    help="model.logits_chunk_mb: the LM head over response slices of at most MB of logits")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-json")
    ap.add_argument("--profile", metavar="DIR",
                    help="trace two iterations after the timed ones with jax.profiler into DIR and print "
                         "the ops that take the most time to stderr")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()

    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxppo.config import load_config
    from jaxppo.engine import programs as iteration
    from jaxppo.engine.sampling import generate
    from jaxppo.run.trainer import PPOTrainer

    d = os.path.expanduser(args.model_dir)
    total = args.warmup + args.iters
    critic = "value" if os.path.isdir(os.path.join(d, "value")) else "reward"  # a second copy of the RM
    cfg = load_config(None, [
        f"model.policy={d}/policy", f"model.reward_model={d}/reward", f"model.critic={d}/{critic}",
        f"model.dtype={args.dtype}", f"model.logits_chunk_mb={args.logits_chunk_mb or 'null'}", "reward.task=null",
        f"rollout.max_new_tokens={args.response_length}", f"rollout.temperature={args.temperature}",
        "rollout.stop_at_eos=false", "rollout.top_k=0", "rollout.top_p=1.0",
        f"ppo.epochs={args.ppo_epochs}", f"ppo.num_minibatches={args.num_mini_batches}",
        f"ppo.kl_coef={args.kl_coef}", "ppo.clip_eps=0.2", "ppo.clip_value=0.2", "ppo.vf_coef=0.1",
        "ppo.ent_coef=0.0", "ppo.gamma=1.0", "ppo.lam=0.95", "ppo.kl_estimator=k1", "ppo.whiten_advantages=true",
        f"optim.lr={args.lr}", "optim.schedule=linear", "optim.warmup_steps=0", "optim.max_grad_norm=null",
        "optim.weight_decay=0.0", f"train.batch_size={args.batch}", f"train.total_steps={total}",
        f"train.seed={args.seed}", "logging.tensorboard=false", "logging.progress_bar=false",
    ])
    trainer = PPOTrainer(cfg)
    tok = trainer.tokenizer
    prompts_file = os.path.join(d, "prompts.jsonl")
    if os.path.exists(prompts_file):
        with open(prompts_file) as f:
            texts = [json.loads(line)["prompt"] for line in f if line.strip()]
        rows = [ids[:args.prompt_len] for ids in (tok(t)["input_ids"] for t in texts)
                if len(ids) >= args.prompt_len]
    else:  # a model folder without prompts (the GPU run's random Qwen2-0.5B shape): random ids
        rows = synthetic_prompts(4 * args.batch, args.prompt_len, len(tok), args.seed)
    if len(rows) < args.batch:
        sys.exit(f"error: fewer than --batch {args.batch} prompts of >= {args.prompt_len} tokens in {prompts_file}")
    ids_all = np.asarray(rows, np.int32)                          # [N, P], no padding
    mask_all = np.ones_like(ids_all)
    n_batches = len(rows) // args.batch
    zeros = jnp.zeros((args.batch,), jnp.float32)
    programs, frozen = trainer.programs, trainer.frozen

    times, t_roll, t_upd = [], [], []
    t_compile = None
    faults, sys_cpu = [], []      # minor page faults and kernel CPU seconds of each timed iteration
    for i in range(total):
        sl = slice((i % n_batches) * args.batch, (i % n_batches + 1) * args.batch)
        usage0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        exp = iteration.rollout(programs, trainer.state, frozen, ids_all[sl], mask_all[sl])
        jax.block_until_ready(exp)
        t1 = time.perf_counter()
        trainer.state, metrics = iteration.update(programs, trainer.state, exp, zeros)
        metrics = jax.device_get(metrics)
        t2 = time.perf_counter()
        if i == 0:
            t_compile = t2 - t0
        print(f"iter {i}: rollout {t1 - t0:.3f} s, update {t2 - t1:.3f} s", file=sys.stderr, flush=True)
        if i >= args.warmup:
            times.append(t2 - t0)
            t_roll.append(t1 - t0)
            t_upd.append(t2 - t1)
            usage = resource.getrusage(resource.RUSAGE_SELF)
            faults.append(usage.ru_minflt - usage0.ru_minflt)
            sys_cpu.append(usage.ru_stime - usage0.ru_stime)

    if args.profile:
        profile_iterations(args.profile, programs, trainer, frozen, ids_all[:args.batch], mask_all[:args.batch], zeros)

    # generation alone, with the same sampler settings and the trained policy
    from flax import nnx
    policy = nnx.merge(trainer.models.graphs.policy, trainer.state.policy)
    sampling = programs.settings.sampling
    key = jax.random.PRNGKey(1)
    jax.block_until_ready(generate(policy, ids_all[:args.batch], mask_all[:args.batch], key, sampling).tokens)
    t_gen = []
    for i in range(max(5, args.iters)):
        t0 = time.perf_counter()
        jax.block_until_ready(generate(policy, ids_all[:args.batch], mask_all[:args.batch],
                                       jax.random.fold_in(key, i), sampling).tokens)
        t_gen.append(time.perf_counter() - t0)

    med = statistics.median(times)
    # model FLOPs: 2*N per token forward, 6*N forward+backward (N = non-embedding + head params)
    n_policy = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(trainer.state.policy))
    n_critic = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(trainer.state.critic))
    S = args.prompt_len + args.response_length
    B = args.batch
    # FLOPs count the parameters that take part in a matmul: not the embedding lookup (nor GPT-2's
    # learned positions), except where a tied LM head multiplies by the embedding; attention's
    # score and value products (a few % at these lengths) are left out
    m_policy = matmul_params(n_policy, trainer.models.policy_config, lm_head=True)
    m_critic = matmul_params(n_critic, trainer.models.critic_config, lm_head=False)
    m_rm = matmul_params(sum(int(np.prod(x.shape)) for x in jax.tree.leaves(frozen.reward_model)),
                         trainer.models.reward_model_config, lm_head=False)
    # the last sampled token predicts nothing: S - 1 useful tokens a row for the policy, reference
    # and critic (an accelerator runs all S when S is aligned: `update.forward_length`; that extra
    # token is not counted as work), S for the reward model
    update_flops = args.ppo_epochs * 6 * (m_policy + m_critic) * B * (S - 1)   # every row once per epoch
    flops = (2 * m_policy * B * (S - 1)                      # sampling (prefill + decode)
             + 2 * (m_policy + m_critic) * B * (S - 1)       # ref, value forwards
             + 2 * m_rm * B * S                              # reward forward
             + update_flops)
    accelerator = jax.default_backend() != "cpu"
    peak = matmul_peak_flops(n=8192 if accelerator else 1024, dtype=args.dtype)
    t_gen_med, t_upd_med = statistics.median(t_gen), statistics.median(t_upd)
    # decode roofline: every step reads the policy's weights and its whole (fixed-size) KV cache once
    pcfg = policy.config
    itemsize = jnp.dtype(args.dtype).itemsize
    kv_bytes = (2 * pcfg.num_layers * B * pcfg.num_kv_heads * (S - 1)    # P + R - 1 cache slots
                * pcfg.head_dim * itemsize)
    step_bytes = n_policy * itemsize + kv_bytes
    # on the CPU a tiny model's weights sit in the caches, so a DRAM roofline says nothing there
    bandwidth = copy_bandwidth() if accelerator else None
    roofline_tps = B * bandwidth / step_bytes if accelerator else None
    out = {
        "impl": "jaxppo", "batch": B, "prompt_len": args.prompt_len, "response_length": args.response_length,
        "ppo_epochs": args.ppo_epochs, "num_mini_batches": args.num_mini_batches,
        "optimizer_steps_per_iter": args.ppo_epochs * args.num_mini_batches, "iters": args.iters,
        "warmup_iters": args.warmup, "dtype": args.dtype, "logits_chunk_mb": args.logits_chunk_mb,
        "sec_per_iter_median": round(med, 4), "sec_per_iter_min": round(min(times), 4),
        "sec_per_iter_max": round(max(times), 4), "sec_per_iter_all": [round(t, 4) for t in times],
        "tokens_generated_per_sec": round(B * args.response_length / med, 1),
        "phase_median_sec": {
            "rollout": round(statistics.median(t_roll), 4),
            "generate": round(statistics.median(t_gen), 4),
            "scoring_forwards": round(max(statistics.median(t_roll) - statistics.median(t_gen), 0.0), 4),
            "update": round(statistics.median(t_upd), 4),
        },
        "first_iter_sec_incl_compile": round(t_compile, 2),
        "update_tokens_per_sec": round(args.ppo_epochs * B * S / t_upd_med, 1),
        "update_mfu": round(update_flops / t_upd_med / peak, 4),
        "generate_tokens_per_sec": round(B * args.response_length / t_gen_med, 1),
        "decode_roofline_tokens_per_sec": round(roofline_tps, 1) if accelerator else None,
        "generate_fraction_of_roofline":
            round(B * args.response_length / t_gen_med / roofline_tps, 4) if accelerator else None,
        "measured_copy_bandwidth_gbs": round(bandwidth / 1e9, 1) if accelerator else None,
        "decode_bytes_per_step": step_bytes,
        "prompts": "prompts.jsonl" if os.path.exists(prompts_file) else "synthetic",
        "model_flops_per_iter": flops, "matmul_peak_gflops": round(peak / 1e9, 1),
        "achieved_gflops": round(flops / med / 1e9, 2), "mfu": round(flops / med / peak, 4),
        "policy_params": n_policy, "critic_params": n_critic, "matmul_params": [m_policy, m_critic, m_rm],
        "minor_page_faults_per_iter_median": statistics.median(faults),
        "sys_cpu_sec_per_iter_median": round(statistics.median(sys_cpu), 4),
        "device_peak_mb": device_peak_mb(), "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "jax": jax.__version__, "backend": jax.default_backend(), "devices": jax.device_count(),
        "total_wall_sec": round(time.perf_counter() - t_start, 2),
        "final_objective_kl": float(metrics.as_dict()["objective/kl"]),
    }
    line = json.dumps(out)
    print(line)
    if args.out_json:
        with open(args.out_json, "w") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    sys.exit(main())
