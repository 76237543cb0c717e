"""Checkpoints: weights_only round trip, RNG streams continue, atomic writes, clear errors."""
import contextlib
import errno
import gzip
import os
import random
import stat

import numpy as np
import pytest
import torch

from utils.checkpoint import (CheckpointError, load_checkpoint, make_checkpoint, save_checkpoint,
                              set_rng_state)


def _tiny_training_state():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.99, nesterov=True)
    model(torch.randn(2, 3)).sum().backward()
    optimizer.step()  # momentum buffers exist
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    return model, optimizer, scaler


def test_round_trip_with_weights_only(tmp_path):
    model, optimizer, scaler = _tiny_training_state()
    subset_rng = random.Random(7)
    random.seed(1); np.random.seed(2); torch.manual_seed(3); subset_rng.random()
    checkpoint = make_checkpoint(model, optimizer, scaler, 42, (0, 2), 40, subset_rng,
                                 {"mode": "random", "input_size": "16,32,32"}, random_start=10)
    expected = (random.random(), np.random.rand(), torch.rand(1).item(), subset_rng.random())

    path = tmp_path / "last.pth"
    save_checkpoint(checkpoint, path)
    loaded = load_checkpoint(path)  # weights_only=True inside
    assert loaded["iteration"] == 42 and loaded["teachers"] == [0, 2]
    assert loaded["elected_at"] == 40 and loaded["random_start"] == 10
    assert loaded["config"] == {"mode": "random", "input_size": "16,32,32"}
    assert loaded["scaler"]["scale"] == scaler.get_scale()
    for key, value in model.state_dict().items():
        assert torch.equal(loaded["model"][key], value)
    momentum = optimizer.state_dict()["state"][0]["momentum_buffer"]
    assert torch.equal(loaded["optimizer"]["state"][0]["momentum_buffer"], momentum)

    # every RNG continues where the checkpoint was taken
    random.seed(99); np.random.seed(99); torch.manual_seed(99)
    fresh = random.Random(0)
    set_rng_state(loaded["rng"], fresh)
    assert (random.random(), np.random.rand(), torch.rand(1).item(), fresh.random()) == expected
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary file left


def test_failed_write_keeps_previous_file(tmp_path):
    path = tmp_path / "last.pth"
    save_checkpoint({"iteration": 1}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        save_checkpoint({"iteration": 2, "bad": Unpicklable()}, path)
    assert load_checkpoint(path)["iteration"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pth"]


def test_non_finite_weights_are_never_written(tmp_path):
    model, optimizer, scaler = _tiny_training_state()
    path = tmp_path / "last.pth"
    save_checkpoint(make_checkpoint(model, optimizer, scaler, 1, (0,), None, random.Random(0), {}), path)
    with torch.no_grad():
        model[1].bias.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match=r"refusing to write .*last.pth: 1/4 weight "
                                                 r"tensors are non-finite \(first: 1.bias\)"):
        save_checkpoint(make_checkpoint(model, optimizer, scaler, 2, (0,), None,
                                        random.Random(0), {}), path)
    assert load_checkpoint(path)["iteration"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pth"]


def test_pickled_objects_and_missing_files_are_refused(tmp_path, monkeypatch):
    path = tmp_path / "published_style.pth"
    torch.save({"model": torch.nn.Linear(2, 2)}, path)  # the published code saved whole modules
    with pytest.raises(RuntimeError, match="it pickles torch.nn.modules.linear.Linear objects "
                                           r"\(the published code saves whole models\)"):
        load_checkpoint(path)
    (tmp_path / "folder.pth").mkdir()
    with pytest.raises(FileNotFoundError, match="folder.pth is a folder, not a file"):
        load_checkpoint(tmp_path / "folder.pth")
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_checkpoint(tmp_path / "nope.pth")
    # another kind of file (a log, a NIfTI) said as such; a cut one as damaged
    good = tmp_path / "good.pth"
    torch.save({"iteration": 3}, good)
    for name, content in (("log.pth", b"iter = 100 of 80000 completed\n"),
                          ("scan.pth", gzip.compress(b"\x5c\x01\x00\x00" + bytes(344)))):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(RuntimeError) as error:
            load_checkpoint(tmp_path / name)
        assert str(error.value) == (f"cannot read checkpoint {tmp_path / name}: not a PyTorch "
                                    "checkpoint (torch.save writes a zip archive or a pickle)")
    (tmp_path / "cut.pth").write_bytes(good.read_bytes()[:300])
    with pytest.raises(RuntimeError, match=r"cut.pth: RuntimeError: .* \(a truncated or damaged "
                                           r"file\?\)$"):
        load_checkpoint(tmp_path / "cut.pth")
    (tmp_path / "empty.pth").touch()
    with pytest.raises(RuntimeError, match=r"empty.pth: the file is empty$"):
        load_checkpoint(tmp_path / "empty.pth")
    # a file that cannot be opened is not called damaged (raised by hand: root may open anything)
    def denied(path, **_):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))

    monkeypatch.setattr(torch, "load", denied)
    with pytest.raises(RuntimeError) as error:
        load_checkpoint(good)
    assert str(error.value) == (f"cannot read checkpoint {good}: permission denied; check the "
                                "file's permissions")


