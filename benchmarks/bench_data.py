"""Training-patch throughput: preprocessed cache vs. published per-sample NIfTI loading.

    python -m benchmarks.bench_data [--num_cases 4] [--patches 40] [--raw_patches 8]
                                    [--format nii] [--work_dir DIR]

Generates synthetic 240x240x155 cases once (datasets.synthetic), caches them
(datasets.preprocess), then cuts 80x160x160 training patches (4 channels) both ways, in one
process, from the same cases with the same sampler (datasets.sampling):
  cache  PatchDataset over load_cached memmaps (the training path: reads only the crop);
  raw    the published per-sample loading: nibabel load of the 4 modalities + seg,
         normalize_published of each modality, then the same PatchSampler crop.
Also times the normalisation alone (published vs. fast) on one modality volume.
Both paths read files the OS has already cached (each runs a warm-up patch first), so the
ratio is a lower bound for a cold disk, where the raw path reads 5 full volumes per patch.
Default format .nii, as the BraTS 2018 release; .nii.gz adds decompression to the raw path.
"""
import argparse
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from datasets import synthetic
from datasets.brats import find_case_files, to_network_order
from datasets.normalize import normalize, normalize_published
from datasets.preprocess import preprocess
from datasets.sampling import PatchDataset, PatchSampler
from utils.modalities import MODALITIES

PATCH = (80, 160, 160)
SHAPE_XYZ = (240, 240, 155)


def raw_sample(case_dir, sampler, rng):
    """Published per-sample path: read and normalise the whole case, then crop one patch."""
    files = find_case_files(case_dir)
    image = np.stack([
        normalize_published(to_network_order(nib.load(files[m]).get_fdata(dtype=np.float32)))
        for m in MODALITIES
    ])
    label = to_network_order(np.asanyarray(nib.load(files["seg"]).dataobj)).astype(np.uint8)
    return sampler(image, label, rng)


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
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num_cases", type=int, default=4)
    parser.add_argument("--patches", type=int, default=40, help="patches timed from the cache")
    parser.add_argument("--raw_patches", type=int, default=8, help="patches timed from raw NIfTI")
    parser.add_argument("--format", default="nii", choices=("nii", "nii.gz"))
    parser.add_argument("--work_dir", default=None, help="keep data and cache here (default: temp)")
    args = parser.parse_args(argv)

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

        dataset = PatchDataset(cases, PATCH, seed=0, length=args.patches + 1)
        cache_rate = rate(lambda i: dataset[i], args.patches)
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

    print(f"\npatch {PATCH} x 4 channels, single process")
    print(f"{'path':<42}{'patches/s':>10}")
    print(f"{'cache (memmap + PatchDataset)':<42}{cache_rate:>10.2f}")
    print(f"{'raw NIfTI (published per-sample loading)':<42}{raw_rate:>10.2f}")
    print(f"{'ratio cache / raw':<42}{cache_rate / raw_rate:>9.1f}x")
    print(f"\nnormalisation of one {raw_volume.shape} volume: published {t_pub * 1e3:.0f} ms, "
          f"fast {t_fast * 1e3:.0f} ms, speed-up {t_pub / t_fast:.1f}x, bit-identical: {equal}")


if __name__ == "__main__":
    main()
