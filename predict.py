r"""Segment one case from explicit files: any non-empty subset of FLAIR, T1, T1ce and T2.

    python predict.py --flair P01_flair.nii.gz --t1ce P01_t1ce.nii.gz \
        --checkpoint snapshots/LCKD_stage2/final.pth -o P01_mask.nii.gz
    python predict.py --t2 P01_t2.nii.gz --checkpoint ... -o P01_mask.nii.gz --postprocess --figure

The network sees exactly the modalities given (the others are missing, as in training's
random-missing stage); a file that is all zero, the placeholder of a missing modality, counts
as missing. The mask is written on the grid and with the header of the inputs,
uint8 labels 0/1/2/4, as eval.py writes them. The inputs must share one grid (an error
otherwise); a warning is printed when they do not look like what a BraTS-trained model was
trained on: about 1 mm isotropic, skull-stripped with a background of exactly 0, co-registered
(the same brain voxels non-zero in every modality).

--postprocess applies the published rules (postprocess.py; its threshold flags too, with the
published defaults, for 240x240x155 volumes), --kmeans_necrosis with it adds the released
K-means rule when T1ce is given. --figure writes a PNG of a slice through the tumour (default:
the mask's name, .png).
"""
import argparse
import re
import sys
from pathlib import Path

import numpy as np

from datasets.brats import (ALIASES, EXTENSIONS, MODALITY_TOKENS, brats_like_warnings,
                            modality_named, name_tokens, named_like_a_scan, naming_scheme, nifti_stem,
                            read_files, to_network_order, to_nifti_order, without_placeholders)
from datasets.normalize import normalize_case
from utils import figures
from utils.cli import ArgumentParser, UsageError, path_given, run_cli
from utils.export import add_et_label_arg, et_label_of, save_labels
from utils.io import check_file_writable
from utils.modalities import MODALITIES, T1CE, subset_name
from utils.postprocessing import (add_threshold_args, orientation_warning, postprocess_label,
                                  rules_from_args, unused_threshold)
from utils.regions import ED, ET, NCR
from utils.distributed import resolve_device
from utils.segment import add_inference_args, add_model_args, load_model, segment

CONTRAST = ("post", "gd", "gad", "contrast", "c")  # after a T1's name: a T1ce (P01_T1_post)


