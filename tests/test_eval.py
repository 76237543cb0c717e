import argparse
import contextlib
import dataclasses
import gzip
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

import eval as evaluate
import models
from datasets.brats import DataError, read_datalist
from launch import script_env, torchrun_command
from test_demo import LOCAL, REPO
from test_shell import copy_scripts
from test_figures import assert_regions_drawn, read_png
from test_metrics import line_and_voxel
from utils import figures
from utils.inference import predict_subsets
from utils.lock import exclusive_lock
from utils.metrics import hd95
from utils.modalities import ALL_SUBSETS, subset_name
from utils.segment import add_model_args, load_model, segment as real_segment
from utils.cli import UsageError, run_cli


def argv(root, out, *flags, data_list="cases.csv", data_root=None):
    return ["--data_list", str(root / data_list), "--data_root", str(data_root or root / "data"),
            "--restore_from", str(root / "final.pth"), "--output_dir", str(out), "--device", "cpu",
            *flags]


def run(root, out, *flags, **lists):
    return evaluate.main(argv(root, out, *flags, **lists))


def test_mode_all_writes_15_subsets_and_table_equal_to_single_runs(segmentation_setup, tmp_path):
    root, cases = segmentation_setup
    table = run(root, tmp_path / "all", "--mode", "all")

    folders = sorted(p.name for p in (tmp_path / "all").iterdir() if p.is_dir())
    assert folders == sorted(subset_name(s) for s in ALL_SUBSETS)
    for folder in folders:
        assert sorted(p.name for p in (tmp_path / "all" / folder).iterdir()) == \
            sorted(f"{c.name}.nii.gz" for c in cases)

    # an exported mask lies on the input's grid
    reference = nib.load(cases[0] / f"{cases[0].name}_flair.nii.gz")
    mask = nib.load(tmp_path / "all" / "flair" / f"{cases[0].name}.nii.gz")
    assert mask.shape == reference.shape
    np.testing.assert_array_equal(mask.affine, reference.affine)
    assert set(np.unique(np.asanyarray(mask.dataobj))) <= {0, 1, 2, 4}

    # the paper's table: 15 subset rows in ALL_SUBSETS order + mean, presence markers
    summary = pd.read_csv(tmp_path / "all" / "summary.csv", keep_default_na=False)
    assert len(summary) == 16 and len(table) == 16
    assert list(summary.columns) == ["subset", "FLAIR", "T1", "T1ce", "T2", "cases", "ET Dice",
                                     "TC Dice", "WT Dice", "ET HD95", "TC HD95", "WT HD95"]
    assert summary["subset"].tolist() == [subset_name(s) for s in ALL_SUBSETS] + ["mean"]
    assert (summary["cases"] == 2).all()
    assert summary.loc[4, ["FLAIR", "T1", "T1ce", "T2"]].tolist() == ["●", "●", "○", "○"]
    for column in ("ET Dice", "WT HD95"):
        assert summary[column].iloc[-1] == pytest.approx(summary[column].iloc[:15].mean())
    markdown = (tmp_path / "all" / "summary.md").read_text().splitlines()
    assert len(markdown) == 2 + 16 and markdown[0].startswith("| subset | FLAIR |")

    # per-case metrics, and the table is their mean (Dice in %)
    metrics = pd.read_csv(tmp_path / "all" / "metrics.csv")
    assert len(metrics) == 2 * 15 * 3
    assert list(metrics.columns) == ["case", "subset", "region", "dice", "hd95",
                                     "sensitivity", "specificity"]
    et_flair = metrics[(metrics.subset == "flair") & (metrics.region == "ET")].dice.mean()
    assert summary.loc[0, "ET Dice"] == pytest.approx(100 * et_flair)
    # ... and each row scores the exported mask against the case's seg file (recomputed here)
    for case in cases:
        seg = nib.load(case / f"{case.name}_seg.nii.gz")
        truth, spacing = np.asanyarray(seg.dataobj), seg.header.get_zooms()[:3]
        for subset in ("flair", "t1ce", "flair+t1+t1ce+t2"):
            mask = np.asanyarray(nib.load(tmp_path / "all" / subset / f"{case.name}.nii.gz").dataobj)
            for region, labels in (("ET", (4,)), ("WT", (1, 2, 4)), ("TC", (1, 4))):
                p, g = np.isin(mask, labels), np.isin(truth, labels)
                total = int(p.sum() + g.sum())
                row = metrics[(metrics.case == case.name) & (metrics.subset == subset)
                              & (metrics.region == region)]
                assert row.dice.item() == pytest.approx(2 * (p & g).sum() / total if total else 1.0)
                assert row.hd95.item() == pytest.approx(hd95(p, g, spacing))

    # one pass for all subsets gives the same masks as one run per subset, up to voxels
    # whose probability is within float rounding of 0.5 (the encoder's batch differs; the
    # random network's logits crowd around 0): the probabilities are compared below.
    for subset in [(0,), (1, 3)]:
        name = subset_name(subset)
        run(root, tmp_path / name, "--mode", ",".join(map(str, subset)), data_list="one.csv")
        for case in cases[1:]:
            single = np.asanyarray(nib.load(tmp_path / name / name / f"{case.name}.nii.gz").dataobj)
            joint = np.asanyarray(nib.load(tmp_path / "all" / name / f"{case.name}.nii.gz").dataobj)
            assert np.count_nonzero(single != joint) <= 1e-4 * single.size


def test_joint_probabilities_equal_single_subset_runs(segmentation_setup):
    root, _ = segmentation_setup
    args = evaluate.parse_args(["--restore_from", "unused", "--input_size", "16,32,32"])
    model, _, window = load_model(root / "final.pth", args, torch.device("cpu"))
    image = torch.randn(4, 16, 32, 32)
    joint = predict_subsets(model, image, ALL_SUBSETS, window, "probabilities")
    for i in (0, 14):
        single = predict_subsets(model, image, [ALL_SUBSETS[i]], window, "probabilities")[0]
        torch.testing.assert_close(joint[i], single, rtol=0, atol=1e-5)


def test_flags_override_the_checkpoint_and_unlabelled_cases_are_only_exported(segmentation_setup, tmp_path):
    root, cases = segmentation_setup
    unlabelled = tmp_path / "data" / cases[0].name
    shutil.copytree(cases[0], unlabelled)
    (unlabelled / f"{cases[0].name}_seg.nii.gz").unlink()
    (tmp_path / "list.csv").write_text(f"{cases[0].name}\n")
    out = tmp_path / "out"
    # published list lookup: --data_dir + --data_list; entries re-based by --data_root
    result = evaluate.main(["--data_dir", str(tmp_path), "--data_list", "list.csv", "--data_root",
                            str(tmp_path / "data"), "--restore_from", str(root / "final.pth"),
                            "--output_dir", str(out), "--mode", "flair,t1ce",
                            "--input_size", "16,32,32", "--weight_std", "True",
                            "--gaussian", "--overlap", "1/2", "--device", "cpu"])
    assert result is None
    assert (out / "flair+t1ce" / f"{cases[0].name}.nii.gz").is_file()
    assert not (out / "metrics.csv").exists() and not (out / "summary.csv").exists()
    config = (out / "eval_config.json").read_text()
    assert '"window": [\n    16,\n    32,\n    32\n  ]' in config
    assert '"overlap": 0.5' in config


def test_an_empty_data_root_is_no_data_root_as_in_train(tmp_path, monkeypatch):
    # Entries then resolve against the list's folder; '' used to re-base them onto the
    # current folder, where train.py reads '' as no data root.
    (tmp_path / "lists" / "Brats18_X").mkdir(parents=True)
    (tmp_path / "lists" / "l.csv").write_text("Brats18_X\n")
    (tmp_path / "cwd" / "Brats18_X").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "cwd")
    args = evaluate.parse_args(["--data_list", str(tmp_path / "lists" / "l.csv"), "--data_root",
                                "", "--restore_from", "x.pth"])
    assert evaluate.case_folders(args) == [tmp_path / "lists" / "Brats18_X"]


def test_model_flags_and_bad_modes_are_checked(segmentation_setup, tmp_path):
    root, _ = segmentation_setup
    with pytest.raises(ValueError, match="training mode"):
        run(root, tmp_path, "--mode", "random")
    with pytest.raises(UsageError, match="--norm_cfg BN: checkpoint .* trained with --norm_cfg IN"):
        run(root, tmp_path, "--activation_cfg", "ReLU", "--norm_cfg", "BN")
    with pytest.raises(SystemExit):
        evaluate.parse_args(["--restore_from", "x", "--weight_std", "maybe"])
    assert evaluate.parse_args(["--restore_from", "x", "--weight_std", "False"]).weight_std is False


def test_summary_table_by_hand():
    rows = []
    for case, (d1, d2) in {"a": (0.5, 1.0), "b": (0.7, 0.0)}.items():
        for region in ("ET", "WT", "TC"):
            rows.append({"case": case, "subset": "flair", "region": region, "dice": d1, "hd95": 2.0})
            rows.append({"case": case, "subset": "t1+t2", "region": region, "dice": d2, "hd95": 4.0})
    table = evaluate.summary_table(pd.DataFrame(rows), [(0,), (1, 3)])
    assert table["ET Dice"].tolist() == pytest.approx([60.0, 50.0, 55.0])
    assert table["TC HD95"].tolist() == pytest.approx([2.0, 4.0, 3.0])
    assert table["cases"].tolist() == [2, 2, 2]
    assert table.loc[1, ["FLAIR", "T1", "T1ce", "T2"]].tolist() == ["○", "●", "○", "●"]
    assert table.loc[2, "subset"] == "mean" and table.loc[2, "FLAIR"] == ""

    # --mode available: each case in its own subset (a: flair; b, c: t1+t2); the mean row is
    # the mean over the three cases, (50 + 0 + 30) / 3, not over the two subsets' means
    rows = [{"case": case, "subset": subset, "region": region, "dice": dice, "hd95": hd95}
            for case, subset, dice, hd95 in (("a", "flair", 0.5, 1.0), ("b", "t1+t2", 0.0, 373.13),
                                            ("c", "t1+t2", 0.3, 4.0))
            for region in ("ET", "WT", "TC")]
    table = evaluate.summary_table(pd.DataFrame(rows), [(0,), (1, 3)])
    assert table["cases"].tolist() == [1, 2, 3]
    assert table["WT Dice"].tolist() == pytest.approx([50.0, 15.0, 80 / 3])
    assert table["ET HD95"].tolist() == pytest.approx([1.0, 188.565, 378.13 / 3])


