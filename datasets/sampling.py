"""Training patches: the published BraTS patch sampler, split between CPU workers and the device.

A DataLoader worker only cuts crops: `PatchDataset[i]` draws the crop (`PatchSampler`) and
copies its source intensities and labels out of the memory-mapped cache (datasets.preprocess;
only the crop is read). `PatchDataset.to_device` then normalises, resizes and flips the batch on
the training device. Item i, and so the finished patch, is a pure function of (seed, i): a
resumed run that continues the index reproduces the same patches; `IterationSampler` gives
each iteration and rank its indices.

Published sampler, per patch (all draws from the item's rng, in this order):
  1. crop size = patch × U(0.9, 1.1) with p = 0.5 (else the patch size), when random_scale;
  2. with p = 0.5 the crop is centred on a random voxel of one of {ET, WT, TC, none} chosen
     uniformly ("none", or an empty region, falls back to the random crop) and shifted to lie
     inside the volume; otherwise a uniform random crop keeping 15 voxels from the H borders
     and 10 from the W borders (margins shrink when the volume is too small for them);
  3. a crop larger than the volume is zero-padded (normalised image 0, label 0 = background);
  4. the crop is resized back to the patch: trilinear for the image, nearest for the labels;
  5. flips, when random_mirror: none with p = 0.3, else one of the 7 non-empty combinations
     of the three axes (p = 0.1 each).
The worker draws 1, 2 and 5 and reads the crop; the device pads (3) by normalisation — the
worker fills what lies outside the cached box or the volume with each modality's background
value, which normalises to exactly 0 — then resizes (4) and flips (5). On a CPU this gives
bit for bit the patch the whole-volume path gives: normalise, crop, resize, flip.
"""
import math
import os
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from datasets.normalize import apply_normalization
from utils import speed
from utils.regions import REGIONS, labels_to_regions
from utils.workers import available_cpus

CROP_MARGINS = (0, 15, 10)  # voxels kept from the (D, H, W) borders by the random crop
SCALE_RANGE = (0.9, 1.1)
P_SCALE = 0.5
P_FOREGROUND = 0.5
P_NO_FLIP = 0.3
# Label value -> its (ET, WT, TC) membership, from the one definition in utils.regions.
REGION_TABLE = np.ascontiguousarray(labels_to_regions(np.arange(256, dtype=np.uint8)).T, np.uint8)
AUTO_WORKERS_MAX = 4  # auto sizing: one worker cuts crops far faster than a GPU step uses them
IN_FLIGHT_BATCHES = 8  # auto sizing: batches prepared ahead, over all workers


def foreground_locations(label, max_per_region=10000):
    """Sampled voxel coordinates of each region, to centre crops without scanning the volume.

    label: uint8 (D, H, W) with values {0, 1, 2, 4} (reads the whole map once).
    Returns a tuple of 3 int32 arrays (n_r, 3) of (d, h, w) coordinates, in ET, WT, TC order,
    n_r = min(voxels of the region, max_per_region) drawn without replacement (as nnU-Net
    stores up to 10 000 locations per class). The draws come from a generator seeded with 0,
    one per call, so the result is a function of the label alone.
    """
    rng = np.random.default_rng(0)
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


def read_crop(volume, offset, starts, out):
    """Copy into `out` the part of a crop that lies in a stored box; returns out.

    volume (..., d, h, w): the stored box (e.g. a memmap), whose first voxel is `offset` of the
    full volume; out (..., n_d, n_h, n_w): the crop whose first voxel is `starts` (full-volume
    coordinates, may be negative). Only the overlap is read; out keeps its values elsewhere.
    """
    src, dst = [], []
    for start, size, first, length in zip(starts, out.shape[-3:], offset, volume.shape[-3:]):
        lo, hi = max(start, first), min(start + size, first + length)
        if lo >= hi:
            return out
        src.append(slice(lo - first, hi - first))
        dst.append(slice(lo - start, hi - start))
    out[(Ellipsis, *dst)] = volume[(Ellipsis, *src)]
    return out


def _nearest_indices(n_in, n_out):
    """Source index of each output voxel for nearest resizing (pixel centres aligned, like
    trilinear with align_corners=False)."""
    return np.minimum(((np.arange(n_out) + 0.5) * n_in / n_out).astype(np.int64), n_in - 1)


