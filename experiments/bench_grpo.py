"""Seconds per GRPO iteration on the same work as TRL 1.16's GRPOTrainer
(`../shared/peers/trl_grpo/trl_grpo_bench.py`, same flags, same JSON keys).

    python experiments/bench_grpo.py --model-dir ~/.cache/jaxppo-peers/tiny-ppo-models \\
        --prompts-per-step 4 --num-generations 4 --prompt-len 16 --completion-length 32 \\
        --iters 8 --warmup 1

`--model-dir` is `make_tiny_models.py` output: policy/ (GPT-2 LM with its tokenizer) and
prompts.jsonl (a folder without prompts.jsonl gets random prompt ids). As in the peer: a frozen
reference copy of the policy (beta != 0), no critic, no reward model; the reward is the Python
`vowel_share` of the decoded completion; P prompts x G completions of exactly C tokens sampled
at temperature 0.7 over the full vocabulary (no stop token); group advantages
(r - mean) / (std_ddof1 + 1e-4); the clipped loss (eps 0.2) plus beta x k3 KL to the reference
in the loss, aggregated token-mean over the generation batch (TRL's "dapo"); AdamW at lr 1e-5
with linear decay over (warmup + iters) x S x mu optimiser steps, no warmup, grad-norm clip 1.0,
weight decay 0. Prompts are the first --prompt-len tokens of prompts.jsonl's prompts in file
order (those that do not round-trip through decode/encode are skipped, as the peer does);
iteration k uses prompts kP .. kP+P-1.

One iteration = `run.collect.collect_batch` (`programs.rollout`: sampling with one prefill per
prompt, then the reference forward; then the reward function on the host) + `programs.update`
(group advantages, then mu epochs x S minibatches of optimiser steps) + the host's one
`device_get` of the metrics: what `PPOTrainer.train_step` runs, minus logging.

Prints one JSON line: `sec_per_iter_median` (and mean/min/max/all), `cpu_sec_per_iter_median`,
the phase split (`rollout` = sampling + reference forward, `reward` = decode + reward function,
`update`), `generated_tokens_per_sec` = P*G*C / median, `peak_rss_mb` and
`reward_mean_per_iter` (the mean vowel share of every iteration, warm-up included) and
`kl_per_token_per_iter` (the sampled batch's mean per-token k3 KL to the reference, TRL's `kl`).
`--mesh-data N` runs the batch data-parallel over N devices (`train.mesh_data`, `--mesh-fsdp`
`train.mesh_fsdp`, default 1); on the CPU the process asks XLA for exactly N x fsdp host devices
(default 1: one device, XLA's intra-op threads use the cores) unless XLA_FLAGS already names a
count or JAX has started (then `--mesh-fsdp` defaults to -1, the devices left over).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time

VOWELS = frozenset("aeiouAEIOU")

# TRL loss_type -> algo.loss_agg. dapo and bnpo are both a token mean (over the generation batch /
# the micro-batch), the same thing when every completion has C tokens as here.
LOSS_TYPES = {"dapo": "token-mean", "bnpo": "token-mean", "grpo": "seq-mean-token-mean",
              "dr_grpo": "seq-mean-token-sum-norm"}


def vowel_share(prompts, completions, **kwargs):
    """The peer's reward: share of aeiouAEIOU among the characters of the decoded completion; 0 if empty."""
    return [sum(ch in VOWELS for ch in c) / len(c) if c else 0.0 for c in completions]


