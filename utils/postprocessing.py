"""The published post-processing rules on one label map (postprocess.py's doc lists them).

Label maps are in NIfTI order (X, Y, Z): the bottom-slice rule counts slices from z index 0,
and the K-means rule visits components in raster-scan order of that layout, as the released
script does, so its running NCR count gives the same mask whoever calls it (predict.py
converts its network-order (D, H, W) mask first).
"""
from dataclasses import dataclass

import nibabel as nib
import numpy as np
from scipy import ndimage

from utils.cli import int_at_least, unit_fraction
from utils.regions import ED, ET, NCR

SLICE_AXIS = 2  # z in NIfTI order; index 0 is the lowest slice (see orientation_warning)


@dataclass(frozen=True)
class Rules:
    """Thresholds of the published rules (defaults = published values)."""

    min_component: int = 2000  # voxels
    min_fraction: float = 0.1  # of the largest component
    bottom_slices: int = 25  # z slices, from index 0
    et_threshold: int = 500  # ET voxels in the whole case
    # The K-means rule's trigger (released script; see relabel_edema_as_necrosis).
    kmeans_case_et_ratio: float = 0.12  # ET voxels / tumour voxels of the case, below
    kmeans_component_et_share: float = 0.05  # 4 nET / (nNCR + 2 nED + 4 nET), below
    kmeans_et_value_sum: int = 450  # 4 nET of the component, below (113 ET voxels or more stop it)
    kmeans_max_ncr: int = 10000  # NCR voxels of the case, below


# The rules' thresholds as command-line flags (postprocess.py, predict.py --postprocess).
THRESHOLD_HELP = {
    "min_component": "drop components smaller than this many voxels ...",
    "min_fraction": "... or than this fraction of the largest, whichever is smaller",
    "bottom_slices": "drop components entirely within this many lowest z slices",
    "et_threshold": "relabel ET as NCR when the case has fewer ET voxels than this",
    "kmeans_case_et_ratio": "K-means rule: fires when the case's ET / tumour voxels are below this",
    "kmeans_component_et_share": "... and the component's 4nET/(nNCR+2nED+4nET) below this",
    "kmeans_et_value_sum": "... and the component's 4nET below this",
    "kmeans_max_ncr": "... and the case's NCR voxels so far below this",
}


def add_threshold_args(group, kmeans):
    """--min_component, --min_fraction, --bottom_slices, --et_threshold (published defaults),
    and the K-means rule's --kmeans_* thresholds in `kmeans` (an argument group). Every integer
    threshold counts voxels or slices (>= 0; a negative --bottom_slices counted from the top and
    removed every tumour); every float one is a share of voxels or label values, in [0, 1]."""
    for name, help_text in THRESHOLD_HELP.items():
        default = getattr(Rules, name)
        (kmeans if name.startswith("kmeans_") else group).add_argument(
            f"--{name}", type=int_at_least(0) if isinstance(default, int) else unit_fraction,
            default=default, help=f"{help_text} (default %(default)s)")


def unused_threshold(args, postprocess, kmeans):
    """A message for the first threshold flag set to other than its default that would change
    nothing (the rules off, or a --kmeans_* one without the K-means rule), else None."""
    for name in THRESHOLD_HELP:
        if getattr(args, name) == getattr(Rules, name):
            continue
        of_kmeans = name.startswith("kmeans_")
        needed = [flag for flag, on in (("--kmeans_necrosis", kmeans or not of_kmeans),
                                        ("--postprocess", postprocess)) if not on]
        if needed:
            rule = "the K-means rule" if of_kmeans else "post-processing"
            return f"--{name} is a threshold of {rule}: add {' '.join(needed)}"
    return None


def rules_from_args(args):
    """The Rules that add_threshold_args' flags set."""
    return Rules(**{name: getattr(args, name) for name in THRESHOLD_HELP})


def bottom_rule_applies(shape, rules=Rules()):
    """False on a volume too thin for the bottom-slice rule: every component would lie in it."""
    return shape[SLICE_AXIS] > rules.bottom_slices


def _components(label, rules):
    """Whole-tumour components of `label` and which of them rule 1 drops.

    Components: label > 0, 6-connected (face neighbours), as published: skimage's
    label(neighbors=4) means connectivity 1 in 3D. A component is dropped if its size <
    min(rules.min_component, rules.min_fraction * largest size), or if all its voxels have
    z index < rules.bottom_slices (skipped when not bottom_rule_applies).
    Returns (components: int array like label, 0 outside; drop: bool per component index).
    """
    components, count = ndimage.label(label > 0, structure=ndimage.generate_binary_structure(label.ndim, 1))
    sizes = np.bincount(components.ravel(), minlength=count + 1)
    sizes[0] = 0
    drop = sizes < min(rules.min_component, rules.min_fraction * sizes.max())
    if bottom_rule_applies(label.shape, rules):
        # A component reaching any slice at or above bottom_slices is not bottom-only.
        upper = components[:, :, rules.bottom_slices:]  # z >= bottom_slices
        reaches_up = np.zeros(count + 1, dtype=bool)
        reaches_up[np.unique(upper)] = True
        drop |= ~reaches_up
    drop[0] = False  # background stays background
    return components, drop