def test_a_case_that_cannot_be_normalised_names_the_case_and_file(segmentation_setup, tmp_path):
    root, cases = segmentation_setup
    bad = tmp_path / "data" / cases[0].name
    shutil.copytree(cases[0], bad)
    t1 = bad / f"{cases[0].name}_t1.nii.gz"
    image = nib.load(t1)
    nib.save(nib.Nifti1Image(np.zeros(image.shape, np.int16), image.affine, image.header), t1)
    (tmp_path / "bad.csv").write_text(f"{cases[0].name}\n")
    with pytest.raises(ValueError, match=f"{cases[0].name}.*_t1.nii.gz"):
        evaluate.main(["--data_list", str(tmp_path / "bad.csv"), "--data_root", str(tmp_path / "data"),
                       "--restore_from", str(root / "final.pth"), "--output_dir", str(tmp_path / "out"),
                       "--device", "cpu"])


# ----------------------------------------------------------------- incomplete cases, --input
def copy_cases(cases, folder, drop=()):
    """Copies of the case folders in `folder`, without the modality files named in `drop`."""
    for case in cases:
        shutil.copytree(case, folder / case.name)
        for modality in drop:
            (folder / case.name / f"{case.name}_{modality}.nii.gz").unlink()
    return folder


def renamed_copy(case, folder):
    """A copy of `case` as folder/<its name>, its files renamed: another case of the same data."""
    shutil.copytree(case, folder)
    for path in folder.iterdir():
        path.rename(folder / path.name.replace(case.name, folder.name))
    return folder


def masks(folder):
    return {p.name: np.asanyarray(nib.load(p).dataobj) for p in sorted(folder.glob("*.nii.gz"))}


def cli_error(main, argv):
    """A script's main as the shell runs it: the one-line message its user error exits with."""
    stderr = io.StringIO()
    with pytest.raises(SystemExit), contextlib.redirect_stderr(stderr):
        run_cli(main, argv=argv)
    return stderr.getvalue().strip()


def cli(argv):
    return cli_error(evaluate.main, argv)


def test_available_mode_equals_the_fixed_subset_on_complete_cases(segmentation_setup, tmp_path, capsys):
    root, cases = segmentation_setup
    incomplete = copy_cases(cases, tmp_path / "incomplete", drop=("t1", "t2"))
    common = ["--restore_from", str(root / "final.pth"), "--device", "cpu"]
    evaluate.main(["--input", str(incomplete), "--mode", "available",
                   "--output_dir", str(tmp_path / "available"), *common])
    printed = capsys.readouterr().out
    evaluate.main(["--input", str(root / "data"), "--mode", "flair,t1ce",
                   "--output_dir", str(tmp_path / "fixed"), *common])

    available = masks(tmp_path / "available" / "available")
    fixed = masks(tmp_path / "fixed" / "flair+t1ce")
    assert sorted(available) == sorted(fixed) == [f"{c.name}.nii.gz" for c in cases]
    for name in fixed:  # the same network input: zero channels are what "missing" means
        np.testing.assert_array_equal(available[name], fixed[name])
    assert [p.name for p in (tmp_path / "available").iterdir() if p.is_dir()] == ["available"]

    metrics = pd.read_csv(tmp_path / "available" / "metrics.csv")
    assert set(metrics["subset"]) == {"flair+t1ce"} and len(metrics) == 2 * 3
    record = pd.read_csv(tmp_path / "available" / "cases.csv")
    assert record["available"].tolist() == ["flair+t1ce"] * 2
    assert record["case"].tolist() == [c.name for c in cases]
    for case in cases:
        assert f"{case.name}: flair+t1ce" in printed
    summary = pd.read_csv(tmp_path / "available" / "summary.csv")
    assert summary["subset"].tolist() == ["flair+t1ce", "mean"]


def test_all_zero_files_are_missing_modalities_in_available_mode(segmentation_setup, tmp_path,
                                                                capsys):
    # The published code reads four files per case: its users fill a missing modality with
    # zeros, which is also what the network is given for one. Compressed or not, such a file
    # is counted as missing, and says so.
    root, cases = segmentation_setup
    data = copy_cases(cases, tmp_path / "data")
    all_zero(data / cases[0].name, "t1", suffix=".nii")
    all_zero(data / cases[1].name, "t2", "flair")
    common = ["--restore_from", str(root / "final.pth"), "--device", "cpu"]
    evaluate.main(["--input", str(data), "--mode", "available",
                   "--output_dir", str(tmp_path / "available"), *common])
    printed = capsys.readouterr().out
    assert f"{cases[0].name}: {cases[0].name}_t1.nii is all zero: t1 counted as missing" in printed
    for modality in ("flair", "t2"):
        assert (f"{cases[1].name}: {cases[1].name}_{modality}.nii.gz is all zero: {modality} "
                "counted as missing") in printed
    record = pd.read_csv(tmp_path / "available" / "cases.csv")
    assert record["available"].tolist() == ["flair+t1ce+t2", "t1+t1ce"]

    evaluate.main(["--input", str(root / "data"), "--mode", "all",
                   "--output_dir", str(tmp_path / "all"), *common])
    available = masks(tmp_path / "available" / "available")
    for case, subset in zip(cases, record["available"]):
        np.testing.assert_array_equal(available[f"{case.name}.nii.gz"],
                                      masks(tmp_path / "all" / subset)[f"{case.name}.nii.gz"])
    # A fixed subset that does not need the placeholders is predicted as usual.
    evaluate.main(["--input", str(data), "--mode", "t1ce", "--output_dir", str(tmp_path / "t1ce"),
                   *common])
    assert masks(tmp_path / "t1ce" / "t1ce").keys() == available.keys()


def test_available_mode_groups_the_table_by_each_cases_subset(segmentation_setup, tmp_path):
    root, cases = segmentation_setup
    folder = tmp_path / "mixed"
    copy_cases(cases[:1], folder, drop=("t1ce",))
    copy_cases(cases[1:], folder, drop=("flair", "t1", "t2"))
    table = evaluate.main(["--input", str(folder), "--mode", "available", "--restore_from",
                           str(root / "final.pth"), "--device", "cpu",
                           "--output_dir", str(tmp_path / "out")])
    assert table["subset"].tolist() == ["t1ce", "flair+t1+t2", "mean"]
    metrics = pd.read_csv(tmp_path / "out" / "metrics.csv")
    assert dict(zip(metrics["case"], metrics["subset"])) == {cases[0].name: "flair+t1+t2",
                                                             cases[1].name: "t1ce"}
    # --input may also be one case folder
    evaluate.main(["--input", str(folder / cases[1].name), "--mode", "t1ce", "--restore_from",
                   str(root / "final.pth"), "--device", "cpu", "--output_dir", str(tmp_path / "one")])
    assert sorted(masks(tmp_path / "one" / "t1ce")) == [f"{cases[1].name}.nii.gz"]


def test_cases_unlike_brats_are_warned_of_as_predict_py_does(segmentation_setup, tmp_path, capsys):
    root, cases = segmentation_setup
    folder = copy_cases(cases[:2], tmp_path / "data", drop=("t1",))
    flair = folder / cases[1].name / f"{cases[1].name}_flair.nii.gz"
    image = nib.load(flair)  # background no longer 0: not skull-stripped
    nib.save(nib.Nifti1Image(np.asanyarray(image.dataobj) + np.int16(30), image.affine,
                             image.header), flair)
    seg = folder / cases[0].name / f"{cases[0].name}_seg.nii.gz"  # a placeholder: scored as such
    image = nib.load(seg)
    nib.save(nib.Nifti1Image(np.zeros(image.shape, np.uint8), image.affine, image.header), seg)
    evaluate.main(["--input", str(folder), "--mode", "available", "--restore_from",
                   str(root / "final.pth"), "--device", "cpu", "--output_dir",
                   str(tmp_path / "out")])
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert warnings == [
        f"warning: case {cases[0].name}: {seg.name} is all 0: scored as a case without tumour "
        "(Dice 0 where a region is predicted); move a placeholder label out of the case folder to "
        "export the case without scoring it",
        f"warning: case {cases[1].name}: {flair.name}: only 0% of the voxels are 0; not "
        "skull-stripped? BraTS volumes are skull-stripped with a background of exactly 0 (about "
        "80 % of the voxels)"]


def test_input_names_a_nifti_file_beside_the_case_folders(segmentation_setup, tmp_path):
    # A template at the top of a folder of cases: the whole folder was predicted as one case.
    root, cases = segmentation_setup
    folder = copy_cases(cases, tmp_path / "data")
    shutil.copy(cases[0] / f"{cases[0].name}_t1.nii.gz", folder / "mni152_t1.nii.gz")
    out = tmp_path / "out"
    message = cli(["--input", str(folder), "--mode", "available", "--restore_from",
                   str(root / "final.pth"), "--device", "cpu", "--output_dir", str(out)])
    assert message == (f"error: {folder}: NIfTI files ['mni152_t1.nii.gz'] lie beside case "
                       f"folders (e.g. {cases[0].name}) and are not a case: move them out, or "
                       "point --input at one case folder")
    assert not out.exists()


