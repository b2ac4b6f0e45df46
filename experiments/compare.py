"""Interleave jaxppo and a peer in one run and print the ratio (this machine is noisy).

    python experiments/compare.py rollout --rounds 5 --model-dir ~/.cache/jaxppo-peers/tiny-ppo-models [--devices N]
    python experiments/compare.py ppo     --rounds 3 --model-dir ~/.cache/jaxppo-peers/tiny-ppo-models
    python experiments/compare.py grpo    --rounds 3 --model-dir ~/.cache/jaxppo-peers/tiny-ppo-models

Each round runs the jaxppo benchmark (this interpreter) and then the peer's (`--peer-python`,
default the venv made by `../shared/peers/setup_trl_venv.sh`; for grpo the one made by
`../shared/peers/trl_grpo/setup_trl_grpo_venv.sh`) as separate processes, A B A B ...
grpo runs `bench_grpo.py` against `trl_grpo_bench.py` with the same flags (P 4 x G 4, prompt 16,
completion 32, `--warmup 1`; `--iters` defaults to 8 there, the peer's README run); `--mesh-data`
goes to bench_grpo.py only.
The JSON lines of every process and one summary line (medians and the ratio of medians) are
printed; `--out` also writes them to a file.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
PEERS = os.path.normpath(os.path.join(HERE, "..", "..", "shared", "peers"))
DEFAULT_PEER_PY = os.path.expanduser("~/.cache/jaxppo-peers/venv-trl/bin/python")
DEFAULT_GRPO_PEER_PY = os.path.expanduser("~/.cache/jaxppo-peers/venv-trl-grpo/bin/python")


def run(cmd: list[str]) -> dict:
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"error: {' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["rollout", "ppo", "grpo"])
    ap.add_argument("--model-dir", default=os.path.expanduser("~/.cache/jaxppo-peers/tiny-ppo-models"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--peer-python", help=f"default {DEFAULT_PEER_PY} ({DEFAULT_GRPO_PEER_PY} for grpo)")
    ap.add_argument("--iters", type=int, help="default 10 (8 for grpo)")
    ap.add_argument("--mesh-data", type=int, default=1, help="grpo: bench_grpo.py --mesh-data")
    ap.add_argument("--devices", type=int, default=0,
                    help="rollout: bench_rollout.py --devices (default: the devices the rollout samples on)")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    if args.peer_python is None:
        args.peer_python = DEFAULT_GRPO_PEER_PY if args.what == "grpo" else DEFAULT_PEER_PY
    if args.iters is None:
        args.iters = 8 if args.what == "grpo" else 10

    common = ["--model-dir", args.model_dir, "--batch", "16", "--prompt-len", "16"]
    if args.what == "rollout":
        ours = [sys.executable, os.path.join(HERE, "bench_rollout.py"), *common, "--new-tokens", "32",
                "--iters", str(max(args.iters, 10)), "--devices", str(args.devices)]
        peer = [args.peer_python, os.path.join(HERE, "bench_rollout.py"), *common, "--new-tokens", "32",
                "--iters", str(max(args.iters, 10)), "--impl", "transformers"]
        key, higher_is_better = "tokens_per_sec", True
    elif args.what == "grpo":
        grpo = ["--model-dir", args.model_dir, "--prompts-per-step", "4", "--num-generations", "4",
                "--prompt-len", "16", "--completion-length", "32", "--iters", str(args.iters), "--warmup", "1"]
        ours = [sys.executable, os.path.join(HERE, "bench_grpo.py"), *grpo, "--mesh-data", str(args.mesh_data)]
        peer = [args.peer_python, os.path.join(PEERS, "trl_grpo", "trl_grpo_bench.py"), *grpo]
        key, higher_is_better = "sec_per_iter_median", False
    else:
        ppo = ["--response-length", "32", "--ppo-epochs", "4", "--num-mini-batches", "2",
               "--iters", str(args.iters), "--warmup", "1"]
        ours = [sys.executable, os.path.join(HERE, "bench_ppo.py"), *common, *ppo]
        peer = [args.peer_python, os.path.join(PEERS, "trl_ppo_bench.py"), *common, *ppo, "--gen-iters", "0"]
        key, higher_is_better = "sec_per_iter_median", False

    rows = []
    for r in range(args.rounds):
        for name, cmd in (("jaxppo", ours), ("peer", peer)):
            res = run(cmd)
            res["round"], res["side"] = r, name
            rows.append(res)
            print(json.dumps(res), flush=True)
    a = statistics.median(x[key] for x in rows if x["side"] == "jaxppo")
    b = statistics.median(x[key] for x in rows if x["side"] == "peer")
    ratio = a / b if higher_is_better else b / a
    summary = {"compare": args.what, "metric": key, "jaxppo_median": a, "peer_median": b,
               "speedup_jaxppo_over_peer": round(ratio, 3), "rounds": args.rounds}
    if args.what == "rollout":                  # jaxppo's rate on one device, and the devices it sampled on
        summary["jaxppo_tokens_per_sec_1_device_median"] = statistics.median(
            x["tokens_per_sec_1_device"] for x in rows if x["side"] == "jaxppo")
        summary["jaxppo_devices"] = rows[0]["devices"]
    for extra in ("cpu_sec_per_iter_median", "generated_tokens_per_sec"):   # where both sides report it
        if all(extra in x for x in rows):
            for side in ("jaxppo", "peer"):
                summary[f"{side}_{extra}"] = statistics.median(x[extra] for x in rows if x["side"] == side)
    print(json.dumps(summary), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            for x in rows + [summary]:
                f.write(json.dumps(x) + "\n")


if __name__ == "__main__":
    main()
