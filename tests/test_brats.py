"""Case discovery, NIfTI reading, validation errors and datalist re-basing (datasets/brats.py)."""
import gzip
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from datasets import brats
from datasets.brats import (
    CaseError,
    DataError,
    brats_like_warnings,
    case_files,
    find_case_files,
    find_cases,
    load_case,
    open_files,
    read_datalist,
    read_files,
    refuse_duplicates,
    resolve_list,
    to_network_order,
    to_nifti_order,
)
from utils.export import save_labels
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


def save_placeholder(path, affine=AFFINE):
    """An all-zero modality file: how a missing modality is filled for the published code."""
    nib.save(nib.Nifti1Image(np.zeros(SHAPE, np.int16), affine), path)


def off_grid_placeholder(path, other):
    """The error that names an all-zero placeholder off its case's grid (Brats18_X)."""
    return (f"case Brats18_X: {path}: all zero, the placeholder of a missing modality, on another "
            f"grid than {other}: training needs all four modalities: drop the case from the list "
            "(eval.py and predict.py read the case without it)")


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


def _break_corrupted(folder):
    # Bit rot in a voxel of a gzip whose deflate stream stays valid (stored blocks): only the
    # CRC at the end of the stream tells, and nibabel reads only the bytes the image needs.
    path = part_path(folder, "t1ce")
    data = bytearray(gzip.decompress(path.read_bytes()))
    data[-100] ^= 0x40
    corrupted = bytearray(gzip.compress(bytes(data), compresslevel=0))
    corrupted[-8:-4] = gzip.compress(gzip.decompress(path.read_bytes()), compresslevel=0)[-8:-4]
    path.write_bytes(bytes(corrupted))  # the original's CRC over the changed voxel
    return path


@pytest.mark.parametrize(
    "breaker",
    [_break_missing, _break_shape, _break_affine, _break_nan, _break_label, _break_garbage,
     _break_truncated, _break_corrupted],
)
def test_validation_error_names_case_and_file(tmp_path, breaker):
    folder, _ = write_case(tmp_path, "Brats18_TCIA02_300_1")
    bad = breaker(folder)
    with pytest.raises(CaseError) as info:
        load_case(folder)
    assert isinstance(info.value, ValueError)
    assert bad.name in str(info.value) and "Brats18_TCIA02_300_1" in str(info.value)


def test_a_scan_in_two_files_is_told_to_keep_one(tmp_path):
    folder, _ = write_case(tmp_path, "Brats18_Y")
    gz = part_path(folder, "t1")
    (folder / "Brats18_Y_t1.nii").write_bytes(gzip.decompress(gz.read_bytes()))
    with pytest.raises(CaseError) as info:
        load_case(folder)
    assert str(info.value) == (f"case Brats18_Y: {folder / 'Brats18_Y_t1.nii'}: several t1 files: "
                               "['Brats18_Y_t1.nii', 'Brats18_Y_t1.nii.gz']: keep one (move the "
                               "others out of the case folder)")


@pytest.mark.parametrize("breaker, problem", [
    (_break_nan, "1 non-finite voxels (NaN or infinity): a damaged or badly converted scan"),
    (_break_corrupted, "unreadable NIfTI (BadGzipFile: CRC check failed): damaged, its bytes fail "
                       "the compressed stream's check: a bad copy or disk? Copy it again"),
])
def test_damaged_voxels_are_named_for_what_they_are(tmp_path, breaker, problem):
    folder, _ = write_case(tmp_path, "Brats18_X")
    bad = breaker(folder)
    with pytest.raises(CaseError) as info:
        load_case(folder)
    assert str(info.value) == f"case Brats18_X: {bad}: {problem}"


def test_non_integer_labels_are_counted_and_shown(tmp_path):
    folder, volumes = write_case(tmp_path, "Brats18_X")
    seg = volumes["seg"].astype(np.float32)
    seg[10, 8, 7], seg[10, 8, 6] = 3.25, 1.5  # linear interpolation between labels
    save(seg, part_path(folder, "seg"))
    fix = ("labels must be whole numbers; resampled with linear interpolation? Resample it with "
           "nearest-neighbour")
    with pytest.raises(CaseError) as info:
        load_case(folder)
    assert str(info.value) == (f"case Brats18_X: {part_path(folder, 'seg')}: label map has "
                               f"non-integer or non-finite values (2 voxels, e.g. 1.5): {fix}")
    seg[10, 8, 6:8] = np.inf  # NaN and infinity are counted too
    seg[0, 0, 0] = np.nan
    save(seg, part_path(folder, "seg"))
    with pytest.raises(CaseError) as info:
        load_case(folder)
    assert str(info.value) == (f"case Brats18_X: {part_path(folder, 'seg')}: label map has "
                               f"non-integer or non-finite values (3 voxels, e.g. nan): {fix}")


def test_affine_within_tolerance_accepted(tmp_path):
    folder, _ = write_case(tmp_path, "Brats18_X")
    affine = AFFINE.copy()
    affine[0, 3] = 5e-4
    save(make_volumes()["t1"], part_path(folder, "t1"), affine)
    assert load_case(folder).image.shape[0] == 4


def test_trailing_dimensions_of_size_1_are_dropped(tmp_path):
    # Some converters write a 3-D volume as (X, Y, Z, 1); the mask is written 3-D, on its grid.
    folder, volumes = write_case(tmp_path, "Brats18_X")
    for part, extra in (("flair", (1,)), ("seg", (1, 1))):
        nib.save(nib.Nifti1Image(volumes[part].reshape(*SHAPE, *extra), AFFINE),
                 part_path(folder, part))
    case = load_case(folder, require_label=True)
    assert case.shape_xyz == SHAPE
    np.testing.assert_array_equal(case.image[0], to_network_order(volumes["flair"]))
    np.testing.assert_array_equal(case.label, to_network_order(volumes["seg"]))
    save_labels(case.label, case.affine, case.header, tmp_path / "mask.nii.gz")
    assert nib.load(tmp_path / "mask.nii.gz").shape == SHAPE
    # Several volumes in one file are not one modality.
    path = part_path(folder, "t2")
    nib.save(nib.Nifti1Image(np.stack([volumes["t2"]] * 2, axis=-1), AFFINE), path)
    with pytest.raises(CaseError) as error:
        load_case(folder)
    assert str(error.value) == (
        f"case Brats18_X: {path}: expected a 3-D volume, got shape (24, 20, 16, 2); store each "
        "volume as a 3-D file of its own (split a 4-D file, e.g. with fslsplit)")


