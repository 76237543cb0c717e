"""Case discovery, NIfTI reading, validation errors and datalist re-basing (datasets/brats.py)."""
import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from datasets.brats import (
    CaseError,
    DataError,
    find_case_files,
    load_case,
    read_datalist,
    resolve_list,
    to_network_order,
    to_nifti_order,
)
from utils.modalities import MODALITIES

SHAPE = (24, 20, 16)  # (X, Y, Z)
ZOOMS = (1.0, 1.5, 2.0)
AFFINE = np.diag([*ZOOMS, 1.0])
SUFFIX = {
    "2018": {"flair": "_flair", "t1": "_t1", "t1ce": "_t1ce", "t2": "_t2", "seg": "_seg"},
    "2023": {"flair": "-t2f", "t1": "-t1n", "t1ce": "-t1c", "t2": "-t2w", "seg": "-seg"},
}


def make_volumes(seed=0, shape=SHAPE):
    """BraTS-like int16 modalities (background 0, distinct per modality) and a 0/1/2/4 label."""
    rng = np.random.default_rng(seed)
    brain = np.zeros(shape, bool)
    brain[3:-3, 3:-3, 2:-2] = True
    volumes = {}
    for i, mod in enumerate(MODALITIES):
        # 30 grey levels over ~3000 brain voxels: every level holds the 50 voxels the
        # published normalisation needs to see it as signal.
        vol = rng.integers(100 + 200 * i, 130 + 200 * i, shape).astype(np.int16)
        volumes[mod] = np.where(brain, vol, 0).astype(np.int16)
    label = np.zeros(shape, np.uint8)
    label[8:14, 6:12, 5:10] = 2
    label[9:13, 7:11, 6:9] = 1
    label[10:12, 8:10, 7:8] = 4
    volumes["seg"] = label
    return volumes


def save(array, path, affine=AFFINE):
    img = nib.Nifti1Image(array, affine)
    img.header.set_zooms(ZOOMS[: array.ndim])
    nib.save(img, str(path))


def write_case(root, name, scheme="2018", ext=".nii.gz", seed=0, label=True):
    """Write one case folder in the given naming scheme; returns (folder, volumes written)."""
    folder = Path(root) / name
    folder.mkdir(parents=True, exist_ok=True)
    volumes = make_volumes(seed)
    if scheme == "2023":
        volumes["seg"] = np.where(volumes["seg"] == 4, 3, volumes["seg"]).astype(np.uint8)
    for part, vol in volumes.items():
        if part == "seg" and not label:
            continue
        save(vol, folder / f"{name}{SUFFIX[scheme][part]}{ext}")
    return folder, volumes


def part_path(folder, part, scheme="2018", ext=".nii.gz"):
    return folder / f"{folder.name}{SUFFIX[scheme][part]}{ext}"


# ---------------------------------------------------------------------------------- reading
@pytest.mark.parametrize(
    "name, scheme, ext",
    [
        ("Brats18_TCIA01_1_1", "2018", ".nii"),
        ("Brats18_TCIA01_1_1", "2018", ".nii.gz"),
        ("BraTS2021_00000", "2018", ".nii.gz"),  # 2021 keeps the 2018 suffixes
        ("BraTS-GLI-00000-000", "2023", ".nii.gz"),
        ("BraTS-GLI-00000-000", "2023", ".nii"),
    ],
)
def test_load_case_every_naming_scheme(tmp_path, name, scheme, ext):
    folder, volumes = write_case(tmp_path, name, scheme, ext)
    files = find_case_files(folder)
    assert list(files) == [*MODALITIES, "seg"]
    assert all(path.name.endswith(ext) and path.name.startswith(name) for path in files.values())

    case = load_case(folder, require_label=True)
    X, Y, Z = SHAPE
    assert case.name == name
    assert case.image.dtype == np.float32 and case.image.shape == (4, Z, X, Y)
    for i, mod in enumerate(MODALITIES):  # channel i is modality i, in network order
        np.testing.assert_array_equal(case.image[i], volumes[mod].transpose(2, 0, 1))
    expected = make_volumes()["seg"].transpose(2, 0, 1)  # 2023's 3 is read back as 4
    assert case.label.dtype == np.uint8
    np.testing.assert_array_equal(case.label, expected)
    np.testing.assert_allclose(case.affine, AFFINE)
    assert case.shape_xyz == SHAPE
    assert case.spacing == (ZOOMS[2], ZOOMS[0], ZOOMS[1])
    assert case.header.get_data_shape() == SHAPE


