"""Export of predicted label maps as NIfTI files the BraTS online evaluation accepts, and
reading them back (eval.py --resume, postprocess.py).

A mask is written on the grid of the case's input images: same shape, affine and orientation
(the input header is copied), integer labels {0, 1, 2, 4} stored as uint8.
"""
import nibabel as nib
import numpy as np

from datasets.brats import READ_ERRORS, DataError, to_nifti_order
from utils.io import atomic_path
from utils.regions import LABELS


def save_labels(label, affine, header, path):
    """Write a label map (D, H, W) in network order as a uint8 NIfTI at `path`, atomically.

    affine, header: those of the case's input images (datasets.brats.Case.affine/.header).
    """
    label = np.asarray(label)
    if label.ndim != 3:
        raise ValueError(f"{path}: expected a label map (D, H, W), got shape {label.shape}")
    write_mask(to_nifti_order(label), affine, header, path)


def write_mask(data, affine, header, path):
    """Write a label map in NIfTI order (X, Y, Z) as a uint8 NIfTI at `path`, atomically.

    The header copy keeps the source's qform / sform, units and orientation; its data type
    becomes uint8 and any intensity scaling (scl_slope / scl_inter) and display range of the
    source image are dropped.
    """
    header = header.copy()
    header.set_data_dtype(np.uint8)
    header.set_slope_inter(None, None)
    header["cal_min"], header["cal_max"] = 0, 0
    image = nib.Nifti1Image(np.ascontiguousarray(data, dtype=np.uint8), affine, header=header)
    with atomic_path(path) as tmp:
        nib.save(image, tmp)


def read_mask(path):
    """Read a label mask -> (uint8 array in NIfTI order, nibabel image). Errors name the file."""
    try:
        image = nib.load(str(path))
        data = np.asanyarray(image.dataobj)
    except READ_ERRORS as error:
        raise DataError(f"{path}: cannot read the mask: {error}") from error
    if data.ndim != 3:
        raise DataError(f"{path}: expected a 3-D label mask, got shape {data.shape}")
    values = np.unique(data)
    if not np.isin(values, LABELS).all():
        raise DataError(
            f"{path}: labels {sorted(set(values.tolist()) - set(LABELS))} outside {{0, 1, 2, 4}}"
        )
    return data.astype(np.uint8), image
