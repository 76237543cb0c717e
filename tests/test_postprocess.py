"""postprocess.py: the published rules on small label maps, and the script on a tmp folder."""
import gzip
import hashlib
import itertools
import os
import shutil
import signal
import subprocess
import sys
from concurrent.futures.process import BrokenProcessPool
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import eval as evaluate
import postprocess
from datasets.brats import CaseError, DataError
from utils.cli import UsageError
from utils.io import NotWritableError
from utils.postprocessing import (Rules, postprocess_label, relabel_small_et, remove_components,
                                   three_means)

SHAPE = (20, 20, 40)  # (X, Y, Z) NIfTI order; z = slice axis


def _cube(label, corner, side, value):
    x, y, z = corner
    label[x:x + side, y:y + side, z:z + side] = value


def test_small_component_removed_large_kept():
    label = np.zeros(SHAPE, np.uint8)
    _cube(label, (1, 1, 30), 6, 2)  # 216 voxels: the largest
    _cube(label, (12, 12, 30), 3, 2)  # 27 voxels >= 0.1 * 216 = 21.6: kept
    _cube(label, (12, 1, 30), 2, 1)  # 8 voxels < 21.6: removed
    rules = Rules(min_component=2000, min_fraction=0.1, bottom_slices=0)
    cleaned, removed = remove_components(label, rules)
    assert removed == 1
    assert (cleaned[12:14, 1:3, 30:32] == 0).all()
    np.testing.assert_array_equal(cleaned[:, :, :30], label[:, :, :30])
    assert (cleaned > 0).sum() == 216 + 27


def test_min_component_caps_the_fraction_threshold():
    label = np.zeros(SHAPE, np.uint8)
    _cube(label, (1, 1, 20), 10, 2)  # 1000 voxels; 0.5 * 1000 = 500 > min_component 100
    _cube(label, (14, 14, 20), 5, 2)  # 125 voxels: kept because 125 >= min(100, 500)
    _cube(label, (14, 1, 20), 4, 2)  # 64 voxels: removed
    cleaned, removed = remove_components(label, Rules(min_component=100, min_fraction=0.5, bottom_slices=0))
    assert removed == 1 and (cleaned > 0).sum() == 1000 + 125


def test_components_are_face_connected_as_published():
    label = np.zeros(SHAPE, np.uint8)
    _cube(label, (1, 1, 30), 6, 2)
    label[7, 7, 36] = 1  # touches the cube by a corner only: its own (small) component
    label[7, 3, 33] = 1  # shares a face with the cube: part of it
    cleaned, removed = remove_components(label, Rules(min_fraction=0.5, bottom_slices=0))
    assert removed == 1 and cleaned[7, 7, 36] == 0 and cleaned[7, 3, 33] == 1


def test_component_entirely_in_bottom_slices_removed():
    label = np.zeros(SHAPE, np.uint8)
    _cube(label, (1, 1, 30), 5, 2)  # 125 voxels, above the bottom slices
    _cube(label, (10, 10, 0), 5, 2)  # 125 voxels in z 0..4: entirely in the lowest 5 -> removed
    _cube(label, (10, 1, 3), 5, 1)  # z 3..7: reaches above the lowest 5 -> kept
    cleaned, removed = remove_components(label, Rules(min_component=1, bottom_slices=5))
    assert removed == 1
    assert (cleaned[10:15, 10:15, 0:5] == 0).all()
    assert (cleaned[10:15, 1:6, 3:8] == 1).all() and (cleaned[1:6, 1:6, 30:35] == 2).all()


def test_et_relabelled_below_threshold_kept_above():
    label = np.zeros(SHAPE, np.uint8)
    _cube(label, (1, 1, 30), 6, 2)
    _cube(label, (2, 2, 31), 3, 4)  # 27 ET voxels
    small, changed = relabel_small_et(label, Rules(et_threshold=28))
    assert changed and not (small == 4).any() and (small == 1).sum() == 27
    assert ((small > 0) == (label > 0)).all()
    kept, changed = relabel_small_et(label, Rules(et_threshold=27))  # 27 is not fewer than 27
    assert not changed
    np.testing.assert_array_equal(kept, label)


def test_published_defaults_on_a_full_case():
    label = np.zeros((60, 60, 60), np.uint8)
    _cube(label, (10, 10, 30), 20, 2)  # 8000 voxels
    _cube(label, (15, 15, 35), 7, 4)  # 343 ET voxels < 500 -> NCR
    _cube(label, (45, 45, 40), 5, 2)  # 125 < min(2000, 800) -> removed
    cleaned, info = postprocess_label(label)
    assert info == {"components_removed": 1, "necrosis_relabelled": 0, "et_relabelled": True,
                    "warnings": []}
    assert (cleaned == 1).sum() == 343 and (cleaned == 2).sum() == 8000 - 343


def _write(path, label, affine):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(label, affine), str(path))


def _hashes(folder):
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_script_end_to_end_with_subset_folders(tmp_path):
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])
    affine[:3, 3] = [10.0, 20.0, -5.0]
    label = np.zeros((40, 40, 40), np.uint8)
    _cube(label, (5, 5, 30), 8, 2)  # 512 voxels
    _cube(label, (30, 30, 30), 3, 2)  # 27 < 51.2 -> removed
    _cube(label, (6, 6, 31), 3, 4)  # 27 ET voxels < 500 -> NCR
    inp, out = tmp_path / "eval", tmp_path / "post"
    for subset in ("flair", "flair+t1ce"):
        for case in ("Brats18_A", "Brats18_B"):
            _write(inp / subset / f"{case}.nii.gz", label, affine)
    before = _hashes(inp)

    infos = postprocess.main(["--input_dir", str(inp), "--output_dir", str(out), "--num_workers", "2"])

    assert _hashes(inp) == before  # input untouched
    assert len(infos) == 4 and all(i["components_removed"] == 1 and i["et_relabelled"] for i in infos)
    outputs = sorted(p.relative_to(out) for p in out.rglob("*.nii.gz"))
    assert outputs == sorted(p.relative_to(inp) for p in inp.rglob("*.nii.gz"))
    result = nib.load(str(out / "flair+t1ce" / "Brats18_A.nii.gz"))
    np.testing.assert_array_equal(result.affine, affine)
    data = np.asanyarray(result.dataobj)
    assert data.shape == label.shape and data.dtype == np.uint8
    expected, _ = postprocess_label(label)
    np.testing.assert_array_equal(data, expected)


@pytest.mark.parametrize("workers", ["0", "1"])  # as datasets.preprocess: both in this process
def test_script_flat_folder_in_process(tmp_path, monkeypatch, workers):
    monkeypatch.setattr(postprocess, "worker_pool", None)  # calling it fails
    label = np.zeros((30, 30, 30), np.uint8)
    _cube(label, (5, 5, 2), 4, 2)  # entirely in the lowest 25 slices -> removed
    for case in ("case", "other"):
        _write(tmp_path / "in" / f"{case}.nii.gz", label, np.eye(4))
    postprocess.main(["--input_dir", str(tmp_path / "in"), "--output_dir", str(tmp_path / "out"),
                      "--num_workers", workers])
    assert not np.asanyarray(nib.load(str(tmp_path / "out" / "case.nii.gz")).dataobj).any()


def test_et_label_3_writes_brats_2023_labels_after_the_rules(tmp_path):
    # BraTS 2023's scorer reads ET as 3. The rules run on the 2018 labels first: a small ET is
    # still relabelled as NCR (1), a large one is written as 3.
    small, large = np.zeros((30, 30, 60), np.uint8), np.zeros((30, 30, 60), np.uint8)
    for label, et_side in ((small, 3), (large, 9)):  # above the lowest 25 slices
        _cube(label, (2, 2, 35), 14, 2)
        _cube(label, (4, 4, 37), et_side, 4)  # 27 ET voxels (< 500 -> NCR) or 729 (kept)
        _cube(label, (13, 13, 42), 2, 1)
    _write(tmp_path / "in" / "small.nii.gz", small, np.eye(4))
    _write(tmp_path / "in" / "large.nii.gz", large, np.eye(4))
    postprocess.main(["--input_dir", str(tmp_path / "in"), "--output_dir", str(tmp_path / "out"),
                      "--num_workers", "0", "--et_label", "3", "--min_component", "1"])
    written = {name: np.asanyarray(nib.load(str(tmp_path / "out" / f"{name}.nii.gz")).dataobj)
               for name in ("small", "large")}
    expected = small.copy()
    expected[expected == 4] = 1
    np.testing.assert_array_equal(written["small"], expected)
    expected = large.copy()
    expected[expected == 4] = 3
    np.testing.assert_array_equal(written["large"], expected)
    assert (written["large"] == 3).sum() == 729


