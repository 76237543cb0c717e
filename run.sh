#!/usr/bin/env bash
# Train LCKD with the published two-stage recipe:
#   stage 1  all four modalities, iterations 0 -> 80000            -> snapshots/LCKD_stage1/
#   stage 2  random missing modalities (--mode random), resumes stage 1's final.pth and
#            continues its iteration count 80000 -> 115000 (poly lr over 115000, as published)
#            -> snapshots/LCKD_stage2/
#
#   bash run.sh GPU_ID [extra train.py flags]     GPU_ID: 0, 1, ... or cpu
#   DATA_ROOT=/data/BraTS2018 bash run.sh 0       data outside ../data/BraTS-2018
#   bash run.sh 0 --amp off                       extra flags go to both stages; here fp32
#   bash run.sh 0 --amp off --channels_last off --compile off     the plain step: fp32, NCDHW,
#                                                 eager (GPU default: bf16 autocast,
#                                                 channels-last, torch.compile; README)
#   bash run.sh demo [extra train.py flags]       the whole pipeline on synthetic data (below)
#
# Re-running the same command after a crash, a kill, SIGTERM or Ctrl-C continues where it
# stopped: train.py resumes a stage from its own last.pth exactly, and does nothing for a
# finished one (final.pth), unless the settings differ: then it stops with one line.
# Logs: logs/<date>_train_<stage>.log (also printed). Settings below can be overridden from
# the environment.
#
# The demo (GPU_ID = demo) needs no data and no GPU (it uses one if present): it generates the
# synthetic BraTS-like dataset (20 cases of 96x96x64 voxels, a reduced size so that the whole
# job fits in 15 minutes on 2 CPU cores) into data/synthetic/ unless there already (other
# DEMO_CASES or DEMO_SHAPE than the folder's are refused), trains the small model
# through both stages (snapshots/demo_stage{1,2}/), exports masks for the test cases for all 15
# subsets with a figure per case and a Dice chart (outputs/demo/), post-processes them
# (outputs/demo_postprocessed/), segments one test case from its FLAIR and T1ce alone with
# predict.py (outputs/demo_predict/) and prints the 15-subset table, the elected teachers and
# where everything went. Ablation without distillation, same budget:
#   NAME=demo_nokd bash run.sh demo --kd_weight 0
set -euo pipefail
# A relative path given in DATA_ROOT, TRAIN_LIST, VAL_LIST is taken from the folder you run the
# script in when it exists there, CACHE_DIR and DEMO_DATA always; the defaults are the
# repository's.
. "$(dirname "$(readlink -f "$0")")/utils/callers_paths.sh"
callers_paths inputs DATA_ROOT TRAIN_LIST VAL_LIST
callers_paths outputs CACHE_DIR DEMO_DATA
callers_python
enter_repository
. utils/logged.sh

