#!/usr/bin/env bash
# The GPU figures in the README's performance section, on one card:
#   bash benchmarks/gpu.sh OUT_DIR [PART ...]      PARTS: train model eval (default: all three)
# train  bench_train.py: full model, 80x160x160, batch 2, stage 1 and stage 2, the real train.py
#        loop and the bare step per variant (published step, fp32, bf16, + channels-last,
#        + torch.compile): it/s, data-wait share, peak memory, MFU;
# model  bench_model.py: train step and 15-subset decode, fp32 and bf16;
# eval   bench_eval.py: full-volume evaluation of all 15 subsets, bf16.
# Each part's table goes to OUT_DIR/<part>.txt (and the terminal), its log to OUT_DIR/<part>.log.
# bench_train knobs (environment): VARIANTS, WARMUP, STEPS, WORKERS, STAGES, and WORK, a folder
# to keep its synthetic cases and cache in for a re-run (default: a temporary folder; the
# cache of 4 cases of 240x240x155 is ~0.6 GB, so not under OUT_DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: bash benchmarks/gpu.sh OUT_DIR [train] [model] [eval]}
shift
PARTS=("$@")
if [ ${#PARTS[@]} -eq 0 ]; then PARTS=(train model eval); fi
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"

# run NAME COMMAND...: stdout to OUT/NAME.txt and the terminal, stderr to OUT/NAME.log.
run() {
  local name=$1
  shift
  if ! "$@" 2>>"$OUT/$name.log" | tee -a "$OUT/$name.txt"; then
    tail -n 40 "$OUT/$name.log"
    exit 1
  fi
}

for part in "${PARTS[@]}"; do
  case $part in
    train)
      work=()
      if [ -n "${WORK:-}" ]; then work=(--work_dir "$WORK"); fi
      run train python benchmarks/bench_train.py --device cuda --model full --patch 80,160,160 \
        --batch 2 "${work[@]}" \
        --variants "${VARIANTS:-published,fp32,bf16,bf16_cl,bf16_cl_compile}" \
        --stages "${STAGES:-stage 1,stage 2}" --warmup "${WARMUP:-10}" --steps "${STEPS:-30}" \
        --num_workers "${WORKERS:-8}"
      ;;
    model)
      for amp in off bf16; do
        run model python benchmarks/bench_model.py --model full --device cuda --patch 80,160,160 \
          --batch 2 --amp "$amp" --steps 5 --warmup 2
      done
      ;;
    eval)
      run eval python benchmarks/bench_eval.py --device cuda --model full --shape 240,240,155 \
        --patch 80,160,160 --amp bf16 --cases 2
      ;;
    *)
      echo "unknown part $part: use train, model, eval" >&2
      exit 2
      ;;
  esac
done
