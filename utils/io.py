"""Atomic file writing: a reader never sees a half-written file, a crash never destroys the old one."""
import contextlib
import errno
import hashlib
import os
import re
import tempfile
from pathlib import Path

# mkstemp creates files 0600; the finished file gets the mode any other tool would give it
# (0644 under umask 022). The umask can only be read by setting it, so read it once here.
_UMASK = os.umask(0o022)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK


NAME_MAX = 255  # bytes in a file name (ext4, XFS, btrfs, tmpfs)


def temp_suffix(name):
    """The end of a temporary of a write to the file `name`: its last two suffixes at most,
    from which some writers choose the format ('.nii.gz', '.npy')."""
    return "".join(Path(name).suffixes[-2:])


def temp_prefix(path):
    """Temporary files of writes to `path` start with this (see remove_stale_temps). A name
    too long to leave room for the rest of a temporary's (.<random>.tmp<suffix>) is cut short
    before its temp_suffix (is_temp reads it)."""
    name = Path(path).name
    suffix = temp_suffix(name)
    body = name[:len(name) - len(suffix)]
    while body.strip(".") and len(os.fsencode(f".{body}{suffix}.12345678.tmp{suffix}")) > NAME_MAX:
        body = body[:-1]
    return f".{body}{suffix}."


def remove_stale_temps(path):
    """Delete temporary files that killed writers of `path` left beside it.

    Call only while no other process may be writing `path` (under the folder's lock).
    Returns the number removed.
    """
    path = Path(path)
    removed = 0
    for tmp in path.parent.glob(f"{temp_prefix(path)}*.tmp{temp_suffix(path.name)}"):
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
            removed += 1
    return removed


def is_temp(path):
    """Whether `path` is named as atomic_path names its temporaries: .<name>.<random>.tmp<suffix>,
    the suffix being <name>'s temp_suffix ('.Synth_0000.nii.gz.k3j4.tmp.nii.gz'); another hidden
    file is not.
    Every '.tmp' is tried: <name> may hold one ('.a.tmp.json.k3j4.tmp.tmp.json')."""
    name = Path(path).name
    for match in re.finditer(r"\.tmp", name):
        target, _, random = name[1:match.start()].rpartition(".")
        if (name.startswith(".") and target and random
                and name[match.end():] == temp_suffix(target)):
            return True
    return False


def remove_temps_below(folder):
    """remove_stale_temps for every file in `folder` and its sub-folders, those of files that
    no longer exist included (a killed first write). Same precondition. Returns the number removed."""
    removed = 0
    for tmp in Path(folder).rglob(".*"):
        if tmp.is_file() and is_temp(tmp):
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
                removed += 1
    return removed


