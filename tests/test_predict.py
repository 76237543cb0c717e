"""predict.py: one case from explicit files, the same mask as eval.py, checks and warnings."""
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import eval as evaluate
import predict
from test_eval import all_zero, cli_error, copy_cases
from datasets.brats import to_network_order
from test_figures import read_png
from utils import figures
from utils.postprocessing import Rules, postprocess_label


def files_of(case, *modalities):
    return [arg for m in modalities for arg in (f"--{m}", str(case / f"{case.name}_{m}.nii.gz"))]


def mask(path):
    return np.asanyarray(nib.load(path).dataobj)


def cli(argv):
    return cli_error(predict.main, argv)


def brats_2023_copy(case, folder):
    """The case's FLAIR and T1ce as a BraTS 2023 case folder names them (-t2f, -t1c)."""
    folder.mkdir()
    for modality, suffix in (("flair", "t2f"), ("t1ce", "t1c")):
        (folder / f"{folder.name}-{suffix}.nii.gz").write_bytes(
            (case / f"{case.name}_{modality}.nii.gz").read_bytes())
    return folder


def test_predict_equals_eval_on_the_incomplete_case(segmentation_setup, tmp_path, capsys):
    root, cases = segmentation_setup
    case = cases[0]
    incomplete = copy_cases([case], tmp_path / "data", drop=("t1", "t2"))
    evaluate.main(["--input", str(incomplete / case.name), "--mode", "available", "--restore_from",
                   str(root / "final.pth"), "--device", "cpu", "--output_dir", str(tmp_path / "eval")])
    out = tmp_path / "pred" / "mask.nii.gz"
    predict.main([*files_of(case, "flair", "t1ce"), "--checkpoint", str(root / "final.pth"),
                  "-o", str(out), "--device", "cpu", "--figure"])
    printed = capsys.readouterr()
    np.testing.assert_array_equal(mask(out), mask(tmp_path / "eval" / "available" / f"{case.name}.nii.gz"))
    reference = nib.load(case / f"{case.name}_flair.nii.gz")
    written = nib.load(out)
    assert written.shape == reference.shape and written.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(written.affine, reference.affine)
    assert f"mask from flair+t1ce written to {out}" in printed.out
    assert "warning" not in printed.err  # synthetic cases look like BraTS

    # one row (no labels), a column per modality given
    read_png(tmp_path / "pred" / "mask.png", figures.case_layout((64, 64), 1, 2)[:2])


def test_an_all_zero_file_counts_as_the_missing_modality(segmentation_setup, tmp_path, capsys):
    # As eval.py: the published code's users fill a missing modality with zeros.
    root, cases = segmentation_setup
    case = cases[0]
    filled = all_zero(copy_cases([case], tmp_path / "data") / case.name, "t1", "t2")
    common = ["--checkpoint", str(root / "final.pth"), "--device", "cpu"]
    predict.main([*files_of(filled, "flair", "t1", "t1ce", "t2"), *common,
                  "-o", str(tmp_path / "filled.nii.gz")])
    printed = capsys.readouterr().out
    predict.main([*files_of(case, "flair", "t1ce"), *common, "-o", str(tmp_path / "two.nii.gz")])
    np.testing.assert_array_equal(mask(tmp_path / "filled.nii.gz"), mask(tmp_path / "two.nii.gz"))
    assert printed.splitlines()[:2] == [f"{case.name}_t1.nii.gz is all zero: t1 counted as missing",
                                        f"{case.name}_t2.nii.gz is all zero: t2 counted as missing"]
    assert f"mask from flair+t1ce written to {tmp_path / 'filled.nii.gz'}" in printed

    message = cli([*files_of(filled, "t1", "t2"), *common, "-o", str(tmp_path / "none.nii.gz")])
    assert message == (f"error: case none: {filled / f'{case.name}_t1.nii.gz'}: all zero, as every "
                       "modality file of the case: nothing to predict from")
    assert not (tmp_path / "none.nii.gz").exists()


