"""Segmentation metrics with the BraTS challenge's conventions, as pure functions on numpy arrays.

Every function takes binary masks of the same shape (any number of dimensions; bool or 0/1),
returns a Python float, and documents its empty-mask cases:

    metric        both empty   only gt empty   only pred empty
    dice             1.0           0.0              0.0
    hd95             0.0         373.13           373.13      (HD95_ONE_EMPTY, mm)
    sensitivity      1.0           0.0              0.0
    specificity   TN / (TN + FP) as usual; 1.0 when gt has no negatives (gt fills the array)

Sensitivity and specificity follow the scorer used by BraTS 2023+ (GaNDLF's
`get_sensitivity_and_specificity`): TP / (TP + FN) with 1 when both masks are empty, so a
false positive on a case without the region gives 0.

`region_metrics` applies them to the three BraTS regions (ET, WT, TC, from utils.regions).
"""
import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from utils.regions import REGIONS, labels_to_regions

# BraTS' HD95 when exactly one of prediction / reference is empty: the diagonal of a
# 240x240x155 volume at 1 mm, sqrt(240**2 + 240**2 + 155**2) = 373.13 mm. A fixed value,
# whatever the spacing, because that is what the challenge reports.
HD95_ONE_EMPTY = 373.13

# surface_distances uses the distance transform when the box holds fewer voxels than this per
# surface voxel: there a k-d tree query (~5 us a point) costs more than two distance
# transforms of the box (~0.3 us a voxel) (a 240x240x155 box on 2 cores: both ~2.4 s at 1/19).
EDT_VOXELS_PER_POINT = 12

# Which HD95 `hd95` computes unless told otherwise (see its docstring for why "max").
HD95_METHODS = ("max", "pooled")
DEFAULT_HD95_METHOD = "max"

# Surface = mask minus its erosion by the face-connected (6-neighbour) cross, as MedPy
# (connectivity=1) and MONAI (`get_mask_edges`) do: a voxel is on the surface when one of its
# 6 face neighbours is background (or outside the array).
_SURFACE_STRUCTURE_CONNECTIVITY = 1


def _pair(pred, gt):
    pred = np.asarray(pred).astype(bool, copy=False)
    gt = np.asarray(gt).astype(bool, copy=False)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from reference shape {gt.shape}")
    return pred, gt


def dice(pred, gt):
    """Dice 2|P∩G| / (|P| + |G|) of two masks (same shape).

    Both empty -> 1.0 (nothing to find, nothing found); exactly one empty -> 0.0.
    """
    pred, gt = _pair(pred, gt)
    total = int(pred.sum()) + int(gt.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.count_nonzero(pred & gt)) / total


def sensitivity(pred, gt):
    """True-positive rate TP / (TP + FN) = |P∩G| / |G|.

    Both empty -> 1.0. Reference empty but prediction not -> 0.0 (BraTS scorer: a false
    positive on a case without the region is penalised). Prediction empty, reference not -> 0.0.
    """
    pred, gt = _pair(pred, gt)
    positives = int(gt.sum())
    if positives == 0:
        return 1.0 if not pred.any() else 0.0
    return int(np.count_nonzero(pred & gt)) / positives


def specificity(pred, gt):
    """True-negative rate TN / (TN + FP) = |~P∩~G| / |~G|.

    Empty masks are ordinary here (the background is never empty in practice): both empty ->
    1.0, any prediction on an empty reference -> slightly below 1. If the reference has no
    negatives at all (it fills the array) nothing can be a false positive -> 1.0.
    """
    pred, gt = _pair(pred, gt)
    negatives = gt.size - int(gt.sum())
    if negatives == 0:
        return 1.0
    return int(np.count_nonzero(~pred & ~gt)) / negatives


def _surface(mask):
    """Boolean surface of `mask`: voxels with a face neighbour outside the mask or the array."""
    structure = ndimage.generate_binary_structure(mask.ndim, _SURFACE_STRUCTURE_CONNECTIVITY)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def surfaces_in_box(pred, gt):
    """The surfaces of two non-empty boolean masks, cut to the bounding box of both."""
    box = ndimage.find_objects((pred | gt).astype(np.uint8))[0]
    return _surface(pred[box]), _surface(gt[box])


def by_distance_transform(pred_surface, gt_surface):
    """Whether surface_distances measures these surfaces (surfaces_in_box) by distance
    transform: when they fill more than 1/EDT_VOXELS_PER_POINT of the box."""
    points = np.count_nonzero(pred_surface) + np.count_nonzero(gt_surface)
    return points * EDT_VOXELS_PER_POINT > pred_surface.size


