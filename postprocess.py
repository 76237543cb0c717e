"""Clean exported BraTS label masks before upload (the published post-processing rules).

    python postprocess.py     # after `bash eval.sh 0`: outputs/LCKD -> outputs/LCKD_postprocessed
    python postprocess.py --input_dir outputs/val --output_dir outputs/val_post
    python postprocess.py --input_dir preds/flair+t1ce --output_dir preds_post/flair+t1ce --et_threshold 300
    python postprocess.py --kmeans_necrosis      # + the released script's K-means rule (reads T1ce)

--input_dir is either a folder of <case>.nii.gz masks or eval.py's output folder with one
sub-folder per modality subset; every mask found below it is written to the same relative
path under --output_dir (which must not overlap --input_dir: the input is never modified,
nor be an eval.py output folder: its metrics.csv scores its own masks).
An eval.py folder whose evaluation did not finish (a mask folder lacking a case its cases.csv
lists), or one such mask folder, is refused: finish it with eval.py --resume first.
The defaults follow eval.sh run with its defaults (NAME=LCKD) from the repository root, which
writes outputs/LCKD/<subset>/<case>.nii.gz; relative paths are taken from the current folder.

Rules, applied in this order to each case (all thresholds are flags):
  1. Connected components of the whole tumour (label > 0, 6-connectivity in 3D, as published) are removed
     when smaller than min(--min_component, --min_fraction x the largest component), or when
     they lie entirely in the lowest --bottom_slices slices of the NIfTI's 3rd axis (z). On a
     volume of at most --bottom_slices slices that part is skipped, with a warning: it would
     remove every component.
  2. Opt-in (--kmeans_necrosis), the released script's extra rule, for each kept component of a
     case whose ET is a small part of the tumour: the component's edema is split by the T1ce
     intensity into dark, middle and bright groups (K-means, 3 clusters) and the middle group
     becomes necrosis (1). See utils/postprocessing.py for the trigger. It reads each case's
     raw T1ce, so it runs only on masks predicted with T1ce among the modalities.
  3. If fewer than --et_threshold voxels of enhancing tumour (4) remain, ET is relabelled as
     necrosis (1): a false ET on a case without ET scores Dice 0, an empty one scores 1.
Orientation assumption: "lowest" = smallest z index, which is inferior for BraTS masks (their
affines point +z superior, axis code 'S'); a mask whose z axis points inferior gets a warning.
A mask whose tumour the rules remove entirely gets a warning naming it.
Rules 1 and 3 read no MRI image, so no image path is needed and a missing-modality subset never
leaks information from a modality it did not have; rule 2 finds each case's T1ce through
--images or eval.py's cases.csv, and skips masks of subsets without T1ce.
"""
import argparse
import json
import sys
from pathlib import Path

from tqdm import tqdm

from datasets.brats import (EXTENSIONS, MODALITY_TOKENS, CaseError, case_files, is_brats_2023,
                            is_placeholder, name_tokens, named_like_a_scan, nifti_stem, open_files,
                            read_files, require_modalities, scan_of, to_nifti_order)
from utils.cli import ArgumentParser, UsageError, int_at_least, path_given, progress_interval, run_cli
from utils.export import (CASES_RECORD, EVAL_OUTPUT_DIR, EVAL_RECORD, add_et_label_arg, et_label_of,
                          read_cases_record, read_mask, write_mask)
from utils.io import check_file_writable, remove_temps_below
from utils.lock import exclusive_lock
from utils.modalities import MASK_FOLDERS, T1CE, parse_subset
from utils.postprocessing import (add_threshold_args, orientation_warning, postprocess_label,
                                  rules_from_args, unused_threshold)
from utils.workers import default_workers, worker_pool

DEFAULT_OUTPUT_DIR = Path("outputs/LCKD_postprocessed")  # beside eval.py's EVAL_OUTPUT_DIR


def read_t1ce(case, path):
    """The raw T1ce of a case in NIfTI order (t1ce_files checked its shape, the mask's)."""
    return to_nifti_order(read_files(case, {"t1ce": path}).image[T1CE])