def test_an_output_folder_inside_the_folder_of_cases_is_refused(segmentation_setup, tmp_path):
    # Written there, the next run (the same command with --resume, or any other) would take
    # the masks' folders for cases.
    root, cases = segmentation_setup
    folder = copy_cases(cases, tmp_path / "data")
    for out in (folder / "results", folder):
        message = cli(["--input", str(folder), "--mode", "t1ce", "--restore_from",
                       str(root / "final.pth"), "--device", "cpu", "--output_dir", str(out)])
        assert message == (f"error: --output_dir {out} is inside --input {folder}, whose folders "
                           "are read as cases (the next run would take the masks' folders for "
                           "cases): choose an output folder outside it")
    assert sorted(p.name for p in folder.iterdir()) == sorted(c.name for c in cases)


def test_an_output_folder_among_the_cases_of_a_list_or_in_a_case_folder_is_refused(
        segmentation_setup, tmp_path):
    # Accepted before: the masks then sat among the cases, and `--input DATA` failed on them.
    root, cases = segmentation_setup
    data = copy_cases(cases, tmp_path / "data")
    (data / "test.csv").write_text(f"{cases[1].name}\n")  # the synthetic layout: list beside the cases
    case = data / cases[1].name
    for out in (data, data / "masks", case):
        assert cli(["--data_list", str(data / "test.csv"), "--restore_from", str(root / "final.pth"),
                    "--device", "cpu", "--output_dir", str(out)]) == (
            f"error: --output_dir {out} is inside {data}, which holds case folders of --data_list "
            f"{data / 'test.csv'} (e.g. {cases[1].name}): the masks' folders would sit among the "
            "cases (--input would take them for cases); choose an output folder outside it")
    for out in (case, case / "masks"):
        assert cli(["--input", str(case), "--restore_from", str(root / "final.pth"), "--device",
                    "cpu", "--output_dir", str(out)]) == (
            f"error: --output_dir {out} is inside --input {case}, a case folder (the masks would "
            "sit among its scans): choose an output folder outside it")
    assert sorted(p.name for p in data.iterdir()) == sorted([c.name for c in cases] + ["test.csv"])
    assert sorted(p.name for p in case.iterdir()) == sorted(p.name for p in cases[1].iterdir())


def test_input_dot_names_the_case_after_its_folder(segmentation_setup, tmp_path, monkeypatch):
    root, cases = segmentation_setup
    monkeypatch.chdir(cases[1])
    evaluate.main(["--input", ".", "--mode", "t1ce", "--restore_from", str(root / "final.pth"),
                   "--device", "cpu", "--output_dir", str(tmp_path / "out")])
    assert pd.read_csv(tmp_path / "out" / "cases.csv")["case"].tolist() == [cases[1].name]
    assert sorted(masks(tmp_path / "out" / "t1ce")) == [f"{cases[1].name}.nii.gz"]


def test_a_folder_as_data_list_and_a_missing_input_or_data_root_name_the_flag(segmentation_setup,
                                                                              tmp_path):
    # Were: "cannot read datalist DATA: [Errno 21] Is a directory", "/nonexistent: not found".
    root, cases = segmentation_setup
    common = ["--restore_from", str(root / "final.pth"), "--device", "cpu", "--output_dir",
              str(tmp_path / "out")]
    for folder in (root / "data", cases[0]):  # a folder of cases, one case folder
        assert cli(["--data_list", str(folder), *common]) == (
            f"error: --data_list {folder} is a folder, not a datalist: to evaluate its case(s), "
            f"pass --input {folder}")
    (tmp_path / "lists").mkdir()
    assert cli(["--data_list", str(tmp_path / "lists"), *common]) == (
        f"error: --data_list {tmp_path / 'lists'} is a folder, not a datalist: give a datalist "
        "file (one case folder per line)")
    with pytest.raises(DataError) as error:  # train.py's and datasets.preprocess's lists
        read_datalist(tmp_path / "lists")
    assert str(error.value) == (f"datalist {tmp_path / 'lists'} is a folder, not a list (a text "
                                "file naming one case folder per line)")
    assert cli(["--input", str(tmp_path / "nope"), *common]) == (
        f"error: --input {tmp_path / 'nope'}: not found")
    assert cli(["--data_list", str(root / "cases.csv"), "--data_root", str(tmp_path / "nope"),
                *common]) == f"error: --data_root {tmp_path / 'nope'}: not found"
    assert not (tmp_path / "out").exists()


def test_a_list_that_is_not_utf8_is_one_line(segmentation_setup, tmp_path):
    root, cases = segmentation_setup
    (tmp_path / "l.csv").write_bytes(f"{cases[1].name}\r\n".encode("utf-16"))
    message = cli(["--data_list", str(tmp_path / "l.csv"), "--restore_from",
                   str(root / "final.pth"), "--output_dir", str(tmp_path / "out")])
    assert message == (f"error: cannot read datalist {tmp_path / 'l.csv'}: line 1 is not UTF-8 "
                       "text (byte 0xff); save the list as UTF-8 text")


def _other_shape(case, modality):
    path = case / f"{case.name}_{modality}.nii.gz"
    image = nib.load(path)
    nib.save(nib.Nifti1Image(np.ones((64, 64, 31), np.int16), image.affine), path)
    return path


def all_zero(case, *modalities, suffix=".nii.gz"):
    """Replace the case's files of `modalities` by all-zero volumes on its grid, saved with
    `suffix`: how a missing modality is filled for the published code."""
    for modality in modalities:
        path = case / f"{case.name}_{modality}.nii.gz"
        image = nib.load(path)
        path.unlink()
        nib.save(nib.Nifti1Image(np.zeros(image.shape, np.int16), image.affine, image.header),
                 case / f"{case.name}_{modality}{suffix}")
    return case


@pytest.mark.parametrize("mode, breaks, expected", [
    ("all", lambda case: (case / f"{case.name}_t2.nii.gz").unlink(), "_t2.nii.gz: missing t2 file"),
    ("all", lambda case: all_zero(case, "t2"), "_t2.nii.gz: all zero: the placeholder of a "
     "missing t2, needed by subset flair+t1+t1ce+t2 (--mode available predicts each case from "
     "the modalities it has)"),
    ("available", lambda case: all_zero(case, "flair", "t1", "t1ce", "t2"),
     "_flair.nii.gz: all zero, as every modality file of the case: nothing to predict from"),
    ("flair,t1", lambda case: (case / f"{case.name}_t1.nii.gz").unlink(), "_t1.nii.gz: missing t1"),
    ("available", lambda case: [p.unlink() for p in case.glob("*_[ft]*.nii.gz")],
     "no modality file"),
    ("available", lambda case: _other_shape(case, "t1ce"), "_t1ce.nii.gz: shape (64, 64, 31) differs"),
    ("t1ce", lambda case: _other_shape(case, "t2"), "_t2.nii.gz: shape (64, 64, 31) differs"),
    ("t1ce", lambda case: _other_shape(case, "t2"), "_flair.nii.gz (64, 64, 32); the files of a "
     "case must lie on one grid: resample (or reorient) the odd one onto the others' grid, e.g. "
     "onto the FLAIR's; replace it, or move it out of the case folder (no subset asked uses it)"),
])
def test_a_bad_case_stops_the_run_before_anything_is_written(segmentation_setup, tmp_path, mode,
                                                            breaks, expected):
    root, cases = segmentation_setup
    folder = copy_cases(cases, tmp_path / "data")
    breaks(folder / cases[1].name)  # the second case: a run that wrote as it went would have
    out = tmp_path / "out"          # exported the first one
    message = cli(["--input", str(folder), "--mode", mode, "--restore_from",
                   str(root / "final.pth"), "--device", "cpu", "--output_dir", str(out)])
    assert message.startswith(f"error: case {cases[1].name}: ") and expected in message
    assert "\n" not in message.split("\n")[0] and not out.exists()


def test_a_damaged_file_no_subset_uses_may_be_moved_out(segmentation_setup, tmp_path):
    # Every modality file of a case is read (figures and cases.csv show them), so a constant
    # stand-in stops a run that does not use it: the message says it may go instead.
    root, cases = segmentation_setup
    folder = copy_cases(cases, tmp_path / "data")
    t1 = folder / cases[1].name / f"{cases[1].name}_t1.nii.gz"
    image = nib.load(t1)
    nib.save(nib.Nifti1Image(np.ones(image.shape, np.int16), image.affine, image.header), t1)
    flags = ["--input", str(folder), "--mode", "t1ce", "--restore_from", str(root / "final.pth"),
             "--device", "cpu", "--output_dir", str(tmp_path / "out")]
    assert cli(flags).splitlines()[-1].endswith(
        "the cases before it are exported: replace it, or move it out of the case folder (no "
        "subset asked uses it), then run the same command with --resume")
    t1.unlink()
    evaluate.main([*flags, "--resume"])
    assert sorted(masks(tmp_path / "out" / "t1ce")) == [f"{c.name}.nii.gz" for c in cases]


def test_duplicate_cases_are_refused(segmentation_setup, tmp_path):
    root, cases = segmentation_setup
    (tmp_path / "dup.csv").write_text(f"{cases[0].name}\n{cases[1].name}\n{cases[0].name}\n")
    message = cli(["--data_list", str(tmp_path / "dup.csv"), "--data_root", str(root / "data"),
                   "--restore_from", str(root / "final.pth"), "--output_dir", str(tmp_path / "out")])
    assert message == f"error: case {cases[0].name}: {tmp_path / 'dup.csv'}: case name listed more than once: keep one entry"
    assert not (tmp_path / "out").exists()


