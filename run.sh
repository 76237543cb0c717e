#!/usr/bin/env bash
# Train LCKD with the published two-stage recipe:
#   stage 1  all four modalities, iterations 0 -> 80000            -> snapshots/LCKD_stage1/
#   stage 2  random missing modalities (--mode random), resumes stage 1's final.pth and
#            continues its iteration count and lr schedule 80000 -> 115000 -> snapshots/LCKD_stage2/
#
#   bash run.sh GPU_ID [extra train.py flags]     GPU_ID: 0, 1, ... or cpu
#   DATA_ROOT=/data/BraTS2018 bash run.sh 0       data outside ../data/BraTS-2018
#   bash run.sh 0 --amp bf16                      extra flags go to both stages
#
# Re-running the same command after a crash or a kill continues where it stopped: a stage
# whose final.pth exists is skipped, and a stage with a last.pth resumes from it exactly.
# Logs: logs/<date>_train_<stage>.log (also printed). Settings below can be overridden from
# the environment.
set -euo pipefail
cd "$(dirname "$0")"

GPU=${1:?usage: bash run.sh GPU_ID|cpu [extra train.py flags]}
shift

NAME=${NAME:-LCKD}                                  # snapshots/${NAME}_stage{1,2}/
DATA_ROOT=${DATA_ROOT:-}                            # '' = list entries as published (../data/...)
TRAIN_LIST=${TRAIN_LIST:-datalist/BraTS18/BraTS18_train_all.csv}  # published: all 285 cases
VAL_LIST=${VAL_LIST:-datalist/BraTS18/BraTS18_val.csv}             # teacher election
CACHE_DIR=${CACHE_DIR:-cache/BraTS18}
MODEL_SIZE=${MODEL_SIZE:-full}
PATCH=${PATCH:-80,160,160}
BATCH=${BATCH:-2}
STAGE1_STEPS=${STAGE1_STEPS:-80000}
STAGE2_STEPS=${STAGE2_STEPS:-115000}
VAL_EVERY=${VAL_EVERY:-5000}
NUM_WORKERS=${NUM_WORKERS:-4}
PYTHON=${PYTHON:-python}

if [ "$GPU" = cpu ]; then
    DEVICE=cpu
else
    export CUDA_VISIBLE_DEVICES=$GPU
    DEVICE=cuda
fi

common=(--device "$DEVICE" --model_size "$MODEL_SIZE" --input_size "$PATCH"
        --batch_size "$BATCH" --val_pred_every "$VAL_EVERY" --learning_rate 1e-2
        --num_classes 3 --num_workers "$NUM_WORKERS" --train_list "$TRAIN_LIST"
        --val_list "$VAL_LIST" --cache_dir "$CACHE_DIR" --random_mirror True
        --random_scale True --weight_std True --kd_weight 0.1)
if [ -n "$DATA_ROOT" ]; then common+=(--data_root "$DATA_ROOT"); fi

# stage NAME [train.py flags]: run one stage unless finished; resume it from its last.pth.
stage() {
    local name=$1
    shift
    local dir=snapshots/$name
    if [ -f "$dir/final.pth" ]; then
        echo "$dir/final.pth exists: $name is done, skipping"
        return
    fi
    local flags=("$@")
    if [ -f "$dir/last.pth" ]; then
        echo "resuming $name from $dir/last.pth"
        flags+=(--reload_path "$dir/last.pth" --reload_from_checkpoint True)
    fi
    mkdir -p logs
    local log
    log=logs/$(date "+%Y%m%d-%H%M%S")_train_$name.log
    echo "training $name (log: $log)"
    "$PYTHON" train.py "${common[@]}" --snapshot_dir "$dir" "${flags[@]}" "${EXTRA[@]}" 2>&1 | tee "$log"
}

EXTRA=("$@")
stage "${NAME}_stage1" --mode 0,1,2,3 --num_steps "$STAGE1_STEPS"
# Stage 2 takes the iteration to continue from out of the checkpoint (80000 after stage 1).
stage "${NAME}_stage2" --mode random --num_steps "$STAGE2_STEPS" \
    --reload_path "snapshots/${NAME}_stage1/final.pth" --reload_from_checkpoint True
