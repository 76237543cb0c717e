# Sourced by run.sh and eval.sh, which run in the repository folder (where their defaults,
# datalist/, snapshots/ and outputs/, are).
#
#   callers_paths inputs|outputs VAR...
#                           each variable holding a relative path becomes the absolute path
#                           from the folder the script was started in: an input when it exists
#                           there (a list or a checkpoint given from there; others stay as they
#                           are: DATA_LIST's BraTS18/... is looked up in datalist/), an output
#                           (where to write) always
#   enter_repository        change into the script's folder; started elsewhere, say so (the
#                           paths the script prints are relative to it)
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

enter_repository() {
    local from
    from=$(pwd -P)
    cd "$(dirname "$0")"
    if [ "$(pwd -P)" != "$from" ]; then
        echo "working in $(pwd -P) (the relative paths below are from there)"
    fi
}
