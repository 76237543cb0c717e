r"""Benchmark: all 15 subsets in one pass (encoder once per window) vs. 15 single-subset runs.

    python benchmarks/bench_eval.py                                  # CPU, small model
    python benchmarks/bench_eval.py --device cuda --model full --shape 240,240,155 \
        --patch 80,160,160 --amp bf16                                # the published setting

Both ways predict the same synthetic cases (datasets.synthetic, read and normalised once,
outside the timing) with the same random-init network and sliding-window settings, and turn
the probabilities into label maps; mask writing and metrics cost the same in both and are
not timed. Prints seconds per case, cases per minute and the speed-up, and the speed-up of
the network alone (sliding window to probabilities).
"""
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere

from datasets.brats import load_case  # noqa: E402
from datasets.normalize import normalize_image  # noqa: E402
from datasets.synthetic import generate, volume_shape  # noqa: E402
from models import LCKD, LCKDConfig  # noqa: E402
from utils.regions import probabilities_to_labels  # noqa: E402
from utils.cli import ArgumentParser, device_name, positive_int, run_cli, window_size  # noqa: E402
from utils.distributed import resolve_device  # noqa: E402
from utils.inference import AMP_DTYPES, predict_subsets  # noqa: E402
from utils.modalities import ALL_SUBSETS  # noqa: E402
from utils.speed import synchronize  # noqa: E402


def main(argv=None):
    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", type=positive_int, default=2)
    p.add_argument("--shape", type=volume_shape, default=(96, 96, 64), help="synthetic X,Y,Z")
    p.add_argument("--patch", type=window_size, default=(32, 64, 64), help="window D,H,W")
    p.add_argument("--model", choices=("small", "full"), default="small")
    p.add_argument("--device", type=device_name, default="auto")
    p.add_argument("--amp", choices=tuple(AMP_DTYPES), default="off")
    p.add_argument("--batch_size", type=positive_int, default=2)
    args = p.parse_args(argv)
    device = resolve_device(args.device)

    with tempfile.TemporaryDirectory() as tmp:
        images = [normalize_image(load_case(c).image)
                  for c in generate(tmp, args.cases, shape_xyz=args.shape, seed=0)]
    torch.manual_seed(0)
    model = LCKD(LCKDConfig.from_name(args.model)).to(device).eval()
    predict = lambda image, subsets: predict_subsets(
        model, image, subsets, args.patch, "probabilities", batch_size=args.batch_size,
        device=device, amp=args.amp)
    run = lambda image, subsets: [probabilities_to_labels(p) for p in predict(image, subsets)]

    def timed(fn):
        synchronize(device)
        start = time.perf_counter()
        for image in images:
            fn(image)
        synchronize(device)
        return (time.perf_counter() - start) / len(images)

    run(images[0], [ALL_SUBSETS[0]])  # warm-up (kernel selection, allocator)
    joint = timed(lambda image: run(image, ALL_SUBSETS))
    separate = timed(lambda image: [run(image, [s]) for s in ALL_SUBSETS])
    # the network alone (sliding window to probabilities), without the label maps
    joint_net = timed(lambda image: predict(image, ALL_SUBSETS))
    separate_net = timed(lambda image: [predict(image, [s]) for s in ALL_SUBSETS])

    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else f'{torch.get_num_threads()} threads'}), "
          f"model {args.model}, {args.cases} cases {'x'.join(map(str, args.shape))}, "
          f"window {'x'.join(map(str, args.patch))}, overlap 1/3, batch {args.batch_size}, amp {args.amp}")
    print(f"15 subsets, one pass (encoder reused): {joint:8.2f} s/case  {60 / joint:8.2f} cases/min")
    print(f"15 single-subset runs:                 {separate:8.2f} s/case  {60 / separate:8.2f} cases/min")
    print(f"speed-up: {separate / joint:.2f}x   (network alone: {joint_net:.2f} vs "
          f"{separate_net:.2f} s/case, {separate_net / joint_net:.2f}x)")


if __name__ == "__main__":
    run_cli(main)