def test_postprocess_is_the_published_rules_on_the_mask(segmentation_setup, tmp_path, capsys):
    root, cases = segmentation_setup
    case = cases[1]
    common = [*files_of(case, "flair", "t1ce"), "--checkpoint", str(root / "final.pth"), "--device", "cpu"]
    predict.main([*common, "-o", str(tmp_path / "raw.nii.gz")])
    predict.main([*common, "-o", str(tmp_path / "post.nii.gz"), "--postprocess", "--kmeans_necrosis"])
    raw = mask(tmp_path / "raw.nii.gz")
    t1ce = nib.load(case / f"{case.name}_t1ce.nii.gz").get_fdata(dtype=np.float32)
    # computed in NIfTI order (z = axis 2) by postprocess.py's function, independently of
    # predict.py's network order
    expected, _ = postprocess_label(raw, Rules(), t1ce=t1ce)
    np.testing.assert_array_equal(mask(tmp_path / "post.nii.gz"), expected)
    assert "post-processing:" in capsys.readouterr().out

    predict.main([*files_of(case, "flair"), "--checkpoint", str(root / "final.pth"), "--device",
                  "cpu", "-o", str(tmp_path / "flair.nii.gz"), "--postprocess", "--kmeans_necrosis"])
    assert "K-means rule skipped: no T1ce" in capsys.readouterr().out

    # postprocess.py's thresholds (here: every component smaller than the largest dropped, and
    # ET relabelled as NCR below a million voxels: all of it, the mask's only change)
    predict.main([*common, "-o", str(tmp_path / "strict.nii.gz"), "--postprocess",
                  "--min_component", "1000000", "--min_fraction", "1", "--et_threshold", "1000000"])
    strict, _ = postprocess_label(raw, Rules(min_component=1000000, min_fraction=1,
                                             et_threshold=1000000))
    np.testing.assert_array_equal(mask(tmp_path / "strict.nii.gz"), strict)
    assert not np.array_equal(strict, postprocess_label(raw)[0])


def test_the_kmeans_rule_visits_components_in_nifti_order_as_postprocess_py(
        segmentation_setup, tmp_path, monkeypatch):
    # Two components of 4 700 NCR voxels each: the first the rule visits takes the case's NCR
    # count past kmeans_max_ncr (10 000), so it alone is relabelled. In NIfTI order (X, Y, Z)
    # A comes first; in the network's (Z, X, Y) B did, so predict.py and postprocess.py
    # gave different masks.
    root, _ = segmentation_setup
    label = np.zeros((50, 24, 60), np.uint8)
    a, b = np.s_[2:20, 2:20, 30:50], np.s_[30:48, 2:20, 10:30]
    for box in (a, b):
        part = label[box]  # a view
        part[:] = 2
        part[np.unravel_index(np.arange(4700), part.shape)] = 1
        part[-1, -1, -1] = 4
    t1ce = np.where(label == 2, np.random.default_rng(0).choice([100, 200, 300], label.shape), 0)
    (tmp_path / "P").mkdir()
    flair = t1ce + (t1ce > 0)  # a scan of its own: a copy of the T1ce is refused
    for modality, volume in (("flair", flair), ("t1ce", t1ce)):
        nib.save(nib.Nifti1Image(volume.astype(np.int16), np.eye(4)), tmp_path / "P" / f"P_{modality}.nii.gz")
    monkeypatch.setattr(predict, "segment", lambda *args: [to_network_order(label)])
    out = tmp_path / "P.nii.gz"
    predict.main([*files_of(tmp_path / "P", "flair", "t1ce"), "--checkpoint",
                  str(root / "final.pth"), "--device", "cpu", "-o", str(out), "--postprocess",
                  "--kmeans_necrosis"])
    expected, info = postprocess_label(label, Rules(), t1ce=t1ce.astype(np.float32))
    relabelled = (expected == 1) & (label == 2)
    assert relabelled[a].sum() == info["necrosis_relabelled"] > 0 and not relabelled[b].any()
    np.testing.assert_array_equal(mask(out), expected)


