"""Cost of the production features: steps/s of the demo with checkpoints + evaluation every 10
steps, against the same run with both off (interleaved, separate processes).

    python experiments/bench_features.py --rounds 2 --steps 60

Throughput is measured from the training rows of metrics.jsonl: (last step - first step) /
(time of last row - time of first row), so start-up and the first compile are excluded while
every save and evaluation in between is included. The evaluation is its own program, compiled
before the first step, and runs in a background thread while the next step trains; a save packs
the small leaves of the state into one array per dtype and orbax writes it asynchronously.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile


def run(extra: list[str], steps: int, out_dir: str) -> float:
    cmd = [sys.executable, "-m", "jaxppo.train", f"train.total_steps={steps}", "logging.progress_bar=false",
           f"train.output_dir={out_dir}", *extra]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
        sys.exit(f"error: {' '.join(cmd)}\n{res.stderr[-2000:]}")
    rows = [json.loads(l) for l in open(os.path.join(out_dir, "metrics.jsonl"))]
    train = [r for r in rows if r["split"] == "train"]
    first, last = train[1], train[-1]          # from the end of step 2: compile excluded
    return (last["step"] - first["step"]) / (last["time"] - first["time"])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--every", type=int, default=10)
    args = ap.parse_args(argv)
    variants = {
        "off": ["train.save_every=0", "train.eval_every=0"],
        "on": [f"train.save_every={args.every}", f"train.eval_every={args.every}"],
    }
    results = {k: [] for k in variants}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for name, extra in variants.items():
                sps = run(extra, args.steps, os.path.join(tmp, f"{name}{r}"))
                results[name].append(sps)
                print(json.dumps({"round": r, "variant": name, "steps_per_sec": round(sps, 4)}), flush=True)
    off, on = statistics.median(results["off"]), statistics.median(results["on"])
    print(json.dumps({"steps_per_sec_off": round(off, 4), "steps_per_sec_save_eval_every_%d" % args.every: round(on, 4),
                      "ratio_on_over_off": round(on / off, 4), "rounds": args.rounds, "steps": args.steps}))


if __name__ == "__main__":
    main()
