"""The update's time against the share of real tokens, padded (`train.max_tokens_per_microbatch`
null) and packed (set), on batches whose responses stop at a sampled EOS.

    python experiments/bench_packing.py                                  # the figures of experiments/README.md
    python experiments/bench_packing.py --eos-prob 0,0.01,0.05 --max-tokens 1024 --arch gpt2

A random policy and critic (`--arch`, `--hidden`, `--layers`, `--vocab`) and a batch of `--batch`
rows: prompts of P/2 .. P tokens, left-padded to P, and responses of up to R tokens in which each
token is the EOS with probability p (geometric lengths, cut at R: the lengths a sampler with a
fixed EOS probability gives). For each p of `--eos-prob`, the median seconds of `--iters` updates
(both models' `model_update`: `--epochs` x `--minibatches` AdamW steps, jitted as
`engine.programs` jits them) with every response padded to R, then with packed micro-batches of
`--max-tokens` tokens. Each update program compiles once and serves every p (the packing is
traced). Prints one JSON line per p and a summary line:

    real_token_fraction   tokens the packed path runs (prompt + response, less the last token)
                          / the padded path's B x (P + R - 1)
    padded_sec, packed_sec, packed_over_padded       wall seconds per update (median)
    padded_micro_sec, packed_over_padded_micro        the padded path with optim.grad_accum_steps
                                                      micro-batches of as many rows as a packed one
    *_cpu_sec, packed_over_padded_cpu                 the process's CPU seconds (all threads), which
                                                      other processes on the machine disturb less
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import time


def cpu_flags() -> list[str]:
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return []
    return sorted(set(re.findall(r"\b(avx512f|avx2|amx\w*)\b", text)))


def make_batch(rng, B: int, P: int, R: int, vocab: int, eos_prob: float):
    """A PPOBatch with left-padded prompts of P/2 .. P tokens and geometric response lengths."""
    import jax.numpy as jnp
    import numpy as np

    from jaxppo.engine.update import PPOBatch

    plen = rng.integers(max(1, P // 2), P + 1, B)
    rlen = np.full(B, R) if eos_prob <= 0 else np.minimum(rng.geometric(eos_prob, B), R)
    tokens = rng.integers(4, vocab, (B, P + R)).astype(np.int32)
    attn = np.concatenate([np.arange(P)[None] >= (P - plen)[:, None], np.ones((B, R), bool)], 1).astype(np.int32)
    mask = (np.arange(R)[None] < rlen[:, None]).astype(np.float32)
    normal = lambda mu: jnp.asarray((rng.normal(mu, 0.3, (B, R)) * mask).astype(np.float32))
    batch = PPOBatch(tokens=jnp.asarray(tokens * attn), attention_mask=jnp.asarray(attn),
                     response=jnp.asarray(tokens[:, P:]), mask=jnp.asarray(mask), old_logprobs=normal(-4.0),
                     old_values=normal(0.0), advantages=normal(0.0), returns=normal(0.0))
    real = float((plen + rlen - 1).sum()) / (B * (P + R - 1))
    return batch, real, float(rlen.mean() / R)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="llama", choices=["llama", "gpt2"])
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--response-length", type=int, default=224)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--minibatches", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=512, help="train.max_tokens_per_microbatch of the packed runs")
    ap.add_argument("--eos-prob", default="0,0.003,0.01,0.02,0.05,0.1",
                    help="comma-separated per-token EOS probabilities (0: no EOS, every response R long)")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-json")
    args = ap.parse_args(argv)

    from jaxppo import runtime

    runtime.configure(host_devices=None, compilation_cache=False)
    import dataclasses
    import functools

    import jax
    import numpy as np
    import optax
    from flax import nnx

    from jaxppo.engine.update import UpdateSettings, model_update, policy_objective, value_objective
    from jaxppo.models.transformer import Transformer, TransformerConfig

    llama = args.arch == "llama"
    config = TransformerConfig(
        arch=args.arch, model_type=args.arch, vocab_size=args.vocab, hidden_size=args.hidden,
        num_layers=args.layers, num_heads=args.hidden // 64, num_kv_heads=args.hidden // 64, head_dim=64,
        intermediate_size=4 * args.hidden, max_position_embeddings=args.prompt_len + args.response_length,
        norm_eps=1e-5, rope_theta=10000.0, rope_scaling=None, qkv_bias=False, tie_word_embeddings=False,
        activation="silu" if llama else "gelu_new", bos_token_id=0, eos_token_id=3, pad_token_id=1)
    models = [nnx.split(Transformer(config, head=h, rngs=nnx.Rngs(i))) for i, h in enumerate(("lm", "scalar"))]
    tx = optax.adamw(1e-5)
    base = UpdateSettings(epochs=args.epochs, num_minibatches=args.minibatches)

    def program(s: UpdateSettings):
        def update(params, batch):
            return [model_update(o, g, p, tx.init(p), batch, jax.random.PRNGKey(0), tx, s)[0]
                    for o, (g, _), p in zip((policy_objective(s, 0.7), value_objective(s)), models, params)]
        return jax.jit(update, compiler_options=runtime.update_compiler_options())

    # the padded path in micro-batches of as many rows as a packed one: what packing saves beyond
    # the micro-batch size (the CPU runs small micro-batches a little faster per token)
    rows = max(1, args.max_tokens // (args.prompt_len + args.response_length - 1))
    accum = max(1, args.batch // args.minibatches // rows)
    while (args.batch // args.minibatches) % accum:
        accum -= 1
    programs = {"padded": program(base), "padded_micro": program(dataclasses.replace(base, grad_accum_steps=accum)),
                "packed": program(dataclasses.replace(base, max_tokens_per_microbatch=args.max_tokens))}
    params = [p for _, p in models]
    rng = np.random.default_rng(args.seed)
    B, P, R = args.batch, args.prompt_len, args.response_length
    points = []
    for p in (float(x) for x in args.eos_prob.split(",")):
        batch, real, response = make_batch(rng, B, P, R, args.vocab, p)
        row = {"eos_prob": p, "real_token_fraction": round(real, 3), "response_fraction": round(response, 3)}
        times = {f"{name}{kind}": [] for name in programs for kind in ("_sec", "_cpu_sec")}
        for i in range(args.iters + 1):                       # alternately, so that a load change hits both
            for name, fn in programs.items():
                t0, c0 = time.perf_counter(), time.process_time()
                jax.block_until_ready(fn(params, batch))      # the first call compiles (first batch only)
                if i:
                    times[f"{name}_sec"].append(time.perf_counter() - t0)
                    times[f"{name}_cpu_sec"].append(time.process_time() - c0)
        row.update({key: round(statistics.median(t), 3) for key, t in times.items()})
        row["packed_over_padded"] = round(row["packed_sec"] / row["padded_sec"], 3)
        row["packed_over_padded_cpu"] = round(row["packed_cpu_sec"] / row["padded_cpu_sec"], 3)
        row["packed_over_padded_micro"] = round(row["packed_sec"] / row["padded_micro_sec"], 3)
        print(json.dumps(row), flush=True)
        points.append(row)
    summary = {"bench": "packing", "backend": jax.default_backend(), "jax": jax.__version__,
               "cpu": platform.processor() or platform.machine(), "cpu_flags": cpu_flags(), "arch": args.arch,
               "hidden": args.hidden, "layers": args.layers, "vocab": args.vocab, "batch": B, "prompt_len": P,
               "response_length": R, "epochs": args.epochs, "minibatches": args.minibatches,
               "max_tokens_per_microbatch": args.max_tokens, "padded_micro_grad_accum_steps": accum,
               "iters": args.iters, "points": points}
    print(json.dumps(summary))
    if args.out_json:
        with open(args.out_json, "w") as f:
            json.dump(summary, f, indent=1)
    return summary


if __name__ == "__main__":
    main()