def test_input_that_does_not_look_like_brats_is_warned_about(segmentation_setup, tmp_path, capsys):
    root, cases = segmentation_setup
    case = cases[0]
    flair = nib.load(case / f"{case.name}_flair.nii.gz")
    unstripped = tmp_path / "flair_head.nii.gz"  # background no longer 0: not skull-stripped
    nib.save(nib.Nifti1Image(np.asanyarray(flair.dataobj) + np.int16(30), flair.affine, flair.header),
             unstripped)
    predict.main(["--flair", str(unstripped), *files_of(case, "t2"), "--checkpoint",
                  str(root / "final.pth"), "--device", "cpu", "-o", str(tmp_path / "m.nii.gz")])
    err = capsys.readouterr().err
    assert "warning: case m: flair_head.nii.gz: only 0% of the voxels are 0; not skull-stripped?" in err
    assert (tmp_path / "m.nii.gz").is_file()
    assert "named after different cases" not in err  # 'flair_head' is not named <case>_<modality>
    # another patient's T1ce: eval.py refuses such a case folder; here the names warn
    predict.main([*files_of(case, "flair"), *files_of(cases[1], "t1ce"), "--checkpoint",
                  str(root / "final.pth"), "--device", "cpu", "-o", str(tmp_path / "m2.nii.gz")])
    err = capsys.readouterr().err
    assert err.startswith(f"warning: the files are named after different cases (--flair "
                          f"{case.name}_flair.nii.gz, --t1ce {cases[1].name}_t1ce.nii.gz): scans of "
                          "one patient are expected\n")


def test_file_names_of_one_case_in_any_scheme_do_not_warn():
    def files(**names):
        return {m: Path("in") / name for m, name in names.items()}
    assert predict.patients_warning(files(flair="P01_flair.nii.gz", t1ce="p01_T1CE.nii")) is None
    assert predict.patients_warning(files(t1="BraTS-GLI-00001-000-t1n.nii.gz",
                                          t2="BraTS-GLI-00001-000-t2w.nii.gz")) is None
    assert predict.patients_warning(files(flair="scan.nii.gz", t2="P02_t2.nii.gz")) is None
    # a modality named in two tokens: T2_FLAIR, T1_ce
    assert predict.patients_warning(files(flair="P01_T2_FLAIR.nii.gz", t1="P01_T1.nii.gz",
                                          t1ce="P01-t1-ce.nii.gz", t2="p01_t2.nii.gz")) is None
    assert predict.patients_warning(files(flair="sub-01_ses-1_FLAIR.nii.gz",
                                          t1="sub-01_ses-1_T1w.nii.gz")) is None
    assert "(--flair P02_T2_FLAIR.nii.gz, --t1 P01_T1.nii.gz)" in predict.patients_warning(
        files(flair="P02_T2_FLAIR.nii.gz", t1="P01_T1.nii.gz"))
    assert "(--t1 BraTS-GLI-00001-000-t1n.nii.gz, --t2 BraTS-GLI-00002-000-t2w.nii.gz)" in (
        predict.patients_warning(files(t1="BraTS-GLI-00001-000-t1n.nii.gz",
                                       t2="BraTS-GLI-00002-000-t2w.nii.gz")))


