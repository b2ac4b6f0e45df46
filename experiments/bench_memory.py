"""Peak memory of PPO on a ~100M-parameter GPT-2 on the CPU, with and without the memory options.

    python experiments/bench_memory.py                      # all variants a..e
    python experiments/bench_memory.py --variants a,e --out /tmp/bench_memory.jsonl

Variants (each in its own subprocess, so `ru_maxrss` is that variant's peak):
  a  baseline: float32, no remat, rollout.forward_batch_size=null, optim.grad_accum_steps=1
  b  model.remat=true                        (rematerialise each transformer block in the update)
  c  model.dtype=bfloat16, model.ref_dtype=bfloat16   (params, Adam state and compute in bf16)
  d  rollout.forward_batch_size=2, optim.grad_accum_steps=4   (micro-batched forwards / update)
  e  b + c + d
  f  c + d (e without remat; not run unless asked for)
LoRA (issue #25; not in the default set: `--variants a,g,h,i,j,k`):
  g  model.lora.rank=16 (all-linear): the policy trains adapters over its frozen base (= the reference),
     the critic is trained in full
  h  g + model.lora.critic=true: the critic trains adapters (+ value head) over a frozen backbone too
  i  GRPO full fine-tuning, no critic: algo.advantage=grpo, rollout.num_generations=2, train.batch_size=
     half of --batch-size (the same number of responses per iteration)
  j  i + model.lora.rank=16
  k  g + model.ref_dtype=bfloat16 (the frozen base, i.e. the reference, stored in bf16; adapters fp32)

The model is a random GPT-2 (hidden 768, 12 layers, 12 heads, MLP 3072, tied embeddings) with a
16384-token embedding (~98M params) made once with `jaxppo.models.tiny.make_tiny` under
~/.cache/jaxppo/; its tokenizer has only 512 tokens. Policy, critic (the policy backbone with a
fresh scalar head, `model.critic_init=policy`) and a separate frozen reference are loaded; the reward
is the built-in `vowels` task (with LoRA there is no separate reference: the policy's frozen base is it). Workload: 8 prompts (<= 32 tokens) x 32 new tokens, 1 epoch x 1
minibatch, 2 iterations (the first one compiles).

One JSON line per variant, then a summary line. Per variant:
  peak_rss_mb            ru_maxrss of the whole process (includes the final checkpoint + export)
  peak_rss_loop_mb       ru_maxrss when the training loop ended (before the final checkpoint/export)
  peak_rss_init_mb       ru_maxrss after PPOTrainer() (models loaded, state built, nothing compiled)
  rss_phase_peak_mb      peak VmRSS per phase, sampled every 20 ms by a thread: rollout1/update1 (these
                         compile), rollout2/update2 (steady state), host (reward functions, logging),
                         final (checkpoint + export); malloc_trim(0) at each phase start so memory
                         freed earlier (e.g. by the compiler) is handed back before the phase is measured
  steady_peak_rss_mb     max of rollout2/update2: the peak of an iteration that does not compile
  live_buffers_mb        sum(x.nbytes for x in jax.live_arrays()) right after trainer.train(); this
                         counts a buffer once per jax.Array that views it: after the final orbax save
                         every TrainState buffer has a second view, so it reads state_mb too high
  live_buffers_unique_mb the same over distinct device buffers (unsafe_buffer_pointer)
  state_mb / frozen_mb   bytes of the TrainState (trained params + Adam) and of `trainer.frozen` (the
                         reference = with LoRA the policy's base, and a LoRA critic's frozen backbone)
  sizes                  parameter counts and bytes: policy_params / critic_params are the trained ones
                         (with LoRA the adapters, + the value head for a LoRA critic), ref_params the
                         frozen reference / LoRA base, critic_base_params a LoRA critic's frozen
                         backbone; trainable_params / frozen_params their sums
  sec_per_iter           trainer.history[1]["time/iteration"] (the 2nd iteration; the 1st compiles)
and the analytic float32 numbers (params of policy + critic + ref (+ critic base), Adam moments and
gradients of the trained params only), so
the rest of the peak is activations, XLA temporaries, compile-time memory and the Python/XLA runtime.

The XLA persistent compilation cache is off in the workers (JAXPPO_COMPILATION_CACHE=0) so every
variant compiles from scratch and peaks are comparable; `--compilation-cache` keeps it on.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time

VARIANTS = {
    "a": ("baseline fp32", []),
    "b": ("remat", ["model.remat=true"]),
    "c": ("bf16", ["model.dtype=bfloat16", "model.ref_dtype=bfloat16"]),
    "d": ("micro-batch fwd=2 accum=4", ["rollout.forward_batch_size=2", "optim.grad_accum_steps=4"]),
    "e": ("all", ["model.remat=true", "model.dtype=bfloat16", "model.ref_dtype=bfloat16",
                  "rollout.forward_batch_size=2", "optim.grad_accum_steps=4"]),
    # not in the default set: e without remat (bf16 + micro-batching), for when remat cannot run
    "f": ("bf16 + micro-batch (e minus remat)", ["model.dtype=bfloat16", "model.ref_dtype=bfloat16",
                                                 "rollout.forward_batch_size=2", "optim.grad_accum_steps=4"]),
    # LoRA (issue #25); "{half_batch}" is --batch-size // 2 (GRPO: same number of responses with G=2)
    "g": ("PPO LoRA r16 (critic full)", ["model.lora.rank=16"]),
    "h": ("PPO LoRA r16 + LoRA critic", ["model.lora.rank=16", "model.lora.critic=true"]),
    "i": ("GRPO full fine-tuning", ["algo.advantage=grpo", "rollout.num_generations=2",
                                    "train.batch_size={half_batch}"]),
    "j": ("GRPO LoRA r16", ["algo.advantage=grpo", "rollout.num_generations=2", "train.batch_size={half_batch}",
                            "model.lora.rank=16"]),
    "k": ("PPO LoRA r16, bf16 frozen base", ["model.lora.rank=16", "model.ref_dtype=bfloat16"]),
}
BASE = ["model.dtype=float32", "model.remat=false", "rollout.forward_batch_size=null", "optim.grad_accum_steps=1"]

_MB = 1024 ** 2


def _maxrss_bytes() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024      # Linux reports KiB


def _current_rss_bytes() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def model_dir(vocab_size: int, max_pos: int) -> str:
    from jaxppo.runtime import cache_root

    return str(cache_root() / f"bench-gpt2-h768-l12-v{vocab_size}-p{max_pos}")


def ensure_model(vocab_size: int, max_pos: int) -> str:
    """Make the ~100M GPT-2 once (written to a temp folder, then renamed)."""
    path = model_dir(vocab_size, max_pos)
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    from jaxppo.models.tiny import make_tiny

    tmp = path + f".tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    make_tiny(tmp, arch="gpt2", vocab_size=vocab_size, seed=0, hidden_size=768, num_layers=12, num_heads=12,
              intermediate_size=3072, max_position_embeddings=max_pos, tie_word_embeddings=True)
    os.replace(tmp, path)
    return path


def checkpoint_param_count(path: str) -> int:
    from safetensors import safe_open

    n = 0
    with safe_open(os.path.join(path, "model.safetensors"), "numpy") as f:
        for k in f.keys():
            shape = f.get_slice(k).get_shape()
            c = 1
            for s in shape:
                c *= int(s)
            n += c
    return n


# ----------------------------------------------------------------------------- worker

class _RssSampler:
    """Peak VmRSS per named phase, polled by a daemon thread."""

    def __init__(self, period: float = 0.02):
        import ctypes
        import threading

        try:
            self._trim = ctypes.CDLL("libc.so.6").malloc_trim
        except OSError:
            self._trim = None
        self.period, self.phase, self.peaks = period, "init", {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _record(self):
        r = _current_rss_bytes() or 0
        ph = self.phase
        if r > self.peaks.get(ph, 0):
            self.peaks[ph] = r

    def _run(self):
        while not self._stop.is_set():
            self._record()
            self._stop.wait(self.period)

    def enter(self, phase: str):
        self._record()                 # close the previous phase
        if self._trim is not None:
            self._trim(0)
        self.phase = phase
        self._record()

    def stop(self) -> dict:
        self._record()
        self._stop.set()
        self._thread.join()
        return {k: v / _MB for k, v in self.peaks.items()}


def _tree_bytes(tree) -> int:
    import jax

    return sum(int(x.nbytes) for x in jax.tree.leaves(tree) if hasattr(x, "nbytes"))


def _tree_count(tree) -> int:
    import jax

    return sum(int(x.size) for x in jax.tree.leaves(tree) if hasattr(x, "size"))


def _unique_live_bytes(arrays) -> int | None:
    """Bytes of the distinct device buffers behind `arrays`: several jax.Array objects can view one
    buffer (e.g. a module's Params and the TrainState leaves made from them, or the per-shard
    arrays orbax creates when it saves), and summing `nbytes` over live_arrays counts each view."""
    seen = {}
    try:
        for a in arrays:
            if len(a.sharding.device_set) == 1:   # no per-shard views made (they would stay cached)
                seen[(str(next(iter(a.sharding.device_set))), a.unsafe_buffer_pointer())] = int(a.nbytes)
                continue
            for sh in a.addressable_shards:
                d = sh.data
                seen[(str(d.device), d.unsafe_buffer_pointer())] = int(d.nbytes)
    except Exception:  # noqa: BLE001 - a backend without buffer pointers: no deduplicated number
        return None
    return sum(seen.values())


def worker(spec: dict) -> dict:
    t_start = time.perf_counter()
    import jax

    from jaxppo.config import load_config
    from jaxppo.engine import programs as iteration
    from jaxppo.run.trainer import PPOTrainer

    sampler = _RssSampler()
    out_dir = spec["output_dir"]
    shutil.rmtree(out_dir, ignore_errors=True)
    overrides = [
        f"model.policy={spec['model_dir']}", "model.critic_init=policy", "reward.task=vowels",
        f"train.batch_size={spec['batch_size']}", f"rollout.max_new_tokens={spec['max_new_tokens']}",
        f"data.max_prompt_length={spec['max_prompt_length']}", "ppo.epochs=1", "ppo.num_minibatches=1",
        "optim.lr=1e-5", "train.total_steps=2", "train.eval_every=0", "data.eval_fraction=0",
        "logging.progress_bar=false", "logging.tensorboard=false", f"train.output_dir={out_dir}",
        *BASE, *spec["overrides"],
    ]
    cfg = load_config(None, overrides)
    trainer = PPOTrainer(cfg)
    rss_init = _maxrss_bytes()

    st, fz = trainer.state, trainer.frozen
    # trained: the policy (with LoRA its adapters) and the critic (a LoRA critic: adapters + value head);
    # frozen: the reference (with LoRA the policy's base), a LoRA critic's backbone, a reward model
    sizes = {
        "lora": trainer.models.lora is not None, "critic_lora": bool(trainer.models.graphs.critic_lora),
        "policy_params": _tree_count(st.policy), "critic_params": _tree_count(st.critic),
        "ref_params": _tree_count(fz.ref), "critic_base_params": _tree_count(fz.critic_base),
        "reward_model_params": _tree_count(fz.reward_model),
        "policy_bytes": _tree_bytes(st.policy), "critic_bytes": _tree_bytes(st.critic),
        "ref_bytes": _tree_bytes(fz.ref), "critic_base_bytes": _tree_bytes(fz.critic_base),
        "adam_bytes": _tree_bytes((st.policy_opt, st.critic_opt)),
        "param_dtypes": sorted({str(x.dtype) for x in jax.tree.leaves(st.policy)}),
        "adam_dtypes": sorted({str(x.dtype) for x in jax.tree.leaves((st.policy_opt, st.critic_opt))
                               if getattr(x, "ndim", 0) > 0}),
        "ref_dtypes": sorted({str(x.dtype) for x in jax.tree.leaves(fz.ref)}),
    }
    sizes["trainable_params"] = sizes["policy_params"] + sizes["critic_params"]
    sizes["frozen_params"] = sizes["ref_params"] + sizes["critic_base_params"] + sizes["reward_model_params"]
    live0 = jax.live_arrays()
    live_init = sum(int(x.nbytes) for x in live0)
    live_init_unique = _unique_live_bytes(live0)
    del live0
    del st, fz

    # ru_maxrss when the loop is over: the forced (final) checkpoint save marks the end; saves go
    # through trainer.run_dir.save (a periodic one, not forced, only if an iteration ran past
    # train.save_every_minutes)
    loop_peak = {}
    orig_save = trainer.run_dir.save

    def save_hook(*a, **k):
        if k.get("force"):
            loop_peak.setdefault("rss", _maxrss_bytes())
            sampler.enter("final")
        return orig_save(*a, **k)

    trainer.run_dir.save = save_hook

    # phase boundaries for the RSS sampler (the wrappers block on the outputs, which the trainer's
    # own next step - decoding the responses, fetching the metrics - would wait for anyway)
    calls = {"rollout": 0, "update": 0}

    def phase_wrap(name, fn):
        def wrapped(*a, **k):
            calls[name] += 1
            sampler.enter(f"{name}{calls[name]}")
            out = fn(*a, **k)
            jax.block_until_ready(out)
            sampler.enter("host")
            return out
        return wrapped

    iteration.rollout = phase_wrap("rollout", iteration.rollout)    # the trainer calls them through the module
    iteration.update = phase_wrap("update", iteration.update)
    summary = trainer.train()
    live = jax.live_arrays()
    live_bytes = sum(int(x.nbytes) for x in live)
    live_unique = _unique_live_bytes(live)
    state_bytes = _tree_bytes(trainer.state)
    frozen_bytes = _tree_bytes(trainer.frozen)
    h = trainer.history
    phase_peaks = sampler.stop()
    steady = [phase_peaks[k] for k in ("rollout2", "update2") if k in phase_peaks]
    it = [r.get("time/iteration") for r in h]
    res = {
        "peak_rss_mb": _maxrss_bytes() / _MB,
        "peak_rss_loop_mb": loop_peak["rss"] / _MB if "rss" in loop_peak else None,
        "peak_rss_init_mb": rss_init / _MB,
        "rss_end_mb": (_current_rss_bytes() or 0) / _MB,
        "rss_phase_peak_mb": phase_peaks,
        "steady_peak_rss_mb": max(steady) if steady else None,
        "live_buffers_mb": live_bytes / _MB,
        "live_buffers_unique_mb": None if live_unique is None else live_unique / _MB,
        "live_buffers_n": len(live),
        "live_buffers_not_state_or_frozen_mb": (live_bytes - state_bytes - frozen_bytes) / _MB,
        "live_buffers_init_mb": live_init / _MB,
        "live_buffers_init_unique_mb": None if live_init_unique is None else live_init_unique / _MB,
        "state_mb": state_bytes / _MB,
        "frozen_mb": frozen_bytes / _MB,
        "sec_per_iter": it[1] if len(it) > 1 else None,
        "sec_first_iter": it[0] if it else None,
        "rollout_sec": h[1].get("time/rollout") if len(h) > 1 else None,
        "update_sec": h[1].get("time/update") if len(h) > 1 else None,
        "nonfinite": [r.get("nonfinite") for r in h],
        "scores": [r.get("objective/scores") for r in h],
        "prompt_len": getattr(trainer.evaluator, "prompt_len", None),   # set by train(): the padded prompt length
        "steps": summary.get("steps"),
        "sizes": sizes,
        "wall_sec": time.perf_counter() - t_start,
    }
    if not spec.get("keep_run_dir"):
        shutil.rmtree(out_dir, ignore_errors=True)
    return res


# ----------------------------------------------------------------------------- parent

def analytic(n_policy: int, n_critic: int, n_ref: int, n_critic_base: int = 0) -> dict:
    """float32 sizes; n_policy / n_critic: the trained params (with LoRA the adapters), n_ref /
    n_critic_base: the frozen ones (the reference = a LoRA policy's base; a LoRA critic's backbone)."""
    f32 = 4
    trained, frozen = n_policy + n_critic, n_ref + n_critic_base
    return {
        "trainable_params": trained, "frozen_params": frozen,
        "params_fp32_mb": (trained + frozen) * f32 / _MB,                  # policy + critic + ref (+ critic base)
        "adam_fp32_mb": 2 * trained * f32 / _MB,                           # mu + nu of the trained params
        "grads_fp32_mb": trained * f32 / _MB,                              # transient, in the update
        "params_plus_adam_fp32_mb": (3 * trained + frozen) * f32 / _MB,
    }


def run_variant(key: str, args, mdir: str) -> dict:
    name, ov = VARIANTS[key]
    ov = [o.format(half_batch=max(1, args.batch_size // 2)) for o in ov]
    spec = {"model_dir": mdir, "overrides": ov, "batch_size": args.batch_size,
            "max_new_tokens": args.max_new_tokens, "max_prompt_length": args.max_prompt_length,
            "output_dir": os.path.join(args.run_root, key), "keep_run_dir": args.keep_run_dirs}
    env = dict(os.environ)
    if not args.compilation_cache:
        env["JAXPPO_COMPILATION_CACHE"] = "0"
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)],
                          env=env, capture_output=True, text=True, timeout=args.timeout)
    batch = next((int(o.split("=", 1)[1]) for o in ov if o.startswith("train.batch_size=")), args.batch_size)
    row = {"variant": key, "name": name, "overrides": ov, "batch_size": batch,
           "max_new_tokens": args.max_new_tokens, "max_prompt_length": args.max_prompt_length}
    result = None
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT "):])
    if proc.returncode != 0 or result is None:
        tail = (proc.stderr or proc.stdout)[-4000:]
        row.update({"error": f"worker exited {proc.returncode}", "stderr_tail": tail,
                    "wall_sec": time.perf_counter() - t0})
        return row
    row.update(result)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default="a,b,c,d,e", help="comma-separated subset of " + ",".join(VARIANTS))
    ap.add_argument("--out", help="also write the JSON lines to this file")
    ap.add_argument("--vocab-size", type=int, default=16384)
    ap.add_argument("--max-position-embeddings", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--max-prompt-length", type=int, default=32)
    ap.add_argument("--run-root", default="/tmp/jaxppo-bench-memory")
    ap.add_argument("--keep-run-dirs", action="store_true")
    ap.add_argument("--compilation-cache", action="store_true", help="leave the XLA compilation cache on")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per variant")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))), flush=True)
        return 0

    keys = [k.strip() for k in args.variants.split(",") if k.strip()]
    bad = [k for k in keys if k not in VARIANTS]
    if bad:
        ap.error(f"unknown variant(s) {bad}; known: {sorted(VARIANTS)}")
    mdir = ensure_model(args.vocab_size, args.max_position_embeddings)
    n = checkpoint_param_count(mdir)
    # critic = the policy backbone + a 1-output head (no LM head: tied embeddings, so same count + hidden + 1)
    header = {"model_dir": mdir, "params": n, "params_m": round(n / 1e6, 2),
              "analytic_estimate": analytic(n, n + 768 + 1, n)}
    print(json.dumps(header), flush=True)
    out = open(args.out, "w") if args.out else None
    if out:
        out.write(json.dumps(header) + "\n")
    rows = []
    for k in keys:
        row = run_variant(k, args, mdir)
        if "sizes" in row:
            s = row["sizes"]
            row["analytic"] = analytic(s["policy_params"], s["critic_params"], s["ref_params"],
                                       s.get("critic_base_params", 0))
            row["measured_params_mb"] = (s["policy_bytes"] + s["critic_bytes"] + s["ref_bytes"]
                                         + s.get("critic_base_bytes", 0)) / _MB
            row["measured_adam_mb"] = s["adam_bytes"] / _MB
        rows.append(row)
        line = json.dumps(row)
        print(line, flush=True)
        if out:
            out.write(line + "\n")
            out.flush()
    base = next((r for r in rows if r["variant"] == "a" and "error" not in r), None)
    table = []
    for r in rows:
        t = {"variant": r["variant"], "name": r["name"]}
        if "error" in r:
            t["error"] = r["error"]
        else:
            t.update({"trainable_params": r["sizes"]["trainable_params"], "frozen_params": r["sizes"]["frozen_params"]})
            t.update({k: (round(r[k], 2) if isinstance(r[k], float) else r[k])
                      for k in ("peak_rss_mb", "peak_rss_loop_mb", "steady_peak_rss_mb", "live_buffers_mb",
                                "live_buffers_unique_mb", "state_mb", "frozen_mb", "sec_per_iter",
                                "measured_params_mb", "measured_adam_mb")})
            if base is not None:
                t["peak_rss_vs_a"] = round(r["peak_rss_mb"] / base["peak_rss_mb"], 3)
        table.append(t)
    summary = {"summary": table, "params": n,
               "workload": {"batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens,
                            "max_prompt_length": args.max_prompt_length, "ppo.epochs": 1,
                            "ppo.num_minibatches": 1, "train.total_steps": 2}}
    print(json.dumps(summary), flush=True)
    if out:
        out.write(json.dumps(summary) + "\n")
        out.close()
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
