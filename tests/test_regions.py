import numpy as np
import torch

from utils.regions import REGIONS, labels_to_regions, probabilities_to_labels, regions_to_labels


def test_regions_from_labels_by_hand():
    label = np.array([0, 1, 2, 4], dtype=np.uint8)
    et, wt, tc = labels_to_regions(label)
    assert REGIONS == ("ET", "WT", "TC")
    assert et.tolist() == [False, False, False, True]
    assert wt.tolist() == [False, True, True, True]
    assert tc.tolist() == [False, True, False, True]


def test_round_trip_is_exact():
    rng = np.random.default_rng(0)
    label = rng.choice(np.array([0, 1, 2, 4], dtype=np.uint8), size=(7, 9, 11))
    back = regions_to_labels(labels_to_regions(label))
    assert back.dtype == np.uint8
    np.testing.assert_array_equal(back, label)


def test_export_overwrite_order_for_inconsistent_regions():
    # ET without TC/WT still exports as 4 (ET is written last); TC without WT exports as 1.
    regions = np.zeros((3, 3), dtype=bool)
    regions[0, 0] = True          # ET only
    regions[2, 1] = True          # TC only
    regions[1, 2] = True          # WT only
    assert regions_to_labels(regions).tolist() == [4, 1, 2]


def test_a_region_is_present_strictly_above_one_half():
    # columns: WT at 0.5 (not present), WT just above, WT+TC, WT+TC+ET, ET alone (ET wins)
    probs = torch.tensor([[0.1, 0.2, 0.3, 0.9, 0.51],
                          [0.5, 0.5001, 0.8, 0.9, 0.2],
                          [0.2, 0.4, 0.6, 0.9, 0.1]])
    assert probabilities_to_labels(probs).tolist() == [0, 2, 1, 4, 4]
