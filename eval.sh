#!/usr/bin/env bash
# Export masks for the test list with the published settings.
#
#   bash eval.sh GPU_ID [extra eval.py flags]      GPU_ID: a CUDA index (0, 1, ...), a list
#                                                   of them for LAUNCH=torchrun, or "cpu"
#
# Examples:
#   bash eval.sh 0                                  # full-modality masks -> outputs/LCKD/
#   MODE=all bash eval.sh 0                         # all 15 subsets in one pass
#   DATA_ROOT=/data/BraTS2018 CKPT=snapshots/mine/final.pth bash eval.sh 1 --mirror
#   DATA_LIST=BraTS18/BraTS18_val.csv MODE=all OUT=outputs/val bash eval.sh 0   # scored table
#   INPUT=/data/new_cases MODE=available bash eval.sh 0 --figures   # incomplete cases, pictures
#   LAUNCH="torchrun --nproc_per_node 4" bash eval.sh 0,1,2,3        # the cases split over 4 GPUs
#   MODE=all bash eval.sh 0 --resume                # continue a stopped run (same settings)
#
# Variables (override from the environment; a relative path you give is taken from the folder
# you run the script in when it exists there, OUT always; the defaults are the repository's):
set -euo pipefail
. "$(dirname "$(readlink -f "$0")")/utils/callers_paths.sh"
callers_paths inputs CKPT DATA_LIST DATA_ROOT INPUT
callers_paths outputs OUT
callers_python
NAME=${NAME:-LCKD}                                  # as in run.sh: snapshots/${NAME}_stage2/
CKPT=${CKPT:-snapshots/${NAME}_stage2/final.pth}
DATA_LIST=${DATA_LIST:-BraTS18/BraTS18_test.csv}    # looked up in datalist/ (published)
DATA_ROOT=${DATA_ROOT:-}                            # empty: the list's ../data/... paths as written
INPUT=${INPUT:-}                                    # a folder of case folders, instead of DATA_LIST
MODE=${MODE:-0,1,2,3}                               # a subset such as 0,2 or flair,t1ce; all; available
OUT=${OUT:-outputs/${NAME}}
PYTHON=${PYTHON:-python}
launch_command  # how eval.py starts: LAUNCH="torchrun --nproc_per_node 4", else $PYTHON
check_name

if [ $# -lt 1 ]; then
    echo "usage: bash eval.sh GPU_ID|cpu [extra eval.py flags]   (GPU_ID: a CUDA index, or a list of them for LAUNCH=torchrun)" >&2
    exit 2
fi
GPU=$1
shift
if [ "$GPU" = "cpu" ]; then
    export CUDA_VISIBLE_DEVICES=""
    DEVICE=cpu
else
    check_gpu_id "$GPU" cpu
    export CUDA_VISIBLE_DEVICES=$GPU  # under torchrun, process i takes the i-th GPU listed
    DEVICE=cuda
fi

enter_repository
. utils/logged.sh
mkdir -p logs
# MODE in a file name: eval.py says what is wrong with a MODE such as 0/2, in the log
LOG=$(new_log "logs/$(date "+%Y%m%d-%H%M%S")_eval_${NAME}_${MODE//[^A-Za-z0-9+]/-}")
echo "log: $LOG"
if [ -n "$INPUT" ]; then cases=(--input="$INPUT"); else cases=(--data_list="$DATA_LIST"); fi
# The patch size and model flags come from the checkpoint's config (published: 80,160,160,
# weight_std True); extra flags such as --input_size 80,160,160 override them.
# --overwrite: this script is the re-export command, so it replaces the previous evaluation in
# $OUT (eval.py's files only; eval.py alone refuses an output folder holding one), unless
# --resume is among the extra flags: then it continues that evaluation.
replace=(--overwrite)
for flag in "$@"; do
    if [ "$flag" = "--resume" ]; then replace=(); fi
done
# After Ctrl-C or a scheduler's SIGTERM, this script waits for eval.py to finish the masks in
# hand and exits with its status (130, 143); eval.py's last line reaches the log (`logged`).
logged "$LOG" "${LAUNCH_COMMAND[@]}" eval.py \
    --num_classes=3 \
    --data_dir=datalist/ \
    "${cases[@]}" \
    ${DATA_ROOT:+--data_root="$DATA_ROOT"} \
    --restore_from="$CKPT" \
    --mode="$MODE" \
    --output_dir="$OUT" \
    "${replace[@]}" \
    --device="$DEVICE" \
    "$@"