if [ $# -eq 0 ]; then
    echo "usage: bash run.sh GPU_ID|cpu|demo [extra train.py flags]" >&2
    exit 2
fi
GPU=$1
shift

if [ "$GPU" = demo ]; then
    DEMO_DATA=${DEMO_DATA:-data/synthetic}
    DEMO_CASES=${DEMO_CASES:-20}
    DEMO_SHAPE=${DEMO_SHAPE:-96,96,64}
    NAME=${NAME:-demo}
    TRAIN_LIST=${TRAIN_LIST:-$DEMO_DATA/train.csv}
    VAL_LIST=${VAL_LIST:-$DEMO_DATA/val.csv}
    MODEL_SIZE=${MODEL_SIZE:-small}
    PATCH=${PATCH:-32,64,64}
    STAGE1_STEPS=${STAGE1_STEPS:-600}
    STAGE2_STEPS=${STAGE2_STEPS:-1800}
    VAL_EVERY=${VAL_EVERY:-300}
    NUM_WORKERS=${NUM_WORKERS:-1}
fi
NAME=${NAME:-LCKD}                                  # snapshots/${NAME}_stage{1,2}/
DATA_ROOT=${DATA_ROOT:-}                            # '' = list entries as published (../data/...)
TRAIN_LIST=${TRAIN_LIST:-datalist/BraTS18/BraTS18_train_all.csv}  # published: all 285 cases
VAL_LIST=${VAL_LIST:-datalist/BraTS18/BraTS18_val.csv}             # teacher election
CACHE_DIR=${CACHE_DIR:-}                            # '' = train.py's cache/<train list's folder>
MODEL_SIZE=${MODEL_SIZE:-full}
PATCH=${PATCH:-80,160,160}
BATCH=${BATCH:-2}
STAGE1_STEPS=${STAGE1_STEPS:-80000}
STAGE2_STEPS=${STAGE2_STEPS:-115000}
VAL_EVERY=${VAL_EVERY:-5000}
NUM_WORKERS=${NUM_WORKERS:--1}                      # -1: DataLoader workers sized from the machine
PYTHON=${PYTHON:-python}
launch_command  # how train.py starts: LAUNCH="torchrun --nproc_per_node 4", else $PYTHON
check_name

# Checked now, not after stage 1 has trained (a test inside `if` that fails to parse is false).
for name in STAGE1_STEPS STAGE2_STEPS VAL_EVERY BATCH; do
    if ! [[ ${!name} =~ ^[0-9]+$ ]]; then
        echo "error: $name must be a whole number, got '${!name}'" >&2
        exit 2
    fi
done
# Stage 2 continues stage 1's iteration count: it must end later, or it would train nothing.
if [ "$STAGE2_STEPS" -le "$STAGE1_STEPS" ]; then
    echo "error: STAGE2_STEPS ($STAGE2_STEPS) must be greater than STAGE1_STEPS ($STAGE1_STEPS)" >&2
    exit 2
fi

if [ "$GPU" = cpu ]; then
    DEVICE=cpu
elif [ "$GPU" = demo ]; then
    DEVICE=auto
else
    check_gpu_id "$GPU" "cpu or demo"
    export CUDA_VISIBLE_DEVICES=$GPU
    DEVICE=cuda
    AMP=${AMP:-bf16}  # bf16 autocast on GPUs; fp32 with --amp off
fi
AMP=${AMP:-off}

common=(--device "$DEVICE" --amp "$AMP" --model_size "$MODEL_SIZE" --input_size "$PATCH"
        --batch_size "$BATCH" --val_pred_every "$VAL_EVERY" --learning_rate 1e-2
        --num_classes 3 --num_workers "$NUM_WORKERS" --train_list "$TRAIN_LIST"
        --val_list "$VAL_LIST" --random_mirror True
        --random_scale True --weight_std True --kd_weight 0.1)
if [ -n "$DATA_ROOT" ]; then common+=(--data_root "$DATA_ROOT"); fi
if [ -n "$CACHE_DIR" ]; then common+=(--cache_dir "$CACHE_DIR"); fi

# stage NAME [train.py flags]: run one stage; train.py resumes it from its own last.pth, and
# checks a finished one's settings before saying there is nothing to do (a re-run that changed
# them, e.g. STAGE1_STEPS, must not go on from the old stage silently). After Ctrl-C or a
# scheduler's SIGTERM, this script waits for train.py to save last.pth and exits with its
# status (130, 143) without starting the next step (`logged`).
stage() {
    local name=$1
    shift
    local dir=snapshots/$name
    mkdir -p logs
    local log
    log=$(new_log "logs/$(date "+%Y%m%d-%H%M%S")_train_$name")
    echo "training $name (log: $log)"
    logged "$log" "${LAUNCH_COMMAND[@]}" train.py "${common[@]}" --snapshot_dir "$dir" "$@" "${EXTRA[@]}"
}

EXTRA=("$@")
SECONDS=0
if [ "$GPU" = demo ]; then  # kept when the folder holds it already, refused if of other settings
    "$PYTHON" -m datasets.synthetic --out_dir "$DEMO_DATA" --num_cases "$DEMO_CASES" --shape "$DEMO_SHAPE" --reuse
fi
stage "${NAME}_stage1" --mode 0,1,2,3 --num_steps "$STAGE1_STEPS"
# Stage 2 takes the iteration to continue from out of stage 1's final.pth (80000); re-run, it
# resumes from its own last.pth instead.
stage "${NAME}_stage2" --mode random --num_steps "$STAGE2_STEPS" \
    --reload_path "snapshots/${NAME}_stage1/final.pth"

if [ "$GPU" = demo ]; then
    OUT=outputs/$NAME
    # --overwrite: re-running the demo replaces the previous export (eval.py refuses otherwise).
    "$PYTHON" eval.py --restore_from "snapshots/${NAME}_stage2/final.pth" --data_list "$DEMO_DATA/test.csv" \
        --mode all --output_dir "$OUT" --device auto --overwrite --figures
    # The published thresholds (2000 and 500 voxels) are for 240x240x155 volumes: scaled to
    # DEMO_SHAPE by the ratio of voxel counts, rounded (96x96x64: 0.066, 132 and 33 voxels).
    # Base 10, spaces dropped, as datasets.synthetic read the sizes (bash reads '064' as octal).
    IFS=, read -r X Y Z <<< "${DEMO_SHAPE// /}"
    VOXELS=$(( 10#$X * 10#$Y * 10#$Z ))
    BRATS_VOXELS=$(( 240 * 240 * 155 ))
    "$PYTHON" postprocess.py --input_dir "$OUT" --output_dir "${OUT}_postprocessed" \
        --min_component $(( (2000 * VOXELS + BRATS_VOXELS / 2) / BRATS_VOXELS )) \
        --et_threshold $(( (500 * VOXELS + BRATS_VOXELS / 2) / BRATS_VOXELS ))
    # One case as someone holding only its FLAIR and T1ce scans would segment it: the first of
    # the test list, read as eval.py reads lists (a BOM, CRLF, comments) -> name, flair, t1ce.
    CASE=$("$PYTHON" -c 'import sys; from datasets.brats import case_files, read_datalist
folder = read_datalist(sys.argv[1])[0]
print(folder.name, *(case_files(folder)[m] for m in ("flair", "t1ce")), sep="\n")' "$DEMO_DATA/test.csv")
    mapfile -t CASE <<< "$CASE"
    PREDICTED=outputs/${NAME}_predict/${CASE[0]}.nii.gz
    "$PYTHON" predict.py --flair "${CASE[1]}" --t1ce "${CASE[2]}" \
        --checkpoint "snapshots/${NAME}_stage2/final.pth" -o "$PREDICTED" --figure --device auto \
        --overwrite
    "$PYTHON" - "$NAME" "$OUT" "$DEMO_DATA" "$PREDICTED" <<'PY'
import json, sys
from pathlib import Path

import pandas as pd
name, out, data, predicted = sys.argv[1:]
history = json.loads(Path(f"snapshots/{name}_stage2/teachers.json").read_text())
last = history[-1]
print(f"\nelected teachers (iteration {last['iteration']}): " +
      ", ".join(f"{region} -> {modality}" for region, modality in last["winners"].items()) +
      f"; teacher set {last['teachers']}")


def schedule(run):
    """How a demo run trained (its stages' config.json), so that rows of other budgets are not
    compared as equals; '?' once its snapshots are gone."""
    try:
        one, two = (json.loads(Path(f"snapshots/{run}_stage{i}/config.json").read_text())
                    for i in (1, 2))
    except (OSError, ValueError):
        return "?"
    return (f"{one['model_size']} {'x'.join(map(str, two['patch_size']))}, iterations "
            f"{one['num_steps']}+{two['num_steps'] - one['num_steps']}, kd {two['kd_weight']:g}")


print("\nDice (%) of every demo run so far (mean over the 15 subsets | all four modalities):")
for summary in sorted(set(Path("outputs").glob("demo*/summary.csv")) | {Path(out, "summary.csv")}):
    table = pd.read_csv(summary).set_index("subset")
    row = lambda s: " ".join(f"{r} {table.loc[s, f'{r} Dice']:5.1f}" for r in ("ET", "TC", "WT"))
    run = summary.parent.name
    print(f"  {run:<16} {row('mean')} | {row('flair+t1+t1ce+t2')}  ({schedule(run)})")
print(f"""
outputs:
  synthetic data      {data}/
  checkpoints, logs   snapshots/{name}_stage1/, snapshots/{name}_stage2/ (TensorBoard: tensorboard --logdir snapshots), logs/
  masks per subset    {out}/<subset>/<case>.nii.gz
  table               {out}/summary.md, {out}/summary.csv, per case {out}/metrics.csv
  figures             {out}/figures/<case>.png (a slice per modality, a row per subset), Dice chart {out}/dice.png
  post-processed      {out}_postprocessed/
  one case, FLAIR + T1ce only (predict.py)   {predicted}, figure {predicted[:-len('.nii.gz')]}.png""")
PY
    echo "demo finished in $((SECONDS / 60)) min $((SECONDS % 60)) s"
fi
