"""The published per-modality intensity normalisation, as a literal reference and a fast twin.

Published formula (the released preprocessing), for one modality volume `v`:
  1. histogram of `v` with `int(v.max())` bins over [v.min(), v.max()];
  2. `top` = index of the last bin holding at least 50 voxels, used directly as an intensity
     (BraTS volumes start at 0, so bins are one unit wide);
  3. clip `v` to at most `top`;
  4. background = the corner voxel `v[0,0,0]`; all other voxels are z-scored with their own
     mean and std; background voxels become 0.

`normalize_published` is that formula with `np.histogram`. It is slow because the histogram
has one bin per intensity unit and walks every voxel. `normalize` returns bit-identical
output: it finds `top` by counting only the brightest voxels with numpy's own bin-index
arithmetic (see `_bin_indices`), and clips and z-scores only the foreground voxels.

The cache stores source intensities and each volume's `normalization_params` (PARAMS: top,
background, mean, std); `apply_normalization` is the torch twin of normalize's last step,
for a whole volume or any crop of it on any device (the training GPU normalises each
patch), with the same float32 operations in the same order.

All work in float32 (the dtype `datasets.brats.load_case` returns); other inputs are cast
first. Inputs on which the published code would crash, run out of memory or produce NaN
(non-finite values, max < 1 so zero bins, max > MAX_BINS, no bin with 50 voxels, constant
foreground) raise NormalizationError.
"""
import numpy as np
import torch

from datasets.brats import PLACEHOLDER_FIX, CaseError
from utils.modalities import MODALITIES

NAME = "published-histogram-zscore"
VERSION = 1
MIN_COUNT = 50  # published: a bin needs this many voxels to count as signal
PARAMS = ("top", "background", "mean", "std")  # per volume, see normalization_params
# Most one-unit histogram bins allowed (int16 MRI needs at most 32 767). Above 2**24, float32
# values lie more than one unit apart, so numpy refuses one-unit bins, and a single spike of
# 2e9 asked for 7.45 GiB; at 2**24, normalize takes ~40 MB more than at 1 000 (240x240x155).
MAX_BINS = 2**24


class NormalizationError(ValueError):
    """The published normalisation is undefined on this volume."""


def _num_bins(vmin, vmax):
    """int(v.max()) as published, refusing the volumes np.histogram would reject or misread."""
    if not (np.isfinite(vmin) and np.isfinite(vmax)):
        raise NormalizationError(f"volume has non-finite values (min {vmin}, max {vmax})")
    # Only training normalises every modality file: eval.py and predict.py drop a placeholder
    # first (is_placeholder), so the fix is training's.
    if vmin == vmax == 0:
        raise NormalizationError("every voxel is 0: an empty volume, such as the placeholder of "
                                 f"a missing modality; {PLACEHOLDER_FIX}")
    if int(vmax) < 1:
        raise NormalizationError(
            f"volume maximum {vmax} < 1: the published histogram would have int(max) = "
            f"{int(vmax)} bins (an empty or all-background modality?)"
        )
    if vmin == vmax:
        raise NormalizationError(f"every voxel is {vmax:g}: a constant volume (an empty modality?)")
    if int(vmax) > MAX_BINS:
        raise NormalizationError(
            f"volume maximum {vmax:.8g} is above {MAX_BINS} (2**24), the most one-unit histogram "
            "bins allowed: a stray bright voxel, or intensities not on the scanner's scale? "
            "Check the file, or rescale it to the scanner's range (BraTS: int16)"
        )
    return int(vmax)


def _too_many_bins(error, vmin, vmax):
    """numpy's 'Too many bins' (one-unit bins narrower than float32 spacing) as a
    NormalizationError."""
    return NormalizationError(
        f"intensities span only [{vmin:.8g}, {vmax:.8g}]: the published histogram's "
        f"{int(vmax)} bins of that range are finer than float32 can tell apart ({error}); "
        "use the scanner's intensities (as BraTS's int16 files), not a rescaled image"
    )


def _constant_foreground(fg, top):
    """The NormalizationError of a foreground of one value (std 0): a mask or a placeholder."""
    return NormalizationError(f"foreground is constant ({fg[0]:g}, clipped at {top:g} as "
                              "published): its std is 0: not an MRI scan (a mask, a "
                              f"placeholder)? Give the scan; if the modality is missing, "
                              f"{PLACEHOLDER_FIX}")


