# Sourced by run.sh and eval.sh, which run in the repository folder (where their defaults,
# datalist/, snapshots/ and outputs/, are).
#
#   callers_paths inputs|outputs VAR...
#                           each variable holding a relative path becomes the absolute path
#                           from the folder the script was started in: an input when it exists
#                           there (a list or a checkpoint given from there; others stay as they
#                           are: DATA_LIST's BraTS18/... is looked up in datalist/), an output
#                           (where to write) always
#   callers_python          PYTHON given as a relative path (venv/bin/python; not a bare
#                           command such as python3): the caller's, as an input's
#   launch_command          -> array LAUNCH_COMMAND: LAUNCH split into words (a command line
#                           such as "torchrun --nproc_per_node 4"), or else "$PYTHON" as one
#                           word (a path with spaces)
#   check_name              NAME goes into folder and log names: one line and exit 2 if it
#                           holds a '/'
#   check_gpu_id ID OTHERS  ID (the script's GPU_ID, not one of OTHERS, its other words) goes
#                           into CUDA_VISIBLE_DEVICES: one line and exit 2 unless it is CUDA
#                           indices or GPU-/MIG- UUIDs, comma-separated (CUDA would read 'gpu'
#                           as no device, and the error would blame the driver)
#   enter_repository        change into the script's folder (the real one: the script may be
#                           run through a link); started elsewhere, say so (the paths the
#                           script prints are relative to it)
callers_paths() {
    local kind=$1 name
    shift
    for name in "$@"; do
        if [ -n "${!name:-}" ] && [ "${!name:0:1}" != / ] \
                && { [ "$kind" = outputs ] || [ -e "${!name}" ]; }; then
            printf -v "$name" '%s/%s' "$PWD" "${!name}"
        fi
    done
}

callers_python() {
    if [[ ${PYTHON:-} == */* ]]; then callers_paths inputs PYTHON; fi
}

launch_command() {
    if [ -n "${LAUNCH:-}" ]; then
        read -ra LAUNCH_COMMAND <<< "$LAUNCH"
    else
        LAUNCH_COMMAND=("$PYTHON")
    fi
}

check_name() {
    if [[ $NAME == */* ]]; then
        echo "error: NAME=$NAME holds a '/': NAME names folders and log files (snapshots/NAME_stage1, logs/...); give one without '/'" >&2
        exit 2
    fi
}

check_gpu_id() {
    local id='([0-9]+|(GPU|MIG)-[0-9A-Za-z/-]+)'
    if ! [[ $1 =~ ^$id(,$id)*$ ]]; then
        echo "error: GPU_ID '$1': expected a CUDA index (0, 1, ...), a comma-separated list of them or GPU UUIDs, or $2" >&2
        exit 2
    fi
}

enter_repository() {
    local from
    from=$(pwd -P)
    cd "$(dirname "$(readlink -f "$0")")"
    if [ "$(pwd -P)" != "$from" ]; then
        echo "working in $(pwd -P) (the relative paths below are from there)"
    fi
}
