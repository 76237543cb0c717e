# Sourced by run.sh and eval.sh.
#
#   new_log STEM
#
# Creates a new, empty log STEM.log, or STEM-2.log, STEM-3.log... when a run started in the
# same second took the name (the same command twice: the second run's refusal overwrote the
# first run's opening lines, both writing one file), and prints its name.
new_log() {
    local log=$1.log n=1
    until (set -C; : >"$log") 2>/dev/null; do  # set -C: created only if it did not exist
        if [ ! -e "$log" ]; then
            echo "error: cannot create the log $log: make its folder writable" >&2
            return 1
        fi
        n=$((n + 1))
        log=$1-$n.log
    done
    echo "$log"
}

#   logged LOG COMMAND [ARGS...]
#
# Runs COMMAND with its output (stdout and stderr) printed and written to LOG, and returns its
# exit status. A stop request, Ctrl-C (SIGINT) or a scheduler's SIGTERM, lets COMMAND finish
# as it does on its own (train.py saves last.pth, eval.py finishes the masks it is writing): the
# signal is passed on to COMMAND once and the script waits for it, then stops with COMMAND's
# status (130, 143) instead of going on to its next step. A plain foreground pipeline would
# not do this: bash dies at once on SIGTERM, leaving COMMAND running unseen when only the
# script was signalled (`kill PID`, a scheduler that signals the job's first process), and a
# scheduler that sees the script gone may kill COMMAND in the middle of saving.
logged() {
    local log=$1 stop='' status job=''
    shift
    # The traps come first: a stop that arrives while the job starts is passed on just after.
    trap 'stop=TERM; if [ -n "$job" ]; then kill -s TERM -- "-$job" 2>/dev/null || true; fi' TERM
    trap 'stop=INT; if [ -n "$job" ]; then kill -s INT -- "-$job" 2>/dev/null || true; fi' INT
    # Job control, for this one job only, puts COMMAND in its own process group, where a
    # signal comes from here alone: a terminal's Ctrl-C reaches this shell, not COMMAND twice
    # (twice would make train.py quit without saving). Without it bash would also start the
    # job with SIGINT ignored. tee ignores both signals, so COMMAND's last words reach LOG.
    # The job is one subshell, not the pipeline itself: bash keeps a finished background
    # process's status for `wait`, but of a pipeline that ended before `wait` only its last
    # process's (tee's 0), which would let a command failing at once pass for one that ran.
    # The subshell's trap (reset to the default in COMMAND) lets it outlive the stop signal
    # and exit with the pipeline's status.
    set -m
    (
        trap : INT TERM
        "$@" 2>&1 | (trap '' INT TERM; exec tee "$log")
    ) &
    job=$!  # the job's first process: it leads the job's process group
    set +m
    if [ -n "$stop" ]; then kill -s "$stop" -- "-$job" 2>/dev/null || true; fi
    # A trapped signal interrupts `wait` (status > 128) while the job still runs: wait again;
    # once it has ended, `wait` gives its status.
    while kill -0 "$job" 2>/dev/null; do
        wait "$job" || true
    done
    wait "$job" && status=0 || status=$?
    trap - TERM INT
    # A stop that came as COMMAND was finishing anyway still stops the script, and the script
    # reports the stop (torchrun itself exits 1 after stopping its workers).
    if [ -n "$stop" ] && [ "$status" != 130 ] && [ "$status" != 143 ]; then
        status=$((128 + $(kill -l "$stop")))
    fi
    return "$status"
}
