"""Preprocessing cache: contents, compact format, memory mapping, re-use, invalidation,
validation on open, concurrent writers, errors, CLI."""
import errno
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from test_brats import make_volumes, part_path, save, write_case
from test_normalize import same_bits

import datasets.preprocess as preprocess_module
from datasets import synthetic
from datasets.brats import CaseError, load_case
from datasets.normalize import normalize_image, normalize_published
from datasets.preprocess import CacheInvalid, load_cached, main, preprocess
from datasets.sampling import PatchDataset, foreground_locations
import utils.io
from utils.cli import UsageError
from utils.io import DiskFullError
from utils.lock import LockError, exclusive_lock


@pytest.fixture
def dataset(tmp_path):
    """Two labelled cases (2018 .nii.gz and 2023 .nii) and one unlabelled, with a datalist."""
    data = tmp_path / "data"
    write_case(data, "Brats18_A", seed=1)
    write_case(data, "BraTS-GLI-00002-000", scheme="2023", ext=".nii", seed=2)
    write_case(data, "Brats18_C", seed=3, label=False)
    lst = tmp_path / "list.csv"
    lst.write_text("data/Brats18_A\ndata/BraTS-GLI-00002-000\ndata/Brats18_C\n")
    return data, lst, tmp_path / "cache"


def mtimes(cache):
    """Modification times of the cached files (not of the .lock files, which name their holder)."""
    return {p.relative_to(cache): p.stat().st_mtime_ns for p in cache.rglob("*")
            if p.is_file() and p.name != ".lock"}


def test_cache_contents(dataset):
    data, lst, cache = dataset
    cases = preprocess(lst, cache, num_workers=1)
    assert [c.name for c in cases] == ["Brats18_A", "BraTS-GLI-00002-000", "Brats18_C"]
    for cached in cases:
        case = load_case(data / cached.name)
        # compact: int16 source values of the box around the brain (test_brats: [3:-3, 3:-3, 2:-2]
        # in (X, Y, Z), so D, H, W = Z, X, Y lose 2, 3, 3 voxels on each side)
        assert isinstance(cached.raw, np.memmap) and cached.raw.dtype == np.int16
        assert cached.offset == (2, 3, 3) and cached.raw.shape == (4, 12, 18, 14)
        assert cached.shape == case.image.shape[1:]
        assert same_bits(cached.normalized(), normalize_image(case.image, normalize_published))
        if case.label is None:
            assert cached.label is None and cached.full_label() is None
            assert not (cache / cached.name / "label.npy").exists()
        else:
            assert isinstance(cached.label, np.memmap) and cached.label.dtype == np.uint8
            np.testing.assert_array_equal(cached.full_label(), case.label)
            for got, want in zip(cached.locations, foreground_locations(case.label)):
                np.testing.assert_array_equal(got, want)
        meta = cached.meta
        assert meta["shape_xyz"] == list(case.shape_xyz) and meta["spacing"] == list(case.spacing)
        np.testing.assert_array_equal(meta["affine"], case.affine)
        assert set(meta["sources"]) == set(case.files)
        assert meta["normalization"]["name"] == "published-histogram-zscore"
    assert 4 in np.asarray(cases[1].label)  # 2023's ET (3) is cached as 4


def test_reuse_and_invalidation(dataset):
    data, lst, cache = dataset
    preprocess(lst, cache, num_workers=1)
    before = mtimes(cache)
    cases = preprocess(lst, cache, num_workers=1)
    assert mtimes(cache) == before  # nothing rewritten

    # Rewrite one modality with different data: only that case is rebuilt, with the new data.
    old = cases[0].normalized()[2]
    vol = make_volumes(seed=9)["t1ce"]
    save(vol, part_path(data / "Brats18_A", "t1ce"))
    cases = preprocess(lst, cache, num_workers=1)
    after = mtimes(cache)
    changed = {str(p.parent) for p in after if after[p] != before[p]}
    assert changed == {"Brats18_A"}
    assert not np.array_equal(cases[0].normalized()[2], old)
    np.testing.assert_array_equal(cases[0].normalized()[2], normalize_published(vol.transpose(2, 0, 1)))

    # A case whose meta.json is missing (interrupted write) counts as not cached.
    (cache / "Brats18_C" / "meta.json").unlink()
    preprocess(lst, cache, num_workers=1)
    assert mtimes(cache)[(cache / "Brats18_C" / "image.npy").relative_to(cache)] != after[
        (cache / "Brats18_C" / "image.npy").relative_to(cache)
    ]


