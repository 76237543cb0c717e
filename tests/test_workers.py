import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from datasets import synthetic
from test_demo import REPO
from utils import workers
from utils.lock import exclusive_lock

# A run holding its output folder's lock starts a pool and is killed with SIGKILL while its
# worker is busy (the worker prints its pid first).
HOLDER = """
import multiprocessing, os, sys, time
from utils import workers
from utils.lock import exclusive_lock
from utils.workers import worker_pool
with exclusive_lock(sys.argv[1]):
    pool = worker_pool(1, multiprocessing.get_context(sys.argv[2]))
    print(pool.submit(os.getpid).result(), flush=True)
    pool.submit(time.sleep, 60)
    time.sleep(60)
"""


def running(pid):
    """False once the process has exited (a zombie nobody reaped has exited too)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc (Linux)")
@pytest.mark.parametrize("method", ["fork", "spawn"])  # postprocess.py's, preprocess's
def test_workers_exit_with_a_killed_parent_and_its_lock_is_free(tmp_path, method):
    parent = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path), method],
                              stdout=subprocess.PIPE, text=True)
    try:
        worker = int(parent.stdout.readline())
    finally:
        parent.kill()
        parent.wait()
    try:
        deadline = time.monotonic() + 20
        while running(worker) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not running(worker), "the worker outlived its killed parent"
        with exclusive_lock(tmp_path):  # a forked worker held the lock while it ran
            pass
    finally:
        if running(worker):
            os.kill(worker, signal.SIGKILL)


def children(pid):
    """The pids of pid's child processes (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:  # exited meanwhile
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc (Linux)")
def test_ctrl_c_while_the_workers_start_is_one_line(tmp_path):
    # A terminal's Ctrl-C reaches every process of the job: the spawned workers, still
    # importing torch, each printed a KeyboardInterrupt traceback before `interrupted`.
    (tmp_path / "all.csv").write_text("".join(
        f"{case}\n" for case in synthetic.generate(tmp_path / "data", 2, (32, 32, 16), fmt="nii")))
    process = subprocess.Popen(
        [sys.executable, "-c", "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
         "os.execvp(sys.argv[1], sys.argv[1:])", sys.executable, "-m", "datasets.preprocess",
         "--data_list", str(tmp_path / "all.csv"), "--cache_dir", str(tmp_path / "cache"),
         "--num_workers", "2"], cwd=REPO, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while len(children(process.pid)) < 2 and time.monotonic() < deadline:  # + a tracker
            time.sleep(0.01)
        time.sleep(0.3)  # the workers are importing
        os.killpg(process.pid, signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 130 and stderr.endswith("\ninterrupted\n")
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr


@pytest.mark.parametrize("allowed, expected", [({0}, 1), ({3, 5}, 2), (set(range(64)), 8)])
def test_the_default_worker_count_follows_the_cpus_this_process_may_use(monkeypatch, allowed,
                                                                        expected):
    # a scheduler's 2 CPUs of a 64-core node: 2 workers, not 8
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: allowed, raising=False)
    assert workers.default_workers() == expected