def test_user_errors_are_one_line_and_write_nothing(segmentation_setup, tmp_path):
    root, cases = segmentation_setup
    case = cases[0]
    out = tmp_path / "out" / "m.nii.gz"
    ckpt = ["--checkpoint", str(root / "final.pth"), "--device", "cpu"]
    assert cli([*ckpt, "-o", str(out)]) == "error: give at least one modality: --flair, --t1, --t1ce, --t2"
    missing = tmp_path / "P01_t1ce.nii.gz"
    assert cli([*files_of(case, "t2"), "--t1ce", str(missing), *ckpt, "-o", str(out)]) == (
        f"error: --t1ce {missing}: not found")
    (tmp_path / "scan.nii").mkdir()
    assert cli(["--flair", str(tmp_path / "scan.nii"), *ckpt, "-o", str(out)]) == (
        f"error: --flair {tmp_path / 'scan.nii'}: a folder, not a NIfTI file")
    assert cli([*files_of(case, "t2"), *ckpt, "--checkpoint", "", "-o", str(out)]) == (
        "error: argument --checkpoint: expected a path, got '' (see predict.py --help)")  # not the cwd
    assert cli([*files_of(case, "t2"), *ckpt, "-o", str(tmp_path / "m.png")]) == (
        f"error: -o {tmp_path / 'm.png'}: expected a NIfTI file, named .nii.gz or .nii")
    for empty in (".nii.gz", ".NII"):  # -o "$OUT/$CASE.nii.gz" with CASE unset
        assert cli([*files_of(case, "t2"), *ckpt, "-o", str(tmp_path / empty)]) == (
            f"error: -o {tmp_path / empty}: no name before the extension (an unset variable?)")
    assert "add --postprocess" in cli([*files_of(case, "t2"), *ckpt, "-o", str(out), "--kmeans_necrosis"])
    assert cli([*files_of(case, "t2"), *ckpt, "-o", str(out), "--et_threshold", "33"]) == (
        "error: --et_threshold is a threshold of post-processing: add --postprocess")
    for extra, needed in ((["--postprocess"], "--kmeans_necrosis"),
                          ([], "--kmeans_necrosis --postprocess")):
        assert cli([*files_of(case, "t2"), *ckpt, "-o", str(out), "--kmeans_max_ncr", "5",
                    *extra]) == f"error: --kmeans_max_ncr is a threshold of the K-means rule: add {needed}"
    same = str(case / f"{case.name}_t2.nii.gz")
    assert cli([*files_of(case, "t2"), *ckpt, "-o", same]) == f"error: -o {same} is one of the inputs"
    # a case's label (or another of its scans), even with --overwrite: eval.py would score
    # against the prediction
    for part in ("seg", "t1"):
        own = case / f"{case.name}_{part}.nii.gz"
        assert cli([*files_of(case, "t2"), *ckpt, "-o", str(own), "--overwrite"]) == (
            f"error: -o {own} is named as a scan or label of case {case.name} in its folder, "
            f"where eval.py reads it as one (a label: the ground truth); name the mask otherwise, "
            f"e.g. {case.name}_pred.nii.gz")

    thin = tmp_path / "t1ce_thin.nii.gz"
    t1ce = nib.load(case / f"{case.name}_t1ce.nii.gz")
    nib.save(nib.Nifti1Image(np.asanyarray(t1ce.dataobj)[:, :, :31], t1ce.affine), thin)
    message = cli([*files_of(case, "flair"), "--t1ce", str(thin), *ckpt, "-o", str(out)])
    assert message == (f"error: case m: {thin}: shape (64, 64, 31) differs from "
                       f"{case.name}_flair.nii.gz (64, 64, 32); the files of a case must lie on "
                       "one grid: resample (or reorient) the odd one onto the others' grid, e.g. "
                       "onto the FLAIR's")
    assert not (tmp_path / "out").exists()
    (tmp_path / "afile").write_text("x")
    assert cli([*files_of(case, "t2"), *ckpt, "-o", str(tmp_path / "afile" / "m.nii.gz")]) == (
        f"error: cannot write in {tmp_path / 'afile'}: {tmp_path / 'afile'} is a file, not a "
        "folder; choose another folder, or fix its permissions")  # before predicting


