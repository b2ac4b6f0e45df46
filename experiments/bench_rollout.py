"""Sampling throughput: jaxppo's jitted KV-cache sampler vs transformers' `generate`.

    python experiments/bench_rollout.py --model-dir ~/.cache/jaxppo-peers/tiny-ppo-models \\
        --batch 16 --prompt-len 16 --new-tokens 32 [--impl jaxppo|transformers] [--iters 20] [--devices N]

`--model-dir` is the peer's folder (`../shared/peers/make_tiny_models.py` output: policy/,
prompts.jsonl) or any HF causal-LM folder. Prints one JSON line with `tokens_per_sec`
(B * N / median seconds per call, after a warm-up; fixed length: no stop at EOS; temperature 0.7
over the full vocabulary, as the peer's plain-generate measurement).

jaxppo samples as the rollout does: data parallel over the host devices
`engine.placement.sampling_devices` picks among all local ones (two on a CPU with
`jaxppo.runtime.configure`; on a CPU, the first alone below 16 rows per device), or over
`--devices N`: the rows split over them, the parameters copied to each on every call. The same
calls on one device alternate with those, so the line also gives `tokens_per_sec_1_device`,
`one_device_fraction` (one device's rate / the devices'), and the process CPU time per wall
second of each (`cores_busy`, `cores_busy_1_device`; idle XLA pool threads spin, so this
overstates the work).

`--impl transformers` needs torch (only here, never in jaxppo): run it with the peer's venv.
`experiments/compare.py rollout` interleaves both implementations, process by process, and prints the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time


def load_prompts(model_dir: str, tokenizer, batch: int, prompt_len: int, seed: int = 0):
    """`batch` prompts cut to `prompt_len` tokens from model_dir/prompts.jsonl; without that file,
    random token ids (a random model's sampling costs the same whatever the prompt says)."""
    path = os.path.join(model_dir, "prompts.jsonl")
    if not os.path.exists(path):
        import numpy as np

        return np.random.default_rng(seed).integers(2, len(tokenizer), size=(batch, prompt_len)).tolist()
    with open(path) as f:
        texts = [json.loads(line)["prompt"] for line in f if line.strip()]
    rows = []
    for t in texts:
        ids = tokenizer(t)["input_ids"]
        if len(ids) >= prompt_len:
            rows.append(ids[:prompt_len])
        if len(rows) == batch:
            break
    if len(rows) < batch:
        sys.exit(f"error: fewer than {batch} prompts of >= {prompt_len} tokens in {path}")
    return rows


def policy_dir(model_dir: str) -> str:
    sub = os.path.join(model_dir, "policy")
    return sub if os.path.isdir(sub) else model_dir


def bench_jaxppo(args):
    from jaxppo import runtime

    runtime.configure(compilation_cache=False)   # the CLI's XLA settings, before JAX starts

    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxppo.models.hf import load_causal_lm
    from jaxppo.engine.mesh import make_mesh
    from jaxppo.engine.placement import sampling_devices
    from jaxppo.engine.sampling import SamplingParams, generate

    model, tok = load_causal_lm(policy_dir(args.model_dir), dtype=jnp.dtype(args.dtype))
    ids = np.asarray(load_prompts(args.model_dir, tok, args.batch, args.prompt_len, args.seed), np.int32)
    mask = np.ones_like(ids)
    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=args.temperature,
                            pad_token_id=tok.pad_token_id or 0, stop_at_eos=False)
    key = jax.random.PRNGKey(args.seed)
    local = jax.local_devices()
    devices = local[:args.devices] if args.devices else sampling_devices(local, local[:1], args.batch)
    meshes = {"all": make_mesh(len(devices), 1, devices), "one": make_mesh(1, 1, devices[:1])}
    t0 = time.perf_counter()
    outs = {k: jax.block_until_ready(generate(model, ids, mask, key, params, mesh=m).tokens) for k, m in meshes.items()}
    compile_s = time.perf_counter() - t0
    times, busy = {"all": [], "one": []}, {"all": [], "one": []}
    for i in range(args.iters):                 # alternating, so that both see the same machine
        for k, m in meshes.items():
            c0, t0 = os.times(), time.perf_counter()
            out = generate(model, ids, mask, jax.random.fold_in(key, i), params, mesh=m)
            jax.block_until_ready(out.tokens)
            wall, c1 = time.perf_counter() - t0, os.times()
            times[k].append(wall)
            busy[k].append((c1.user + c1.system - c0.user - c0.system) / wall)
    one = statistics.median(times["one"])
    return times["all"], {
        "devices": len(devices), "same_tokens_as_1_device": bool(np.array_equal(outs["all"], outs["one"])),
        "tokens_per_sec_1_device": round(args.batch * args.new_tokens / one, 1),
        "one_device_fraction": round(statistics.median(times["all"]) / one, 3),
        "cores_busy": round(statistics.median(busy["all"]), 2),
        "cores_busy_1_device": round(statistics.median(busy["one"]), 2),
        "compile_sec": round(compile_s, 3), "jax": jax.__version__, "backend": jax.default_backend()}


def bench_transformers(args):
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(args.seed)
    path = policy_dir(args.model_dir)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    q = torch.tensor(load_prompts(args.model_dir, tok, args.batch, args.prompt_len, args.seed))
    kw = dict(do_sample=True, temperature=args.temperature, top_k=0, top_p=1.0, max_new_tokens=args.new_tokens,
              min_new_tokens=args.new_tokens, use_cache=True, pad_token_id=tok.pad_token_id,
              attention_mask=torch.ones_like(q))
    with torch.no_grad():
        model.generate(q, **kw)
        times = []
        for _ in range(args.iters):
            t0 = time.perf_counter()
            model.generate(q, **kw)
            times.append(time.perf_counter() - t0)
    return times, {"torch": torch.__version__, "transformers": transformers.__version__,
                   "torch_threads": torch.get_num_threads()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--impl", choices=["jaxppo", "transformers"], default="jaxppo")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--devices", type=int, default=0,
                    help="jaxppo: host devices to sample on, the rows split over them (default 0: those the rollout "
                         "samples on)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="parameter and compute dtype of jaxppo's model (transformers runs float32)")
    args = ap.parse_args(argv)
    times, extra = (bench_jaxppo if args.impl == "jaxppo" else bench_transformers)(args)
    med = statistics.median(times)
    print(json.dumps({
        "impl": args.impl, "batch": args.batch, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
        "iters": args.iters, "dtype": args.dtype if args.impl == "jaxppo" else "float32",
        "sec_per_call_median": round(med, 5), "sec_per_call_min": round(min(times), 5),
        "sec_per_call_max": round(max(times), 5), "tokens_per_sec": round(args.batch * args.new_tokens / med, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1), **extra}))


if __name__ == "__main__":
    main()