@pytest.mark.parametrize("part", ["t1", "seg"])
@pytest.mark.parametrize("dtype, said", [
    (np.dtype([("R", "u1"), ("G", "u1"), ("B", "u1")]), "RGB"),  # numpy failed on it, deep down
    (np.complex64, "complex64"),  # its imaginary part was dropped with numpy's warning alone
])
def test_a_volume_of_other_than_one_real_number_per_voxel_is_named(tmp_path, part, dtype, said):
    folder, _ = write_case(tmp_path, "Brats18_X")
    path = part_path(folder, part)
    nib.save(nib.Nifti1Image(np.zeros(SHAPE, dtype), AFFINE), path)
    with pytest.raises(CaseError) as error:
        load_case(folder)
    assert str(error.value) == (f"case Brats18_X: {path}: voxels of type {said}, not one real "
                                "number each; store a scalar volume (e.g. int16 or float32)")


def test_2023_label_4_is_unexpected(tmp_path):
    folder, _ = write_case(tmp_path, "BraTS-GLI-00001-000", "2023")
    seg = make_volumes()["seg"]  # holds 4, which 2023 files never use
    save(seg, part_path(folder, "seg", "2023"))
    with pytest.raises(CaseError, match="BraTS-GLI-00001-000-seg.nii.gz") as error:
        load_case(folder)
    # most likely a 2023 seg relabelled to BraTS 2018's ET 4 already: say so, and what to do
    assert str(error.value).endswith(
        "labels outside (0, 1, 2, 3): min 0, max 4; BraTS 2023 writes enhancing tumour as 3 (read "
        "as 4), and this file holds 4, BraTS 2018's value: relabelled already? Set 4 back to 3, or "
        "name the case's files as BraTS 2018-2021 do (_flair, _t1, _t1ce, _t2, _seg; ET 4)")
    seg[0, 0, 0] = 3  # 3 and 4: not a relabelled seg (BraTS-PED labels four regions), no hint
    save(seg, part_path(folder, "seg", "2023"))
    with pytest.raises(CaseError) as error:
        load_case(folder)
    assert str(error.value).endswith("labels outside (0, 1, 2, 3): min 0, max 4")


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
    (tmp_path / "root").mkdir()
    with pytest.raises(DataError) as info:
        read_datalist(lst, tmp_path / "root")
    message = str(info.value)
    assert str(tmp_path / "root" / "HGG" / "Brats18_X") in message
    assert str(tmp_path / "root" / "Brats18_X") in message
    assert message.startswith(f"{lst}:1: case folder {PUBLISHED!r} not found; tried ")
    assert message.endswith(  # given already: checked, not passed
        "; check --data_root: the folder holding the cases (for the official lists, the one "
        "holding MICCAI_BraTS_2018_Data_Training/ and _Validation/)")
    write_case(tmp_path / "root", "Brats18_Y")  # a case's own folder as the root
    with pytest.raises(DataError) as info:
        read_datalist(lst, tmp_path / "root" / "Brats18_Y")
    assert str(info.value).endswith(
        f"; --data_root {tmp_path / 'root' / 'Brats18_Y'} is one case's folder: give the folder "
        "holding the cases (for the official lists, the one holding "
        "MICCAI_BraTS_2018_Data_Training/ and _Validation/)")


@pytest.mark.parametrize("number, line, hint", [
    # a spreadsheet's export: a header, a second column, quotes
    (2, "case_id,path", "a datalist names one case folder per line and nothing else (no header, "
                        "no other columns, no quotes)"),
    (2, "Brats18_A;HGG", "a datalist names one case folder per line and nothing else (no header, "
                         "no other columns, no quotes)"),
    (2, '"Brats18_A"', "a datalist names one case folder per line and nothing else (no header, "
                       "no other columns, no quotes)"),
    # a file of the case, named or found
    (2, "Brats18_A/Brats18_A_t1.nii.gz", "an entry names a case folder (the folder holding its "
                                         "files), not a file"),
    (2, "notes.txt", "an entry names a case folder (the folder holding its files), not a file"),
    # a one-word first line, every other entry found: a header
    (1, "ID", "the other entries were found: is line 1 a header? A datalist has none: delete the "
              "line"),
    (1, "subject_id", "the other entries were found: is line 1 a header? A datalist has none: "
                      "delete the line"),
    # a case name (it has digits): a case missing, not a header
    (1, "Brats18_Z_1", "pass --data_root DIR, the folder holding the cases (for the official "
                       "lists, the one holding MICCAI_BraTS_2018_Data_Training/ and "
                       "_Validation/), to re-base the entries (DATA_ROOT=DIR for run.sh and "
                       "eval.sh)"),
    (1, "HGG\\Brats18_B", "separate its folders with '/' (a list written on Windows uses '\\')"),
])
def test_an_entry_that_is_no_case_folder_says_what_a_datalist_holds(tmp_path, number, line, hint):
    write_case(tmp_path, "Brats18_A")
    write_case(tmp_path / "HGG", "Brats18_B")
    (tmp_path / "notes.txt").write_text("x")
    found = ["Brats18_A", "HGG/Brats18_B"]
    lst = tmp_path / "l.csv"
    lst.write_text("\n".join(found[:number - 1] + [line] + found[number - 1:]) + "\n")
    with pytest.raises(DataError) as info:
        read_datalist(lst)
    assert str(info.value).startswith(f"{lst}:{number}: case folder {line!r} not found; tried ")
    assert str(info.value).endswith(f"; {hint}")