def test_masks_of_brats_2023_cases_written_with_et_4_are_warned_about(tmp_path, capsys):
    # BraTS 2023's scorer reads ET as 3: the default 4 would score its ET as nothing
    label = np.zeros((30, 30, 60), np.uint8)
    _cube(label, (2, 2, 35), 14, 2)
    _cube(label, (4, 4, 37), 9, 4)
    warning = ("warning: case {} follows BraTS 2023's naming: its online evaluation reads ET "
               "as 3, these masks hold 4; pass --et_label 3 for an upload there (--et_label 4 "
               "keeps 4 without this warning)")
    warnings = lambda: [line for line in capsys.readouterr().err.splitlines()
                        if line.startswith("warning")]  # not the progress bar
    flat = tmp_path / "flat"
    _write(flat / "BraTS-GLI-00002-000.nii.gz", label, np.eye(4))  # told by its name
    # an evaluation: told by the case folder's files, whatever the case's name
    evaluation = tmp_path / "eval"
    _eval_folder(evaluation, ["patient7"], [])
    _write(evaluation / "flair" / "patient7.nii.gz", label, np.eye(4))
    (tmp_path / "data" / "patient7").mkdir(parents=True)
    for suffix in ("t2f", "t1n", "t1c", "t2w"):
        (tmp_path / "data" / "patient7" / f"patient7-{suffix}.nii.gz").write_bytes(b"")
    for inp, case in ((flat, "BraTS-GLI-00002-000"), (evaluation, "patient7")):
        out = tmp_path / f"out_{inp.name}"
        for flags, expected in (([], [warning.format(case)]), (["--et_label", "4"], [])):
            postprocess.main(["--input_dir", str(inp), "--output_dir", str(out), "--num_workers",
                              "0", *flags])
            assert warnings() == expected
            (written,) = out.rglob("*.nii.gz")
            assert np.asanyarray(nib.load(str(written)).dataobj).max() == 4
    # BraTS 2018 names: nothing to say
    _write(tmp_path / "old" / "Brats18_CBICA_AAB_1.nii.gz", label, np.eye(4))
    postprocess.main(["--input_dir", str(tmp_path / "old"), "--output_dir", str(tmp_path / "o"),
                      "--num_workers", "0"])
    assert warnings() == []


def test_output_header_is_a_plain_uint8_mask_with_the_input_geometry(tmp_path):
    # A mask saved by another tool with a display range: the upload must not carry it.
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])
    image = nib.Nifti1Image(np.zeros((30, 30, 30), np.uint8), affine)
    image.header["cal_min"], image.header["cal_max"] = 0, 255
    (tmp_path / "in").mkdir()
    nib.save(image, str(tmp_path / "in" / "case.nii.gz"))
    postprocess.main(["--input_dir", str(tmp_path / "in"), "--output_dir", str(tmp_path / "out"),
                      "--num_workers", "0"])
    out = nib.load(str(tmp_path / "out" / "case.nii.gz"))
    assert (out.header["cal_min"], out.header["cal_max"]) == (0, 0)
    assert out.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(out.affine, affine)


def test_upper_case_extensions_are_masks_as_for_the_inputs(tmp_path):
    label = np.zeros((30, 30, 30), np.uint8)
    _cube(label, (5, 5, 2), 4, 2)
    _write(tmp_path / "mask.nii.gz", label, np.eye(4))
    (tmp_path / "in").mkdir()
    (tmp_path / "mask.nii.gz").rename(tmp_path / "in" / "Case1.NII.GZ")
    infos = postprocess.main(["--input_dir", str(tmp_path / "in"), "--output_dir",
                              str(tmp_path / "out"), "--num_workers", "0"])
    assert [i["components_removed"] for i in infos] == [1]
    assert not np.asanyarray(nib.load(str(tmp_path / "out" / "Case1.NII.GZ")).dataobj).any()


def test_an_output_folder_linked_into_the_input_is_refused(tmp_path):
    _write(tmp_path / "in" / "flair" / "A.nii.gz", np.zeros((8, 8, 8), np.uint8), np.eye(4))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "flair").symlink_to(tmp_path / "in" / "flair")
    before = _hashes(tmp_path / "in")
    with pytest.raises(UsageError, match=r"^--output_dir .*out: .*out/flair leads into --input_dir "
                                         r".*in: the input masks are never overwritten$"):
        postprocess.main(["--input_dir", str(tmp_path / "in"), "--output_dir", str(tmp_path / "out"),
                          "--num_workers", "0"])
    assert _hashes(tmp_path / "in") == before


def test_script_refuses_overlapping_output(tmp_path):
    _write(tmp_path / "in" / "case.nii.gz", np.zeros((4, 4, 4), np.uint8), np.eye(4))
    for target in (tmp_path / "in", tmp_path / "in" / "post", tmp_path):
        with pytest.raises(UsageError, match="must not"):
            postprocess.main(["--input_dir", str(tmp_path / "in"), "--output_dir", str(target)])


def test_bad_labels_and_unreadable_files_name_the_file(tmp_path):
    bad = np.zeros((4, 4, 4), np.uint8)
    bad[0, 0, 0] = 3
    _write(tmp_path / "in" / "bad.nii.gz", bad, np.eye(4))
    with pytest.raises(DataError) as error:
        postprocess.main(["--input_dir", str(tmp_path / "in"), "--output_dir", str(tmp_path / "o1"),
                          "--num_workers", "0"])
    # a mask relabelled for a BraTS 2023 upload: told so, not to rename case files
    assert str(error.value) == (
        f"case bad: {tmp_path / 'in' / 'bad.nii.gz'}: unexpected label values [3]; allowed (0, 1, 2, "
        "4); masks hold BraTS 2018's labels (ET 4), as eval.py writes them: relabel 3 -> 4, or "
        "post-process eval.py's masks (postprocess.py --et_label 3 writes BraTS 2023's labels "
        f"last); {tmp_path / 'o1' / 'bad.nii.gz'} "
        "is not written: replace the file, then run the same command again")
    (tmp_path / "in2").mkdir()
    (tmp_path / "in2" / "broken.nii.gz").write_bytes(b"not a nifti")
    with pytest.raises(DataError, match=r"broken\.nii\.gz"):
        postprocess.main(["--input_dir", str(tmp_path / "in2"), "--output_dir", str(tmp_path / "o2"),
                          "--num_workers", "0"])
    assert not (tmp_path / "o1" / "bad.nii.gz").exists()


def test_defaults_follow_eval_sh(tmp_path, monkeypatch):
    args = postprocess.parse_args([])
    assert args.input_dir == Path("outputs/LCKD") and args.output_dir == Path("outputs/LCKD_postprocessed")
    # ... and plain `python eval.py` (eval.sh's NAME=LCKD)
    assert evaluate.parse_args(["--restore_from", "x.pth"]).output_dir == Path("outputs/LCKD")
    # Plain `python postprocess.py` from the repository root, after `bash eval.sh 0`.
    monkeypatch.chdir(tmp_path)
    _write(tmp_path / "outputs" / "LCKD" / "flair+t1+t1ce+t2" / "Brats18_A.nii.gz",
           np.zeros((4, 4, 4), np.uint8), np.eye(4))
    postprocess.main(["--num_workers", "0"])
    assert (tmp_path / "outputs" / "LCKD_postprocessed" / "flair+t1+t1ce+t2" / "Brats18_A.nii.gz").is_file()


