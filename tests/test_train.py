"""Training end to end on tiny synthetic cases (CPU, small model) and the pieces it is made of.

Data: 5 synthetic cases of 64x64x32 voxels (3 train, 1 val), patch 16x32x32, batch 2; the
election uses overlap 0 (8 windows per case) to keep it cheap.
"""
import hashlib
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import train
from models import LCKD, LCKDConfig
from datasets.brats import CaseError, DataError
from datasets.preprocess import preprocess
from datasets.synthetic import generate
from utils.checkpoint import (CheckpointError, load_checkpoint, make_checkpoint, non_finite,
                              save_checkpoint, set_rng_state)
from utils.cli import StopSignals, UsageError
from utils import election
from utils.election import append_history, elect, winners
from utils.overlay import overlay
from utils.inference import predict_subsets
from utils.lock import LockError, exclusive_lock
from utils.losses import segmentation_loss
from utils.modalities import FULL, MODALITIES, sample_subset, subset_name
from utils.run_folder import refuse_changed_settings

from launch import script_env, torchrun_command
from test_shell import copy_scripts

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


def assert_same_tensors(a, b):
    """Bit-identical nested dicts of tensors (weights, optimizer state)."""
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], dict):
            assert_same_tensors(a[key], b[key])
        else:
            assert torch.equal(a[key], b[key]), key


def test_two_stages_resume_exactly(data, tmp_path):
    # ---- stage 1: all modalities
    s1 = tmp_path / "stage1"
    out = train.main(flags(data, s1, 8, 4, "--mode", "0,1,2,3", "--augment", "False"))
    losses = out["losses"]
    assert len(losses) == 8 and np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3])
    assert sorted(p.name for p in s1.iterdir() if not p.name.startswith("events")) == \
        [".lock", "config.json", "final.pth", "last.pth", "teachers.json"]
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
    # the validation Dice logged is teachers.json's sum over the election's cases, averaged
    logged = [e.value for e in events.Scalars("val/dice/t1ce/ET")]
    np.testing.assert_allclose(logged, [h["dice"]["t1ce"]["ET"] / h["num_cases"] for h in history],
                               rtol=1e-6)

    # ---- stage 2 from stage 1's final: continues the iteration count and the lr schedule
    stage2 = ["--mode", "random", "--reload_path", str(s1 / "final.pth"),
              "--reload_from_checkpoint", "True"]
    straight = tmp_path / "stage2_straight"
    out = train.main(flags(data, straight, 14, 3, *stage2))
    assert len(out["losses"]) == 6
    lr = scalars(straight, "lr")
    # the published poly schedule, lr = 1e-2 * (1 - i / 14) ** 0.9, by hand: 4.6647e-3 at 8
    assert min(lr) == 8 and lr[8] == pytest.approx(4.6647e-3, rel=1e-4)
    assert lr == pytest.approx({i: 1e-2 * (1 - i / 14) ** 0.9 for i in range(8, 14)}, rel=1e-6)
    assert [h["iteration"] for h in json.loads((straight / "teachers.json").read_text())] == [9, 12]

    # ---- the same stage 2 killed after iteration 10; the same command again resumes from the
    # folder's own last.pth (iteration 9), not from --reload_path (stage 1's final, iteration 8)
    killed = tmp_path / "stage2_killed"
    train.main(flags(data, killed, 14, 3, *stage2, "--stop_at", "11"))
    assert not (killed / "final.pth").exists()
    assert load_checkpoint(killed / "last.pth")["iteration"] == 9
    out = train.main(flags(data, killed, 14, 3, *stage2))
    assert len(out["losses"]) == 5  # iterations 9..13

    a, b = load_checkpoint(straight / "final.pth"), load_checkpoint(killed / "final.pth")
    assert_same_tensors(a["model"], b["model"])
    assert_same_tensors(a["optimizer"]["state"], b["optimizer"]["state"])
    assert a["teachers"] == b["teachers"] and a["iteration"] == b["iteration"] == 14
    assert json.loads((straight / "teachers.json").read_text()) == \
        json.loads((killed / "teachers.json").read_text())


def test_the_distillation_term_is_trained_with_its_weight(data, tmp_path, monkeypatch):
    # At --input_size 16,32,32 (the other tests') the deepest map is 1x1x1, which InstanceNorm
    # reduces to its bias: every modality's deep feature is the same and KD is exactly 0. At
    # 32,64,64 it is 2x2x2 and the teacher's features differ from the students'.
    drawn = []
    real_step = train.step
    monkeypatch.setattr(train, "step", lambda *a: drawn.append((a[5], a[6], a[8])) or real_step(*a))
    snapshot = tmp_path / "kd"
    train.main(flags(data, snapshot, 6, 100, "--val_list", "", "--mode", "random", "--teachers",
                     "t2", "--kd_weight", "0.5", "--input_size", "32,64,64", "--augment", "False"))
    assert all(teachers == (3,) and weight == 0.5 for _, teachers, weight in drawn)
    total, dice, bce, kd = (scalars(snapshot, f"loss/{part}") for part in ("total", "dice", "bce", "kd"))
    distils = [i for i, (subset, _, _) in enumerate(drawn) if 3 in subset and len(subset) > 1]
    assert distils and sorted(kd) == list(range(6))
    for i in range(6):
        assert (kd[i] > 0) == (i in distils)
        assert total[i] == pytest.approx(dice[i] + bce[i] + 0.5 * kd[i], rel=1e-5)


def test_the_bar_written_to_a_log_is_redrawn_every_10_s(data, tmp_path, capsys, monkeypatch):
    # run.sh tees the output into logs/: a bar redrawn 10 times a second would fill it
    real_step = train.step
    monkeypatch.setattr(train, "step", lambda *a: time.sleep(0.05) or real_step(*a))
    started = time.perf_counter()
    train.main(flags(data, tmp_path / "run", 40, 100, "--val_list", ""))
    seconds = time.perf_counter() - started
    redraws = capsys.readouterr().err.count("/40 [")
    assert seconds > 2 and 1 <= redraws <= 2 + seconds / 10  # the first, the last, every 10 s


def test_non_finite_loss_stops_and_keeps_last_good_state(data, tmp_path, monkeypatch):
    calls = []

    def poisoned(logits, target, kd, kd_weight):
        calls.append(1)
        total, parts = real(logits, target, kd, kd_weight)
        return (total * float("nan"), parts) if len(calls) == 3 else (total, parts)

    real = train.segmentation_loss
    monkeypatch.setattr(train, "segmentation_loss", poisoned)
    snapshot = tmp_path / "nan"
    # Checked every 2 iterations: the check after iteration 3 still names iteration 2.
    with pytest.raises(FloatingPointError, match="non-finite loss at iteration 2 .*holds the "
                                                 "state before iteration 2") as error:
        train.main(flags(data, snapshot, 6, 100, "--val_list", "", "--mode", "random",
                         "--log_every", "2"))
    saved = load_checkpoint(snapshot / "last.pth")
    assert saved["iteration"] == 2
    # The saved subset stream has not drawn iteration 2 yet: resuming redraws the same subset.
    replay = random.Random()
    set_rng_state(saved["rng"], replay)
    assert f"modalities {subset_name(sample_subset(replay))})" in str(error.value)
    assert all(torch.isfinite(v).all() for v in saved["model"].values() if v.is_floating_point())


def test_torchrun_two_cpu_processes(data, tmp_path):
    snapshot = tmp_path / "ddp"
    env = script_env()
    cmd = [*torchrun_command(), str(REPO / "train.py"),
           *flags(data, snapshot, 3, 2, "--mode", "random")]
    run = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    # one set of outputs (rank 0 only); the ranks' replicas were checked equal at the end
    names = sorted(p.name for p in snapshot.iterdir() if not p.name.startswith("events"))
    assert names == [".lock", "config.json", "final.pth", "last.pth", "teachers.json"]
    assert len(list(snapshot.glob("events.out.tfevents.*"))) == 1
    assert json.loads((snapshot / "config.json").read_text())["world_size"] == 2
    assert run.stdout.count("teacher election at iteration 0") == 1  # rank 0 prints alone
    assert [h["iteration"] for h in json.loads((snapshot / "teachers.json").read_text())] == [0, 2]
    assert load_checkpoint(snapshot / "final.pth")["iteration"] == 3