def process_file(job):
    """(input path, output path, Rules, T1ce path or None, name, ET label) -> info dict; the
    worker.

    A file that fails in its voxels (the headers were checked before any work) leaves no mask
    at the output path: an earlier run's there would be uploaded beside this run's masks."""
    source, target, rules, t1ce_path, name, et_label = job
    try:
        label, image = read_mask(source)
        t1ce = None if t1ce_path is None else read_t1ce(nifti_stem(source), t1ce_path)
    except CaseError as err:
        target.unlink(missing_ok=True)
        raise CaseError(err.case, err.path, f"{err.problem}; {target} is not written: replace "
                        "the file, then run the same command again") from None
    cleaned, info = postprocess_label(label, rules, t1ce=t1ce, name=name)
    warning = orientation_warning(image.affine, name)
    if warning:
        info["warnings"].insert(0, warning)
    write_mask(cleaned, image.affine, image.header, target, et_label)
    return {"file": str(source), **info}


def find_masks(input_dir):
    """Every mask below input_dir (flat, or one sub-folder per subset), sorted; hidden files
    (such as atomic_path's temporaries) are skipped."""
    return sorted(
        p for p in input_dir.rglob("*")
        if p.is_file() and nifti_stem(p) is not None
        and not any(part.startswith(".") for part in p.relative_to(input_dir).parts)
    )


def check_input(sources, input_dir, record, args):
    """Refuse an input that is not one folder of masks: two masks of one case (X.nii and
    X.nii.gz), files named as MRI scans (a data folder, a case's scan copied in among the
    masks), a case's label beside its mask or among masks not named as labels (X_seg.nii.gz
    next to X.nii.gz or Y.nii.gz), or masks more than one sub-folder down (a folder of several
    runs: their masks would be mixed in one upload).
    Names are those of a scan or label when their last '_' or '-' token is a modality's (any
    ALIASES spelling) or 'seg'; the cases eval.py's cases.csv (`record`) lists are masks
    whatever their names end with, and so are masks all named as labels
    (BraTS2021/BraTS2021_00000_seg.nii.gz)."""
    seen = {}  # X.nii beside X.nii.gz: two masks of one case, both uploaded
    for path in sources:
        first = seen.setdefault((path.parent, nifti_stem(path)), path)
        if first is not path:
            raise UsageError(f"--input_dir {args.input_dir} holds {first.relative_to(input_dir)} "
                             f"and {path.relative_to(input_dir)}, two masks of case "
                             f"{nifti_stem(path)}: both would be uploaded; keep one of them")
    listed = set() if record is None else set(record["case"])
    named = {p: name_tokens(p)[-1] for p in sources if nifti_stem(p) not in listed}
    # A case's scan or label copied in among the masks would be uploaded as one more mask (a
    # label's values are a mask's), or stop the run halfway, some masks written, on its values.
    masks = {}
    for path in sources:
        masks.setdefault(path.parent, {})[nifti_stem(path).lower()] = path
    for path in named:
        case = scan_of(path, masks[path.parent])
        if case is not None:
            raise UsageError(f"--input_dir {args.input_dir} holds {path.relative_to(input_dir)} "
                             f"beside the mask {masks[path.parent][case].relative_to(input_dir)}: "
                             f"a scan or label of that case, not a mask; move it out of the folder")
    scans = [p for p, token in named.items() if token in MODALITY_TOKENS]
    if scans:
        raise UsageError(f"--input_dir {args.input_dir} holds files named as MRI scans, not masks "
                         f"(e.g. {scans[0].relative_to(input_dir)}): give eval.py's output folder "
                         f"({EVAL_OUTPUT_DIR} after eval.sh) or a folder of masks only")
    for path in (p for p, token in named.items() if token == "seg"):
        mask = next((p for p in masks[path.parent].values() if name_tokens(p)[-1] != "seg"), None)
        if mask is not None:
            raise UsageError(f"--input_dir {args.input_dir} holds {path.relative_to(input_dir)}, "
                             f"named as a label, among masks not so named (e.g. "
                             f"{mask.relative_to(input_dir)}): a case's label copied in? Move it "
                             "out of the folder")
    deep = [p for p in sources if len(p.relative_to(input_dir).parts) > 2]
    if deep:
        example = deep[0].relative_to(input_dir)
        raise UsageError(f"--input_dir {args.input_dir} holds masks more than one folder down "
                         f"(e.g. {example}), the outputs of several runs? Give one run's folder "
                         f"(e.g. --input_dir {Path(args.input_dir) / example.parts[0]})")