def test_every_missing_entry_is_counted_and_the_data_root_flag_named(tmp_path, monkeypatch):
    # A partial download: the first missing entry is named, the others counted.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "Brats18_B").mkdir()
    lst = tmp_path / "l.csv"
    lst.write_text("Brats18_B\nBrats18_A\n# a comment\nBrats18_B\nBrats18_C\n")
    with pytest.raises(DataError) as info:
        read_datalist(lst)
    assert str(info.value) == (
        f"{lst}:2: case folder 'Brats18_A' not found (and 1 more of its 4 entries); tried "
        f"{tmp_path / 'Brats18_A'}; pass --data_root DIR, the folder holding the cases (for "
        "the official lists, the one holding MICCAI_BraTS_2018_Data_Training/ and _Validation/), "
        "to re-base the entries (DATA_ROOT=DIR for run.sh and eval.sh)")
    lst.write_text("Brats18_B\nBrats18_A\n")
    with pytest.raises(DataError, match=r"^\S+:2: case folder 'Brats18_A' not found; tried "):
        read_datalist(lst)


def test_the_data_root_hint_serves_the_official_validation_list(tmp_path, monkeypatch):
    # eval.py's default list holds MICCAI_BraTS_2018_Data_Validation/ cases: the root named by
    # the hint must be the parent of both challenge folders, not the Training folder
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "BraTS2018"
    (root / "MICCAI_BraTS_2018_Data_Training" / "HGG" / "Brats18_T").mkdir(parents=True)
    (root / "MICCAI_BraTS_2018_Data_Validation" / "Brats18_V").mkdir(parents=True)
    lst = tmp_path / "test.csv"
    lst.write_text("../data/BraTS-2018/MICCAI_BraTS_2018_Data_Validation/Brats18_V\n")
    with pytest.raises(DataError) as info:
        read_datalist(lst)
    assert ("pass --data_root DIR, the folder holding the cases (for the official lists, the one "
            "holding MICCAI_BraTS_2018_Data_Training/ and _Validation/)") in str(info.value)
    assert [f.name for f in read_datalist(lst, root)] == ["Brats18_V"]  # the hint followed
    with pytest.raises(DataError):  # what the hint named before: the Training folder itself
        read_datalist(lst, root / "MICCAI_BraTS_2018_Data_Training")


def test_a_data_root_that_is_not_there_is_named(tmp_path, monkeypatch):
    # A typo (BraTS2O18) was reported as the list's first case not found under it.
    lst = tmp_path / "l.csv"
    lst.write_text(PUBLISHED + "\n")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file").write_text("")
    for root, problem in (("BraTS2O18", "not found"), ("file", "not a folder")):
        with pytest.raises(DataError) as info:
            read_datalist(lst, root)
        assert str(info.value) == f"--data_root {root} ({tmp_path / root}): {problem}"


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
    with pytest.raises(DataError, match=r"^datalist missing.csv not found, nor datalist/missing.csv "
                                        r"\(--data_dir datalist/\); check the path \(relative "
                                        r"paths start in the current folder: run from the "
                                        r"repository root, or pass --data_dir\)$"):
        resolve_list("missing.csv", "datalist/")
    # an absolute path is data_dir / path itself: named once
    with pytest.raises(DataError) as error:
        resolve_list(str(tmp_path / "missing.csv"), "datalist/")
    assert str(error.value) == f"datalist {tmp_path / 'missing.csv'} not found; check the path"


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


# ---------------------------------------------------------------- incomplete cases (inference)
def test_a_missing_file_is_named_after_the_files_the_folder_holds(tmp_path):
    # a case folder renamed (P01) holding Brats18_X_* files: the missing T1 is Brats18_X_t1
    folder, _ = write_case(tmp_path, "Brats18_X")
    part_path(folder, "t1").unlink()
    folder = folder.rename(tmp_path / "P01")
    with pytest.raises(CaseError) as info:
        load_case(folder)
    assert str(info.value).startswith(f"case P01: {folder / 'Brats18_X_t1.nii.gz'}: missing t1 file")


@pytest.mark.parametrize("scheme, ext, present", [
    ("2018", ".nii.gz", ("flair", "t1ce")),
    ("2018", ".nii", ("t2",)),
    ("2023", ".nii.gz", ("t1", "t1ce", "t2")),
])
def test_inference_reads_any_subset_of_the_modalities(tmp_path, scheme, ext, present):
    name = "BraTS-GLI-00002-000" if scheme == "2023" else "Brats18_X"
    folder, volumes = write_case(tmp_path, name, scheme, ext)
    missing = [m for m in MODALITIES if m not in present]
    for modality in missing:
        part_path(folder, modality, scheme, ext).unlink()

    with pytest.raises(CaseError) as info:  # training: all four, the first missing one named
        load_case(folder)
    assert str(info.value).startswith(f"case {name}: {part_path(folder, missing[0], scheme, ext)}: "
                                      f"missing {missing[0]} file")

    case = load_case(folder, allow_missing=True)
    assert case.available == tuple(MODALITIES.index(m) for m in present)
    assert list(case.files) == [*present, "seg"]
    for i, modality in enumerate(MODALITIES):
        expected = volumes[modality].transpose(2, 0, 1) if modality in present else 0
        np.testing.assert_array_equal(case.image[i], expected)
    np.testing.assert_array_equal(case.label, make_volumes()["seg"].transpose(2, 0, 1))


RENAME = "under another name, and the case has no {part} file: name it Brats18_X_{part}.nii.gz if it is one"
CONVERT = ("but is not a NIfTI file (.nii or .nii.gz), and the case has no {part} file: convert it (or "
           "finish copying it) to Brats18_X_{part}.nii.gz")


