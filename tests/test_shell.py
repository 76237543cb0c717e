"""run.sh and eval.sh stopped as users and schedulers stop them (utils/logged.sh): the signal
reaches train.py/eval.py once, the script waits for it to save and stops with its status."""
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from test_demo import REPO

# What train.py and eval.py do when stopped, in small: record each stop signal, take half a
# second to save, then print a last line and exit 128 + the signal. Not stopped within
# STAND_IN_WAIT seconds, it exits 0 (a stage that finished).
STAND_IN = textwrap.dedent("""\
    import os, signal, sys, time
    received = []
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, lambda signum, frame: received.append(signum))
    with open(os.environ["LAUNCHED"], "a") as f:
        f.write(f"{os.getpid()} {sys.argv[1]}\\n")
    print("started", flush=True)
    end = time.monotonic() + float(os.environ["STAND_IN_WAIT"])
    while not received and time.monotonic() < end:
        time.sleep(0.02)
    if not received:
        sys.exit(0)
    time.sleep(0.5)
    names = " ".join(signal.Signals(s).name for s in received)
    print(f"saved after {names}", flush=True)
    sys.exit(int(os.environ.get("STAND_IN_STATUS", 128 + received[0])))
    """)


# Starts a command with SIGINT at its default. A process started in the background by a shell
# without job control (`pytest ... &` in a script) has SIGINT ignored, and its children inherit
# that; bash cannot trap a signal ignored on entry, so the scripts would not pass Ctrl-C on. A
# terminal or a scheduler starts them with SIGINT at its default, as here.
DEFAULT_SIGINT = [sys.executable, "-c", "import os, signal, sys; "
                  "signal.signal(signal.SIGINT, signal.SIG_DFL); "
                  "os.execvp(sys.argv[1], sys.argv[1:])"]


def copy_scripts(folder, *scripts):
    """The shell scripts and the helper they source, into `folder` (they run from their own)."""
    for script in scripts:
        shutil.copy(REPO / script, folder)
    (folder / "utils").mkdir(exist_ok=True)
    for helper in ("logged.sh", "callers_paths.sh"):
        shutil.copy(REPO / "utils" / helper, folder / "utils")


def launched(path):
    """The stand-in's runs so far -> [(pid, first argument)]."""
    if not path.exists():
        return []
    return [(int(pid), script) for pid, script in
            (line.split() for line in path.read_text().splitlines())]


def start(tmp_path, script, wait_s=30, **extra_env):
    """`bash SCRIPT cpu` with the stand-in as LAUNCH, in a session of its own (as a terminal or a
    scheduler starts a job) -> (process, launch record)."""
    copy_scripts(tmp_path, script)
    (tmp_path / "stand_in.py").write_text(STAND_IN)
    record = tmp_path / "launched"
    env = dict(os.environ, LAUNCH=f"{sys.executable} {tmp_path / 'stand_in.py'}",
               LAUNCHED=str(record), STAND_IN_WAIT=str(wait_s), **extra_env)
    process = subprocess.Popen([*DEFAULT_SIGINT, "bash", script, "cpu"], cwd=tmp_path, env=env,
                               text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               start_new_session=True)
    deadline = time.monotonic() + 30
    while not launched(record) and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.2)  # the stand-in's handlers are set before it records itself; bash's traps
    return process, record


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# who receives the signal: the script alone (`kill PID`, a scheduler signalling the job's first
# process), the script's process group (a terminal's Ctrl-C), every process of the job (a
# scheduler's time limit)
STOPS = {
    "script": lambda script, pid, signum: os.kill(script.pid, signum),
    "group": lambda script, pid, signum: os.killpg(script.pid, signum),
    "every process": lambda script, pid, signum: (os.kill(script.pid, signum),
                                                  os.kill(pid, signum)),
}


@pytest.mark.parametrize("script", ["run.sh", "eval.sh"])
@pytest.mark.parametrize("who", list(STOPS))
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stopped_script_waits_for_its_command_and_stops(tmp_path, script, who, signum):
    process, record = start(tmp_path, script)
    try:
        ((pid, first),) = launched(record)
        assert first == ("train.py" if script == "run.sh" else "eval.py")
        STOPS[who](process, pid, signum)
        stdout, _ = process.communicate(timeout=60)
    finally:
        process.kill()
    name = signal.Signals(signum).name
    assert process.returncode == 128 + signum, stdout
    # The command was let finish: its last line came out before the script exited, and it is
    # gone. The signal the script passes on reaches it once (twice, Ctrl-C makes train.py quit
    # without saving); signalled itself too, it gets the script's as well (Python may see the
    # two as one).
    assert not alive(pid)
    once = f"saved after {name}"
    expected = {once, f"{once} {name}"} if who == "every process" else {once}
    assert stdout.splitlines()[-1] in expected
    (log,) = (tmp_path / "logs").glob("*.log")
    assert log.read_text().splitlines()[-1] == stdout.splitlines()[-1]
    assert len(launched(record)) == 1  # run.sh did not go on to stage 2


