"""The synthetic BraTS-like generator: layout, file format, determinism and designed contrasts."""
import gzip
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from datasets import synthetic
from datasets.brats import case_files, load_case, read_datalist
from datasets.normalize import case_params
from utils.cli import UsageError
from utils.modalities import MODALITIES
from utils.regions import REGIONS, labels_to_regions

ROOT = Path(__file__).resolve().parents[1]
SMALL = (48, 48, 32)
FILES = (*MODALITIES, "seg")


def _read_case(case_dir, fmt):
    """{name: array} for the four modalities and seg, plus the FLAIR image (for its header)."""
    name = case_dir.name
    imgs = {k: nib.load(case_dir / f"{name}_{k}.{fmt}") for k in FILES}
    return {k: np.asarray(img.dataobj) for k, img in imgs.items()}, imgs["flair"]


@pytest.fixture(scope="module")
def contrast_cases(tmp_path_factory):
    """Four 96 x 96 x 64 cases, read back from disk."""
    out = tmp_path_factory.mktemp("synth96")
    dirs = synthetic.generate(out, 4, shape_xyz=(96, 96, 64), seed=3, fmt="nii")
    return [_read_case(d, "nii")[0] for d in dirs]


def test_writing_over_an_earlier_dataset_leaves_one_file_per_part_and_names_extra_cases(
        tmp_path, capsys):
    synthetic.main(["--out_dir", str(tmp_path), "--num_cases", "3", "--shape", "16,16,16"])
    capsys.readouterr()
    synthetic.main(["--out_dir", str(tmp_path), "--num_cases", "2", "--shape", "16,16,16",
                    "--format", "nii"])
    for name in ("Synth_0000", "Synth_0001"):  # the .nii.gz files of the earlier run are gone
        assert sorted(p.name for p in (tmp_path / name).iterdir()) == sorted(
            f"{name}_{k}.nii" for k in FILES)
    assert capsys.readouterr().err == (
        f"warning: {tmp_path} also holds 1 case folder(s) of an earlier run (Synth_0002), in none "
        "of its lists: delete them before reading the folder as a whole (eval.py --input)\n")


def test_reuse_keeps_the_same_dataset_and_refuses_one_of_other_settings(tmp_path, capsys):
    # run.sh demo: a second run must neither rewrite the data nor train on a dataset of other
    # DEMO_CASES / DEMO_SHAPE without a word.
    flags = ["--out_dir", str(tmp_path), "--num_cases", "2", "--shape", "16,16,16", "--reuse"]
    synthetic.main(flags)
    assert json.loads((tmp_path / "synthetic.json").read_text()) == {
        "layout": "flat", "num_cases": 2, "shape": [16, 16, 16], "seed": 0, "format": "nii.gz"}
    flair = tmp_path / "Synth_0000" / "Synth_0000_flair.nii.gz"
    written = flair.stat().st_mtime_ns
    capsys.readouterr()
    synthetic.main(flags)
    assert capsys.readouterr().out == f"{tmp_path}: the synthetic dataset of these settings, kept (synthetic.json)\n"
    assert flair.stat().st_mtime_ns == written
    with pytest.raises(UsageError) as error:
        synthetic.main([*flags[:4], "--shape", "16,16,24", "--reuse"])
    assert str(error.value) == (
        f"{tmp_path} holds a synthetic dataset of 2 cases of 16x16x16, seed 0, nii.gz, not 2 cases "
        "of 16x16x24, seed 0, nii.gz: delete the folder to generate it again, or give another one "
        "(DEMO_DATA for run.sh demo)")
    assert flair.stat().st_mtime_ns == written
    # without --reuse the folder is written again, with the new settings recorded
    synthetic.main([*flags[:4], "--shape", "16,16,24"])
    assert nib.load(flair).shape == (16, 16, 24)
    assert json.loads((tmp_path / "synthetic.json").read_text())["shape"] == [16, 16, 24]
    # a dataset of an older version (no record) is generated again: the same settings, the same bytes
    (tmp_path / "synthetic.json").unlink()
    before = _sha(flair)
    synthetic.main([*flags[:4], "--shape", "16,16,24", "--reuse"])
    assert _sha(flair) == before and (tmp_path / "synthetic.json").is_file()


@pytest.mark.parametrize("record, why", [("{", "Expecting property name enclosed in double quotes: "
                                                  "line 1 column 2 (char 1)"),
                                          ("[]", "not a record of settings"),
                                          ('{"shape": 5}', "not a record of settings")])