@pytest.mark.parametrize("name, part, problem", [("Brats18_X_T1w.nii.gz", "t1", RENAME),
                                                 ("Brats18_X_t1Gd.nii", "t1ce", RENAME),
                                                 ("Brats18_X-FLAIR.nii.gz", "flair", RENAME),
                                                 ("Brats18_X_t1.mha", "t1", CONVERT),
                                                 ("Brats18_X_t1ce.nii.gz.part", "t1ce", CONVERT),
                                                 ("Brats18_X_T2.NRRD", "t2", CONVERT),
                                                 ("Brats18_X-t2f.nii~", "flair", CONVERT)])
def test_a_scan_of_a_missing_modality_that_is_not_read_is_named(tmp_path, name, part, problem):
    # skipped (no scheme's name, or not a NIfTI file), it left the case to be predicted without
    # a modality the user holds
    folder, _ = write_case(tmp_path, "Brats18_X")
    part_path(folder, part).rename(folder / name)
    for other in ("Brats18_X_brainmask.nii.gz", "Brats18_X_brainmask.mha",  # named after no modality
                  f"{name}.md5", f"Brats18_X_{part}.json"):  # not scans: a checksum, a sidecar
        (folder / other).write_text("")
    message = (f"case Brats18_X: {folder / name}: looks like a {part} scan "
               f"{problem.format(part=part)}, or move it out of the case folder")
    for allow_missing in (True, False):
        with pytest.raises(CaseError) as info:
            find_case_files(folder, allow_missing=allow_missing)
        assert str(info.value) == message
    # beside its scan, such a file is left alone (a copy in the scanner's format, a brain mask)
    save(make_volumes()[part], part_path(folder, part))
    assert part in find_case_files(folder)
    # and so are the other files, beside a missing modality
    (folder / name).unlink()
    part_path(folder, part).unlink()
    assert part not in find_case_files(folder, allow_missing=True)


def test_a_case_mixing_naming_schemes_says_how_to_name_it(tmp_path):
    folder, _ = write_case(tmp_path, "BraTS-GLI-00002-000", scheme="2023")
    for part, new_name in (("t1ce", "_t1ce"), ("t2", "_t2")):  # two renamed the 2018 way
        part_path(folder, part, "2023").rename(folder / f"{folder.name}{new_name}.nii.gz")
    with pytest.raises(CaseError) as info:
        find_case_files(folder)
    assert str(info.value) == (
        f"case BraTS-GLI-00002-000: {folder}: mixes naming schemes (brats2023 and brats2018: "
        "['BraTS-GLI-00002-000_t1ce.nii.gz', 'BraTS-GLI-00002-000_t2.nii.gz']); name its files "
        "after one (brats2023: -t2f, -t1n, -t1c, -t2w, -seg)")


@pytest.mark.parametrize("scheme", ["2018", "2023"])
def test_a_file_of_another_case_is_refused(tmp_path, scheme):
    # every BraTS case has the same grid: only the name tells another patient's scan apart
    name, other = ("BraTS-GLI-00000-000", "BraTS-GLI-00001-000") if scheme == "2023" else (
        "Brats18_C_1", "Brats18_B_1")
    folder, _ = write_case(tmp_path, name, scheme)
    stray = folder / part_path(folder, "t2", scheme).name.replace(name, other)
    part_path(folder, "t2", scheme).rename(stray)
    with pytest.raises(CaseError) as info:
        find_case_files(folder, allow_missing=True)
    assert str(info.value).startswith(f"case {name}: {stray}: its name does not start as the "
                                      f"case's other files do (")
    t2 = part_path(folder, "t2", scheme)
    stray.rename(t2.with_name(t2.name.upper()))
    assert len(find_case_files(folder)) == 5  # letter case aside, the prefixes agree


def test_a_folder_of_cases_taken_for_a_case_is_named_so(tmp_path):
    # eval.py --input MICCAI_BraTS_2018_Data_Training: HGG and LGG are taken for cases
    write_case(tmp_path / "Training" / "HGG", "Brats18_X")
    hgg = tmp_path / "Training" / "HGG"
    assert find_cases(tmp_path / "Training") == [hgg]
    with pytest.raises(CaseError) as info:
        find_case_files(hgg, allow_missing=True)
    assert str(info.value) == (
        f"case HGG: {hgg}: no modality file (expected at least one of HGG_flair.nii.gz, "
        "HGG_t1.nii.gz, HGG_t1ce.nii.gz, HGG_t2.nii.gz); it is a folder of case folders (e.g. "
        "Brats18_X), not a case: point --input at it, or list its case folders")
    # eval.py --input at the dataset's root: Training (and Validation) taken for cases
    with pytest.raises(CaseError) as info:
        find_case_files(tmp_path / "Training", allow_missing=True)
    assert str(info.value).endswith(
        "; case folders lie two levels down (e.g. HGG/Brats18_X), not a case: point --input at "
        f"{hgg}, or give a --data_list with --data_root {tmp_path}")


def test_a_case_without_any_modality_names_the_files_expected(tmp_path):
    folder, _ = write_case(tmp_path, "Brats18_X")
    for modality in MODALITIES:
        part_path(folder, modality).unlink()
    with pytest.raises(CaseError) as info:
        load_case(folder, allow_missing=True)
    assert str(info.value) == (f"case Brats18_X: {folder}: no modality file (expected at least one of "
                               "Brats18_X_flair.nii.gz, Brats18_X_t1.nii.gz, Brats18_X_t1ce.nii.gz, "
                               "Brats18_X_t2.nii.gz)")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CaseError, match="case empty: .*empty: no modality file"):
        load_case(tmp_path / "empty", allow_missing=True)


def test_present_modalities_must_share_the_grid(tmp_path):
    folder, _ = write_case(tmp_path, "Brats18_X")
    part_path(folder, "flair").unlink()
    bad = _break_shape(folder)  # t2, compared with the first modality present: t1
    with pytest.raises(CaseError, match=f"{bad}: shape .24, 20, 15. differs from Brats18_X_t1.nii.gz"):
        load_case(folder, allow_missing=True)