def test_truncated_mask_names_the_file(tmp_path):
    path = tmp_path / "in" / "cut.nii.gz"
    _write(path, np.zeros((20, 20, 20), np.uint8), np.eye(4))
    path.write_bytes(path.read_bytes()[:60])  # gzip stream cut inside the data
    with pytest.raises(DataError, match=r"case cut: .*cut\.nii\.gz: unreadable NIfTI"):
        postprocess.read_mask(path)


def test_a_mask_bad_in_its_header_stops_the_run_before_any_is_written(tmp_path):
    for case in ("A", "B", "C"):
        _write(tmp_path / "in" / f"{case}.nii.gz", np.zeros((8, 8, 8), np.uint8), np.eye(4))
    (tmp_path / "in" / "B.nii.gz").write_bytes(b"")
    with pytest.raises(DataError, match=r"^case B: .*B\.nii\.gz: unreadable NIfTI"):
        postprocess.main(["--input_dir", str(tmp_path / "in"), "--output_dir", str(tmp_path / "out"),
                          "--num_workers", "0"])
    assert not (tmp_path / "out").exists()  # checked before the output folder is made


def test_a_mask_bad_in_its_voxels_leaves_no_mask_of_its_case_not_even_an_earlier_runs(tmp_path):
    label = np.zeros((20, 20, 20), np.uint8)
    for case in ("A", "B", "C"):
        _write(tmp_path / "in" / f"{case}.nii.gz", label, np.eye(4))
    flags = ["--input_dir", str(tmp_path / "in"), "--output_dir", str(tmp_path / "out"),
             "--num_workers", "0"]
    postprocess.main(flags)  # an earlier run: out/ holds A, B and C
    bad = tmp_path / "in" / "B.nii.gz"
    bad.write_bytes(gzip.compress(gzip.decompress(bad.read_bytes())[:-1000]))  # header intact
    with pytest.raises(DataError) as error:
        postprocess.main(flags)
    target = tmp_path / "out" / "B.nii.gz"
    assert str(error.value).startswith(f"case B: {bad}: unreadable NIfTI")
    assert str(error.value).endswith(f"; {target} is not written: replace the file, then run the "
                                     "same command again")
    assert sorted(p.name for p in (tmp_path / "out").glob("*.nii.gz")) == ["A.nii.gz", "C.nii.gz"]


def test_a_folder_in_place_of_an_output_mask_is_refused_before_any_is_written(tmp_path):
    for case in ("Brats18_A", "Brats18_B"):
        _write(tmp_path / "in" / "flair" / f"{case}.nii.gz", np.zeros((4, 4, 4), np.uint8), np.eye(4))
    folder = tmp_path / "out" / "flair" / "Brats18_B.nii.gz"
    folder.mkdir(parents=True)
    with pytest.raises(NotWritableError) as error:
        postprocess.main(["--input_dir", str(tmp_path / "in"), "--output_dir", str(tmp_path / "out"),
                          "--num_workers", "0", "--overwrite"])
    assert str(error.value) == f"cannot write {folder}: it is a folder; remove it, or choose another name"
    assert [p for p in (tmp_path / "out").rglob("*") if p != folder] == [folder.parent]


def _die(job):
    os._exit(1)  # a worker killed (e.g. by the out-of-memory killer) mid-case


def test_dead_worker_raises_instead_of_hanging(tmp_path, monkeypatch):
    for name in ("a", "b"):
        _write(tmp_path / "in" / f"{name}.nii.gz", np.zeros((8, 8, 8), np.uint8), np.eye(4))
    monkeypatch.setattr(postprocess, "process_file", _die)
    signal.signal(signal.SIGALRM, lambda *_: pytest.fail("postprocess hung on a dead worker"))
    signal.alarm(60)
    try:
        with pytest.raises(BrokenProcessPool):
            postprocess.main(["--input_dir", str(tmp_path / "in"), "--output_dir",
                              str(tmp_path / "out"), "--num_workers", "2"])
    finally:
        signal.alarm(0)


# ------------------------------------------------------------- thin volumes, all tumour removed
def test_a_volume_too_thin_for_the_bottom_rule_keeps_its_tumour_with_a_warning():
    label = np.zeros((20, 20, 25), np.uint8)  # 25 slices: all of them are "the lowest 25"
    _cube(label, (5, 5, 10), 5, 2)
    cleaned, info = postprocess_label(label, Rules(min_component=1), name="case.nii.gz")
    np.testing.assert_array_equal(cleaned, label)
    assert info["components_removed"] == 0
    assert info["warnings"] == ["case.nii.gz: 25 slices, not more than the 25 bottom slices: the "
                                "bottom-slice rule is skipped (it would remove every component)"]
    label = np.zeros((20, 20, 26), np.uint8)  # one slice more: the rule applies again
    _cube(label, (5, 5, 10), 5, 2)
    cleaned, info = postprocess_label(label, Rules(min_component=1))
    assert not cleaned.any() and info["components_removed"] == 1


def test_removing_all_tumour_is_never_silent(tmp_path, capsys):
    label = np.zeros((30, 30, 30), np.uint8)
    _cube(label, (5, 5, 2), 4, 2)  # entirely in the lowest 25 slices
    cleaned, info = postprocess_label(label, name="case.nii.gz")
    assert not cleaned.any()
    assert info["warnings"] == ["case.nii.gz: all 64 tumour voxels removed (1 component(s) too "
                                "small or in the lowest 25 slices)"]
    _write(tmp_path / "in" / "flair" / "Brats18_A.nii.gz", label, np.eye(4))
    postprocess.main(["--input_dir", str(tmp_path / "in"), "--output_dir", str(tmp_path / "out"),
                      "--num_workers", "0"])
    assert "warning: flair/Brats18_A.nii.gz: all 64 tumour voxels removed" in capsys.readouterr().err


# ------------------------------------------------------------------------- the K-means rule
NO_DROPS = Rules(min_component=1, bottom_slices=0, et_threshold=0)  # only the K-means rule acts


def kmeans_case(et=2, ncr=0):
    """One 6x6x6 tumour component: `ncr` NCR and `et` ET voxels in its first row, the rest
    edema, whose T1ce is 50 (20 voxels), 300 (100 voxels) or 700 (the rest); T1ce is 0
    elsewhere. -> (label, t1ce, edema values)"""
    label = np.zeros(SHAPE, np.uint8)
    _cube(label, (2, 2, 30), 6, 2)
    row = label[2, 2, 30:36]  # a view: 6 voxels
    row[:ncr] = 1
    row[ncr:ncr + et] = 4
    t1ce = np.zeros(SHAPE, np.float32)
    edema = label == 2
    values = np.full(edema.sum(), 700.0)
    values[:20], values[20:120] = 50, 300
    t1ce[edema] = values
    return label, t1ce


def optimal_partition(values, weights, k=3):
    """Brute force over every assignment of the values to k non-empty clusters: the one with
    the least weighted squared error (k-means' global optimum) -> k sets, by increasing values."""
    best = None
    for assignment in itertools.product(range(k), repeat=len(values)):
        assignment = np.array(assignment)
        if len(set(assignment.tolist())) < k:
            continue
        error = sum(np.sum(weights[g] * (values[g] - np.average(values[g], weights=weights[g])) ** 2)
                    for g in (assignment == c for c in range(k)))
        if best is None or error < best[0]:
            best = (error, sorted((set(values[assignment == c].tolist()) for c in range(k)), key=min))
    return best[1]


def test_kmeans_relabels_the_middle_group_of_the_zero_filled_volume():
    label, t1ce = kmeans_case()
    # The released script clusters the whole volume, every voxel but the component's edema
    # set to 0 (15 786 zeros). By hand: with so many zeros the darkest edema (50) joins them,
    # 300 and 700 get their own clusters, and the middle one (300) becomes necrosis.
    values = np.array([0.0, 50, 300, 700])
    weights = np.array([label.size - 214, 20, 100, 94])
    groups = optimal_partition(values, weights)
    assert groups == [{0.0, 50.0}, {300.0}, {700.0}]
    cleaned, info = postprocess_label(label, NO_DROPS, t1ce=t1ce)
    expected = label.copy()
    expected[(label == 2) & (t1ce == 300)] = 1
    np.testing.assert_array_equal(cleaned, expected)
    assert info["necrosis_relabelled"] == 100


