"""One run per folder: an exclusive lock on a snapshot or output folder.

The lock is `flock` on FOLDER/.lock, so the kernel releases it when the holder exits or is
killed (kill -9 included): a lock file left behind by a dead run is stale by construction and
is simply taken over. The file records the holder's host and pid for the error message.
"""
import contextlib
import fcntl
import os
import socket

from utils.io import make_folder, writing_in

LOCK_NAME = ".lock"


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
        os.close(fd)  # releases the flock