# ---- interruptions and re-runs (README, "Interruptions and re-runs")


def test_rerun_resumes_and_never_restarts_a_run(data, tmp_path, capsys):
    snapshot = tmp_path / "run"
    command = flags(data, snapshot, 12, 3, "--log_every", "10")
    train.main([*command, "--stop_at", "8"])
    assert load_checkpoint(snapshot / "last.pth")["iteration"] == 6
    history = [h["iteration"] for h in json.loads((snapshot / "teachers.json").read_text())]
    assert history == [0, 3, 6]

    # --reload_path alone means resume; stopping before the resumed iteration is refused
    with pytest.raises(UsageError, match="--stop_at 4 is not after iteration 6"):
        train.main([*command, "--reload_path", str(snapshot / "last.pth"), "--stop_at", "4"])
    assert load_checkpoint(snapshot / "last.pth")["iteration"] == 6

    # temporaries of writes killed mid-way are deleted under the lock
    stale = [snapshot / ".last.pth.k1ll3d.tmp.pth", snapshot / ".final.pth.x.tmp.pth"]
    for path in stale:
        path.write_bytes(b"partial")
    # the same command again continues at 6: teachers.json keeps its history
    # (a second later: TensorBoard reads event files in name order, whose first field is the
    # second they were opened in; in one process, within one second, a writer counter decides,
    # and '…10' sorts before '…9', which would apply the purge before the older file is read)
    time.sleep(1.1)
    out = train.main([*command, "--stop_at", "11"])
    assert len(out["losses"]) == 5 and not any(p.exists() for p in stale)
    assert "deleted 2 temporary file(s)" in capsys.readouterr().out
    assert load_checkpoint(snapshot / "last.pth")["iteration"] == 9
    history = [h["iteration"] for h in json.loads((snapshot / "teachers.json").read_text())]
    assert history == [0, 3, 6, 9]
    # TensorBoard: the interrupted run's logs after iteration 6 are hidden, not mixed in
    assert sorted(scalars(snapshot, "val/dice/t1ce/ET")) == [0, 3, 6, 9]
    assert sorted(scalars(snapshot, "loss/total")) == [2, 5, 8, 9, 10]  # 7 came from the first run
    assert train.main(command)["iteration"] == 12
    final = (snapshot / "final.pth").read_bytes()

    # a finished run is not repeated; --overwrite deletes it and starts over
    assert train.main(command) is None
    assert "this run is finished" in capsys.readouterr().out
    # ... unless this command's settings differ (run.sh with a larger STAGE1_STEPS): refused
    with pytest.raises(UsageError, match=r"holds a run with --num_steps 12 \(this command: 20\)"):
        train.main([*command, "--num_steps", "20"])
    assert train.main([*command, "--overlap", "0.5"]) is None  # the election's only: accepted
    assert (snapshot / "final.pth").read_bytes() == final
    (snapshot / "final.pth").write_bytes(final[:len(final) // 2])  # damaged since
    with pytest.raises(CheckpointError, match=r"damaged file\?\); remove it to resume from "
                                              r"last.pth, or --overwrite True to start over$"):
        train.main(command)
    train.main(flags(data, snapshot, 2, 3, "--overwrite", "True"))
    assert not (snapshot / "last.pth").exists()
    assert load_checkpoint(snapshot / "final.pth")["iteration"] == 2
    assert [h["iteration"] for h in json.loads((snapshot / "teachers.json").read_text())] == [0]
    assert len(list(snapshot.glob("events.out.tfevents.*"))) == 1


def test_a_rerun_with_start_iters_continues_where_it_stopped(data, tmp_path, capsys):
    # --start_iters re-bases a run started afresh or from --reload_path; the same command run
    # again resumes the folder's own last.pth at its iteration (it rewound to 4 before).
    command = flags(data, tmp_path / "run", 10, 3, "--val_list", "", "--start_iters", "4")
    train.main([*command, "--stop_at", "8"])
    assert load_checkpoint(tmp_path / "run" / "last.pth")["iteration"] == 6
    capsys.readouterr()
    assert train.main(command)["iteration"] == 10
    assert "iteration 6 (mode 0,1,2,3), continuing at 6" in capsys.readouterr().out
    train.main(flags(data, tmp_path / "whole", 10, 3, "--val_list", "", "--start_iters", "4"))
    assert_same_tensors(load_checkpoint(tmp_path / "run" / "final.pth")["model"],
                        load_checkpoint(tmp_path / "whole" / "final.pth")["model"])


def test_a_run_is_resumed_with_its_own_settings_or_refused(data, tmp_path):
    # A re-run that forgot an override (run.sh's PATCH, MODEL_SIZE, STAGE1_STEPS...) would
    # continue the run as neither command describes it.
    snapshot = tmp_path / "run"
    command = flags(data, snapshot, 10, 3, "--val_list", "")
    train.main([*command, "--stop_at", "5"])
    kept = {p.name: p.read_bytes() for p in snapshot.iterdir() if p.is_file()}
    for changed, message in (
            (["--model_size", "full"], re.escape("holds a run of another network (blocks (1, 1, 1, "
                                                 "1), this command (3, 4, 6, 3))")),
            (["--input_size", "32,64,64"], r"holds a run with --input_size \[16, 32, 32\] \(this "
                                           r"command: \[32, 64, 64\]\)"),
            (["--num_steps", "20"], r"--num_steps 10 \(this command: 20\)"),
            (["--learning_rate", "0.1"], r"--learning_rate 0.01 \(this command: 0.1\)"),
            (["--mode", "random"], r"--mode 0,1,2,3 \(this command: random\)")):
        with pytest.raises(UsageError, match=message + ".*--overwrite True to start over"):
            train.main([*command, *changed])
        assert {p.name: p.read_bytes() for p in snapshot.iterdir() if p.is_file()} == kept
    # other cases: the training list in another order (the sampler draws by position), a
    # validation list where the run had none (its elections would start mid-run)
    names = lambda *cases: hashlib.sha256("\n".join(cases).encode()).hexdigest()[:12]
    listed = tmp_path / "lists"
    listed.mkdir()
    (listed / "reordered.csv").write_text("Synth_0002\nSynth_0000\nSynth_0001\n")
    run_cases = f"3 cases, names sha256 {names('Synth_0000', 'Synth_0001', 'Synth_0002')}"
    for changed, message in (
            (["--train_list", str(listed / "reordered.csv")],
             f"--train_list of {run_cases} (this command: 3 cases, names sha256 "
             f"{names('Synth_0002', 'Synth_0000', 'Synth_0001')})"),
            (["--val_list", str(data / "data" / "val.csv")],
             f"--val_list of no cases (this command: 1 case, names sha256 {names('Synth_0003')})")):
        with pytest.raises(UsageError, match=re.escape(f"holds a run with {message}; ")):
            train.main([*command, "--data_root", str(data / "data"), *changed])
        assert {p.name: p.read_bytes() for p in snapshot.iterdir() if p.is_file()} == kept
    assert json.loads((snapshot / "config.json").read_text())["train_cases"] == run_cases
    # what may change: the device's speed options, workers, logging, the stop point, where the
    # same cases are listed and read from
    (listed / "train.csv").write_text("Synth_0000\nSynth_0001\nSynth_0002\n")
    assert train.main([*command, "--log_every", "2", "--checkpoint_encoder", "True",
                       "--channels_last", "on", "--train_list", str(listed / "train.csv"),
                       "--data_root", str(data / "data"), "--stop_at", "7"])["iteration"] == 7
    # (--mode and --teachers as their other spellings are the same run)
    assert train.main([*command, "--log_every", "2", "--mode", "flair, t1,t1ce,t2",
                       "--teachers", "flair"])["iteration"] == 10
    # the run's config.json fed back to --config is the same run (here: finished)
    assert train.main(["--config", str(snapshot / "config.json"), "--stop_at", "0"]) is None

    # --reload_path of another network (a stage 1 of another size): one line
    other = tmp_path / "other.pth"
    torch.save({"model": LCKD(LCKDConfig()).state_dict()}, other)
    with pytest.raises(UsageError, match=rf"{other} holds another network \(.*\); it holds a network "
                                         r"of --model_size full --norm_cfg IN: pass those flags "
                                         r"instead of --model_size small --norm_cfg IN$"):
        train.main(flags(data, tmp_path / "two", 10, 3, "--val_list", "", "--reload_path", str(other)))


def test_a_network_field_this_version_lacks_is_named():
    # the run's config has a field the current LCKDConfig lacks (another version's checkpoint)
    saved = {"model_config": {"blocks": [1, 1], "stem": 32}}
    with pytest.raises(UsageError, match=r"^run holds a run of another network \(stem 32, this "
                                         r"command None\)"):
        refuse_changed_settings(saved, {"model_config": {"blocks": [1, 1]}}, "run")


def test_a_mode_recorded_before_its_spelling_was_refused_is_another_setting():
    # '0,0' ran as FLAIR alone before repeats were refused: named, not a traceback
    saved = {"model_config": {}, "mode": "0,0"}
    with pytest.raises(UsageError, match=r"^run holds a run with --mode 0,0 \(this command: 0\)"):
        refuse_changed_settings(saved, {"model_config": {}, "mode": "0"}, "run")


def test_a_stage_2_rerun_resumes_its_own_checkpoint_without_the_reload_path(data, tmp_path):
    # Stage 1's final.pth moved or deleted after stage 2 started: stage 2 no longer needs it.
    stage1 = tmp_path / "stage1.pth"
    train.main(flags(data, tmp_path / "s1", 4, 3, "--val_list", ""))
    (tmp_path / "s1" / "final.pth").rename(stage1)
    command = flags(data, tmp_path / "s2", 10, 3, "--val_list", "", "--mode", "random",
                    "--reload_path", str(stage1))
    train.main([*command, "--stop_at", "8"])
    stage1.unlink()
    assert train.main(command)["iteration"] == 10
    with pytest.raises(UsageError, match="--reload_path .*stage1.pth does not exist"):
        train.main(flags(data, tmp_path / "s3", 10, 3, "--val_list", "", "--reload_path", str(stage1)))


def test_a_run_stopped_before_its_first_checkpoint_starts_again(data, tmp_path, capsys):
    # An early crash or kill -9, before the first last.pth: nothing to resume and nothing to
    # lose, so the same command (run.sh's re-run) starts the run again instead of refusing.
    snapshot = tmp_path / "run"
    train.main(flags(data, snapshot, 10, 5, "--stop_at", "3"))  # killed before its first last.pth
    (old_events,) = snapshot.glob("events.out.tfevents.*")
    assert not (snapshot / "last.pth").exists() and (snapshot / "config.json").exists()
    capsys.readouterr()
    train.main(flags(data, snapshot, 10, 5))
    assert (f"{snapshot} holds a run stopped before its first last.pth; starting it again (deleted "
            f"config.json, teachers.json, {old_events.name})") in capsys.readouterr().out
    train.main(flags(data, tmp_path / "fresh", 10, 5))
    assert_same_tensors(load_checkpoint(snapshot / "final.pth")["model"],
                        load_checkpoint(tmp_path / "fresh" / "final.pth")["model"])
    assert not old_events.exists()


def test_a_damaged_last_pth_is_named_with_what_to_do(data, tmp_path):
    snapshot = tmp_path / "run"
    train.main(flags(data, snapshot, 10, 3, "--val_list", "", "--stop_at", "5"))
    last = snapshot / "last.pth"
    last.write_bytes(last.read_bytes()[:len(last.read_bytes()) // 2])  # truncated since
    with pytest.raises(CheckpointError, match=rf"^cannot read checkpoint {last}: .*damaged file\?\); "
                                              r"--overwrite True starts the run over$"):
        train.main(flags(data, snapshot, 10, 3, "--val_list", ""))


@pytest.mark.parametrize("foreign", ["config.json", "events.out.tfevents.1.host"])
def test_a_folder_with_files_of_no_run_is_refused_not_emptied(data, tmp_path, foreign):
    snapshot = tmp_path / "run"
    snapshot.mkdir()
    (snapshot / foreign).write_text('{"my": "settings"}')
    with pytest.raises(UsageError, match=rf"^{snapshot} holds {foreign} but no train.py run .*"
                                         r"--overwrite True to delete them$"):
        train.main(flags(data, snapshot, 10, 5))
    assert (snapshot / foreign).read_text() == '{"my": "settings"}'


def test_huge_learning_rate_after_resume_saves_the_last_good_state(data, tmp_path):
    snapshot = tmp_path / "run"
    train.main(flags(data, snapshot, 6, 3, "--stop_at", "4", "--val_list", ""))
    good = load_checkpoint(snapshot / "last.pth")
    assert good["iteration"] == 3
    named = []
    # Continued in a folder of its own, with another learning rate (the folder's own run
    # resumes with its own settings only).
    diverged = tmp_path / "diverged"
    for log_every in ("10", "1"):  # checked once, at the end of the run / every iteration
        with pytest.raises(FloatingPointError, match=r"non-finite loss at iteration (\d+)") as error:
            train.main(flags(data, diverged, 6, 3, "--val_list", "", "--learning_rate", "1e38",
                             "--log_every", log_every, "--reload_path", str(snapshot / "last.pth")))
        named.append(re.search(r"non-finite loss at iteration (\d+)", str(error.value))[1])
        saved = load_checkpoint(diverged / "last.pth")
        assert not non_finite(saved["model"])
        if log_every == "10":  # nothing was checked since the resume: the resumed state
            assert "holds the state before iteration 3," in str(error.value)
            assert saved["iteration"] == 3
            assert_same_tensors(saved["model"], good["model"])
            assert_same_tensors(saved["optimizer"]["state"], good["optimizer"]["state"])
    assert named[0] == named[1]  # the deferred check names the same first iteration


def test_a_locked_snapshot_folder_is_refused(data, tmp_path):
    snapshot = tmp_path / "run"
    code = ("import sys, time; from utils.lock import exclusive_lock\n"
            "with exclusive_lock(sys.argv[1]):\n    print('held', flush=True); time.sleep(60)\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(snapshot)], stdout=subprocess.PIPE,
                              text=True, cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LockError, match=f"snapshot folder .* is in use by pid {holder.pid}"):
            train.main(flags(data, snapshot, 4, 2))
    finally:
        holder.kill()
        holder.wait()
    assert [p.name for p in snapshot.iterdir()] == [".lock"]


def test_sigterm_saves_and_the_rerun_ends_bit_identical(data, tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the subprocesses below: the thread count changes the sums
    try:
        train.main(flags(data, tmp_path / "straight", 16, 8, "--mode", "random"))
    finally:
        torch.set_num_threads(threads)

    snapshot = tmp_path / "interrupted"
    command = [sys.executable, str(REPO / "train.py"),
               *flags(data, snapshot, 16, 8, "--mode", "random", "--num_workers", "1")]
    env = script_env()
    run = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, start_new_session=True)
    while not (snapshot / "teachers.json").exists() and run.poll() is None:
        time.sleep(0.02)  # the election at iteration 0 is done: training is under way
    os.killpg(run.pid, signal.SIGTERM)  # the whole process group, DataLoader worker included
    stdout, stderr = run.communicate(timeout=120)
    assert run.returncode == 143, stderr[-3000:]
    assert re.search(r"stopped by SIGTERM after iteration \d+: .*last.pth holds the state; run "
                     r"the same command again to resume", stderr)
    assert 1 <= load_checkpoint(snapshot / "last.pth")["iteration"] < 16

    rerun = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    a = load_checkpoint(tmp_path / "straight" / "final.pth")
    b = load_checkpoint(snapshot / "final.pth")
    assert_same_tensors(a["model"], b["model"])
    assert_same_tensors(a["optimizer"]["state"], b["optimizer"]["state"])
    assert a["teachers"] == b["teachers"] and a["iteration"] == b["iteration"] == 16


def test_sigterm_during_an_election_abandons_it_saves_and_the_rerun_elects_again(
        data, tmp_path, monkeypatch, capsys):
    val = tmp_path / "val.csv"  # two validation cases: the stop is checked after the first
    val.write_text("".join(f"{data / 'data' / name}\n" for name in ("Synth_0003", "Synth_0004")))
    command = lambda name: flags(data, tmp_path / name, 8, 4, "--val_list", str(val), "--mode", "random")
    train.main(command("straight"))

    predicted = []

    def predict_then_signal(*args, **kwargs):
        predicted.append(len(predicted))
        if len(predicted) == 3:  # the first case of the election at iteration 4
            os.kill(os.getpid(), signal.SIGTERM)
        return predict_subsets(*args, **kwargs)

    monkeypatch.setattr(election, "predict_subsets", predict_then_signal)
    with pytest.raises(SystemExit) as stopped:
        train.main(command("stopped"))
    assert stopped.value.code == 143 and len(predicted) == 3  # the second case was never predicted
    assert re.search(r"stopped by SIGTERM during the teacher election at iteration 4: .*last.pth "
                     r"holds the state; run the same command again to resume", capsys.readouterr().err)
    saved = load_checkpoint(tmp_path / "stopped" / "last.pth")
    assert (saved["iteration"], saved["elected_at"]) == (4, 0)
    history = json.loads((tmp_path / "stopped" / "teachers.json").read_text())
    assert [h["iteration"] for h in history] == [0]  # the abandoned election left no entry

    monkeypatch.undo()
    # a re-run that elects at 4 and logs it, then is killed before its next last.pth
    time.sleep(1.1)  # event files are read in name order, whose first field is the second
    train.main([*command("stopped"), "--stop_at", "5"])
    assert load_checkpoint(tmp_path / "stopped" / "last.pth")["elected_at"] == 0
    time.sleep(1.1)
    train.main(command("stopped"))  # elects again at 4, then trains on
    events = EventAccumulator(str(tmp_path / "stopped"), size_guidance={"scalars": 0}).Reload()
    assert [e.step for e in events.Scalars("val/dice/t1ce/ET")] == [0, 4]  # 4 logged twice before
    a = load_checkpoint(tmp_path / "straight" / "final.pth")
    b = load_checkpoint(tmp_path / "stopped" / "final.pth")
    assert_same_tensors(a["model"], b["model"])
    assert a["teachers"] == b["teachers"] and a["elected_at"] == b["elected_at"] == 4
    assert ((tmp_path / "stopped" / "teachers.json").read_text()
            == (tmp_path / "straight" / "teachers.json").read_text())


def test_sigterm_to_rank_0_during_an_election_under_torchrun_stops_both_ranks(data, tmp_path):
    """Three validation cases over two ranks (rank 0 predicts two, rank 1 one): both check for
    a stop after each round and abandon the election together, rank 0 saves."""
    val = tmp_path / "val.csv"
    val.write_text("".join(f"{data / 'data' / f'Synth_000{k}'}\n" for k in (2, 3, 4)))
    wrapper = tmp_path / "signal_in_election.py"
    wrapper.write_text(
        "import os, signal\nimport train\nfrom utils import election\nfrom utils.cli import run_cli\n"
        "predict, calls = election.predict_subsets, []\n"
        "def predict_then_signal(*args, **kwargs):\n"
        "    calls.append(1)\n"
        "    if os.environ['RANK'] == '0' and len(calls) == 3:  # the election at iteration 2\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "    return predict(*args, **kwargs)\n"
        "election.predict_subsets = predict_then_signal\n"
        "run_cli(train.main, train.TRAIN_ERRORS)\n")
    env = script_env()
    cmd = [*torchrun_command(120), str(wrapper),
           *flags(data, tmp_path / "ddp", 6, 2, "--val_list", str(val))]
    run = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=150)
    output = run.stdout + run.stderr
    assert run.returncode != 124, output[-3000:]  # not hung in mismatched collectives
    assert len(re.findall(r"stopped by SIGTERM during the teacher election at iteration 2: ", output)) == 1
    assert "error:" not in output and "Connection" not in output, output[-3000:]
    saved = load_checkpoint(tmp_path / "ddp" / "last.pth")
    assert (saved["iteration"], saved["elected_at"]) == (2, 0)


def test_under_torchrun_rank_0_refusing_or_failing_to_write_stops_rank_1_without_a_word(data, tmp_path):
    """What rank 0 does alone (the lock, preprocessing, writing checkpoints) stops rank 1 too when
    it fails: one line, rank 0's, instead of rank 1's gloo traceback or a timeout message."""
    wrapper = tmp_path / "full_disk.py"
    wrapper.write_text(
        "import errno, os, sys\nimport train\nfrom utils.cli import run_cli\nfrom utils.io import DiskFullError\n"
        "save = train.save_checkpoint\n"
        "def full(state, path):\n"
        "    if os.environ.get('FULL') and path.name == 'last.pth':\n"
        "        raise DiskFullError(errno.ENOSPC, f'no space left on device while writing {path}')\n"
        "    save(state, path)\n"
        "train.save_checkpoint = full\n"
        "run_cli(train.main, train.TRAIN_ERRORS)\n")
    env = script_env()

    def torchrun(snapshot, *extra, **more_env):
        cmd = [*torchrun_command(120), str(wrapper),
               *flags(data, snapshot, 4, 2, "--val_list", "", *extra)]
        run = subprocess.run(cmd, cwd=tmp_path, env={**env, **more_env}, capture_output=True,
                             text=True, timeout=150)
        output = run.stdout + run.stderr
        # torchrun ends with its own ChildFailedError traceback; the ranks must not add theirs
        assert run.returncode not in (0, 124) and "[rank" not in output and "Connection" not in output, \
            output[-3000:]
        return [line for line in output.splitlines() if line.startswith("error:")]

    snapshot = tmp_path / "locked"
    with exclusive_lock(snapshot, "snapshot folder"):
        errors = torchrun(snapshot)
    assert len(errors) == 1 and errors[0].startswith(
        f"error: snapshot folder {snapshot} is in use by pid {os.getpid()} on host {socket.gethostname()}")
    assert torchrun(tmp_path / "full", FULL="1") == [
        f"error: no space left on device while writing {tmp_path / 'full' / 'last.pth'}"]
    bad = tmp_path / "bad"
    shutil.copytree(data / "data", bad)
    (bad / "Synth_0001" / "Synth_0001_t1.nii.gz").write_bytes(b"not a nifti")
    errors = torchrun(tmp_path / "bad_data", "--train_list", str(bad / "train.csv"),
                      "--cache_dir", str(tmp_path / "cache"))
    assert len(errors) == 1 and "Synth_0001_t1.nii.gz" in errors[0], errors


def test_under_torchrun_a_killed_rank_is_one_line_on_the_other(data, tmp_path):
    # the OOM killer or kill -9 ends rank 1 without a word: rank 0's next collective (DDP's
    # gradient all-reduce) fails with gloo's "Connection closed by peer"
    wrapper = tmp_path / "kill_rank1.py"
    wrapper.write_text(
        "import os, signal\nimport train\nfrom utils.cli import run_cli\n"
        "step, steps = train.step, []\n"
        "def killed(*args, **kwargs):\n"
        "    steps.append(1)\n"
        "    if os.environ['RANK'] == '1' and len(steps) == 3:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return step(*args, **kwargs)\n"
        "train.step = killed\n"
        "run_cli(train.main, train.TRAIN_ERRORS)\n")
    cmd = [*torchrun_command(120), str(wrapper),
           *flags(data, tmp_path / "ddp", 6, 2, "--val_list", "")]
    run = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=150,
                         env=script_env())
    output = run.stdout + run.stderr
    assert run.returncode not in (0, 124) and "[rank0]" not in output, output[-3000:]
    assert [line for line in output.splitlines() if line.startswith("error:")] == [
        "error: rank 0: another process of this run is gone (killed? torchrun's summary below "
        "gives its exit code) during the training loop; the same command resumes the run from "
        "its last checkpoint"], output[-3000:]


def test_under_torchrun_a_refused_resume_is_one_line(data, tmp_path):
    snapshot = tmp_path / "one_process"
    train.main(flags(data, snapshot, 4, 2, "--val_list", "", "--stop_at", "3"))  # last.pth at 2
    env = script_env()
    cmd = [*torchrun_command(120), str(REPO / "train.py"),
           *flags(data, snapshot, 4, 2, "--val_list", "")]
    run = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=150)
    errors = [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "holds a run with processes 1 (this command: 2)" in errors[0], \
        (run.stdout + run.stderr)[-3000:]


def test_sigterm_under_torchrun_stops_every_rank_together(data, tmp_path):
    """torchrun forwards SIGTERM to both ranks; they agree at the next check point (every 2
    iterations here), rank 0 saves, both leave together."""
    snapshot = tmp_path / "ddp"
    env = script_env()
    cmd = [*torchrun_command(120), str(REPO / "train.py"),
           *flags(data, snapshot, 200, 100, "--val_list", "", "--log_every", "2",
                  "--save_every_min", "1e-9")]  # last.pth at every check point: the loop runs
    run = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    while not (snapshot / "last.pth").exists() and run.poll() is None:
        time.sleep(0.02)
    run.send_signal(signal.SIGTERM)  # timeout passes it on to torchrun, torchrun to the ranks
    output = run.communicate(timeout=120)[0]
    stopped = re.findall(r"stopped by SIGTERM after iteration (\d+)", output)
    assert len(stopped) == 1, output[-3000:]  # printed by rank 0
    assert "error:" not in output  # no rank gave up (a barrier timeout, a broken collective)
    assert load_checkpoint(snapshot / "last.pth")["iteration"] == int(stopped[0]) + 1 < 200


def test_sigterm_while_final_pth_is_written_finishes_and_still_stops(data, tmp_path, monkeypatch,
                                                                    capsys):
    # it said "saving last.pth and stopping", then exited 0: `stage1 && stage2` went on
    def signal_then_save(checkpoint, path):
        if path.name == "final.pth":
            os.kill(os.getpid(), signal.SIGTERM)
        save_checkpoint(checkpoint, path)

    monkeypatch.setattr(train, "save_checkpoint", signal_then_save)
    snapshot = tmp_path / "run"
    with pytest.raises(SystemExit) as stopped:
        train.main(flags(data, snapshot, 4, 2))
    assert stopped.value.code == 143
    assert capsys.readouterr().err.endswith(f"stopped by SIGTERM as the run finished: "
                                            f"{snapshot / 'final.pth'} is written, nothing is "
                                            "left to resume\n")
    assert load_checkpoint(snapshot / "final.pth")["iteration"] == 4
    monkeypatch.undo()
    train.main(flags(data, snapshot, 4, 2))  # the same command: finished, nothing to do


def test_stop_signals_ask_once():
    previous = signal.getsignal(signal.SIGINT)
    with StopSignals(log=lambda message: None) as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)  # forwarded again (torchrun, schedulers): ignored
        assert stop.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGINT) == previous