def remove_components(label, rules=Rules()):
    """Drop small or bottom-only whole-tumour components (see _components).
    label (X, Y, Z) uint8 -> (cleaned copy, number of components removed)."""
    components, drop = _components(label, rules)
    cleaned = label.copy()
    cleaned[drop[components]] = 0
    return cleaned, int(drop.sum())


def three_means(values, weights):
    """1-D k-means with k = 3, solved exactly: the split of sorted scalars into 3 runs of
    consecutive values with the least weighted squared error around their means (k-means'
    clusters of scalars are such runs). The released script approximates it with cv2.kmeans
    (3 random starts of at most 10 Lloyd steps), whose answer depends on the draw.

    values (n,) sorted, distinct, n >= 3; weights (n,) > 0 -> (i, j): the runs are
    values[:i], values[i:j], values[j:], the first such pair (least i, then j) of least error.
    n is the number of distinct T1ce intensities of one component's edema: a few thousand for
    BraTS's integer images, up to the edema's voxel count for float ones (~10^5), so trying
    every pair, O(n^2), could take minutes. The best j for a first split i never decreases as
    i grows (runs' squared errors satisfy the quadrangle inequality, as in Wang and Song's
    Ckmeans.1d.dp): splitting the range of i in halves, each half searches only its side of
    the middle i's j, O(n log n) in all.
    """
    if len(values) < 3:
        raise ValueError(f"3 clusters need 3 distinct values, got {values}")
    # Prefix sums give any run's weighted squared error in O(1): sum w v^2 - (sum w v)^2 / sum w.
    w, wv, wvv = (np.concatenate([[0.0], np.cumsum(x)])
                  for x in (weights, weights * values, weights * values * values))
    sse = lambda a, b: wvv[b] - wvv[a] - (wv[b] - wv[a]) ** 2 / (w[b] - w[a])
    n = len(values)
    error, best_j = np.full(n - 1, np.inf), np.zeros(n - 1, dtype=np.int64)  # by first split i
    ranges = [(1, n - 2, 2, n - 1)]  # first splits lo..hi, their second splits jlo..jhi
    while ranges:
        lo, hi, jlo, jhi = ranges.pop()
        if hi - lo < 32:  # a few first splits: all their pairs at once
            i = np.arange(lo, hi + 1)[:, None]
            j = np.maximum(np.arange(jlo, jhi + 1), i + 1)  # j > i: runs are never empty
            pairs = sse(0, i) + sse(i, j) + sse(j, n)
            k = pairs.argmin(axis=1)
            error[lo:hi + 1], best_j[lo:hi + 1] = pairs[np.arange(len(k)), k], j[np.arange(len(k)), k]
            continue
        mid = (lo + hi) // 2
        j = np.arange(max(jlo, mid + 1), jhi + 1)
        pairs = sse(0, mid) + sse(mid, j) + sse(j, n)
        k = int(pairs.argmin())
        error[mid], best_j[mid] = pairs[k], j[k]
        ranges += [(lo, mid - 1, jlo, j[k]), (mid + 1, hi, j[k], jhi)]
    i = int(error[1:].argmin()) + 1
    return i, int(best_j[i])


def _middle_edema(t1ce_edema, outside):
    """Which edema voxels fall in the middle of 3 T1ce clusters -> bool (n,), or None when
    there are fewer than 3 distinct intensities to cluster.

    The released script clusters the whole volume with every voxel outside the edema set to 0;
    the same clustering, done on the distinct values weighted by their counts (0 weighing
    `outside` voxels more), costs the edema's size instead of the volume's. Its brightest
    cluster is discarded and the next one, the middle, kept.
    """
    values, inverse = np.unique(np.append(t1ce_edema.astype(np.float64), 0.0), return_inverse=True)
    if len(values) < 3:
        return None
    weights = np.bincount(inverse, np.append(np.ones(len(t1ce_edema)), outside))
    i, j = three_means(values, weights)
    return (inverse[:-1] >= i) & (inverse[:-1] < j)


