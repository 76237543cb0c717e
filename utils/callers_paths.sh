# Sourced by run.sh and eval.sh, which run in the repository folder (where their defaults,
# datalist/, snapshots/ and outputs/, are).
#
#   callers_paths VAR...    each variable holding a relative path that exists from the folder
#                           the script was started in becomes that absolute path (a list or a
#                           checkpoint given from there); others stay as they are (DATA_LIST's
#                           BraTS18/... is looked up in datalist/)
#   callers_outputs VAR...  each variable holding a relative path becomes the absolute path
#                           from the folder the script was started in (where to write)
#   enter_repository        change into the script's folder; started elsewhere, say so (the
#                           paths the script prints are relative to it)
callers_paths() {
    local name
    for name in "$@"; do
        if [ -n "${!name:-}" ] && [ "${!name:0:1}" != / ] && [ -e "${!name}" ]; then
            printf -v "$name" '%s/%s' "$PWD" "${!name}"
        fi
    done
}

callers_outputs() {
    local name
    for name in "$@"; do
        if [ -n "${!name:-}" ] && [ "${!name:0:1}" != / ]; then
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
