"""One run per folder: an exclusive lock on a snapshot or output folder.

The lock is `flock` on FOLDER/.lock, so the kernel releases it when the holder exits or is
killed (kill -9 included): a lock file left behind by a dead run is stale by construction and
is simply taken over. The file records the holder's host and pid for the error message.
The lock is the holding process's alone: a child it forks (a DataLoader or pool worker) closes
its copy at once, so that the same command may start again as soon as the holder is killed.
Forked writers (utils.workers.worker_pool) may then finish a write, for at most its
PARENT_POLL_S: each of their writes is atomic.
"""
import contextlib
import fcntl
import os
import socket

from utils.io import make_folder, writing_in

LOCK_NAME = ".lock"

# The descriptors of the locks this process holds. A flock belongs to the open file, which a
# fork shares: without closing them in the child, the workers of a run killed with SIGKILL
# (torch's DataLoader workers notice their parent is gone only within 5 s) would keep its
# folder locked, and the same command started again at once would be refused, naming a dead pid.
_HELD = set()


def _close_in_child():
    for fd in _HELD:
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD.clear()


os.register_at_fork(after_in_child=_close_in_child)


class LockError(RuntimeError):
    """The folder is in use by another live process."""


@contextlib.contextmanager
def exclusive_lock(folder, what="folder", wait=False):
    """Hold FOLDER/.lock for the duration of the block; if another process holds it, raise
    LockError, or with wait=True block until it is released (e.g. another preprocessor
    writing the same cached case)."""
    folder = make_folder(folder)
    path = folder / LOCK_NAME
    with writing_in(folder):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    _HELD.add(fd)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 256, 0).decode(errors="replace").strip() or "another process"
            raise LockError(f"{what} {folder} is in use by {holder} (lock {path}); wait for that "
                            f"run to finish or stop it, or use another folder") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()}\n".encode(), 0)
        yield path
    finally:
        if fd in _HELD:  # else this is a forked child, which closed it already
            _HELD.discard(fd)
            os.close(fd)  # releases the flock