def relabel_edema_as_necrosis(label, cleaned, t1ce, rules=Rules()):
    """The released script's K-means rule (step 2 of the module doc), made deterministic.

    label: the mask before remove_components; cleaned: after it; t1ce: the case's raw T1ce on
    the same grid. The released loop visits the components of `label` in raster-scan order
    (skimage's and scipy's labelling order); for each component kept by rule 1 it fires when
    all of these hold:
      * the case's ET voxels / tumour voxels (of `label`, before rule 1) < kmeans_case_et_ratio;
      * the component's ET share, as the script computes it from label values (4 per ET voxel,
        2 per edema voxel, 1 per NCR voxel), 4 nET / (nNCR + 2 nED + 4 nET), < kmeans_component_et_share;
      * 4 nET < kmeans_et_value_sum (so fewer than 113 ET voxels with the published 450);
      * the NCR voxels of the case so far (rule 1's removals of earlier components and the
        relabelling of earlier components counted, as in the script's running label) < kmeans_max_ncr.
    It then clusters the T1ce of the component's edema (and 0 for every other voxel, as the
    script does) into 3 groups and relabels the middle group's edema voxels as NCR (1).
    Unlike the released script the clustering is solved exactly (three_means), so the result
    depends on no random draw, and a component without edema, or with fewer than 3 distinct
    intensities to cluster, is left unchanged (the script then relabels every voxel of its
    middle cluster: the whole volume when there is no edema, all centres being 0).
    Returns (new cleaned, voxels relabelled).
    """
    tumour = np.count_nonzero(label)
    if tumour == 0 or np.count_nonzero(label == ET) / tumour >= rules.kmeans_case_et_ratio:
        return cleaned, 0
    components, drop = _components(label, rules)
    ncr = np.count_nonzero(label == NCR)
    out = cleaned.copy()
    relabelled = 0
    for index, box in enumerate(ndimage.find_objects(components), start=1):
        part = components[box] == index
        counts = np.bincount(label[box][part], minlength=ET + 1)
        if drop[index]:
            ncr -= counts[NCR]
            continue
        # the script's sum of label values: each voxel counts its label (ET 4, ED 2, NCR 1)
        value_sum = NCR * counts[NCR] + ED * counts[ED] + ET * counts[ET]
        if not (ET * counts[ET] / value_sum < rules.kmeans_component_et_share
                and ET * counts[ET] < rules.kmeans_et_value_sum and ncr < rules.kmeans_max_ncr):
            continue
        edema = part & (label[box] == ED)
        if not edema.any():
            continue
        middle = _middle_edema(t1ce[box][edema], label.size - np.count_nonzero(edema))
        if middle is None:
            continue
        window = out[box]  # a view: writing it writes `out`
        window[tuple(axis[middle] for axis in np.nonzero(edema))] = NCR
        relabelled += int(middle.sum())
        ncr += int(middle.sum())
    return out, relabelled


def relabel_small_et(label, rules=Rules()):
    """ET (4) -> NCR (1) when the case has fewer than rules.et_threshold ET voxels.

    Returns (new label, whether ET was relabelled). A case without ET is returned unchanged.
    """
    et = label == ET
    et_voxels = int(et.sum())
    if et_voxels == 0 or et_voxels >= rules.et_threshold:
        return label.copy(), False
    cleaned = label.copy()
    cleaned[et] = NCR
    return cleaned, True


def postprocess_label(label, rules=Rules(), t1ce=None, name="mask"):
    """The rules in the published order. label (X, Y, Z) uint8 in {0,1,2,4}; t1ce: the raw
    T1ce on the same grid to apply the K-means rule, None to skip it; name: for the warnings.

    Returns (label, info): info counts what each rule did and lists warnings (a skipped
    bottom-slice rule, all tumour removed).
    """
    warnings = []
    if rules.bottom_slices and not bottom_rule_applies(label.shape, rules):
        warnings.append(f"{name}: {label.shape[SLICE_AXIS]} slices, not more than the "
                        f"{rules.bottom_slices} bottom slices: the bottom-slice rule is skipped "
                        "(it would remove every component)")
    cleaned, removed = remove_components(label, rules)
    necrosis = 0
    if t1ce is not None:
        cleaned, necrosis = relabel_edema_as_necrosis(label, cleaned, t1ce, rules)
    cleaned, et_relabelled = relabel_small_et(cleaned, rules)
    if label.any() and not cleaned.any():
        warnings.append(f"{name}: all {np.count_nonzero(label)} tumour voxels removed "
                        f"({removed} component(s) too small or in the lowest "
                        f"{rules.bottom_slices} slices)")
    return cleaned, {"components_removed": removed, "necrosis_relabelled": necrosis,
                     "et_relabelled": et_relabelled, "warnings": warnings}


def orientation_warning(affine, name):
    """A warning (str) when the z axis of `affine` does not point superior, else None."""
    if nib.aff2axcodes(affine)[2] == "S":
        return None
    return (f"{name}: z axis is not inferior->superior; the bottom-slice rule removes "
            "components at the smallest z index regardless")
