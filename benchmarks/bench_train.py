"""Steady-state training speed: the real train.py loop and the bare step, side by side.

    python benchmarks/bench_train.py                    # CPU: small model, 32x64x64, small cases
    python benchmarks/bench_train.py --device cuda      # full model, 80x160x160, batch 2
    python benchmarks/bench_train.py --device cuda --variants published,bf16_cl_compile

Synthetic BraTS-like cases are generated into --work_dir (default: a temporary folder). For
each stage (--mode 0,1,2,3, then --mode random, both distilling from FLAIR) and each variant
(a row), in one process:
  step  train.build_model from the variant's flags, stepped on one batch of the real pipeline
        (cache -> sampler -> augmentation), no data loading: forward, Dice + BCE + 0.1 KD,
        backward, SGD. Stage 2 draws its subsets as training does, after a warm-up that sees
        every modality count (with --compile: each encoder shape compiles there);
  loop  train.main (cache -> sampler -> DataLoader -> augmentation -> step) for --warmup +
        --steps iterations: it/s over the last --steps (train.py's steady-state window), and
        the share of that window spent waiting for the DataLoader (host time in
        next(batches): an upper bound of the device's idle time for data).
FLOPs: the conv/matmul FLOPs of one step (forward + backward), counted by
torch.utils.flop_counter on an eager fp32 copy; in stage 2 they depend on the number of
available modalities: GFLOP/it and the loop's MFU use the mean over 1, 2, 3 (drawn uniformly
in training), the step's MFU its own subsets. MFU = FLOPs x it/s / the device's dense peak for
the row's precision (printed); n/a on a CPU or an unknown GPU. Peak memory:
max_memory_allocated over each measurement (CUDA only).

Variants (rows): published = the published step: all four modalities encoded per forward,
fp16 autocast with a loss scaler (as apex O1), NCDHW, eager (on a CPU in fp32: the published
code needs a GPU, and CPU fp16 autocast runs ~10x slower than fp32); fp32 = this repository's
step before the speed options; fp32_cl = fp32 + channels-last (the one option a CPU might
use); bf16 = bf16 autocast; bf16_cl = + channels-last; bf16_compile = bf16 + torch.compile;
bf16_cl_compile = all three, run.sh's default on a GPU (fp32 is its default on a CPU).
Default rows: published, fp32, bf16, bf16_cl, bf16_cl_compile on CUDA; published, fp32,
fp32_cl on a CPU.
"""
import argparse
import contextlib
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train  # noqa: E402
from datasets.augment import augment_batch  # noqa: E402
from datasets.brats import resolve_list  # noqa: E402
from datasets.preprocess import preprocess  # noqa: E402
from datasets.sampling import PatchDataset  # noqa: E402
from datasets.synthetic import generate  # noqa: E402
from utils import speed  # noqa: E402
from utils.inference import AMP_DTYPES  # noqa: E402
from utils.losses import segmentation_loss  # noqa: E402
from utils.modalities import FULL, parse_teachers  # noqa: E402

VARIANTS = {
    "published": ["--amp", "fp16", "--encode_all_modalities", "True", "--channels_last", "off", "--compile", "off"],
    "fp32": ["--amp", "off", "--channels_last", "off", "--compile", "off"],
    "fp32_cl": ["--amp", "off", "--channels_last", "on", "--compile", "off"],
    "bf16": ["--amp", "bf16", "--channels_last", "off", "--compile", "off"],
    "bf16_cl": ["--amp", "bf16", "--channels_last", "on", "--compile", "off"],
    "bf16_compile": ["--amp", "bf16", "--channels_last", "off", "--compile", "on"],
    "bf16_cl_compile": ["--amp", "bf16", "--channels_last", "on", "--compile", "on"],
}
STAGES = {"stage 1": "0,1,2,3", "stage 2": "random"}
# One subset per modality count: FLOPs and encoder shapes depend only on the count.
SUBSETS_BY_COUNT = ((0,), (0, 1), (0, 1, 2))