def test_a_flipped_bit_in_a_weight_is_refused(tmp_path):
    # torch.load does not check the zip records' CRC-32: the damaged weight loaded as it was
    path = tmp_path / "last.pth"
    weight = torch.arange(1000, dtype=torch.float32)
    torch.save({"model": {"w": weight}, "iteration": 3}, path)
    data = bytearray(path.read_bytes())
    at = bytes(data).index(weight.numpy().tobytes())
    data[at + 2001] ^= 0x01  # a mantissa bit of weight[500]
    path.write_bytes(data)
    assert torch.load(path, weights_only=True)["model"]["w"][500] != 500  # torch: silent
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path)
    assert str(error.value) == (f"cannot read checkpoint {path}: its record last/data/0 does not "
                                "match its checksum (a damaged file?)")


def _record_syncs(monkeypatch, folder_error=None):
    """Record fsync (of a file or a folder) and rename calls in order; folder_error: the errno
    a folder's fsync fails with."""
    events, real_fsync, real_replace = [], os.fsync, os.replace

    def fsync(fd):
        kind = "folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"
        events.append(f"fsync {kind}")
        if kind == "folder" and folder_error:
            raise OSError(folder_error, os.strerror(folder_error))
        real_fsync(fd)

    def replace(*args):
        events.append("replace")
        real_replace(*args)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return events


def test_a_checkpoint_reaches_the_disk_before_it_replaces_the_previous_one(tmp_path, monkeypatch):
    # Without fsync the rename can reach the disk before the data: after a power loss the
    # run's only last.pth could be empty, and the run lost. The cache's arrays are not synced.
    events = _record_syncs(monkeypatch)
    save_checkpoint({"model": {"w": torch.ones(2)}}, tmp_path / "last.pth")
    assert events == ["fsync file", "replace", "fsync folder"]
    assert torch.equal(load_checkpoint(tmp_path / "last.pth")["model"]["w"], torch.ones(2))


@pytest.mark.parametrize("code, fails", [(errno.EINVAL, False), (errno.EIO, True)])
def test_a_folder_that_cannot_be_synced(tmp_path, monkeypatch, code, fails):
    # some file systems cannot sync a folder (CIFS: EINVAL): the file is, and that is the save;
    # an I/O error is an error
    events = _record_syncs(monkeypatch, folder_error=code)
    with pytest.raises(OSError) if fails else contextlib.nullcontext():
        save_checkpoint({"model": {"w": torch.ones(2)}}, tmp_path / "last.pth")
    assert events == ["fsync file", "replace", "fsync folder"]
    assert torch.equal(load_checkpoint(tmp_path / "last.pth")["model"]["w"], torch.ones(2))


def test_numpy_stream_continues_mid_block_and_with_a_cached_gaussian(tmp_path):
    """After draws (MT19937 position != 624) and an odd number of legacy gaussians (one cached),
    the restored global numpy stream gives the same next values."""
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    np.random.seed(5)
    np.random.rand(7)
    np.random.randn(3)  # odd: the second value of the last pair is cached
    checkpoint = make_checkpoint(model, optimizer, scaler, 1, (0,), None, random.Random(0), {})
    expected = (np.random.randn(), np.random.rand(3).tolist())
    save_checkpoint(checkpoint, tmp_path / "c.pth")
    np.random.seed(99)
    set_rng_state(load_checkpoint(tmp_path / "c.pth")["rng"], random.Random(0))
    assert (np.random.randn(), np.random.rand(3).tolist()) == expected