def test_three_means_is_the_optimum():
    rng = np.random.default_rng(1)
    for trial in range(40):
        values = np.unique(rng.integers(0, 2000, rng.integers(3, 8))).astype(float)
        if len(values) < 3:
            continue
        weights = rng.integers(1, 50, len(values)).astype(float)
        if trial % 2:
            weights[0] = 1e5  # like the released script's zero-filled volume
        i, j = three_means(values, weights)
        groups = [set(values[:i].tolist()), set(values[i:j].tolist()), set(values[j:].tolist())]
        assert groups == optimal_partition(values, weights)


def test_three_means_is_the_best_of_every_pair_of_splits_on_many_values():
    # three_means halves the range of first splits (more than 32 values): checked against the
    # error of every pair of splits, each run's error computed from its definition
    rng = np.random.default_rng(2)
    for trial, n in enumerate([40, 75, 150, 150, 300]):
        values = np.unique(np.concatenate([rng.normal(m, s, n // 3) for m, s in ((0, 1), (6, 3), (9, 0.5))]))
        weights = rng.integers(1, 50, len(values)).astype(float)
        if trial % 2:
            weights[0] = 1e5
        n = len(values)
        run = {(a, b): np.sum(weights[a:b] * (values[a:b] - np.average(values[a:b], weights=weights[a:b])) ** 2)
               for a in range(n) for b in range(a + 1, n + 1)}
        error = {(i, j): run[0, i] + run[i, j] + run[j, n] for i in range(1, n - 1) for j in range(i + 1, n)}
        best = min(error.values())
        i, j = three_means(values, weights)
        assert error[i, j] == pytest.approx(best, rel=1e-9, abs=1e-9)
        near = [pair for pair, e in error.items() if e <= best * (1 + 1e-9) + 1e-9]
        assert (i, j) == min(near), near  # the first of the best, as documented


@pytest.mark.parametrize("case, rules, fires", [
    (dict(), NO_DROPS, True),
    # the component's ET share as published, 4 nET / (nNCR + 2 nED + 4 nET), below 0.05:
    (dict(et=5), NO_DROPS, True),  # 20 / (2 * 211 + 20) = 0.045
    (dict(et=6), NO_DROPS, False),  # 24 / (2 * 210 + 24) = 0.054
    # the case's ET / tumour voxels below kmeans_case_et_ratio (2 / 216 here)
    (dict(), replace(NO_DROPS, kmeans_case_et_ratio=2 / 216), False),
    (dict(), replace(NO_DROPS, kmeans_case_et_ratio=2 / 216 + 1e-9), True),
    # 4 nET below kmeans_et_value_sum (8 here)
    (dict(), replace(NO_DROPS, kmeans_et_value_sum=8), False),
    (dict(), replace(NO_DROPS, kmeans_et_value_sum=9), True),
    # NCR voxels of the case below kmeans_max_ncr (3 here)
    (dict(ncr=3), replace(NO_DROPS, kmeans_max_ncr=3), False),
    (dict(ncr=3), replace(NO_DROPS, kmeans_max_ncr=4), True),
])
def test_kmeans_trigger(case, rules, fires):
    label, t1ce = kmeans_case(**case)
    cleaned, info = postprocess_label(label, rules, t1ce=t1ce)
    assert (info["necrosis_relabelled"] > 0) == fires
    without, _ = postprocess_label(label, rules)
    assert np.array_equal(cleaned, without) != fires


def test_published_defaults_of_the_kmeans_trigger():
    rules = Rules()
    assert (rules.kmeans_case_et_ratio, rules.kmeans_component_et_share, rules.kmeans_et_value_sum,
            rules.kmeans_max_ncr) == (0.12, 0.05, 450, 10000)


def test_kmeans_counts_necrosis_as_the_released_loop_does():
    # An earlier component (lower x: labelled first), dropped for its size, holds 8 NCR voxels:
    # the released loop deletes it before visiting the tumour, so the case's NCR count is 0
    # there, below kmeans_max_ncr = 5, and the rule fires.
    label, t1ce = kmeans_case()
    _cube(label, (0, 14, 10), 2, 1)
    rules = replace(Rules(min_component=10, bottom_slices=0), kmeans_max_ncr=5)
    cleaned, info = postprocess_label(label, rules, t1ce=t1ce)
    assert info["components_removed"] == 1 and info["necrosis_relabelled"] == 100


def test_kmeans_leaves_a_component_without_edema_and_flat_edema_alone():
    # The released script relabels the whole volume as necrosis here (all centres 0).
    label = np.zeros(SHAPE, np.uint8)
    _cube(label, (2, 2, 30), 6, 1)
    label[2, 2, 30:32] = 4  # 8 / (214 + 8) = 0.036 < 0.05: the trigger holds
    t1ce = np.where(label > 0, 400.0, 0.0)
    cleaned, info = postprocess_label(label, NO_DROPS, t1ce=t1ce)
    np.testing.assert_array_equal(cleaned, label)
    assert info["necrosis_relabelled"] == 0 and info["warnings"] == []
    label, t1ce = kmeans_case()
    t1ce[t1ce > 0] = 300  # edema of one intensity: fewer than 3 groups to find
    cleaned, info = postprocess_label(label, NO_DROPS, t1ce=t1ce)
    np.testing.assert_array_equal(cleaned, label)


def _images(folder, case, label, t1ce, with_t1ce=True):
    for modality in ("flair", "t1ce") if with_t1ce else ("flair",):
        volume = t1ce if modality == "t1ce" else (label > 0) * 500.0
        _write(folder / case / f"{case}_{modality}.nii.gz", volume.astype(np.int16), np.eye(4))


def test_script_kmeans_reads_t1ce_only_for_subsets_that_had_it(tmp_path, capsys):
    label, t1ce = kmeans_case()
    images, masks = tmp_path / "data", tmp_path / "eval"
    _images(images, "A", label, t1ce)
    _images(images, "B", label, t1ce, with_t1ce=False)
    _images(images, "C", label, np.zeros_like(t1ce))  # an all-zero T1ce: a missing one
    for path in ("flair/A", "flair+t1ce/A", "available/A", "available/B", "available/C"):
        _write(masks / f"{path}.nii.gz", label, np.eye(4))
    flags = ["--input_dir", str(masks), "--num_workers", "0", "--kmeans_necrosis",
             "--min_component", "1", "--bottom_slices", "0", "--et_threshold", "0"]
    postprocess.main([*flags, "--output_dir", str(tmp_path / "out"), "--images", str(images)])
    out = {p: np.asanyarray(nib.load(tmp_path / "out" / f"{p}.nii.gz").dataobj)
           for p in ("flair/A", "flair+t1ce/A", "available/A", "available/B", "available/C")}
    kmeans, _ = postprocess_label(label, NO_DROPS, t1ce=t1ce)
    plain, _ = postprocess_label(label, NO_DROPS)
    assert not np.array_equal(kmeans, plain)
    for path, expected in {"flair/A": plain, "flair+t1ce/A": kmeans, "available/A": kmeans,
                           "available/B": plain, "available/C": plain}.items():
        np.testing.assert_array_equal(out[path], expected, err_msg=path)
    assert "K-means in 2 mask(s) (3 without T1ce skipped)" in capsys.readouterr().out
    (masks / "available" / "C.nii.gz").unlink()

    # eval.py's cases.csv says where the cases are; a subset with T1ce needs the file
    (masks / "cases.csv").write_text(f"case,folder,available\nA,{images / 'A'},flair+t1ce\n"
                                     f"B,{images / 'B'},flair\n")
    for path in ("flair/B", "flair+t1ce/B"):  # every folder has every listed case
        _write(masks / f"{path}.nii.gz", label, np.eye(4))
    with pytest.raises(CaseError, match=f"case B: {images / 'B' / 'B_t1ce.nii.gz'}: missing t1ce"):
        postprocess.main([*flags, "--output_dir", str(tmp_path / "out2")])
    _images(images, "B", label, t1ce)
    postprocess.main([*flags, "--output_dir", str(tmp_path / "out3")])
    np.testing.assert_array_equal(
        np.asanyarray(nib.load(tmp_path / "out3" / "flair+t1ce" / "A.nii.gz").dataobj), kmeans)
    # B's mask in 'available' was predicted from FLAIR alone (cases.csv), whatever its folder
    # holds now: no K-means rule
    np.testing.assert_array_equal(
        np.asanyarray(nib.load(tmp_path / "out3" / "available" / "B.nii.gz").dataobj), plain)
    (masks / "cases.csv").unlink()
    with pytest.raises(UsageError, match="pass --images"):
        postprocess.main([*flags, "--output_dir", str(tmp_path / "out4")])


def test_a_t1ce_of_another_shape_than_its_mask_blames_images_before_anything_is_written(tmp_path):
    # --images pointing at another dataset: the T1ce is not this mask's case's, the mask is fine
    label, t1ce = kmeans_case()
    images, masks, out = tmp_path / "other", tmp_path / "eval", tmp_path / "out"
    _images(images, "A", label[:, :, :30], t1ce[:, :, :30])
    _write(masks / "flair+t1ce" / "A.nii.gz", label, np.eye(4))
    with pytest.raises(UsageError) as error:
        postprocess.main(["--input_dir", str(masks), "--output_dir", str(out), "--num_workers", "0",
                          "--kmeans_necrosis", "--images", str(images)])
    assert str(error.value) == (
        f"--images {images}: its T1ce {images / 'A' / 'A_t1ce.nii.gz'} has shape "
        f"{SHAPE[:2] + (30,)}, not the shape {SHAPE} of the mask flair+t1ce/A.nii.gz: another "
        "dataset's case? Check --images (the folder of these masks' case folders)")
    assert not out.exists()


def test_masks_of_an_earlier_run_are_refused_or_deleted_never_uploaded_with_the_new(tmp_path, capsys):
    # The output folder is what gets zipped for the upload: an earlier run's other cases or
    # subsets must not stay among the new masks.
    label = np.zeros((30, 30, 30), np.uint8)
    _cube(label, (5, 5, 10), 8, 2)
    inp, out = tmp_path / "eval", tmp_path / "post"
    for path in ("flair/A", "flair/B", "t1/A"):
        _write(inp / f"{path}.nii.gz", label, np.eye(4))
    flags = ["--input_dir", str(inp), "--output_dir", str(out), "--num_workers", "0"]
    postprocess.main(flags)
    postprocess.main(flags)  # the same run again: it replaces exactly its own masks
    (inp / "flair" / "B.nii.gz").unlink()
    (inp / "t1").rename(inp / "t2")
    (out / "t1" / "mine.txt").write_text("mine")
    (out / "notes.txt").write_text("mine")
    before = _hashes(out)
    with pytest.raises(UsageError, match=r"--output_dir \S+ holds 2 mask\(s\) that this run does "
                                         r"not write \(e\.g\. flair/B\.nii\.gz\), from an earlier run; "
                                         r"--overwrite deletes them"):
        postprocess.main(flags)
    assert _hashes(out) == before  # refused before any write
    postprocess.main([*flags, "--overwrite"])
    assert "--overwrite: deleted 2 mask(s) of an earlier run" in capsys.readouterr().out
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == [
        ".lock", "flair/A.nii.gz", "notes.txt", "t1/mine.txt", "t2/A.nii.gz"]
    (inp / "t2").rename(inp / "t1ce")
    postprocess.main([*flags, "--overwrite"])  # a subset's folder left empty goes with its masks
    assert sorted(p.name for p in out.iterdir()) == [".lock", "flair", "notes.txt", "t1", "t1ce"]


@pytest.mark.parametrize("name", ["Synth_0000_flair", "Synth_0000-t1c", "Synth_0000_T1w",
                                  "Synth_0000_seg"])
def test_a_data_folder_as_output_is_refused_even_with_overwrite(tmp_path, name):
    # Pointed at the dataset, --overwrite would have deleted every scan as an earlier run's mask.
    label = np.zeros((30, 30, 30), np.uint8)
    _cube(label, (5, 5, 10), 8, 2)
    _write(tmp_path / "eval" / "flair" / "A.nii.gz", label, np.eye(4))
    data = tmp_path / "data"
    _write(data / "Synth_0000" / f"{name}.nii.gz", label, np.eye(4))
    before = _hashes(data)
    flags = ["--input_dir", str(tmp_path / "eval"), "--output_dir", str(data), "--num_workers", "0"]
    for overwrite in ([], ["--overwrite"]):
        with pytest.raises(UsageError) as error:
            postprocess.main([*flags, *overwrite])
        assert str(error.value) == (f"--output_dir {data} holds MRI scans or labels, not only masks "
                                    f"(e.g. Synth_0000/{name}.nii.gz): a data folder? Choose "
                                    "another --output_dir")
    (data / ".lock").unlink()  # the output folder's lock, taken before the check
    assert _hashes(data) == before and not (data / "flair").exists()


@pytest.mark.parametrize("record", ["cases.csv", "eval_config.json"])
def test_an_evaluation_folder_as_output_is_refused_even_with_overwrite(tmp_path, record):
    # Its masks are what its metrics.csv scores: post-processed ones in their place would be
    # scored by a later eval.py --resume, and uploaded, as the model's.
    _write(tmp_path / "in" / "flair" / "A.nii.gz", np.full((8, 8, 8), 2, np.uint8), np.eye(4))
    evaluation = tmp_path / "eval"
    _eval_folder(evaluation, ["A"], ["flair/A"])
    if record == "eval_config.json":  # eval.py writes it first: a run stopped right after
        (evaluation / "cases.csv").unlink()
        (evaluation / record).write_text('{"subsets": ["flair"]}')
    before = _hashes(evaluation)
    flags = ["--input_dir", str(tmp_path / "in"), "--output_dir", str(evaluation), "--num_workers", "0"]
    for overwrite in ([], ["--overwrite"]):
        with pytest.raises(UsageError) as error:
            postprocess.main([*flags, *overwrite])
        assert str(error.value) == (f"--output_dir {evaluation} is an eval.py output folder (it "
                                    f"holds {record}): its masks are the evaluation's; choose "
                                    "another --output_dir")
    assert _hashes(evaluation) == before  # not even the lock file


def test_a_data_folder_or_a_folder_of_several_runs_as_input_is_refused(tmp_path):
    # Pointed at the dataset, the scans would be read as masks ("labels outside (0, 1, 2, 4)"
    # and "replace the file"); pointed at outputs/, every run below it would be mixed in one upload.
    label = np.zeros((30, 30, 30), np.uint8)
    _cube(label, (5, 5, 10), 8, 2)
    _write(tmp_path / "data" / "Synth_0000" / "Synth_0000_flair.nii.gz", label, np.eye(4))
    for run in ("LCKD", "val"):
        _write(tmp_path / "outputs" / run / "flair" / "A.nii.gz", label, np.eye(4))
    _write(tmp_path / "outputs" / "demo_predict" / "mask.nii.gz", label, np.eye(4))
    out = tmp_path / "out"
    for given, message in (
            ("data", "holds files named as MRI scans, not masks (e.g. Synth_0000/Synth_0000_flair"
                     ".nii.gz): give eval.py's output folder (outputs/LCKD after eval.sh) or a "
                     "folder of masks only"),
            ("outputs", "holds masks more than one folder down (e.g. LCKD/flair/A.nii.gz), the "
                        f"outputs of several runs? Give one run's folder (e.g. --input_dir "
                        f"{tmp_path / 'outputs' / 'LCKD'})")):
        with pytest.raises(UsageError) as error:
            postprocess.main(["--input_dir", str(tmp_path / given), "--output_dir", str(out),
                              "--num_workers", "0"])
        assert str(error.value) == f"--input_dir {tmp_path / given} {message}"
    assert not out.exists()  # refused before the output folder is made or locked
    postprocess.main(["--input_dir", str(tmp_path / "outputs" / "LCKD"), "--output_dir", str(out),
                      "--num_workers", "0"])
    assert [str(p.relative_to(out)) for p in out.rglob("*.nii.gz")] == ["flair/A.nii.gz"]


def test_a_flat_folder_of_masks_named_like_labels_is_read(tmp_path):
    # masks named <case>_seg in a folder named as the cases begin: no scan, so not a data folder
    label = np.zeros((30, 30, 30), np.uint8)
    _cube(label, (5, 5, 10), 8, 2)
    _write(tmp_path / "BraTS2021" / "BraTS2021_00000_seg.nii.gz", label, np.eye(4))
    postprocess.main(["--input_dir", str(tmp_path / "BraTS2021"), "--output_dir",
                      str(tmp_path / "out"), "--num_workers", "0"])
    assert (tmp_path / "out" / "BraTS2021_00000_seg.nii.gz").is_file()


@pytest.mark.parametrize("stray, beside", [("Synth_0000_seg.nii.gz", "Synth_0000.nii.gz"),
                                           ("flair/Synth_0001-T1w.nii.gz", "flair/Synth_0001.nii.gz")])
def test_a_scan_or_label_beside_its_cases_mask_is_refused_before_anything_is_written(
        tmp_path, stray, beside):
    # Copied into the masks by mistake, a label would be uploaded as a ninth mask of eight cases
    # (its values are labels too), and a scan would stop the run halfway on its values.
    label = np.zeros((30, 30, 30), np.uint8)
    _cube(label, (5, 5, 10), 8, 2)
    masks, out = tmp_path / "masks", tmp_path / "out"
    folder = Path(beside).parent
    for case in ("Synth_0000", "Synth_0001", "Synth_0002"):
        _write(masks / folder / f"{case}.nii.gz", label, np.eye(4))
    _write(masks / stray, label, np.eye(4))
    with pytest.raises(UsageError) as error:
        postprocess.main(["--input_dir", str(masks), "--output_dir", str(out), "--num_workers", "0"])
    assert str(error.value) == (f"--input_dir {masks} holds {stray} beside the mask {beside}: a scan "
                                f"or label of that case, not a mask; move it out of the folder")
    assert not out.exists()
    (masks / stray).unlink()
    postprocess.main(["--input_dir", str(masks), "--output_dir", str(out), "--num_workers", "0"])
    assert len(list(out.rglob("*.nii.gz"))) == 3


def test_files_named_as_scans_or_labels_among_masks_are_refused_before_anything_is_written(tmp_path):
    # A case's files copied in among the masks: the label was uploaded as one more mask, the
    # scan stopped the run on its values after the other masks were written.
    label = np.zeros((30, 30, 30), np.uint8)
    _cube(label, (5, 5, 10), 8, 2)
    masks, out = tmp_path / "masks", tmp_path / "out"
    for name in ("Synth_0000", "Synth_0001", "Synth_0005_seg", "Synth_0005_t1"):
        _write(masks / f"{name}.nii.gz", label, np.eye(4))
    flags = ["--input_dir", str(masks), "--output_dir", str(out), "--num_workers", "0"]
    for stray, message in (
            ("Synth_0005_t1", "holds files named as MRI scans, not masks (e.g. Synth_0005_t1.nii.gz): "
                              "give eval.py's output folder (outputs/LCKD after eval.sh) or a folder "
                              "of masks only"),
            ("Synth_0005_seg", "holds Synth_0005_seg.nii.gz, named as a label, among masks not so "
                               "named (e.g. Synth_0000.nii.gz): a case's label copied in? Move it out "
                               "of the folder")):
        with pytest.raises(UsageError) as error:
            postprocess.main(flags)
        assert str(error.value) == f"--input_dir {masks} {message}"
        assert not out.exists()
        (masks / f"{stray}.nii.gz").unlink()
    # eval.py's masks are its cases' names (cases.csv), whatever they end with
    evaluation = tmp_path / "eval"
    _eval_folder(evaluation, ["Brats18_CBICA_AAB_1", "Sub_T1", "P_seg"],
                 ["flair/Brats18_CBICA_AAB_1", "flair/Sub_T1", "flair/P_seg"])
    assert len(postprocess.main(["--input_dir", str(evaluation), "--output_dir", str(out),
                                 "--num_workers", "0"])) == 3


def test_two_masks_of_one_case_are_refused_naming_both(tmp_path):
    # X.nii and X.nii.gz would both go into the upload folder
    masks, out = tmp_path / "masks", tmp_path / "out"
    for name in ("flair/X.nii", "flair/X.nii.gz", "flair/Y.nii.gz", "t1/X.nii.gz"):
        _write(masks / name, np.zeros((8, 8, 8), np.uint8), np.eye(4))
    with pytest.raises(UsageError) as error:
        postprocess.main(["--input_dir", str(masks), "--output_dir", str(out), "--num_workers", "0"])
    assert str(error.value) == (f"--input_dir {masks} holds flair/X.nii and flair/X.nii.gz, two "
                                "masks of case X: both would be uploaded; keep one of them")
    assert not out.exists()


def test_scan_of_names_the_case_a_file_is_a_scan_or_label_of():
    cases = {"brats18_2013_2_1", "x", "pat"}
    for name, case in (("Brats18_2013_2_1_t1ce.nii.gz", "brats18_2013_2_1"),
                       ("X_T2-FLAIR.nii.gz", "x"), ("x-seg.nii", "x"), ("Pat_ce.nii.gz", "pat"),
                       ("X.nii.gz", None), ("X_mask.nii.gz", None), ("Y_t1.nii.gz", None),
                       ("X_t1.txt", None), ("Brats18_2013_2_1.nii.gz", None)):
        assert postprocess.scan_of(Path("any") / name, cases) == case, name


def test_masks_of_cases_named_like_scans_are_masks():
    # the layout tells a scan (in its case's folder) from a mask (in a subset's, or flat)
    assert postprocess.named_like_a_scan(Path("data/Sub_T1/Sub_T1_flair.nii.gz"))
    for mask in ("out/t1/Sub_T1.nii.gz", "out/flair/site-fl.nii.gz", "out/Pat_ce.nii.gz",
                 "out/available/A_seg.nii.gz"):
        assert not postprocess.named_like_a_scan(Path(mask)), mask


def test_kmeans_finds_cases_whose_names_are_numbers(tmp_path):
    # cases.csv read as text: '007' is not the number 7.
    label, t1ce = kmeans_case()
    images, masks = tmp_path / "data", tmp_path / "eval"
    _images(images, "007", label, t1ce)
    _write(masks / "flair+t1ce" / "007.nii.gz", label, np.eye(4))
    (masks / "cases.csv").write_text(f"case,folder,available\n007,{images / '007'},flair+t1+t1ce+t2\n")
    postprocess.main(["--input_dir", str(masks), "--output_dir", str(tmp_path / "out"),
                      "--num_workers", "0", "--kmeans_necrosis", "--min_component", "1",
                      "--bottom_slices", "0", "--et_threshold", "0"])
    kmeans, _ = postprocess_label(label, NO_DROPS, t1ce=t1ce)
    np.testing.assert_array_equal(
        np.asanyarray(nib.load(tmp_path / "out" / "flair+t1ce" / "007.nii.gz").dataobj), kmeans)


def test_a_negative_worker_count_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        postprocess.parse_args(["--num_workers", "-1"])
    assert exit_.value.code == 2
    assert "--num_workers: must be at least 0, got -1" in capsys.readouterr().err


COUNT, SHARE = "must be at least 0", "must be in [0, 1]"


@pytest.mark.parametrize("flag, bad, allowed, edge", [
    ("--min_component", "-1", COUNT, "0"), ("--bottom_slices", "-1", COUNT, "0"),
    ("--et_threshold", "-5", COUNT, "0"), ("--kmeans_et_value_sum", "-1", COUNT, "0"),
    ("--kmeans_max_ncr", "-1", COUNT, "0"), ("--min_fraction", "2", SHARE, "1"),
    ("--min_fraction", "-0.1", SHARE, "0"), ("--kmeans_case_et_ratio", "1.5", SHARE, "1"),
    ("--kmeans_component_et_share", "-0.01", SHARE, "0")])
def test_a_threshold_out_of_its_range_is_a_usage_error(capsys, flag, bad, allowed, edge):
    # Counts of voxels or slices, or shares: --bottom_slices -1 counted from the top and removed
    # every tumour voxel, --min_fraction 2 dropped even the largest component.
    with pytest.raises(SystemExit) as exit_:
        postprocess.parse_args([flag, bad])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == (f"error: argument {flag}: {allowed}, got {bad} "
                                       "(see postprocess.py --help)\n")
    assert getattr(postprocess.parse_args([flag, edge]), flag[2:]) == int(edge)  # a threshold still


def test_a_kmeans_threshold_without_the_kmeans_rule_is_refused(tmp_path):
    # it would change nothing: the rule is off
    with pytest.raises(UsageError, match=r"^--kmeans_max_ncr is a threshold of the K-means rule: "
                                         r"add --kmeans_necrosis$"):
        postprocess.main(["--input_dir", str(tmp_path), "--kmeans_max_ncr", "5"])


def test_images_without_the_kmeans_rule_is_refused(tmp_path):
    # only the K-means rule reads images: without it --images was silently ignored
    with pytest.raises(UsageError) as error:
        postprocess.main(["--input_dir", str(tmp_path), "--images", str(tmp_path)])
    assert str(error.value) == "--images is where the K-means rule finds T1ce: add --kmeans_necrosis"


# ---------------------------------------------------------- stopped evaluations, stale temporaries
def _eval_folder(folder, cases, masks):
    """An eval.py output folder: cases.csv lists `cases` (written before any mask; their case
    folders in data/ beside it, not written), `masks` the <subset>/<case> written so far."""
    folder.mkdir(parents=True)
    (folder / "cases.csv").write_text("case,folder,available\n" + "".join(
        f"{case},{folder.parent / 'data' / case},flair+t1+t1ce+t2\n" for case in cases))
    for path in masks:
        _write(folder / f"{path}.nii.gz", np.zeros((8, 8, 8), np.uint8), np.eye(4))


def test_a_stopped_evaluation_is_refused_before_anything_is_written(tmp_path):
    # eval.py --mode all stopped after case A: every subset folder lacks B and C.
    inp, out = tmp_path / "eval", tmp_path / "post"
    _eval_folder(inp, ["A", "B", "C"], ["flair/A", "flair+t1ce/A", "available/A"])
    with pytest.raises(UsageError) as error:
        postprocess.main(["--input_dir", str(inp), "--output_dir", str(out), "--num_workers", "0"])
    assert str(error.value) == (
        f"--input_dir {inp} is an evaluation that did not finish: 6 mask(s) of the cases its "
        "cases.csv lists are missing (e.g. available/B.nii.gz); finish it with the same eval.py "
        "command and --resume, then post-process again")
    assert not out.exists()


def test_one_mask_folder_of_a_stopped_evaluation_is_refused_too(tmp_path):
    # The upload zips one subset's folder: post-processing that folder alone skipped the check.
    inp, out = tmp_path / "eval", tmp_path / "post"
    _eval_folder(inp, ["A", "B"], ["flair/A", "flair+t1ce/A", "flair+t1ce/B"])
    with pytest.raises(UsageError) as error:
        postprocess.main(["--input_dir", str(inp / "flair"), "--output_dir", str(out)])
    assert str(error.value) == (
        f"--input_dir {inp / 'flair'} is a mask folder of an evaluation that did not finish: 1 "
        "mask(s) of the cases its cases.csv lists are missing (e.g. flair/B.nii.gz); finish it "
        "with the same eval.py command and --resume, then post-process again")
    assert not out.exists()
    # a folder that holds every case is post-processed; the K-means rule finds the cases
    # through the evaluation's cases.csv (it asked for --images)
    infos = postprocess.main(["--input_dir", str(inp / "flair+t1ce"), "--output_dir", str(out),
                              "--num_workers", "0"])
    assert sorted(Path(i["file"]).name for i in infos) == ["A.nii.gz", "B.nii.gz"]
    with pytest.raises(CaseError, match=f"^case A: {tmp_path / 'data' / 'A'}"):
        postprocess.main(["--input_dir", str(inp / "flair+t1ce"), "--output_dir", str(out),
                          "--kmeans_necrosis", "--overwrite"])


def test_an_evaluations_case_record_is_read_as_text_and_a_damaged_one_is_one_line(tmp_path):
    inp, out = tmp_path / "eval", tmp_path / "post"
    _eval_folder(inp, ["007"], ["flair/007"])  # read as a number, the case would be missing
    assert len(postprocess.main(["--input_dir", str(inp), "--output_dir", str(out),
                                 "--num_workers", "0"])) == 1
    (inp / "cases.csv").write_bytes(b"")  # e.g. a copy cut short
    with pytest.raises(UsageError) as error:
        postprocess.main(["--input_dir", str(inp), "--output_dir", str(tmp_path / "post2")])
    assert str(error.value) == (f"{inp / 'cases.csv'}: cannot read eval.py's record of the cases "
                                "(No columns to parse from file); re-export with eval.sh (or "
                                "eval.py --overwrite)")
    assert not (tmp_path / "post2").exists()


def test_an_evaluation_stopped_in_its_first_case_is_refused_too(tmp_path):
    # eval.py --mode all stopped after writing flair/A: the other subsets' folders do not exist
    # yet, but eval_config.json names them.
    inp, out = tmp_path / "eval", tmp_path / "post"
    _eval_folder(inp, ["A"], ["flair/A"])
    (inp / "eval_config.json").write_text('{"subsets": ["flair", "flair+t1ce"]}')
    with pytest.raises(UsageError, match=r"did not finish: 1 mask\(s\) .* \(e.g. flair\+t1ce/A.nii.gz\)"):
        postprocess.main(["--input_dir", str(inp), "--output_dir", str(out), "--num_workers", "0"])
    (inp / "eval_config.json").write_text('{"subsets": "available"}')  # --mode available
    _write(inp / "available" / "A.nii.gz", np.zeros((8, 8, 8), np.uint8), np.eye(4))
    assert len(postprocess.main(["--input_dir", str(inp), "--output_dir", str(out),
                                 "--num_workers", "0"])) == 2


def test_a_finished_evaluation_of_one_subset_is_post_processed(tmp_path):
    # --mode flair,t1ce writes one folder: the 14 others are not required; figures/ is no masks'.
    inp, out = tmp_path / "eval", tmp_path / "post"
    _eval_folder(inp, ["A", "007"], ["flair+t1ce/A", "flair+t1ce/007"])
    (inp / "figures").mkdir()
    (inp / "figures" / "A.png").write_bytes(b"png")
    infos = postprocess.main(["--input_dir", str(inp), "--output_dir", str(out), "--num_workers", "0"])
    assert len(infos) == 2 and (out / "flair+t1ce" / "007.nii.gz").is_file()


def test_stale_temporaries_in_the_output_folder_are_deleted(tmp_path, capsys):
    inp, out = tmp_path / "in", tmp_path / "out"
    _write(inp / "flair" / "A.nii.gz", np.zeros((8, 8, 8), np.uint8), np.eye(4))
    flags = ["--input_dir", str(inp), "--output_dir", str(out), "--num_workers", "0"]
    postprocess.main(flags)
    # left by killed writes (atomic_path's names), of a mask this run writes and of one it does not
    stale = [out / "flair" / ".A.nii.gz.k3j4.tmp.nii.gz", out / ".Synth_0000.nii.gz.k3j4.tmp.nii.gz"]
    mine = [out / ".notes.tmp", out / "flair" / ".A.nii.gz.k3j4.tmp.npy"]  # not atomic_path's
    for path in stale + mine:
        path.write_bytes(b"partial")
    postprocess.main(flags)
    assert "deleted 2 temporary file(s) left in" in capsys.readouterr().out
    assert not any(p.exists() for p in stale) and all(p.exists() for p in mine)
    stale[0].write_bytes(b"partial")
    postprocess.main([*flags, "--overwrite"])
    assert not stale[0].exists()


def test_a_read_only_output_folder_is_named_as_such(tmp_path):
    # A real read-only mount (a private mount namespace): os.access cannot say why it refuses.
    readonly = tmp_path / "ro"
    readonly.mkdir()
    mount = (f"mount --bind {readonly} {readonly} && mount -o remount,ro,bind {readonly} {readonly}")
    probe = shutil.which("unshare") and subprocess.run(
        ["unshare", "-m", "sh", "-c", f"{mount} && ! touch {readonly}/x"], capture_output=True)
    if not probe or probe.returncode != 0:
        pytest.skip("cannot mount a read-only folder here (needs unshare and mount privileges)")
    _write(tmp_path / "in" / "flair" / "A.nii.gz", np.zeros((8, 8, 8), np.uint8), np.eye(4))
    command = (f"{mount} && exec {sys.executable} postprocess.py --input_dir {tmp_path / 'in'} "
               f"--output_dir {readonly / 'post'} --num_workers 0")
    run = subprocess.run(["unshare", "-m", "sh", "-c", command], capture_output=True, text=True,
                         cwd=Path(postprocess.__file__).parent)
    assert run.returncode != 0
    assert f"cannot write in {readonly / 'post' / 'flair'}: Read-only file system" in run.stderr


# -------------------------------------------- the published thresholds, at their edges
def test_component_of_exactly_the_threshold_is_kept():
    label = np.zeros((40, 40, 40), np.uint8)
    label[1:11, 1:11, 20:30] = 2               # 1000 voxels: threshold min(2000, 100) = 100
    label[20:24, 20:25, 20:25] = 2             # 100 voxels: kept (not < 100)
    label[30:34, 1:6, 20:25] = 2
    label[30, 1, 20] = 0                       # 99 voxels: removed
    cleaned, removed = remove_components(label, Rules(bottom_slices=0))
    assert removed == 1 and (cleaned > 0).sum() == 1100


def test_bottom_rule_is_the_lowest_25_slices_with_defaults():
    label = np.zeros((30, 30, 60), np.uint8)
    label[0:10, 0:10, 0:25] = 2                # z 0..24: entirely in the lowest 25 -> removed
    label[15:25, 0:10, 0:26] = 2               # reaches z = 25 -> kept
    cleaned, info = postprocess_label(label)
    assert info["components_removed"] == 1
    assert not cleaned[0:10, 0:10].any() and (cleaned[15:25, 0:10, 0:26] == 2).all()


def test_published_rule_defaults():
    r = Rules()
    assert (r.min_component, r.min_fraction, r.bottom_slices, r.et_threshold) == (2000, 0.1, 25, 500)


def test_min_component_2000_binds_when_the_largest_is_big():
    label = np.zeros((80, 80, 80), np.uint8)
    label[0:40, 0:40, 30:50] = 2               # 32000 voxels: 10 % = 3200 > 2000
    label[50:70, 0:10, 30:40] = 2              # 2000 voxels: kept
    label[50:70, 20:30, 30:40] = 2
    label[50, 20, 30] = 0                      # 1999: removed
    cleaned, removed = remove_components(label)
    assert removed == 1 and (cleaned > 0).sum() == 34000


def test_min_fraction_10_percent_binds_when_the_largest_is_small():
    label = np.zeros((60, 60, 60), np.uint8)
    label[0:20, 0:20, 30:50] = 2               # 8000: 10 % = 800 < 2000
    label[30:38, 30:40, 30:40] = 2             # 800 kept
    label[45:53, 0:10, 30:40] = 2
    label[45, 0, 30] = 0                       # 799 removed
    cleaned, removed = remove_components(label)
    assert removed == 1 and (cleaned > 0).sum() == 8800


def test_et_499_relabelled_500_kept_with_defaults():
    for n, relabelled in ((499, True), (500, False)):
        label = np.zeros((40, 40, 60), np.uint8)
        label[0:30, 0:30, 30:40] = 2
        label.reshape(-1)[np.flatnonzero(label.reshape(-1) == 2)[:n]] = 4
        _, info = postprocess_label(label)
        assert info["et_relabelled"] is relabelled


SHAPE = (20, 20, 40)
NO_DROPS = Rules(min_component=1, bottom_slices=0, et_threshold=0)


def kmeans_component(label, t1ce, corner, levels=(50, 300, 700), counts=(20, 100)):
    x, y, z = corner
    label[x:x + 6, y:y + 6, z:z + 6] = 2
    label[x, y, z:z + 2] = 4
    edema = np.zeros_like(label, bool)
    edema[x:x + 6, y:y + 6, z:z + 6] = True
    edema &= label == 2
    values = np.full(edema.sum(), float(levels[2]))
    values[:counts[0]], values[counts[0]:counts[0] + counts[1]] = levels[0], levels[1]
    t1ce[edema] = values


def test_kmeans_ncr_count_includes_earlier_relabelling():
    label, t1ce = np.zeros(SHAPE, np.uint8), np.zeros(SHAPE, np.float32)
    kmeans_component(label, t1ce, (2, 2, 30))
    kmeans_component(label, t1ce, (12, 12, 30))
    _, info = postprocess_label(label, replace(NO_DROPS, kmeans_max_ncr=50), t1ce=t1ce)
    assert info["necrosis_relabelled"] == 100   # the second sees 100 NCR >= 50: not 200


def test_kmeans_zeros_weigh_the_whole_volume():
    label, t1ce = np.zeros(SHAPE, np.uint8), np.zeros(SHAPE, np.float32)
    kmeans_component(label, t1ce, (2, 2, 30), levels=(100, 200, 700))
    # whole volume: 15786 zeros, 20 x 100, 100 x 200, 94 x 700 -> {0}, {100, 200}, {700}
    cleaned, info = postprocess_label(label, NO_DROPS, t1ce=t1ce)
    assert info["necrosis_relabelled"] == 120
    assert ((cleaned == 1) == ((label == 2) & (t1ce < 700))).all()


def test_kmeans_case_ratio_is_taken_before_rule_1():
    label, t1ce = np.zeros(SHAPE, np.uint8), np.zeros(SHAPE, np.float32)
    kmeans_component(label, t1ce, (2, 2, 30))
    label[14:18, 14:18, 10:14] = 4   # 64 ET voxels, dropped by rule 1: case ratio 66/280 >= 0.12
    rules = Rules(min_component=100, min_fraction=1.0, bottom_slices=0, et_threshold=0)
    _, info = postprocess_label(label, rules, t1ce=t1ce)
    assert info["components_removed"] == 1 and info["necrosis_relabelled"] == 0


def test_component_et_share_of_exactly_5_percent_does_not_fire():
    label, t1ce = np.zeros(SHAPE, np.uint8), np.zeros(SHAPE, np.float32)
    label[2:7, 2:7, 30:38] = 2                # 200 voxels
    sub = label[2:7, 2:7, 30:38]
    sub[0, 0, 0:5] = 4                        # 5 ET
    sub[4, 4, 3:8] = 0                        # 5 removed (face-connected rest): 190 edema
    edema = label == 2
    values = np.full(edema.sum(), 700.0)
    values[:20], values[20:120] = 50, 300
    t1ce[edema] = values
    assert 4 * 5 / (2 * 190 + 4 * 5) == 0.05
    _, info = postprocess_label(label, NO_DROPS, t1ce=t1ce)
    assert info["necrosis_relabelled"] == 0