def test_a_run_started_ignoring_sigint_goes_on_ignoring_it():
    # `python train.py … &` in a script starts with SIGINT ignored: the terminal's Ctrl-C is
    # for the foreground command. The loop took SIGINT all the same and stopped the run.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with StopSignals(log=lambda message: None) as stop:
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGINT)
            assert stop.signum is None
            os.kill(os.getpid(), signal.SIGTERM)  # a scheduler's stop still counts
            assert stop.signum == signal.SIGTERM
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


# In a process of its own: SIGINT twice at once (a sender signalling every process of the job,
# run.sh passing it on) is one request; a Ctrl-C SAME_REQUEST_S later kills the process.
SECOND_CTRL_C = """
import os, signal, sys, time
from utils.cli import SAME_REQUEST_S, StopSignals
signal.signal(signal.SIGINT, signal.default_int_handler)  # a background job starts with it ignored
with StopSignals(log=print) as stop:
    for _ in range(2):
        os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.1)
    print("still running after", signal.Signals(stop.signum).name, flush=True)
    time.sleep(SAME_REQUEST_S)
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(5)
print("not stopped")
"""


def test_a_second_ctrl_c_quits_at_once_unless_it_is_the_same_request():
    run = subprocess.run([sys.executable, "-c", SECOND_CTRL_C], cwd=REPO, capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == -signal.SIGINT, run.stdout + run.stderr
    assert run.stdout.splitlines() == [
        "SIGINT: saving last.pth and stopping (Ctrl-C again, a second or more later, quits at "
        "once, without saving)",
        "still running after SIGINT"]


def test_time_based_checkpoint(data, tmp_path):
    snapshot = tmp_path / "run"
    train.main(flags(data, snapshot, 10, 100, "--val_list", "", "--log_every", "2",
                     "--save_every_min", "1e-9", "--stop_at", "5"))
    assert load_checkpoint(snapshot / "last.pth")["iteration"] == 4  # the last check point


def test_disk_full_while_writing_tensorboard_events_is_one_line(data, tmp_path):
    # The events file's writes fail with ENOSPC from the 5th on, as on a disk that fills up:
    # TensorBoard's writer thread printed its traceback, then train.py its own.
    code = ("import errno, runpy, sys\n"
            "from tensorboard.compat.tensorflow_stub.io import gfile\n"
            "append, calls = gfile.LocalFileSystem.append, []\n"
            "def full(*args, **kwargs):\n"
            "    calls.append(1)\n"
            "    if len(calls) >= 5:\n"
            "        raise OSError(errno.ENOSPC, 'No space left on device')\n"
            "    return append(*args, **kwargs)\n"
            "gfile.LocalFileSystem.append = full\n"
            "sys.argv = sys.argv[1:]\n"
            "runpy.run_path(sys.argv[0], run_name='__main__')\n")
    snapshot = tmp_path / "run"
    run = subprocess.run([sys.executable, "-c", code, str(REPO / "train.py"),
                          *flags(data, snapshot, 12, 100, "--val_list", "", "--log_every", "1")],
                         cwd=tmp_path, env=script_env(),
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 1, run.stderr
    assert run.stderr.splitlines()[-1] == (f"error: no space left on device while writing in "
                                           f"{snapshot}; free some space and run again")
    assert "Traceback" not in run.stderr


def test_disk_full_while_checkpointing_is_one_line(data, tmp_path):
    # train.py as a script, every checkpoint written into /dev/full, whose writes fail with
    # ENOSPC as on a full disk (torch's own zip writer reported it without an errno)
    code = ("import runpy, sys, utils.io\n"
            "utils.io.open = lambda path, mode, *a: open('/dev/full' if 'w' in mode else path, mode, *a)\n"
            "sys.argv = sys.argv[1:]\n"
            "runpy.run_path(sys.argv[0], run_name='__main__')\n")
    run = subprocess.run([sys.executable, "-c", code, str(REPO / "train.py"),
                          *flags(data, tmp_path / "run", 4, 2, "--val_list", "")],
                         cwd=tmp_path, env=script_env(),
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 1
    assert re.fullmatch(r"error: no space left on device while writing \S+last.pth; nothing was "
                        r"written; free some space and run again", run.stderr.splitlines()[-1])
    assert "Traceback" not in run.stderr


EMPTY = "empty.csv"


@pytest.mark.parametrize("bad, message", [
    (["--val_pred_every", "0"], "--val_pred_every must be >= 1"),
    (["--log_every", "0"], "--log_every must be >= 1"),
    (["--missing_schedule", "ramp:0"], "'off' or 'ramp:N' with N >= 1"),
    (["--num_classes", "4"], "--num_classes must be 3"),
    (["--power", "-1"], "--power must be finite and >= 0"),
    (["--momentum", "1"], r"--momentum must be in \[0, 1\)"),
    (["--learning_rate", "nan"], "--learning_rate must be a finite number > 0, got nan"),
    (["--learning_rate", "0"], "--learning_rate must be a finite number > 0"),
    (["--num_steps", "0"], "--num_steps 0 leaves nothing to train"),
    (["--stop_at", "7"], r"--stop_at must be 0 \(off\) or in \(0, --num_steps 6\]"),
    (["--batch_size", "0"], "--batch_size must be >= 1"),
    (["--random_seed", "-1"], r"--random_seed must be in \[0, 2\*\*32\), got -1"),
    (["--random_seed", str(2**32)], r"--random_seed must be in \[0, 2\*\*32\)"),
    (["--num_workers", "-2"], "--num_workers must be >= 0, or -1"),
    (["--input_size", "16,32"], "--input_size: expected D,H,W such as 80,160,160, got '16,32'"),
    (["--input_size", "8,32,32"], "--input_size: 8,32,32: D must be a multiple of 16 and H, W of 32"),
    (["--input_size", "16,48,32"], "--input_size: 16,48,32: D must be a multiple of 16 and H, W of 32"),
    (["--save_every_min", "-1"], "--save_every_min must be >= 0"),
    (["--dist_timeout_min", "0"], "--dist_timeout_min must be > 0"),
    (["--mode", "all"], "--mode all is for evaluation"),
    (["--reload_path", "nope.pth"], "--reload_path nope.pth does not exist"),
    (["--amp", "bf16"], "--amp bf16 trains on a GPU only: .*use --amp off on a CPU"),
    (["--train_list", EMPTY], "--train_list .*empty.csv lists no cases"),
    (["--train_list", ""], "--train_list '' names no list: give the list of training cases"),
    (["--val_list", EMPTY], "--val_list .*empty.csv lists no cases"),
    (["--snapshot_dir", ""], "--snapshot_dir '' names no folder: give the run's folder"),
])
def test_bad_flags_are_refused_before_anything_is_written(data, tmp_path, bad, message):
    (tmp_path / EMPTY).write_text("# no cases\n")
    bad = [str(tmp_path / EMPTY) if b == EMPTY else b for b in bad]
    snapshot = tmp_path / "run"
    with pytest.raises(UsageError, match=message):
        train.main(flags(data, snapshot, 6, 3, *bad))
    assert not snapshot.exists()


@pytest.mark.parametrize("listed", ["--train_list", "--val_list"])
def test_a_case_without_its_seg_file_is_named_before_training(data, tmp_path, listed):
    # Named while preprocessing, before the run writes anything: once the file is back, the
    # same command trains (a run stopped later, without a last.pth, would be refused).
    cases = tmp_path / "cases"
    shutil.copytree(data / "data", cases)
    seg = cases / "Synth_0001" / "Synth_0001_seg.nii.gz"
    seg.rename(tmp_path / seg.name)
    (tmp_path / "one.csv").write_text("Synth_0001\n")
    snapshot = tmp_path / "run"
    argv = flags(data, snapshot, 1, 10, "--data_root", str(cases), "--cache_dir",
                 str(tmp_path / "cache"), listed, str(tmp_path / "one.csv"))
    with pytest.raises(CaseError) as error:
        train.main(argv)
    assert str(error.value) == (f"case Synth_0001: {seg}: missing label (seg) file (training and "
                                "the teacher election of --val_list need labels)")
    assert not (snapshot / "config.json").exists()
    (tmp_path / seg.name).rename(seg)
    train.main(argv)
    assert (snapshot / "final.pth").exists()


def test_bf16_training_is_refused_on_a_cpu_only():
    """On a CPU, torch's bf16 conv3d computes wrong weight gradients (3x3x3 kernels on maps of
    depth 2: ~100 % error or inf, where bf16 rounding gives ~0.2 %); fp16 and fp32 are right."""
    cpu_bf16 = "--amp bf16 trains on a GPU only"
    with pytest.raises(UsageError, match=cpu_bf16):
        train.parse_args(["--device", "cpu", "--amp", "bf16"])
    assert train.parse_args(["--device", "cpu", "--amp", "fp16"]).amp == "fp16"
    assert train.parse_args(["--device", "cuda", "--amp", "bf16"]).amp == "bf16"  # the device is checked at start
    if torch.cuda.is_available():
        assert train.parse_args(["--device", "auto", "--amp", "bf16"]).amp == "bf16"
    else:
        with pytest.raises(UsageError, match=cpu_bf16):
            train.parse_args(["--device", "auto", "--amp", "bf16"])


def test_overlap_is_read_as_eval_py_reads_it(tmp_path, capsys):
    # README writes the default `--overlap 1/3`; train.py read only decimals, so it refused it
    assert train.parse_args(["--overlap", "1/3"]).overlap == 1 / 3
    assert train.parse_args(["--overlap", "0.5"]).overlap == 0.5
    for bad in ("1", "-0.1", "1/0"):
        with pytest.raises(SystemExit) as stopped:
            train.parse_args(["--overlap", bad])
        assert stopped.value.code == 2
        assert capsys.readouterr().err.startswith("error: argument --overlap: ")
    # a run's config.json holds the float; fed back, it is the same value
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"overlap": 1 / 3}))
    assert train.parse_args(["--config", str(path)]).overlap == 1 / 3