def test_a_case_path_that_is_not_utf8_is_refused_before_any_work(segmentation_setup, tmp_path):
    # A folder named in Latin-1 (a copy from an old system): its byte 0xff is no UTF-8 text, so
    # cases.csv could not be written; it used to stop the run there with a traceback.
    root, cases = segmentation_setup
    data = tmp_path / os.fsdecode(b"Patienten_M\xfcller")
    copy_cases(cases[:1], data)
    message = cli(["--input", str(data), "--restore_from", str(root / "final.pth"),
                   "--device", "cpu", "--output_dir", str(tmp_path / "out")])
    shown = f"{tmp_path}/Patienten_M\\xfcller/{cases[0].name}"
    assert message == (f"error: case {cases[0].name}: {shown}: the path is not UTF-8 text (byte "
                       "0xfc), which eval.py's tables are written in: rename the folder that holds it")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags, expected", [
    (["--batch_size", "0"], "--batch_size: must be at least 1"),
    (["--workers", "0"], "--workers: must be at least 1"),
    (["--overlap", "1"], "--overlap: must be in [0, 1)"),
    (["--input_size", "30,64,64"], "D must be a multiple of 16"),
    (["--input_size", "32,64"], "expected D,H,W"),
    (["--hd95", "mean"], "--hd95: invalid choice: 'mean'"),
    (["--device", "tpu"], "argument --device: expected auto, cpu, cuda or cuda:N, got 'tpu'"),
    (["--output_dir", ""], "argument --output_dir: expected a path, got ''"),  # not the cwd
    (["--restore_from", ""], "argument --restore_from: expected a path, got ''"),  # the last counts
])
def test_bad_flags_are_refused_when_parsed(flags, expected, capsys):
    with pytest.raises(SystemExit) as info:
        evaluate.main(["--restore_from", "missing.pth", *flags])
    (line,) = capsys.readouterr().err.splitlines()  # one line, no usage block
    assert info.value.code == 2 and line.startswith("error: argument ") and expected in line
    assert line.endswith(" (see eval.py --help)")


@pytest.mark.parametrize("flags, expected", [
    (["--device", "cuda"], "--device cuda: CUDA is not available"),
    (["--mode", "random"], "training mode"),
    (["--mode", "flair,dwi"], "--mode: unknown modality 'dwi'"),
    (["--mode", ""], "error: --mode: no modality given: give indices 0-3 or names flair, t1, t1ce, "
                     "t2 (BraTS 2023's t2f, t1n, t1c, t2w), each once, separated by commas (e.g. "
                     "0,2 or flair,t1ce); or 'all' (the 15 subsets) or 'available'"),
    (["--input", "x", "--data_list", "y.csv"], "--input or --data_list, not both"),
    (["--input", "x", "--data_root", "/data"], "--data_root re-bases a datalist's case folders: "
                                               "with --input x it would do nothing; drop it"),
    (["--resume", "--overwrite"], "give --resume (continue the evaluation in --output_dir) or "
                                  "--overwrite (replace it), not both"),
])
def test_bad_flag_combinations_are_refused_before_any_work(flags, expected, tmp_path):
    if "cuda" in flags and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    # Neither the checkpoint nor the data exist: the flags must be refused first.
    message = cli(["--restore_from", str(tmp_path / "missing.pth"), "--output_dir",
                   str(tmp_path / "out"), *flags])
    assert message.startswith("error: ") and expected in message and "\n" not in message
    assert not (tmp_path / "out").exists()


def test_missing_checkpoint_is_a_one_line_error(segmentation_setup, tmp_path):
    root, _ = segmentation_setup
    message = cli(["--data_list", str(root / "one.csv"), "--data_root", str(root / "data"),
                   "--restore_from", str(tmp_path / "nope.pth"), "--device", "cpu"])
    assert message == f"error: checkpoint {tmp_path / 'nope.pth'} does not exist"


# -------------------------------------------------------------------------- the output folder
def test_an_earlier_evaluation_is_refused_then_replaced_with_overwrite(segmentation_setup, tmp_path):
    root, cases = segmentation_setup
    out = tmp_path / "out"
    run(root, out, "--mode", "flair,t1ce")  # both labelled cases: metrics, summary
    (out / "notes.txt").write_text("mine")
    (out / "flair+t1ce" / "Other_case.nii.gz").write_bytes(b"a stale mask of another list")
    (out / "flair+t1ce" / ".Other_case.nii.gz.x1.tmp.nii.gz").write_bytes(b"a killed write")
    (out / ".summary.md.x2.tmp.md").write_text("a killed write")
    before = (out / "eval_config.json").read_text()

    message = cli(["--data_list", str(root / "one.csv"), "--data_root", str(root / "data"),
                   "--restore_from", str(root / "final.pth"), "--output_dir", str(out),
                   "--device", "cpu", "--mode", "t1"])
    assert message.startswith(f"error: --output_dir {out} holds a previous evaluation")
    assert "--overwrite" in message and (out / "eval_config.json").read_text() == before

    # the new run: one case, another subset, no labels -> nothing of the old run may remain
    unlabelled = copy_cases(cases[1:], tmp_path / "unlabelled", drop=("seg",))
    evaluate.main(["--input", str(unlabelled), "--restore_from", str(root / "final.pth"),
                   "--output_dir", str(out), "--device", "cpu", "--mode", "t1", "--overwrite"])
    left = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    assert left == [".lock", "cases.csv", "eval_config.json", "notes.txt", "t1",
                    f"t1/{cases[1].name}.nii.gz"]
    assert (out / "notes.txt").read_text() == "mine"  # not eval.py's: kept


def test_the_output_folder_is_locked_while_a_run_uses_it(segmentation_setup, tmp_path):
    root, _ = segmentation_setup
    out = tmp_path / "out"
    with exclusive_lock(out, "output folder"):
        # flock is per open file: a second open in this process conflicts like another process
        message = cli(["--data_list", str(root / "one.csv"), "--data_root", str(root / "data"),
                       "--restore_from", str(root / "final.pth"), "--output_dir", str(out),
                       "--device", "cpu"])
    assert message.startswith(f"error: output folder {out} is in use by pid ")
    assert sorted(p.name for p in out.iterdir()) == [".lock"]


def stat_ns(paths):
    """{path: (inode, mtime)}: a file rewritten (atomically: a new inode) shows up here."""
    return {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in paths}


def test_resume_scores_the_masks_left_and_predicts_only_the_cases_missing_one(
        segmentation_setup, tmp_path, monkeypatch):
    root, cases = segmentation_setup
    out = tmp_path / "out"
    first = run(root, out, "--mode", "all", "--resume")  # nothing to continue: a fresh run
    reference = {p: p.read_bytes() for p in out.glob("*/*.nii.gz")}
    metrics = pd.read_csv(out / "metrics.csv")
    # What a run stopped in case 0 leaves: 14 of its 15 masks, one killed write, no report.
    (out / "t1" / f"{cases[0].name}.nii.gz").unlink()
    (out / "t1" / f".{cases[0].name}.nii.gz.x1.tmp.nii.gz").write_bytes(b"a killed write")
    for name in ("metrics.csv", "summary.csv", "summary.md"):
        (out / name).unlink()
    kept = stat_ns(out.glob(f"*/{cases[1].name}.nii.gz"))
    predicted = []
    monkeypatch.setattr(evaluate, "segment",
                        lambda *a, **k: predicted.append(a[1].shape) or real_segment(*a, **k))
    table = run(root, out, "--mode", "all", "--resume")

    assert len(predicted) == 1  # case 0 alone, all 15 subsets in one pass
    assert stat_ns(kept) == kept  # case 1's masks: read, not rewritten
    assert {p: p.read_bytes() for p in out.glob("*/*.nii.gz")} == reference
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]
    pd.testing.assert_frame_equal(pd.read_csv(out / "metrics.csv"), metrics)
    pd.testing.assert_frame_equal(table, first)

    # The same command once more: every case is done; rescored, nothing predicted.
    predicted.clear()
    run(root, out, "--mode", "all", "--resume", "--hd95", "pooled")
    assert predicted == [] and stat_ns(kept) == kept
    rescored = pd.read_csv(out / "metrics.csv")
    pd.testing.assert_series_equal(rescored["dice"], metrics["dice"])
    assert json.loads((out / "eval_config.json").read_text())["hd95"] == "pooled"


