"""Training end to end on tiny synthetic cases (CPU, small model) and the pieces it is made of.

Data: 5 synthetic cases of 64x64x32 voxels (3 train, 1 val), patch 16x32x32, batch 2; the
election uses overlap 0 (8 windows per case) to keep it cheap.
"""
import json
import os
import random
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import train
from datasets.synthetic import generate
from utils.checkpoint import load_checkpoint, set_rng_state
from utils.election import append_history, elect, overlay, winners
from utils.modalities import FULL, sample_subset, subset_name

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    generate(root / "data", 5, shape_xyz=(64, 64, 32), seed=3)
    return root


def flags(data, snapshot, steps, every, *extra):
    return ["--device", "cpu", "--model_size", "small", "--input_size", "16,32,32",
            "--batch_size", "2", "--num_workers", "0", "--overlap", "0",
            "--train_list", str(data / "data" / "train.csv"),
            "--val_list", str(data / "data" / "val.csv"), "--cache_dir", str(data / "cache"),
            "--snapshot_dir", str(snapshot), "--num_steps", str(steps),
            "--val_pred_every", str(every), "--log_every", "1", *extra]


def scalars(snapshot, tag):
    events = EventAccumulator(str(snapshot), size_guidance={"scalars": 0, "images": 0}).Reload()
    return {e.step: e.value for e in events.Scalars(tag)}


def max_abs_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def test_two_stages_resume_exactly(data, tmp_path):
    # ---- stage 1: all modalities
    s1 = tmp_path / "stage1"
    out = train.main(flags(data, s1, 8, 4, "--mode", "0,1,2,3", "--augment", "False"))
    losses = out["losses"]
    assert len(losses) == 8 and np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3])
    assert sorted(p.name for p in s1.iterdir() if not p.name.startswith("events")) == \
        ["config.json", "final.pth", "last.pth", "teachers.json"]
    assert len(list(s1.glob("events.out.tfevents.*"))) == 1
    config = json.loads((s1 / "config.json").read_text())
    assert config["mode"] == "0,1,2,3" and config["model_config"]["widths"] == [8, 16, 32, 40]
    history = json.loads((s1 / "teachers.json").read_text())
    assert [h["iteration"] for h in history] == [0, 4]
    for h in history:
        assert set(h["dice"]) == {"flair", "t1", "t1ce", "t2"} and set(h["winners"]) == {"ET", "WT", "TC"}
        assert h["teachers"] == sorted(set(h["winners"].values()), key=["flair", "t1", "t1ce", "t2"].index)
    final = load_checkpoint(s1 / "final.pth")
    assert final["iteration"] == 8 and load_checkpoint(s1 / "last.pth")["iteration"] == 4
    assert final["config"]["mode"] == "0,1,2,3"
    events = EventAccumulator(str(s1), size_guidance={"images": 0}).Reload()
    assert "val/overlay" in events.Tags()["images"]
    assert {"loss/total", "loss/dice", "loss/bce", "loss/kd", "lr", "val/dice/t1ce/ET",
            "teachers/flair"} <= set(events.Tags()["scalars"])

    # ---- stage 2 from stage 1's final: continues the iteration count and the lr schedule
    stage2 = ["--mode", "random", "--reload_path", str(s1 / "final.pth"),
              "--reload_from_checkpoint", "True"]
    straight = tmp_path / "stage2_straight"
    out = train.main(flags(data, straight, 14, 3, *stage2))
    assert len(out["losses"]) == 6
    lr = scalars(straight, "lr")
    assert min(lr) == 8 and lr[8] == pytest.approx(train.poly_lr(1e-2, 8, 14, 0.9), rel=1e-6)
    assert [h["iteration"] for h in json.loads((straight / "teachers.json").read_text())] == [9, 12]

    # ---- the same stage 2 killed after iteration 10, resumed from last.pth (iteration 9)
    killed = tmp_path / "stage2_killed"
    train.main(flags(data, killed, 14, 3, *stage2, "--stop_at", "11"))
    assert not (killed / "final.pth").exists()
    assert load_checkpoint(killed / "last.pth")["iteration"] == 9
    out = train.main(flags(data, killed, 14, 3, "--mode", "random", "--reload_path",
                           str(killed / "last.pth"), "--reload_from_checkpoint", "True"))
    assert len(out["losses"]) == 5  # iterations 9..13

    a, b = load_checkpoint(straight / "final.pth"), load_checkpoint(killed / "final.pth")
    assert max_abs_diff(a["model"], b["model"]) <= 1e-6
    assert max_abs_diff({k: v["momentum_buffer"] for k, v in a["optimizer"]["state"].items()},
                        {k: v["momentum_buffer"] for k, v in b["optimizer"]["state"].items()}) <= 1e-6
    assert a["teachers"] == b["teachers"] and a["iteration"] == b["iteration"] == 14
    assert json.loads((straight / "teachers.json").read_text()) == \
        json.loads((killed / "teachers.json").read_text())