def test_thresholds_out_of_range_are_refused_as_by_postprocess_py(capsys):
    # the same flags as postprocess.py's (add_threshold_args), so the same ranges
    given = ["--t2", "P01_t2.nii.gz", "--checkpoint", "final.pth", "-o", "m.nii.gz", "--postprocess"]
    for flag, bad, allowed in (("--bottom_slices", "-1", "must be at least 0"),
                               ("--min_fraction", "2", "must be in [0, 1]")):
        with pytest.raises(SystemExit) as exit_:
            predict.parse_args([*given, flag, bad])
        assert exit_.value.code == 2
        assert capsys.readouterr().err == (f"error: argument {flag}: {allowed}, got {bad} "
                                           "(see predict.py --help)\n")


def test_one_scan_for_two_modalities_and_a_figure_not_png_are_refused(segmentation_setup, tmp_path):
    root, cases = segmentation_setup
    case = cases[0]
    flair = case / f"{case.name}_flair.nii.gz"
    common = ["--checkpoint", str(root / "final.pth"), "--device", "cpu", "-o", str(tmp_path / "m.nii.gz")]
    assert cli(["--flair", str(flair), "--t1", str(flair), *common]) == (
        f"error: --flair {flair} is given for another modality too: each modality needs its own scan")
    assert cli([*files_of(case, "flair"), *common, "--figure", str(tmp_path / "fig")]) == (
        f"error: --figure {tmp_path / 'fig'}: the figure is a PNG, name it .png")
    assert not any(tmp_path.iterdir())


def test_an_existing_mask_is_replaced_only_with_overwrite(segmentation_setup, tmp_path):
    root, cases = segmentation_setup
    case = cases[0]
    out = tmp_path / "m.nii.gz"
    common = ["--checkpoint", str(root / "final.pth"), "--device", "cpu", "-o", str(out)]
    predict.main([*files_of(case, "flair", "t1ce"), *common, "--figure"])
    before, figure = mask(out), (tmp_path / "m.png").read_bytes()
    assert cli([*files_of(case, "flair"), *common]) == (
        f"error: {out} exists (an earlier prediction?); pass --overwrite to replace it, or "
        "choose another -o")
    np.testing.assert_array_equal(mask(out), before)
    assert (tmp_path / "m.png").read_bytes() == figure
    # replaced: the figure of the flair+t1ce mask no longer stands beside the flair-only one
    predict.main([*files_of(case, "flair"), *common, "--overwrite"])
    predict.main([*files_of(case, "flair"), *common[:-2], "-o", str(tmp_path / "f.nii.gz")])
    np.testing.assert_array_equal(mask(out), mask(tmp_path / "f.nii.gz"))
    assert not np.array_equal(mask(out), before)
    assert not (tmp_path / "m.png").exists()
    # nor when the new figure is written elsewhere
    predict.main([*files_of(case, "flair"), *common, "--overwrite", "--figure"])
    assert (tmp_path / "m.png").is_file()
    predict.main([*files_of(case, "flair", "t1ce"), *common, "--overwrite", "--figure",
                  str(tmp_path / "other.png")])
    assert not (tmp_path / "m.png").exists() and (tmp_path / "other.png").is_file()
    # a folder of that name is no figure: left alone (unlink crashed on it after predicting)
    (tmp_path / "m.png").mkdir()
    (tmp_path / "m.png" / "kept").write_text("x")
    predict.main([*files_of(case, "flair", "t1ce"), *common, "--overwrite"])
    np.testing.assert_array_equal(mask(out), before)
    assert (tmp_path / "m.png" / "kept").read_text() == "x"