def surface_distances(pred, gt, spacing):
    """Directed surface distances in mm: (pred surface -> gt surface, gt surface -> pred surface).

    Each is a 1-D float array with one entry per surface voxel of the first mask: the Euclidean
    distance (axes scaled by `spacing`) from its centre to the nearest surface-voxel centre of
    the other mask. Both masks must be non-empty.

    Exact nearest neighbours, on the bounding box of both masks only (exact: outside it is
    background, or outside the array, which the erosion also treats as background), by one of
    two methods with the same results: a k-d tree on the surface voxels' coordinates, whose
    cost scales with the number of surface voxels (a 240x240x155 case with a stray voxel in a
    corner: 0.2 s instead of 3 s), or, when the surfaces fill more than 1/EDT_VOXELS_PER_POINT
    of the box (the noisy masks of an untrained model), `distance_transform_edt(~surface,
    sampling=spacing)` read at the other surface, whose cost scales with the box
    (`python -m benchmarks.bench_metrics`).
    """
    pred, gt = _pair(pred, gt)
    if not pred.any() or not gt.any():
        raise ValueError("surface distances need two non-empty masks")
    spacing = np.broadcast_to(np.asarray(spacing, dtype=np.float64), (pred.ndim,))
    pred_surface, gt_surface = surfaces_in_box(pred, gt)
    if by_distance_transform(pred_surface, gt_surface):
        return (ndimage.distance_transform_edt(~gt_surface, sampling=spacing)[pred_surface],
                ndimage.distance_transform_edt(~pred_surface, sampling=spacing)[gt_surface])
    pred_points = np.argwhere(pred_surface) * spacing
    gt_points = np.argwhere(gt_surface) * spacing
    pred_to_gt, _ = cKDTree(gt_points).query(pred_points, workers=-1)
    gt_to_pred, _ = cKDTree(pred_points).query(gt_points, workers=-1)
    return pred_to_gt, gt_to_pred


def hd95(pred, gt, spacing=(1.0, 1.0, 1.0), method=DEFAULT_HD95_METHOD):
    """95 % Hausdorff distance in mm between the surfaces of two masks.

    pred, gt: masks of the same shape; spacing: voxel size per axis in mm, in the arrays' axis
    order (a scalar is broadcast).
    method:
      "max"    (default) max(p95(d(P->G)), p95(d(G->P))): the larger of the two directed 95th
               percentiles, as MONAI's `compute_hausdorff_distance(percentile=95)` and DeepMind's
               `surface_distance.compute_robust_hausdorff(.., 95)`. The BraTS 2023+ scorer
               (Sage-Bionetworks-Challenges/brats2023, evaluation/lesionwise) calls the latter,
               so this is the closest to the challenge's number we can tell. (DeepMind weights
               surface elements by area; we count surface voxels, like MONAI.)
      "pooled" p95 of the distances of both directions pooled together: MedPy's
               `medpy.metric.binary.hd95`. Usually below "max", not always (linear
               interpolation: directed distances [1, 0] and [1, 0] give 0.95 max, 1.0 pooled).
    Percentiles use numpy's default linear interpolation (as MedPy and MONAI).
    Surface voxels: mask minus its erosion by the 6-neighbour (face) cross, as MedPy and MONAI.

    Both empty -> 0.0; exactly one empty -> HD95_ONE_EMPTY (373.13, BraTS), whatever the spacing.
    """
    if method not in HD95_METHODS:
        raise ValueError(f"unknown hd95 method {method!r}: use one of {HD95_METHODS}")
    pred, gt = _pair(pred, gt)
    pred_any, gt_any = bool(pred.any()), bool(gt.any())
    if not pred_any and not gt_any:
        return 0.0
    if pred_any != gt_any:
        return HD95_ONE_EMPTY
    pred_to_gt, gt_to_pred = surface_distances(pred, gt, spacing)
    if method == "pooled":
        return float(np.percentile(np.concatenate([pred_to_gt, gt_to_pred]), 95))
    return float(max(np.percentile(pred_to_gt, 95), np.percentile(gt_to_pred, 95)))


def region_metrics(pred_label, gt_label, spacing=(1.0, 1.0, 1.0), hd95_method=DEFAULT_HD95_METHOD):
    """All four metrics for the BraTS regions of two label maps.

    pred_label, gt_label: label maps (same shape, values in {0, 1, 2, 4}); spacing: voxel size
    per axis in mm in the same axis order as the maps.
    Returns {"ET"|"WT"|"TC": {"dice", "hd95", "sensitivity", "specificity"}} (floats), regions in
    utils.regions.REGIONS order.
    """
    pred_regions, gt_regions = labels_to_regions(pred_label), labels_to_regions(gt_label)
    if pred_regions.shape != gt_regions.shape:
        raise ValueError(
            f"prediction shape {pred_regions.shape[1:]} differs from reference shape {gt_regions.shape[1:]}"
        )
    return {
        region: {
            "dice": dice(p, g),
            "hd95": hd95(p, g, spacing, method=hd95_method),
            "sensitivity": sensitivity(p, g),
            "specificity": specificity(p, g),
        }
        for region, p, g in zip(REGIONS, pred_regions, gt_regions)
    }