@contextlib.contextmanager
def atomic_path(path, durable=False):
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    The temporary name keeps the final suffixes (temp_suffix: '.nii.gz', '.npy') because some
    writers choose the format from it. durable=True syncs the file before the rename and the folder
    after it: the rename alone can reach the disk before the data (XFS; ext4 mounted with
    noauto_da_alloc), so that after a power loss or a node crash `path` could be empty, its
    previous version already gone. For files that cannot be rebuilt (a run's checkpoints).
    """
    path = Path(path)
    make_folder(path.parent)
    with writing_in(path.parent, path):
        fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), suffix=f".tmp{temp_suffix(path.name)}",
                                   dir=path.parent)
    os.fchmod(fd, FILE_MODE)
    os.close(fd)
    try:
        yield Path(tmp)
        if durable:
            _sync(tmp)
        os.replace(tmp, path)
    except BaseException as error:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if is_disk_full(error):
            raise disk_full(error, path) from error
        raise
    if durable:
        _sync(path.parent, folder=True)


# What fsync of a folder may answer where a file system cannot sync folders (CIFS), or where
# the folder may be written but not read: the file itself is synced, the rename done.
FOLDER_SYNC_UNSUPPORTED = (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EACCES)


def _sync(path, folder=False):
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as error:
        if not (folder and error.errno in FOLDER_SYNC_UNSUPPORTED):
            raise


class NotWritableError(OSError):
    """A folder that cannot be created or written in (a file in its way, no permission), or a
    file whose place a folder takes."""

    def __str__(self):
        return self.strerror


@contextlib.contextmanager
def writing_in(folder, file=None):
    """An OSError creating `folder` or a file in it -> NotWritableError (or DiskFullError)
    naming the folder, or the file being written when given."""
    try:
        yield
    except OSError as error:
        folder = Path(folder)
        if is_disk_full(error):
            raise disk_full(error, file, folder) from error
        blocking = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)
        problem = f"{blocking} is a file, not a folder" if blocking else error.strerror
        fix = "" if error.errno == errno.EROFS else ", or fix its permissions"
        raise NotWritableError(error.errno, f"cannot write in {folder}: {problem}; choose another "
                               f"folder{fix}") from error


def check_writable(folder):
    """Raise NotWritableError naming `folder` when it could not be created or written in (a
    file in its way, no permission), creating nothing: for checks before any work."""
    folder = Path(folder)
    with writing_in(folder):
        existing = next(p for p in (folder.absolute(), *folder.absolute().parents) if p.exists())
        if not existing.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
        if not os.access(existing, os.W_OK | os.X_OK):
            # access() only says no: a read-only mount is named as such (as a failed mkdir
            # would), not as permissions to fix
            code = errno.EROFS if os.statvfs(existing).f_flag & os.ST_RDONLY else errno.EACCES
            raise OSError(code, os.strerror(code))


def check_file_writable(path):
    """check_writable for the file `path` and its folder: a folder in the file's place is
    refused too, which os.replace would do only once the file is made. Creates nothing."""
    path = Path(path)
    if path.is_dir():
        raise NotWritableError(errno.EISDIR, f"cannot write {path}: it is a folder; remove it, "
                               "or choose another name")
    check_writable(path.parent)


def make_folder(folder):
    """mkdir -p `folder` -> Path, or NotWritableError naming it."""
    folder = Path(folder)
    with writing_in(folder):
        folder.mkdir(parents=True, exist_ok=True)
    return folder


class DiskFullError(OSError):
    """A write failed for lack of room (disk_full: the message names the file)."""

    def __str__(self):
        return self.strerror


# Why a write found no room, and what to do: (problem, fix) by errno.
NO_ROOM = {errno.ENOSPC: ("no space left on device", "free some space and run again"),
           errno.EFBIG: ("file too large for the file size limit (ulimit -f) or the file system",
                         "raise the limit or write elsewhere, then run again")}


def _no_room(error):
    """The errno of NO_ROOM anywhere in the chain (torch.save wraps it in a RuntimeError, its
    zip writer without an errno: only the text says so), EDQUOT counted as ENOSPC; or None."""
    while error is not None:
        code = error.errno if isinstance(error, OSError) else None
        if code in (errno.ENOSPC, errno.EDQUOT) or "No space left on device" in str(error):
            return errno.ENOSPC
        if code == errno.EFBIG:
            return code
        error = error.__cause__ or error.__context__
    return None


def is_disk_full(error):
    """Whether `error` is a write that found no room: a full disk or quota, a file too large."""
    return _no_room(error) is not None


def disk_full(error, path=None, folder=None):
    """The DiskFullError (one line) for `error` (is_disk_full) writing the file `path` (whose
    previous version atomic_path keeps), or else a file in `folder`."""
    code = _no_room(error)
    problem, fix = NO_ROOM[code]
    if path is None:
        return DiskFullError(code, f"{problem} while writing in {folder}; {fix}")
    previous = "the previous file is intact" if Path(path).exists() else "nothing was written"
    return DiskFullError(code, f"{problem} while writing {path}; {previous}; {fix}")


def write_text(path, text, durable=False):
    with atomic_path(path, durable) as tmp:
        tmp.write_text(text)


def write_bytes(path, *chunks, durable=False):
    """Write the chunks (bytes-like) atomically, with Python's own write: numpy's tofile and
    torch's zip writer report a full disk without an errno, which atomic_path could not tell
    from any other failure. durable: see atomic_path."""
    with atomic_path(path, durable) as tmp, open(tmp, "wb") as f:
        for chunk in chunks:
            f.write(chunk)


def file_sha256(path):
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