def evaluation_of(input_dir):
    """The eval.py output folder input_dir is, or whose one mask folder it is (the upload step
    zips one subset's folder: --input_dir outputs/LCKD/flair+t1ce), or None."""
    for folder in (input_dir, input_dir.parent if input_dir.name in MASK_FOLDERS else None):
        if folder is not None and (folder / CASES_RECORD).is_file():
            return folder
    return None


def cases_record_of(evaluation):
    """eval.py's cases.csv in the folder `evaluation`, or None when there is none."""
    if evaluation is None:
        return None
    try:
        return read_cases_record(evaluation)
    except (OSError, ValueError) as error:
        raise UsageError(f"{evaluation / CASES_RECORD}: cannot read eval.py's record of the cases "
                         f"({error}); re-export with eval.sh (or eval.py --overwrite)") from None


def brats_2023_case(sources, record):
    """'case X' for one case of the masks that is BraTS 2023's (its folder as eval.py's cases.csv
    records it, else its name), or None."""
    folders = dict(zip(record["case"], record["folder"])) if record is not None else {}
    cases = dict.fromkeys(nifti_stem(source) for source in sources)
    return next((f"case {case}" for case in cases if is_brats_2023(case, folders.get(case))), None)


def evaluation_mask_folders(input_dir):
    """The mask folders of the evaluation in input_dir: those present, and those its
    eval_config.json's subsets name (an evaluation stopped in its first case lacks some)."""
    folders = {f.name for f in input_dir.iterdir() if f.is_dir() and f.name in MASK_FOLDERS}
    try:
        subsets = json.loads((input_dir / EVAL_RECORD).read_text())["subsets"]
    except (OSError, ValueError, KeyError, TypeError):  # none, or not eval.py's
        return sorted(folders)
    return sorted(folders | ({subsets} if isinstance(subsets, str) else set(subsets)))


def check_complete(input_dir, evaluation, record, sources, args):
    """Refuse a stopped evaluation: eval.py writes cases.csv (`record`) before any mask, listing
    every case of the run, so a mask folder without one of them would be uploaded incomplete.
    The folders of the evaluation are checked (a run of one --mode writes one), or the one
    folder given; a folder outside an evaluation holds one's own masks, not checked."""
    if evaluation is None:
        return
    whole = evaluation == input_dir
    found = {(s.parent.name, nifti_stem(s)) for s in sources if s.parent.parent == evaluation}
    missing = [f"{folder}/{case}" for folder in (evaluation_mask_folders(input_dir) if whole else [input_dir.name])
               for case in record["case"] if (folder, case) not in found]
    if missing:
        what = "an evaluation" if whole else "a mask folder of an evaluation"
        raise UsageError(f"--input_dir {args.input_dir} is {what} that did not finish: "
                         f"{len(missing)} mask(s) of the cases its {CASES_RECORD} lists are missing "
                         f"(e.g. {missing[0]}.nii.gz); finish it with the same eval.py command "
                         "and --resume, then post-process again")


def t1ce_files(sources, input_dir, evaluation, record, images):
    """For the K-means rule: each mask's T1ce file, or None when its subset lacks T1ce.

    A mask's subset is its folder's name when that names modalities (eval.py's 'flair+t1ce'
    folders, or --input_dir preds/flair+t1ce); otherwise the modalities eval.py recorded in
    cases.csv that it predicted the case from (its 'available' folder: a T1ce added to the case
    folder since did not make the mask), else (a folder of one's own) those present in the case
    folder (an all-zero T1ce counting as missing). Case folders are --images/<case>, else
    those eval.py recorded in cases.csv (`record`, None without one).
    """
    predicted_from = (dict(zip(record["case"], record["available"]))
                      if record is not None and "available" in record else {})
    if images is not None:
        folder_of = {}
    elif record is not None:
        folder_of = dict(zip(record["case"], record["folder"]))
    else:
        raise UsageError(f"--kmeans_necrosis reads each case's T1ce: pass --images (the folder of "
                         f"the case folders), or post-process an eval.py output folder (its "
                         f"{CASES_RECORD} says where the cases are)")
    paths = []
    for source in sources:
        case = nifti_stem(source)
        if images is not None:
            folder = Path(images) / case
        elif case in folder_of:
            folder = Path(folder_of[case])
        else:
            raise CaseError(case, evaluation / CASES_RECORD, "case not listed: pass --images")
        try:
            subset = parse_subset(source.parent.name)
        except ValueError:  # not a subset folder
            subset = parse_subset(predicted_from[case]) if case in predicted_from else None
        files = case_files(folder, allow_missing=True)
        if subset is not None:
            uses_t1ce = T1CE in subset
            if uses_t1ce:
                require_modalities(folder, files, (T1CE,))
        else:  # as eval.py and predict.py: an all-zero T1ce is a missing one's placeholder
            path = files.get("t1ce")
            uses_t1ce = path is not None and not is_placeholder(
                case, path, open_files(case, {"t1ce": path})["t1ce"])
        if uses_t1ce:
            check_t1ce_shape(case, files["t1ce"], source, input_dir, images)
        paths.append(files["t1ce"] if uses_t1ce else None)
    return paths