def test_parallel_cli_and_data_root(dataset, capsys):
    data, _, cache = dataset
    lst = data.parent / "published.csv"  # published-style entries, re-based under data/
    lst.write_text("\n".join(f"../data/BraTS-2018/HGG/{n}" for n in ("Brats18_A", "Brats18_C")))
    main(["--data_list", str(lst), "--cache_dir", str(cache), "--data_root", str(data), "--num_workers", "2"])
    assert "2 cases (1 with labels)" in capsys.readouterr().out
    assert sorted(p.name for p in cache.iterdir()) == ["Brats18_A", "Brats18_C"]
    meta = json.loads((cache / "Brats18_A" / "meta.json").read_text())
    assert meta["sources"]["flair"]["path"] == str((data / "Brats18_A" / "Brats18_A_flair.nii.gz").resolve())
    assert not [p for p in cache.rglob("*tmp*")]  # no temporary files left behind


def test_cli_empty_data_root_is_none_and_empty_list_is_refused(dataset, capsys, monkeypatch):
    data, lst, cache = dataset
    monkeypatch.setattr(preprocess_module, "worker_pool", None)  # 0 workers: in this process
    main(["--data_list", str(lst), "--cache_dir", str(cache), "--data_root", "", "--num_workers", "0"])
    assert "3 cases (2 with labels)" in capsys.readouterr().out  # the list's own paths, as train.py
    with pytest.raises(SystemExit) as info:
        main(["--data_list", "", "--cache_dir", str(cache)])
    assert info.value.code == 2
    assert capsys.readouterr().err == ("error: argument --data_list: expected a path, got '' "
                                       "(see python -m datasets.preprocess --help)\n")
    empty = data.parent / "empty.csv"
    empty.write_text("# nothing yet\n\n")
    with pytest.raises(UsageError, match=f"^--data_list {empty} lists no cases$"):
        main(["--data_list", str(empty), "--cache_dir", str(cache)])


def test_what_does_not_look_like_brats_is_warned_about_when_the_case_is_built(dataset, capsys):
    # eval.py and predict.py warn of it; training took it without a word (a label map saved
    # over a scan trained as one)
    data, lst, cache = dataset
    volumes = make_volumes(seed=1)
    save(volumes["seg"].astype(np.int16), part_path(data / "Brats18_A", "t1"))
    preprocess(lst, cache, num_workers=1)
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning")]
    assert ("warning: case Brats18_A: Brats18_A_t1.nii.gz holds only whole numbers from 0 to 4, "
            "as a label map (segmentation) does: no scan does; check the files given as scans"
            in warnings)
    # one per case and condition, as brats_like_warnings says: ZOOMS is not 1 mm
    assert len(warnings) == 4 and sum("voxel size 1 x 1.5 x 2 mm;" in w for w in warnings) == 3
    preprocess(lst, cache, num_workers=1)  # re-used: said when built
    assert "warning" not in capsys.readouterr().err