def test_run_sh_goes_on_to_stage_2_when_stage_1_ends_on_its_own(tmp_path):
    process, record = start(tmp_path, "run.sh", wait_s=0)
    stdout, _ = process.communicate(timeout=60)
    assert process.returncode == 0, stdout
    assert [first for _, first in launched(record)] == ["train.py", "train.py"]
    logs = sorted(path.name.split("_train_")[1] for path in (tmp_path / "logs").glob("*.log"))
    assert logs == ["LCKD_stage1.log", "LCKD_stage2.log"]


def test_runs_started_in_the_same_second_write_logs_of_their_own(tmp_path):
    # Both named their log after the second they started: one file, each run's tee truncating
    # it, so the second run's refusal overwrote the first's opening lines.
    clock = tmp_path / "clock"
    clock.mkdir()
    (clock / "date").write_text("#!/bin/sh\necho 20261207-120000\n")
    (clock / "date").chmod(0o755)
    path = f"{clock}{os.pathsep}{os.environ['PATH']}"
    for run in range(2):
        process, _ = start(tmp_path, "run.sh", wait_s=0, PATH=path)
        stdout, _ = process.communicate(timeout=60)
        assert process.returncode == 0, stdout
    logs = {path.name: path.read_text() for path in (tmp_path / "logs").iterdir()}
    assert sorted(logs) == sorted(f"20261207-120000_train_LCKD_stage{stage}{suffix}.log"
                                  for stage in (1, 2) for suffix in ("", "-2"))
    assert all(text.splitlines() == ["started"] for text in logs.values()), logs


def test_new_log_never_reuses_a_file_and_names_a_folder_it_cannot_write(tmp_path):
    shell = lambda command: subprocess.run(["bash", "-c", f". {REPO / 'utils/logged.sh'}; {command}"],
                                           cwd=tmp_path, capture_output=True, text=True, timeout=60)
    (tmp_path / "run.log").write_text("kept\n")
    (tmp_path / "run-2.log").write_text("kept too\n")
    made = shell("new_log run")
    assert (made.returncode, made.stdout) == (0, "run-3.log\n")
    assert (tmp_path / "run-3.log").read_text() == ""
    assert (tmp_path / "run.log").read_text() == "kept\n"
    assert (tmp_path / "run-2.log").read_text() == "kept too\n"
    refused = shell("new_log missing/run")
    assert refused.returncode == 1 and refused.stdout == ""
    assert refused.stderr == ("error: cannot create the log missing/run.log: make its folder "
                              "writable\n")


# Runs `bash SCRIPT cpu` on a new pseudo-terminal, as typed in a terminal; once the stand-in has
# started, types Ctrl-C. Prints what the terminal showed, then the script's exit status.
TERMINAL = textwrap.dedent("""\
    import os, pty, select, signal, sys, time
    script, record = sys.argv[1:]
    pid, fd = pty.fork()
    if pid == 0:
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # as a terminal's shell starts commands
        os.execvp("bash", ["bash", script, "cpu"])
    shown, typed = b"", False
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if not typed and os.path.exists(record):
            time.sleep(0.2)
            os.write(fd, b"\\x03")
            typed = True
        if select.select([fd], [], [], 0.05)[0]:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # the terminal closed: every process on it is gone
                chunk = b""
            if not chunk:
                break
            shown += chunk
    _, status = os.waitpid(pid, 0)
    print(shown.decode(errors="replace"))
    print(os.waitstatus_to_exitcode(status))
    """)


