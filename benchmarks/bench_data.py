"""Training-patch throughput: the cache's crop worker vs. the published per-sample NIfTI loading.

    python -m benchmarks.bench_data [--num_cases 4] [--patches 200] [--raw_patches 6]
                                    [--format nii] [--work_dir DIR]

Generates synthetic 240x240x155 cases once (datasets.synthetic), caches them
(datasets.preprocess), then makes 80x160x160 training patches (4 channels) in one process, from
the same cases with the same crop draws (datasets.sampling.PatchSampler):
  worker    what one DataLoader worker does: PatchDataset[i], the crop of int16 source values
            and labels read from the memory-mapped cache (normalising, resizing and flipping
            happen on the training device);
  + finish  the same, plus PatchDataset.to_device on the CPU (what a CPU-only run does);
  raw       the published per-sample loading: nibabel load of the 4 modalities + seg,
            normalize_published of each modality, foreground voxels of the whole label map,
            the crop, the flips and the published resize of rescaled crops:
            skimage.transform.resize(order=1, anti_aliasing) for the image (emulated with
            scipy.ndimage: Gaussian anti-aliasing filter when shrinking, then linear zoom,
            clipped to the input range, as skimage does), nearest for the labels.
Also prints the cache's size per case against format 1 (float32 image + uint8 label: 17 bytes
per voxel), and times the normalisation alone (published vs. fast) on one modality volume.
Every path reads files the OS has already cached (each runs a warm-up patch first), so the
ratios are lower bounds for a cold disk, where the raw path reads 5 full volumes per patch.
Default format .nii, as the BraTS 2018 release; .nii.gz adds decompression to the raw path.
"""
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from scipy import ndimage

from datasets import synthetic
from datasets.brats import find_case_files, to_network_order
from datasets.normalize import normalize, normalize_published
from datasets.preprocess import preprocess
from datasets.sampling import PatchDataset, PatchSampler, foreground_locations
from utils.modalities import MODALITIES
from utils.cli import ArgumentParser, path_given, positive_int, run_cli
from utils.regions import labels_to_regions

PATCH = (80, 160, 160)
SHAPE_XYZ = (240, 240, 155)


def published_resize(image, shape):
    """skimage.transform.resize(image, shape, order=1, mode='constant', cval=0, clip=True,
    preserve_range=True) with its default anti-aliasing, in scipy (skimage is not a
    dependency): Gaussian filter of sigma (factor - 1) / 2 when shrinking, linear zoom."""
    factors = np.array(image.shape) / np.array(shape)
    out = image
    if (factors > 1).any():
        out = ndimage.gaussian_filter(out, np.maximum(0, (factors - 1) / 2), mode="constant", cval=0)
    out = ndimage.zoom(out, 1 / factors, order=1, mode="grid-constant", cval=0, grid_mode=True)
    return np.clip(out, min(image.min(), 0), max(image.max(), 0))


def raw_sample(case_dir, sampler, rng):
    """Published per-sample path: read and normalise the whole case, then cut one patch."""
    files = find_case_files(case_dir)
    image = np.stack([
        normalize_published(to_network_order(nib.load(files[m]).get_fdata(dtype=np.float32)))
        for m in MODALITIES
    ])
    label = to_network_order(np.asanyarray(nib.load(files["seg"]).dataobj)).astype(np.uint8)
    crop = sampler(label.shape, rng, foreground_locations(label))
    pad = max(crop.sizes)
    window = tuple(slice(s + pad, s + pad + n) for s, n in zip(crop.starts, crop.sizes))
    patch = np.pad(image, [(0, 0)] + [(pad, pad)] * 3)[(slice(None), *window)]
    crop_label = np.pad(label, pad)[window]
    axes = [k for k in range(3) if crop.flips[k]]
    patch, crop_label = np.flip(patch, [a + 1 for a in axes]), np.flip(crop_label, axes)
    if crop.sizes != sampler.patch_size:
        patch = published_resize(patch, (len(patch), *sampler.patch_size))
        crop_label = ndimage.zoom(crop_label, np.array(sampler.patch_size) / crop.sizes, order=0,
                                  mode="nearest", grid_mode=True)
    return patch.astype(np.float32), labels_to_regions(crop_label)