def test_errors_name_case_and_file(dataset):
    data, lst, cache = dataset
    bad = part_path(data / "Brats18_A", "t2")
    save(np.zeros((24, 20, 16), np.int16), bad)  # readable, but max 0: cannot be normalised
    with pytest.raises(CaseError) as info:
        preprocess(lst, cache, num_workers=1)
    assert bad.name in str(info.value) and "Brats18_A" in str(info.value)
    os.remove(bad)
    with pytest.raises(CaseError, match="Brats18_A_t2.nii.gz"):
        preprocess(lst, cache, num_workers=2)  # errors cross the process boundary too
    with pytest.raises(CaseError, match="not preprocessed"):
        load_cached(cache, "Brats18_A")


def test_worker_errors_name_case_and_file(dataset):
    data, lst, cache = dataset
    # A constant modality, which the published normalisation cannot handle, and a truncated file.
    constant = part_path(data / "Brats18_A", "t1")
    save(np.ones((24, 20, 16), np.int16), constant)
    corrupt = part_path(data / "Brats18_C", "flair")
    corrupt.write_bytes(corrupt.read_bytes()[:100])
    for case, path, problem in (("Brats18_A", constant, "every voxel is 1: a constant volume"),
                                ("Brats18_C", corrupt, "unreadable NIfTI")):
        lst.write_text(f"data/{case}\ndata/BraTS-GLI-00002-000\n")
        with pytest.raises(CaseError, match=problem) as info:
            preprocess(lst, cache, num_workers=2)
        assert info.value.case == case and info.value.path == path


def test_unexpected_error_names_the_case(dataset, monkeypatch):
    _, lst, cache = dataset

    def disk_full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("datasets.preprocess._build", disk_full)
    with pytest.raises(OSError) as info:
        preprocess(lst, cache, num_workers=1)
    assert "while preprocessing case Brats18_A" in "\n".join(info.value.__notes__)


def test_workers_that_cannot_start_raise_instead_of_hanging(dataset):
    # 'spawn' children re-import the main script; a script piped to `python -` has none, so
    # every child dies at start. multiprocessing.Pool re-spawned them forever.
    _, lst, cache = dataset
    script = f"from datasets.preprocess import preprocess\npreprocess({str(lst)!r}, {str(cache)!r}, num_workers=2)\n"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    log = lst.parent / "stderr.txt"  # a file, not a pipe: a hung child's pipe would block the timeout
    with open(log, "w") as stderr:
        run = subprocess.run([sys.executable, "-"], input=script, text=True, stdout=stderr,
                             stderr=stderr, cwd=lst.parent, env=env, timeout=60)
    assert run.returncode != 0
    assert "BrokenProcessPool" in log.read_text() and "num_workers=1" in log.read_text()


# ------------------------------------------------------------------------ compact cache format
def test_brats_sized_case_takes_less_than_half_the_float32_cache(tmp_path):
    """Format 1 stored float32 (4, D, H, W) + uint8 (D, H, W): 17 bytes per voxel."""
    shape_xyz = (240, 240, 155)
    (folder,) = synthetic.generate(tmp_path / "data", 1, shape_xyz, seed=0, fmt="nii")
    lst = tmp_path / "list.csv"
    lst.write_text(f"{folder}\n")
    (cached,) = preprocess(lst, tmp_path / "cache", num_workers=1)
    size = sum(p.stat().st_size for p in (tmp_path / "cache" / folder.name).iterdir())
    format_1 = 17 * np.prod(shape_xyz)
    assert size <= 72e6 and size <= format_1 / 2, (size, format_1)
    assert cached.raw.dtype == np.int16
    case = load_case(folder)
    assert same_bits(cached.normalized(), normalize_image(case.image))


def test_sources_that_are_not_int16_are_cached_as_float32(dataset):
    data, lst, cache = dataset
    volume = make_volumes(seed=4)["t2"].astype(np.float32) + 0.5  # background 0.5, not integers
    save(volume, part_path(data / "Brats18_A", "t2"))
    cached = preprocess(lst, cache, num_workers=1)[0]
    assert cached.raw.dtype == np.float32
    case = load_case(data / "Brats18_A")
    assert same_bits(cached.normalized(), normalize_image(case.image, normalize_published))


