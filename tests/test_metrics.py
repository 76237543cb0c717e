"""utils.metrics on tiny hand-computed volumes and against brute-force references."""
import itertools
import time

import numpy as np
import pytest
from scipy.spatial.distance import cdist

from utils import metrics
from utils.metrics import (
    HD95_ONE_EMPTY, _surface, dice, hd95, region_metrics, sensitivity, specificity,
)


def _mask(shape, *slices):
    m = np.zeros(shape, dtype=bool)
    for s in slices:
        m[s] = True
    return m


# ---- Dice / sensitivity / specificity -------------------------------------------------------

def test_dice_hand_computed():
    pred = _mask((4, 4, 4), np.s_[0, 0, 0:3])  # 3 voxels
    gt = _mask((4, 4, 4), np.s_[0, 0, 1:4])  # 3 voxels, 2 shared
    assert dice(pred, gt) == pytest.approx(2 * 2 / 6)


def test_dice_matches_numpy_count_on_random_masks():
    rng = np.random.default_rng(0)
    for _ in range(5):
        pred, gt = rng.random((2, 9, 10, 11)) < 0.3
        tp = sum(p and g for p, g in zip(pred.ravel(), gt.ravel()))
        assert dice(pred, gt) == pytest.approx(2 * tp / (pred.sum() + gt.sum()))


def test_empty_cases():
    empty, full = np.zeros((3, 3, 3), bool), _mask((3, 3, 3), np.s_[1, 1, 1])
    assert dice(empty, empty) == 1.0
    assert dice(full, empty) == 0.0 and dice(empty, full) == 0.0
    assert hd95(empty, empty) == 0.0
    assert hd95(full, empty) == HD95_ONE_EMPTY == hd95(empty, full, spacing=(2, 2, 2)) == 373.13
    assert sensitivity(empty, empty) == 1.0
    assert sensitivity(full, empty) == 0.0  # false positive on a case without the region
    assert sensitivity(empty, full) == 0.0
    assert specificity(empty, empty) == 1.0
    assert specificity(full, empty) == pytest.approx(26 / 27)
    assert specificity(np.ones((2, 2), bool), np.ones((2, 2), bool)) == 1.0  # no negatives


def test_sensitivity_specificity_values():
    # 10 voxels: gt = first 4; pred = voxels 2..6 -> TP 2, FN 2, FP 3, TN 3.
    gt = _mask((10,), np.s_[0:4])
    pred = _mask((10,), np.s_[2:7])
    assert sensitivity(pred, gt) == pytest.approx(2 / 4)
    assert specificity(pred, gt) == pytest.approx(3 / 6)


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="shape"):
        dice(np.zeros((2, 2)), np.zeros((2, 3)))


# ---- HD95 -----------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["max", "pooled"])
def test_hd95_single_voxels(method):
    pred = _mask((5, 12, 5), np.s_[2, 1, 2])
    gt = _mask((5, 12, 5), np.s_[2, 8, 2])
    assert hd95(pred, gt, method=method) == pytest.approx(7.0)
    assert hd95(pred, gt, spacing=(1, 2.5, 1), method=method) == pytest.approx(17.5)
    assert hd95(pred, gt, spacing=(2.5, 1, 1), method=method) == pytest.approx(7.0)


@pytest.mark.parametrize("method", ["max", "pooled"])
def test_hd95_parallel_planes(method):
    # Two one-voxel-thick planes 3 voxels apart along axis 0: every distance is 3 * spacing.
    pred = _mask((8, 6, 6), np.s_[2])
    gt = _mask((8, 6, 6), np.s_[5])
    assert hd95(pred, gt, method=method) == pytest.approx(3.0)
    assert hd95(pred, gt, spacing=(2.5, 1, 1), method=method) == pytest.approx(7.5)
    assert hd95(pred, gt, spacing=(1, 2.5, 2.5), method=method) == pytest.approx(3.0)
    assert hd95(pred, pred, method=method) == 0.0


def test_hd95_methods_differ_as_defined():
    # gt: 1 voxel at x=0; pred: 20 voxels at x=0..19 (a line). Directed distances:
    # pred->gt = 0..19, gt->pred = 0. "max" = p95(0..19) = 18.05; "pooled" = p95(0..19, 0).
    pred = _mask((1, 1, 20), np.s_[0, 0, :])
    gt = _mask((1, 1, 20), np.s_[0, 0, 0])
    d = np.arange(20.0)
    assert hd95(pred, gt, method="max") == pytest.approx(np.percentile(d, 95))
    assert hd95(pred, gt, method="pooled") == pytest.approx(np.percentile(np.append(d, 0), 95))
    with pytest.raises(ValueError, match="method"):
        hd95(pred, gt, method="mean")


def _brute_force_hd95(pred, gt, spacing, method):
    a = np.argwhere(_reference_surface(pred)) * spacing
    b = np.argwhere(_reference_surface(gt)) * spacing
    d = cdist(a, b)
    ab, ba = d.min(axis=1), d.min(axis=0)
    if method == "pooled":
        return np.percentile(np.concatenate([ab, ba]), 95)
    return max(np.percentile(ab, 95), np.percentile(ba, 95))


def _reference_surface(mask):
    """Independent surface: a mask voxel with a face neighbour outside the mask or the array."""
    padded = np.pad(mask, 1)
    inner = np.ones_like(mask)
    for axis, step in itertools.product(range(mask.ndim), (-1, 1)):
        inner &= np.roll(padded, step, axis=axis)[1:-1, 1:-1, 1:-1]
    return mask & ~inner


def test_surface_matches_reference():
    rng = np.random.default_rng(1)
    m = rng.random((7, 8, 9)) < 0.6
    np.testing.assert_array_equal(_surface(m), _reference_surface(m))