def test_resume_with_another_network_names_only_the_flags_that_differ(segmentation_setup,
                                                                      tmp_path, monkeypatch):
    # A bare state_dict records no network: the flags build it, and a --resume with other ones
    # was refused printing both whole networks (some 600 characters each).
    root, _ = segmentation_setup
    monkeypatch.setattr(evaluate, "segment",  # the masks do not matter here: empty ones, at once
                        lambda model, image, subsets, *a: [np.zeros(image.shape[1:], np.uint8)
                                                           for _ in subsets])
    torch.save(torch.load(root / "final.pth", weights_only=True)["model"], tmp_path / "bare.pth")
    out = tmp_path / "out"
    flags = [*argv(root, out, "--mode", "t1ce", "--model_size", "small", data_list="one.csv"),
             "--restore_from", str(tmp_path / "bare.pth")]
    evaluate.main(flags)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert cli([*flags, "--resume", "--weight_std", "False", "--activation_cfg", "ReLU"]) == (
        f"error: --resume: the evaluation in {out} was made with --activation_cfg LeakyReLU, "
        "--weight_std True, this run's is --activation_cfg ReLU, --weight_std False; resume it "
        "with its own settings, or pass --overwrite to replace it")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_resume_refuses_another_runs_folder_and_leaves_it_as_it_was(segmentation_setup, tmp_path):
    # One folder must never hold the masks of two models or two ways of predicting.
    root, cases = segmentation_setup
    out = tmp_path / "out"
    run(root, out, "--mode", "flair,t1ce")
    (out / "metrics.csv").unlink()  # stopped before its report
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    retrained = tmp_path / "final.pth"  # same path in real life: snapshots/.../final.pth again
    checkpoint = torch.load(root / "final.pth", weights_only=True)
    next(iter(checkpoint["model"].values())).add_(1e-3)
    torch.save(checkpoint, retrained)

    def refusal(*flags, **lists):
        return cli(argv(root, out, "--resume", *flags, **lists))
    message = refusal("--mode", "flair,t1ce", "--overlap", "0.5")
    assert message.startswith(f"error: --resume: the evaluation in {out} was made with overlap "
                              "0.3333333333333333, this run's is 0.5; resume it with its own settings")
    assert "made with subsets ['flair+t1ce'], this run's is ['t1']" in refusal("--mode", "t1")
    assert "made with average probabilities, this run's is logits" in refusal(
        "--mode", "flair,t1ce", "--average", "logits")
    message = refusal("--mode", "flair,t1ce", "--restore_from", str(retrained))  # the last counts
    first, this = (evaluate.file_sha256(path) for path in (root / "final.pth", retrained))
    assert message == (f"error: --resume: the evaluation in {out} was made with checkpoint_sha256 "
                       f"{first} ({root / 'final.pth'}), this run's is {this} ({retrained}); "
                       "resume it with its own settings, or pass --overwrite to replace it")
    message = refusal("--mode", "flair,t1ce", data_list="one.csv")
    assert message == (f"error: --resume: {out / 'cases.csv'} lists 2 cases, this run 1; entry 1 "
                       f"differs ({cases[0].name} vs {cases[1].name}); resume with the first "
                       "run's cases, or pass --overwrite")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before

    # A folder of an eval.py before --average: its windows averaged logits.
    config = json.loads((out / "eval_config.json").read_text())
    del config["average"]
    (out / "eval_config.json").write_text(json.dumps(config))
    assert "made with average logits, this run's is probabilities" in refusal("--mode", "flair,t1ce")

    # A folder of an eval.py that did not record the checkpoint's hash.
    config = json.loads((out / "eval_config.json").read_text())
    del config["checkpoint_sha256"]
    (out / "eval_config.json").write_text(json.dumps(config))
    assert refusal("--mode", "flair,t1ce") == (
        f"error: --resume: {out / 'eval_config.json'} does not record checkpoint_sha256 (an older "
        "eval.py wrote it); pass --overwrite to redo the evaluation")

    # Masks without the record of the run that wrote them (not eval.py's, or a copy).
    (out / "eval_config.json").unlink()
    message = refusal("--mode", "flair,t1ce")
    assert message.startswith(f"error: --resume: {out} holds files of an evaluation (e.g. ")
    assert message.endswith("pass --overwrite to replace them")


def test_resume_in_available_mode_refuses_a_case_whose_modalities_changed(segmentation_setup,
                                                                         tmp_path):
    root, cases = segmentation_setup
    data = copy_cases(cases, tmp_path / "data", drop=("t1", "t2"))
    out = tmp_path / "out"
    flags = ["--input", str(data), "--restore_from", str(root / "final.pth"), "--output_dir",
             str(out), "--device", "cpu", "--mode", "available", "--resume"]
    evaluate.main(flags)
    (data / cases[0].name / f"{cases[0].name}_t1ce.nii.gz").unlink()  # its mask: flair+t1ce's
    assert cli(flags) == (f"error: --resume: the mask of case {cases[0].name} in {out} was "
                          "predicted from flair+t1ce, its folder now has flair; restore its "
                          "files, or pass --overwrite")


def test_resume_in_available_mode_predicts_a_case_without_its_removed_stand_in(
        segmentation_setup, tmp_path):
    # A missing modality filled with something the checks cannot tell from a scan (a constant
    # volume) stops the run at its case; removing it and resuming predicts the case from what
    # it really has, the cases before it kept.
    root, cases = segmentation_setup
    data = copy_cases(cases, tmp_path / "data")
    stand_in = data / cases[1].name / f"{cases[1].name}_t2.nii.gz"
    image = nib.load(stand_in)
    nib.save(nib.Nifti1Image(np.full(image.shape, 100, np.int16), image.affine, image.header),
             stand_in)
    out = tmp_path / "out"
    flags = ["--input", str(data), "--restore_from", str(root / "final.pth"), "--output_dir",
             str(out), "--device", "cpu", "--mode", "available", "--resume"]
    message = cli(flags).splitlines()[-1]
    assert message.startswith(f"error: case {cases[1].name}: {stand_in}: cannot normalise")
    assert message.endswith("; the cases before it are exported: replace the file, or remove it "
                            "if it stands in for a missing modality, then run the same command "
                            "with --resume")
    first = out / "available" / f"{cases[0].name}.nii.gz"
    assert [p.name for p in (out / "available").iterdir()] == [first.name]
    written = first.stat().st_mtime_ns

    stand_in.unlink()
    evaluate.main(flags)
    assert first.stat().st_mtime_ns == written  # kept, not predicted again
    record = pd.read_csv(out / "cases.csv")
    assert record["available"].tolist() == ["flair+t1+t1ce+t2", "flair+t1+t1ce"]
    evaluate.main(["--input", str(root / "data"), "--mode", "flair,t1,t1ce", "--output_dir",
                   str(tmp_path / "fixed"), "--restore_from", str(root / "final.pth"),
                   "--device", "cpu"])
    np.testing.assert_array_equal(
        masks(out / "available")[f"{cases[1].name}.nii.gz"],
        masks(tmp_path / "fixed" / "flair+t1+t1ce")[f"{cases[1].name}.nii.gz"])
    summary = pd.read_csv(out / "summary.csv")
    assert summary["subset"].tolist() == ["flair+t1+t1ce", "flair+t1+t1ce+t2", "mean"]


def test_cases_without_a_seg_file_are_named_as_not_scored(segmentation_setup, tmp_path, capsys):
    root, cases = segmentation_setup
    data = copy_cases(cases, tmp_path / "data")
    (data / cases[0].name / f"{cases[0].name}_seg.nii.gz").unlink()  # an incomplete copy
    flags = ["--input", str(data), "--restore_from", str(root / "final.pth"), "--device", "cpu",
             "--mode", "t1ce"]
    evaluate.main([*flags, "--output_dir", str(tmp_path / "some")])
    printed = capsys.readouterr().out
    assert f"not scored, without a seg file: 1 case(s) ({cases[0].name})\n" in printed
    assert "\n1 labelled cases, Dice (%)" in printed
    (data / cases[1].name / f"{cases[1].name}_seg.nii.gz").unlink()
    evaluate.main([*flags, "--output_dir", str(tmp_path / "none")])
    assert capsys.readouterr().out.endswith("no case has a seg file: masks only, nothing to score\n")


def test_resume_of_unlabelled_cases_reads_no_voxel_of_the_cases_done(segmentation_setup, tmp_path,
                                                                     monkeypatch):
    # The online-validation export: no labels, so a case done has nothing left to do.
    root, cases = segmentation_setup
    data = copy_cases(cases, tmp_path / "data", drop=("seg",))
    out = tmp_path / "out"
    flags = ["--input", str(data), "--restore_from", str(root / "final.pth"), "--output_dir",
             str(out), "--device", "cpu", "--mode", "t1ce", "--resume"]
    evaluate.main(flags)
    (out / "t1ce" / f"{cases[0].name}.nii.gz").unlink()
    kept = stat_ns([out / "t1ce" / f"{cases[1].name}.nii.gz"])
    read, real = [], evaluate.read_files
    monkeypatch.setattr(evaluate, "read_files", lambda name, files: read.append(name)
                        or real(name, files))
    evaluate.main(flags)
    assert read == [cases[0].name] and stat_ns(kept) == kept
    assert sorted(masks(out / "t1ce")) == sorted(f"{c.name}.nii.gz" for c in cases)
    assert not (out / "metrics.csv").exists()


def reoriented(path):
    """The mask at `path` rewritten by a tool that reorients to RAS: same shape, another grid."""
    mask = nib.load(path)
    canonical = nib.as_closest_canonical(mask)
    assert canonical.shape == mask.shape and not np.allclose(canonical.affine, mask.affine)
    nib.save(canonical, path)
    return canonical


def flipped_near_the_end(path):
    """The byte 12 from the end of a .nii.gz flipped: only a read of the whole stream sees it."""
    data = bytearray(path.read_bytes())
    data[-12] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, problem", [
    (lambda path: path.write_bytes(path.read_bytes()[:60]), "unreadable NIfTI ("),  # a full disk
    (flipped_near_the_end, "unreadable NIfTI ("),
    (reoriented, "affine differs from {case}_flair.nii.gz by up to 63 (more than 0.001): "),
], ids=["truncated", "flipped", "reoriented"])
def test_resume_stops_at_a_mask_it_cannot_read_or_on_another_grid(segmentation_setup, tmp_path,
                                                                  damage, problem):
    root, cases = segmentation_setup
    out = tmp_path / "out"
    run(root, out, "--mode", "t1ce")
    path = out / "t1ce" / f"{cases[1].name}.nii.gz"
    good = path.read_bytes()
    damage(path)
    (out / "metrics.csv").unlink()
    message = cli(argv(root, out, "--mode", "t1ce", "--resume")).splitlines()[-1]  # after tqdm's
    assert message.startswith(f"error: case {cases[1].name}: {path}: "
                              + problem.format(case=cases[1].name))
    assert message.endswith("; remove it (--resume then predicts the case again), or run with "
                            "--overwrite")
    assert "resample" not in message  # a mask eval.py wrote is predicted again, not resampled
    assert not (out / "metrics.csv").exists()
    path.unlink()  # as the message says: the case is predicted again, as it was the first time
    run(root, out, "--mode", "t1ce", "--resume")
    assert path.read_bytes() == good


def many_cases(cases, folder, n=16):
    """The two cases and n - 2 renamed copies in `folder`: a run that takes a while."""
    data = copy_cases(cases, folder)
    for i in range(n - 2):
        renamed_copy(cases[i % 2], data / f"Copy_{i:04d}")
    return data


