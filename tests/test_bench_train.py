"""benchmarks/bench_train.py (and the other benchmarks' flags) on a CPU with tiny settings: its
logic, not its timings."""
import os
import random
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

import train
from benchmarks import bench_data, bench_eval, bench_metrics, bench_model, bench_train, profile_train
from test_demo import REPO
from utils import speed


def test_bench_train_prints_both_stages_side_by_side(tmp_path, capsys):
    rows = bench_train.main(["--device", "cpu", "--model", "small", "--patch", "16,32,32", "--batch", "2",
                      "--warmup", "1", "--steps", "2", "--num_workers", "0", "--cases", "3",
                      "--shape", "64,64,32", "--threads", "1", "--variants", "published,fp32",
                      "--work_dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert len(rows) == 4 and all(r["timed"] == 2 for r in rows)  # train.main's steady window
    assert "MFU peak for amp off: n/a on a CPU" in out
    tables = {}
    for block in out.split("\nstage ")[1:]:
        title, header, *lines = [line.strip() for line in block.splitlines() if line.strip()]
        assert header.split(" | ") == list(bench_train.COLUMNS)
        tables[title.split(" ")[0]] = {row[0]: dict(zip(bench_train.COLUMNS, row))
                                       for row in (line.split(" | ") for line in lines if " | " in line)}
    assert set(tables) == {"1", "2"} and all(set(t) == {"published", "fp32"} for t in tables.values())
    for table in tables.values():
        for row in table.values():
            assert row["amp"] == "off"  # the published fp16 runs in fp32 on a CPU
            loop, step = float(row["loop it/s"]), float(row["step it/s"])
            assert 0 < loop < 1000 and 0 < step < 1000
            assert float(row["loop/step"]) == pytest.approx(loop / step, abs=0.01)
            assert 0 <= float(row["data wait"].rstrip("%")) < 100
            assert float(row["GFLOP/it"]) > 0
            assert row["peak GiB loop"] == row["MFU loop"] == row["MFU step"] == "n/a"
            assert float(row["wall s"]) >= float(row["warm-up s"])  # the warm-up is part of it
        assert table["published"]["loop x published"] == table["published"]["step x published"] == "1.00"
    assert all(row["election s/case"] == "n/a" for row in tables["1"].values())
    assert all(float(row["election s/case"]) > 0 for row in tables["2"].values())
    # The projection, recomputed by hand from the printed rates: 80 000 + 35 000 iterations,
    # 16 + 7 elections of the published list's 57 cases.
    for variant in ("published", "fp32"):
        match = re.search(rf"\n  {variant}: ([\d.]+) h \(stage 1 ([\d.]+) h \+ stage 2 ([\d.]+) h "
                          rf"\+ elections (\d+) min\)", out)
        total, one, two, elections = map(float, match.groups())
        rates = [float(tables[n][variant]["loop it/s"]) for n in ("1", "2")]
        assert one == pytest.approx(80000 / rates[0] / 3600, abs=0.051 + 0.002 * one)
        assert two == pytest.approx(35000 / rates[1] / 3600, abs=0.051 + 0.002 * two)
        election = float(tables["2"][variant]["election s/case"])
        assert elections == pytest.approx(23 * 57 * election / 60, abs=0.51 + 0.002 * elections)
        assert total == pytest.approx(one + two + elections / 60, abs=0.16)
    # All four available: the same encoder work. Stage 2: the published row encodes four
    # images per sample whatever is missing, ours only the available ones and one zero image
    # (k = 3 of batch 2: 7 images for 8), on the same subsets.
    assert tables["1"]["published"]["GFLOP/it"] == tables["1"]["fp32"]["GFLOP/it"]
    assert float(tables["2"]["published"]["GFLOP/it"]) > float(tables["2"]["fp32"]["GFLOP/it"])
    # Again with the same --work_dir (gpu.sh's WORK): the cases are reused, the rows measured afresh.
    again = bench_train.main(["--device", "cpu", "--model", "small", "--patch", "16,32,32", "--warmup", "1",
                              "--steps", "1", "--num_workers", "0", "--cases", "3", "--threads", "1",
                              "--variants", "fp32", "--stages", "stage 2", "--work_dir", str(tmp_path)])
    assert "error" not in again[0] and again[0]["timed"] == 1 and again[0]["election"] > 0


@pytest.mark.parametrize("name, amp, allow_tf32, expected", [
    ("NVIDIA H200", "bf16", True, 989.0),
    ("NVIDIA H100 80GB HBM3", "fp16", True, 989.0),
    ("NVIDIA H200", "off", True, 494.5),  # fp32 convolutions on TF32 tensor cores (cuDNN default)
    ("NVIDIA H200", "off", False, 67.0),
    ("NVIDIA H100 PCIe", "bf16", True, 756.5),  # other clocks and power: their own datasheets
    ("NVIDIA H100 PCIe", "off", False, 51.0),
    ("NVIDIA H200 NVL", "bf16", True, 835.5),
    ("NVIDIA H100 NVL", "off", True, 417.5),
    ("NVIDIA H100 80GB HBM3 MIG 1g.10gb", "bf16", True, None),  # a slice of the card
    ("NVIDIA A100-SXM4-80GB", "bf16", True, None),
])
def test_mfu_peak_by_device_and_precision(monkeypatch, name, amp, allow_tf32, expected):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", allow_tf32)
    peak, text = bench_train.peak_tflops(torch.device("cuda"), amp)
    assert peak == expected
    assert (f"{expected:g} TFLOP/s" in text) if expected else text.startswith("n/a")
    assert bench_train.peak_tflops(torch.device("cpu"), amp) == (None, "n/a on a CPU")


def test_recipe_seconds_by_hand():
    seconds = bench_train.recipe_seconds({"stage 1": 2.0, "stage 2": 1.0}, 0.5, 57)
    assert seconds == {"stage 1": 40000.0, "stage 2": 35000.0, "elections": 23 * 57 * 0.5,
                       "total": 40000 + 35000 + 655.5}
    assert len(bench_train.datalist_entries(bench_train.RECIPE_VAL_LIST)) == 57  # BraTS18_val.csv


def fake_measurements(monkeypatch, fails=()):
    """bench_train.main with made-up rows (2 it/s loop, 4 it/s step, 0.5 s/case elections):
    -> the (stage, variant) pairs in the order measured. `fails`: pairs that raise."""
    measured = []

    def fake_measure(args, work, stage, variant, device):
        measured.append((stage, variant))
        if (stage, variant) in fails:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail")
        return {"stage": stage, "variant": variant, "amp": "off", "timed": 2, "loop": 2.0, "step": 4.0,
                "wait": 0.05, "mem_loop": None, "mem_step": None, "gflop": 1.0, "mfu_loop": None,
                "mfu_step": None, "election": 0.5 if stage == "stage 2" else None, "warmup": 1.0,
                "wall": 3.0}

    monkeypatch.setattr(bench_train, "measure", fake_measure)
    monkeypatch.setattr(bench_train, "generate", lambda *a, **k: None)
    return measured


def test_a_failing_row_is_reported_and_the_others_still_run(tmp_path, monkeypatch, capsys):
    measured = fake_measurements(monkeypatch, fails={("stage 1", "fp32")})
    rows = bench_train.main(["--device", "cpu", "--variants", "published,fp32", "--work_dir", str(tmp_path)])
    captured = capsys.readouterr()
    assert measured == [(s, v) for s in ("stage 1", "stage 2") for v in ("published", "fp32")]
    assert [("error" in r) for r in rows] == [False, True, False, False]
    assert "  fp32 | FAILED: RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB\n" in captured.out
    assert "more detail" in captured.err and "Traceback" in captured.err  # the whole error, on stderr
    # Only the variant measured in both stages gets a projection: 40000 + 17500 + 655.5 s.
    assert "\n  published: 16.2 h (stage 1 11.1 h + stage 2 4.9 h + elections 11 min)" in captured.out
    assert "\n  fp32:" not in captured.out


def test_the_targets_come_first_with_their_projection(tmp_path, monkeypatch, capsys):
    measured = fake_measurements(monkeypatch)
    # the first three (on CUDA: published, run.sh's default, the bf16 step it is compared with)
    # in both stages, then their projection, then the others
    bench_train.main(["--device", "cpu", "--variants", "published,fp32,fp32_cl,fp32",
                      "--work_dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert measured == [("stage 1", "published"), ("stage 1", "fp32"), ("stage 1", "fp32_cl"),
                        ("stage 2", "published"), ("stage 2", "fp32"), ("stage 2", "fp32_cl"),
                        ("stage 1", "fp32"), ("stage 2", "fp32")]
    assert (out.index("\n  fp32_cl: ") < out.index("stage 1 (--mode 0,1,2,3) continued:"))
    assert out.count("  fp32_cl | off | 2.000 | 4.000 | 0.50 | 5.0% | 1.00 | 1.00 |") == 2  # ratios to published


def test_the_published_row_steps_torchs_default_sgd():
    cuda = torch.device("cuda")
    default = {"fused": None, "foreach": None}
    fused = speed.sgd_implementation(cuda)
    assert fused != default
    with bench_train.optimizer_of("published"):
        assert speed.sgd_implementation(cuda) == default
    assert speed.sgd_implementation(cuda) == fused  # restored
    with bench_train.optimizer_of("bf16"):
        assert speed.sgd_implementation(cuda) == fused


def test_too_few_cases_for_an_election_is_refused(capsys):
    with pytest.raises(SystemExit) as stop:
        bench_train.parse_args(["--device", "cpu", "--cases", "1"])
    assert stop.value.code == 2
    assert "--cases 1 leaves no training case or, for --election, no validation case" in capsys.readouterr().err
    assert bench_train.parse_args(["--device", "cpu", "--cases", "1", "--no-election"]).cases == 1


@pytest.mark.parametrize("flags, message", [
    (["--patch", "16,30,32"], "train.py refuses these settings: --input_size: 16,30,32: D must be a multiple of 16"),
    (["--batch", "0"], "train.py refuses these settings: --batch_size must be >= 1, got 0"),
])
def test_settings_train_py_refuses_are_one_usage_error(capsys, flags, message):
    for parse in (bench_train.parse_args, profile_train.parse_args):
        with pytest.raises(SystemExit) as stop:
            parse(["--device", "cpu", *flags])
        assert stop.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("parse", [bench_model.parse_args, bench_eval.main, bench_train.parse_args,
                                   profile_train.parse_args])
def test_a_device_torch_would_misread_is_a_flag_error(parse, capsys):
    with pytest.raises(SystemExit) as stop:
        parse(["--device", "gpu"])
    assert stop.value.code == 2 and "argument --device:" in capsys.readouterr().err


@pytest.mark.parametrize("parse, flags", [
    (bench_train.parse_args, ["--shape", "abc"]), (bench_train.parse_args, ["--shape", "64,64"]),
    (profile_train.parse_args, ["--shape", "abc"]), (bench_eval.main, ["--cases", "0"]),
    (bench_eval.main, ["--patch", "16,30,32"]), (bench_model.parse_args, ["--steps", "0"]),
    (bench_model.parse_args, ["--patch", "16,30,32"]), (bench_model.parse_args, ["--batch", "0"]),
    (bench_metrics.main, ["--repeats", "0"])])
def test_a_benchmark_flag_mistake_is_one_line_before_any_work(parse, flags, capsys):
    # each of these ended in a traceback, some after minutes of data generation
    with pytest.raises(SystemExit) as stop:
        parse(flags)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: argument {flags[0]}: ") and err.count("\n") == 1, err


@pytest.mark.parametrize("flag", ["--num_cases", "--patches", "--raw_patches"])
def test_bench_data_refuses_a_count_below_1_in_one_line(flag, capsys):
    # --patches 0 or -1 ran minutes of data generation, then stopped with an IndexError
    with pytest.raises(SystemExit) as stop:
        bench_data.main([flag, "0"])
    assert stop.value.code == 2
    assert capsys.readouterr().err == (f"error: argument {flag}: must be at least 1, got 0 (see python -m "
                                       "benchmarks.bench_data --help)\n")


@pytest.mark.parametrize("command", [["-m", "benchmarks.bench_data", "--num_cases", "2"],
                                     ["benchmarks/bench_train.py"], ["benchmarks/profile_train.py"]])
def test_a_benchmark_stopped_by_sigterm_deletes_its_temporary_data(tmp_path, command):
    # killed on the spot, they left their synthetic cases (bench_data ~100 MB a case) in the
    # temporary folder
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    process = subprocess.Popen([sys.executable, *command],
                               cwd=REPO, env=dict(os.environ, TMPDIR=str(tmp)),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not any(tmp.rglob("*.nii*")) and time.monotonic() < deadline:  # generating
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert (process.returncode, stderr) == (143, "terminated\n")
    assert list(tmp.iterdir()) == []


def test_bf16_rows_are_refused_on_a_cpu_and_profile_train_defaults_to_fp32_there(capsys):
    for parse, flags in ((bench_train.parse_args, ["--variants", "fp32,bf16"]),
                         (profile_train.parse_args, ["--variant", "bf16_cl"])):
        with pytest.raises(SystemExit) as stop:
            parse(["--device", "cpu", *flags])
        assert stop.value.code == 2
        assert "train.py refuses these settings: --amp bf16 trains on a GPU only" in capsys.readouterr().err
    assert profile_train.parse_args(["--device", "cpu"]).variant == "fp32"


def test_the_loop_warm_up_covers_every_modality_count_and_the_step_gets_the_loops_subsets():
    # train.main's stream with the default seed draws k = 1, 2, 3, 3, 3, 3, 3, 2, 2, 2, ...
    rng = random.Random(train.derived_seed(1234, 0))
    drawn = [train.draw_subset("random", rng, 1.0) for _ in range(14)]
    assert [len(s) for s in drawn[:4]] == [1, 2, 3, 3]
    stage2 = train.parse_args(["--mode", "random"])
    for warmup, expected in ((1, 3), (2, 3), (3, 3), (10, 10)):
        assert bench_train.loop_subsets(stage2, warmup, 4) == (expected, drawn[expected:expected + 4])
    assert bench_train.loop_subsets(train.parse_args(["--mode", "0,1,2,3"]), 1, 2) == (1, [(0, 1, 2, 3)] * 2)


def test_the_loop_draws_the_subsets_the_bare_step_is_timed_on(tmp_path, monkeypatch):
    seen = []
    step = train.step
    monkeypatch.setattr(train, "step", lambda *a, **k: (seen.append(a[5]), step(*a, **k))[1])
    monkeypatch.setattr(bench_train, "bare_step", lambda targs, device, batch, timed, warmup: (
        seen.append(("bare", timed)), (1.0, None, 0.0))[1])
    bench_train.main(["--device", "cpu", "--model", "small", "--patch", "16,32,32", "--shape", "64,64,32",
                      "--cases", "3", "--variants", "fp32", "--stages", "stage 2", "--warmup", "2",
                      "--steps", "5", "--num_workers", "0", "--no-election", "--work_dir", str(tmp_path)])
    (_, timed), loop = seen[0], seen[1:]
    assert len(loop) == 3 + 5 and loop[3:] == timed  # warm-up lengthened to 3: k = 1, 2, 3


def test_step_flops_are_counted_once_per_stage_and_encoder_work_without_autotuning(monkeypatch):
    monkeypatch.setattr(bench_train, "_FLOPS", {})
    built, tuning = [], []
    build, loss = train.build_model, bench_train.segmentation_loss

    def counted(args, device):
        built.append(args.encode_all_modalities)
        return build(args, device)

    def loss_seeing_the_tuning(*args):
        tuning.append(torch.backends.cudnn.benchmark)
        return loss(*args)
    monkeypatch.setattr(train, "build_model", counted)
    monkeypatch.setattr(bench_train, "segmentation_loss", loss_seeing_the_tuning)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)  # as train.set_backends on CUDA
    batch = (torch.randn(2, 4, 16, 32, 32), torch.zeros(2, 3, 16, 32, 32))
    common = ["--device", "cpu", "--model_size", "small", "--input_size", "16,32,32", "--teachers", "0"]
    stage2 = train.parse_args([*common, "--mode", "random"])
    first = bench_train.step_flops(stage2, torch.device("cpu"), batch)
    assert sorted(first) == [1, 2, 3] and first[1] < first[2] < first[3]  # one encoder pass per modality
    again = bench_train.step_flops(train.parse_args([*common, "--mode", "random", "--amp", "off",
                                                     "--channels_last", "on"]), torch.device("cpu"), batch)
    assert again == first and built == [False]  # another variant of the stage: counted before
    published = bench_train.step_flops(train.parse_args([*common, "--mode", "random",
                                                         "--encode_all_modalities", "True"]),
                                       torch.device("cpu"), batch)
    assert built == [False, True] and published[1] > first[1]  # all four encoded: more work
    assert tuning == [False] * 6  # each counting pass ran untuned ...
    assert torch.backends.cudnn.benchmark is True  # ... and the setting is restored