def test_reuse_names_a_record_it_cannot_read(tmp_path, record, why):
    (tmp_path / "synthetic.json").write_text(record)
    with pytest.raises(UsageError) as error:
        synthetic.main(["--out_dir", str(tmp_path), "--num_cases", "2", "--shape", "16,16,16",
                        "--reuse"])
    assert str(error.value) == (f"{tmp_path / 'synthetic.json'}: unreadable ({why}); delete it to "
                                "generate the dataset again")


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_cli_writes_brats_layout(tmp_path):
    synthetic.main(["--out_dir", str(tmp_path), "--num_cases", "3", "--shape", "48,48,32",
                    "--seed", "1"])
    names = ["Synth_0000", "Synth_0001", "Synth_0002"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        names + ["synthetic.json", "test.csv", "train.csv", "val.csv"])
    for name in names:
        assert sorted(p.name for p in (tmp_path / name).iterdir()) == sorted(
            f"{name}_{k}.nii.gz" for k in FILES)
        arrays, flair = _read_case(tmp_path / name, "nii.gz")
        expected_affine = np.array([[-1, 0, 0, 0], [0, -1, 0, 47], [0, 0, 1, 0], [0, 0, 0, 1]])
        np.testing.assert_array_equal(flair.affine, expected_affine)
        assert flair.header.get_zooms() == (1.0, 1.0, 1.0)
        for k, a in arrays.items():
            assert a.shape == SMALL
            assert a.dtype == (np.uint8 if k == "seg" else np.int16)
        seg = arrays["seg"]
        assert set(np.unique(seg)) <= {0, 1, 2, 4}
        assert {2, 4} <= set(np.unique(seg))  # every case has a tumour with an enhancing part
        brain = arrays["t1"] > 0
        assert 0.05 < brain.mean() < 0.4
        for k in MODALITIES:  # same brain mask, non-negative, background exactly 0
            assert arrays[k].min() == 0
            np.testing.assert_array_equal(arrays[k] > 0, brain)
        assert not seg[~brain].any()
        assert not brain[0].any() and not brain[:, :, -1].any()  # a margin of background
    lists = {s: (tmp_path / f"{s}.csv").read_text().splitlines() for s in ("train", "val", "test")}
    assert lists == {"train": ["Synth_0000"], "val": ["Synth_0001"], "test": ["Synth_0002"]}


def test_brats18_layout_serves_the_official_lists(tmp_path, capsys):
    # So that DATA_ROOT=<it> bash run.sh / eval.sh run with the official lists before the data come.
    synthetic.main(["--out_dir", str(tmp_path), "--layout", "brats18", "--shape", "16,16,16"])
    assert capsys.readouterr().out.startswith(f"wrote 351 cases of 16x16x16 to {tmp_path} in the "
                                              "BraTS 2018 layout")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "MICCAI_BraTS_2018_Data_Training", "MICCAI_BraTS_2018_Data_Validation", "synthetic.json"]
    lists = ROOT / "datalist" / "BraTS18"
    for name, count, labelled in (("BraTS18_train_all.csv", 285, True), ("BraTS18_train.csv", 228, True),
                                  ("BraTS18_val.csv", 57, True), ("BraTS18_test.csv", 66, False)):
        folders = read_datalist(lists / name, tmp_path)
        assert len(folders) == count
        for folder in folders:
            assert ("seg" in case_files(folder)) == labelled, folder
    hgg = tmp_path / "MICCAI_BraTS_2018_Data_Training" / "HGG"
    assert len(list(hgg.iterdir())) + len(list(hgg.with_name("LGG").iterdir())) == 285
    # the training list's first case is the generator's case 0, as in the flat layout
    first = read_datalist(lists / "BraTS18_train_all.csv", tmp_path)[0]
    flat = synthetic.generate(tmp_path / "flat", 1, shape_xyz=(16, 16, 16))[0]
    for part in FILES:
        np.testing.assert_array_equal(
            np.asarray(nib.load(first / f"{first.name}_{part}.nii.gz").dataobj),
            np.asarray(nib.load(flat / f"{flat.name}_{part}.nii.gz").dataobj))


