"""Cost of the production features: a run with checkpoints + evaluation every N steps against the
same run with both off (interleaved, separate processes, A B A B ...).

    python experiments/bench_features.py --rounds 2 --steps 60                  # the demo, every 10
    python experiments/bench_features.py --work peer-ppo --rounds 3 --steps 25 --every 5

`--work peer-ppo` is the TRL peer's PPO work through `python -m jaxppo.train` (issue #22's A/B):
`--model-dir`'s policy/, reward/ and value/ (`../shared/peers/make_tiny_models.py` output), its
prompts.jsonl (10 % held out for evaluation: 51 prompts), batch 16, prompts cut to 16 tokens,
32 new tokens without stopping, 4 epochs x 2 minibatches. Both variants set
`train.save_every_minutes=0` (the default 10 minutes would not fire in a short run anyway); both
end with the final evaluation and checkpoint, so the difference is the periodic ones.

Per run: `wall_sec` (the run's own summary: loading, compiling, training, final eval and save) and
`steps_per_sec` from the training rows of metrics.jsonl: (last step - first step) / (time of last
row - time of first row), from the end of step 2 (compilation excluded, every periodic save and
evaluation included). The evaluation is its own program, compiled before the first step, and runs
in a background thread while the next step trains; a save packs the small leaves of the state into
one host array per dtype and orbax writes it in the background.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile


def peer_ppo_overrides(model_dir: str) -> list[str]:
    m = os.path.expanduser(model_dir)
    return [f"model.policy={m}/policy", f"model.reward_model={m}/reward", f"model.critic={m}/value",
            f"data.prompts={m}/prompts.jsonl", "reward.task=null", "data.max_prompt_length=16",
            "rollout.max_new_tokens=32", "rollout.stop_at_eos=false", "train.batch_size=16",
            "ppo.epochs=4", "ppo.num_minibatches=2"]


def run(extra: list[str], steps: int, out_dir: str) -> dict:
    cmd = [sys.executable, "-m", "jaxppo.train", f"train.total_steps={steps}", "logging.progress_bar=false",
           "train.save_every_minutes=0", f"train.output_dir={out_dir}", *extra]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
        sys.exit(f"error: {' '.join(cmd)}\n{res.stderr[-2000:]}")
    summary = json.loads([line for line in res.stdout.splitlines() if line.startswith("summary: ")][-1][9:])
    rows = [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]
    train = [r for r in rows if r["split"] == "train"]
    first, last = train[1], train[-1]          # from the end of step 2: compile excluded
    return {"wall_sec": summary["wall_sec"], "steps_per_sec": (last["step"] - first["step"]) / (last["time"] - first["time"])}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", choices=["demo", "peer-ppo"], default="demo")
    ap.add_argument("--model-dir", default="~/.cache/jaxppo-peers/tiny-ppo-models", help="for --work peer-ppo")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--every", type=int, default=10)
    args = ap.parse_args(argv)
    work = peer_ppo_overrides(args.model_dir) if args.work == "peer-ppo" else []
    variants = {
        "off": ["train.save_every=0", "train.eval_every=0"],
        "on": [f"train.save_every={args.every}", f"train.eval_every={args.every}"],
    }
    results = {k: [] for k in variants}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for name, extra in variants.items():
                res = run(work + extra, args.steps, os.path.join(tmp, f"{name}{r}"))
                results[name].append(res)
                print(json.dumps({"round": r, "variant": name, **{k: round(v, 4) for k, v in res.items()}}), flush=True)
    med = {name: {k: statistics.median(r[k] for r in rs) for k in ("wall_sec", "steps_per_sec")}
           for name, rs in results.items()}
    pairs = [round(on["wall_sec"] / off["wall_sec"] - 1, 4) for off, on in zip(results["off"], results["on"])]
    print(json.dumps({"work": args.work, "every": args.every, "rounds": args.rounds, "steps": args.steps,
                      "wall_sec_off": round(med["off"]["wall_sec"], 3), "wall_sec_on": round(med["on"]["wall_sec"], 3),
                      "wall_cost_per_pair": pairs, "wall_cost_median_of_pairs": statistics.median(pairs),
                      "steps_per_sec_off": round(med["off"]["steps_per_sec"], 4),
                      "steps_per_sec_on": round(med["on"]["steps_per_sec"], 4),
                      "ratio_on_over_off": round(med["on"]["steps_per_sec"] / med["off"]["steps_per_sec"], 4)}))


if __name__ == "__main__":
    main()