def test_a_case_without_tumour_is_cached_and_sampled(dataset):
    """An all-zero label map (no tumour) has no locations: the cache stores three empty lists
    and the sampler falls back to random crops (as published for an empty region)."""
    data, lst, cache = dataset
    folder = data / "Brats18_A"
    save(np.zeros_like(make_volumes()["seg"]), part_path(folder, "seg"))
    cached = preprocess(lst, cache, num_workers=1)[0]
    assert (cache / "Brats18_A" / "meta.json").is_file() and cached.meta["locations_count"] == [0, 0, 0]
    assert [loc.shape for loc in cached.locations] == [(0, 3)] * 3 and not cached.label.any()
    assert preprocess(lst, cache, num_workers=1)[0].meta == cached.meta  # re-used as it is
    dataset = PatchDataset([cached], (8, 16, 16), length=8)
    batch = torch.utils.data.default_collate([dataset[i] for i in range(8)])
    image, regions = dataset.to_device(batch, torch.device("cpu"))
    assert image.shape == (8, 4, 8, 16, 16) and image.any() and not regions.any()


def test_format_1_cache_is_rebuilt_with_a_message_never_mixed(dataset, capsys):
    data, lst, cache = dataset
    preprocess(lst, cache, num_workers=1)
    # What format 1 left: meta.json version 1, image.npy the normalised float32 volume.
    folder = cache / "Brats18_A"
    meta = json.loads((folder / "meta.json").read_text())
    case = load_case(data / "Brats18_A")
    np.save(folder / "image.npy", normalize_image(case.image))
    (folder / "meta.json").write_text(json.dumps({**meta, "cache_version": 1}))
    with pytest.raises(CacheInvalid, match=r"meta.json: cache format 1 \(normalised float32"):
        load_cached(cache, "Brats18_A")
    capsys.readouterr()
    cases = preprocess(lst, cache, num_workers=1)
    err = capsys.readouterr().err
    assert "case Brats18_A" in err and "cache format 1" in err and "rebuilt" in err
    assert "Brats18_C" not in err  # valid cases are re-used silently
    assert cases[0].meta["cache_version"] == 2 and cases[0].raw.dtype == np.int16
    assert same_bits(cases[0].normalized(), normalize_image(case.image, normalize_published))


# ------------------------------------------------------------------------------- robustness
def test_datalist_entry_dotdot_stays_inside_the_cache(dataset):
    data, _, cache = dataset
    lists = data / "Brats18_A" / "lists"
    lists.mkdir()
    lst = lists / "list.csv"
    lst.write_text("..\n")  # the case folder, written relative to the list
    outside = {p for p in data.parent.rglob("*") if cache not in p.parents}
    cases = preprocess(lst, cache, num_workers=1)
    assert {p for p in data.parent.rglob("*") if cache not in p.parents} == outside | {cache}
    assert [c.name for c in cases] == ["Brats18_A"] and (cache / "Brats18_A" / "meta.json").exists()
    for name in ("..", ".", "", "a/b"):
        with pytest.raises(CaseError, match="outside the cache folder"):
            load_cached(cache, name)


def test_a_cache_dir_that_is_the_folder_of_the_cases_is_refused(dataset):
    # it wrote image.npy... into the case folders, and deleted any meta.json or label.npy there
    data, lst, _ = dataset
    (data / "Brats18_A" / "label.npy").write_bytes(b"the user's")
    before = {p: p.read_bytes() for p in data.rglob("*") if p.is_file()}
    with pytest.raises(UsageError) as error:
        preprocess(lst, data, num_workers=1)
    assert str(error.value) == (f"--cache_dir {data} is the folder of the cases (it holds "
                                "Brats18_A): the cache would be written into, and its files deleted "
                                "from, the case folders; choose another --cache_dir")
    assert {p: p.read_bytes() for p in data.rglob("*") if p.is_file()} == before