def test_case_without_label(tmp_path):
    folder, _ = write_case(tmp_path, "Brats18_CBICA_AAM_1", label=False)
    assert load_case(folder).label is None
    with pytest.raises(CaseError, match="Brats18_CBICA_AAM_1_seg.nii.gz"):
        load_case(folder, require_label=True)


def test_network_order_round_trip():
    vol = np.arange(24 * 20 * 16).reshape(SHAPE)
    net = to_network_order(vol)
    assert net.shape == (16, 24, 20) and net[5, 3, 2] == vol[3, 2, 5]
    np.testing.assert_array_equal(to_nifti_order(net), vol)


def test_hidden_and_foreign_files_ignored(tmp_path):
    folder, _ = write_case(tmp_path, "Brats18_X")
    (folder / "._Brats18_X_flair.nii.gz").write_bytes(b"resource fork")
    (folder / "notes.txt").write_text("x")
    assert find_case_files(folder)["flair"].name == "Brats18_X_flair.nii.gz"


# ------------------------------------------------------------------------------- validation
def _break_missing(folder):
    path = part_path(folder, "t1")
    path.unlink()
    return path


def _break_shape(folder):
    path = part_path(folder, "t2")
    save(np.ones((24, 20, 15), np.int16), path)
    return path


def _break_affine(folder):
    path = part_path(folder, "t1ce")
    affine = AFFINE.copy()
    affine[0, 3] = 0.01  # 10x the tolerance
    save(make_volumes()["t1ce"], path, affine)
    return path


def _break_nan(folder):
    path = part_path(folder, "flair")
    vol = make_volumes()["flair"].astype(np.float32)
    vol[5, 5, 5] = np.nan
    save(vol, path)
    return path


def _break_label(folder):
    path = part_path(folder, "seg")
    seg = make_volumes()["seg"]
    seg[0, 0, 0] = 3  # 3 is not a BraTS 2018 label
    save(seg, path)
    return path


def _break_garbage(folder):
    path = part_path(folder, "t1")
    path.write_bytes(b"this is not a nifti file" * 20)
    return path


