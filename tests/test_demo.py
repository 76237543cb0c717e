"""The main job end to end: `bash run.sh demo`, shortened (tiny volumes, a few iterations)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from test_figures import read_png
from utils.figures import case_layout
from utils.modalities import ALL_SUBSETS, subset_name

REPO = Path(__file__).resolve().parents[1]
LOCAL = (".git", ".venv", "data", "cache", "snapshots", "outputs", "logs", "runs", "__pycache__",
         ".pytest_cache")


def test_demo_runs_the_whole_pipeline(tmp_path):
    # A copy of the repository, so the demo's data/, snapshots/ and outputs/ land in tmp_path.
    repo = tmp_path / "repo"
    shutil.copytree(REPO, repo, ignore=shutil.ignore_patterns(*LOCAL))
    env = dict(os.environ, PYTHON=sys.executable, DEMO_CASES="5", DEMO_SHAPE="64,64,32",
               PATCH="16,32,32", STAGE1_STEPS="4", STAGE2_STEPS="8", VAL_EVERY="4",
               NUM_WORKERS="0", CUDA_VISIBLE_DEVICES="")
    run = subprocess.run(["bash", "run.sh", "demo"], cwd=repo, env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    # Both stages trained; stage 2 continued stage 1's iteration count.
    for stage, iteration in (("demo_stage1", 4), ("demo_stage2", 8)):
        config = json.loads((repo / "snapshots" / stage / "config.json").read_text())
        assert config["model_size"] == "small"
        assert (repo / "snapshots" / stage / "final.pth").is_file()
    history = json.loads((repo / "snapshots/demo_stage2/teachers.json").read_text())
    assert [h["iteration"] for h in history][-1] == 4
    assert "elected teachers" in run.stdout

    # Masks for the one test case in 15 subset folders, on the input grid, labels 0/1/2/4.
    test_cases = (repo / "data/synthetic/test.csv").read_text().split()
    assert len(test_cases) == 1
    case = test_cases[0]
    reference = nib.load(repo / f"data/synthetic/{case}/{case}_flair.nii.gz")
    for subset in ALL_SUBSETS:
        for folder in ("outputs/demo", "outputs/demo_postprocessed"):
            mask = nib.load(repo / folder / subset_name(subset) / f"{case}.nii.gz")
            assert mask.shape == reference.shape
            np.testing.assert_allclose(mask.affine, reference.affine)
            assert set(np.unique(np.asarray(mask.dataobj))) <= {0, 1, 2, 4}

    # The paper's table: 15 rows and the mean, printed at the end.
    table = pd.read_csv(repo / "outputs/demo/summary.csv")
    assert list(table["subset"]) == [subset_name(s) for s in ALL_SUBSETS] + ["mean"]
    assert "| mean" in run.stdout
    assert "demo finished" in run.stdout
    # ... and the run's line in the table of every demo run, with how it trained
    (line,) = [line for line in run.stdout.splitlines() if line.startswith("  demo ")]
    dice = table.set_index("subset").loc["mean", ["ET Dice", "TC Dice", "WT Dice"]]
    assert line.split("|")[0].split()[1:] == [f for r, d in zip(("ET", "TC", "WT"), dice)
                                              for f in (r, f"{d:.1f}")]
    assert line.endswith("(small 16x32x32, iterations 4+4, kd 0.1)"), line

    # Pictures: one per test case (ground truth + 15 subset rows, 4 modality columns), the
    # Dice chart; and the one case segmented from its FLAIR and T1ce alone, with its figure.
    assert read_png(repo / f"outputs/demo/figures/{case}.png", case_layout((64, 64), 16, 4)[:2]).any()
    read_png(repo / "outputs/demo/dice.png", (1025, 450))
    predicted = nib.load(repo / f"outputs/demo_predict/{case}.nii.gz")
    np.testing.assert_allclose(predicted.affine, reference.affine)
    read_png(repo / f"outputs/demo_predict/{case}.png", case_layout((64, 64), 1, 2)[:2])
    for line in ("figures             outputs/demo/figures/<case>.png",
                 f"outputs/demo_predict/{case}.nii.gz, figure outputs/demo_predict/{case}.png"):
        assert line in run.stdout

    # Run again: training is skipped, the export replaces the previous one.
    again = subprocess.run(["bash", "run.sh", "demo"], cwd=repo, env=env, capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "demo_stage2/final.pth exists" in again.stdout and "demo finished" in again.stdout
    assert "data/synthetic: the synthetic dataset of these settings, kept" in again.stdout
    # ... with another DEMO_SHAPE: refused, not trained on the old data without a word
    other = subprocess.run(["bash", "run.sh", "demo"], cwd=repo, env=dict(env, DEMO_SHAPE="64,64,48"),
                           capture_output=True, text=True, timeout=600)
    assert other.returncode == 2 and other.stderr == (
        "error: data/synthetic holds a synthetic dataset of 5 cases of 64x64x32, seed 0, "
        "nii.gz, not 5 cases of 64x64x48, seed 0, nii.gz: delete the folder to generate it again, "
        "or give another one (DEMO_DATA for run.sh demo)\n")
    # ... and with a longer stage 1, stopped at once: the finished stage is not that run
    longer = subprocess.run(["bash", "run.sh", "demo"], cwd=repo, env=dict(env, STAGE1_STEPS="6"),
                            capture_output=True, text=True, timeout=600)
    assert longer.returncode == 2, longer.stdout[-3000:] + longer.stderr[-3000:]
    assert ("error: snapshots/demo_stage1 holds a run with --num_steps 4 (this command: 6); run it "
            "with the same settings (its config.json), --overwrite True to start over, or choose "
            "another --snapshot_dir\n") in longer.stdout + longer.stderr