def stopped_once_writing(command, out, stop, masks=1, **popen):
    """Run `command` until `masks` masks are in `out`, then stop(process) -> (process, output)."""
    run = subprocess.Popen(command, text=True, **popen)
    try:
        deadline = time.monotonic() + 120
        while (len(list(out.glob("*/*.nii.gz"))) < masks and run.poll() is None
               and time.monotonic() < deadline):
            time.sleep(0.05)
        stop(run)
        return run, run.communicate(timeout=60)
    finally:
        run.kill()


def test_sigterm_stops_the_run_with_whole_files_and_the_folder_free(segmentation_setup, tmp_path):
    # What a scheduler's time limit does: SIGTERM in the middle of a long run.
    root, cases = segmentation_setup
    data = many_cases(cases, tmp_path / "data", 8)
    out = tmp_path / "out"
    command = [sys.executable, str(REPO / "eval.py"), "--input", str(data), "--restore_from",
               str(root / "final.pth"), "--output_dir", str(out), "--device", "cpu", "--mode", "all"]
    # 29 masks: at least one case has all 15. The writers take a case's masks in order, so at
    # most two cases are part-written (14 + 14 at most).
    run, (_, stderr) = stopped_once_writing(
        command, out, lambda run: run.send_signal(signal.SIGTERM), masks=29,
        env=dict(os.environ, PYTHONPATH=str(REPO)), stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE)
    assert run.returncode == 143, stderr[-3000:]
    assert stderr.splitlines()[-1] == "terminated"
    written = sorted(out.glob("*/*.nii.gz"))
    assert 0 < len(written) < 8 * 15 and not (out / "metrics.csv").exists()
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]  # no half-written file
    shape = nib.load(next(cases[0].glob("*_seg.nii.gz"))).shape
    for path in written:
        assert np.asanyarray(nib.load(path).dataobj).shape == shape
    with exclusive_lock(out, "output folder"):  # released: the next run may take the folder
        pass

    # The same command with --resume finishes the run. The cases whose 15 masks were written
    # before the stop are kept as they are (the others are predicted again), and each copy
    # scores exactly what the case it copies scores, whether scored from its files or not.
    names = [p.name for p in written]
    kept = stat_ns(p for p in written if names.count(p.name) == 15)
    assert kept
    evaluate.main([*command[2:], "--resume"])
    assert stat_ns(kept) == kept and len(list(out.glob("*/*.nii.gz"))) == 8 * 15
    metrics = pd.read_csv(out / "metrics.csv").set_index(["case", "subset", "region"])
    assert len(metrics) == 8 * 15 * 3
    for i in range(6):
        pd.testing.assert_frame_equal(metrics.loc[f"Copy_{i:04d}"], metrics.loc[cases[i % 2].name])


def test_a_stopped_run_drops_the_writes_still_queued():
    # Ctrl-C or SIGTERM during a run: the write in progress is finished, the queued ones are
    # not run first (the executor's own exit would run them all).
    started, release, ran = threading.Event(), threading.Event(), []

    def write(i):
        started.set()
        release.wait(5)
        ran.append(i)

    with pytest.raises(KeyboardInterrupt):
        with evaluate.thread_pool(1) as pool:
            futures = [pool.submit(write, i) for i in range(4)]
            assert started.wait(5)  # the one thread is in write 0; 1 to 3 are queued
            threading.Timer(0.2, release.set).start()  # write 0 ends after the queue is dropped
            raise KeyboardInterrupt
    assert ran == [0] and [f.cancelled() for f in futures] == [False, True, True, True]

    with evaluate.thread_pool(2) as pool:  # a run that ends normally waits for every write
        for i in range(4):
            pool.submit(write, i)
    assert sorted(ran) == [0, 0, 1, 2, 3]


# ----------------------------------------------------------------------------------- figures
def test_figures_show_each_subset_over_each_modality(segmentation_setup, tmp_path):
    root, cases = segmentation_setup
    out = tmp_path / "out"
    incomplete = copy_cases(cases[:1], tmp_path / "data", drop=("t1",))
    table = evaluate.main(["--input", str(incomplete), "--restore_from", str(root / "final.pth"),
                           "--output_dir", str(out), "--device", "cpu", "--mode", "flair,t2",
                           "--figures"])
    case = cases[0].name
    png = out / "figures" / f"{case}.png"
    label = np.asanyarray(nib.load(cases[0] / f"{case}_seg.nii.gz").dataobj)  # (X, Y, Z)
    prediction = np.asanyarray(nib.load(out / "flair+t2" / f"{case}.nii.gz").dataobj)
    z = int(np.count_nonzero(label, axis=(0, 1)).argmax())  # the slice with the most tumour
    # rows: ground truth, flair+t2; columns: the three modalities the case has
    rgb = read_png(png, figures.case_layout((64, 64), 2, 3)[:2])
    for row, expected in enumerate((label[:, :, z], prediction[:, :, z])):
        for column in range(3):
            assert_regions_drawn(rgb, figures.panel_box((64, 64), row, column), expected)
    chart = read_png(out / "dice.png", (600, 450))
    assert len(np.unique(chart.reshape(-1, 3), axis=0)) > 10
    assert table["subset"].tolist() == ["flair+t2", "mean"]


def test_eval_sh_re_exports_into_its_folder(segmentation_setup, tmp_path):
    # eval.sh is the user's re-export command: it passes --overwrite, so a second run into the
    # same OUT replaces the first instead of being refused.
    root, cases = segmentation_setup
    repo = tmp_path / "repo"
    shutil.copytree(REPO, repo, ignore=shutil.ignore_patterns(*LOCAL))
    incomplete = copy_cases(cases, tmp_path / "cases", drop=("t2",))
    env = dict(os.environ, PYTHON=sys.executable, CKPT=str(root / "final.pth"),
               INPUT=str(incomplete), MODE="available", OUT=str(tmp_path / "out"))
    for _ in range(2):
        done = subprocess.run(["bash", "eval.sh", "cpu"], cwd=repo, env=env, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert sorted(masks(tmp_path / "out" / "available")) == [f"{c.name}.nii.gz" for c in cases]
    assert "flair+t1+t1ce" in done.stdout


def test_eval_sh_keeps_eval_pys_last_line_in_its_log(segmentation_setup, tmp_path):
    # A scheduler signals the whole job: bash, eval.py and the tee writing the log. The log must
    # still get eval.py's last line.
    root, cases = segmentation_setup
    repo = tmp_path / "repo"
    shutil.copytree(REPO, repo, ignore=shutil.ignore_patterns(*LOCAL))
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=sys.executable, CKPT=str(root / "final.pth"), MODE="all",
               INPUT=str(many_cases(cases, tmp_path / "cases")), OUT=str(out))
    run, (stdout, _) = stopped_once_writing(
        ["bash", "eval.sh", "cpu"], out, lambda run: os.killpg(run.pid, signal.SIGTERM),
        cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        start_new_session=True)
    (log,) = (repo / "logs").glob("*_eval_*.log")
    assert log.read_text().splitlines()[-1] == "terminated", stdout[-2000:]
    assert stdout.splitlines()[-1] == "terminated"
    assert run.returncode == 143


