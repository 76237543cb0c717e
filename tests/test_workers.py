import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from utils.lock import exclusive_lock

# A run holding its output folder's lock starts a pool and is killed with SIGKILL while its
# worker is busy (the worker prints its pid first).
HOLDER = """
import multiprocessing, os, sys, time
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