def _break_truncated(folder):
    path = part_path(folder, "t2")
    data = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(data[: len(data) // 2]))  # valid gzip, half the voxels
    return path


@pytest.mark.parametrize(
    "breaker",
    [_break_missing, _break_shape, _break_affine, _break_nan, _break_label, _break_garbage, _break_truncated],
)
def test_validation_error_names_case_and_file(tmp_path, breaker):
    folder, _ = write_case(tmp_path, "Brats18_TCIA02_300_1")
    bad = breaker(folder)
    with pytest.raises(CaseError) as info:
        load_case(folder)
    assert isinstance(info.value, ValueError)
    assert bad.name in str(info.value) and "Brats18_TCIA02_300_1" in str(info.value)


def test_affine_within_tolerance_accepted(tmp_path):
    folder, _ = write_case(tmp_path, "Brats18_X")
    affine = AFFINE.copy()
    affine[0, 3] = 5e-4
    save(make_volumes()["t1"], part_path(folder, "t1"), affine)
    assert load_case(folder).image.shape[0] == 4


def test_2023_label_4_is_unexpected(tmp_path):
    folder, _ = write_case(tmp_path, "BraTS-GLI-00001-000", "2023")
    seg = make_volumes()["seg"]  # holds 4, which 2023 files never use
    save(seg, part_path(folder, "seg", "2023"))
    with pytest.raises(CaseError, match="BraTS-GLI-00001-000-seg.nii.gz"):
        load_case(folder)


def test_duplicate_part_and_missing_folder(tmp_path):
    folder, _ = write_case(tmp_path, "Brats18_X")
    save(make_volumes()["t1"], folder / "Brats18_X_t1.nii")
    with pytest.raises(CaseError, match="Brats18_X_t1.nii"):
        find_case_files(folder)
    with pytest.raises(CaseError, match="Brats18_missing"):
        load_case(tmp_path / "Brats18_missing")


# -------------------------------------------------------------------------------- datalists
PUBLISHED = "../data/BraTS-2018/MICCAI_BraTS_2018_Data_Training/HGG/Brats18_X"


@pytest.mark.parametrize(
    "layout",
    [
        "data/BraTS-2018/MICCAI_BraTS_2018_Data_Training/HGG/Brats18_X",
        "MICCAI_BraTS_2018_Data_Training/HGG/Brats18_X",
        "HGG/Brats18_X",
        "Brats18_X",
    ],
)
def test_data_root_rebases_published_entries(tmp_path, layout):
    root = tmp_path / "somewhere"
    (root / layout).mkdir(parents=True)
    lst = tmp_path / "lists" / "train.csv"
    lst.parent.mkdir()
    lst.write_text(PUBLISHED + "\n\n")
    assert read_datalist(lst, data_root=root) == [root / layout]


def test_data_root_prefers_most_specific(tmp_path):
    (tmp_path / "HGG" / "Brats18_X").mkdir(parents=True)
    (tmp_path / "Brats18_X").mkdir()
    lst = tmp_path / "l.csv"
    lst.write_text(PUBLISHED + "\n")
    assert read_datalist(lst, tmp_path) == [tmp_path / "HGG" / "Brats18_X"]


def test_data_root_missing_lists_tried_paths(tmp_path):
    lst = tmp_path / "l.csv"
    lst.write_text(PUBLISHED + "\n")
    with pytest.raises(DataError) as info:
        read_datalist(lst, tmp_path / "root")
    message = str(info.value)
    assert str(tmp_path / "root" / "HGG" / "Brats18_X") in message
    assert str(tmp_path / "root" / "Brats18_X") in message


def test_resolve_list_published_data_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "datalist" / "BraTS18").mkdir(parents=True)
    (tmp_path / "datalist" / "BraTS18" / "test.csv").write_text("")
    (tmp_path / "mine.csv").write_text("")
    # published: --data_dir datalist/ --data_list BraTS18/test.csv
    assert resolve_list("BraTS18/test.csv", "datalist/") == Path("datalist/BraTS18/test.csv")
    assert resolve_list("mine.csv", "datalist/") == Path("mine.csv")  # exists as given
    assert resolve_list("datalist/BraTS18/test.csv", "datalist/") == Path("datalist/BraTS18/test.csv")
    assert resolve_list("missing.csv", "") == Path("missing.csv")  # no data_dir: as given
    assert resolve_list("missing.csv", "datalist/") == Path("datalist/missing.csv")


def test_relative_entries_without_data_root(tmp_path, monkeypatch):
    (tmp_path / "data" / "BraTS-2018" / "MICCAI_BraTS_2018_Data_Training" / "HGG" / "Brats18_X").mkdir(parents=True)
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "l.csv").write_text(PUBLISHED + "\n")  # resolves against the list's folder
    assert read_datalist(lists / "l.csv")[0].resolve().name == "Brats18_X"
    (tmp_path / "cwd" / "Brats18_Y").mkdir(parents=True)
    (lists / "m.csv").write_text("Brats18_Y\n")  # not beside the list: the current directory
    monkeypatch.chdir(tmp_path / "cwd")
    assert read_datalist(lists / "m.csv")[0].resolve() == (tmp_path / "cwd" / "Brats18_Y").resolve()


def test_published_val_list_rebased(tmp_path):
    lst = Path(__file__).parent.parent / "datalist" / "BraTS18" / "BraTS18_val.csv"
    entries = [line.strip() for line in lst.read_text().splitlines() if line.strip()]
    for entry in entries:  # the user's copy keeps only HGG/ and LGG/
        (tmp_path / Path(entry).parent.name / Path(entry).name).mkdir(parents=True)
    folders = read_datalist(lst, tmp_path)
    assert len(folders) == len(entries) == 57
    assert all(f.parent.parent == tmp_path and f.parent.name in ("HGG", "LGG") for f in folders)
