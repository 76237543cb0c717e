"""utils/distributed.py under torchrun (2 CPU processes, gloo): what the other ranks say when
rank 0 is slow or fails in on_main_rank."""
import os
import signal
import socket
import subprocess
import sys
import time

from launch import script_env, torchrun_command
from test_demo import REPO

SCRIPT = """
import os, signal, sys, time
from utils import distributed
from utils.cli import run_cli

def main(argv):
    info, _ = distributed.init("cpu", timeout_min=float(argv[1]))
    try:
        if argv[0] == "wait":  # for a stop signal
            open(f"ready{info.rank}", "w").close()
            time.sleep(60)
        if argv[0] == "gone":  # rank 1 killed without a word (kill -9, the OOM killer)
            if info.rank == 1:
                os.kill(os.getpid(), signal.SIGKILL)
            distributed.gather_object(info.rank, info)
        def rank_0():
            if argv[0] == "slow":
                time.sleep(20)
            else:
                raise distributed.DeviceError("rank 0 cannot go on")
        distributed.on_main_rank(rank_0, info, "the test's work")
    finally:
        distributed.cleanup(info)

run_cli(main, argv=sys.argv[1:])
"""


def torchrun(tmp_path, *args):
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    cmd = [*torchrun_command(60), str(script), *args]
    env = script_env()
    run = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=90)
    return [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("error:")]


def test_rank_0_failing_is_reported_once_by_rank_0(tmp_path):
    assert torchrun(tmp_path, "fail", "1") == ["error: rank 0 cannot go on"]


def test_rank_0_slower_than_the_timeout_is_named_by_the_others(tmp_path):
    # (torchrun then stops rank 0, which says nothing more)
    assert torchrun(tmp_path, "slow", "0.05") == [
        "error: rank 1: rank 0 did not finish the test's work within 0.05 min"]  # no flag, as eval.py


def test_a_stop_signal_is_reported_once_by_rank_0(tmp_path):
    # A scheduler's SIGTERM reaches torchrun, which passes it on to every process.
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    cmd = [*torchrun_command(), str(script), "wait", "1"]
    env = script_env()
    run = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not all((tmp_path / f"ready{rank}").exists() for rank in (0, 1)):
            assert run.poll() is None and time.monotonic() < deadline, run.communicate()
            time.sleep(0.1)
        run.send_signal(signal.SIGTERM)
        out, err = run.communicate(timeout=60)
    finally:
        run.kill()
    assert [line for line in (out + err).splitlines() if "terminated" in line] == ["terminated"]


def test_a_rank_killed_before_the_gather_is_not_said_to_have_printed_an_error(tmp_path):
    # Started as torchrun starts them, without torchrun: its SIGTERM to rank 0 on seeing rank 1
    # die would otherwise race with rank 0's own account (before: "stopped on an error
    # (printed with this one)", where no process had printed any).
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ranks = [subprocess.Popen([sys.executable, str(script), "gone", "1"], cwd=tmp_path,
                              env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO),
                                       RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)),
                              stderr=subprocess.PIPE, text=True) for rank in range(2)]
    try:
        stderr = [rank.communicate(timeout=60)[1] for rank in ranks]
    finally:
        for rank in ranks:
            rank.kill()
    assert ranks[1].returncode == -signal.SIGKILL and ranks[0].returncode == 1
    assert stderr[0].splitlines()[-1] == (
        "error: rank 0: another process of this run stopped before the end (on an error, printed "
        "with this one, or killed: torchrun's summary below gives its exit code)")


def test_a_flag_mistake_is_printed_once_per_machine_not_once_per_process(tmp_path):
    for script, flags in (("train.py", ["--num_steps", "0"]), ("eval.py", ["--overlap", "2"])):
        cmd = [*torchrun_command(60), str(REPO / script), "--device", "cpu",
               *flags]
        env = script_env()
        run = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=90)
        errors = [line for line in (run.stdout + run.stderr).splitlines() if "error:" in line]
        assert len(errors) == 1 and "--" + flags[0].strip("-") in errors[0], run.stderr[-2000:]


def test_a_flag_mistake_is_never_lost(tmp_path):
    # Local rank 0 slower to start: the other process holds its report back, so rank 0's line
    # comes first and torchrun stops the other one (before, nobody printed it).
    wrapper = tmp_path / "slow_rank0.py"
    wrapper.write_text("import os, time\nimport train\nfrom utils.cli import run_cli\n"
                       "time.sleep(1 if os.environ['LOCAL_RANK'] == '0' else 0)\n"
                       "run_cli(train.main, train.TRAIN_ERRORS)\n")
    cmd = [*torchrun_command(60), str(wrapper), "--device", "cpu",
           "--num_steps", "0"]
    env = script_env()
    run = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=90)
    errors = [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--num_steps 0" in errors[0], run.stderr[-2000:]
    # A plain run whose environment holds a launcher's LOCAL_RANK is a world of one: it reports.
    plain = subprocess.run([sys.executable, str(REPO / "train.py"), "--device", "cpu", "--num_steps", "0"],
                           cwd=tmp_path, env={**env, "LOCAL_RANK": "1"}, capture_output=True, text=True)
    assert plain.returncode == 2 and plain.stderr.startswith("error: --num_steps 0")