def test_temporary_files_of_killed_writers_are_removed(dataset):
    _, lst, cache = dataset
    preprocess(lst, cache, num_workers=1)
    leftovers = [cache / "Brats18_A" / ".image.npy.k1ll3d.tmp.npy",
                 cache / "Brats18_C" / ".meta.json.x8y2z0.tmp.json"]
    for path in leftovers:
        path.write_bytes(b"\0" * 1000)
    (cache / "Brats18_C" / "meta.json").unlink()  # and one case whose build was killed
    preprocess(lst, cache, num_workers=1)
    assert not any(path.exists() for path in leftovers)
    assert not list(cache.rglob("*.tmp*"))


def corrupt_truncated_image(folder):
    path = folder / "image.npy"
    path.write_bytes(path.read_bytes()[:1000])
    return "image.npy", "1000 bytes"


def corrupt_label_value(folder):
    label = np.load(folder / "label.npy")
    label[0, 0, 0] = 7
    np.save(folder / "label.npy", label)  # same size
    return "label.npy", r"label values \[7\]"


def corrupt_image_dtype(folder):
    image = np.load(folder / "image.npy")
    np.save(folder / "image.npy", image.view(np.float16))  # same size and shape
    return "image.npy", "float16"


def corrupt_meta_list(folder):
    (folder / "meta.json").write_text("[]")
    return "meta.json", "JSON list"


@pytest.mark.parametrize("corrupt", [corrupt_truncated_image, corrupt_label_value,
                                     corrupt_image_dtype, corrupt_meta_list])
def test_broken_cache_is_named_on_open_and_rebuilt(dataset, capsys, corrupt):
    data, lst, cache = dataset
    preprocess(lst, cache, num_workers=1)
    file, problem = corrupt(cache / "Brats18_A")
    with pytest.raises(CaseError, match=problem) as info:
        load_cached(cache, "Brats18_A")
    assert info.value.case == "Brats18_A" and info.value.path == cache / "Brats18_A" / file
    capsys.readouterr()
    cases = preprocess(lst, cache, num_workers=1)
    err = capsys.readouterr().err
    assert f"case Brats18_A: {cache / 'Brats18_A' / file}" in err and "rebuilt" in err
    case = load_case(data / "Brats18_A")
    assert same_bits(cases[0].normalized(), normalize_image(case.image, normalize_published))
    np.testing.assert_array_equal(cases[0].full_label(), case.label)


def test_source_edited_in_place_with_same_size_and_mtime_is_rebuilt(dataset):
    data, lst, cache = dataset
    preprocess(lst, cache, num_workers=1)
    path = part_path(data / "BraTS-GLI-00002-000", "t1ce", scheme="2023", ext=".nii")
    before = path.stat()
    volume = make_volumes(seed=9)["t1ce"]
    save(volume, path.with_name("new.nii"))
    with open(path, "r+b") as f:  # same inode, same size (same shape, dtype, no compression)
        f.write(path.with_name("new.nii").read_bytes())
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    cases = preprocess(lst, cache, num_workers=1)
    np.testing.assert_array_equal(cases[1].normalized()[2], normalize_published(volume.transpose(2, 0, 1)))


def test_touched_source_keeps_its_cache_and_is_hashed_once(dataset, monkeypatch):
    data, lst, cache = dataset
    preprocess(lst, cache, num_workers=1)
    before = mtimes(cache)
    path = part_path(data / "Brats18_A", "flair")
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    hashed = []
    real = preprocess_module.file_sha256
    monkeypatch.setattr(preprocess_module, "file_sha256", lambda p: hashed.append(p) or real(p))
    preprocess(lst, cache, num_workers=1)
    assert hashed == [path]  # only the touched file is read, once
    changed = {p for p in mtimes(cache) if mtimes(cache)[p] != before[p]}
    assert changed == {Path("Brats18_A/meta.json")}  # its new stat is recorded, arrays kept
    preprocess(lst, cache, num_workers=1)
    assert hashed == [path]