def test_generate_nii_and_splits(tmp_path):
    dirs = synthetic.generate(tmp_path, 5, shape_xyz=SMALL, seed=0, fmt="nii")
    assert dirs == [tmp_path / f"Synth_{k:04d}" for k in range(5)]
    assert (dirs[4] / "Synth_0004_t1ce.nii").is_file()
    assert not list(tmp_path.rglob("*.gz")) and not list(tmp_path.rglob("*.tmp*"))
    lists = [(tmp_path / f"{s}.csv").read_text().splitlines() for s in ("train", "val", "test")]
    assert [len(x) for x in lists] == [3, 1, 1]
    assert sorted(sum(lists, [])) == [d.name for d in dirs]  # each case exactly once


@pytest.mark.parametrize("n, counts", [(1, (1, 0, 0)), (2, (1, 1, 0)), (3, (1, 1, 1)),
                                       (5, (3, 1, 1)), (20, (12, 4, 4)), (7, (5, 1, 1))])
def test_split_counts(n, counts):
    assert synthetic.split_counts(n) == counts


def test_bad_arguments():
    with pytest.raises(ValueError, match="fmt"):
        synthetic.generate("unused", 1, fmt="mha")
    with pytest.raises(ValueError, match="num_cases"):
        synthetic.generate("unused", 0)