def _check_foreground(v, fg, top):
    """NormalizationError when clipping v (the volume as given) at `top` left no foreground
    (fg), saying the likely cause: a 2-D slice, too few voxels for the intensity levels (an
    almost empty volume), or else too few levels (a float image scaled to [0, 1])."""
    if fg.size:
        return
    levels = int(v.max())  # the published histogram's one-unit bins
    signal = np.count_nonzero(v != v[(0,) * v.ndim])  # voxels other than the background
    if 1 in v.shape:
        cause = ("; a dimension of size 1: a 2-D slice? BraTS cases are 3-D volumes; give the "
                 "whole volume")
    elif signal < MIN_COUNT * levels:  # fewer than MIN_COUNT per level, on average
        cause = (f"; only {signal} voxels differ from the background, over {levels} intensity "
                 "levels: too few to normalise (an almost empty volume?); check that the file "
                 "holds the whole scan")
    else:
        cause = (" (e.g. a float image scaled to [0, 1]); use the scanner's intensities (as "
                 "BraTS's int16 files), not a rescaled image")
    raise NormalizationError(
        f"clipped at {top:g} as published (the last intensity level holding {MIN_COUNT} "
        "voxels), every voxel equals the background: no level above the background holds "
        f"{MIN_COUNT} voxels{cause}"
    )


def normalize_published(v):
    """Reference: the published formula, literally. v (D,H,W) -> float32 (D,H,W)."""
    v = np.asarray(v, dtype=np.float32)
    vmin, vmax = v.min(), v.max()
    nbins = _num_bins(vmin, vmax)  # int(v.max())
    try:
        hist, _ = np.histogram(v, nbins)
    except ValueError as error:
        raise _too_many_bins(error, vmin, vmax) from None
    full = np.nonzero(hist >= MIN_COUNT)[0]
    if full.size == 0:
        raise NormalizationError(f"no histogram bin holds {MIN_COUNT} voxels")
    top = int(full[-1])
    clipped = np.minimum(v, np.float32(top))  # float32(top): keep float32 (NEP 50 would promote)
    background = clipped[(0,) * v.ndim]
    mask = clipped != background
    fg = clipped[mask]
    _check_foreground(v, fg, top)
    mean, std = fg.mean(), fg.std()
    if not std > 0:
        raise _constant_foreground(fg, top)
    out = np.zeros_like(v)
    out[mask] = (fg - mean) / std
    return out


def _bin_indices(x, edges):
    """np.histogram's bin index of each value of x, computed exactly as numpy computes it.

    Mirrors the uniform-bin path of numpy.lib._histograms_impl.histogram (numpy 1.24-2.x):
    a scaled estimate, truncated, then corrected by one bin where rounding put a value on
    the wrong side of an edge; the last bin includes its right edge. x must lie in
    [edges[0], edges[-1]]. Each step is monotone in x, so the index is a non-decreasing
    function of the value — `_top_bin` relies on that.
    """
    n = len(edges) - 1
    first, last = edges[0], edges[-1]
    x = x.astype(edges.dtype, copy=False)
    indices = ((np.subtract(x, first) / np.subtract(last, first)) * n).astype(np.intp)
    indices[indices == n] -= 1
    indices[x < edges[indices]] -= 1
    indices[(x >= edges[indices + 1]) & (indices != n - 1)] += 1
    return indices