def test_non_finite_loss_stops_and_keeps_last_good_state(data, tmp_path, monkeypatch):
    calls = []

    def poisoned(logits, target, kd, kd_weight):
        calls.append(1)
        total, parts = real(logits, target, kd, kd_weight)
        return (total * float("nan"), parts) if len(calls) == 3 else (total, parts)

    real = train.segmentation_loss
    monkeypatch.setattr(train, "segmentation_loss", poisoned)
    snapshot = tmp_path / "nan"
    with pytest.raises(FloatingPointError, match="non-finite loss at iteration 2") as error:
        train.main(flags(data, snapshot, 6, 100, "--val_list", "", "--mode", "random"))
    saved = load_checkpoint(snapshot / "last.pth")
    assert saved["iteration"] == 2
    # The saved subset stream has not drawn iteration 2 yet: resuming redraws the same subset.
    replay = random.Random()
    set_rng_state(saved["rng"], replay)
    assert f"modalities {subset_name(sample_subset(replay))})" in str(error.value)
    assert all(torch.isfinite(v).all() for v in saved["model"].values() if v.is_floating_point())


def test_torchrun_two_cpu_processes(data, tmp_path):
    snapshot = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(29500 + os.getpid() % 1000), str(REPO / "train.py"),
           *flags(data, snapshot, 3, 2, "--mode", "random")]
    run = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    # one set of outputs (rank 0 only); the ranks' replicas were checked equal at the end
    names = sorted(p.name for p in snapshot.iterdir() if not p.name.startswith("events"))
    assert names == ["config.json", "final.pth", "last.pth", "teachers.json"]
    assert len(list(snapshot.glob("events.out.tfevents.*"))) == 1
    assert json.loads((snapshot / "config.json").read_text())["world_size"] == 2
    assert run.stdout.count("teacher election at iteration 0") == 1  # rank 0 prints alone
    assert [h["iteration"] for h in json.loads((snapshot / "teachers.json").read_text())] == [0, 2]
    assert load_checkpoint(snapshot / "final.pth")["iteration"] == 3


# ---- the pieces


def test_winners_and_history(tmp_path):
    sums = np.array([[0.1, 0.9, 0.2], [0.1, 0.2, 0.3], [0.8, 0.1, 0.7], [0.3, 0.9, 0.1]])
    assert winners(sums) == [2, 0, 2]  # ET, WT (tie flair/t2: first wins), TC
    result = {"dice": {}, "winners": {"ET": "t1ce"}, "teachers": [2], "num_cases": 1}
    path = tmp_path / "teachers.json"
    append_history(path, result, 0)
    append_history(path, result, 5)
    append_history(path, result, 10)
    # a resumed run repeats the election at 5: later entries are replaced
    history = append_history(path, dict(result, teachers=[0, 2]), 5)
    assert [(h["iteration"], h["teachers"]) for h in history] == [(0, ["t1ce"]), (5, ["flair", "t1ce"])]


