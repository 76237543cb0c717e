"""benchmarks/gpu.sh, dry-run on a CPU (DEVICE=cpu: every step, tiny sizes): its plumbing."""
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def gpu_sh(out, *parts, cwd=None, **env):
    env = {**os.environ, "PYTHON": sys.executable, "DEVICE": "cpu", "OMP_NUM_THREADS": "1", **env}
    return subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), str(out), *parts],
                          capture_output=True, text=True, env=env, timeout=600, cwd=cwd)


def sections(out):
    """OUT/results.txt -> {part: its output}, from the header each part starts with."""
    parts, name = {"header": []}, "header"
    for line in (out / "results.txt").read_text().splitlines():
        if line.startswith("== ") and line.endswith(" =="):
            name = line.split(" UTC ")[1].split(":")[0]
            parts.setdefault(name, [])
        parts[name].append(line)
    return {name: "\n".join(lines) + "\n" for name, lines in parts.items()}


def test_dry_run_writes_each_part_and_its_time(tmp_path):
    out = tmp_path / "out"
    run = gpu_sh(out, VARIANTS="fp32", STAGES="stage 2")  # every part
    assert run.returncode == 0, run.stderr
    # three files: a lent GPU returns at most 8
    assert sorted(p.name for p in out.iterdir()) == ["results.txt", "stderr.log", "trace.json.gz"]
    parts = sections(out)
    assert list(parts) == ["header", "train", "eval", "checks", "profile", "model"]  # the targets first
    assert "torch " in parts["header"]
    checks = parts["checks"]
    if torch.cuda.is_available():
        assert " passed" in checks and "skipped" not in checks and "failed" not in checks
    else:  # only the CUDA checks are skipped: the sync check, 10 bf16 conv gradient cases and
        # 2 crops normalised on the device
        assert " passed, 13 skipped" in checks and "host synchronisation exists on CUDA only" in checks
        assert "SKIPPED [10] tests/test_speed.py" in checks and "bf16 training runs on CUDA only" in checks
        assert "SKIPPED [2] tests/test_normalize.py" in checks
    train = parts["train"]
    assert "\nstage 2 (--mode random):" in train and "\n  fp32 | off | " in train
    assert "projected wall time" not in train  # stage 1 was not measured
    assert "[train: " in train.splitlines()[-1]
    profile = parts["profile"]
    assert "variant fp32" in profile and "\nconvolution " in profile and "[profile: " in profile
    assert (out / "trace.json.gz").stat().st_size > 0
    evaluation = parts["eval"]
    assert "15 subsets, one pass" in evaluation and "speed-up: " in evaluation and "[eval: " in evaluation
    model = parts["model"]
    assert [line.split(" amp ")[1].split()[0] for line in model.splitlines()
            if line.startswith("model small: ")] == ["off", "bf16"]
    assert model.count("\ntrain step (subset 0,1,2,3): ") == 2 and model.count("[model: ") == 2


def test_no_part_starts_once_the_budget_is_spent(tmp_path):
    out = tmp_path / "out"
    run = gpu_sh(out, "eval", "model", BUDGET_S="1")  # eval takes seconds: model never starts
    assert run.returncode == 0, run.stderr
    assert list(sections(out)) == ["header", "eval"]
    assert "not started, over BUDGET_S=1 s: model" in run.stderr
    assert (out / "results.txt").read_text().endswith("not started, over BUDGET_S=1 s: model\n")
    run = gpu_sh("relative", "eval", BUDGET_S="9m", cwd=tmp_path)
    assert run.returncode == 2 and run.stderr.strip() == "error: BUDGET_S=9m: expected whole seconds (0: no budget)"
    assert (tmp_path / "relative").is_dir()  # OUT_DIR is the caller's, not the repository's


def test_a_failing_part_does_not_stop_the_others(tmp_path):
    out = tmp_path / "out"
    run = gpu_sh(out, "train", "profile", STAGES="stage 9")
    assert run.returncode == 1
    assert "unknown stage 'stage 9'" in (out / "stderr.log").read_text()
    assert "\nconvolution " in sections(out)["profile"]  # profile ran after it
    assert "unknown stage 'stage 9'" in run.stdout  # the end of the failing part's log, shown
    assert "failed parts: train" in run.stderr


def test_refusals_before_anything_runs(tmp_path):
    run = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh")], capture_output=True, text=True)
    assert run.returncode == 2 and run.stderr.startswith("usage: bash benchmarks/gpu.sh OUT_DIR ")
    run = gpu_sh(tmp_path / "out", "train", "speed")
    assert run.returncode == 2 and run.stderr.strip() == "error: unknown part speed: use train, eval, checks, profile, model"
    # A python without nibabel and no wheel folder: one line saying what to do.
    fake = tmp_path / "python"
    fake.write_text(f'#!/bin/sh\ncase "$*" in *"import nibabel"*) exit 1;; esac\nexec "{sys.executable}" "$@"\n')
    fake.chmod(0o755)
    run = gpu_sh(tmp_path / "out2", "train", PYTHON=str(fake), WHEELS=str(tmp_path / "none"))
    assert run.returncode == 2
    assert run.stderr.strip() == (f"error: {fake} cannot import nibabel; pip install -r requirements.txt, "
                                  f"or put its wheel in {tmp_path / 'none'}/")
    assert not any((tmp_path / "out2").iterdir())
