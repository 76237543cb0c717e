#!/usr/bin/env bash
# The GPU figures in the README's performance section, on one card:
#   bash benchmarks/gpu.sh OUT_DIR [PART ...]      PARTS: train eval checks profile model (default: all,
#                                                   in this order: the speed targets first)
# checks   tests/test_speed.py and tests/test_normalize.py: the speed options' numerics and, on
#          CUDA, that a training iteration (data path, augmentation, step) never synchronises
#          the host, that bf16 conv gradients match fp32 (on a CPU they do not: train.py refuses
#          bf16 there) and that crops normalised on the device equal the CPU's bit for bit;
# train    bench_train.py: full model, 80x160x160, batch 2, stage 1 and stage 2, the real
#          train.py loop and the bare step per variant (published step, + torch.compile with
#          channels-last and bf16, bf16, + channels-last, fp32): it/s, data-wait share, peak
#          memory, MFU, election s/case, and the projected wall time of the published recipe;
# profile  profile_train.py: where the step's time goes (run.sh's GPU default, stage 2):
#          time per kernel category, the top kernels, OUT_DIR/trace.json.gz;
# eval     bench_eval.py: full-volume evaluation of all 15 subsets, bf16;
# model    bench_model.py: train step and 15-subset decode, fp32 and bf16.
# Every part's output is appended to OUT_DIR/results.txt (and the terminal) as it is measured,
# under a dated header naming the part (a re-run keeps the earlier output), its log to
# OUT_DIR/stderr.log: with trace.json.gz, three files (a sandboxed GPU session may return only a few). A part
# that fails does not stop the others; the exit status is 1 if any failed.
#
# Knobs (environment):
#   PYTHON (python3), DEVICE (cuda; cpu runs the same steps on tiny settings: a dry run of
#   this script's logic), BUDGET_S (start no part once the parts have run this many seconds:
#   a time-limited GPU session's limit; 0 = none), VARIANTS, STAGES, WARMUP, STEPS, WORKERS (bench_train; -1,
#   the default, sizes them from the machine as run.sh does), PROFILE_VARIANT,
#   PROFILE_STAGE, and WORK, a folder to keep bench_train's synthetic cases and cache in for a
#   re-run (default: a temporary folder; 4 cases of 240x240x155 take ~0.1 GB).
#   WHEELS: a folder of wheels (default .whl) installed into a private folder first when the
#   python lacks nibabel, for a machine without a package index (e.g. an offline GPU node): where there is
#   one, `python -m pip download --no-deps --only-binary=:all: --python-version 3.12 nibabel -d .whl`.
# A time-limited run: the train part prints each row as soon as it is measured,
# the targets first, so what a cut-off run measured is in OUT_DIR/results.txt. For a session of
# about 9 minutes: BUDGET_S=360 VARIANTS=published,bf16_cl_compile,bf16 bash benchmarks/gpu.sh OUT
set -uo pipefail
if [ $# -eq 0 ]; then
  echo "usage: bash benchmarks/gpu.sh OUT_DIR [train] [eval] [checks] [profile] [model]" >&2
  exit 2
fi
OUT=$1
shift
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) || exit 2  # relative to the caller's folder
cd "$(dirname "$0")/.."
PARTS=("$@")
if [ ${#PARTS[@]} -eq 0 ]; then PARTS=(train eval checks profile model); fi
PYTHON=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
WHEELS=${WHEELS:-.whl}
BUDGET_S=${BUDGET_S:-0}
case $BUDGET_S in '' | *[!0-9]*) echo "error: BUDGET_S=$BUDGET_S: expected whole seconds (0: no budget)" >&2; exit 2 ;; esac
export PYTHONUNBUFFERED=1

for part in "${PARTS[@]}"; do
  case $part in
    checks | train | profile | eval | model) ;;
    *) echo "error: unknown part $part: use train, eval, checks, profile, model" >&2; exit 2 ;;
  esac
done

