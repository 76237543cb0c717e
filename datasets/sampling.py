"""Training patches: the published BraTS patch sampler, seeded and reading only the crop.

`PatchSampler` cuts one patch from a case (the image is usually a read-only np.memmap of the
preprocessed cache; only the crop region is read). `PatchDataset` turns a list of cases into a
torch Dataset whose item i is a pure function of (seed, i), so a resumed run that continues the
index reproduces the same patches.

Published sampler, per patch (all draws from the caller's rng, in this order):
  1. crop size = patch × U(0.9, 1.1) with p = 0.5 (else the patch size), when random_scale;
  2. with p = 0.5 the crop is centred on a random voxel of one of {ET, WT, TC, none} chosen
     uniformly ("none", or an empty region, falls back to the random crop) and shifted to lie
     inside the volume; otherwise a uniform random crop keeping 15 voxels from the H borders
     and 10 from the W borders (margins shrink when the volume is too small for them);
  3. a crop larger than the volume is zero-padded (image 0, label 0 = background);
  4. the crop is resized back to the patch: trilinear for the image, nearest for the labels;
  5. flips, when random_mirror: none with p = 0.3, else one of the 7 non-empty combinations
     of the three axes (p = 0.1 each).
"""
import numpy as np
import torch
import torch.nn.functional as F

from utils.regions import REGIONS, labels_to_regions

CROP_MARGINS = (0, 15, 10)  # voxels kept from the (D, H, W) borders by the random crop
SCALE_RANGE = (0.9, 1.1)
P_SCALE = 0.5
P_FOREGROUND = 0.5
P_NO_FLIP = 0.3


def foreground_locations(label, max_per_region=10000, rng=None):
    """Sampled voxel coordinates of each region, to centre crops without scanning the volume.

    label: uint8 (D, H, W) with values {0, 1, 2, 4} (reads the whole map once).
    Returns a tuple of 3 int32 arrays (n_r, 3) of (d, h, w) coordinates, in ET, WT, TC order,
    n_r = min(voxels of the region, max_per_region) drawn without replacement (as nnU-Net
    stores up to 10 000 locations per class). rng None = a fixed generator, so the result is
    a function of the label alone.
    """
    rng = np.random.default_rng(0) if rng is None else rng
    regions = labels_to_regions(np.asarray(label))
    locations = []
    for mask in regions:
        coords = np.argwhere(mask).astype(np.int32)
        if len(coords) > max_per_region:
            coords = coords[np.sort(rng.choice(len(coords), max_per_region, replace=False))]
        locations.append(coords)
    return tuple(locations)