class Crop(NamedTuple):
    starts: tuple  # (d, h, w) of the crop's first voxel in the volume (negative: padded)
    sizes: tuple  # (d, h, w) before resizing to the patch
    flips: tuple  # (d, h, w) bools: flip that axis of the resized patch


class PatchSampler:
    """The published crop draws (module docstring): sampler(shape, rng, locations) -> Crop.

    shape: (D, H, W) of the volume; rng: np.random.Generator; locations: the case's
    `foreground_locations` (ET, WT, TC coordinate arrays, possibly empty).
    """

    def __init__(self, patch_size, random_scale=True, random_mirror=True):
        self.patch_size = tuple(int(s) for s in patch_size)
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            raise ValueError(f"patch_size must be 3 positive ints (d, h, w), got {patch_size}")
        self.random_scale = random_scale
        self.random_mirror = random_mirror

    @property
    def max_size(self):
        """The largest crop this sampler draws, per axis."""
        if not self.random_scale:
            return self.patch_size
        # int(p * scale) <= int(p * 1.1) for any scale <= 1.1: float products are monotone
        return tuple(max(p, int(p * SCALE_RANGE[1])) for p in self.patch_size)

    def __call__(self, shape, rng, locations):
        scale = 1.0
        if self.random_scale and rng.random() < P_SCALE:
            scale = rng.uniform(*SCALE_RANGE)
        sizes = [max(1, int(p * scale)) for p in self.patch_size]

        centre = None
        if rng.random() < P_FOREGROUND:
            choice = int(rng.integers(len(REGIONS) + 1))  # the extra choice is "none"
            if choice < len(REGIONS) and len(locations[choice]):
                candidates = locations[choice]
                centre = candidates[rng.integers(len(candidates))]
        if centre is None:
            starts = [_random_start(d, s, m, rng) for d, s, m in zip(shape, sizes, CROP_MARGINS)]
        else:
            starts = [_centred_start(d, s, int(c)) for d, s, c in zip(shape, sizes, centre)]

        flips = (False,) * 3
        if self.random_mirror and rng.random() >= P_NO_FLIP:
            combo = int(rng.integers(1, 8))  # bit k set = flip spatial axis k
            flips = tuple(bool(combo >> k & 1) for k in range(3))
        return Crop(tuple(starts), tuple(sizes), flips)


class IterationSampler(torch.utils.data.Sampler):
    """Patch indices for iterations [start, stop): iteration i, rank r, sample j gets item
    (i * world_size + r) * batch_size + j. The patch stream is a function of the iteration,
    so a resumed run draws exactly the patches the uninterrupted run would have drawn."""

    def __init__(self, start, stop, batch_size, rank, world_size):
        self.start, self.stop = start, stop
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size

    def __iter__(self):
        for i in range(self.start, self.stop):
            first = (i * self.world_size + self.rank) * self.batch_size
            yield from range(first, first + self.batch_size)

    def __len__(self):
        return (self.stop - self.start) * self.batch_size