# Dense peaks by the vendor's datasheet, TFLOP/s: H100 SXM and H200 share the compute die.
PEAK_TFLOPS = {"bf16": 989.0, "fp16": 989.0, "tf32": 494.5, "fp32": 67.0}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--model", choices=("full", "small"), help="default: full on CUDA, small on CPU")
    p.add_argument("--patch", help="D,H,W (default: 80,160,160 on CUDA, 32,64,64 on CPU)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--variants", help="comma-separated rows from: " + ", ".join(VARIANTS))
    p.add_argument("--stages", default="stage 1,stage 2", help="comma-separated: stage 1, stage 2")
    p.add_argument("--warmup", type=int, help="untimed iterations (default 10 on CUDA, 3 on CPU)")
    p.add_argument("--steps", type=int, help="timed iterations (default 30 on CUDA, 10 on CPU)")
    p.add_argument("--num_workers", type=int, help="DataLoader workers (default 8 on CUDA, 1 on CPU)")
    p.add_argument("--cases", type=int, default=4, help="synthetic cases (60%% train)")
    p.add_argument("--shape", help="case size X,Y,Z (default: 240,240,155 on CUDA, 96,96,64 on CPU)")
    p.add_argument("--work_dir", default="", help="data, cache, snapshots (default: temporary)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: PyTorch default)")
    args = p.parse_args(argv)
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    args.device = "cuda" if cuda else "cpu"
    defaults = {"model": ("full", "small"), "patch": ("80,160,160", "32,64,64"),
                "variants": ("published,fp32,bf16,bf16_cl,bf16_cl_compile", "published,fp32,fp32_cl"),
                "warmup": (10, 3),
                "steps": (30, 10), "num_workers": (8, 1), "shape": ("240,240,155", "96,96,64")}
    for name, (on_cuda, on_cpu) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, on_cuda if cuda else on_cpu)
    args.variants = args.variants.split(",")
    args.stages = [s.strip() for s in args.stages.split(",")]
    for name in args.variants:
        if name not in VARIANTS:
            p.error(f"unknown variant {name!r}: use {', '.join(VARIANTS)}")
    for name in args.stages:
        if name not in STAGES:
            p.error(f"unknown stage {name!r}: use {', '.join(STAGES)}")
    if args.warmup < 1 or args.steps < 1:
        p.error("--warmup and --steps must be >= 1")
    return args


def peak_tflops(device, amp):
    """(dense peak TFLOP/s for this precision, description) or (None, why not)."""
    if device.type != "cuda":
        return None, "n/a on a CPU"
    name = torch.cuda.get_device_name(device)
    if not ("H200" in name or ("H100" in name and ("HBM3" in name or "SXM" in name))) or "NVL" in name:
        return None, f"n/a: no datasheet peak here for {name}"
    if amp in ("bf16", "fp16"):
        precision = amp
    else:  # convolutions run on TF32 tensor cores unless cuDNN is told otherwise
        precision = "tf32" if torch.backends.cudnn.allow_tf32 else "fp32"
    return PEAK_TFLOPS[precision], f"{precision} {PEAK_TFLOPS[precision]:g} TFLOP/s dense ({name}, datasheet)"


def variant_flags(variant, device_type):
    if variant == "published" and device_type == "cpu":
        return VARIANTS[variant] + ["--amp", "off"]  # the last --amp wins
    return VARIANTS[variant]


def train_flags(args, work, stage, variant):
    return ["--device", args.device, "--model_size", args.model, "--input_size", args.patch,
            "--batch_size", str(args.batch), "--num_workers", str(args.num_workers),
            "--train_list", str(work / "data" / "train.csv"), "--val_list", "",
            "--cache_dir", str(work / "cache"), "--mode", STAGES[stage], "--teachers", "0",
            "--snapshot_dir", str(work / "snapshots" / f"{stage.replace(' ', '')}_{variant}"),
            "--num_steps", "1000000", "--val_pred_every", "1000000000",
            "--stop_at", str(args.warmup + args.steps), "--timing_warmup", str(args.warmup),
            *variant_flags(variant, args.device)]


def pipeline_batch(targs, device):
    """One training batch as the loop makes it: cached cases -> PatchDataset -> augmentation."""
    cases = preprocess(resolve_list(targs.train_list, targs.data_dir), targs.cache_dir)
    dataset = PatchDataset(cases, targs.patch_size, seed=targs.random_seed, length=targs.batch_size)
    batch = torch.utils.data.default_collate([dataset[i] for i in range(targs.batch_size)])
    image, regions = dataset.to_device(batch, device)
    return augment_batch(image, regions, seed=targs.random_seed)


def subsets_for(mode, steps, seed=0):
    """Subsets of `steps` iterations as training draws them (stage 2: k = 1, 2, 3 uniformly)."""
    rng = random.Random(seed)
    return [train.draw_subset(mode, rng, 1.0) for _ in range(steps)]


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device):
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def bare_step(targs, device, batch, timed, warmup):
    """Step the configured network on one batch, once per subset of `timed` after the warm-up;
    returns (it/s, peak GiB)."""
    model, optimizer, _ = train.build_model(targs, device)
    model.train()
    scaler = torch.amp.GradScaler(device.type, enabled=targs.amp == "fp16")
    dtype = AMP_DTYPES[targs.amp]
    teachers = parse_teachers(targs.teachers)
    image, regions = batch

    def step(subset):
        train.step(model, optimizer, scaler, image, regions, subset, teachers, dtype, targs.kd_weight)

    # Warm-up: every modality count (each is an encoder shape: cuDNN autotuning, compilation).
    warm = [FULL] if targs.mode_parsed != "random" else list(SUBSETS_BY_COUNT)
    for i in range(max(warmup, len(warm))):
        step(warm[i % len(warm)])
    reset_peak(device)
    speed.synchronize(device)
    start = time.perf_counter()
    for subset in timed:
        step(subset)
    speed.synchronize(device)
    rate = len(timed) / (time.perf_counter() - start)
    memory = peak_gib(device)
    del model, optimizer
    return rate, memory


