"""HD95's surface distances: k-d tree vs distance transform, on masks from compact to noisy.

    python -m benchmarks.bench_metrics [--repeats 2]

A 240x240x155 volume at 1 mm: the reference is a ball of radius 40 voxels, the prediction the
same ball shifted by 3 voxels plus a fraction of random voxels (what an untrained model's masks
look like). For each fraction, utils.metrics.surface_distances runs with each method forced
(EDT_VOXELS_PER_POINT 0: always the k-d tree; infinite: always the distance transform); prints
the surface voxels per box voxel, the best of --repeats seconds of each, their ratio, which
one the rule (by_distance_transform) picks, and whether the two returned the same distances.
"""
import time

import numpy as np

from utils import metrics
from utils.cli import ArgumentParser, positive_int, run_cli

SHAPE = (155, 240, 240)
NOISE = (0.0, 0.001, 0.01, 0.05, 0.1, 0.2)


def timed(pred, gt, voxels_per_point, repeats):
    """(best seconds, distances) of surface_distances with EDT_VOXELS_PER_POINT set."""
    saved = metrics.EDT_VOXELS_PER_POINT
    metrics.EDT_VOXELS_PER_POINT = voxels_per_point
    try:
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            distances = metrics.surface_distances(pred, gt, (1.0, 1.0, 1.0))
            best = min(best, time.perf_counter() - start)
    finally:
        metrics.EDT_VOXELS_PER_POINT = saved
    return best, distances


def main(argv=None):
    p = ArgumentParser(prog="python -m benchmarks.bench_metrics", description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=positive_int, default=2)
    args = p.parse_args(argv)
    rng = np.random.default_rng(0)
    z, y, x = np.ogrid[:SHAPE[0], :SHAPE[1], :SHAPE[2]]
    gt = (z - 77) ** 2 + (y - 120) ** 2 + (x - 120) ** 2 < 40 ** 2
    print(f"{'noise':>6} | surface/box | k-d tree | distance transform | tree/transform | rule picks | same")
    for noise in NOISE:
        pred = np.roll(gt, 3, axis=1) | (rng.random(SHAPE) < noise)
        surfaces = metrics.surfaces_in_box(pred, gt)
        share = sum(np.count_nonzero(surface) for surface in surfaces) / surfaces[0].size
        tree, by_tree = timed(pred, gt, 0, args.repeats)
        transform, by_transform = timed(pred, gt, float("inf"), args.repeats)
        same = all(np.array_equal(a, b) for a, b in zip(by_tree, by_transform))
        picks = "transform" if metrics.by_distance_transform(*surfaces) else "tree"
        print(f"{noise:>6} | {share:11.4f} | {tree:7.2f}s | {transform:17.2f}s | "
              f"{tree / transform:14.2f} | {picks:>10} | {same}")


if __name__ == "__main__":
    run_cli(main)