def test_cli_prints_one_line_and_exits_2_on_bad_flags(tmp_path):
    run = subprocess.run([sys.executable, str(REPO / "train.py"), "--num_steps", "0",
                          "--snapshot_dir", str(tmp_path / "run")], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert run.stderr.splitlines() == ["error: --num_steps 0 leaves nothing to train (it must be "
                                       "greater than --start_iters 0)"]
    assert not (tmp_path / "run").exists()
    # argparse's own refusals too: one line, not its usage block
    run = subprocess.run([sys.executable, str(REPO / "train.py"), "--amp", "fp8", "--snapshot_dir",
                          str(tmp_path / "run")], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert run.stderr.splitlines() == ["error: argument --amp: invalid choice: 'fp8' (choose from "
                                       "'off', 'bf16', 'fp16') (see train.py --help)"]
    assert not (tmp_path / "run").exists()


def test_run_sh_refuses_a_second_stage_that_does_not_go_further(tmp_path):
    copy_scripts(tmp_path, "run.sh")  # run.sh works in its own folder
    env = dict(os.environ, PYTHON="false", STAGE1_STEPS="4", STAGE2_STEPS="4")
    run = subprocess.run(["bash", "run.sh", "cpu"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=60)
    assert run.returncode != 0
    assert "STAGE2_STEPS (4) must be greater than STAGE1_STEPS (4)" in run.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.sh", "utils"]


@pytest.mark.parametrize("name", ["STAGE1_STEPS", "STAGE2_STEPS", "VAL_EVERY", "BATCH"])
def test_run_sh_refuses_a_count_that_is_not_a_number_before_training(tmp_path, name):
    # STAGE2_STEPS=3O used to reach train.py only after all of stage 1.
    copy_scripts(tmp_path, "run.sh")
    env = dict(os.environ, PYTHON="false", **{name: "3O"})
    run = subprocess.run(["bash", "run.sh", "cpu"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 2
    assert run.stderr == f"error: {name} must be a whole number, got '3O'\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.sh", "utils"]


def test_a_stopped_rank_is_named_after_the_timeout(data, tmp_path):
    """torchrun, 2 CPU processes: rank 1 stops (SIGSTOP) before the final barrier; rank 0 gives
    up after --dist_timeout_min and names it."""
    wrapper = tmp_path / "stop_rank1.py"
    wrapper.write_text(
        "import os, signal\nimport train\nfrom utils import distributed\nfrom utils.cli import run_cli\n"
        "barrier = distributed.barrier\n"
        "def stop_rank1(info, where):\n"
        "    if info.rank == 1 and where == 'at the end of the run':\n"
        "        print(f'rank 1 pid {os.getpid()} stops', flush=True)\n"
        "        os.kill(os.getpid(), signal.SIGSTOP)\n"
        "    barrier(info, where)\n"
        "distributed.barrier = stop_rank1\n"
        "run_cli(train.main, train.TRAIN_ERRORS)\n")
    preprocess(data / "data" / "train.csv", data / "cache")  # rank 1 waits for it at the first barrier
    env = script_env()
    cmd = [*torchrun_command(120), str(wrapper),
           *flags(data, tmp_path / "ddp", 2, 2, "--val_list", "", "--dist_timeout_min", "0.1")]
    run = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    stopped, lines = None, []
    try:
        for line in run.stdout:
            lines.append(line)
            stopped = stopped or re.search(r"rank 1 pid (\d+) stops", line)
            if "error: rank 0" in line:
                break
    finally:
        if stopped:  # torchrun's SIGTERM waits while it is stopped; do not wait 30 s for SIGKILL
            os.kill(int(stopped[1]), signal.SIGKILL)
        run.kill()
        run.wait()
    output = "".join(lines)
    assert stopped, output[-3000:]
    assert re.search(r"error: rank 0: not every rank reached the barrier at the end of the run "
                     r"within --dist_timeout_min 0.1: .*Ranks? 1 failed to pass", output), output[-3000:]


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
    # an emptied or edited file (a crash on a file system that loses data): one line, kept as is
    not_one = "ValueError: not a list of elections, each with its iteration"
    for text, problem in (("", "JSONDecodeError: Expecting value"), ('{"x":', "JSONDecodeError"),
                          ("[1]", not_one), ('[{"step": 0}]', not_one), ("{}", not_one)):
        path.write_text(text)
        with pytest.raises(DataError, match=rf"^{re.escape(str(path))} is not an election history "
                           rf"\({problem}.*\); restore it, or delete it to start a new one$"):
            append_history(path, result, 15)
        assert path.read_text() == text


def test_a_damaged_election_history_is_refused_when_the_run_resumes_before_any_training(
        data, tmp_path):
    """Not at the next election, which would throw away the iterations trained since last.pth."""
    snapshot = tmp_path / "run"
    train.main(flags(data, snapshot, 8, 4, "--stop_at", "5"))  # elections at 0 and 4, last.pth at 4
    history = snapshot / "teachers.json"
    history.write_text('{"x":')
    before = (snapshot / "last.pth").read_bytes()
    with pytest.raises(DataError, match=rf"^{re.escape(str(history))} is not an election history "
                       r"\(JSONDecodeError"):
        train.main(flags(data, snapshot, 8, 4))
    assert (snapshot / "last.pth").read_bytes() == before and not (snapshot / "final.pth").exists()


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


def test_missing_schedule_and_subset_draws():
    assert train.missing_probability("off", 0, 0) == 1.0
    assert train.missing_probability("ramp:100", 150, 100) == pytest.approx(0.5)
    assert train.missing_probability("ramp:100", 500, 100) == 1.0
    rng = random.Random(0)
    draws = [train.draw_subset("random", rng, 1.0) for _ in range(300)]
    assert FULL not in draws and {len(d) for d in draws} == {1, 2, 3}
    assert train.draw_subset("random", rng, 0.0) == FULL
    assert train.draw_subset((0, 2), rng, 1.0) == (0, 2)


def test_resume_restores_the_run_and_where_its_missing_modality_ramp_began():
    """resume(): the folder's own checkpoint continues at its iteration with its ramp start;
    one given by --reload_path keeps the ramp start only in the same --mode (stage 1 -> 2
    starts the ramp where stage 2 starts), and --start_iters re-bases it."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    model(torch.randn(2, 3)).sum().backward()
    optimizer.step()  # a momentum buffer to restore
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    saved_stream = random.Random(5)
    saved = lambda mode, **extra: make_checkpoint(
        model, optimizer, scaler, 300, (2,), 200, saved_stream,
        {} if mode is None else {"mode": mode}, **extra)
    args = lambda mode, start_iters=0: SimpleNamespace(
        mode=mode, start_iters=start_iters, momentum=0.99, weight_decay=0.0)

    def resumed(checkpoint, own, flags):
        fresh = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5, weight_decay=1.0)
        stream = random.Random(0)
        result = train.resume(checkpoint, own, fresh, scaler, stream, flags, torch.device("cpu"))
        return result, fresh, stream

    (result, fresh, stream), expected = resumed(saved("random", random_start=120), True,
                                                args("random")), random.Random(5)
    assert result == (300, (2,), 200, 120)
    assert stream.random() == expected.random()  # the subset stream continues
    momentum = optimizer.state_dict()["state"][0]["momentum_buffer"]
    assert torch.equal(fresh.state_dict()["state"][0]["momentum_buffer"], momentum)
    group = fresh.param_groups[0]  # this run's flags, not the checkpoint's or the fresh ones
    assert (group["momentum"], group["weight_decay"], group["nesterov"]) == (0.99, 0.0, True)

    stage1 = saved("0,1,2,3", random_start=0)
    assert resumed(stage1, False, args("random"))[0] == (300, (2,), 200, 300)
    assert resumed(stage1, False, args("random", start_iters=50))[0] == (50, (2,), 200, 50)
    # --reload_path of the same stage, however --mode is spelt
    assert resumed(saved("random", random_start=120), False, args("Random"))[0][3] == 120
    assert resumed(saved("0,1,2,3", random_start=7), False, args("3,2,1,0"))[0][3] == 7
    # a checkpoint without the entry (another version) or without a mode: the ramp starts here
    assert resumed(saved("random"), True, args("random"))[0][3] == 300
    assert resumed(saved(None, random_start=120), False, args("random"))[0][3] == 300


def test_config_file_sets_defaults_and_cli_overrides(tmp_path):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({"num_steps": 7, "mode": "random", "patch_size": [1, 2, 3]}))
    args = train.parse_args(["--config", str(path), "--mode", "0,1"])
    assert args.num_steps == 7 and args.mode_parsed == (0, 1) and args.random_mirror is True
    assert train.parse_args(["--random_scale", "False"]).random_scale is False
    path.write_text(json.dumps({"num_stepz": 7}))
    with pytest.raises(UsageError) as error:
        train.parse_args(["--config", str(path)])
    assert str(error.value) == (f"--config {path}: unknown settings ['num_stepz']; remove them "
                                "(the flags: train.py --help)")
    # its values meet the flags' choices as the command line's do; a bad file is one line
    path.write_text(json.dumps({"amp": "fp8"}))
    with pytest.raises(UsageError, match=rf"--amp 'fp8' \(from --config {path}\): choose from off, bf16, fp16"):
        train.parse_args(["--config", str(path)])
    path.write_text("{bad")
    with pytest.raises(UsageError, match=rf"--config {path}: Expecting property name"):
        train.parse_args(["--config", str(path)])
    with pytest.raises(UsageError, match=rf"--config {tmp_path / 'nope.json'}: .*No such file"):
        train.parse_args(["--config", str(tmp_path / "nope.json")])
    # its values are converted and checked as the command line's (a float seed was kept as a
    # float and failed after preprocessing, with a traceback)
    for setting, problem in (({"random_seed": 1.5}, "random_seed 1.5: invalid literal for int() "
                              "with base 10: '1.5'"),
                             ({"random_mirror": 2}, "random_mirror 2: expected a boolean (True "
                              "or False), got '2'"),
                             ({"num_workers": None}, "num_workers null: expected a number, "
                              "true/false or text"),
                             ({"learning_rate": [0.1]}, "learning_rate [0.1]: expected a number, "
                              "true/false or text")):
        path.write_text(json.dumps(setting))
        with pytest.raises(UsageError) as error:
            train.parse_args(["--config", str(path)])
        assert str(error.value) == f"--config {path}: {problem}"
    path.write_text(json.dumps({"random_seed": 7, "save_every_min": 5, "random_mirror": False}))
    args = train.parse_args(["--config", str(path)])
    assert (args.random_seed, args.save_every_min, args.random_mirror) == (7, 5.0, False)
    assert type(args.random_seed) is int and type(args.save_every_min) is float


def test_election_finds_the_generators_designed_teachers(tmp_path):
    """Synthetic data are built so that T1ce shows ET and TC best and FLAIR (then T2) shows WT.

    Budget: small model, 8 training / 2 validation cases of 96x96x64, patch 32x64x64, batch 2,
    --mode random, the lr schedule of 400 iterations, stopped after the election at 300 (the
    iterations after it cannot change it). Fewer iterations made the outcome depend on the
    thread count: at 200 of a 201-iteration schedule one thread elected T2 for ET.
    """
    generate(tmp_path / "data", 12, shape_xyz=(96, 96, 64), seed=0)
    snapshot = tmp_path / "snapshot"
    # the thread count of the CI machines, where this outcome was checked (the sums' order, and
    # so the trained weights, change with it); torch_settings restores it
    torch.set_num_threads(2)
    train.main(["--device", "cpu", "--model_size", "small", "--input_size", "32,64,64",
                "--num_steps", "400", "--stop_at", "301", "--val_pred_every", "100", "--num_workers", "0",
                "--train_list", str(tmp_path / "data" / "train.csv"),
                "--val_list", str(tmp_path / "data" / "val.csv"),
                "--cache_dir", str(tmp_path / "cache"), "--snapshot_dir", str(snapshot),
                "--mode", "random"])
    last = json.loads((snapshot / "teachers.json").read_text())[-1]
    assert last["iteration"] == 300
    assert last["winners"]["ET"] == "t1ce" and last["winners"]["TC"] == "t1ce"
    assert last["winners"]["WT"] in ("flair", "t2")


def test_a_stop_signal_while_the_loader_starts_its_workers_stops_the_run_instead_of_hanging(
        data, tmp_path):
    """SIGTERM right after the DataLoader forked its worker: the run stops after its first
    iteration (last.pth written, exit 143). It used to interrupt the loader's start, leaving a worker
    that ignores SIGTERM and that nobody told to exit: Python's exit then waited on it forever."""
    wrapper = tmp_path / "signal_at_worker_start.py"
    wrapper.write_text(
        "import os, signal\nimport multiprocessing.process as mp\nimport train\n"
        "from utils.cli import run_cli\n"
        "start = mp.BaseProcess.start\n"
        "def start_then_signal(self):\n"
        "    worker = getattr(self._target, '__name__', '') == '_worker_loop'  # a DataLoader's\n"
        "    start(self)\n"
        "    if worker:\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "mp.BaseProcess.start = start_then_signal\n"
        "run_cli(train.main, train.TRAIN_ERRORS)\n")
    env = script_env()
    snapshot = tmp_path / "run"
    cmd = ["timeout", "60", sys.executable, str(wrapper),
           *flags(data, snapshot, 6, 3, "--val_list", "", "--num_workers", "1")]
    run = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=90)
    output = run.stdout + run.stderr
    assert run.returncode == 143, output[-3000:]  # 124: hung
    assert "stopped by SIGTERM after iteration 0: " in output, output[-3000:]
    assert load_checkpoint(snapshot / "last.pth")["iteration"] == 1


# ------------------------------------------------------- the election's maths, by hand
class ConstantLogits(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.p = torch.nn.Parameter(torch.zeros(()))

    def forward_subsets(self, x, subsets):
        return torch.zeros((x.shape[0], len(subsets), 3) + x.shape[2:])


def election_label():
    label = np.zeros((8, 16, 16), np.uint8)
    label[2:6, 4:12, 4:12] = 2
    label[3:5, 6:10, 6:10] = 1
    label[3:5, 7:9, 7:9] = 4
    return label


def test_election_scores_soft_probabilities_not_masks():
    label = election_label()
    case = SimpleNamespace(name="c", normalized=lambda: np.ones((4, 8, 16, 16), np.float32),
                           full_label=lambda: label)
    result = elect(ConstantLogits(), [case], window=(8, 16, 16), overlap=0)
    n = label.size
    for region, g in (("ET", 8), ("WT", 256), ("TC", 32)):   # p = 0.5 everywhere
        assert result["dice"]["flair"][region] == pytest.approx(2 * 0.5 * g / (0.5 * n + g + 1), rel=1e-5)


class LastColumn(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.p = torch.nn.Parameter(torch.zeros(()))

    def forward_subsets(self, x, subsets):
        out = torch.full((x.shape[0], len(subsets), 3) + x.shape[2:], -2.0)
        out[..., -1] = 10.0
        return out


def test_election_averages_logits_over_windows():
    label = np.zeros((8, 16, 40), np.uint8)
    label[..., 20:] = 2                                 # WT only
    case = SimpleNamespace(name="c", normalized=lambda: np.ones((4, 8, 16, 40), np.float32),
                           full_label=lambda: label)
    result = elect(LastColumn(), [case], window=(8, 16, 16), overlap=1 / 3)
    starts = (0, 11, 22, 24)
    logit = np.array([np.mean([10.0 if w == s + 15 else -2.0 for s in starts if s <= w < s + 16])
                      for w in range(40)])
    p = np.broadcast_to(1 / (1 + np.exp(-logit)), (8, 16, 40))
    g = label > 0
    expected = 2 * (p * g).sum() / (p.sum() + g.sum() + 1)
    assert result["dice"]["flair"]["WT"] == pytest.approx(expected, rel=1e-5)


def test_train_defaults_are_published():
    a = train.parse_args([])
    assert (a.kd_weight, a.momentum, a.learning_rate, a.power, a.overlap) == (0.1, 0.99, 1e-2, 0.9, 1 / 3)


# ------------------------------------------------------------ the step and the teachers used
class _TinyNet(torch.nn.Module):
    """model(image, subset, teachers) -> (logits, kd), as train.step calls LCKD."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv3d(4, 3, 1, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.linspace(-0.5, 0.5, 12).view(3, 4, 1, 1, 1))

    def forward(self, image, subset=None, teachers=()):
        return self.conv(image), self.conv.weight.new_zeros(())


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 2, 4, 4, generator=g), (torch.rand(2, 3, 2, 4, 4, generator=g) > 0.5).float()


def test_step_with_an_fp16_gradient_scaler_takes_the_unscaled_sgd_step():
    """With the scaler on (--amp fp16), the step must equal plain SGD on the loss: the scaler
    multiplies the loss by its scale and divides the gradients by it again. lr 0.1, no momentum:
    w1 = w0 - 0.1 * dL/dw (dL/dw from autograd on an identical copy)."""
    image, regions = _batch()
    reference = _TinyNet()
    logits, kd = reference(image)
    loss, _ = segmentation_loss(logits, regions, kd, 0.1)
    (grad,) = torch.autograd.grad(loss, [reference.conv.weight])
    expected = reference.conv.weight.detach() - 0.1 * grad

    model = _TinyNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, enabled=True)
    train.step(model, optimizer, scaler, image, regions, (0, 1, 2, 3), (), "off", 0.1)
    torch.testing.assert_close(model.conv.weight.detach(), expected, rtol=1e-5, atol=1e-7)
    assert grad.abs().max() > 1e-3  # the step is visible


def test_step_with_non_finite_gradients_skips_and_backs_off_the_scale():
    """A batch whose loss is NaN: the scaler skips the update and halves its scale (backoff
    0.5), so fp16 training recovers."""
    image, regions = _batch()
    image[0, 0, 0, 0, 0] = float("inf")
    model = _TinyNet()
    before = model.conv.weight.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, enabled=True)
    train.step(model, optimizer, scaler, image, regions, (0, 1, 2, 3), (), "off", 0.1)
    assert torch.equal(model.conv.weight.detach(), before)
    assert scaler.get_scale() == 2.0 ** 9


def test_resume_restores_the_fp16_gradient_scaler():
    """The scaler's state (scale, growth tracker) continues after a resume."""
    model = _TinyNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    saved = torch.amp.GradScaler("cpu", init_scale=2.0 ** 7, growth_interval=3, enabled=True)
    image, regions = _batch()
    train.step(model, optimizer, saved, image, regions, (0, 1, 2, 3), (), "off", 0.1)  # tracker 1
    checkpoint = make_checkpoint(model, optimizer, saved, 5, (2,), 0, random.Random(1),
                                 {"mode": "random"}, random_start=0)
    fresh = torch.amp.GradScaler("cpu", enabled=True)  # 65536
    args = SimpleNamespace(mode="random", start_iters=0, momentum=0.99, weight_decay=0.0)
    train.resume(checkpoint, True, torch.optim.SGD(model.parameters(), lr=0.1), fresh,
                 random.Random(0), args, torch.device("cpu"))
    assert fresh.get_scale() == 2.0 ** 7
    assert fresh.state_dict()["_growth_tracker"] == saved.state_dict()["_growth_tracker"] == 1


def test_training_uses_the_elected_teachers_and_a_new_augmentation_each_iteration(tmp_path, monkeypatch):
    """Integration (a few seconds): 3 iterations, elections at 0 and 2. The teachers passed to
    every step are the last election's (teachers.json), not --teachers (here none); every
    iteration augments with its own seed."""
    generate(tmp_path / "data", 3, shape_xyz=(64, 64, 32), seed=3)
    steps, seeds = [], []
    real_step, real_augment = train.step, train.augment_batch
    monkeypatch.setattr(train, "step", lambda *a: steps.append(a[6]) or real_step(*a))
    monkeypatch.setattr(train, "augment_batch",
                        lambda *a, **k: seeds.append(k["seed"]) or real_augment(*a, **k))
    snapshot = tmp_path / "run"
    train.main(["--device", "cpu", "--model_size", "small", "--input_size", "16,32,32",
                "--batch_size", "1", "--num_workers", "0", "--overlap", "0",
                "--train_list", str(tmp_path / "data" / "train.csv"),
                "--val_list", str(tmp_path / "data" / "val.csv"),
                "--cache_dir", str(tmp_path / "cache"), "--snapshot_dir", str(snapshot),
                "--num_steps", "3", "--val_pred_every", "2", "--teachers", "", "--log_every", "1"])
    history = json.loads((snapshot / "teachers.json").read_text())
    assert [h["iteration"] for h in history] == [0, 2]
    elected = [tuple(MODALITIES.index(n) for n in h["teachers"]) for h in history]
    assert all(elected)
    assert steps == [elected[0], elected[0], elected[1]]
    assert len(seeds) == 3 and len(set(seeds)) == 3