def round_trip_prompts(tok, texts, prompt_len):
    """(text, ids) of the prompts whose first `prompt_len` ids decode to a text that encodes back to
    the same ids, in file order: the peer's filter (TRL re-tokenizes the prompt text)."""
    out = []
    for t in texts:
        ids = tok(t)["input_ids"][:prompt_len]
        if len(ids) != prompt_len:
            continue
        text = tok.decode(ids)
        if tok(text)["input_ids"] == ids:
            out.append((text, ids))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", default=os.path.expanduser("~/.cache/jaxppo-peers/tiny-ppo-models"))
    ap.add_argument("--prompts-per-step", type=int, default=4)
    ap.add_argument("--num-generations", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--completion-length", type=int, default=32)
    ap.add_argument("--num-iterations", type=int, default=1, help="GRPO mu: optimiser passes over a batch")
    ap.add_argument("--steps-per-generation", type=int, default=1, help="S: optimiser steps per pass")
    ap.add_argument("--iters", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--beta", type=float, default=0.04)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--lr-scheduler", default="linear", choices=["linear", "constant", "cosine"])
    ap.add_argument("--loss-type", default="dapo", choices=sorted(LOSS_TYPES))
    ap.add_argument("--mesh-data", type=int, default=1,
                    help="train.mesh_data: the batch data-parallel over N devices (on the CPU: N host devices)")
    ap.add_argument("--mesh-fsdp", type=int,
                    help="train.mesh_fsdp (params and optimizer state sharded); default 1, or -1 (the devices "
                         "left over) where XLA_FLAGS or a started JAX already fixed the host device count")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-json")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    load_start = os.getloadavg()[0]

    P, G, PL, C = args.prompts_per_step, args.num_generations, args.prompt_len, args.completion_length
    MU, S = args.num_iterations, args.steps_per_generation
    if (P * G) % S:
        sys.exit(f"error: P*G = {P * G} must be divisible by --steps-per-generation {S}")
    total = args.warmup + args.iters

    # the CPU gets exactly mesh_data x mesh_fsdp host devices (the mesh must use them all); a flag
    # already in XLA_FLAGS wins. No JAX before the trainer: PPOTrainer calls runtime.configure() first.
    flags = os.environ.get("XLA_FLAGS", "")
    if "--xla_force_host_platform_device_count" not in flags and "jax" not in sys.modules:
        args.mesh_fsdp = 1 if args.mesh_fsdp is None else args.mesh_fsdp
        n_dev = args.mesh_data * (args.mesh_fsdp if args.mesh_fsdp > 0 else 1)
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n_dev}".strip()
    elif args.mesh_fsdp is None:      # the device count is not ours to choose (e.g. inside pytest)
        args.mesh_fsdp = -1
    from jaxppo.config import load_config
    from jaxppo.run.trainer import PPOTrainer

    d = os.path.expanduser(args.model_dir)
    cfg = load_config(None, [
        f"model.policy={d}/policy", "model.reward_model=null", "reward.task=null", "reward.normalize=false",
        "algo.advantage=grpo", "algo.scale_rewards=group", f"algo.loss_agg={LOSS_TYPES[args.loss_type]}",
        f"rollout.num_generations={G}", f"rollout.max_new_tokens={C}", f"rollout.temperature={args.temperature}",
        "rollout.stop_at_eos=false", "rollout.top_k=0", "rollout.top_p=1.0",
        "ppo.kl_in=loss", f"ppo.kl_coef={args.beta}", "ppo.kl_estimator=k3", "ppo.clip_eps=0.2",
        f"ppo.epochs={MU}", f"ppo.num_minibatches={S}", "ppo.ent_coef=0.0",
        f"optim.lr={args.lr}", f"optim.schedule={args.lr_scheduler}", "optim.warmup_steps=0",
        "optim.max_grad_norm=1.0", "optim.weight_decay=0.0",
        f"train.batch_size={P}", f"train.total_steps={total}", f"train.seed={args.seed}",
        f"train.mesh_data={args.mesh_data}", f"train.mesh_fsdp={args.mesh_fsdp}",
        "logging.tensorboard=false", "logging.progress_bar=false", f"data.max_prompt_length={PL}",
    ])
    trainer = PPOTrainer(cfg, reward_functions=[vowel_share])

    import jax
    import numpy as np

    from jaxppo.engine import programs as iteration
    from jaxppo.engine.mesh import shard_batch
    from jaxppo.run.collect import PromptBatch, collect_batch

    tok = trainer.tokenizer
    prompts_file = os.path.join(d, "prompts.jsonl")
    if os.path.exists(prompts_file):
        with open(prompts_file) as f:
            texts = [json.loads(line)["prompt"] for line in f if line.strip()]
        rows = round_trip_prompts(tok, texts, PL)
        source = "prompts.jsonl"
    else:   # a model folder without prompts: random ordinary token ids
        rng = np.random.default_rng(args.seed)
        ids = rng.integers(2, len(tok), size=(4 * P, PL), dtype=np.int32)
        rows = [(tok.decode(r), list(r)) for r in ids]
        source = "synthetic"
    if len(rows) < P:
        sys.exit(f"error: fewer than --prompts-per-step {P} prompts of {PL} tokens in {prompts_file}")
    prompt_texts = [t for t, _ in rows]
    ids_all = np.asarray([i for _, i in rows], np.int32)         # [N, PL], no padding
    n_batches = len(rows) // P
    mesh = trainer.placement.policy_mesh
    programs, frozen = trainer.programs, trainer.frozen

    drawn = [0]

    def draw() -> PromptBatch:
        """Prompts kP .. kP+P-1 (file order; wraps after the last full batch)."""
        k = drawn[0] % n_batches
        drawn[0] += 1
        sl = slice(k * P, (k + 1) * P)
        return PromptBatch(prompts=prompt_texts[sl], ids=ids_all[sl], mask=np.ones_like(ids_all[sl]), columns={})

    reward_time = [0.0]
    scorer = trainer.rewards

    def timed_rewards(prompts, response, mask, *rest):
        """The trainer's reward scorer, timed from the moment the sampled ids are ready (so the
        wait for the rollout program counts as rollout, not reward)."""
        jax.block_until_ready((response, mask))
        t0 = time.perf_counter()
        try:
            return scorer(prompts, response, mask, *rest)
        finally:
            reward_time[0] += time.perf_counter() - t0

    times, cpu, t_roll, t_rew, t_upd, reward_means, kls = [], [], [], [], [], [], []
    t_compile = None
    for i in range(total):
        reward_time[0] = 0.0
        c0 = time.process_time()
        t0 = time.perf_counter()
        exp, fn_scores, _ = collect_batch(programs, trainer.state, frozen, mesh, timed_rewards, draw, G)
        jax.block_until_ready(exp)
        t1 = time.perf_counter()
        trainer.state, metrics = iteration.update(programs, trainer.state, exp, shard_batch(fn_scores, mesh))
        metrics = {k: float(v) for k, v in jax.device_get(metrics).as_dict().items()}   # the one sync
        t2 = time.perf_counter()
        c2 = time.process_time()
        reward_means.append(metrics.get("reward", metrics["objective/scores"]))
        # per-token KL to the reference of the sampled batch (TRL's `kl`; objective/kl sums a response)
        kls.append(metrics.get("kl", metrics["objective/kl"] / C))
        if i == 0:
            t_compile = t2 - t0
        print(f"iter {i}: rollout {t1 - t0 - reward_time[0]:.3f} s, reward {reward_time[0]:.4f} s, "
              f"update {t2 - t1:.3f} s, reward mean {reward_means[-1]:.4f}", file=sys.stderr, flush=True)
        times.append(t2 - t0)
        cpu.append(c2 - c0)
        t_roll.append(t1 - t0 - reward_time[0])
        t_rew.append(reward_time[0])
        t_upd.append(t2 - t1)

    w = args.warmup
    timed = times[w:]
    med = statistics.median(timed)
    gen_tokens = P * G * C
    r4 = lambda x: round(x, 4)
    out = {
        "impl": "jaxppo",
        "prompts_per_step": P, "num_generations": G, "generation_batch": P * G, "prompt_len": PL,
        "completion_length": C, "num_iterations_mu": MU, "steps_per_generation": S,
        "optimizer_steps_per_iter": S * MU, "loss_type": args.loss_type, "loss_agg": LOSS_TYPES[args.loss_type],
        "scale_rewards": "group", "beta": args.beta, "ref_model": args.beta != 0, "epsilon": [0.2, 0.2],
        "temperature": args.temperature, "lr": args.lr, "lr_scheduler": args.lr_scheduler, "max_grad_norm": 1.0,
        "reward": "vowel_share", "mesh_data": args.mesh_data, "mesh_fsdp": args.mesh_fsdp,
        "warmup_iters": w, "iters": args.iters,
        "sec_per_iter_median": r4(med), "sec_per_iter_mean": r4(statistics.fmean(timed)),
        "sec_per_iter_min": r4(min(timed)), "sec_per_iter_max": r4(max(timed)),
        "sec_per_iter_all": [r4(t) for t in times],
        "cpu_sec_per_iter_median": r4(statistics.median(cpu[w:])),
        "sec_per_optimizer_step_median": r4(med / (S * MU)),
        "generated_tokens_per_iter": gen_tokens,
        "generated_tokens_per_sec": round(gen_tokens / med, 2),
        "phase_median_sec": {
            "rollout": r4(statistics.median(t_roll[w:])),
            "reward": r4(statistics.median(t_rew[w:])),
            "update": r4(statistics.median(t_upd[w:])),
        },
        "first_iter_sec_incl_compile": round(t_compile, 2),
        "reward_mean_per_iter": [round(r, 5) for r in reward_means],
        "kl_per_token_per_iter": [round(k, 6) for k in kls],
        "prompts": source, "prompts_available": len(rows),
        "policy_params": sum(int(np.prod(x.shape)) for x in jax.tree.leaves(trainer.state.policy)),
        "jax": jax.__version__, "backend": jax.default_backend(), "devices": jax.device_count(),
        "total_wall_sec": round(time.perf_counter() - t_start, 2),
        "loadavg_1m_start_end": [round(load_start, 2), round(os.getloadavg()[0], 2)],
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    line = json.dumps(out)
    print(line, flush=True)
    if args.out_json:
        os.makedirs(os.path.dirname(os.path.abspath(args.out_json)), exist_ok=True)
        with open(args.out_json, "w") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    sys.exit(main())
