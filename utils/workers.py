"""Pools of worker processes that never outlive the run that started them."""
import os
import signal
import threading
import time
from concurrent.futures import ProcessPoolExecutor

PARENT_POLL_S = 0.5


def available_cpus():
    """The CPUs this process may run on: a scheduler's allocation or `taskset`, not the whole
    machine's count."""
    if hasattr(os, "sched_getaffinity"):  # not on macOS
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def default_workers():
    """How many processes datasets.preprocess and postprocess.py start unless told: one per
    available CPU, at most 8."""
    return min(8, available_cpus())


def worker_pool(num_workers, mp_context=None):
    """A ProcessPoolExecutor, not multiprocessing.Pool: a worker that dies (killed for memory)
    raises BrokenProcessPool instead of hanging the run. Its workers exit when the process that
    started them is gone: killed with SIGKILL, it leaves them waiting on its queue forever,
    holding their memory and, forked, its open files."""
    return _Pool(num_workers, mp_context=mp_context, initializer=_exit_with_parent,
                 initargs=(os.getpid(),))


class _Pool(ProcessPoolExecutor):
    """Workers that leave SIGINT and SIGTERM to the process that started them, which decides
    when to stop (a terminal's Ctrl-C reaches every process of the job: a spawned worker still
    importing torch printed its traceback). A worker starts within a submit (forked, or
    spawned); started with the signals blocked, it keeps them blocked, its whole life. Here
    they are blocked for the submit only: one that arrives meanwhile is taken just after."""

    def submit(self, *args, **kwargs):
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, (signal.SIGINT, signal.SIGTERM))
        try:
            return super().submit(*args, **kwargs)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def _exit_with_parent(parent):
    def watch():
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_S)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()