class PatchDataset(torch.utils.data.Dataset):
    """Torch Dataset of training crops; item i is a pure function of (seed, i).

    cases: datasets.preprocess.CachedCase objects (labelled). Item i takes case perm_e[i % n]
    where perm_e is the permutation of the n cases seeded by (seed, e), e = i // n (each case
    once per "epoch" of n items), and draws its crop with np.random.default_rng((seed, i)).
    length: number of items (default: one pass over the cases); indices beyond one pass
    continue the stream, so a resumed run asks for items from where it stopped.

    An item is a dict of CPU tensors of fixed shapes (so the default collate batches them);
    `to_device` turns a batch into patches. M = the sampler's max_size:
      image  (4, *M) source intensities (int16, or float32 if a case stores float32): the crop
             in [:, :n_d, :n_h, :n_w], each modality's background value where the crop leaves
             the cached box; the rest 0 and unused
      label  uint8 (*M): the crop's labels in [:n_d, :n_h, :n_w], 0 elsewhere
      size   int64 (3,) crop size (n_d, n_h, n_w);  flip bool (3,);  params float32 (4, 4)
    """

    def __init__(self, cases, patch_size, random_scale=True, random_mirror=True, seed=0,
                 length=None):
        self.cases = list(cases)
        if not self.cases:
            raise ValueError("PatchDataset needs at least one case")
        for case in self.cases:
            if case.label is None:
                raise ValueError(f"case {case.name} has no label map; training needs labelled cases")
        self.sampler = PatchSampler(patch_size, random_scale, random_mirror)
        self.patch_size = self.sampler.patch_size
        self.dtype = np.result_type(*(case.raw.dtype for case in self.cases))
        self.seed = int(seed)
        self.length = len(self.cases) if length is None else int(length)

    def __len__(self):
        return self.length

    def case_index(self, i):
        n = len(self.cases)
        permutation = np.random.default_rng((self.seed, i // n)).permutation(n)
        return int(permutation[i % n])

    def crop(self, i):
        """(case, Crop) of item i."""
        if not 0 <= i < self.length:
            raise IndexError(f"patch index {i} outside [0, {self.length})")
        case = self.cases[self.case_index(i)]
        return case, self.sampler(case.shape, np.random.default_rng((self.seed, i)), case.locations)

    def __getitem__(self, i):
        case, crop = self.crop(i)
        image = np.zeros((len(case.raw), *self.sampler.max_size), self.dtype)
        label = np.zeros(self.sampler.max_size, np.uint8)
        inside = tuple(slice(0, n) for n in crop.sizes)
        background = case.params[:, 1, None, None, None]  # PARAMS[1]: normalises to 0
        image[(slice(None), *inside)] = background
        read_crop(case.raw, case.offset, crop.starts, image[(slice(None), *inside)])
        read_crop(case.label, case.offset, crop.starts, label[inside])
        return {"image": torch.from_numpy(image), "label": torch.from_numpy(label),
                "size": torch.tensor(crop.sizes), "flip": torch.tensor(crop.flips),
                "params": torch.from_numpy(np.asarray(case.params, np.float32))}

    def to_device(self, batch, device):
        """Finish a collated batch on `device`: normalise, resize to the patch, flip.

        Returns image float32 (B, 4, *patch) and regions uint8 (B, 3, *patch) (ET, WT, TC).
        """
        image = batch["image"].to(device, non_blocking=True)
        label = batch["label"].to(device, non_blocking=True)
        params = batch["params"].to(device, non_blocking=True)
        table = speed.to_device(REGION_TABLE, device)  # host copies that do not wait for the device
        images, regions = [], []
        # size and flip stay on the CPU: reading them does not wait for the device
        for b, (size, flip) in enumerate(zip(batch["size"].tolist(), batch["flip"].tolist())):
            inside = tuple(slice(0, n) for n in size)
            x = apply_normalization(image[b][(slice(None), *inside)].float(), params[b])
            r = table[label[b][inside].long()].movedim(-1, 0)  # (3, n_d, n_h, n_w)
            if tuple(size) != self.patch_size:
                x = F.interpolate(x[None], size=self.patch_size, mode="trilinear",
                                  align_corners=False)[0]
                for axis, (n_in, n_out) in enumerate(zip(size, self.patch_size)):
                    index = speed.to_device(_nearest_indices(n_in, n_out), device)
                    r = r.index_select(axis + 1, index)
            dims = [axis + 1 for axis in range(3) if flip[axis]]
            images.append(x.flip(dims))
            regions.append(r.flip(dims))
        return torch.stack(images), torch.stack(regions)


def loader_options(num_workers, device):
    """DataLoader keyword arguments for PatchDataset on `device`, sized from the machine.

    num_workers >= 0 is used as given (0: crops are cut in the main process). num_workers < 0
    sizes it: the CPUs this process may use, shared with the other processes torchrun started
    on this machine (LOCAL_WORLD_SIZE), less one for the main process, at most
    AUTO_WORKERS_MAX. Workers persist between iterators and together keep IN_FLIGHT_BATCHES
    batches ready; batches are pinned for an asynchronous copy when the device is a GPU.
    """
    if num_workers < 0:
        per_process = available_cpus() // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
        num_workers = max(0, min(AUTO_WORKERS_MAX, per_process - 1))
    options = {"num_workers": num_workers, "pin_memory": torch.device(device).type == "cuda"}
    if num_workers:
        options.update(persistent_workers=True,
                       prefetch_factor=max(2, math.ceil(IN_FLIGHT_BATCHES / num_workers)))
    return options
