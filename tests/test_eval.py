import shutil

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

import eval as evaluate
from datasets.synthetic import generate
from models import LCKD, LCKDConfig
from utils.inference import predict_subsets
from utils.modalities import ALL_SUBSETS, subset_name
from utils.segment import load_model
from utils.user_errors import UsageError

# Small enough for the CPU (the 15-subset pass decodes 15 times), large enough for the
# published normalisation (its histogram needs 50 voxels per top bin).
SHAPE_XYZ = (64, 64, 32)  # network order (32, 64, 64): one window of the saved input_size


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Two synthetic cases, a list of them, and a random small model saved as train.py does."""
    root = tmp_path_factory.mktemp("eval")
    cases = generate(root / "data", 2, shape_xyz=SHAPE_XYZ, seed=3)
    (root / "cases.csv").write_text("".join(f"{c.name}\n" for c in cases))
    (root / "one.csv").write_text(f"{cases[1].name}\n")
    torch.manual_seed(0)
    model = LCKD(LCKDConfig.small())
    checkpoint = {"model": model.state_dict(),
                  "config": {"model_size": "small", "input_size": [32, 64, 64],
                             "weight_std": True, "norm_cfg": "IN",
                             "activation_cfg": "LeakyReLU"}}
    torch.save(checkpoint, root / "final.pth")
    return root, cases


def run(root, out, *flags, data_list="cases.csv"):
    return evaluate.main(["--data_list", str(root / data_list), "--data_root", str(root / "data"),
                          "--restore_from", str(root / "final.pth"), "--output_dir", str(out),
                          "--device", "cpu", *flags])


def test_mode_all_writes_15_subsets_and_table_equal_to_single_runs(setup, tmp_path):
    root, cases = setup
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
    assert list(summary.columns) == ["subset", "FLAIR", "T1", "T1ce", "T2", "ET Dice",
                                     "TC Dice", "WT Dice", "ET HD95", "TC HD95", "WT HD95"]
    assert summary["subset"].tolist() == [subset_name(s) for s in ALL_SUBSETS] + ["mean"]
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


def test_joint_probabilities_equal_single_subset_runs(setup):
    root, _ = setup
    args = evaluate.parse_args(["--restore_from", "unused", "--input_size", "16,32,32"])
    model, _, window = load_model(root / "final.pth", args, torch.device("cpu"))
    image = torch.randn(4, 16, 32, 32)
    joint = predict_subsets(model, image, ALL_SUBSETS, window)
    for i in (0, 14):
        single = predict_subsets(model, image, [ALL_SUBSETS[i]], window)[0]
        torch.testing.assert_close(joint[i], single, rtol=0, atol=1e-5)


def test_flags_override_the_checkpoint_and_unlabelled_cases_are_only_exported(setup, tmp_path):
    root, cases = setup
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


def test_model_flags_and_bad_modes_are_checked(setup, tmp_path):
    root, _ = setup
    with pytest.raises(ValueError, match="training mode"):
        run(root, tmp_path, "--mode", "random")
    with pytest.raises(UsageError, match="does not fit"):
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
    assert table.loc[1, ["FLAIR", "T1", "T1ce", "T2"]].tolist() == ["○", "●", "○", "●"]
    assert table.loc[2, "subset"] == "mean" and table.loc[2, "FLAIR"] == ""


def test_a_case_that_cannot_be_normalised_names_the_case_and_file(setup, tmp_path):
    root, cases = setup
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