def test_eval_sh_launches_with_launch_on_the_gpus_listed(tmp_path):
    # LAUNCH (e.g. torchrun) starts eval.py; the GPU list becomes CUDA_VISIBLE_DEVICES, from
    # which torchrun's process i takes the i-th GPU. A stand-in launcher shows what it is given.
    copy_scripts(tmp_path, "eval.sh")
    (tmp_path / "launcher").write_text('#!/bin/sh\necho "GPUs $CUDA_VISIBLE_DEVICES: $*"\n')
    env = dict(os.environ, LAUNCH=f"sh {tmp_path / 'launcher'} --nproc_per_node 4", OUT="out")
    done = subprocess.run(["bash", "eval.sh", "0,1,2,3", "--mirror"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    launched = done.stdout.splitlines()[-1]
    assert launched.startswith("GPUs 0,1,2,3: --nproc_per_node 4 eval.py --num_classes=3 ")
    assert f" --output_dir={tmp_path / 'out'} --overwrite --device=cuda --mirror" in launched
    # continuing a stopped run: --resume instead of --overwrite (eval.py refuses both)
    done = subprocess.run(["bash", "eval.sh", "0", "--resume"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.stdout.splitlines()[-1].endswith(f" --output_dir={tmp_path / 'out'} --device=cuda "
                                                 "--resume")


# ------------------------------------------------------------------------------ under torchrun
def torchrun(root, out, *flags, **lists):
    """eval.py as `torchrun --nproc_per_node 2` starts it: two CPU processes (gloo)."""
    command = [*torchrun_command(), str(REPO / "eval.py"), *argv(root, out, *flags, **lists)]
    env = script_env()
    # the timeout: a rank left waiting for another would otherwise hold the test
    return subprocess.run(command, cwd=out.parent, env=env, capture_output=True, text=True,
                          timeout=120)


def test_torchrun_splits_the_cases_and_writes_what_one_process_writes(segmentation_setup, tmp_path):
    root, cases = segmentation_setup
    # A third case (a renamed copy), so that rank 0 takes cases 1 and 3 of the list and rank 1
    # case 2: the gathered metrics must be put back in list order.
    data = copy_cases(cases, tmp_path / "data")
    third = renamed_copy(cases[0], data / "Copy_0000")
    (tmp_path / "three.csv").write_text(f"{cases[0].name}\n{cases[1].name}\n{third.name}\n")
    lists = dict(data_list=tmp_path / "three.csv", data_root=data)

    # One thread, as each torchrun process here (OMP_NUM_THREADS=1): the thread count changes
    # the summation order, and so the last bits of the probabilities, near 0.5 a voxel's label.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run(root, tmp_path / "one", "--mode", "all", "--figures", **lists)
    finally:
        torch.set_num_threads(threads)
    done = torchrun(root, tmp_path / "two", "--mode", "all", "--figures", **lists)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]

    one, two = tmp_path / "one", tmp_path / "two"
    files = sorted(str(p.relative_to(one)) for p in one.rglob("*") if p.is_file())
    assert files == sorted(str(p.relative_to(two)) for p in two.rglob("*") if p.is_file())
    assert len([f for f in files if f.endswith(".nii.gz")]) == 15 * 3
    assert {f"figures/{name}.png" for name in (cases[0].name, cases[1].name, third.name)} <= set(files)
    for name in files:
        if name.endswith(".nii.gz"):  # the gzip header holds a time stamp, the contents must match
            assert gzip.decompress((one / name).read_bytes()) == \
                gzip.decompress((two / name).read_bytes()), name
    for name in ("metrics.csv", "summary.csv", "summary.md", "cases.csv"):
        assert (one / name).read_bytes() == (two / name).read_bytes(), name
    metrics = pd.read_csv(two / "metrics.csv")
    assert metrics["case"].unique().tolist() == [cases[0].name, cases[1].name, third.name]
    assert json.loads((two / "eval_config.json").read_text())["world_size"] == 2

    # only rank 0 shows its progress (its two cases) and prints the table
    assert "3 cases over 2 processes (the progress bar counts rank 0's 2)" in done.stdout
    assert re.search(r"cases: 100%.*2/2", done.stderr) and "3/3" not in done.stderr
    assert done.stdout.count("labelled cases, Dice (%)") == 1

    # --resume under torchrun: rank 0 finds the cases done, every rank scores its own from their
    # files and predicts the rest: here the third case (rank 0's), which lost a mask, and the
    # second (rank 1's), which lost its figure.
    (two / "t1" / f"{third.name}.nii.gz").unlink()
    (two / "figures" / f"{cases[1].name}.png").unlink()
    (two / "metrics.csv").unlink()
    kept = stat_ns(two.glob(f"*/{cases[0].name}.nii.gz"))
    done = torchrun(root, two, "--mode", "all", "--figures", "--resume", **lists)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "--resume: 1 of 3 cases already exported" in done.stdout
    assert stat_ns(kept) == kept
    assert sorted(str(p.relative_to(two)) for p in two.rglob("*") if p.is_file()) == files
    for name in ("metrics.csv", "summary.csv", "cases.csv"):
        assert (one / name).read_bytes() == (two / name).read_bytes(), name


def started_as_torchrun_starts_them(root, out, *flags):
    """Two eval.py processes with torchrun's variables -> [(exit status, stderr)] per rank.

    Started here because torchrun ends the other processes as soon as one exits: under it, a
    rank's own exit status does not always show.
    """
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ranks = [subprocess.Popen([sys.executable, str(REPO / "eval.py"), *argv(root, out, *flags)],
                              env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO),
                                       RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for rank in range(2)]
    try:
        stderr = [rank.communicate(timeout=120)[1] for rank in ranks]
        return [(rank.returncode, text) for rank, text in zip(ranks, stderr)]
    finally:
        for rank in ranks:
            rank.kill()  # a no-op for a process that has exited; ends one left waiting


def test_a_refusal_under_torchrun_stops_every_rank_with_one_line(segmentation_setup, tmp_path):
    root, _ = segmentation_setup
    out = tmp_path / "out"
    out.mkdir()
    (out / "eval_config.json").write_text("{}")  # an earlier evaluation
    refusal = f"error: --output_dir {out} holds a previous evaluation"
    done = torchrun(root, out, "--mode", "t1")
    assert done.returncode != 0
    errors = [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("error")]
    assert len(errors) == 1 and errors[0].startswith(refusal)  # printed once, by rank 0

    # Each rank on its own: rank 0 refuses (the checks run there alone), rank 1 learns it and
    # leaves with the same status, without a word, instead of waiting for rank 0.
    (status0, stderr0), (status1, stderr1) = started_as_torchrun_starts_them(root, out, "--mode", "t1")
    assert (status0, status1) == (2, 2)
    assert stderr0.splitlines()[-1].startswith(refusal) and "error" not in stderr1
    assert sorted(p.name for p in out.iterdir()) == [".lock", "eval_config.json"]
    assert (out / "eval_config.json").read_text() == "{}"


def test_a_case_unreadable_in_its_voxels_stops_the_run_with_the_cases_before_it_written(
        segmentation_setup, tmp_path):
    # The headers pass the checks; the voxels of the third case do not. Every mask of the two
    # cases before it is written (the writers were still busy with them), so --resume, once the
    # file is replaced, predicts only the rest.
    root, cases = segmentation_setup
    data = many_cases(cases, tmp_path / "data", 4)
    folders = sorted(p.name for p in data.iterdir())
    bad = data / folders[2] / f"{folders[2]}_t2.nii.gz"
    good = bad.read_bytes()
    bad.write_bytes(gzip.compress(gzip.decompress(good)[:-1000]))  # a valid header over too few voxels
    out = tmp_path / "out"
    flags = ["--input", str(data), "--restore_from", str(root / "final.pth"), "--output_dir",
             str(out), "--device", "cpu", "--mode", "all", "--workers", "1"]
    message = cli(flags).splitlines()[-1]
    assert message.startswith(f"error: case {folders[2]}: {bad}: unreadable NIfTI")
    assert message.endswith("; the cases before it are exported: replace the file, then run the "
                            "same command with --resume")
    assert sorted({p.name for p in out.glob("*/*.nii.gz")}) == [f"{f}.nii.gz" for f in folders[:2]]
    assert len(list(out.glob("*/*.nii.gz"))) == 2 * 15
    bad.write_bytes(good)
    predicted = []
    real = evaluate.segment
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(evaluate, "segment", lambda model, image, *a: predicted.append(1) or real(model, image, *a))
        evaluate.main([*flags, "--resume"])
    assert len(predicted) == 2 and len(list(out.glob("*/*.nii.gz"))) == 4 * 15


def test_a_label_map_with_brats_2023_labels_under_2018_names_is_named_with_what_to_do(
        segmentation_setup, tmp_path):
    # Its voxels are read after the cases before it were predicted: the advice is the label
    # file's (not a modality's), and says how BraTS 2023 cases are read.
    root, cases = segmentation_setup
    data = many_cases(cases, tmp_path / "data", 2)
    folder = sorted(data.iterdir())[1]
    seg = folder / f"{folder.name}_seg.nii.gz"
    image = nib.load(seg)
    labels = np.asanyarray(image.dataobj).copy()
    labels[labels == 4] = 3
    nib.save(nib.Nifti1Image(labels, image.affine, image.header), seg)
    message = cli(["--input", str(data), "--restore_from", str(root / "final.pth"), "--output_dir",
                   str(tmp_path / "out"), "--device", "cpu", "--mode", "available"]).splitlines()[-1]
    assert message == (
        f"error: case {folder.name}: {seg}: unexpected label values [3]; allowed (0, 1, 2, 4); "
        "BraTS 2023 writes enhancing tumour as 3: its cases are read as such when their files "
        "have BraTS 2023's names (<case>-seg.nii.gz, -t1c, -t1n, -t2w, -t2f); the cases before "
        "it are exported: replace the label file, or move it out of the case folder to export "
        "the case without scoring it, then run the same command with --resume")


def test_an_output_folder_that_is_a_file_is_one_line(segmentation_setup, tmp_path):
    root, _ = segmentation_setup
    (tmp_path / "afile").write_text("x")
    assert cli(argv(root, tmp_path / "afile")) == (
        f"error: cannot write in {tmp_path / 'afile'}: {tmp_path / 'afile'} is a file, not a "
        "folder; choose another folder, or fix its permissions")


@pytest.mark.parametrize("flag", ["--overwrite", "--resume"])
def test_a_folder_in_place_of_a_mask_is_one_line_before_any_work(segmentation_setup, tmp_path,
                                                                 monkeypatch, flag):
    root, cases = segmentation_setup
    folder = tmp_path / "out" / "t1ce" / f"{cases[0].name}.nii.gz"
    folder.mkdir(parents=True)
    monkeypatch.setattr(evaluate, "segment", lambda *a: pytest.fail("predicted"))
    assert cli(argv(root, tmp_path / "out", "--mode", "t1ce", flag)) == (
        f"error: cannot write {folder}: it is a folder; remove it, or choose another name")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [".lock", "t1ce"]


def test_an_empty_data_list_flag_is_refused_not_replaced_by_the_default(segmentation_setup, tmp_path):
    root, _ = segmentation_setup
    flags = argv(root, tmp_path / "out")
    flags[flags.index("--data_list") + 1] = ""
    assert cli(flags) == "error: --data_list '' names no list: give a datalist, or --input DIR"
    assert not (tmp_path / "out").exists()
    # a list without cases (a synthetic split of 2 cases has no test case): 0 masks, exit 0 before
    (tmp_path / "empty.csv").write_text("# no cases\n")
    flags[flags.index("--data_list") + 1] = str(tmp_path / "empty.csv")
    assert cli(flags) == f"error: --data_list {tmp_path / 'empty.csv'} lists no cases"
    assert not (tmp_path / "out").exists()


def test_the_network_is_the_one_the_checkpoint_records(tmp_path):
    # A network no model flag describes (deep_channels 16), trained with activation checkpointing.
    config = models.LCKDConfig.small(deep_channels=16, checkpoint_encoder=True)
    state = models.LCKD(config).state_dict()
    torch.save({"model": state, "config": {"model_size": "small", "input_size": [32, 64, 64],
                                           "model_config": config.to_dict()}}, tmp_path / "c.pth")
    parser = argparse.ArgumentParser()
    add_model_args(parser)
    model, built, window = load_model(tmp_path / "c.pth", parser.parse_args([]), torch.device("cpu"))
    assert built == dataclasses.replace(config, checkpoint_encoder=False) and window == (32, 64, 64)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    # a model flag agreeing with the record changes nothing (one that does not: below)
    _, built, _ = load_model(tmp_path / "c.pth", parser.parse_args(["--activation_cfg", "LeakyReLU"]),
                             torch.device("cpu"))
    assert built == dataclasses.replace(config, checkpoint_encoder=False)
    # a recorded BN / ReLU network without the flag keys is built as recorded
    bn = models.LCKDConfig.small(norm="BN", activation="ReLU")
    torch.save({"model": models.LCKD(bn).state_dict(), "config": {"model_config": bn.to_dict()}},
               tmp_path / "bn.pth")
    assert load_model(tmp_path / "bn.pth", parser.parse_args([]), torch.device("cpu"))[1] == bn
    # settings of a later version: one line, not a TypeError
    torch.save({"model": state, "config": {"model_config": {**config.to_dict(), "stem_channels": 32}}},
               tmp_path / "newer.pth")
    with pytest.raises(UsageError, match=r"newer.pth records network settings this version does not "
                                         r"know \(stem_channels\): evaluate it with the version"):
        load_model(tmp_path / "newer.pth", parser.parse_args([]), torch.device("cpu"))


def test_a_model_flag_that_contradicts_the_checkpoint_is_refused(segmentation_setup, tmp_path):
    # Weight standardisation and the activation hold no weights: another value loaded cleanly
    # and silently changed the masks (rc 0).
    config = models.LCKDConfig.small()  # weight_std True, IN, LeakyReLU
    state = models.LCKD(config).state_dict()
    torch.save({"model": state, "config": {"model_config": config.to_dict()}}, tmp_path / "c.pth")
    parser = argparse.ArgumentParser()
    add_model_args(parser)
    built = lambda path, *flags: load_model(path, parser.parse_args(flags), torch.device("cpu"))[1]
    for flag, given, recorded in (("--weight_std", "False", "True"), ("--norm_cfg", "BN", "IN"),
                                  ("--activation_cfg", "ReLU", "LeakyReLU")):
        with pytest.raises(UsageError) as error:
            built(tmp_path / "c.pth", flag, given)
        assert str(error.value) == (f"{flag} {given}: checkpoint {tmp_path / 'c.pth'} holds a network "
                                    f"trained with {flag} {recorded}; drop the flag, or pass {flag} "
                                    f"{recorded}")
    # the recorded values given, or left out: the recorded network
    assert built(tmp_path / "c.pth", "--weight_std", "True", "--activation_cfg", "LeakyReLU") == config
    assert built(tmp_path / "c.pth") == config
    # a bare state_dict records nothing: the flags build the network, as before
    torch.save(state, tmp_path / "bare.pth")
    assert built(tmp_path / "bare.pth", "--model_size", "small", "--weight_std", "False") == (
        dataclasses.replace(config, weight_std=False))
    # eval.py on a checkpoint recording train.py's flags only (no model_config): nothing written
    root, _ = segmentation_setup
    assert cli(argv(root, tmp_path / "out", "--weight_std", "False")) == (
        f"error: --weight_std False: checkpoint {root / 'final.pth'} holds a network trained with "
        "--weight_std True; drop the flag, or pass --weight_std True")
    assert not (tmp_path / "out").exists()


def test_a_checkpoint_of_another_network_is_one_line_naming_the_flags_it_fits(segmentation_setup, tmp_path):
    root, _ = segmentation_setup  # final.pth: the small network, InstanceNorm
    message = cli(argv(root, tmp_path / "out", "--model_size", "full"))
    assert "\n" not in message and message.startswith(
        f"error: checkpoint {root / 'final.pth'} does not fit the network built (")
    assert message.endswith("it holds a network of --model_size small --norm_cfg IN: pass those "
                            "flags instead of --model_size full")
    small = torch.load(root / "final.pth")["model"]
    full = models.LCKD(models.LCKDConfig()).state_dict()
    resized = [k for k in full if k in small and small[k].shape != full[k].shape]
    missing = [k for k in full if k not in small]
    assert (f"({len(resized)} tensors of another shape, e.g. {resized[0]} {tuple(small[resized[0]].shape)} "
            f"for {tuple(full[resized[0]].shape)}; {len(missing)} tensors missing, e.g. {missing[0]});") in message
    bare = tmp_path / "bare.pth"  # a state_dict alone: the published (full) network is built
    torch.save(small, bare)
    assert cli([*argv(root, tmp_path / "out2")[:4], "--restore_from", str(bare), "--output_dir",
                str(tmp_path / "out2"), "--device", "cpu"]).endswith(
        "it holds a network of --model_size small --norm_cfg IN: pass those flags")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out2").exists()


def test_torchrun_a_rank_that_fails_is_named_by_it_and_the_others_say_one_line(segmentation_setup, tmp_path):
    # Rank 1's case cannot be read: rank 1 names the file; rank 0, left waiting for its part
    # of the table, says so in one line instead of gloo's traceback. Rank 0's masks are written.
    root, cases = segmentation_setup
    data = copy_cases(cases, tmp_path / "data")
    bad = data / cases[1].name / f"{cases[1].name}_t2.nii.gz"
    bad.write_bytes(gzip.compress(gzip.decompress(bad.read_bytes())[:-1000]))
    out = tmp_path / "out"
    done = torchrun(root, out, "--mode", "t1ce", data_root=data)
    assert done.returncode != 0
    assert f"error: case {cases[1].name}: {bad}: unreadable NIfTI" in done.stderr
    assert ("error: rank 0: another process of this run stopped before the end (on an error, "
            "printed with this one, or killed: torchrun's summary below gives its exit code)") in done.stderr
    assert "[rank0]: Traceback" not in done.stderr
    assert [p.name for p in (out / "t1ce").glob("*.nii.gz")] == [f"{cases[0].name}.nii.gz"]


def test_the_inference_flags_reach_the_sliding_window(segmentation_setup, tmp_path, monkeypatch):
    # eval_config.json records them; here they must also be what the windows are predicted with
    import utils.segment
    root, _ = segmentation_setup
    seen, real = [], utils.segment.predict_subsets

    def spy(model, image, subsets, window, average, **kwargs):
        seen.append(dict(kwargs, average=average, window=tuple(window)))
        return real(model, image, subsets, window, average, **kwargs)

    monkeypatch.setattr(utils.segment, "predict_subsets", spy)
    run(root, tmp_path / "out", "--mode", "t1ce", "--overlap", "0.5", "--gaussian", "--mirror",
        "--amp", "bf16", "--batch_size", "3", "--average", "logits", "--input_size", "16,32,32",
        data_list="one.csv")
    assert seen == [{"overlap": 0.5, "gaussian": True, "mirror": True, "amp": "bf16",
                     "batch_size": 3, "average": "logits", "window": (16, 32, 32),
                     "device": torch.device("cpu")}]


def test_summary_table_keeps_regions_apart():
    rows = [{"case": "a", "subset": "flair", "region": r, "dice": d, "hd95": h}
            for r, d, h in (("ET", 0.1, 1.0), ("WT", 0.9, 2.0), ("TC", 0.5, 3.0))]
    table = evaluate.summary_table(pd.DataFrame(rows), [(0,)])
    assert table.loc[0, ["ET Dice", "TC Dice", "WT Dice"]].tolist() == pytest.approx([10, 50, 90])
    assert table.loc[0, ["ET HD95", "TC HD95", "WT HD95"]].tolist() == pytest.approx([1, 3, 2])


# ------------------------------------------------------------ metrics.csv's values, by hand
def _case(gt, spacing=(1.0, 1.0, 1.0)):
    return SimpleNamespace(name="c", label=gt, spacing=spacing)


def test_metrics_csv_scores_the_prediction_against_the_reference():
    """metrics.csv's sensitivity is TP / |reference|, specificity TN / |reference background|:
    gt WT 8 voxels, pred 4 of them + 2 elsewhere in a 10^3 volume -> sensitivity 4/8,
    specificity 990/992 (arguments swapped: 4/6 and 990/994)."""
    gt = np.zeros((10, 10, 10), np.uint8)
    gt[0:2, 0:2, 0:2] = 2
    pred = np.zeros_like(gt)
    pred[0:1, 0:2, 0:2] = 2
    pred[9, 9, 8:10] = 2
    rows = {r["region"]: r for r in evaluate.metric_rows(_case(gt), (0,), pred, "max")}
    assert rows["WT"]["sensitivity"] == pytest.approx(4 / 8)
    assert rows["WT"]["specificity"] == pytest.approx(990 / 992)
    assert rows["WT"]["case"] == "c" and rows["WT"]["subset"] == "flair"


def test_metrics_csv_hd95_uses_the_cases_spacing_in_network_order():
    """Single voxels 3 apart along D (network axis 0) with spacing (D, H, W) = (2.0, 1.0, 0.5):
    HD95 6.0 mm (ignored spacing: 3.0; reversed: 1.5)."""
    gt = np.zeros((8, 6, 6), np.uint8)
    pred = np.zeros_like(gt)
    gt[1, 3, 3] = 2
    pred[4, 3, 3] = 2
    rows = {r["region"]: r for r in evaluate.metric_rows(_case(gt, (2.0, 1.0, 0.5)), (0,), pred, "max")}
    assert rows["WT"]["hd95"] == pytest.approx(6.0)


def test_metrics_csv_hd95_follows_the_hd95_flag_whose_default_is_max():
    """--hd95 pooled reaches the metric: line vs voxel, pooled p95 of [0, 0, 1..19] = 18.0,
    max = 18.05."""
    line, voxel = line_and_voxel()
    pred, gt = line.astype(np.uint8) * 2, voxel.astype(np.uint8) * 2
    pooled = {r["region"]: r for r in evaluate.metric_rows(_case(gt), (0,), pred, "pooled")}
    maxed = {r["region"]: r for r in evaluate.metric_rows(_case(gt), (0,), pred, "max")}
    assert pooled["WT"]["hd95"] == pytest.approx(18.0, rel=1e-9)
    assert maxed["WT"]["hd95"] == pytest.approx(18.05, rel=1e-9)
    assert evaluate.parse_args(["--restore_from", "x"]).hd95 == "max"
