import nibabel as nib
import numpy as np
import pytest
import torch

from datasets.brats import CaseError, to_network_order
from utils.export import read_mask, save_labels, write_mask
from utils.regions import labels_to_regions, regions_to_labels


def write_input(path, data_xyz, affine):
    """An input modality as BraTS stores it: int16, mm units."""
    image = nib.Nifti1Image(data_xyz.astype(np.int16), affine)
    image.header.set_xyzt_units("mm", "sec")
    nib.save(image, path)
    return nib.load(path)


def random_labels(shape, seed=0):
    rng = np.random.default_rng(seed)
    return rng.choice(np.array([0, 1, 2, 4], dtype=np.uint8), size=shape, p=[0.7, 0.1, 0.1, 0.1])


def test_thresholded_probabilities_to_labels_overwrite_in_the_published_order():
    # one voxel per case: (ET, WT, TC) probabilities -> label
    probs = np.array([
        [0.1, 0.9, 0.2],   # WT only -> edema 2
        [0.1, 0.9, 0.6],   # WT + TC -> 1
        [0.7, 0.9, 0.6],   # all -> 4
        [0.7, 0.2, 0.2],   # ET alone still overwrites last -> 4
        [0.5, 0.5, 0.5],   # not > 0.5 -> background
        [0.1, 0.2, 0.8],   # TC without WT -> 1 (TC overwrites)
    ], dtype=np.float32).T.reshape(3, 6, 1, 1)
    labels = regions_to_labels(torch.from_numpy(probs) > 0.5)
    assert labels.dtype == np.uint8
    assert labels[:, 0, 0].tolist() == [2, 1, 4, 4, 0, 1]
    np.testing.assert_array_equal(regions_to_labels(probs > 0.5), labels)
    np.testing.assert_array_equal(regions_to_labels((probs > 0.5)[:, ::-1]), labels[::-1])


def test_round_trip_regions_probabilities_export_reload(tmp_path):
    shape_xyz = (12, 10, 7)
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    affine[:3, 3] = [-5.0, 3.0, 20.0]
    reference = write_input(tmp_path / "case_flair.nii.gz", np.ones(shape_xyz), affine)
    label_xyz = random_labels(shape_xyz)
    label = to_network_order(label_xyz)  # (D, H, W) = (7, 12, 10)
    probs = labels_to_regions(label).astype(np.float32) * 0.8 + 0.1
    header = reference.header.copy()
    header.set_slope_inter(2.0, 10.0)  # a scaled source image: the mask must not inherit it
    save_labels(regions_to_labels(probs > 0.5), reference.affine, header,
                tmp_path / "out" / "case.nii.gz")
    saved = nib.load(tmp_path / "out" / "case.nii.gz")
    assert saved.shape == shape_xyz
    np.testing.assert_array_equal(saved.affine, reference.affine)
    assert saved.get_data_dtype() == np.uint8
    raw = np.asanyarray(saved.dataobj)
    assert raw.dtype == np.uint8  # stored as integers, no scaling applied on read
    assert saved.header.get_slope_inter() == (None, None)
    np.testing.assert_array_equal(raw, label_xyz)
    assert saved.header.get_xyzt_units() == ("mm", "sec")
    assert list((tmp_path / "out").iterdir()) == [tmp_path / "out" / "case.nii.gz"]


def test_orientation_preserved_for_a_permuted_flipped_affine(tmp_path):
    shape_xyz = (9, 11, 6)
    # voxel axes permuted and flipped, anisotropic spacing (e.g. LPS-stored, sagittal slices)
    affine = np.array([[0.0, -1.2, 0.0, 30.0],
                       [0.0, 0.0, 2.5, -40.0],
                       [-0.9, 0.0, 0.0, 12.0],
                       [0.0, 0.0, 0.0, 1.0]])
    data = np.zeros(shape_xyz)
    marked = (7, 2, 4)
    data[marked] = 100
    reference = write_input(tmp_path / "case_t1.nii.gz", data, affine)
    world = reference.affine @ np.array([*marked, 1.0])

    # a label derived from the input as the pipeline sees it (network order)
    image = to_network_order(np.asanyarray(reference.dataobj))
    label = np.where(image == image.max(), 4, 0).astype(np.uint8)
    save_labels(label, reference.affine, reference.header, tmp_path / "case.nii.gz")

    saved = nib.load(tmp_path / "case.nii.gz")
    assert saved.shape == shape_xyz
    assert nib.aff2axcodes(saved.affine) == nib.aff2axcodes(reference.affine)
    voxels = np.argwhere(np.asanyarray(saved.dataobj) == 4)
    assert voxels.tolist() == [list(marked)]
    np.testing.assert_allclose(saved.affine @ np.array([*voxels[0], 1.0]), world)
    # qform and sform both describe the same grid (viewers pick either)
    np.testing.assert_allclose(saved.header.get_qform(), reference.affine, atol=1e-5)
    np.testing.assert_allclose(saved.header.get_sform(), reference.affine, atol=1e-5)