@pytest.mark.parametrize("method", ["max", "pooled"])
def test_hd95_matches_brute_force_on_random_masks(method):
    rng = np.random.default_rng(2)
    for spacing in [(1.0, 1.0, 1.0), (2.5, 1.0, 0.7)]:
        for _ in range(4):
            pred = rng.random((14, 12, 10)) < 0.2
            gt = np.zeros_like(pred)
            gt[3:9, 2:10, 4:8] = rng.random((6, 8, 4)) < 0.7
            expected = _brute_force_hd95(pred, gt, np.array(spacing), method)
            assert hd95(pred, gt, spacing, method=method) == pytest.approx(expected)


def test_region_metrics_structure_and_values():
    gt = np.zeros((6, 6, 6), np.uint8)
    gt[1:3, 1:3, 1:3] = 2
    gt[1, 1, 1] = 4
    pred = gt.copy()
    pred[1, 1, 1] = 1  # ET missed, TC and WT unchanged
    out = region_metrics(pred, gt, spacing=(1, 1, 1))
    assert set(out) == {"ET", "WT", "TC"}
    assert set(out["ET"]) == {"dice", "hd95", "sensitivity", "specificity"}
    assert out["WT"] == {"dice": 1.0, "hd95": 0.0, "sensitivity": 1.0, "specificity": 1.0}
    assert out["TC"]["dice"] == 1.0  # label 1 and 4 are both core
    assert out["ET"]["dice"] == 0.0 and out["ET"]["hd95"] == HD95_ONE_EMPTY
    assert out["ET"]["sensitivity"] == 0.0


def test_region_metrics_speed_on_full_size_case():
    shape = (240, 240, 155)
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]

    def ball(c, r):
        return (z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2 < r**2

    gt = np.zeros(shape, np.uint8)
    gt[ball((120, 120, 77), 40)] = 2
    gt[ball((120, 120, 77), 25)] = 4
    gt[ball((120, 120, 77), 18)] = 1
    pred = np.roll(gt, 3, axis=0)
    pred[0, 0, 0] = pred[-1, -1, -1] = 2  # stray voxels: bounding box = the whole volume
    start = time.perf_counter()
    out = region_metrics(pred, gt, spacing=(1, 1, 1))
    assert time.perf_counter() - start < 3 * 1.0  # budget: < 1 s per region
    # A pure translation by 3 voxels moves every surface voxel 3 mm: the bound is exact.
    assert 0.0 < out["TC"]["hd95"] <= 3.0


@pytest.mark.parametrize("noise", [0.0, 0.3])  # a compact mask (the tree's case), a noisy one
@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (2.5, 1.0, 1.2)])
def test_both_surface_distance_methods_agree(noise, spacing, monkeypatch):
    rng = np.random.default_rng(1)
    z, y, x = np.ogrid[:20, :24, :28]
    gt = (z - 10) ** 2 + (y - 12) ** 2 + (x - 14) ** 2 < 36
    pred = np.roll(gt, 2, axis=1) | (rng.random(gt.shape) < noise)
    results = {}
    for name, voxels_per_point in (("tree", 0), ("transform", float("inf"))):
        monkeypatch.setattr(metrics, "EDT_VOXELS_PER_POINT", voxels_per_point)
        results[name] = metrics.surface_distances(pred, gt, spacing)
    for tree, transform in zip(results["tree"], results["transform"]):
        assert tree.shape == transform.shape and tree.size > 0
        np.testing.assert_allclose(transform, tree, rtol=1e-12)
        if spacing == (1.0, 1.0, 1.0):
            assert np.array_equal(transform, tree)  # integer offsets: the same floats


# ------------------------------------------------ the values region_metrics reports
def test_region_metrics_sensitivity_specificity_argument_order():
    gt = np.zeros((10, 10, 10), np.uint8)
    gt[0:2, 0:2, 0:2] = 2                      # 8 WT voxels
    pred = np.zeros_like(gt)
    pred[0:1, 0:2, 0:2] = 2                    # 4 of them
    pred[9, 9, 8:10] = 2                       # 2 false positives
    wt = region_metrics(pred, gt)["WT"]
    assert wt["sensitivity"] == pytest.approx(4 / 8)      # swapped args give 4/6
    assert wt["specificity"] == pytest.approx(990 / 992)  # swapped args give 990/994


# ---------------------------------------------------------------- HD95's two directions
def line_and_voxel():
    line = np.zeros((1, 1, 20), bool)
    line[0, 0, :] = True
    voxel = np.zeros((1, 1, 20), bool)
    voxel[0, 0, 0] = True
    return line, voxel


def test_hd95_measures_both_directions():
    """pred = one voxel, gt = a 20-voxel line: pred->gt distances [0], gt->pred 0..19.
    max(p95([0]), p95(0..19)) = 0.95 * 19 = 18.05."""
    line, voxel = line_and_voxel()
    assert hd95(voxel, line, method="max") == pytest.approx(18.05)
    assert hd95(line, voxel, method="max") == pytest.approx(18.05)


def test_hd95_default_is_the_max_of_the_directed_percentiles():
    """The documented default ("max", MONAI / DeepMind / BraTS 2023 scorer), also eval.py's
    --hd95 default: 18.05 here, where MedPy's pooled p95 of [0, 0, 1, ..., 19] is 18.0.
"""
    line, voxel = line_and_voxel()
    assert hd95(line, voxel) == pytest.approx(18.05, rel=1e-9)
    wt_line, wt_voxel = line.astype(np.uint8) * 2, voxel.astype(np.uint8) * 2
    assert region_metrics(wt_line, wt_voxel)["WT"]["hd95"] == pytest.approx(18.05, rel=1e-9)
