"""Clean exported BraTS label masks before upload (the published post-processing rules).

    python postprocess.py     # after `bash eval.sh 0`: outputs/LCKD -> outputs/LCKD_postprocessed
    python postprocess.py --input_dir outputs/val --output_dir outputs/val_post
    python postprocess.py --input_dir preds/flair+t1ce --output_dir preds_post/flair+t1ce --et_threshold 300

--input_dir is either a folder of <case>.nii.gz masks or eval.py's output folder with one
sub-folder per modality subset; every mask found below it is written to the same relative
path under --output_dir (which must not overlap --input_dir: the input is never modified).
The defaults follow eval.sh run with its defaults (NAME=LCKD) from the repository root, which
writes outputs/LCKD/<subset>/<case>.nii.gz; relative paths are taken from the current folder.

Rules, applied in this order to each case (all thresholds are flags):
  1. Connected components of the whole tumour (label > 0, 6-connectivity in 3D, as published) are removed
     when smaller than min(--min_component, --min_fraction x the largest component), or when
     they lie entirely in the lowest --bottom_slices slices of the NIfTI's 3rd axis (z).
  2. If fewer than --et_threshold voxels of enhancing tumour (4) remain, ET is relabelled as
     necrosis (1): a false ET on a case without ET scores Dice 0, an empty one scores 1.
Orientation assumption: "lowest" = smallest z index, which is inferior for BraTS masks (their
affines point +z superior, axis code 'S'); a mask whose z axis points inferior gets a warning.
No rule reads the MRI images, so no image path is needed and a missing-modality subset can
never leak information from a modality it did not have.
"""
import argparse
import os
import sys
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage
from tqdm import tqdm

from datasets.brats import READ_ERRORS
from utils.io import atomic_path
from utils.regions import LABELS

MASK_SUFFIXES = (".nii.gz", ".nii")
# eval.sh writes outputs/${NAME}/<subset>/<case>.nii.gz with NAME=LCKD by default.
DEFAULT_INPUT_DIR = Path("outputs/LCKD")
DEFAULT_OUTPUT_DIR = Path("outputs/LCKD_postprocessed")


@dataclass(frozen=True)
class Rules:
    """Thresholds of the published rules (defaults = published values)."""

    min_component: int = 2000  # voxels
    min_fraction: float = 0.1  # of the largest component
    bottom_slices: int = 25  # along the slice axis, from index 0
    et_threshold: int = 500  # ET voxels in the whole case


def remove_components(label, rules=Rules(), slice_axis=2):
    """Drop small or bottom-only whole-tumour components. label (X, Y, Z) uint8 -> new array.

    Components: label > 0, 6-connected (face neighbours), as published: skimage's
    label(neighbors=4) means connectivity 1 in 3D. A component is dropped if
    its size < min(rules.min_component, rules.min_fraction * largest size), or if all its voxels
    have index < rules.bottom_slices along `slice_axis` (the NIfTI z axis, 2, by default).
    Returns (cleaned label, number of components removed).
    """
    components, count = ndimage.label(label > 0, structure=ndimage.generate_binary_structure(label.ndim, 1))
    if count == 0:
        return label.copy(), 0
    sizes = np.bincount(components.ravel(), minlength=count + 1)
    sizes[0] = 0
    drop = sizes < min(rules.min_component, rules.min_fraction * sizes.max())
    # A component reaching any slice at or above bottom_slices is not bottom-only.
    upper = np.take(components, np.arange(rules.bottom_slices, label.shape[slice_axis]), axis=slice_axis)
    reaches_up = np.zeros(count + 1, dtype=bool)
    reaches_up[np.unique(upper)] = True
    drop |= ~reaches_up
    drop[0] = False  # background stays background
    cleaned = label.copy()
    cleaned[drop[components]] = 0
    return cleaned, int(drop.sum())


def relabel_small_et(label, rules=Rules()):
    """ET (4) -> NCR (1) when the case has fewer than rules.et_threshold ET voxels.

    Returns (new label, whether ET was relabelled). A case without ET is returned unchanged.
    """
    et = label == 4
    et_voxels = int(et.sum())
    if et_voxels == 0 or et_voxels >= rules.et_threshold:
        return label.copy(), False
    cleaned = label.copy()
    cleaned[et] = 1
    return cleaned, True


def postprocess_label(label, rules=Rules(), slice_axis=2):
    """Both rules in the published order. label (X, Y, Z) uint8 in {0,1,2,4} -> (label, info)."""
    cleaned, removed = remove_components(label, rules, slice_axis)
    cleaned, et_relabelled = relabel_small_et(cleaned, rules)
    return cleaned, {"components_removed": removed, "et_relabelled": et_relabelled}