def test_two_preprocessors_on_one_cache_do_not_race(dataset, monkeypatch):
    """The race: a second preprocessor decides to build a case the first is building, starts
    after the first finished it, and removes its meta.json while the first opens the case."""
    data, _, cache = dataset
    first, second = data.parent / "first.csv", data.parent / "second.csv"
    first.write_text("data/Brats18_A\ndata/Brats18_C\n")
    second.write_text("data/Brats18_A\n")
    meta = cache / "Brats18_A" / "meta.json"
    building = threading.Event()
    real_read_files, real_save = preprocess_module.read_files, np.save

    read_by = []

    def read_files_then_wait(*args, **kwargs):
        read_by.append(threading.current_thread().name)
        if threading.current_thread().name == "second":
            deadline = time.monotonic() + 5
            while not meta.exists() and time.monotonic() < deadline:
                time.sleep(0.001)
        else:
            building.set()
        return real_read_files(*args, **kwargs)

    def slow_save(*args, **kwargs):
        time.sleep(0.4 if threading.current_thread().name == "second" else 0.1)
        return real_save(*args, **kwargs)

    monkeypatch.setattr(preprocess_module, "read_files", read_files_then_wait)
    monkeypatch.setattr(np, "save", slow_save)
    errors, results = [], {}

    def run(lst):
        try:
            results[threading.current_thread().name] = preprocess(lst, cache, num_workers=1)
        except Exception as err:  # collected for the assertion below
            errors.append(err)

    threads = [threading.Thread(target=run, args=(first,), name="first"),
               threading.Thread(target=run, args=(second,), name="second")]
    threads[0].start()
    assert building.wait(10)
    threads[1].start()
    for thread in threads:
        thread.join(30)
    assert errors == []
    assert [c.name for c in results["first"]] == ["Brats18_A", "Brats18_C"]
    assert [c.name for c in results["second"]] == ["Brats18_A"]
    # the second waited for the case's lock and re-used what the first built: it read no source
    assert read_by == ["first", "first"]


def test_an_unreadable_source_is_named(dataset):
    # A case folder whose file is a symlink into a disk that is not mounted, or a folder.
    data, lst, cache = dataset
    path = part_path(data / "Brats18_A", "t2")
    path.unlink()
    path.symlink_to(data / "not-mounted" / path.name)
    with pytest.raises(CaseError, match="unreadable source file") as info:
        preprocess(lst, cache, num_workers=1)
    assert (info.value.case, info.value.path) == ("Brats18_A", path)
    path.unlink()
    path.mkdir()
    with pytest.raises(CaseError, match=r"unreadable source file \(a folder, not a file\)"):
        preprocess(lst, cache, num_workers=1)


def test_a_full_disk_while_writing_the_arrays_is_named(dataset, monkeypatch):
    # /dev/full fails every write with ENOSPC, as a full disk does; numpy's own tofile reported
    # it without an errno ('N requested and M written'), which read as a bug.
    data, lst, cache = dataset
    monkeypatch.setattr(utils.io, "open", lambda path, mode, *a: open(  # writes only: hashing reads
        "/dev/full" if "w" in mode else path, mode, *a), raising=False)
    with pytest.raises(DiskFullError) as info:
        preprocess(lst, cache, num_workers=1)
    assert str(info.value) == (f"no space left on device while writing {cache / 'Brats18_A' / 'image.npy'}; "
                               "nothing was written; free some space and run again")
    assert not [p for p in cache.rglob("*") if p.is_file() and p.name != ".lock"]


def test_the_arrays_are_npy_files(dataset):
    data, lst, cache = dataset
    cases = preprocess(lst, cache, num_workers=1)
    for case in cases[:2]:
        folder = cache / case.name
        np.testing.assert_array_equal(np.load(folder / "image.npy"), case.raw)
        np.testing.assert_array_equal(np.load(folder / "label.npy"), case.label)