def test_a_file_off_the_grid_is_told_to_be_resampled(tmp_path):
    folder, _ = write_case(tmp_path, "Brats18_X")
    fix = ("the files of a case must lie on one grid: resample (or reorient) the odd one onto "
           "the others' grid, e.g. onto the FLAIR's")
    bad = _break_shape(folder)
    with pytest.raises(CaseError) as info:
        load_case(folder)
    assert str(info.value) == (f"case Brats18_X: {bad}: shape (24, 20, 15) differs from "
                               f"Brats18_X_flair.nii.gz (24, 20, 16); {fix}")
    save(make_volumes()["t2"], bad)
    bad = _break_affine(folder)
    with pytest.raises(CaseError) as info:
        load_case(folder)
    assert str(info.value) == (
        f"case Brats18_X: {bad}: affine differs from Brats18_X_flair.nii.gz by up to 0.01 (more "
        "than 0.001): [[1.0, 0.0, 0.0, 0.01], [0.0, 1.5, 0.0, 0.0], [0.0, 0.0, 2.0, 0.0], [0.0, "
        "0.0, 0.0, 1.0]] vs [[1.0, 0.0, 0.0, 0.0], [0.0, 1.5, 0.0, 0.0], [0.0, 0.0, 2.0, 0.0], "
        f"[0.0, 0.0, 0.0, 1.0]]; {fix}")


@pytest.mark.parametrize("part", ["flair", "t1"])
def test_a_non_finite_affine_is_named_as_such(tmp_path, part):
    # NaN is unequal to itself: the file was said to differ from itself ("by up to nan"), and a
    # NaN in the first modality's header was blamed on the next file
    folder, volumes = write_case(tmp_path, "Brats18_X")
    img = nib.Nifti1Image(volumes[part], AFFINE)
    img.header["srow_x"][0] = np.nan
    nib.save(nib.Nifti1Image(volumes[part], None, header=img.header), part_path(folder, part))
    assert np.isnan(nib.load(part_path(folder, part)).affine[0, 0])
    with pytest.raises(CaseError) as info:
        load_case(folder)
    assert str(info.value).startswith(f"case Brats18_X: {part_path(folder, part)}: its affine holds "
                                      "non-finite values ([[nan, ")
    assert str(info.value).endswith("a broken sform/qform in the header; give it a valid one (e.g. "
                                    "another modality's: fslcpgeom)")


@pytest.mark.parametrize("how", ["copy", "symlink", "resaved"])
def test_a_copy_of_another_modality_is_refused(tmp_path, how):
    # a missing T2 filled with the FLAIR (for code that needs four files) was predicted as if
    # the FLAIR were a T2; re-saved, the file's bytes differ but its voxels do not
    folder, volumes = write_case(tmp_path, "Brats18_X")
    t2 = part_path(folder, "t2")
    t2.unlink()
    if how == "copy":
        t2.write_bytes(part_path(folder, "flair").read_bytes())
    elif how == "symlink":
        t2.symlink_to(part_path(folder, "flair").name)
    else:
        save(volumes["flair"].astype(np.float32), t2)
    message = (f"case Brats18_X: {t2}: the same voxels as Brats18_X_flair.nii.gz: a copy of the "
               "flair scan standing in for a missing t2? The network would take it for a t2; "
               "leave it out (eval.py and predict.py then predict the case without t2; training "
               "needs all four)")
    for allow_missing in (True, False):
        with pytest.raises(CaseError) as info:
            load_case(folder, allow_missing=allow_missing)
        assert str(info.value) == message
    files = {"flair": part_path(folder, "flair"), "t2": t2}
    with pytest.raises(CaseError, match="the same voxels as"):
        read_files("P01", files)  # predict.py's way, files given one by one
    # all-zero placeholders are alike, and are not copies (eval.py and predict.py drop them)
    for part in ("t1", "t2"):
        save(np.zeros_like(volumes[part]), part_path(folder, part))
    assert load_case(folder).available == (0, 1, 2, 3)


def test_a_compressed_file_named_nii_is_told_to_be_renamed(tmp_path):
    # nibabel says only "Cannot work out file type"; the fix is in the name
    folder, _ = write_case(tmp_path, "Brats18_X")
    packed = part_path(folder, "t1")
    plain = packed.with_name("Brats18_X_t1.nii")
    packed.rename(plain)  # a .nii.gz renamed
    with pytest.raises(CaseError) as info:
        load_case(folder)
    assert str(info.value).startswith(f"case Brats18_X: {plain}: unreadable NIfTI (")
    assert str(info.value).endswith("): it is gzip-compressed; name it Brats18_X_t1.nii.gz")
    plain.rename(packed)
    load_case(folder)  # read as it was, the case is sound


def test_an_uncompressed_file_named_nii_gz_is_told_to_be_renamed(tmp_path):
    # nibabel says only "is not a gzip file"; the fix is in the name
    folder, _ = write_case(tmp_path, "Brats18_X", ext=".nii")
    plain = part_path(folder, "t1", ext=".nii")
    packed = plain.with_name("Brats18_X_t1.nii.gz")
    plain.rename(packed)  # a .nii renamed
    with pytest.raises(CaseError) as info:
        load_case(folder)
    assert str(info.value).startswith(f"case Brats18_X: {packed}: unreadable NIfTI (")
    assert str(info.value).endswith("): it is not gzip-compressed; name it Brats18_X_t1.nii")
    _break_garbage(folder)  # neither gzip nor NIfTI: no name would do
    with pytest.raises(CaseError) as info:
        load_case(folder)
    assert str(info.value).endswith("not a gzip file)")