def parse_args(argv=None):
    p = ArgumentParser(prog="predict.py", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("the case: at least one modality (NIfTI, .nii or .nii.gz)")
    for modality in MODALITIES:
        g.add_argument(f"--{modality}", type=path_given, default=None)
    p.add_argument("--checkpoint", type=path_given, required=True,
                   help="checkpoint (.pth) written by train.py")
    p.add_argument("-o", "--output", type=path_given, required=True, help="the mask to write (.nii.gz)")
    g = p.add_argument_group("post-processing (postprocess.py's rules and thresholds)")
    g.add_argument("--postprocess", action="store_true", help="apply the published rules")
    g.add_argument("--kmeans_necrosis", action="store_true",
                   help="with --postprocess: the released K-means rule (uses --t1ce; skipped "
                        "without it)")
    add_threshold_args(g, g)
    add_et_label_arg(p)
    p.add_argument("--figure", nargs="?", const="", default=None, metavar="PNG",
                   help="write a figure (default path: the mask's, with .png)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing mask (and its figure) at -o")
    add_model_args(p)
    add_inference_args(p)
    return p.parse_args(argv)


def check_args(args):
    """-> {modality: Path}; UsageError for anything wrong with the flags, before any work."""
    files = {m: getattr(args, m) for m in MODALITIES if getattr(args, m) is not None}
    if not files:
        raise UsageError("give at least one modality: --flair, --t1, --t1ce, --t2")
    for modality, path in files.items():
        check_nifti_name(f"--{modality}", path)
        if not path.is_file():
            raise UsageError(f"--{modality} {path}: " + ("a folder, not a NIfTI file"
                                                         if path.is_dir() else "not found"))
    check_nifti_name("-o", args.output)
    given = [path.resolve() for path in files.values()]
    if args.output.resolve() in given:
        raise UsageError(f"-o {args.output} is one of the inputs")
    if named_like_a_scan(args.output):  # eval.py would read the mask as the case's own file
        case = args.output.parent.name
        raise UsageError(f"-o {args.output} is named as a scan or label of case {case} in its "
                         f"folder, where eval.py reads it as one (a label: the ground truth); "
                         f"name the mask otherwise, e.g. {case}_pred.nii.gz")
    for (modality, path), resolved in zip(files.items(), given):
        if given.count(resolved) > 1:
            raise UsageError(f"--{modality} {path} is given for another modality too: each "
                             "modality needs its own scan")
    if args.figure and Path(args.figure).suffix.lower() != ".png":
        raise UsageError(f"--figure {args.figure}: the figure is a PNG, name it .png")
    if args.kmeans_necrosis and not args.postprocess:
        raise UsageError("--kmeans_necrosis is a post-processing rule: add --postprocess")
    unused = unused_threshold(args, args.postprocess, args.kmeans_necrosis)
    if unused:
        raise UsageError(unused)
    outputs = [path for path in (args.output, figure_path(args)) if path]
    for path in outputs:
        check_file_writable(path)  # found now, not after the prediction
    existing = [path for path in outputs if path.exists()]
    if existing and not args.overwrite:
        raise UsageError(f"{existing[0]} exists (an earlier prediction?); pass --overwrite to "
                         "replace it, or choose another -o")
    return files


def check_nifti_name(flag, path):
    """UsageError unless `path` is named as a NIfTI file."""
    if nifti_stem(path) is None:
        raise UsageError(f"{flag} {path}: " + (
            "no name before the extension (an unset variable?)" if path.name.lower() in EXTENSIONS
            else "expected a NIfTI file, named .nii.gz or .nii"))


def patients_warning(files):
    """A warning when the files are named after different cases ('A_flair', 'B_t1ce': <case>
    then a modality's name), or None. eval.py refuses such a case folder; here the files may be
    named anyhow, so the names only warn."""
    cases = {}
    for modality, path in files.items():
        *case, token = name_tokens(path)
        if case and token in ALIASES[modality]:
            # other modality tokens before it belong to the modality's name: P01_T2_FLAIR, P01_t1_ce
            while len(case) > 1 and case[-1] in MODALITY_TOKENS:
                case.pop()
            cases[modality] = case
    if len({tuple(case) for case in cases.values()}) > 1:
        return ("the files are named after different cases (" + ", ".join(
            f"--{m} {files[m].name}" for m in cases) + "): scans of one patient are expected")
    return None


def named_modality(path):
    """(the modality a file's name says, the words that say it), or (None, None): its last
    token, a T1 with BIDS's contrast entity (sub-01_ce-gd_T1w) or a contrast word after it
    (P01_T1_post) being a T1ce."""
    tokens = name_tokens(path)
    token, named = tokens[-1], modality_named(path)
    if named == "t1":
        bids = re.search(r"_(ce-[a-z0-9]+)_", nifti_stem(path).lower())
        if bids:
            return "t1ce", f"{bids[1]} {token}"
    elif named is None and len(tokens) > 1 and tokens[-2] in ALIASES["t1"] and token in CONTRAST:
        return "t1ce", f"{tokens[-2]} {token}"
    return named, token if named else None


def modality_names_warning(files):
    """A warning when a file is named as another modality's scan than the flag it is given to
    (--t2 X-t2f.nii.gz: BraTS 2023's t2f is the FLAIR, t2w the T2; --flair X_t1ce.nii.gz) or
    as a label (--flair X_seg.nii.gz), or None. The network would be given it as the flag's
    modality, without a word: the names only warn, as patients_warning's, since the files may be
    named anyhow."""
    wrong = []
    for modality, path in files.items():
        named, token = named_modality(path)
        if name_tokens(path)[-1] == "seg":
            wrong.append(f"--{modality} {path.name} is named as a label (seg), not a scan")
        elif named is not None and named != modality:
            wrong.append(f"--{modality} {path.name} is named as a {named} scan ({token})")
    if not wrong:
        return None
    return ("; ".join(wrong) + ": each file is given to the network as its flag's modality; "
            "check the flags (BraTS 2023 names: t2f = FLAIR, t1n = T1, t1c = T1ce, t2w = T2)")


def figure_path(args):
    """Where --figure writes (None without it): the given PNG, or the mask's name with .png."""
    if args.figure is None:
        return None
    return Path(args.figure) if args.figure else mask_figure(args.output)


def mask_figure(mask):
    """The figure's default path: the mask's, with .png."""
    return mask.with_name(f"{nifti_stem(mask)}.png")


def main(argv=None):
    args = parse_args(argv)
    files = check_args(args)
    device = resolve_device(args.device)
    name = nifti_stem(args.output)
    files, dropped = without_placeholders(name, files)
    for part, path in dropped.items():
        print(f"{path.name} is all zero: {part} counted as missing")
    case = read_files(name, files)
    warnings = (modality_names_warning(files), patients_warning(files), *brats_like_warnings(case))
    for warning in filter(None, warnings):
        print(f"warning: {warning}", file=sys.stderr)
    model, _, window = load_model(args.checkpoint, args, device)

    # The K-means rule reads the raw T1ce, as published (normalize_case returns a new array);
    # the network the normalised image.
    t1ce = (to_nifti_order(case.image[T1CE]) if args.kmeans_necrosis and T1CE in case.available
            else None)
    case.image = normalize_case(case)
    label = segment(model, case.image, [case.available], window, args, device)[0]
    if args.postprocess:
        # in NIfTI order, as postprocess.py: the K-means rule's result depends on the order
        label, info = postprocess_label(to_nifti_order(label), rules_from_args(args), t1ce=t1ce,
                                        name=name)
        label = to_network_order(label)
        for warning in filter(None, [orientation_warning(case.affine, name), *info["warnings"]]):
            print(f"warning: {warning}", file=sys.stderr)
        kmeans = ""
        if args.kmeans_necrosis:
            kmeans = (f"; K-means rule: {info['necrosis_relabelled']} edema voxels -> NCR"
                      if t1ce is not None else "; K-means rule skipped: no T1ce")
        et = ("relabelled as NCR" if info["et_relabelled"] else "kept" if (label == ET).any()
              else "none left")
        print(f"post-processing: {info['components_removed']} components removed, ET {et}{kmeans}")
    old_figure = mask_figure(args.output)
    if args.output.exists() and old_figure.is_file() and old_figure != figure_path(args):
        old_figure.unlink()  # replacing a mask (--overwrite): its old figure would mislead
    et_label = et_label_of(args, lambda: next(iter(files.values())).name
                           if naming_scheme(files) == "brats2023" else None)
    save_labels(label, case.affine, case.header, args.output, et_label)
    counts = np.bincount(label.ravel(), minlength=ET + 1)
    print(f"mask from {subset_name(case.available)} written to {args.output}: "
          f"{counts[NCR]} NCR, {counts[ED]} ED, {counts[ET]} ET voxels"
          + (f" (ET written as {et_label})" if et_label != ET else ""))
    if args.figure is not None:
        path = figure_path(args)
        figures.case_figure(path, *figures.case_slices(case, [case.available], [label]))
        print(f"figure written to {path}")
    return label


if __name__ == "__main__":
    run_cli(main)
