#!/usr/bin/env bash
# The GPU figures in the README's performance section, in one run on one card:
# the full model at the published patch (fp32 vs bf16), training iterations per second of the
# real pipeline (cache -> sampler -> GPU augmentation -> step) and full-volume evaluation.
#   bash benchmarks/gpu.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-$(mktemp -d)}
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
for amp in off bf16; do
  python benchmarks/bench_model.py --model full --device cuda --patch 80,160,160 --batch 2 \
    --amp "$amp" --steps 5 --warmup 2
done
python -m datasets.synthetic --out_dir "$WORK/data" --num_cases 6 --shape 240,240,155
for amp in off bf16; do
  start=$(date +%s%N)
  python train.py --device cuda --amp "$amp" --train_list "$WORK/data/train.csv" --val_list "" \
    --cache_dir "$WORK/cache" --snapshot_dir "$WORK/snap_$amp" --num_steps 60 --val_pred_every 1000 \
    --num_workers 8 >"$WORK/train_$amp.log" 2>&1 || { tail -n 30 "$WORK/train_$amp.log"; exit 1; }
  tr '\r' '\n' <"$WORK/train_$amp.log" | grep -E "it/s|s/it" | tail -n 1
  echo "train.py 60 iterations amp=$amp: $(( ($(date +%s%N) - start) / 1000000 )) ms wall (incl. start-up)"
done
python benchmarks/bench_eval.py --device cuda --model full --shape 240,240,155 --patch 80,160,160 \
  --amp bf16 --cases 2
