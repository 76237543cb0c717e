"""benchmarks/bench_train.py on a CPU with tiny settings: its logic, not its timings."""
import pytest
import torch

from benchmarks import bench_train


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
        assert table["published"]["loop x published"] == table["published"]["step x published"] == "1.00"
    # All four available: the same encoder work. Stage 2: the published row encodes four
    # images per sample whatever is missing, ours only the available ones and one zero image.
    assert tables["1"]["published"]["GFLOP/it"] == tables["1"]["fp32"]["GFLOP/it"]
    assert float(tables["2"]["published"]["GFLOP/it"]) > 1.2 * float(tables["2"]["fp32"]["GFLOP/it"])


@pytest.mark.parametrize("name, amp, allow_tf32, expected", [
    ("NVIDIA H200", "bf16", True, 989.0),
    ("NVIDIA H100 80GB HBM3", "fp16", True, 989.0),
    ("NVIDIA H200", "off", True, 494.5),  # fp32 convolutions on TF32 tensor cores (cuDNN default)
    ("NVIDIA H200", "off", False, 67.0),
    ("NVIDIA H100 PCIe", "bf16", True, None),  # other clocks and power: not in the table
    ("NVIDIA H200 NVL", "bf16", True, None),
    ("NVIDIA A100-SXM4-80GB", "bf16", True, None),
])
def test_mfu_peak_by_device_and_precision(monkeypatch, name, amp, allow_tf32, expected):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", allow_tf32)
    peak, text = bench_train.peak_tflops(torch.device("cuda"), amp)
    assert peak == expected
    assert (f"{expected:g} TFLOP/s" in text) if expected else text.startswith("n/a")
    assert bench_train.peak_tflops(torch.device("cpu"), amp) == (None, "n/a on a CPU")