def check_t1ce_shape(case, t1ce, source, input_dir, images):
    """Refuse a T1ce whose shape is not its mask's (the K-means rule reads them voxel by
    voxel), from the headers, before any mask is written. A mask lies on its case's grid
    (eval.py and predict.py write it there): the T1ce is another case's, most likely from an
    --images naming another dataset, the mask is not to blame."""
    shape = open_files(case, {"t1ce": t1ce})["t1ce"].shape[:3]
    mask_shape = open_files(case, {"seg": source})["seg"].shape[:3]
    if shape == mask_shape:
        return
    mask = source.relative_to(input_dir)
    problem = f"shape {shape}, not the shape {mask_shape} of the mask {mask}"
    if images is not None:
        raise UsageError(f"--images {images}: its T1ce {t1ce} has {problem}: another dataset's "
                         "case? Check --images (the folder of these masks' case folders)")
    raise CaseError(case, t1ce, f"{problem}: not the case folder evaluated? Pass --images (the "
                                "folder of these masks' case folders)")


def clear_other_masks(output_dir, targets, args):
    """The output folder is what gets uploaded: masks of an earlier run that this one does not
    replace (other cases, other subsets) would go with it. Refused, or deleted (--overwrite)."""
    others = [p for p in find_masks(output_dir) if p not in targets] if output_dir.is_dir() else []
    scans = [p for p in others if named_like_a_scan(p)]
    if scans:  # never deleted, not even with --overwrite: the folder holds a dataset
        raise UsageError(f"--output_dir {args.output_dir} holds MRI scans or labels, not only "
                         f"masks (e.g. {scans[0].relative_to(output_dir)}): a data folder? "
                         "Choose another --output_dir")
    if others and not args.overwrite:
        raise UsageError(f"--output_dir {args.output_dir} holds {len(others)} mask(s) that this run "
                         f"does not write (e.g. {others[0].relative_to(output_dir)}), from an earlier "
                         "run; --overwrite deletes them, or choose another --output_dir")
    for path in others:
        path.unlink()
    for folder in {path.parent for path in others} - {output_dir}:  # a subset's, now empty
        if not any(folder.iterdir()):
            folder.rmdir()
    if others:
        print(f"--overwrite: deleted {len(others)} mask(s) of an earlier run from {args.output_dir}")


def _overlap(a, b):
    return a == b or a in b.parents or b in a.parents


