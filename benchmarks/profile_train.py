r"""Where a training step's time goes: torch.profiler over a few bare steps of one variant.

    python benchmarks/profile_train.py                           # CPU: small model, 32x64x64
    python benchmarks/profile_train.py --device cuda --variant bf16_cl_compile --stage "stage 2" \
        --trace OUT/trace.json.gz                                # full model, 80x160x160, batch 2

The step is bench_train's bare step (train.step on one batch of the real pipeline), built by
train.build_model from the variant's flags (bench_train.VARIANTS); stage 2 cycles through one,
two and three available modalities. After --warmup untimed steps (cuDNN autotuning,
compilation) it profiles --steps steps and prints:
  * the time per category, a share of the device's busy time on CUDA (the kernels: cuDNN and
    other convolutions, normalisation, memory-format conversions and copies, Triton kernels of
    torch.compile, the optimiser, other elementwise work), of the operators' own CPU time on a
    CPU; and the device's busy share of the profiled wall time (the rest is idle: launch gaps,
    host synchronisation);
  * the operators or kernels that take the most time, as torch.profiler's table;
  * --trace: a Chrome/Perfetto trace (gzip-compressed when the name ends with .gz).
"""
import argparse
import re
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.autograd import DeviceType

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train  # noqa: E402
from benchmarks import bench_train  # noqa: E402
from datasets.synthetic import generate  # noqa: E402
from utils import speed  # noqa: E402
from utils.cli import ArgumentParser, run_cli  # noqa: E402
from utils.io import atomic_path  # noqa: E402

# (category, pattern on the lower-cased kernel or operator name), first match wins: Triton's
# kernels first (Inductor names them after the ops they fuse: triton_poi_fused_convolution_0),
# norms before convolutions because cuDNN names both; layout conversions before generic copies.
CATEGORIES = (
    ("compiled (triton)", r"^triton"),
    ("normalisation", r"norm|welford|\bbn_"),
    ("layout conversion", r"nchwtonhwc|nhwctonchw|nchw_to_nhwc|nhwc_to_nchw|channels_?last|transpose"),
    ("convolution", r"conv|cudnn|xmma|implicit_?gemm|fprop|dgrad|wgrad|winograd|cutlass|sm\d+_"),
    ("optimiser", r"sgd|multi_tensor|foreach|adam"),
    ("copy", r"copy|memcpy|memset|contiguous|\bcat\b|clone|fill"),
    ("matmul", r"gemm|\bmm\b|addmm|bmm|matmul"),
)
OTHER = "elementwise, other"


def classify(name):
    """The category of a kernel (CUDA) or operator (CPU) name."""
    lowered = name.lower()
    for category, pattern in CATEGORIES:
        if re.search(pattern, lowered):
            return category
    return OTHER


def category_times(averages, on_device):
    """{category: microseconds} from profiler.key_averages(): on a device its kernels' time (the
    table's self device time, annotations left out), on a CPU the operators' self CPU time."""
    totals = {}
    for event in averages:
        if on_device:
            if event.device_type == DeviceType.CPU or getattr(event, "is_user_annotation", False):
                continue
            value = event.self_device_time_total
        else:
            value = event.self_cpu_time_total
        if value > 0:
            category = classify(event.key)
            totals[category] = totals.get(category, 0) + value
    return totals


def format_categories(totals, wall_us, on_device):
    busy = sum(totals.values())
    what = "kernel time" if on_device else "operators' self CPU time"
    lines = [f"{'category':<20} {'ms':>10} {'share':>7}   (share of the {what})"]
    for category, value in sorted(totals.items(), key=lambda item: -item[1]):
        lines.append(f"{category:<20} {value / 1e3:>10.1f} {100 * value / busy:>6.1f}%")
    if on_device:
        lines.append(f"device busy {busy / 1e3:.1f} ms of {wall_us / 1e3:.1f} ms wall "
                     f"({100 * busy / wall_us:.0f}%; the rest: launch gaps, host waits)")
    return lines


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench_train.add_common_arguments(p)
    p.add_argument("--variant", choices=tuple(bench_train.VARIANTS),
                   help="default: bf16_cl_compile (run.sh's GPU step) on CUDA, fp32 on a CPU")
    p.add_argument("--stage", default="stage 2", choices=tuple(bench_train.STAGES))
    p.add_argument("--warmup", type=int, default=6, help="untimed steps before the profile")
    p.add_argument("--steps", type=int, default=3, help="profiled steps")
    p.add_argument("--rows", type=int, default=25, help="rows of the top table")
    p.add_argument("--trace", default="", help="write a Chrome trace here (.json or .json.gz)")
    args = bench_train.resolve_defaults(p.parse_args(argv), {"variant": ("bf16_cl_compile", "fp32")})
    if args.warmup < 1 or args.steps < 1:
        p.error("--warmup and --steps must be >= 1")
    if args.trace and Path(args.trace).is_dir():  # found before the profile, not after it
        p.error(f"--trace {args.trace} is a folder: give a file, e.g. {Path(args.trace) / 'trace.json.gz'}")
    args.num_workers, args.work_dir = 0, ""  # bench_train.train_flags: the batch is cut in-process
    bench_train.check_train_flags(p, args, [args.stage], [args.variant])
    return args


def write_trace(profiler, path):
    """The Chrome trace, whole or not at all (torch gzips it when the name ends with .gz)."""
    with atomic_path(path) as target:
        profiler.export_chrome_trace(str(target))


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    train.set_backends(device)
    with tempfile.TemporaryDirectory(prefix="profile_train_") as tmp:
        work = Path(tmp)
        generate(work / "data", 3, shape_xyz=args.shape)
        targs = train.parse_args(bench_train.train_flags(args, work, args.stage, args.variant))
        image, regions = bench_train.pipeline_batch(targs, device)
    step, options = bench_train.warmed_step(targs, device, (image, regions), args.warmup)
    subsets = bench_train.count_subsets(targs)
    speed.synchronize(device)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profiler:
        start = time.perf_counter()
        for i in range(args.steps):
            step(subsets[i % len(subsets)])
        speed.synchronize(device)
        wall_us = (time.perf_counter() - start) * 1e6
    on_device = device.type == "cuda"
    print(f"profile_train: {torch.cuda.get_device_name(device) if on_device else 'CPU'} | torch "
          f"{torch.__version__} | model {args.model} | patch {args.patch} batch {args.batch} | "
          f"{args.stage}, variant {args.variant} (amp {targs.amp}, "
          + ", ".join(f"{k} {'on' if v else 'off'}" for k, v in options.items())
          + f") | {args.steps} profiled steps after {args.warmup}: {wall_us / 1e3 / args.steps:.1f} ms/step")
    averages = profiler.key_averages()
    print("\n".join(format_categories(category_times(averages, on_device), wall_us, on_device)))
    sort = "self_device_time_total" if on_device else "self_cpu_time_total"
    print(averages.table(sort_by=sort, row_limit=args.rows, max_name_column_width=70))
    if args.trace:
        write_trace(profiler, args.trace)
        print(f"trace: {args.trace}")
    return profiler


if __name__ == "__main__":
    run_cli(main)  # SIGTERM and Ctrl-C unwind: the temporary cases are deleted