def _top_bin(flat, edges, thresholds=(0.99, 0.9, 0.5)):
    """Index of the last histogram bin holding >= MIN_COUNT voxels, counting from the top.

    For a threshold t, voxels below t fall in bins <= bin(t) (monotone index), so the
    counts of bins above bin(t) come exactly from the voxels >= t — a small set when t is
    a high quantile (estimated on a strided sample). If no such bin is full, lower t; the
    last resort counts every voxel.
    """
    sample = flat[:: max(1, flat.size // 100_000)]
    ranks = [int(q * (sample.size - 1)) for q in thresholds]
    sample = np.partition(sample, ranks)
    for rank in ranks:
        t = sample[rank]
        floor = _bin_indices(np.array([t]), edges)[0]
        bright = flat[flat >= t]
        idx = _bin_indices(bright, edges)
        counts = np.bincount(idx[idx > floor] - (floor + 1))
        full = np.nonzero(counts >= MIN_COUNT)[0]
        if full.size:
            return int(floor + 1 + full[-1])
    full = np.nonzero(np.bincount(_bin_indices(flat, edges)) >= MIN_COUNT)[0]
    if full.size == 0:
        raise NormalizationError(f"no histogram bin holds {MIN_COUNT} voxels")
    return int(full[-1])


def _parameters_and_foreground(v):
    """(PARAMS float32 (4,), foreground mask, foreground values after clipping) of a float32
    volume, each computed exactly as `normalize_published` computes it."""
    vmin, vmax = v.min(), v.max()
    nbins = _num_bins(vmin, vmax)
    try:  # the same edges, and the same refusal, as np.histogram(v, nbins)
        edges = np.histogram_bin_edges(v, nbins, range=(vmin, vmax))
    except ValueError as error:
        raise _too_many_bins(error, vmin, vmax) from None
    top = np.float32(_top_bin(v.reshape(-1), edges))
    corner = v[(0,) * v.ndim]
    if corner < top:
        # Clipping maps no voxel onto the background value nor away from it, so the mask
        # can be taken before clipping and only the foreground needs clipping: the same
        # values, in the same order, as the reference's v[mask] after clipping.
        background = corner
        mask = v != corner
        fg = np.minimum(v[mask], top)
    else:  # the corner is clipped to `top`: the foreground is what clipping leaves alone
        background = top
        mask = v < top
        fg = v[mask]
    _check_foreground(v, fg, top)
    mean, std = fg.mean(), fg.std()  # same reductions in the same order as the reference
    if not std > 0:
        raise _constant_foreground(fg, top)
    return np.array([top, background, mean, std], np.float32), mask, fg


def normalization_params(v):
    """The published normalisation's parameters of one volume v (D,H,W) -> float32 (4,) PARAMS:
    the clip value `top`, the background value (the corner voxel after clipping), and the
    mean and std of the other voxels after clipping."""
    return _parameters_and_foreground(np.asarray(v, dtype=np.float32))[0]


def normalize(v):
    """Fast, bit-identical `normalize_published`. v (D,H,W) -> float32 (D,H,W)."""
    v = np.asarray(v, dtype=np.float32)
    (_, _, mean, std), mask, fg = _parameters_and_foreground(v)
    out = np.zeros(v.shape, np.float32)
    out[mask] = (fg - mean) / std  # only the foreground is computed and written
    return out


def foreground(x, params):
    """The voxels the normalisation z-scores: x clipped at `top` differs from the background.

    x: float32 tensor (..., D, H, W); params: float32 tensor (..., 4) of PARAMS on x's device,
    one row per volume (e.g. x (B, C, D, H, W) and params (B, C, 4)).
    Returns (clipped x, bool mask), both shaped like x.
    """
    top, background = (params[..., k, None, None, None] for k in range(2))
    x = torch.minimum(x, top)
    return x, x != background


def apply_normalization(x, params):
    """Normalise x with its channels' PARAMS, in torch, on any device.

    x: float32 tensor (..., D, H, W) of source intensities; params: float32 tensor (..., 4),
    as for `foreground`. Bit-identical to `normalize` (so to `normalize_published`) on the
    same voxels: the same float32 operations (clip, compare, subtract, divide) in the same
    order. The divisor is a tensor on x's
    device on purpose: CUDA divides by a CPU scalar as a multiplication by its
    reciprocal, which can differ in the last bit.
    """
    # foreground() returns a new tensor: the in-place steps leave the input alone and save
    # three volume-sized temporaries (3x faster on a CPU).
    x, mask = foreground(x, params)
    mean, std = (params[..., k, None, None, None] for k in (2, 3))
    return x.sub_(mean).div_(std).masked_fill_(mask.logical_not_(), 0.0)


def normalize_image(image, fn=normalize):
    """Normalise each modality of image (C,D,H,W) independently -> float32 (C,D,H,W).

    Every channel must be a normalisable volume (a case with a missing modality:
    `normalize_case`). fn is the per-volume function: fn=normalize_published is the literal
    reference the tests compare the cache and the training crops with."""
    return np.stack([fn(channel) for channel in image])


def _per_modality(case, fn):
    """Yield (c, fn(modality c)) over the modalities a loaded case has (case.available); a
    failure names the case and file."""
    for c in case.available:
        try:
            yield c, fn(case.image[c])
        except NormalizationError as err:
            raise CaseError(case.name, case.files[MODALITIES[c]], f"cannot normalise: {err}") from err


def normalize_case(case):
    """A loaded case's image (4,D,H,W) normalised per modality; a failure names the case and file.

    Only the modalities read from files (case.available) are normalised: a missing one's
    channel stays zero, which is how the network is told it is missing (the published
    formula is undefined on an all-zero volume).
    """
    image = np.zeros_like(case.image, dtype=np.float32)
    for c, channel in _per_modality(case, normalize):
        image[c] = channel
    return image


def case_params(case):
    """A loaded case's PARAMS per modality -> float32 (4, 4); a failure names the case and file.
    For the cache, whose cases have all four modalities (load_case's default)."""
    return np.stack([params for _, params in _per_modality(case, normalization_params)])