def parse_args(argv=None):
    parser = ArgumentParser(prog="postprocess.py", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input_dir", type=path_given, default=EVAL_OUTPUT_DIR,
                        help="folder of <case>.nii.gz masks, or eval output with one folder per "
                             "subset (default %(default)s: eval.sh's output)")
    parser.add_argument("--output_dir", type=path_given, default=DEFAULT_OUTPUT_DIR,
                        help="where cleaned masks go (same relative paths); must not overlap "
                             "input_dir (default %(default)s)")
    g = parser.add_argument_group("the released script's K-means rule (off by default)")
    g.add_argument("--kmeans_necrosis", action="store_true",
                   help="relabel the middle T1ce intensity group of a component's edema as necrosis")
    g.add_argument("--images", type=path_given, default=None,
                   help="folder of the case folders (<images>/<case>/), for their T1ce "
                        "(default: the folders eval.py recorded in input_dir/cases.csv)")
    add_threshold_args(parser, g)
    add_et_label_arg(parser)
    parser.add_argument("--num_workers", type=int_at_least(0), default=default_workers(),
                        help="parallel processes; 0 or 1: in this process (default %(default)s)")
    parser.add_argument("--overwrite", action="store_true",
                        help="delete the masks in --output_dir that this run does not write (an "
                             "earlier run's other cases or subsets); refused without it")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    unused = unused_threshold(args, True, args.kmeans_necrosis)
    if unused:
        raise UsageError(unused)
    if args.images is not None and not args.kmeans_necrosis:  # it would change nothing
        raise UsageError("--images is where the K-means rule finds T1ce: add --kmeans_necrosis")
    input_dir, output_dir = args.input_dir.resolve(), args.output_dir.resolve()
    if not input_dir.is_dir():
        raise UsageError(f"--input_dir {args.input_dir} is not a folder (run from the repository "
                         f"root after eval.sh, or pass --input_dir)")
    if _overlap(input_dir, output_dir):
        raise UsageError(f"--output_dir {args.output_dir} must not be, contain or lie inside "
                         f"--input_dir {args.input_dir}: the input masks are never overwritten")
    # An evaluation's masks are what its metrics.csv scores (and eval.py --resume keeps):
    # post-processed masks in their place would be scored, and uploaded, as the model's.
    records = [name for name in (EVAL_RECORD, CASES_RECORD) if (output_dir / name).is_file()]
    if records:
        raise UsageError(f"--output_dir {args.output_dir} is an eval.py output folder (it holds "
                         f"{records[0]}): its masks are the evaluation's; choose another "
                         "--output_dir")
    sources = find_masks(input_dir)
    evaluation = evaluation_of(input_dir)
    record = cases_record_of(evaluation)
    check_input(sources, input_dir, record, args)
    check_complete(input_dir, evaluation, record, sources, args)
    if not sources:
        raise UsageError(f"no {' or '.join(EXTENSIONS)} masks found under {args.input_dir}")
    for source in sources:  # headers only: an empty or non-NIfTI mask stops the run before any work
        open_files(nifti_stem(source), {"seg": source})
    rules = rules_from_args(args)
    t1ce = (t1ce_files(sources, input_dir, evaluation, record, args.images) if args.kmeans_necrosis
            else [None] * len(sources))
    et_label = et_label_of(args, lambda: brats_2023_case(sources, record))
    jobs = [(s, output_dir / s.relative_to(input_dir), rules, t, str(s.relative_to(input_dir)),
             et_label) for s, t in zip(sources, t1ce)]
    for job in jobs:  # named now, not by a worker once the masks before it are written
        if job[1].parent.resolve().is_relative_to(input_dir):  # a folder linked into the input
            raise UsageError(f"--output_dir {args.output_dir}: {job[1].parent} leads into "
                             f"--input_dir {args.input_dir}: the input masks are never overwritten")
        check_file_writable(job[1])
    # Locked, as eval.py's: a second run would have its masks deleted (--overwrite) and its
    # temporaries taken for stale ones.
    with exclusive_lock(output_dir, "output folder"):
        clear_other_masks(output_dir, {job[1] for job in jobs}, args)
        stale = remove_temps_below(output_dir)
        if stale:
            print(f"deleted {stale} temporary file(s) left in {args.output_dir} by interrupted writes")
        progress = dict(total=len(jobs), desc="postprocess", unit="mask",
                        mininterval=progress_interval())
        if args.num_workers <= 1 or len(jobs) <= 1:  # a pool of one would only add its start
            infos = [process_file(job) for job in tqdm(jobs, **progress)]
        else:
            with worker_pool(min(args.num_workers, len(jobs))) as pool:
                infos = list(tqdm(pool.map(process_file, jobs), **progress))

    for info in infos:
        for warning in info["warnings"]:
            print(f"warning: {warning}", file=sys.stderr)
    removed = sum(i["components_removed"] for i in infos)
    relabelled = sum(i["et_relabelled"] for i in infos)
    kmeans = (f", edema relabelled as NCR by K-means in "
              f"{sum(i['necrosis_relabelled'] > 0 for i in infos)} mask(s) "
              f"({sum(t is None for t in t1ce)} without T1ce skipped)" if args.kmeans_necrosis else "")
    print(f"{len(infos)} mask(s) -> {args.output_dir}: {removed} component(s) removed, "
          f"ET relabelled as NCR in {relabelled} mask(s){kmeans}")
    return infos


if __name__ == "__main__":
    run_cli(main)
