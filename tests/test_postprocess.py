"""postprocess.py: the published rules on small label maps, and the script on a tmp folder."""
import hashlib
import os
import signal
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import postprocess
from datasets.brats import DataError
from postprocess import Rules, postprocess_label, relabel_small_et, remove_components
from utils.user_errors import UsageError

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


def test_script_flat_folder_in_process(tmp_path):
    label = np.zeros((30, 30, 30), np.uint8)
    _cube(label, (5, 5, 2), 4, 2)  # entirely in the lowest 25 slices -> removed
    _write(tmp_path / "in" / "case.nii.gz", label, np.eye(4))
    postprocess.main(["--input_dir", str(tmp_path / "in"), "--output_dir", str(tmp_path / "out"),
                      "--num_workers", "0"])
    assert not np.asanyarray(nib.load(str(tmp_path / "out" / "case.nii.gz")).dataobj).any()


def test_script_refuses_overlapping_output(tmp_path):
    _write(tmp_path / "in" / "case.nii.gz", np.zeros((4, 4, 4), np.uint8), np.eye(4))
    for target in (tmp_path / "in", tmp_path / "in" / "post", tmp_path):
        with pytest.raises(UsageError, match="must not"):
            postprocess.main(["--input_dir", str(tmp_path / "in"), "--output_dir", str(target)])


def test_bad_labels_and_unreadable_files_name_the_file(tmp_path):
    bad = np.zeros((4, 4, 4), np.uint8)
    bad[0, 0, 0] = 3
    _write(tmp_path / "in" / "bad.nii.gz", bad, np.eye(4))
    with pytest.raises(DataError, match=r"bad\.nii\.gz.*\[3\]"):
        postprocess.main(["--input_dir", str(tmp_path / "in"), "--output_dir", str(tmp_path / "o1"),
                          "--num_workers", "0"])
    (tmp_path / "in2").mkdir()
    (tmp_path / "in2" / "broken.nii.gz").write_bytes(b"not a nifti")
    with pytest.raises(DataError, match=r"broken\.nii\.gz"):
        postprocess.main(["--input_dir", str(tmp_path / "in2"), "--output_dir", str(tmp_path / "o2"),
                          "--num_workers", "0"])
    assert not (tmp_path / "o1" / "bad.nii.gz").exists()


def test_defaults_follow_eval_sh(tmp_path, monkeypatch):
    args = postprocess.parse_args([])
    assert args.input_dir == Path("outputs/LCKD") and args.output_dir == Path("outputs/LCKD_postprocessed")
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
    with pytest.raises(DataError, match=r"cut\.nii\.gz: cannot read the mask"):
        postprocess.read_mask(path)


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