def step_flops(targs, device, batch):
    """{modality count: conv/matmul FLOPs of one training step (forward + backward)}, counted
    on an eager fp32 NCDHW model (FLOPs depend on none of those)."""
    eager = argparse.Namespace(**{**vars(targs), "amp": "off", "channels_last": "off", "compile": "off"})
    model, _, _ = train.build_model(eager, device)
    model.train()
    image, regions = batch
    counts = {}
    for subset in ([FULL] if targs.mode_parsed != "random" else SUBSETS_BY_COUNT):
        counter = FlopCounterMode(display=False)
        with counter:
            logits, kd = model(image, subset=subset, teachers=parse_teachers(targs.teachers))
            segmentation_loss(logits, regions, kd, targs.kd_weight)[0].backward()
        counts[len(subset)] = counter.get_total_flops()
    del model
    return counts


def measure(args, work, stage, variant, device):
    flags = train_flags(args, work, stage, variant)
    targs = train.parse_args(flags)
    batch = pipeline_batch(targs, device)
    timed = subsets_for(targs.mode_parsed, args.steps)  # the same for every variant
    step_rate, step_memory = bare_step(targs, device, batch, timed, args.warmup)
    flops_by_count = step_flops(targs, device, batch)
    flops = statistics.mean(flops_by_count.values())  # the loop's expectation: k uniform
    flops_step = statistics.mean(flops_by_count[len(s)] for s in timed)
    reset_peak(device)
    with contextlib.redirect_stdout(sys.stderr):  # its log lines, away from the tables
        result = train.main(flags)
    loop_rate = result["steady_iterations"] / result["steady_seconds"]
    peak, _ = peak_tflops(device, targs.amp)
    return {"stage": stage, "variant": variant, "amp": targs.amp, "timed": result["steady_iterations"],
            "loop": loop_rate, "step": step_rate,
            "wait": result["data_wait_seconds"] / result["steady_seconds"],
            "mem_loop": peak_gib(device), "mem_step": step_memory, "gflop": flops / 1e9,
            "mfu_loop": flops * loop_rate / (peak * 1e12) if peak else None,
            "mfu_step": flops_step * step_rate / (peak * 1e12) if peak else None}


COLUMNS = ("variant", "amp", "loop it/s", "step it/s", "loop/step", "data wait", "loop x published",
           "step x published", "peak GiB loop", "peak GiB step", "GFLOP/it", "MFU loop", "MFU step")


def format_rows(rows):
    """One stage's rows as a '|' table; ratios are to the published row (n/a without one)."""
    ref = next((r for r in rows if r["variant"] == "published"), None)

    def num(value, fmt=".2f"):
        return "n/a" if value is None else format(value, fmt)

    def pct(value):
        return "n/a" if value is None else f"{100 * value:.1f}%"

    lines = [" | ".join(COLUMNS)]
    for r in rows:
        lines.append(" | ".join([
            r["variant"], r["amp"], num(r["loop"], ".3f"), num(r["step"], ".3f"), num(r["loop"] / r["step"]),
            pct(r["wait"]), num(r["loop"] / ref["loop"] if ref else None),
            num(r["step"] / ref["step"] if ref else None), num(r["mem_loop"]), num(r["mem_step"]),
            num(r["gflop"], ".1f"), pct(r["mfu_loop"]), pct(r["mfu_step"]),
        ]))
    return lines


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    train.set_backends(device)  # the bare steps run as train.main's loop does
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"bench_train: {name} | torch {torch.__version__} | model {args.model} | patch {args.patch} "
          f"batch {args.batch} | {args.warmup} warm-up + {args.steps} timed iterations | "
          f"{args.num_workers} DataLoader workers", flush=True)
    amps = [train.parse_args(variant_flags(v, device.type)).amp for v in args.variants]
    for amp in dict.fromkeys(amps):
        print(f"MFU peak for amp {amp}: {peak_tflops(device, amp)[1]}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        work = Path(args.work_dir or tmp)
        if not (work / "data" / "train.csv").exists():
            generate(work / "data", args.cases, shape_xyz=tuple(int(s) for s in args.shape.split(",")))
        for stage in args.stages:  # each stage's table as soon as it is measured
            stage_rows = [measure(args, work, stage, variant, device) for variant in args.variants]
            print(f"\n{stage} (--mode {STAGES[stage]}):")
            for line in format_rows(stage_rows):
                print("  " + line, flush=True)
            rows += stage_rows
    return rows


if __name__ == "__main__":
    main()