def rate(fn, count):
    """Patches per second of fn(i) over count calls, after one warm-up call."""
    fn(count)
    start = time.perf_counter()
    for i in range(count):
        fn(i)
    return count / (time.perf_counter() - start)


def best_time(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv=None):
    parser = ArgumentParser(prog="python -m benchmarks.bench_data", description=__doc__.split("\n")[0])
    parser.add_argument("--num_cases", type=positive_int, default=4)
    parser.add_argument("--patches", type=positive_int, default=200, help="patches timed from the cache")
    parser.add_argument("--raw_patches", type=positive_int, default=6, help="patches timed from raw NIfTI")
    parser.add_argument("--format", default="nii", choices=("nii", "nii.gz"))
    parser.add_argument("--work_dir", type=path_given, default=None,
                        help="keep data and cache here (default: a temporary folder)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # one worker's view: DataLoader workers run single-threaded

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work_dir or tmp)
        data, cache = work / "data", work / "cache"
        start = time.perf_counter()
        case_dirs = synthetic.generate(data, args.num_cases, SHAPE_XYZ, seed=0, fmt=args.format)
        print(f"generated {args.num_cases} synthetic {SHAPE_XYZ} cases (.{args.format}) "
              f"in {time.perf_counter() - start:.1f} s")
        listing = work / "all.csv"
        listing.write_text("".join(f"{d}\n" for d in case_dirs))
        start = time.perf_counter()
        cases = preprocess(listing, cache, num_workers=1)
        print(f"preprocessed (one-off, 1 worker): {(time.perf_counter() - start) / len(cases):.2f} s/case")
        sizes = [sum(p.stat().st_size for p in (cache / c.name).iterdir()) / 1e6 for c in cases]
        format_1 = 17 * np.prod(SHAPE_XYZ) / 1e6

        finished = max(4, args.patches // 10)
        dataset = PatchDataset(cases, PATCH, seed=0, length=max(args.patches, finished) + 1)  # + rate's warm-up
        worker_rate = rate(lambda i: dataset[i], args.patches)
        cpu = torch.device("cpu")
        finish_rate = rate(lambda i: dataset.to_device(
            torch.utils.data.default_collate([dataset[i]]), cpu), finished)
        sampler = PatchSampler(PATCH)
        raw_rate = rate(
            lambda i: raw_sample(case_dirs[i % len(case_dirs)], sampler, np.random.default_rng(i)),
            args.raw_patches,
        )

        raw_volume = np.ascontiguousarray(to_network_order(  # as load_case returns it
            nib.load(find_case_files(case_dirs[0])["flair"]).get_fdata(dtype=np.float32)
        ))
        t_pub = best_time(lambda: normalize_published(raw_volume), 5)
        t_fast = best_time(lambda: normalize(raw_volume), 5)
        equal = np.array_equal(normalize(raw_volume), normalize_published(raw_volume))

    print(f"\ncache per case: {np.mean(sizes):.1f} MB (min {min(sizes):.1f}, max {max(sizes):.1f}); "
          f"format 1 (float32 image + uint8 label): {format_1:.1f} MB ({format_1 / np.mean(sizes):.1f}x)")
    print(f"\npatch {PATCH} x 4 channels, single process, one thread")
    print(f"{'path':<52}{'patches/s':>10}{'vs raw':>9}")
    for name, value in (("worker: crop from the cache (PatchDataset[i])", worker_rate),
                        ("worker + finish on the CPU (to_device('cpu'))", finish_rate),
                        ("raw NIfTI (published per-sample loading)", raw_rate)):
        print(f"{name:<52}{value:>10.2f}{value / raw_rate:>8.1f}x")
    print(f"\nnormalisation of one {raw_volume.shape} volume: published {t_pub * 1e3:.0f} ms, "
          f"fast {t_fast * 1e3:.0f} ms, speed-up {t_pub / t_fast:.1f}x, bit-identical: {equal}")


if __name__ == "__main__":
    run_cli(main)  # SIGTERM and Ctrl-C unwind: the temporary folder (about 100 MB a case) is deleted