def test_elect_picks_the_modality_that_sees_each_region():
    class Oracle(torch.nn.Module):
        """Each single modality predicts one region perfectly and nothing else."""

        def __init__(self):
            super().__init__()
            self.dummy = torch.nn.Parameter(torch.zeros(()))

        def forward_subsets(self, x, subsets):  # (B, 4, d, h, w) -> (B, S, 3, d, h, w)
            out = torch.full((x.shape[0], len(subsets), 3) + x.shape[2:], -20.0)
            for s, (m,) in enumerate(subsets):
                region = {0: 1, 2: 0, 3: 2}.get(m)  # flair -> WT, t1ce -> ET, t2 -> TC
                if region is not None:
                    out[:, s, region] = torch.where(x[:, m] > 0, 20.0, -20.0)
            return out

    label = np.zeros((8, 16, 16), np.uint8)
    label[2:6, 4:12, 4:12] = 2
    label[3:5, 6:10, 6:10] = 1
    label[3:5, 7:9, 7:9] = 4
    regions = [np.isin(label, v) for v in ((4,), (1, 2, 4), (1, 4))]  # ET, WT, TC
    image = np.stack([regions[1], regions[0], regions[0], regions[2]]).astype(np.float32)

    case = SimpleNamespace(name="c0", normalized=lambda: image, full_label=lambda: label)
    result = elect(Oracle(), [case, case], window=(8, 16, 16), overlap=0)
    assert result["winners"] == {"ET": "t1ce", "WT": "flair", "TC": "t2"}
    assert result["teachers"] == [0, 2, 3] and result["num_cases"] == 2
    n_wt = regions[1].sum()
    assert result["dice"]["flair"]["WT"] == pytest.approx(2 * 2 * n_wt / (2 * n_wt + 1), rel=1e-4)
    assert result["sample"]["slice"] in (2, 3, 4, 5)
    rgb = overlay(image[0, 3], result["sample"]["truth"])
    assert rgb.shape == (16, 16, 3) and rgb.dtype == np.uint8


def test_iteration_sampler_continues_the_stream():
    full = list(train.IterationSampler(0, 4, batch_size=2, rank=1, world_size=2))
    assert full == [2, 3, 6, 7, 10, 11, 14, 15]
    assert list(train.IterationSampler(2, 4, 2, 1, 2)) == full[4:]


def test_missing_schedule_and_subset_draws():
    assert train.missing_probability("off", 0, 0) == 1.0
    assert train.missing_probability("ramp:100", 150, 100) == pytest.approx(0.5)
    assert train.missing_probability("ramp:100", 500, 100) == 1.0
    rng = random.Random(0)
    draws = [train.draw_subset("random", rng, 1.0) for _ in range(300)]
    assert FULL not in draws and {len(d) for d in draws} == {1, 2, 3}
    assert train.draw_subset("random", rng, 0.0) == FULL
    assert train.draw_subset((0, 2), rng, 1.0) == (0, 2)


def test_config_file_sets_defaults_and_cli_overrides(tmp_path):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({"num_steps": 7, "mode": "random", "patch_size": [1, 2, 3]}))
    args = train.parse_args(["--config", str(path), "--mode", "0,1"])
    assert args.num_steps == 7 and args.mode_parsed == (0, 1) and args.random_mirror is True
    assert train.parse_args(["--random_scale", "False"]).random_scale is False
    path.write_text(json.dumps({"num_stepz": 7}))
    with pytest.raises(ValueError, match="num_stepz"):
        train.parse_args(["--config", str(path)])


def test_election_finds_the_generators_designed_teachers(tmp_path):
    """Synthetic data are built so that T1ce shows ET and TC best and FLAIR (then T2) shows WT.

    Budget: small model, 8 training / 2 validation cases of 96x96x64, patch 32x64x64, batch 2,
    --mode random, 400 iterations (elections at 0, 100, 200, 300).
    """
    generate(tmp_path / "data", 12, shape_xyz=(96, 96, 64), seed=0)
    snapshot = tmp_path / "snapshot"
    train.main(["--device", "cpu", "--model_size", "small", "--input_size", "32,64,64",
                "--num_steps", "400", "--val_pred_every", "100", "--num_workers", "0",
                "--train_list", str(tmp_path / "data" / "train.csv"),
                "--val_list", str(tmp_path / "data" / "val.csv"),
                "--cache_dir", str(tmp_path / "cache"), "--snapshot_dir", str(snapshot),
                "--mode", "random"])
    last = json.loads((snapshot / "teachers.json").read_text())[-1]
    assert last["iteration"] == 300
    assert last["winners"]["ET"] == "t1ce" and last["winners"]["TC"] == "t1ce"
    assert last["winners"]["WT"] in ("flair", "t2")