def test_a_truncated_nii_is_named_as_such(tmp_path):
    # nibabel says "Expected 15360 bytes, got 4648 bytes" (the whole volume read) or "Whoops,
    # not enough data in file" (a slice read: the placeholder check of eval.py and predict.py)
    folder, _ = write_case(tmp_path, "Brats18_X", ext=".nii")
    path = part_path(folder, "t1", ext=".nii")
    path.write_bytes(path.read_bytes()[:5000])  # of 352 header bytes and 15360 voxel bytes

    def checked(folder):  # eval.py's and predict.py's check before any work
        return brats.without_placeholders("Brats18_X", case_files(folder))

    for read in (load_case, checked):
        with pytest.raises(CaseError) as info:
            read(folder)
        assert str(info.value).startswith(f"case Brats18_X: {path}: unreadable NIfTI (")
        assert str(info.value).endswith("): truncated, 5000 bytes where its header says 15712: an "
                                        "interrupted copy or download? Copy it again")
    # cut inside its header: nibabel cannot even tell the file type
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CaseError) as info:
        load_case(folder)
    assert str(info.value).endswith("Cannot work out file type of \"" + str(path) + "\"): "
                                    "truncated, 200 bytes, shorter than its 348-byte header: an "
                                    "interrupted copy or download? Copy it again")
    # a .nii.gz cut: gzip says its stream ended early
    folder, _ = write_case(tmp_path, "Brats18_Z")
    path = part_path(folder, "t1")
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CaseError) as info:
        load_case(folder)
    assert str(info.value) == (
        f"case Brats18_Z: {path}: unreadable NIfTI (EOFError: Compressed file ended before the "
        "end-of-stream marker was reached): truncated, its compressed stream cut short: an "
        "interrupted copy or download? Copy it again")


def test_headers_are_checked_without_reading_the_voxels(tmp_path):
    folder, _ = write_case(tmp_path, "Brats18_X")
    _break_truncated(folder)  # a valid header over half the voxels
    files = case_files(folder)
    assert set(open_files("Brats18_X", files)) == set(files)  # the header check passes
    with pytest.raises(CaseError, match="unreadable NIfTI"):
        read_files("Brats18_X", files)  # reading the voxels does not
    _break_shape(folder)
    with pytest.raises(CaseError, match="Brats18_X_t2.nii.gz: shape"):
        open_files("Brats18_X", files)


def test_find_cases_and_duplicates(tmp_path, monkeypatch):
    for name in ("B", "A"):
        write_case(tmp_path / "root", name)
    (tmp_path / "root" / ".hidden").mkdir()
    assert find_cases(tmp_path / "root") == [tmp_path / "root" / "A", tmp_path / "root" / "B"]
    assert find_cases(tmp_path / "root" / "A") == [tmp_path / "root" / "A"]  # one case
    (tmp_path / "nothing").mkdir()
    with pytest.raises(DataError, match="holds neither NIfTI files nor case folders"):
        find_cases(tmp_path / "nothing")
    # eval.sh runs in the repository folder: a relative path is also named as it was looked for
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError) as error:
        find_cases("nonexistent")
    assert str(error.value) == f"nonexistent ({tmp_path / 'nonexistent'}): not found"
    with pytest.raises(DataError) as error:
        find_cases(tmp_path / "root" / "A" / "A_t1.nii.gz")
    assert str(error.value) == f"{tmp_path / 'root' / 'A' / 'A_t1.nii.gz'}: not a folder"
    with pytest.raises(CaseError, match="case A: list.csv: case name listed more than once: keep one entry"):
        refuse_duplicates([Path("HGG/A"), Path("B"), Path("LGG/A")], "list.csv")


def test_nifti_files_beside_case_folders_are_refused(tmp_path):
    # A template left at the top of a folder of cases made the whole folder one case.
    for name in ("A", "B"):
        write_case(tmp_path / "root", name)
    save(make_volumes()["t1"], tmp_path / "root" / "mni152_t1.nii.gz")
    with pytest.raises(DataError) as error:
        find_cases(tmp_path / "root")
    assert str(error.value) == (
        f"{tmp_path / 'root'}: NIfTI files ['mni152_t1.nii.gz'] lie beside case folders (e.g. A) "
        "and are not a case: move them out, or point --input at one case folder")
    # A sub-folder without NIfTI files (figures, notes) leaves a case folder one case; so does
    # one with NIfTI files (a backup of the scans) beside the case's own files.
    (tmp_path / "root" / "A" / "figures").mkdir()
    assert find_cases(tmp_path / "root" / "A") == [tmp_path / "root" / "A"]
    write_case(tmp_path / "root" / "A", "orig")
    assert find_cases(tmp_path / "root" / "A") == [tmp_path / "root" / "A"]


def test_a_case_folder_that_is_a_dead_link_is_named(tmp_path):
    write_case(tmp_path / "root", "A")
    (tmp_path / "root" / "B").symlink_to(tmp_path / "unmounted" / "B")
    with pytest.raises(CaseError) as error:
        find_cases(tmp_path / "root")
    assert str(error.value) == (f"case B: {tmp_path / 'root' / 'B'}: a dead link (to "
                                f"{tmp_path / 'unmounted' / 'B'}): mount the data or remove the link")
    # A dead link to a file (BraTS 2020's name_mapping.csv) is not a case folder.
    (tmp_path / "root" / "B").unlink()
    (tmp_path / "root" / "name_mapping.csv").symlink_to(tmp_path / "unmounted" / "name_mapping.csv")
    assert find_cases(tmp_path / "root") == [tmp_path / "root" / "A"]


def test_the_current_folder_is_named_after_itself(tmp_path, monkeypatch):
    # `--input .` from inside a case folder, or a list entry '.': Path('.').name is ''.
    folder, _ = write_case(tmp_path, "Brats18_A")
    (folder / "list.csv").write_text(".\n")
    monkeypatch.chdir(folder)
    assert [f.name for f in find_cases(".")] == ["Brats18_A"]
    assert [f.name for f in read_datalist("list.csv")] == ["Brats18_A"]
    assert load_case(find_cases(".")[0]).name == "Brats18_A"


