"""Pools of worker processes that never outlive the run that started them."""
import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor

PARENT_POLL_S = 0.5


def default_workers():
    """How many processes datasets.preprocess and postprocess.py start unless told: one per
    CPU, at most 8."""
    return min(8, os.cpu_count() or 1)


def worker_pool(num_workers, mp_context=None):
    """A ProcessPoolExecutor, not multiprocessing.Pool: a worker that dies (killed for memory)
    raises BrokenProcessPool instead of hanging the run. Its workers exit when the process that
    started them is gone: killed with SIGKILL, it leaves them waiting on its queue forever,
    holding their memory and, forked, its open files."""
    return ProcessPoolExecutor(num_workers, mp_context=mp_context,
                               initializer=_exit_with_parent, initargs=(os.getpid(),))


def _exit_with_parent(parent):
    def watch():
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_S)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()
