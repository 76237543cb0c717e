"""Export of predicted label maps as NIfTI files the BraTS online evaluation accepts, and
reading them back (eval.py --resume, postprocess.py).

A mask is written on the grid of the case's input images: same shape, affine and orientation
(the input header is copied), integer labels {0, 1, 2, 4} stored as uint8.
"""
import logging
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from datasets.brats import ET_2018, ET_2023, nifti_stem, open_files, read_label_map, to_nifti_order
from utils.io import atomic_path

# Where the fixes of a NIfTI-2 header made NIfTI-1 are logged: nowhere (nibabel's own logger
# would print one line per mask; a logger of our own keeps the writer threads apart).
_CONVERSION_LOG = logging.getLogger(__name__ + ".nifti1")
_CONVERSION_LOG.addHandler(logging.NullHandler())
_CONVERSION_LOG.propagate = False
# eval.py's output folder unless told (eval.sh's with NAME=LCKD), postprocess.py's input
EVAL_OUTPUT_DIR = Path("outputs/LCKD")
# The records eval.py writes next to the masks, which postprocess.py reads
EVAL_RECORD = "eval_config.json"  # the settings, with the subsets masks were written of
CASES_RECORD = "cases.csv"  # each case's folder and the modalities it has
MASK_LABEL_3_HINT = ("masks hold BraTS 2018's labels (ET 4), as eval.py writes them: relabel 3 "
                     "-> 4, or post-process eval.py's masks (postprocess.py --et_label 3 writes "
                     "BraTS 2023's labels last)")


def read_cases_record(folder):
    """eval.py's cases.csv in `folder` (case, folder, available), every column as text: a case
    named '007' stays '007'."""
    return pd.read_csv(Path(folder) / CASES_RECORD, dtype=str, keep_default_na=False)


def add_et_label_arg(parser):
    """--et_label (postprocess.py, predict.py); None when not given: see et_label_of."""
    parser.add_argument("--et_label", type=int, choices=(ET_2018, ET_2023), default=None,
                        help="enhancing tumour's value in the written masks: 4, BraTS 2018-2021's "
                             "(default), or 3 for BraTS 2023's online evaluation")


def et_label_of(args, find_brats_2023_case):
    """The ET value to write: --et_label, else 4 with a warning on stderr when the masks are of
    BraTS 2023 cases, whose scorer reads ET as 3. `find_brats_2023_case()` names one of them,
    or returns None; it is called only when --et_label is not given (it may list case folders)."""
    if args.et_label is not None:
        return args.et_label
    example = find_brats_2023_case()
    if example is not None:
        print(f"warning: {example} follows BraTS 2023's naming: its online evaluation reads ET "
              "as 3, these masks hold 4; pass --et_label 3 for an upload there (--et_label 4 "
              "keeps 4 without this warning)", file=sys.stderr)
    return ET_2018


def save_labels(label, affine, header, path, et_label=ET_2018):
    """Write a label map (D, H, W) in network order as a uint8 NIfTI at `path`, atomically.

    affine, header: those of the case's input images (datasets.brats.Case.affine/.header).
    """
    label = np.asarray(label)
    if label.ndim != 3:
        raise ValueError(f"{path}: expected a label map (D, H, W), got shape {label.shape}")
    write_mask(to_nifti_order(label), affine, header, path, et_label)


def write_mask(data, affine, header, path, et_label=ET_2018):
    """Write a label map in NIfTI order (X, Y, Z) as a uint8 NIfTI at `path`, atomically; its
    ET (4) written as `et_label` (3 for BraTS 2023's scorer: the rules and metrics work on
    BraTS 2018's labels).

    The header copy keeps the source's qform / sform, units and orientation; its data type
    becomes uint8 and any intensity scaling (scl_slope / scl_inter) and display range of the
    source image are dropped. A NIfTI-2 source gives a NIfTI-1 mask, the format BraTS's
    evaluation reads (nibabel's log line about the header size it converts is not printed).
    """
    if type(header) is nib.Nifti1Header:
        header = header.copy()
    else:
        header = nib.Nifti1Header.from_header(header, check=False)
        header.check_fix(logger=_CONVERSION_LOG)
    header.set_data_dtype(np.uint8)
    header.set_slope_inter(None, None)
    header["cal_min"], header["cal_max"] = 0, 0
    if et_label != ET_2018:
        data = np.where(data == ET_2018, et_label, data)
    image = nib.Nifti1Image(np.ascontiguousarray(data, dtype=np.uint8), affine, header=header)
    with atomic_path(path) as tmp:
        nib.save(image, tmp)


def read_mask(path):
    """Read a label mask -> (uint8 array in NIfTI order, nibabel image), checked as a case's label
    map is. Raises CaseError naming the case (the file's name, as save_labels is given it) and
    the file."""
    path = Path(path)
    case = nifti_stem(path)
    image = open_files(case, {"seg": path})["seg"]
    return read_label_map(case, path, image, label_3_hint=MASK_LABEL_3_HINT), image