def as_1mm(case):
    """A case read as if its files said 1 mm voxels (header and affine)."""
    case.spacing, case.affine = (1.0, 1.0, 1.0), np.eye(4)


def test_brats_like_warnings(tmp_path):
    folder, volumes = write_case(tmp_path, "Brats18_X")
    # ZOOMS (1, 1.5, 2) mm: not the 1 mm BraTS is resampled to
    assert brats_like_warnings(load_case(folder)) == [
        "case Brats18_X: voxel size 1 x 1.5 x 2 mm; a BraTS-trained model expects about 1 mm "
        "isotropic volumes (resample them first)"]
    case = load_case(folder)
    case.spacing = (1.0, 1.0, 1.0)  # the header's pixdim alone says 1 mm: contradicts the affine
    assert brats_like_warnings(case) == [
        "case Brats18_X: voxel size 1 x 1 x 1 mm in the header (pixdim), 1 x 1.5 x 2 mm in its "
        "affine: distances (HD95) use the pixdim; fix the header"]
    as_1mm(case)  # nothing else to say
    assert brats_like_warnings(case) == []
    # not skull-stripped: no background voxel is 0
    save(volumes["t1"] + np.int16(1), part_path(folder, "t1"))
    # not co-registered: the brain (non-zero voxels) moved 6 voxels along x, of 18
    save(np.roll(volumes["t2"], 6, axis=0), part_path(folder, "t2"))
    case = load_case(folder)
    as_1mm(case)
    dice = 2 * (12 * 14 * 12) / (2 * 18 * 14 * 12)  # overlapping boxes, by hand: 0.67
    assert brats_like_warnings(case) == [
        "case Brats18_X: Brats18_X_t1.nii.gz: only 0% of the voxels are 0; not skull-stripped? "
        "BraTS volumes are skull-stripped with a background of exactly 0 (about 80 % of the voxels)",
        f"case Brats18_X: Brats18_X_t2.nii.gz: its non-zero voxels (the brain) overlap those of "
        f"Brats18_X_flair.nii.gz with a Dice of only {dice:.2f}; not co-registered, or "
        "skull-stripped differently?"]
    # a corner voxel that is not the background: the normalisation takes it for it
    case.image[0][0, 0, 0] = 7
    background = 1 - np.count_nonzero(case.image[0]) / case.image[0].size
    assert brats_like_warnings(case)[0] == (
        f"case Brats18_X: Brats18_X_flair.nii.gz: its corner voxel is 7, not 0: the normalisation "
        f"takes the corner's value for the background (as published), so the {background:.0%} of "
        "the voxels that are 0 are normalised as brain; BraTS volumes are 0 outside the brain")
    # a label map given as a scan (named anyhow): only 0, 1, 2, 4 in it, which no scan holds;
    # not compared with the others' brain
    save(volumes["seg"].astype(np.int16), part_path(folder, "t2"))
    case = load_case(folder)
    as_1mm(case)
    assert brats_like_warnings(case)[1:] == [
        "case Brats18_X: Brats18_X_t2.nii.gz holds only whole numbers from 0 to 4, as a label map "
        "(segmentation) does: no scan does; check the files given as scans"]
    case.image[3] = case.image[3] * 0.5  # halved: 0.5 is no label, the brain compared instead
    assert len(brats_like_warnings(case)) == 2 and "overlap" in brats_like_warnings(case)[1]
    # two empty modalities: nothing to compare (numpy warned of 0/0 and the NaN said nothing)
    case.image[:] = 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert brats_like_warnings(case) == []


def test_axes_in_another_order_than_brats_are_warned_about(tmp_path):
    # the mask lies on the input's grid whatever it is, but the network was trained on axial
    # volumes: swapped axes gave plausible, wrong masks without a word
    folder, _ = write_case(tmp_path, "Brats18_X")
    case = load_case(folder)
    case.spacing = (1.0, 1.0, 1.0)  # nothing else to say
    for flips in ([1, 1, 1], [-1, -1, 1], [1, -1, -1]):  # RAS, LPS, ...: training mirrors axes
        case.affine = np.diag([*flips, 1.0])
        assert brats_like_warnings(case) == []
    # x posterior, y superior, z right: the axes in another order than BraTS's
    case.affine = np.array([[0, 0, 1, 0], [-1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1]], float)
    assert brats_like_warnings(case) == [
        "case Brats18_X: voxel axes PSR; a BraTS-trained model expects axial volumes, x "
        "left-right, y anterior-posterior, z inferior-superior (reorient them first, e.g. "
        "fslreorient2std)"]


def test_a_list_saved_with_a_byte_order_mark_reads_its_first_entry(tmp_path):
    # Excel's "CSV UTF-8" starts the file with one; Windows line ends too.
    write_case(tmp_path, "Brats18_A")
    (tmp_path / "list.csv").write_bytes("\ufeffBrats18_A\r\n".encode())
    assert read_datalist(tmp_path / "list.csv") == [tmp_path / "Brats18_A"]


@pytest.mark.parametrize("text, encoding, line, byte", [
    ("Brats18_A\r\n", "utf-16", 1, 0xff),  # Windows' "Unicode", with its byte-order mark
    ("Brats18_A\nBrats18_\xe9\n", "latin-1", 2, 0xe9),
])
def test_a_list_that_is_not_utf8_is_named(tmp_path, text, encoding, line, byte):
    (tmp_path / "list.csv").write_bytes(text.encode(encoding))
    with pytest.raises(DataError) as error:
        read_datalist(tmp_path / "list.csv")
    assert str(error.value) == (f"cannot read datalist {tmp_path / 'list.csv'}: line {line} is not "
                                f"UTF-8 text (byte 0x{byte:02x}); save the list as UTF-8 text")


