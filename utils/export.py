"""Export of predicted label maps as NIfTI files the BraTS online evaluation accepts.

A mask is written on the grid of the case's input images: same shape, affine and orientation
(the input header is copied), integer labels {0, 1, 2, 4} stored as uint8.
"""
import nibabel as nib
import numpy as np
import torch

from datasets.brats import to_nifti_order
from utils.io import atomic_path
from utils.regions import regions_to_labels


def probabilities_to_labels(probs, threshold=0.5):
    """Region probabilities (3, D, H, W) in ET, WT, TC order -> uint8 label map (D, H, W).

    A region is present where its probability exceeds `threshold`; the published overwrite
    order (WT -> 2, then TC -> 1, then ET -> 4) turns the overlapping regions into labels.
    """
    if torch.is_tensor(probs):
        probs = probs.detach().cpu().numpy()
    return regions_to_labels(np.asarray(probs) > threshold)


def save_labels(label, affine, header, path):
    """Write a label map (D, H, W) in network order as a uint8 NIfTI at `path`, atomically.

    affine, header: those of the case's input images (datasets.brats.Case.affine/.header).
    The volume goes back to NIfTI order (X, Y, Z); the header copy keeps the input's qform /
    sform, units and orientation; its data type becomes uint8 and any intensity scaling
    (scl_slope / scl_inter) and display range of the source image are dropped.
    """
    label = np.asarray(label)
    if label.ndim != 3:
        raise ValueError(f"{path}: expected a label map (D, H, W), got shape {label.shape}")
    data = np.ascontiguousarray(to_nifti_order(label.astype(np.uint8)))
    header = header.copy()
    header.set_data_dtype(np.uint8)
    header.set_slope_inter(None, None)
    header["cal_min"], header["cal_max"] = 0, 0
    image = nib.Nifti1Image(data, affine, header=header)
    with atomic_path(path) as tmp:
        nib.save(image, tmp)
