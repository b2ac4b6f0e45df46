#!/usr/bin/env bash
# The accelerator benchmark of experiments/README.md: a random Qwen2-0.5B-shaped policy, value and
# reward model (24 layers, hidden 896, 14 query / 2 KV heads, MLP 4864, vocab 151,936, tied head),
# bf16, batch 64, 128 prompt + 256 new tokens, 4 epochs x 2 minibatches.
#
#     bash experiments/gpu_bench.sh OUT_DIR [ITERS]
#     LOGITS_CHUNK_MB=256 bash experiments/gpu_bench.sh OUT_DIR   # bench_ppo with model.logits_chunk_mb
#
# Writes OUT_DIR/rollout.json (bench_rollout.py: sampling alone) and OUT_DIR/ppo.json
# (bench_ppo.py: seconds per PPO iteration, phase split, update tokens/s and MFU against a measured
# bf16 matmul peak, decode tokens/s against the measured copy-bandwidth roofline), and their logs.
# The models are written under $MODELS (default /tmp/qwen2-0.5b-random, ~4 GB; made once).
set -uo pipefail
out=${1:?usage: gpu_bench.sh OUT_DIR [ITERS]}
iters=${2:-3}
py=${PYTHON:-python3}
here=$(cd "$(dirname "$0")" && pwd)
models=${MODELS:-/tmp/qwen2-0.5b-random}
mkdir -p "$out" "$models"
export PYTHONPATH="$here/..${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
shape=(--arch qwen2 --vocab-size 151936 --hidden-size 896 --num-layers 24 --num-heads 14 --num-kv-heads 2
       --intermediate-size 4864 --max-position-embeddings 32768 --tie)
t0=$(date +%s)
[ -f "$models/policy/model.safetensors" ] || "$py" -m jaxppo.models.tiny "$models/policy" "${shape[@]}" &
[ -f "$models/reward/model.safetensors" ] || "$py" -m jaxppo.models.tiny "$models/reward" "${shape[@]}" --reward-model &
wait
echo "models ready in $(( $(date +%s) - t0 )) s" | tee "$out/log.txt"
"$py" "$here/bench_rollout.py" --model-dir "$models" --dtype bfloat16 --batch 64 --prompt-len 128 \
    --new-tokens 256 --iters 5 > "$out/rollout.json" 2> "$out/rollout.log"
echo "rollout rc $? at $(( $(date +%s) - t0 )) s: $(cat "$out/rollout.json")" | tee -a "$out/log.txt"
"$py" "$here/bench_ppo.py" --model-dir "$models" --dtype bfloat16 --batch 64 --prompt-len 128 \
    --response-length 256 --ppo-epochs 4 --num-mini-batches 2 --iters "$iters" --warmup 1 \
    ${LOGITS_CHUNK_MB:+--logits-chunk-mb "$LOGITS_CHUNK_MB"} \
    > "$out/ppo.json" 2> "$out/ppo.log"
echo "ppo rc $? at $(( $(date +%s) - t0 )) s: $(cat "$out/ppo.json")" | tee -a "$out/log.txt"