def test_a_list_in_utf16_without_a_byte_order_mark_is_named(tmp_path):
    (tmp_path / "list.csv").write_bytes("Brats18_A\r\nBrats18_B\r\n".encode("utf-16-le"))
    with pytest.raises(DataError) as error:
        read_datalist(tmp_path / "list.csv")
    assert str(error.value) == (f"cannot read datalist {tmp_path / 'list.csv'}: line 1 holds NUL "
                                "bytes (UTF-16 text?); save the list as UTF-8 text")


def test_one_folder_under_two_names_is_refused(tmp_path):
    folder, _ = write_case(tmp_path, "Brats18_A")
    (tmp_path / "Alias").symlink_to(folder)
    with pytest.raises(CaseError, match="case Alias: list.csv: the same folder as Brats18_A"):
        refuse_duplicates([folder, tmp_path / "B", tmp_path / "Alias"], "list.csv")


def test_a_placeholder_is_all_zero_and_a_scan_is_told_apart_without_reading_its_voxels(
        tmp_path, monkeypatch):
    # is_placeholder is asked of every modality file before any work: a .nii.gz scan is ruled
    # out by its size, an uncompressed one by its middle slice.
    zeros = np.zeros(SHAPE, np.int16)
    one_voxel = zeros.copy()
    one_voxel[0, 0, 0] = 1  # outside the middle slice: the whole file is read to find it
    scan = make_volumes()["t1ce"]
    for name, data in (("zeros", zeros), ("one_voxel", one_voxel), ("scan", scan)):
        for suffix in (".nii", ".nii.gz"):
            save(data, tmp_path / f"{name}{suffix}")
    expected = {"zeros.nii": True, "zeros.nii.gz": True, "one_voxel.nii": False,
                "one_voxel.nii.gz": False, "scan.nii": False, "scan.nii.gz": False}
    assert {name: brats.is_placeholder("X", tmp_path / name, nib.load(tmp_path / name))
            for name in expected} == expected

    def read_whole(*args):
        raise AssertionError("the whole file was read")
    monkeypatch.setattr(brats, "_in_memory", read_whole)
    for name in ("scan.nii", "scan.nii.gz"):
        assert not brats.is_placeholder("X", tmp_path / name, nib.load(tmp_path / name))


def test_placeholders_are_dropped_whatever_their_grid_and_the_scans_grid_is_checked(tmp_path):
    # A placeholder is often written with a default affine (np.eye(4)); it is never read, so its
    # grid does not matter, and the case's grid is that of its scans, not of its first file.
    folder, _ = write_case(tmp_path, "Brats18_X")
    files = find_case_files(folder)
    save_placeholder(files["flair"], np.eye(4))
    kept, dropped = brats.without_placeholders("Brats18_X", files)
    assert dropped == {"flair": files["flair"]}
    assert kept == {part: path for part, path in files.items() if part != "flair"}
    # read as a whole case (training), the placeholder's grid is named, and what it is
    with pytest.raises(CaseError) as error:
        brats.open_files("Brats18_X", files)
    assert str(error.value) == off_grid_placeholder(files["flair"], "Brats18_X_t1.nii.gz")
    save(make_volumes()["flair"], files["flair"])  # the placeholder not the first file
    save_placeholder(files["t2"], np.eye(4))
    with pytest.raises(CaseError, match=f"^case Brats18_X: {files['t2']}: all zero, the "
                                        "placeholder of a missing modality, on another grid than "
                                        "Brats18_X_flair.nii.gz: "):
        brats.open_files("Brats18_X", files)
    save_placeholder(files["flair"], np.eye(4))

    save(make_volumes()["t2"], files["t2"], affine=np.eye(4))  # a scan off the grid: refused
    with pytest.raises(CaseError, match=f"case Brats18_X: {files['t2']}: affine differs from "
                                        "Brats18_X_t1.nii.gz"):
        brats.without_placeholders("Brats18_X", files)
    for part in MODALITIES:
        save_placeholder(files[part])
    with pytest.raises(CaseError, match=f"case Brats18_X: {files['flair']}: all zero, as every "
                                        "modality file of the case: nothing to predict from"):
        brats.without_placeholders("Brats18_X", files)


def test_a_placeholder_on_the_grid_is_not_named_for_another_file_off_it(tmp_path):
    # The placeholder is named only when it is the file off the scans' grid: a first-file
    # placeholder on the grid, with the seg or a scan off it, leaves that file named.
    folder, volumes = write_case(tmp_path, "Brats18_X")
    files = find_case_files(folder)
    save_placeholder(files["flair"])  # on the grid
    save(volumes["seg"], files["seg"], affine=np.eye(4))
    with pytest.raises(CaseError, match=f"^case Brats18_X: {files['seg']}: affine differs from "
                                        "Brats18_X_t1.nii.gz"):
        brats.open_files("Brats18_X", files)
    save(volumes["seg"], files["seg"])
    save(volumes["t1ce"], files["t1ce"], affine=np.eye(4))
    with pytest.raises(CaseError, match=f"^case Brats18_X: {files['t1ce']}: affine differs from "
                                        "Brats18_X_t1.nii.gz"):
        brats.open_files("Brats18_X", files)
    save(volumes["t1ce"], files["t1ce"])
    for part in ("flair", "t2"):  # two placeholders off the grid: both named
        save_placeholder(files[part], np.eye(4))
    with pytest.raises(CaseError) as error:
        brats.open_files("Brats18_X", files)
    assert str(error.value) == off_grid_placeholder(
        files["flair"], "Brats18_X_t1.nii.gz (so is Brats18_X_t2.nii.gz)")
    not_zero = np.zeros(SHAPE, np.int16)
    not_zero[0, 0, 0] = 1  # not a placeholder: the grids are compared as for scans
    save(not_zero, files["flair"], affine=np.eye(4))
    save(volumes["t2"], files["t2"])
    with pytest.raises(CaseError, match=f"^case Brats18_X: {files['t1']}: affine differs from "
                                        "Brats18_X_flair.nii.gz"):
        brats.open_files("Brats18_X", files)