def _random_start(dim, size, margin, rng):
    """Start of a uniform random crop of `size` along an axis of `dim` voxels.

    The margin shrinks to what the volume allows; a crop larger than the axis gets a random
    negative start (the volume lies somewhere inside the zero-padded crop).
    """
    if size > dim:
        return int(rng.integers(dim - size, 1))
    margin = min(margin, (dim - size) // 2)
    return int(rng.integers(margin, dim - size - margin + 1))


def _centred_start(dim, size, centre):
    """Start of a crop of `size` centred on `centre`, shifted to lie inside the axis."""
    lo, hi = sorted((0, dim - size))  # hi < 0 side when the crop is larger than the axis
    return int(np.clip(centre - size // 2, lo, hi))


def _read_crop(volume, starts, sizes):
    """volume[..., s:s+n, ...] over the last 3 axes, zero outside the volume.

    Slices the (mem-mapped) array to the in-volume part first, so only the crop is read.
    """
    spatial = volume.shape[-3:]
    src, dst = [], []
    for start, size, dim in zip(starts, sizes, spatial):
        lo, hi = max(start, 0), min(start + size, dim)
        src.append(slice(lo, hi))
        dst.append(slice(lo - start, hi - start))
    lead = volume.shape[:-3]
    out = np.zeros(lead + tuple(sizes), dtype=volume.dtype)
    out[(Ellipsis, *dst)] = volume[(Ellipsis, *src)]
    return out


def _nearest_indices(n_in, n_out):
    """Source index of each output voxel for nearest resizing (pixel centres aligned, like
    trilinear with align_corners=False)."""
    return np.minimum(((np.arange(n_out) + 0.5) * n_in / n_out).astype(np.int64), n_in - 1)


class PatchSampler:
    """Published patch sampler: sampler(image, label, rng[, locations]) -> (image, regions).

    image: float32 (4, D, H, W) array or np.memmap; label: uint8 (D, H, W) {0, 1, 2, 4};
    rng: np.random.Generator; locations: `foreground_locations(label)` precomputed per case
    (computed on the fly from the whole label when omitted and a foreground crop is drawn).
    Returns image patch float32 (4, d, h, w) and regions uint8 (3, d, h, w) (ET, WT, TC).
    """

    def __init__(self, patch_size, random_scale=True, random_mirror=True):
        self.patch_size = tuple(int(s) for s in patch_size)
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            raise ValueError(f"patch_size must be 3 positive ints (d, h, w), got {patch_size}")
        self.random_scale = random_scale
        self.random_mirror = random_mirror

    def __call__(self, image, label, rng, locations=None):
        if label is None:
            raise ValueError("PatchSampler needs a label map; this case has none (test case?)")
        if image.ndim != 4 or label.shape != image.shape[1:]:
            raise ValueError(f"image (C, D, H, W) {image.shape} and label (D, H, W) "
                             f"{label.shape} do not match")
        dims = image.shape[1:]

        scale = 1.0
        if self.random_scale and rng.random() < P_SCALE:
            scale = rng.uniform(*SCALE_RANGE)
        sizes = [max(1, int(p * scale)) for p in self.patch_size]

        centre = None
        if rng.random() < P_FOREGROUND:
            choice = int(rng.integers(len(REGIONS) + 1))  # the extra choice is "none"
            if choice < len(REGIONS):
                if locations is None:
                    locations = foreground_locations(label)
                candidates = locations[choice]
                if len(candidates):
                    centre = candidates[rng.integers(len(candidates))]
        if centre is None:
            starts = [_random_start(d, s, m, rng) for d, s, m in zip(dims, sizes, CROP_MARGINS)]
        else:
            starts = [_centred_start(d, s, int(c)) for d, s, c in zip(dims, sizes, centre)]

        patch = _read_crop(image, starts, sizes).astype(np.float32, copy=False)
        crop_label = _read_crop(label, starts, sizes)
        if tuple(sizes) != self.patch_size:
            patch = F.interpolate(torch.from_numpy(patch)[None], size=self.patch_size,
                                  mode="trilinear", align_corners=False)[0].numpy()
            crop_label = crop_label[np.ix_(*[_nearest_indices(s, p) for s, p in
                                             zip(sizes, self.patch_size)])]
        regions = labels_to_regions(crop_label).astype(np.uint8)

        if self.random_mirror and rng.random() >= P_NO_FLIP:
            combo = int(rng.integers(1, 8))  # bit k set = flip spatial axis k
            axes = [k + 1 for k in range(3) if combo >> k & 1]
            patch, regions = np.flip(patch, axes), np.flip(regions, axes)
        return np.ascontiguousarray(patch), np.ascontiguousarray(regions)


class PatchDataset(torch.utils.data.Dataset):
    """Torch Dataset of training patches; item i is a pure function of (seed, i).

    cases: objects with .image (4, D, H, W) and .label (D, H, W) (e.g. datasets.preprocess
    CachedCase memmaps) and preferably .name. Item i takes case perm_e[i % n] where perm_e is
    the permutation of the n cases seeded by (seed, e), e = i // n (each case once per
    "epoch" of n items), and crops it with np.random.default_rng((seed, i)). Foreground
    locations are computed lazily, once per case (per worker process).
    length: number of items (default: one pass over the cases); indices beyond one pass
    continue the stream, so a resumed run asks for items from where it stopped.
    Returns (image float32 tensor (4, d, h, w), regions uint8 tensor (3, d, h, w)).
    """

    def __init__(self, cases, patch_size, random_scale=True, random_mirror=True, seed=0,
                 length=None):
        self.cases = list(cases)
        if not self.cases:
            raise ValueError("PatchDataset needs at least one case")
        for case in self.cases:
            if case.label is None:
                raise ValueError(f"case {getattr(case, 'name', case)} has no label map; "
                                 "training needs labelled cases")
        self.sampler = PatchSampler(patch_size, random_scale, random_mirror)
        self.seed = int(seed)
        self.length = len(self.cases) if length is None else int(length)
        self._locations = {}

    def __len__(self):
        return self.length

    def case_index(self, i):
        n = len(self.cases)
        permutation = np.random.default_rng((self.seed, i // n)).permutation(n)
        return int(permutation[i % n])

    def __getitem__(self, i):
        if not 0 <= i < self.length:
            raise IndexError(f"patch index {i} outside [0, {self.length})")
        c = self.case_index(i)
        case = self.cases[c]
        if c not in self._locations:
            self._locations[c] = foreground_locations(case.label)
        image, regions = self.sampler(case.image, case.label, np.random.default_rng((self.seed, i)),
                                      self._locations[c])
        return torch.from_numpy(image), torch.from_numpy(regions)