@pytest.mark.parametrize("flags, expected", [
    (["--num_cases", "0"], "argument --num_cases: must be at least 1, got 0"),
    (["--num_cases", "2", "--shape", "8,64,64"], "argument --shape: must be three comma-separated sizes >= 16, got '8,64,64'"),
    (["--num_cases", "2", "--shape", "64,64"], "argument --shape: must be three comma-separated sizes >= 16, got '64,64'"),
    (["--num_cases", "2", "--shape", "64,64,3_2"], "argument --shape: must be three comma-separated sizes >= 16, got '64,64,3_2'"),
    (["--num_cases", "2", "--shape", "+64,64,32"], "argument --shape: must be three comma-separated sizes >= 16, got '+64,64,32'"),
    (["--num_cases", "1", "--out_dir", ""], "argument --out_dir: expected a path, got ''"),
    ([], "--num_cases is needed by the flat layout, and has no use in the brats18 layout (the "
         "official lists' 351 cases)"),
    (["--num_cases", "3", "--layout", "brats18"], "--num_cases is needed by the flat layout, and "
     "has no use in the brats18 layout (the official lists' 351 cases)"),
])
def test_cli_mistakes_are_one_line(tmp_path, flags, expected):
    run = subprocess.run([sys.executable, "-m", "datasets.synthetic", "--out_dir", str(tmp_path / "out"),
                          *flags], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 2
    assert run.stderr == f"error: {expected} (see python -m datasets.synthetic --help)\n"
    assert not (tmp_path / "out").exists()


def test_an_out_dir_that_is_a_file_is_one_line(tmp_path):
    (tmp_path / "out").write_text("notes")
    run = subprocess.run([sys.executable, "-m", "datasets.synthetic", "--out_dir",
                          str(tmp_path / "out"), "--num_cases", "1"], capture_output=True,
                         text=True, cwd=ROOT)
    assert (run.returncode, run.stderr) == (1, (
        f"error: cannot write in {tmp_path / 'out'}: {tmp_path / 'out'} is a file, not a folder; "
        "choose another folder, or fix its permissions\n"))
    assert (tmp_path / "out").read_text() == "notes"


@pytest.mark.parametrize("shape", [(16, 16, 16), (16, 48, 32), (32, 32, 24), (48, 48, 32),
                                   (64, 64, 32)])
def test_every_case_normalises_at_small_shapes(tmp_path, shape):
    """The published normalisation clips at the last intensity level holding 50 voxels: small
    brains spread over the full-size intensity range had none (16 of 64 modalities at
    48 x 48 x 32, seeds 2-5), and train.py, eval.py and predict.py refused them."""
    for seed in range(1, 6):
        for folder in synthetic.generate(tmp_path / str(seed), 4, shape, seed=seed, fmt="nii"):
            params = case_params(load_case(folder))  # a CaseError names the case and file
            top, background = params[:, 0], params[:, 1]
            assert (background == 0).all() and (top > 1).all()


def test_same_seed_same_bytes(tmp_path):
    a = synthetic.generate(tmp_path / "a", 2, shape_xyz=SMALL, seed=7)
    b = synthetic.generate(tmp_path / "b", 2, shape_xyz=SMALL, seed=7)
    c = synthetic.generate(tmp_path / "c", 1, shape_xyz=SMALL, seed=8)
    one = synthetic.generate(tmp_path / "one", 1, shape_xyz=SMALL, seed=7)
    for k in FILES:
        files = [d[0] / f"Synth_0000_{k}.nii.gz" for d in (a, b, c, one)]
        data = [f.read_bytes() for f in files]
        assert data[0] == data[1] == data[3]  # case 0 does not depend on the number of cases
        assert data[0] != data[2]
        with gzip.open(files[0]) as g:  # and the gzip stream holds the plain NIfTI
            assert g.read(348)[344:348] == b"n+1\0"
        assert data[0][4:8] == b"\0\0\0\0"  # gzip mtime
    assert (a[1] / "Synth_0001_t1.nii.gz").read_bytes() != (a[0] / "Synth_0000_t1.nii.gz").read_bytes()


def _means(arrays):
    brain = arrays["t1"] > 0
    seg = arrays["seg"]
    masks = {"normal": brain & (seg == 0), "ED": seg == 2, "ET": seg == 4, "NCR": seg == 1}
    return {m: {r: arrays[m][mask].astype(np.float64).mean() if mask.any() else np.nan
                for r, mask in masks.items()} for m in MODALITIES}


def test_designed_contrasts(contrast_cases):
    saw_necrosis = False
    for arrays in contrast_cases:
        mean = _means(arrays)
        t1ce, flair, t2 = mean["t1ce"], mean["flair"], mean["t2"]
        assert t1ce["ET"] > 1.2 * t1ce["ED"] and t1ce["ET"] > 1.2 * t1ce["normal"]
        assert flair["ED"] > 1.3 * flair["normal"]
        assert t2["ED"] > 1.3 * t2["normal"]
        if not np.isnan(t1ce["NCR"]):
            saw_necrosis = True
            assert t2["NCR"] > 1.3 * t2["normal"]
            assert t1ce["NCR"] < 0.7 * t1ce["ET"]
        # Tumour vs normal brain, in units of the normal tissue's spread: weak on T1.
        brain, tumour = (arrays["t1"] > 0) & (arrays["seg"] == 0), arrays["seg"] > 0
        effect = {m: abs(arrays[m][tumour].mean() - arrays[m][brain].mean())
                  / arrays[m][brain].std() for m in ("t1", "flair")}
        assert effect["t1"] < 0.5 * effect["flair"]
    assert saw_necrosis


def _best_threshold_dice(x, y):
    """Best Dice of (x > t) or (x < t) against the boolean y over every threshold t.

    Sorting x descending, predicting the top k voxels gives Dice 2 TP_k / (k + |y|); only cuts
    between distinct values are thresholds.
    """
    best = 0.0
    for s in (x, -x):
        order = np.argsort(-s, kind="stable")
        sv = s[order]
        tp = np.cumsum(y[order])
        k = np.arange(1, len(s) + 1)
        cut = np.r_[sv[1:] != sv[:-1], True]
        best = max(best, float((2 * tp / (k + y.sum()))[cut].max()))
    return best


def test_best_dice_helper():
    x = np.array([0.1, 0.5, 0.9, 0.7])
    assert _best_threshold_dice(x, np.array([0, 0, 1, 1], bool)) == 1.0
    assert _best_threshold_dice(x, np.array([1, 0, 0, 0], bool)) == 1.0  # x < t
    # y = {0.9, 0.1}: best is the top 1 (2/3) or everything (2*2/6 = 2/3)... or bottom 1: 2/3.
    assert _best_threshold_dice(x, np.array([1, 0, 1, 0], bool)) == pytest.approx(2 / 3)


def test_best_single_modality(contrast_cases):
    """A single threshold on the slightly smoothed image, chosen per case, finds ET and TC best
    on T1ce and WT best on FLAIR, then T2: the ordering teacher election should find."""
    dice = np.zeros((len(contrast_cases), len(REGIONS), len(MODALITIES)))
    for c, arrays in enumerate(contrast_cases):
        brain = arrays["t1"] > 0
        regions = labels_to_regions(arrays["seg"])
        for m, name in enumerate(MODALITIES):
            x = gaussian_filter(arrays[name].astype(np.float32), 0.5)[brain]
            for r in range(len(REGIONS)):
                dice[c, r, m] = _best_threshold_dice(x, regions[r][brain])
    mean = dict(zip(REGIONS, dice.mean(0)))
    order = {r: [MODALITIES[i] for i in np.argsort(-mean[r])] for r in REGIONS}
    assert order["ET"][0] == "t1ce" and order["TC"][0] == "t1ce"
    assert order["WT"][:2] == ["flair", "t2"]
    assert mean["ET"][2] > mean["ET"].max(initial=0, where=np.arange(4) != 2) + 0.3
