"""BraTS labels <-> the network's overlapping regions, in one place.

Labels: 0 background, 1 necrotic / non-enhancing core (NCR/NET), 2 edema (ED),
4 enhancing tumour (ET; BraTS 2023 writes it as 3, mapped to 4 when a case is read).
Regions, in the network's output order: ET = {4}, WT = {1, 2, 4}, TC = {1, 4}.
"""
import numpy as np
import torch

NCR, ED, ET = 1, 2, 4  # the label values
LABELS = (0, NCR, ED, ET)
REGIONS = ("ET", "WT", "TC")
REGION_LABELS = {"ET": (ET,), "WT": (NCR, ED, ET), "TC": (NCR, ET)}
# Export writes regions in this order, later ones overwriting: WT -> 2, TC -> 1, ET -> 4.
EXPORT_ORDER = (("WT", ED), ("TC", NCR), ("ET", ET))
PRESENT_ABOVE = 0.5  # a region is predicted where its probability exceeds this (published)


def labels_to_regions(label):
    """Label map (...) -> bool array (3, ...) of ET, WT, TC."""
    label = np.asarray(label)
    return np.stack([np.isin(label, REGION_LABELS[r]) for r in REGIONS])


def regions_to_labels(regions):
    """Bool array or tensor (3, ...) of ET, WT, TC -> uint8 label map (numpy) in {0, 1, 2, 4}.

    Inverse of `labels_to_regions` for any label map; for network outputs (thresholded
    probabilities) the nesting ET ⊂ TC ⊂ WT is not guaranteed, and the published overwrite
    order decides. Runs in torch on the tensor's device (a GPU in evaluation), so only the
    uint8 map crosses to the host: numpy's boolean-mask writes cost about 0.25 s per
    240x240x155 map, 15 of them per case.
    """
    if not torch.is_tensor(regions):
        regions = torch.from_numpy(np.ascontiguousarray(regions))
    regions = regions.bool()
    label = torch.zeros(regions.shape[1:], dtype=torch.uint8, device=regions.device)
    for region, value in EXPORT_ORDER:
        label.masked_fill_(regions[REGIONS.index(region)], value)
    return label.cpu().numpy()


def probabilities_to_labels(probs):
    """Probabilities (3, ...) of ET, WT, TC -> the published uint8 label map (regions_to_labels
    of the regions present above PRESENT_ABOVE)."""
    return regions_to_labels(probs > PRESENT_ABOVE)
