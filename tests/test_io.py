"""utils.io (atomic writes: permissions, stale temporaries, disk full) and utils.lock."""
import errno
import os
import signal
import stat
import subprocess
import sys
import tempfile
import time
import types

import pytest
import torch

from test_demo import REPO
from utils.io import (DiskFullError, NotWritableError, atomic_path, check_file_writable,
                      check_writable, is_temp, remove_stale_temps, temp_prefix, write_text)
from utils.lock import LockError, exclusive_lock


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_follow_the_umask(tmp_path, umask, mode):
    # a fresh interpreter: utils.io reads the umask once, at import
    code = ("import os, sys; os.umask(int(sys.argv[2], 8)); from pathlib import Path\n"
            "import numpy as np, torch; from utils.io import atomic_path, write_text\n"
            "d = Path(sys.argv[1]); write_text(d / 'a.txt', 'x')\n"
            "with atomic_path(d / 'b.npy') as t: np.save(t, np.zeros(3))\n"
            "with atomic_path(d / 'c.pth') as t: torch.save({'a': 1}, t)\n")
    subprocess.run([sys.executable, "-c", code, str(tmp_path), oct(umask)[2:]], check=True)
    for name in ("a.txt", "b.npy", "c.pth"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode, name


def test_remove_stale_temps_only_removes_temporaries_of_that_file(tmp_path):
    target = tmp_path / "last.pth"
    target.write_bytes(b"good")
    stale = [tmp_path / ".last.pth.abc123.tmp.pth", tmp_path / ".last.pth.zz.tmp.pth"]
    others = [tmp_path / ".final.pth.abc.tmp.pth", tmp_path / "last.pth.bak", tmp_path / ".last.pth.x.tmp.npy"]
    for path in stale + others:
        path.write_bytes(b"partial")
    assert remove_stale_temps(target) == 2
    assert not any(p.exists() for p in stale)
    assert all(p.exists() for p in others) and target.read_bytes() == b"good"


@pytest.mark.parametrize("name", ["a.tmp", "a.tmp.json", "metrics.tmp.csv", "x.tmpy",
                                  "Brats18_2013_1.nii.gz", "last.pth", "case.v2.npy"])
def test_is_temp_knows_every_temporary_of_atomic_path(tmp_path, name):
    # the temporary as atomic_path names it, seen while the write is in progress
    with atomic_path(tmp_path / name) as tmp:
        tmp.write_bytes(b"")
        assert is_temp(tmp)
    assert not is_temp(tmp_path / name)
    for other in (".notes.tmp", ".A.nii.gz.k3j4.tmp.npy", "._Case.nii.gz", ".tmp"):
        assert not is_temp(tmp_path / other)


@pytest.mark.parametrize("name, end", [
    ("C" * 243 + ".nii.gz", ".tmp.nii.gz"), ("é" * 124 + ".nii.gz", ".tmp.nii.gz"),  # 250, 255 bytes
    ("Brats18_2013_10_1." + "x" * 200 + ".nii.gz", ".tmp.nii.gz"),  # a long dotted part
    ("r" + ".v1" * 60 + ".pth", ".tmp.v1.pth"),  # 185 bytes of suffixes
    (".hidden" + ".bbbbbbbbbbbbbbbbbbb" * 12, ".tmp.bbbbbbbbbbbbbbbbbbb.bbbbbbbbbbbbbbbbbbb")])
def test_a_name_near_the_length_limit_is_written_and_its_temporaries_found(tmp_path, name, end):
    # The temporary adds 15 bytes and the suffixes again: it used to be refused as too long
    # ("cannot write in <folder>"), though the file itself may have that name.
    with atomic_path(tmp_path / name) as tmp:
        tmp.write_bytes(b"mask")
        assert len(os.fsencode(tmp.name)) <= 255 and tmp.name.endswith(end)
        assert is_temp(tmp)
        prefix = temp_prefix(tmp_path / name)
        stale = tmp.with_name(f"{prefix}zzzzzzzz{tmp.name[len(prefix) + 8:]}")  # a killed write's
        stale.write_bytes(b"partial")
    assert (tmp_path / name).read_bytes() == b"mask"
    assert remove_stale_temps(tmp_path / name) == 1 and not stale.exists()


def test_a_file_whose_place_a_folder_takes_is_named(tmp_path):
    # os.replace would refuse it only at the end of the work that made the file.
    (tmp_path / "m.nii.gz").mkdir()
    with pytest.raises(NotWritableError) as error:
        check_file_writable(tmp_path / "m.nii.gz")
    assert str(error.value) == (f"cannot write {tmp_path / 'm.nii.gz'}: it is a folder; remove it, "
                                "or choose another name")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(NotWritableError, match="afile is a file, not a folder"):
        check_file_writable(tmp_path / "afile" / "m.nii.gz")
    (tmp_path / "old.nii.gz").write_text("x")  # an existing file is replaced, not refused
    check_file_writable(tmp_path / "old.nii.gz")
    check_file_writable(tmp_path / "new" / "m.nii.gz")
    assert not (tmp_path / "new").exists()


def test_disk_full_names_the_file_and_keeps_the_previous_one(tmp_path):
    target = tmp_path / "last.pth"
    target.write_bytes(b"previous")
    with pytest.raises(DiskFullError, match=r"no space left on device while writing .*last\.pth; "
                                            r"the previous file is intact"):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert target.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["last.pth"]


def test_no_room_for_the_temporary_file_names_the_file(tmp_path, monkeypatch):
    # a full disk (or inodes) can refuse the temporary file itself, before any byte is written
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(tempfile, "mkstemp", full)
    with pytest.raises(DiskFullError) as error:
        write_text(tmp_path / "teachers.json", "{}")
    assert str(error.value) == (f"no space left on device while writing {tmp_path / 'teachers.json'}; "
                                "nothing was written; free some space and run again")


def test_a_file_size_limit_is_one_line_and_keeps_the_previous_file(tmp_path):
    # ulimit -f (a scheduler's file size limit) or a file system's largest file: EFBIG
    target = tmp_path / "last.pth"
    target.write_bytes(b"previous")
    code = ("import resource, sys\n"
            "from utils.io import DiskFullError, write_bytes\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))\n"
            "try:\n"
            "    write_bytes(sys.argv[1], bytes(10000))\n"
            "except DiskFullError as error:\n"
            "    print(error)\n")
    done = subprocess.run([sys.executable, "-c", code, str(target)], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert done.stdout.splitlines() == [
        f"file too large for the file size limit (ulimit -f) or the file system while writing "
        f"{target}; the previous file is intact; raise the limit or write elsewhere, then run "
        "again"], done.stderr
    assert target.read_bytes() == b"previous" and [p.name for p in tmp_path.iterdir()] == ["last.pth"]


def test_disk_full_inside_torch_save_is_recognised(tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 64 vs 0") \
            from OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(DiskFullError, match="nothing was written"):
        with atomic_path(tmp_path / "x.pth") as tmp:
            torch.save({}, tmp)


def test_other_errors_pass_through_unchanged(tmp_path):
    with pytest.raises(KeyError):
        with atomic_path(tmp_path / "x.txt"):
            raise KeyError("bug")
    assert list(tmp_path.iterdir()) == []


def test_lock_refuses_a_second_holder_and_names_the_first(tmp_path):
    code = ("import sys, time; from utils.lock import exclusive_lock\n"
            "with exclusive_lock(sys.argv[1]):\n    print('held', flush=True); time.sleep(60)\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LockError, match=rf"snapshot folder .* is in use by pid {holder.pid} on host"):
            with exclusive_lock(tmp_path, "snapshot folder"):
                pass
    finally:
        holder.kill()
        holder.wait()
    # the holder died without cleaning up: its lock file remains but is stale and is taken over
    assert (tmp_path / ".lock").exists()
    with exclusive_lock(tmp_path, "snapshot folder") as path:
        assert f"pid {os.getpid()} " in path.read_text()


def test_lock_is_released_after_the_block(tmp_path):
    with exclusive_lock(tmp_path):
        pass
    with exclusive_lock(tmp_path):
        pass


def test_lock_with_wait_blocks_until_the_holder_leaves(tmp_path):
    done = tmp_path / "done"
    code = ("import pathlib, sys, time; from utils.lock import exclusive_lock\n"
            "with exclusive_lock(sys.argv[1]):\n    print('held', flush=True); time.sleep(0.5)\n"
            "    pathlib.Path(sys.argv[2]).touch()\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path), str(done)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with exclusive_lock(tmp_path, wait=True):
            assert done.exists()  # written by the holder just before it released the lock
    finally:
        holder.kill()
        holder.wait()


def test_a_folder_that_cannot_be_written_is_named(tmp_path, monkeypatch):
    (tmp_path / "afile").write_text("x")
    message = ("cannot write in {}: {} is a file, not a folder; choose another folder, or fix its "
               "permissions")
    for folder in (tmp_path / "afile", tmp_path / "afile" / "sub"):
        with pytest.raises(NotWritableError) as error:
            check_writable(folder)
        assert str(error.value) == message.format(folder, tmp_path / "afile")
        with pytest.raises(NotWritableError, match="is a file, not a folder"):
            exclusive_lock(folder).__enter__()
        with pytest.raises(NotWritableError, match="is a file, not a folder"):
            with atomic_path(folder / "m.nii.gz"):
                pass
    check_writable(tmp_path / "new" / "deeper")  # may be created: nothing is
    assert not (tmp_path / "new").exists()
    # Root passes any permission check, so a read-only folder is what os.access says it is.
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(NotWritableError, match=f"cannot write in {tmp_path / 'new'}: Permission denied"):
        check_writable(tmp_path / "new")
    # ... and on a read-only mount access() says no too, for root as well: named as the mount
    monkeypatch.setattr(os, "statvfs", lambda path: types.SimpleNamespace(f_flag=os.ST_RDONLY))
    with pytest.raises(NotWritableError, match=f"cannot write in {tmp_path / 'new'}: Read-only file system; choose another folder$"):
        check_writable(tmp_path / "new")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_does_not_keep_the_lock(tmp_path):
    # train.py forks its DataLoader workers while it holds the snapshot folder's lock; killed
    # with SIGKILL, it must leave the folder free at once, not once its orphaned workers exit
    started, ready = os.pipe()
    with exclusive_lock(tmp_path, "snapshot folder"):
        child = os.fork()
        if child == 0:  # a worker that outlives the holder
            try:
                os.write(ready, b"x")
                time.sleep(30)
            finally:
                os._exit(0)  # never back into pytest
        os.read(started, 1)  # the child runs (fork's hooks are done)
    os.close(started)
    os.close(ready)
    try:
        with exclusive_lock(tmp_path, "snapshot folder"):
            pass
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