def test_a_folder_in_place_of_the_mask_or_figure_is_refused_before_predicting(
        segmentation_setup, tmp_path, monkeypatch):
    root, cases = segmentation_setup
    monkeypatch.setattr(predict, "load_model", lambda *a: pytest.fail("predicted"))
    common = [*files_of(cases[0], "flair"), "--checkpoint", str(root / "final.pth"), "--device",
              "cpu", "--overwrite"]
    folder = tmp_path / "P.nii.gz"
    folder.mkdir()
    assert cli([*common, "-o", str(folder)]) == (
        f"error: cannot write {folder}: it is a folder; remove it, or choose another name")
    figure = tmp_path / "F.png"
    figure.mkdir()
    assert cli([*common, "-o", str(tmp_path / "m.nii.gz"), "--figure", str(figure)]) == (
        f"error: cannot write {figure}: it is a folder; remove it, or choose another name")
    assert sorted(tmp_path.iterdir()) == [figure, folder]
    assert not any(folder.iterdir()) and not any(figure.iterdir())


def test_the_inference_flags_reach_the_sliding_window(segmentation_setup, tmp_path, monkeypatch):
    import utils.segment
    root, cases = segmentation_setup
    seen, real = [], utils.segment.predict_subsets

    def spy(model, image, subsets, window, average, **kwargs):
        seen.append(dict(kwargs, subsets=subsets, average=average, window=tuple(window)))
        return real(model, image, subsets, window, average, **kwargs)

    monkeypatch.setattr(utils.segment, "predict_subsets", spy)
    predict.main([*files_of(cases[0], "flair", "t2"), "--checkpoint", str(root / "final.pth"),
                  "-o", str(tmp_path / "mask.nii.gz"), "--device", "cpu", "--overlap", "0.5",
                  "--gaussian", "--mirror", "--amp", "bf16", "--batch_size", "3",
                  "--average", "logits", "--input_size", "16,32,32"])
    assert seen == [{"subsets": [(0, 3)], "overlap": 0.5, "gaussian": True, "mirror": True,
                     "amp": "bf16", "batch_size": 3, "average": "logits", "window": (16, 32, 32),
                     "device": torch.device("cpu")}]


def test_a_file_named_as_another_modality_is_warned_about(segmentation_setup, tmp_path, capsys):
    # BraTS 2023's t2f is the FLAIR and t2w the T2: '--t2 X-t2f.nii.gz' would give the network a
    # FLAIR as T2 without a word.
    root, cases = segmentation_setup
    renamed = brats_2023_copy(cases[0], tmp_path / "BraTS-GLI-00001-000")
    common = ["--checkpoint", str(root / "final.pth"), "--device", "cpu"]
    predict.main(["--t2", str(renamed / f"{renamed.name}-t2f.nii.gz"),
                  "--t1ce", str(renamed / f"{renamed.name}-t1c.nii.gz"), *common,
                  "-o", str(tmp_path / "m.nii.gz")])
    err = capsys.readouterr().err
    assert err.startswith(f"warning: --t2 {renamed.name}-t2f.nii.gz is named as a flair scan (t2f): "
                          "each file is given to the network as its flag's modality; check the "
                          "flags (BraTS 2023 names: t2f = FLAIR, t1n = T1, t1c = T1ce, t2w = T2)\n")
    assert (tmp_path / "m.nii.gz").is_file()  # a warning: the files may be named anyhow
    # the right flags, in any scheme, or names without a modality: no warning
    def files(**names):
        return {m: Path("in") / name for m, name in names.items()}
    assert predict.modality_names_warning(files(flair="BraTS-GLI-00001-000-t2f.nii.gz",
                                                t1="BraTS-GLI-00001-000-t1n.nii.gz",
                                                t1ce="BraTS-GLI-00001-000-t1c.nii.gz",
                                                t2="BraTS-GLI-00001-000-t2w.nii.gz")) is None
    assert predict.modality_names_warning(files(flair="P01_T2_FLAIR.nii.gz", t1ce="P01-t1-ce.nii",
                                                t1="sub-01_T1w.nii.gz", t2="scan.nii.gz")) is None
    assert "--flair P01_t1ce.nii.gz is named as a t1ce scan (t1ce)" in (
        predict.modality_names_warning(files(flair="P01_t1ce.nii.gz", t1ce="P01_flair.nii.gz")))
    # the case's label given as a scan (a label map read as an MRI: a mask of nothing useful)
    labels = files(flair="P01_seg.nii.gz", t1ce="BraTS-GLI-1-000-seg.nii")
    assert predict.modality_names_warning(labels) == (
        "--flair P01_seg.nii.gz is named as a label (seg), not a scan; --t1ce BraTS-GLI-1-000-seg.nii "
        "is named as a label (seg), not a scan: each file is given to the network as its flag's "
        "modality; check the flags (BraTS 2023 names: t2f = FLAIR, t1n = T1, t1c = T1ce, t2w = T2)")