if ! "$PYTHON" -c "import nibabel" 2>/dev/null; then
  if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    echo "error: $PYTHON cannot import nibabel; pip install -r requirements.txt, or put its wheel in $WHEELS/" >&2
    exit 2
  fi
  site=$(mktemp -d)
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target "$site" "$WHEELS"/*.whl || exit 2
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PYTHON" - <<'PY' | tee -a "$OUT/results.txt"
import importlib.util, platform, torch
cuda = torch.cuda.is_available()
print(f"python {platform.python_version()} | torch {torch.__version__} | CUDA {torch.version.cuda} | "
      f"cuDNN {torch.backends.cudnn.version()} | triton {'yes' if importlib.util.find_spec('triton') else 'no'} | "
      + (f"{torch.cuda.get_device_name()} ({torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB)"
         if cuda else "no GPU"))
PY

if [ "$DEVICE" = cpu ]; then  # the dry run: every step, tiny sizes
  MODEL=small PATCH=16,32,32 SHAPE=64,64,32 CASES=3 EVAL_SHAPE=32,32,16 EVAL_AMP=off EVAL_CASES=1
  MODEL_STEPS=1 MODEL_WARMUP=1
  WARMUP=${WARMUP:-1} STEPS=${STEPS:-2} WORKERS=${WORKERS:-0} VARIANTS=${VARIANTS:-published,fp32}
  PROFILE_VARIANT=${PROFILE_VARIANT:-fp32}
else
  MODEL=full PATCH=80,160,160 SHAPE=240,240,155 CASES=4 EVAL_SHAPE=240,240,155 EVAL_AMP=bf16 EVAL_CASES=2
  MODEL_STEPS=5 MODEL_WARMUP=2
fi

failed=()
skipped=()
# run NAME COMMAND...: stdout to OUT/results.txt and the terminal, stderr to OUT/stderr.log.
run() {
  local name=$1
  shift
  local start=$SECONDS
  # A re-run into the same OUT_DIR appends: each part's output starts with its own header.
  echo "== $(date -u '+%Y-%m-%d %H:%M:%S UTC') $name: $* ==" | tee -a "$OUT/stderr.log" >>"$OUT/results.txt"
  local before
  before=$(wc -l <"$OUT/stderr.log")
  if ! "$@" 2>>"$OUT/stderr.log" | tee -a "$OUT/results.txt"; then
    tail -n +"$((before + 1))" "$OUT/stderr.log" | tail -n 40
    failed+=("$name")
  fi
  echo "[$name: $((SECONDS - start)) s]" | tee -a "$OUT/results.txt"
}

parts_start=$SECONDS
for part in "${PARTS[@]}"; do
  if [ "$BUDGET_S" -gt 0 ] && [ $((SECONDS - parts_start)) -ge "$BUDGET_S" ]; then
    skipped+=("$part")
    continue
  fi
  case $part in
    checks)
      run checks "$PYTHON" -m pytest -q -rs -p no:cacheprovider tests/test_speed.py \
        tests/test_normalize.py
      ;;
    train)
      work=()
      if [ -n "${WORK:-}" ]; then work=(--work_dir "$WORK"); fi
      run train "$PYTHON" benchmarks/bench_train.py --device "$DEVICE" --model "$MODEL" \
        --patch "$PATCH" --batch 2 --shape "$SHAPE" --cases "$CASES" "${work[@]}" \
        --variants "${VARIANTS:-published,bf16_cl_compile,bf16,bf16_cl,fp32}" \
        --stages "${STAGES:-stage 1,stage 2}" --warmup "${WARMUP:-10}" --steps "${STEPS:-30}" \
        --num_workers "${WORKERS:--1}"
      ;;
    profile)
      run profile "$PYTHON" benchmarks/profile_train.py --device "$DEVICE" --model "$MODEL" \
        --patch "$PATCH" --shape "$SHAPE" --variant "${PROFILE_VARIANT:-bf16_cl_compile}" \
        --stage "${PROFILE_STAGE:-stage 2}" --trace "$OUT/trace.json.gz"
      ;;
    eval)
      run eval "$PYTHON" benchmarks/bench_eval.py --device "$DEVICE" --model "$MODEL" \
        --shape "$EVAL_SHAPE" --patch "$PATCH" --amp "$EVAL_AMP" --cases "$EVAL_CASES"
      ;;
    model)
      for amp in off bf16; do
        run model "$PYTHON" benchmarks/bench_model.py --model "$MODEL" --device "$DEVICE" \
          --patch "$PATCH" --batch 2 --amp "$amp" --steps "$MODEL_STEPS" --warmup "$MODEL_WARMUP"
      done
      ;;
  esac
done
if [ ${#skipped[@]} -gt 0 ]; then
  echo "not started, over BUDGET_S=$BUDGET_S s: ${skipped[*]}" | tee -a "$OUT/results.txt" >&2
fi
if [ ${#failed[@]} -gt 0 ]; then
  echo "failed parts: ${failed[*]} (log: $OUT/stderr.log)" >&2
  exit 1
fi