def test_a_touched_source_on_a_full_disk_keeps_its_cache(dataset, monkeypatch):
    # Recording a touched file's new stat only saves hashing it again next time.
    data, lst, cache = dataset
    preprocess(lst, cache, num_workers=1)
    path = part_path(data / "Brats18_A", "flair")
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    before = mtimes(cache)

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(preprocess_module, "write_text", full)
    cases = preprocess(lst, cache, num_workers=1)
    assert mtimes(cache) == before and [c.name for c in cases] == ["Brats18_A", "BraTS-GLI-00002-000", "Brats18_C"]


def test_a_truncated_array_is_named_once(dataset):
    data, lst, cache = dataset
    preprocess(lst, cache, num_workers=1)
    path = cache / "Brats18_A" / "image.npy"
    with open(path, "r+b") as f:
        f.truncate(1000)
    with pytest.raises(CaseError) as info:
        load_cached(cache, "Brats18_A")
    assert str(info.value).count(str(path)) == 1
    assert str(info.value).startswith(f"case Brats18_A: {path}: 1000 bytes, expected ")


def test_cli_errors_are_one_line(dataset):
    data, lst, cache = dataset
    part_path(data / "Brats18_A", "t2").unlink()
    run = subprocess.run([sys.executable, "-m", "datasets.preprocess", "--data_list", str(lst),
                          "--cache_dir", str(cache), "--num_workers", "1"],
                         cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 1
    assert run.stderr.splitlines()[-1].startswith("error: case Brats18_A: ")
    assert "Traceback" not in run.stderr and "missing t2 file" in run.stderr


def test_a_placeholder_is_told_to_be_dropped_from_the_training_list(dataset):
    # eval.py and predict.py drop an all-zero modality file; training needs all four
    data, lst, cache = dataset
    t2 = part_path(data / "Brats18_A", "t2")
    save(np.zeros_like(make_volumes()["t2"]), t2)
    with pytest.raises(CaseError) as info:
        preprocess(lst, cache, num_workers=1)
    assert str(info.value) == (
        f"case Brats18_A: {t2}: cannot normalise: every voxel is 0: an empty volume, such as the "
        "placeholder of a missing modality; training needs all four modalities: drop the case "
        "from the list (eval.py and predict.py read the case without it)")


def test_cli_names_a_spike_beyond_the_histogram_bound(dataset):
    data, lst, cache = dataset
    flair = part_path(data / "Brats18_A", "flair")
    volume = make_volumes(seed=1)["flair"].astype(np.float32)
    volume[8, 8, 8] = 3e7  # one voxel: 3e7 one-unit bins, more than the 2**24 allowed
    save(volume, flair)
    run = subprocess.run([sys.executable, "-m", "datasets.preprocess", "--data_list", str(lst),
                          "--cache_dir", str(cache), "--num_workers", "1"],
                         cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert run.stderr.splitlines()[-1] == (
        f"error: case Brats18_A: {flair}: cannot normalise: volume maximum 30000000 is above "
        "16777216 (2**24), the most one-unit histogram bins allowed: a stray bright voxel, or "
        "intensities not on the scanner's scale? Check the file, or rescale it to the scanner's "
        "range (BraTS: int16)")
    assert not (cache / "Brats18_A" / "meta.json").exists()


def test_an_array_edited_in_place_at_the_same_size_is_rebuilt(dataset, capsys):
    # Its size, dtype and shape still check out; its record (stat, SHA-256) does not.
    data, lst, cache = dataset
    preprocess(lst, cache, num_workers=1)
    path = cache / "Brats18_A" / "image.npy"
    before = path.stat()
    with open(path, "r+b") as f:
        f.seek(200)
        f.write(bytes(1000))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    capsys.readouterr()
    cases = preprocess(lst, cache, num_workers=1)
    assert (f"case Brats18_A: {path}: changed since it was written (content differs from its "
            "record); rebuilt") in capsys.readouterr().err
    case = load_case(data / "Brats18_A")
    assert same_bits(cases[0].normalized(), normalize_image(case.image, normalize_published))


def test_a_cache_without_array_records_is_recorded_not_rebuilt(dataset, monkeypatch):
    # Written before meta.json recorded its arrays: their records are taken on the next run,
    # the arrays are kept.
    data, lst, cache = dataset
    preprocess(lst, cache, num_workers=1)
    meta_path = cache / "Brats18_A" / "meta.json"
    meta = json.loads(meta_path.read_text())
    recorded = meta.pop("arrays")
    meta_path.write_text(json.dumps(meta))
    before = mtimes(cache)
    preprocess(lst, cache, num_workers=1)
    assert json.loads(meta_path.read_text())["arrays"] == recorded
    changed = {p for p in mtimes(cache) if mtimes(cache)[p] != before[p]}
    assert changed == {Path("Brats18_A/meta.json")}


def rebuild_between_check_and_open(monkeypatch, other_case):
    """Simulate another process sharing the cache: once this preprocess has checked or built its
    cases, that process rebuilds the first case's cache from `other_case` before it is opened."""
    real_run = preprocess_module._run

    def run_then_rebuild(jobs, *args):
        real_run(jobs, *args)
        case_cache = jobs[0][1]
        (case_cache / "meta.json").unlink()  # rebuilt, not only re-recorded, whatever its sources
        assert preprocess_module._process((other_case, case_cache, False))[1] == ""

    monkeypatch.setattr(preprocess_module, "_run", run_then_rebuild)


@pytest.mark.parametrize("reused", [True, False])
def test_a_case_rebuilt_meanwhile_from_other_sources_is_refused(dataset, monkeypatch, reused):
    """Two datasets with the same case names in one cache folder: this process must not return
    the other's arrays, whether it re-used its case or built it."""
    data, lst, cache = dataset
    if reused:
        preprocess(lst, cache, num_workers=1)
    other, _ = write_case(data.parent / "other", "Brats18_A", seed=9)
    rebuild_between_check_and_open(monkeypatch, other)
    with pytest.raises(CaseError) as info:
        preprocess(lst, cache, num_workers=1)
    message = str(info.value)
    assert info.value.case == "Brats18_A" and info.value.path == cache / "Brats18_A"
    assert "\n" not in message and "another process" in message and "--cache_dir" in message
    assert str(other.resolve()) in message  # the other dataset's files are named


def test_a_case_rebuilt_meanwhile_from_the_same_content_is_used(dataset, monkeypatch):
    """Another process with a copy of the same data (other paths, same content) rebuilt the
    case: its arrays are this list's, so preprocess carries on."""
    data, lst, cache = dataset
    copy = data.parent / "copy" / "Brats18_A"
    copy.mkdir(parents=True)
    for path in (data / "Brats18_A").iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    rebuild_between_check_and_open(monkeypatch, copy)
    cases = preprocess(lst, cache, num_workers=1)
    assert cases[0].meta["sources"]["flair"]["path"] == str(part_path(copy, "flair").resolve())
    np.testing.assert_array_equal(cases[0].full_label(), load_case(data / "Brats18_A").label)


def test_cached_arrays_are_opened_under_the_case_lock(dataset, monkeypatch):
    """Else another writer could replace the arrays between reading meta.json and them."""
    _, lst, cache = dataset
    preprocess(lst, cache, num_workers=1)
    real_load, opened = np.load, []

    def load_under_lock(path, *args, **kwargs):
        with pytest.raises(LockError):  # held by preprocess: this second open file cannot take it
            with exclusive_lock(Path(path).parent, wait=False):
                pass
        opened.append(Path(path).name)
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(np, "load", load_under_lock)
    preprocess(lst, cache, num_workers=1)
    assert opened.count("image.npy") == 2 * 3  # checked for re-use, then opened, each case
