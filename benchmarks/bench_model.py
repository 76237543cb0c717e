"""Model benchmark: train-step time and peak memory, and the 15-subset decode with encoder reuse.

    python benchmarks/bench_model.py --model small --patch 32,64,64 --batch 2 --threads 1   # CPU
    python benchmarks/bench_model.py --model full --patch 16,32,32 --batch 2 --threads 1    # CPU
    python benchmarks/bench_model.py --model full --device cuda --patch 80,160,160 --batch 2 --amp bf16

Prints train.py's step (forward, Dice + BCE + 0.1 * KD, backward, SGD step) and its peak memory
(CUDA: max_memory_allocated; CPU: growth of the process's peak RSS), then the time to
evaluate the batch under all 15 subsets (eval mode, no grad) three ways: forward_subsets
(each modality encoded once), 15 calls of model(x, subset) (available modalities + the zero
image encoded per subset), and 15 forwards as the published code runs them (all four
modalities encoded per subset). Times are medians over --steps runs after --warmup runs.
"""
import argparse
import dataclasses
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from models import LCKD, MODEL_SIZES, LCKDConfig  # noqa: E402
from train import step  # noqa: E402
from utils.inference import AMP_DTYPES, autocast  # noqa: E402
from utils.cli import (ArgumentParser, device_name, int_at_least, positive_int, run_cli,  # noqa: E402
                       window_size)
from utils.distributed import resolve_device  # noqa: E402
from utils.modalities import ALL_SUBSETS, parse_subset  # noqa: E402
from utils.speed import synchronize  # noqa: E402


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=MODEL_SIZES, default="full")
    p.add_argument("--device", type=device_name, default="auto")
    p.add_argument("--patch", type=window_size, default="16,32,32",
                   help="D,H,W (published training patch 80,160,160)")
    p.add_argument("--batch", type=positive_int, default=2)
    p.add_argument("--amp", choices=tuple(AMP_DTYPES), default="off")
    p.add_argument("--subset", default="0,1,2,3", help="available modalities in the train step")
    p.add_argument("--checkpoint_encoder", action="store_true")
    p.add_argument("--steps", type=positive_int, default=5)
    p.add_argument("--warmup", type=int_at_least(0), default=2)
    p.add_argument("--threads", type=int_at_least(0), default=0, help="CPU threads (0: PyTorch default)")
    return p.parse_args(argv)


def median_time(fn, device, steps, warmup):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    patch = args.patch
    config = LCKDConfig.from_name(args.model, checkpoint_encoder=args.checkpoint_encoder)
    torch.manual_seed(0)
    model = LCKD(config).to(device)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.99, nesterov=True)
    subset = parse_subset(args.subset)

    x = torch.randn(args.batch, 4, *patch, device=device)
    target = (torch.rand(args.batch, 3, *patch, device=device) > 0.5).float()
    params = sum(p.numel() for p in model.parameters())
    print(f"model {args.model}: {params:,} parameters | device {device} | threads {torch.get_num_threads()} | "
          f"patch {patch} batch {args.batch} amp {args.amp} checkpoint_encoder {args.checkpoint_encoder}")

    def train_step():
        step(model, optimizer, scaler, x, target, subset, (0,), args.amp, kd_weight=0.1)

    model.train()
    rss_before = peak_rss_mib()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step_time = median_time(train_step, device, args.steps, args.warmup)
    if device.type == "cuda":
        memory = f"peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"
    else:
        memory = f"peak RSS growth {peak_rss_mib() - rss_before:.0f} MiB (of {peak_rss_mib():.0f} MiB)"
    print(f"train step (subset {args.subset}): {step_time * 1000:.0f} ms/iteration | {memory}")

    model.eval()
    # The same weights run as the published code does: all four modalities encoded per subset.
    published = LCKD(dataclasses.replace(config, encode_all=True)).to(device).eval()
    published.load_state_dict(model.state_dict())
    with torch.no_grad(), autocast(device, args.amp):
        reuse = median_time(lambda: model.forward_subsets(x, ALL_SUBSETS), device, args.steps, args.warmup)
        plain = median_time(lambda: [model(x, s) for s in ALL_SUBSETS], device, args.steps, args.warmup)
        all_four = median_time(lambda: [published(x, s) for s in ALL_SUBSETS], device,
                               args.steps, args.warmup)
    print(f"15-subset evaluation of the batch: forward_subsets {reuse * 1000:.0f} ms | "
          f"15 x model(x, subset) {plain * 1000:.0f} ms ({plain / reuse:.2f}x) | "
          f"15 x published forward {all_four * 1000:.0f} ms ({all_four / reuse:.2f}x)")


if __name__ == "__main__":
    run_cli(main)
