"""Preprocessing cache: contents, memory mapping, re-use, invalidation, errors, CLI."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_brats import make_volumes, part_path, save, write_case

from datasets.brats import CaseError, load_case
from datasets.normalize import normalize_image, normalize_published
from datasets.preprocess import header_from_meta, load_cached, main, preprocess


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
    return {p.relative_to(cache): p.stat().st_mtime_ns for p in cache.rglob("*") if p.is_file()}


def test_cache_contents(dataset):
    data, lst, cache = dataset
    cases = preprocess(lst, cache, num_workers=1)
    assert [c.name for c in cases] == ["Brats18_A", "BraTS-GLI-00002-000", "Brats18_C"]
    for cached in cases:
        case = load_case(data / cached.name)
        assert isinstance(cached.image, np.memmap) and cached.image.dtype == np.float32
        np.testing.assert_array_equal(cached.image, normalize_image(case.image, normalize_published))
        if case.label is None:
            assert cached.label is None and not (cache / cached.name / "label.npy").exists()
        else:
            assert isinstance(cached.label, np.memmap) and cached.label.dtype == np.uint8
            np.testing.assert_array_equal(cached.label, case.label)
        meta = cached.meta
        assert meta["shape_xyz"] == list(case.shape_xyz) and meta["spacing"] == list(case.spacing)
        np.testing.assert_array_equal(meta["affine"], case.affine)
        assert header_from_meta(meta).get_data_shape() == case.shape_xyz
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
    old = np.array(cases[0].image[2])
    vol = make_volumes(seed=9)["t1ce"]
    save(vol, part_path(data / "Brats18_A", "t1ce"))
    cases = preprocess(lst, cache, num_workers=1)
    after = mtimes(cache)
    changed = {str(p.parent) for p in after if after[p] != before[p]}
    assert changed == {"Brats18_A"}
    assert not np.array_equal(cases[0].image[2], old)
    np.testing.assert_array_equal(cases[0].image[2], normalize_published(vol.transpose(2, 0, 1)))

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
    # A constant modality, which the published normalisation cannot handle (every voxel
    # equals the corner value after clipping), and a truncated file.
    constant = part_path(data / "Brats18_A", "t1")
    save(np.ones((24, 20, 16), np.int16), constant)
    corrupt = part_path(data / "Brats18_C", "flair")
    corrupt.write_bytes(corrupt.read_bytes()[:100])
    for case, path, problem in (("Brats18_A", constant, "every voxel equals the corner"),
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