def test_contrast_enhanced_t1_names_are_read_as_t1ce():
    # BIDS names a contrast-enhanced T1 with its ce entity (sub-01_ce-gd_T1w), others put a
    # contrast word after T1 (P01_T1_post): a T1ce given to --t1ce, not a T1 (no warning), and
    # given to --t1 it is warned about.
    def files(**names):
        return {m: Path("in") / name for m, name in names.items()}
    assert predict.modality_names_warning(files(flair="sub-01_FLAIR.nii.gz", t1="sub-01_T1w.nii.gz",
                                                t1ce="sub-01_ce-gd_T1w.nii.gz",
                                                t2="sub-01_T2w.nii.gz")) is None
    assert predict.modality_names_warning(files(t1ce="P01_T1_post.nii.gz")) is None
    assert predict.modality_names_warning(files(t1="sub-01_ce-gd_T1w.nii.gz")).startswith(
        "--t1 sub-01_ce-gd_T1w.nii.gz is named as a t1ce scan (ce-gd t1w): ")
    assert predict.modality_names_warning(files(t1="P01_T1_post.nii.gz")).startswith(
        "--t1 P01_T1_post.nii.gz is named as a t1ce scan (t1 post): ")
    # a name without a modality's, or a contrast word alone, says nothing
    assert predict.modality_names_warning(files(t1="P01_post.nii.gz", t2="flair_ax.nii.gz")) is None


def test_brats_2023_files_warn_of_et_4_and_et_label_3_writes_its_labels(segmentation_setup,
                                                                        tmp_path, capsys):
    root, cases = segmentation_setup
    renamed = brats_2023_copy(cases[0], tmp_path / "BraTS-GLI-00001-000")
    common = ["--flair", str(renamed / f"{renamed.name}-t2f.nii.gz"),
              "--t1ce", str(renamed / f"{renamed.name}-t1c.nii.gz"),
              "--checkpoint", str(root / "final.pth"), "--device", "cpu"]
    predict.main([*common, "-o", str(tmp_path / "4.nii.gz")])
    assert capsys.readouterr().err == (
        f"warning: {renamed.name}-t2f.nii.gz follows BraTS 2023's naming: its online evaluation "
        "reads ET as 3, these masks hold 4; pass --et_label 3 for an upload there (--et_label 4 "
        "keeps 4 without this warning)\n")
    predict.main([*common, "-o", str(tmp_path / "3.nii.gz"), "--et_label", "3"])
    printed = capsys.readouterr()
    assert printed.err == "" and printed.out.rstrip().endswith(" ET voxels (ET written as 3)")
    expected = mask(tmp_path / "4.nii.gz")
    assert 4 in expected  # the model predicts some ET here: the relabelling is seen
    expected[expected == 4] = 3
    np.testing.assert_array_equal(mask(tmp_path / "3.nii.gz"), expected)


def test_help_shows_the_examples_as_written(capsys):
    # the docstring's shell line continuations were joined into one line
    with pytest.raises(SystemExit):
        predict.parse_args(["--help"])
    assert "--t1ce P01_t1ce.nii.gz \\\n        --checkpoint snapshots/" in capsys.readouterr().out