def read_mask(path):
    """Read a label mask -> (uint8 array in NIfTI order, nibabel image). Errors name the file."""
    try:
        image = nib.load(str(path))
        data = np.asanyarray(image.dataobj)
    except READ_ERRORS as error:
        raise RuntimeError(f"{path}: cannot read the mask: {error}") from error
    if data.ndim != 3:
        raise ValueError(f"{path}: expected a 3-D label mask, got shape {data.shape}")
    values = np.unique(data)
    if not np.isin(values, LABELS).all():
        raise ValueError(
            f"{path}: labels {sorted(set(values.tolist()) - set(LABELS))} outside {{0, 1, 2, 4}}"
        )
    return data.astype(np.uint8), image


def write_mask(label, image, path):
    """Write `label` as uint8 with `image`'s affine and header, atomically."""
    header = image.header.copy()
    header.set_data_dtype(np.uint8)
    out = type(image)(label.astype(np.uint8), image.affine, header)
    with atomic_path(path) as tmp:
        nib.save(out, str(tmp))


def process_file(job):
    """(input path, output path, Rules) -> info dict; the worker of the pool."""
    source, target, rules = job
    label, image = read_mask(source)
    if nib.aff2axcodes(image.affine)[2] != "S":
        warnings.warn(f"{source}: z axis is not inferior->superior; the bottom-slice rule "
                      "removes components at the smallest z index regardless")
    cleaned, info = postprocess_label(label, rules)
    write_mask(cleaned, image, target)
    return {"file": str(source), **info}


def find_masks(input_dir):
    """Every mask below input_dir (flat, or one sub-folder per subset), sorted; hidden files
    (such as atomic_path's temporaries) are skipped."""
    return sorted(
        p for p in input_dir.rglob("*")
        if p.is_file() and p.name.endswith(MASK_SUFFIXES)
        and not any(part.startswith(".") for part in p.relative_to(input_dir).parts)
    )


def _overlap(a, b):
    return a == b or a in b.parents or b in a.parents


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input_dir", type=Path, default=DEFAULT_INPUT_DIR,
                        help="folder of <case>.nii.gz masks, or eval output with one folder per "
                             "subset (default %(default)s: eval.sh's output)")
    parser.add_argument("--output_dir", type=Path, default=DEFAULT_OUTPUT_DIR,
                        help="where cleaned masks go (same relative paths); must not overlap "
                             "input_dir (default %(default)s)")
    parser.add_argument("--min_component", type=int, default=Rules.min_component,
                        help="drop components smaller than this many voxels ... (default %(default)s)")
    parser.add_argument("--min_fraction", type=float, default=Rules.min_fraction,
                        help="... or than this fraction of the largest, whichever is smaller (default %(default)s)")
    parser.add_argument("--bottom_slices", type=int, default=Rules.bottom_slices,
                        help="drop components entirely within this many lowest z slices (default %(default)s)")
    parser.add_argument("--et_threshold", type=int, default=Rules.et_threshold,
                        help="relabel ET as NCR when the case has fewer ET voxels (default %(default)s)")
    parser.add_argument("--num_workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="parallel processes; 0 = run in this process (default %(default)s)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    input_dir, output_dir = args.input_dir.resolve(), args.output_dir.resolve()
    if not input_dir.is_dir():
        sys.exit(f"--input_dir {args.input_dir} is not a folder (run from the repository root "
                 f"after eval.sh, or pass --input_dir)")
    if _overlap(input_dir, output_dir):
        sys.exit(f"--output_dir {args.output_dir} must not be, contain or lie inside --input_dir "
                 f"{args.input_dir}: the input masks are never overwritten")
    sources = find_masks(input_dir)
    if not sources:
        sys.exit(f"no {' or '.join(MASK_SUFFIXES)} masks found under {args.input_dir}")
    rules = Rules(args.min_component, args.min_fraction, args.bottom_slices, args.et_threshold)
    jobs = [(s, output_dir / s.relative_to(input_dir), rules) for s in sources]

    progress = dict(total=len(jobs), desc="postprocess", unit="case")
    if args.num_workers == 0:
        infos = [process_file(job) for job in tqdm(jobs, **progress)]
    else:
        # An executor, not multiprocessing.Pool: a worker that dies (killed for memory)
        # raises BrokenProcessPool here instead of hanging the run.
        with ProcessPoolExecutor(min(args.num_workers, len(jobs))) as pool:
            infos = list(tqdm(pool.map(process_file, jobs), **progress))

    removed = sum(i["components_removed"] for i in infos)
    relabelled = sum(i["et_relabelled"] for i in infos)
    print(f"{len(infos)} masks -> {args.output_dir}: {removed} components removed, "
          f"ET relabelled as NCR in {relabelled} cases")
    return infos


if __name__ == "__main__":
    main()