def damaged(path, offset):
    """`path` with the byte at `offset` flipped (a bad disk, an interrupted copy)."""
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("offset, problem", [  # the gzip trailer: CRC-32, then the length
    (-8, "BadGzipFile: CRC check failed"),
    (-2, "BadGzipFile: Incorrect length of data produced"),
])
def test_a_mask_damaged_at_the_end_of_its_gzip_stream_is_refused(tmp_path, offset, problem):
    # nibabel reads only the bytes the voxels need and would return the mask without a word.
    path = tmp_path / "Brats18_X.nii.gz"
    write_mask(random_labels((20, 20, 20)), np.eye(4), nib.Nifti1Header(), path)
    damaged(path, offset)
    with pytest.raises(CaseError) as error:
        read_mask(path)
    assert str(error.value) == (f"case Brats18_X: {path}: unreadable NIfTI ({problem}): damaged, its "
                                "bytes fail the compressed stream's check: a bad copy or disk? Copy "
                                "it again")


def test_the_mask_of_a_nifti2_input_is_nifti1_on_its_grid_and_nothing_is_printed(tmp_path, capfd,
                                                                                  caplog):
    affine = np.array([[0, -1.2, 0, 30], [0.9, 0, 0, -20], [0, 0, 2.5, 5], [0, 0, 0, 1]])
    source = nib.Nifti2Image(np.zeros((6, 5, 4), np.int16), affine)
    source.set_qform(affine, code=1)
    source.set_sform(affine, code=4)
    nib.save(source, tmp_path / "scan.nii")
    header = nib.load(tmp_path / "scan.nii").header
    label = np.zeros((6, 5, 4), np.uint8)
    label[1, 2, 3] = 4
    write_mask(label, affine, header, tmp_path / "mask.nii.gz")
    # nothing printed, nothing logged where it would be (nibabel's logger prints to stderr)
    assert capfd.readouterr() == ("", "")
    assert not [record for record in caplog.records if record.name.startswith("nibabel")]
    mask = nib.load(tmp_path / "mask.nii.gz")
    assert type(mask.header) is nib.Nifti1Header and mask.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asanyarray(mask.dataobj), label)
    for coded, code in ((mask.header.get_qform(coded=True), 1), (mask.header.get_sform(coded=True), 4)):
        np.testing.assert_allclose(coded[0], affine, atol=1e-6)
        assert coded[1] == code


def test_read_mask_errors_are_one_short_line(tmp_path):
    truncated = tmp_path / "cut.nii"
    write_mask(np.zeros((20, 20, 20), np.uint8), np.eye(4), nib.Nifti1Header(), truncated)
    truncated.write_bytes(truncated.read_bytes()[:1000])
    with pytest.raises(CaseError) as error:
        read_mask(truncated)
    assert str(error.value) == (f"case cut: {truncated}: unreadable NIfTI (OSError: Expected 8000 "
                                f"bytes, got 648 bytes from {truncated} - could the file be damaged?)"
                                ": truncated, 1000 bytes where its header says 8352: an interrupted "
                                "copy or download? Copy it again")

    image = tmp_path / "Brats18_X_t1.nii.gz"  # an image put among the masks
    write_input(image, np.arange(8000).reshape(20, 20, 20), np.eye(4))
    with pytest.raises(CaseError) as error:
        read_mask(image)
    assert str(error.value) == f"case Brats18_X_t1: {image}: labels outside (0, 1, 2, 4): min 0, max 7999"