def test_ctrl_c_typed_in_a_terminal_stops_run_sh_after_the_save(tmp_path):
    # On a terminal the command runs in a background process group (utils/logged.sh): Ctrl-C
    # reaches the script alone, which passes it on once, and the command's output still shows.
    copy_scripts(tmp_path, "run.sh")
    (tmp_path / "stand_in.py").write_text(STAND_IN)
    record = tmp_path / "launched"
    env = dict(os.environ, LAUNCH=f"{sys.executable} {tmp_path / 'stand_in.py'}",
               LAUNCHED=str(record), STAND_IN_WAIT="30")
    done = subprocess.run([sys.executable, "-c", TERMINAL, "run.sh", str(record)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=90)
    *shown, status = done.stdout.splitlines()
    assert status == str(128 + signal.SIGINT), done.stdout + done.stderr
    lines = [line.strip().removeprefix("^C") for line in shown if line.strip()]
    assert lines[-1] == "saved after SIGINT", lines
    (log,) = (tmp_path / "logs").glob("*.log")
    assert log.read_text().splitlines() == ["started", "saved after SIGINT"]
    assert len(launched(record)) == 1


@pytest.mark.parametrize("script", ["run.sh", "eval.sh"])
def test_a_failing_command_stops_the_script_with_its_status(tmp_path, script):
    # e.g. train.py refusing a flag (2) or running out of memory (1): the script stops there,
    # with the command's status (the pipe through tee must not hide it), and run.sh does not
    # go on to stage 2.
    copy_scripts(tmp_path, script)
    (tmp_path / "fails.sh").write_text('echo "$$ $1" >> launched\necho "error: $1 failed"\nexit 3\n')
    env = dict(os.environ, LAUNCH=f"sh {tmp_path / 'fails.sh'}")
    done = subprocess.run(["bash", script, "cpu"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 3, done.stdout + done.stderr
    command = "train.py" if script == "run.sh" else "eval.py"
    assert [first for _, first in launched(tmp_path / "launched")] == [command]
    (log,) = (tmp_path / "logs").glob("*.log")
    assert log.read_text().splitlines() == [f"error: {command} failed"]


@pytest.mark.parametrize("script", ["run.sh", "eval.sh"])
def test_a_launcher_that_is_not_installed_stops_the_script(tmp_path, script):
    copy_scripts(tmp_path, script)
    env = dict(os.environ, LAUNCH="no_such_launcher --nproc_per_node 2")
    done = subprocess.run(["bash", script, "cpu"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 127, done.stdout + done.stderr  # the shell's "command not found"
    (log,) = (tmp_path / "logs").glob("*.log")  # run.sh did not go on to stage 2
    assert "no_such_launcher" in log.read_text() and "not found" in log.read_text()


@pytest.mark.parametrize("script", ["run.sh", "eval.sh"])
def test_a_stop_is_the_scripts_status_when_the_launcher_exits_1(tmp_path, script):
    # torchrun stops its workers on SIGTERM, then exits 1 (its SignalException): the script
    # still says it was stopped (143), as a scheduler expects, and goes no further.
    process, record = start(tmp_path, script, STAND_IN_STATUS="1")
    try:
        os.kill(process.pid, signal.SIGTERM)
        stdout, _ = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 128 + signal.SIGTERM, stdout
    assert stdout.splitlines()[-1] == "saved after SIGTERM" and len(launched(record)) == 1


@pytest.mark.parametrize("script, usage", [
    ("run.sh", "usage: bash run.sh GPU_ID|cpu|demo [extra train.py flags]"),
    ("eval.sh", "usage: bash eval.sh GPU_ID|cpu [extra eval.py flags]   (GPU_ID: a CUDA index, "
                "or a list of them for LAUNCH=torchrun)")])
def test_a_script_without_arguments_prints_its_usage(script, usage):
    run = subprocess.run(["bash", str(REPO / script)], capture_output=True, text=True, timeout=60)
    assert (run.returncode, run.stdout, run.stderr) == (2, "", usage + "\n")


def test_relative_paths_given_are_taken_from_the_callers_folder(tmp_path):
    # The scripts run in the repository (their defaults are its folders); a path the user gives
    # is the caller's: an input when it exists there, an output always. LAUNCH=echo prints the
    # command each script would run.
    repo, here = tmp_path / "repo", tmp_path / "here"
    repo.mkdir()
    copy_scripts(repo, "run.sh", "eval.sh")
    (here / "cases").mkdir(parents=True)
    (here / "train.csv").write_text("Synth_0000\n")
    env = dict(os.environ, LAUNCH="echo")

    def command(script, **variables):
        done = subprocess.run(["bash", str(repo / script), "cpu"], cwd=here, capture_output=True,
                              text=True, env=dict(env, **variables), timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
        # the paths the script prints (logs/..., snapshots/...) are the repository's: said once
        assert done.stdout.startswith(f"working in {repo.resolve()} (the relative paths below "
                                      "are from there)\n")
        return [line.split() for line in done.stdout.splitlines() if line.startswith(("eval.py",
                                                                                     "train.py"))]

    (evaluation,) = command("eval.sh", INPUT="cases", OUT="out", CKPT="none.pth")
    assert {f"--input={here / 'cases'}", f"--output_dir={here / 'out'}",
            "--restore_from=none.pth"} <= set(evaluation)
    (listed,) = command("eval.sh", DATA_LIST="BraTS18/BraTS18_val.csv")  # datalist/'s
    assert {"--data_list=BraTS18/BraTS18_val.csv", "--output_dir=outputs/LCKD"} <= set(listed)

    stages = command("run.sh", TRAIN_LIST="train.csv", VAL_LIST="val.csv", CACHE_DIR="cache")
    assert len(stages) == 2
    for stage in stages:
        flags = dict(zip(stage[1::2], stage[2::2]))
        assert flags["--train_list"] == str(here / "train.csv")
        assert flags["--val_list"] == "val.csv"  # not here: as the script sees it
        assert flags["--cache_dir"] == str(here / "cache")
        assert flags["--snapshot_dir"].startswith("snapshots/")  # the repository's


def test_a_python_path_with_a_space_a_linked_script_and_a_name_with_a_slash(tmp_path):
    # PYTHON relative to the caller's folder, with a space (a venv inside a repository whose
    # path has one), the script started through a link (~/bin/run.sh); NAME, which names
    # folders and logs, refused with a '/' before anything runs.
    repo, here = tmp_path / "the repo", tmp_path / "here"
    repo.mkdir()
    copy_scripts(repo, "run.sh", "eval.sh")
    python = here / "my env" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text('#!/bin/sh\necho "$@"\n')  # prints the command the script starts
    python.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "LAUNCH"}
    for script, commands in (("run.sh", 2), ("eval.sh", 1)):
        (here / script).symlink_to(repo / script)

        def run(**variables):
            return subprocess.run(["bash", script, "cpu"], cwd=here, capture_output=True,
                                  text=True, env=dict(env, PYTHON="my env/bin/python", **variables),
                                  timeout=60)
        done = run()
        assert done.returncode == 0, done.stdout + done.stderr
        started = [line for line in done.stdout.splitlines()
                   if line.startswith(("train.py", "eval.py"))]
        assert len(started) == commands and (repo / "logs").is_dir(), done.stdout
        refused = run(NAME="team/exp1")
        assert (refused.returncode, refused.stderr) == (2, (
            "error: NAME=team/exp1 holds a '/': NAME names folders and log files "
            "(snapshots/NAME_stage1, logs/...); give one without '/'\n"))


def test_a_gpu_id_cuda_cannot_read_is_refused_and_mode_never_breaks_the_log_name(tmp_path):
    # CUDA reads CUDA_VISIBLE_DEVICES=gpu as no device: the error would then blame the driver.
    # LAUNCH=echo prints the command each script would run.
    copy_scripts(tmp_path, "run.sh", "eval.sh")
    env = dict(os.environ, LAUNCH="echo")

    def run(script, gpu, **variables):
        return subprocess.run(["bash", script, gpu], cwd=tmp_path, capture_output=True,
                              text=True, env=dict(env, **variables), timeout=60)
    for script, others in (("run.sh", "cpu or demo"), ("eval.sh", "cpu")):
        for gpu in ("gpu", "cuda:0", "0 1", "0,", ""):
            refused = run(script, gpu)
            assert (refused.returncode, refused.stdout, refused.stderr) == (2, "", (
                f"error: GPU_ID '{gpu}': expected a CUDA index (0, 1, ...), a comma-separated "
                f"list of them or GPU UUIDs, or {others}\n")), gpu
        for gpu in ("0", "1,3", "GPU-8f6a2b1c-52e1-4c0b-9d3e-2a7c5e1f0b9d",
                    "MIG-GPU-8f6a2b1c-52e1-4c0b-9d3e-2a7c5e1f0b9d/1/0"):
            assert run(script, gpu).returncode == 0, gpu
    # eval.py is given the MODE as it is, to say what is wrong with it; the log is still written
    done = run("eval.sh", "cpu", MODE="0/2")
    assert done.returncode == 0 and "--mode=0/2" in done.stdout.split(), done.stderr
    (log,) = (tmp_path / "logs").glob("*_eval_LCKD_0-2.log")
    assert "--mode=0/2" in log.read_text().split()


@pytest.mark.parametrize("shape, thresholds", [
    ("96,96,64", ("132", "33")), ("96, 96, 064", ("132", "33")), ("0096,96,64", ("132", "33")),
    ("32,32,24", ("6", "1")),
])
def test_run_sh_demo_scales_the_thresholds_from_demo_shape_in_base_10(tmp_path, shape, thresholds):
    # datasets.synthetic reads '064' as 64; bash arithmetic read it as octal 52 (107 and 27,
    # silently) and '0096' as an error, after the whole training.
    repo = tmp_path / "repo"
    repo.mkdir()
    copy_scripts(repo, "run.sh")
    python = tmp_path / "python"
    python.write_text('#!/bin/sh\necho "$@"\n')  # prints the command the script starts
    python.chmod(0o755)
    done = subprocess.run(["bash", "run.sh", "demo"], cwd=repo, capture_output=True, text=True,
                          env=dict(os.environ, PYTHON=str(python), DEMO_SHAPE=shape,
                                   LAUNCH=str(python)), timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    (post,) = [line.split() for line in done.stdout.splitlines() if line.startswith("postprocess.py")]
    flags = dict(zip(post[1::2], post[2::2]))
    assert (flags["--min_component"], flags["--et_threshold"]) == thresholds
