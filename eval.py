r"""Export segmentation masks (and, when the cases have labels, score them) for modality subsets.

Examples (from the repository root):

    # the published command: full-modality masks for the online validation set
    # (--data_dir datalist/ holds the lists; their entries point at ../data/BraTS-2018/...)
    python eval.py --input_size 80,160,160 --num_classes 3 --data_list BraTS18/BraTS18_test.csv \
        --weight_std True --restore_from snapshots/LCKD_stage2/final.pth --mode 0,1,2,3
    # all 15 subsets in one pass (the encoder runs once per window for all of them), scored
    # against the labels of a validation list, with the paper's table printed at the end
    python eval.py --data_list BraTS18/BraTS18_val.csv --data_root /data/BraTS2018 \
        --restore_from snapshots/LCKD_stage2/final.pth --mode all --output_dir outputs/val
    # incomplete cases (say FLAIR and T1ce only): each case with exactly the modalities it has
    python eval.py --input /data/new_patients --restore_from snapshots/LCKD_stage2/final.pth \
        --mode available --output_dir outputs/new --figures
    # BraTS 2021 on 4 GPUs: the cases are split over the processes, one table at the end
    torchrun --nproc_per_node 4 eval.py --input /data/BraTS2021_Training_Data \
        --restore_from snapshots/LCKD_stage2/final.pth --mode all --output_dir outputs/brats21
    # the same command with --resume after a scheduler's time limit stopped it: the cases
    # already exported are scored from their masks, the rest predicted
    torchrun --nproc_per_node 4 eval.py --input /data/BraTS2021_Training_Data \
        --restore_from snapshots/LCKD_stage2/final.pth --mode all --output_dir outputs/brats21 --resume

The network is rebuilt from the configuration stored in the checkpoint (model size, weight
standardisation, norm, activation, patch size); a model flag given must agree with it (the
window, --input_size, may differ from the training patch).
Cases come from a datalist (--data_list) or a folder (--input: a folder of case folders, or one
case folder). Every case is checked (files present for the subsets asked, headers readable,
one grid) before anything is written. A modality file that is all zero is the placeholder of a
missing modality (the published code needs four files per case): --mode available predicts the
case without it, and a subset that needs it is an error naming the file.

Under torchrun each process uses the GPU of its LOCAL_RANK (or the CPU with --device cpu) and
predicts every world-size-th case of the list, writing its masks and figures; the checks run
once, on rank 0, which also writes the run's files below from the metrics of every rank,
exactly as one process would.

A stopped run (Ctrl-C, a scheduler's time limit, a crash) is continued by the same command with
--resume: the cases whose masks are all in --output_dir are scored from those files, the others
predicted. It is refused when the first run's checkpoint (its SHA-256), model, window, subsets,
inference flags or list of cases differ, so that one folder never mixes two models' masks, or
(--mode available) when an exported case's modality files changed; a case not yet predicted
is predicted from the files it has now (e.g. an all-zero placeholder removed).

Writes, under --output_dir (refused if it holds a previous evaluation, unless --overwrite or
--resume):
    <subset>/<case>.nii.gz   one uint8 mask per case and subset (e.g. flair+t1ce/Brats18_X.nii.gz),
                             on the input images' grid, labels 0/1/2/4; with --mode available
                             available/<case>.nii.gz, each case with the modalities it has
    eval_config.json         the resolved settings
    cases.csv                case, its folder, the modalities it has (available)
and when the cases have labels:
    metrics.csv              case, subset, region, dice, hd95, sensitivity, specificity
    summary.csv, summary.md  the paper's table: one row per subset, its cases, Dice (%) and
                             HD95 (mm) of ET/TC/WT, and the mean over every mask
and with --figures:
    figures/<case>.png       a slice through the tumour of each modality, one row per subset
    dice.png                 the summary table as a chart (labelled cases only)
"""
import contextlib
import json
import os
import sys
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import pandas as pd
from tqdm import tqdm

from datasets.brats import (
    Case, CaseError, DataError, available_subset, brats_like_warnings, case_files, check_grid,
    find_cases, holds_nifti, named_folder, read_datalist, read_files, refuse_duplicates,
    require_folder, require_modalities, resolve_list, to_network_order, without_placeholders,
)
from datasets.normalize import normalize_case
from utils import distributed, figures
from utils.cli import ArgumentParser, UsageError, path_given, positive_int, progress_interval, run_cli
from utils.export import (CASES_RECORD, EVAL_OUTPUT_DIR, EVAL_RECORD, read_cases_record,
                          read_mask, save_labels)
from utils.io import (atomic_path, check_file_writable, file_sha256, is_temp,
                      remove_stale_temps, write_text)
from utils.lock import exclusive_lock
from utils.metrics import DEFAULT_HD95_METHOD, HD95_METHODS, region_metrics
from utils.modalities import (ALL_SUBSETS, AVAILABLE, MASK_FOLDERS, MODALITIES, parse_mode,
                              subset_name)
from utils.segment import MODEL_FLAGS, add_inference_args, add_model_args, load_model, segment

PUBLISHED_DATA_LIST = "BraTS18/BraTS18_test.csv"
TABLE_REGIONS = ("ET", "TC", "WT")  # the paper's column order
TABLE_MODALITIES = ("FLAIR", "T1", "T1ce", "T2")  # MODALITIES as the paper writes them
PRESENT, ABSENT = "●", "○"
UNUSED_FIX = "replace it, or move it out of the case folder (no subset asked uses it)"
# Everything eval.py writes into --output_dir: what --overwrite removes, and nothing else.
RECORD_FILES = (EVAL_RECORD, CASES_RECORD)  # written before any mask
REPORT_FILES = ("metrics.csv", "summary.csv", "summary.md", "dice.png")  # written after the last
RUN_FILES = RECORD_FILES + REPORT_FILES
FIGURE_FOLDER = "figures"
# The settings of eval_config.json that shape the masks: --resume requires the first run's.
# (--device, --batch_size, --workers, --hd95, --figures and where the cases are read from may
# change: the masks are the same, up to float rounding across devices.)
MASK_SETTINGS = ("checkpoint_sha256", "model", "window", "subsets", "average", "overlap",
                 "gaussian", "mirror", "amp")


def parse_args(argv=None):
    p = ArgumentParser(prog="eval.py", description=__doc__.split("\n")[0])
    g = p.add_argument_group("data")
    g.add_argument("--input", type=path_given, default=None,
                   help="a folder of case folders, or one case folder (instead of a datalist)")
    g.add_argument("--data_dir", default="datalist/",
                   help="folder --data_list is looked up in when not found as given (published)")
    g.add_argument("--data_list", default=None, help=f"datalist (default {PUBLISHED_DATA_LIST})")
    g.add_argument("--data_root", default=None,
                   help="re-base the list's case folders onto this folder (see datasets.brats)")
    g.add_argument("--output_dir", type=path_given, default=EVAL_OUTPUT_DIR,
                   help="default %(default)s, eval.sh's and postprocess.py's (outputs/ holds every "
                        "run's folder)")
    g.add_argument("--overwrite", action="store_true",
                   help="replace a previous evaluation in --output_dir (only eval.py's files)")
    g.add_argument("--resume", action="store_true",
                   help="continue a stopped evaluation in --output_dir: keep its masks (scored from "
                        "the files), predict the rest; the run's settings must be the first's")
    g.add_argument("--restore_from", type=path_given, required=True,
                   help="checkpoint (.pth) written by train.py")
    add_model_args(p)
    g = add_inference_args(p)
    g.add_argument("--mode", default="0,1,2,3",
                   help="one subset ('0,2' or 'flair,t1ce'), 'all' for the 15 subsets, or "
                        "'available': each case with the modalities it has")
    g.add_argument("--hd95", choices=HD95_METHODS, default=DEFAULT_HD95_METHOD,
                   help="'max' of the two directed 95th percentiles (MONAI/DeepMind) or 'pooled' (MedPy)")
    g.add_argument("--workers", type=positive_int, default=4,
                   help="threads writing masks and computing metrics while the next case runs")
    g.add_argument("--figures", action="store_true",
                   help="write figures/<case>.png (and dice.png for labelled cases)")
    return p.parse_args(argv)


def parse_eval_mode(text):
    """--mode -> 'available' or a list of subsets."""
    if str(text).strip().lower() == AVAILABLE:
        return AVAILABLE
    try:
        mode = parse_mode(text)
    except ValueError as error:
        raise UsageError(f"--mode: {error}; or 'all' (the 15 subsets) or 'available'") from None
    if mode == "random":
        raise UsageError("--mode random is a training mode: give a subset (e.g. 0,2), 'all' "
                         "or 'available'")
    return list(ALL_SUBSETS) if mode == "all" else [mode]


def case_folders(args):
    """The case folders to evaluate, from --input or the datalist; duplicates refused."""
    if args.input is not None:
        if args.data_list is not None:
            raise UsageError("give --input or --data_list, not both")
        if args.data_root:  # it re-bases a datalist's entries; --input names the cases as they are
            raise UsageError(f"--data_root re-bases a datalist's case folders: with --input "
                             f"{args.input} it would do nothing; drop it")
        require_folder(args.input, "--input ")
        folders, source = find_cases(args.input), args.input
    else:
        if args.data_list == "":
            raise UsageError("--data_list '' names no list: give a datalist, or --input DIR")
        source = resolve_list(args.data_list or PUBLISHED_DATA_LIST, args.data_dir)
        if source.is_dir():  # maybe meant as --input
            fix = (f"to evaluate its case(s), pass --input {source}" if holds_cases(source)
                   else "give a datalist file (one case folder per line)")
            raise UsageError(f"--data_list {source} is a folder, not a datalist: {fix}")
        folders = read_datalist(source, args.data_root or None)  # as train.py: '' is none
        if not folders:
            raise UsageError(f"--data_list {source} lists no cases")
    refuse_output_among_cases(args, folders, source)
    refuse_duplicates(folders, source)  # two masks would go to the same file
    refuse_undecodable(folders)
    return folders


def holds_cases(folder):
    """Whether `folder` is what --input reads: a case folder, or a folder of them (one at least
    holding NIfTI files)."""
    try:
        return any(holds_nifti(case) for case in find_cases(folder))
    except (DataError, OSError):
        return False


def refuse_output_among_cases(args, folders, source):
    """UsageError for an --output_dir that is, or is inside, a folder the cases are read from:
    the folder of case folders (--input, or one holding a listed case), whose next reading would
    take the masks' folders for cases, or a case folder (--input one case), whose scans the
    masks would sit among."""
    out = args.output_dir.resolve()
    if args.input is not None:
        if not out.is_relative_to(args.input.resolve()):
            return
        if folders == [named_folder(args.input)]:
            raise UsageError(f"--output_dir {args.output_dir} is inside --input {args.input}, a "
                             "case folder (the masks would sit among its scans): choose an "
                             "output folder outside it")
        raise UsageError(f"--output_dir {args.output_dir} is inside --input {args.input}, "
                         "whose folders are read as cases (the next run would take the "
                         "masks' folders for cases): choose an output folder outside it")
    for folder in folders:
        if out.is_relative_to(folder.parent.resolve()):
            raise UsageError(f"--output_dir {args.output_dir} is inside {folder.parent}, which "
                             f"holds case folders of --data_list {source} (e.g. {folder.name}): "
                             "the masks' folders would sit among the cases (--input would take "
                             "them for cases); choose an output folder outside it")


def refuse_undecodable(folders):
    """Raise CaseError for a case folder whose path is not UTF-8 text (Python holds its odd
    bytes as surrogates): cases.csv and metrics.csv, written in UTF-8, could not take it, and
    the run would stop at the first table."""
    for folder in folders:
        path = os.fsencode(folder.resolve())
        try:
            path.decode()
        except UnicodeDecodeError as err:
            shown = path.decode(errors="backslashreplace")
            raise CaseError(Path(shown).name, shown, f"the path is not UTF-8 text (byte "
                            f"0x{path[err.start]:02x}), which eval.py's tables are written in: "
                            "rename the folder that holds it") from None


def check_cases(folders, mode):
    """Check every case's files before any work -> {case folder: {part: Path} to read}.

    Headers only: a missing file a subset needs, an unreadable file, or files of different
    shapes or affines stop the run here, naming the case and the file. A modality file that is
    all zero is the placeholder of a missing modality (is_placeholder, cheap on a scan): the case
    is read without it, saying so, unless a subset asked needs it (an error).
    """
    needed = sorted(set().union(*mode)) if mode != AVAILABLE else []
    checked = {}
    for folder in folders:
        files = case_files(folder, allow_missing=True)
        require_modalities(folder, files, needed)
        try:
            files, dropped = without_placeholders(folder.name, files)
        except CaseError as err:
            if not unused_by(mode, files, err.path):
                raise
            raise CaseError(err.case, err.path, f"{err.problem}; {UNUSED_FIX}") from None
        for part, path in dropped.items():
            if MODALITIES.index(part) in needed:
                raise CaseError(folder.name, path, f"all zero: the placeholder of a missing "
                                f"{part}, needed by subset {subset_name(needed)} (--mode "
                                "available predicts each case from the modalities it has)")
            print(f"{folder.name}: {path.name} is all zero: {part} counted as missing")
        checked[folder] = files
    return checked


def unused_by(mode, files, path):
    """Whether `path`, one of a case's `files`, is a modality file that no subset of `mode`
    uses: it is read all the same (the figures and cases.csv show every modality a case has),
    so a damaged one may also be moved out of the case folder (UNUSED_FIX)."""
    part = next((p for p, f in files.items() if f == path), "seg")
    return (mode != AVAILABLE and part in MODALITIES
            and not any(MODALITIES.index(part) in subset for subset in mode))


def previous_run(output_dir):
    """The files an earlier eval.py left in output_dir (see RUN_FILES), incl. temporaries."""
    found = [output_dir / name for name in RUN_FILES if (output_dir / name).exists()]
    for folder, pattern in [(m, "*.nii.gz") for m in MASK_FOLDERS] + [(FIGURE_FOLDER, "*.png")]:
        if (output_dir / folder).is_dir():
            found += sorted((output_dir / folder).glob(pattern))  # pathlib's * matches .temps
    return found


def clear_previous_run(output_dir, found):
    """Delete `found` (previous_run), stale temporaries, and the folders left empty."""
    for path in found:
        path.unlink()
    for name in RUN_FILES:
        remove_stale_temps(output_dir / name)
    for folder in MASK_FOLDERS + (FIGURE_FOLDER,):
        path = output_dir / folder
        if path.is_dir() and not any(path.iterdir()):
            path.rmdir()


def resumed_cases(output_dir, found, record, cases, mode, figures):
    """--resume: check that the evaluation in output_dir (found: previous_run) is this run's,
    remove what it left half-done -> the names of the cases whose files are all there."""
    if not found:
        return set()  # nothing to continue: a fresh run
    try:
        previous = json.loads((output_dir / EVAL_RECORD).read_text())
        listed = read_cases_record(output_dir)
    except (OSError, ValueError) as error:
        raise UsageError(f"--resume: {output_dir} holds files of an evaluation (e.g. "
                         f"{found[0].name}) but not its record ({error}); pass --overwrite to "
                         "replace them") from None
    if isinstance(previous, dict):
        previous.setdefault("average", "logits")  # what eval.py did before --average
    for key in MASK_SETTINGS:
        if key not in previous:
            raise UsageError(f"--resume: {output_dir / EVAL_RECORD} does not record "
                             f"{key} (an older eval.py wrote it); pass --overwrite to redo the "
                             "evaluation")
        if previous[key] != record[key]:
            setting, first, this = f"{key} ", previous[key], record[key]
            if key == "checkpoint_sha256":  # a hash alone does not say which file it was
                first, this = (f"{run[key]} ({run['restore_from']})"
                               for run in (previous, record))
            elif key == "model":  # the whole network is some 600 characters: what differs
                setting, (first, this) = "", network_changes(first, this)
            raise UsageError(f"--resume: the evaluation in {output_dir} was made with {setting}"
                             f"{first}, this run's is {this}; resume it with its own settings, "
                             "or pass --overwrite to replace it")
    before, now = listed["case"].tolist(), cases["case"].tolist()
    if before != now:
        i = next(i for i in range(max(len(before), len(now))) if before[i:i + 1] != now[i:i + 1])
        entry = lambda rows: rows[i] if i < len(rows) else "none"
        raise UsageError(f"--resume: {output_dir / CASES_RECORD} lists {len(before)} cases, this "
                         f"run {len(now)}; entry {i + 1} differs ({entry(before)} vs "
                         f"{entry(now)}); resume with the first run's cases, or pass --overwrite")
    files = set(found)
    done = {name for name in now
            if all(mask_path(output_dir, folder, name) in files for folder in mask_folders(mode))
            and (not figures or figure_path(output_dir, name) in files)}
    if mode == AVAILABLE:
        # A case whose masks are written must keep the modalities they were predicted from; one
        # not yet predicted may have gained or lost a file (a placeholder removed, a scan added).
        for name, first, this in zip(now, listed["available"], cases["available"]):
            if name in done and first != this:
                raise UsageError(f"--resume: the mask of case {name} in {output_dir} was "
                                 f"predicted from {first}, its folder now has {this}; restore "
                                 "its files, or pass --overwrite")
    # `found` lists the masks and figures, and the temporaries of killed writes among them.
    report = {output_dir / name for name in REPORT_FILES}  # rewritten from every case at the end
    for path in found:
        if is_temp(path) or path in report:
            path.unlink()
    for name in RUN_FILES:
        remove_stale_temps(output_dir / name)
    return done


def mask_path(output_dir, folder, name):
    return output_dir / folder / f"{name}.nii.gz"


def figure_path(output_dir, name):
    return output_dir / FIGURE_FOLDER / f"{name}.png"


def mask_folders(mode):
    """The folders a run of `mode` writes each case's masks into."""
    return [AVAILABLE] if mode == AVAILABLE else [subset_name(s) for s in mode]


def metric_rows(case, subset, label, hd95_method):
    """One mask (D, H, W) of `case`, predicted from `subset` -> its rows of metrics.csv ([]
    without a label)."""
    if case.label is None:
        return []
    scores = region_metrics(label, case.label, case.spacing, hd95_method=hd95_method)
    return [{"case": case.name, "subset": subset_name(subset), "region": region, **values}
            for region, values in scores.items()]


def export_and_score(case, folder, subset, label, output_dir, hd95_method):
    """Write one mask (D, H, W) of one case into `folder`; return its metric rows."""
    save_labels(label, case.affine, case.header, mask_path(output_dir, folder, case.name))
    return metric_rows(case, subset, label, hd95_method)


def saved_case(case_dir, files):
    """A case whose masks an earlier run wrote (--resume), files: check_cases' -> its grid and
    label, no image (one modality is read, for the grid); without a label, nothing is read
    (nothing to score)."""
    available = available_subset(files)
    if "seg" not in files:
        return Case(name=Path(case_dir).name, files=files, image=None, label=None, affine=None,
                    header=None, shape_xyz=None, spacing=None, available=available)
    first = MODALITIES[available[0]]
    case = read_files(Path(case_dir).name,
                      {part: files[part] for part in (first, "seg") if part in files})
    case.image, case.available = None, available
    return case


def score_saved(case, folder, subset, output_dir, hd95_method):
    """The metric rows of the mask an earlier run wrote into `folder` (--resume). A mask that
    cannot be read, or lies on another grid than its case (saved_case read its first modality),
    stops the run: scored, it would be scored wrong."""
    if case.label is None:
        return []
    path = mask_path(output_dir, folder, case.name)
    reference = case.files[MODALITIES[case.available[0]]], case.shape_xyz, case.affine
    try:
        label, image = read_mask(path)
        check_grid(case.name, path, image.shape[:3], image.affine, reference, fix=None)
    except CaseError as err:
        raise CaseError(err.case, err.path, f"{err.problem}; remove it (--resume then predicts "
                        "the case again), or run with --overwrite") from None
    return metric_rows(case, subset, to_network_order(label), hd95_method)


def summary_table(metrics, subsets):
    """Per-case metrics -> the paper's table: one row per subset (in `subsets` order) + mean.

    Each row: the subset's modalities, its number of cases, Dice in % and HD95 in mm averaged
    over them. The mean row averages every mask scored: the mean of the subsets when each
    holds every case (the paper's table, --mode all), weighted by their cases in --mode
    available, where each case has its own subset.
    """
    def scores(rows):
        means = rows.groupby("region")[["dice", "hd95"]].mean()
        return ({f"{r} Dice": 100 * means.loc[r, "dice"] for r in TABLE_REGIONS}
                | {f"{r} HD95": means.loc[r, "hd95"] for r in TABLE_REGIONS})

    table = []
    for subset in subsets:
        rows = metrics[metrics["subset"] == subset_name(subset)]
        table.append({"subset": subset_name(subset)}
                     | {m: PRESENT if i in subset else ABSENT
                        for i, m in enumerate(TABLE_MODALITIES)}
                     | {"cases": rows["case"].nunique()} | scores(rows))
    listed = metrics[metrics["subset"].isin([row["subset"] for row in table])]
    table.append({"subset": "mean"} | {m: "" for m in TABLE_MODALITIES}
                 | {"cases": listed["case"].nunique()} | scores(listed))
    return pd.DataFrame(table)


def markdown(table):
    header = "| " + " | ".join(table.columns) + " |"
    lines = [header, "|" + "|".join("---" for _ in table.columns) + "|"]
    for _, row in table.iterrows():
        cells = [f"{v:.2f}" if isinstance(v, float) else str(v) for v in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def network_changes(first, this):
    """Two recorded networks (LCKDConfig.to_dict()) -> for each, the fields in which they
    differ with its values, named by their flags where they have one ('--weight_std True')."""
    name = {field: f"--{flag}" for flag, field in MODEL_FLAGS.items()}
    changed = [key for key in sorted(first.keys() | this.keys()) if first.get(key) != this.get(key)]
    return tuple(", ".join(f"{name.get(key, key)} {run.get(key)}" for key in changed)
                 for run in (first, this))


def process_device(name, info, rank_device):
    """--device -> this process's device. A plain run takes it as given (cuda:N included); under
    torchrun each process has its own (rank_device: cuda:LOCAL_RANK, or the CPU), so naming one
    GPU is refused."""
    device = distributed.resolve_device(name)
    if not info.enabled:
        return device
    if device.index is not None:
        raise UsageError(f"--device {name}: under torchrun each process uses the GPU of its "
                         "LOCAL_RANK; give --device cuda or auto (and choose the GPUs with "
                         "CUDA_VISIBLE_DEVICES)")
    return rank_device


class Checked(NamedTuple):
    """What check() found, for the run."""
    mode: tuple  # the subsets (parse_eval_mode)
    folders: list  # the case folders, in the order of the tables
    files: dict  # case folder -> {part: Path} to read (check_cases)
    device: object
    loaded: tuple  # load_model's (model, config, window)
    record: dict  # eval_config.json (run_record)
    cases: pd.DataFrame  # cases.csv
    done: set  # the names of the cases --resume found exported


def check(args, info, rank_device, held):
    """Every check before any work, in this order: the flags, the cases' files, the checkpoint,
    then the output folder, locked (in the ExitStack `held`, for the whole run) and cleared of a
    previous evaluation with --overwrite, or checked to be this run's with --resume. -> Checked"""
    mode = parse_eval_mode(args.mode)
    if args.resume and args.overwrite:
        raise UsageError("give --resume (continue the evaluation in --output_dir) or --overwrite "
                         "(replace it), not both")
    device = process_device(args.device, info, rank_device)
    folders = case_folders(args)
    files = check_cases(folders, mode)
    loaded = load_model(args.restore_from, args, device)
    record = run_record(args, info, mode, folders, *loaded[1:], device)
    cases = pd.DataFrame({"case": [f.name for f in folders],
                          "folder": [str(f.resolve()) for f in folders],
                          "available": [subset_name(available_subset(files[f])) for f in folders]})
    output_dir = args.output_dir
    held.enter_context(exclusive_lock(output_dir, "output folder"))
    found = previous_run(output_dir)
    for path in found:  # a folder under one of eval.py's names: named now, not after the work
        check_file_writable(path)
    if args.resume:
        done = resumed_cases(output_dir, found, record, cases, mode, args.figures)
        return Checked(mode, folders, files, device, loaded, record, cases, done)
    if found and not args.overwrite:
        raise UsageError(f"--output_dir {output_dir} holds a previous evaluation ({len(found)} "
                         f"files, e.g. {found[0].name}); pass --resume to continue it, "
                         "--overwrite to replace it (only eval.py's files are removed) or choose "
                         "another folder")
    clear_previous_run(output_dir, found)
    return Checked(mode, folders, files, device, loaded, record, cases, set())


def main(argv=None):
    args = distributed.before_init(lambda: parse_args(argv))
    # Under torchrun each process takes cuda:LOCAL_RANK (NCCL), or the CPU with --device cpu
    # (gloo); a plain run's device is --device as given, resolved in check().
    plain = distributed.launched_world_size() == 1
    info, device = distributed.init("cpu" if plain or args.device == "cpu" else "auto")
    try:
        with contextlib.ExitStack() as held:
            # The checks run once, on rank 0, and a refusal there stops every rank. Rank 0 then
            # holds the output folder's lock for the whole run and has cleared a previous
            # evaluation before any rank writes; the others load the checkpoint it found sound.
            def check_and_record():
                checked = check(args, info, device, held)
                write_text(args.output_dir / EVAL_RECORD,
                           json.dumps(checked.record, indent=2))
                with atomic_path(args.output_dir / CASES_RECORD) as tmp:
                    checked.cases.to_csv(tmp, index=False)
                if args.resume:
                    done, total = len(checked.done), len(checked.folders)
                    print(f"--resume: {done} of {total} cases already exported in "
                          f"{args.output_dir} (scored from their masks), {total - done} to predict")
                return checked

            checked = distributed.on_main_rank(check_and_record, info)
            if info.is_main:
                device, (model, _, window) = checked.device, checked.loaded
            else:
                model, _, window = load_model(args.restore_from, args, device)
            mode, folders, files, done = distributed.broadcast_object(
                (checked.mode, checked.folders, checked.files, checked.done) if info.is_main
                else None, info)
            # Case i goes to rank i % world size: every rank writes its own cases' files.
            share = folders[info.rank::info.world_size]
            if info.is_main and info.enabled:
                print(f"{len(folders)} cases over {info.world_size} processes (the progress bar "
                      f"counts rank 0's {len(share)})")
            rows = run(args, mode, share, files, model, window, device, done,
                       progress=info.is_main)
            parts = distributed.gather_object(rows, info)
            if not info.is_main:
                return None
            order = {folder.name: i for i, folder in enumerate(folders)}
            rows = sorted((row for part in parts for row in part), key=lambda r: order[r["case"]])
            return report(args, mode, checked.cases, rows)
    finally:
        distributed.cleanup(info)


@contextlib.contextmanager
def thread_pool(workers):
    """A ThreadPoolExecutor that, when the block is stopped (Ctrl-C, SIGTERM), finishes the
    jobs running (each file is written whole or not at all) and drops the queued ones instead
    of running them all first, as the executor's own exit would. When the block fails (a case
    that cannot be read), every job submitted still runs: the masks already predicted are
    written, so --resume need not predict them again."""
    pool = ThreadPoolExecutor(workers)
    try:
        yield pool
    except KeyboardInterrupt:
        pool.shutdown(cancel_futures=True)
        raise
    finally:
        pool.shutdown()


def collect(scored, drawn):
    """Wait for one case's writers (raising their errors) -> its metric rows."""
    for future in drawn:
        future.result()
    return [row for future in scored for row in future.result()]


def run_record(args, info, mode, folders, config, window, device):
    """The resolved settings, as eval_config.json holds them (JSON types)."""
    return json.loads(json.dumps(
        vars(args) | {"subsets": mode if mode == AVAILABLE else [subset_name(s) for s in mode],
                      "cases": len(folders), "window": window, "device": str(device),
                      "world_size": info.world_size, "model": config.to_dict(),
                      "checkpoint_sha256": file_sha256(args.restore_from)},
        default=str))


def run(args, mode, folders, files, model, window, device, done=frozenset(), progress=True):
    """Predict, write and score every case of `folders` (files: check_cases') -> metric rows.
    The cases named in `done` (--resume) are scored from the masks an earlier run wrote
    instead."""
    output_dir = args.output_dir

    def read(case_dir):
        """-> (case, what it does not look like of BraTS: predict.py's warnings)."""
        try:
            if case_dir.name in done:
                return saved_case(case_dir, files[case_dir]), []
            case = read_files(case_dir.name, files[case_dir])
            warnings = brats_like_warnings(case)
            if case.label is not None and not case.label.any():
                warnings.append(f"case {case.name}: {case.files['seg'].name} is all 0: scored as "
                                "a case without tumour (Dice 0 where a region is predicted); move "
                                "a placeholder label out of the case folder to export the case "
                                "without scoring it")
            case.image = normalize_case(case)
            return case, warnings
        except CaseError as err:  # seen only in the voxels: NaN, a truncated or corrupted file
            if err.path == files[case_dir].get("seg"):  # a label map only scores the masks
                fix = ("replace the label file, or move it out of the case folder to export the "
                       "case without scoring it")
            elif mode == AVAILABLE:
                fix = "replace the file, or remove it if it stands in for a missing modality"
            else:
                fix = UNUSED_FIX if unused_by(mode, files[case_dir], err.path) else "replace the file"
            raise CaseError(err.case, err.path, f"{err.problem}; the cases before it are "
                            f"exported: {fix}, then run the same command with --resume") from None

    rows, folders_out = [], mask_folders(mode)
    # Reading the next case, and writing / scoring / drawing the previous ones, overlap with
    # the network's work on the current case; at most two cases wait for the writers.
    with ThreadPoolExecutor(1) as reader, thread_pool(args.workers) as writers:
        waiting = deque()
        next_case = reader.submit(read, folders[0]) if folders else None
        for i in tqdm(range(len(folders)), desc="cases", unit="case", disable=not progress,
                      mininterval=progress_interval()):
            case, warnings = next_case.result()
            if i + 1 < len(folders):
                next_case = reader.submit(read, folders[i + 1])
            for warning in warnings:
                tqdm.write(f"warning: {warning}", file=sys.stderr)
            if mode == AVAILABLE:
                subsets = [case.available]
                tqdm.write(f"{case.name}: {subset_name(case.available)}")
            else:
                subsets = mode
            if case.name in done:
                drawn = []
                scored = [writers.submit(score_saved, case, folder, subset, output_dir, args.hd95)
                          for folder, subset in zip(folders_out, subsets)]
            else:
                labels = segment(model, case.image, subsets, window, args, device)
                drawn = ([writers.submit(figures.case_figure, figure_path(output_dir, case.name),
                                         *figures.case_slices(case, subsets, labels))]
                         if args.figures else [])
                case.image = None  # the writers need the label and the grid, not the image
                scored = [writers.submit(export_and_score, case, folder, subset, label,
                                         output_dir, args.hd95)
                          for folder, subset, label in zip(folders_out, subsets, labels)]
            waiting.append((scored, drawn))
            if len(waiting) > 2:
                rows += collect(*waiting.popleft())
        while waiting:
            rows += collect(*waiting.popleft())
    return rows


def report(args, mode, cases, rows):
    """Write and print the table (labelled cases) and the Dice chart; return the table.
    cases: cases.csv's table."""
    output_dir = args.output_dir
    if mode == AVAILABLE:
        names = set(cases["available"])
        subsets = [s for s in ALL_SUBSETS if subset_name(s) in names]
        print(f"masks of {len(cases)} case(s), each with the modalities it has, written to "
              f"{output_dir / AVAILABLE}")
    else:
        subsets = mode
        print(f"masks of {len(cases)} case(s) x {len(subsets)} subset(s) written to {output_dir}")
    if args.figures:
        print(f"figures: {output_dir / FIGURE_FOLDER}/<case>.png")
    if not rows:
        print("no case has a seg file: masks only, nothing to score")
        return None
    metrics = pd.DataFrame(rows)
    scored = set(metrics["case"])
    unscored = [name for name in cases["case"] if name not in scored]
    if unscored:  # an incomplete copy of a labelled set would otherwise be scored on fewer cases
        print(f"not scored, without a seg file: {len(unscored)} case(s) ("
              + ", ".join(unscored[:3]) + (", ...)" if len(unscored) > 3 else ")"))
    present = set(metrics["subset"])
    subsets = [s for s in subsets if subset_name(s) in present]
    table = summary_table(metrics, subsets)
    for name, df in (("metrics.csv", metrics), ("summary.csv", table)):
        with atomic_path(output_dir / name) as tmp:
            df.to_csv(tmp, index=False)
    text = markdown(table)
    write_text(output_dir / "summary.md", text)
    print(f"\n{len(scored)} labelled cases, Dice (%) and HD95 (mm, {args.hd95}):\n")
    print(text)
    if args.figures:
        figures.dice_chart(output_dir / "dice.png", table,
                           f"Dice per subset, {len(scored)} cases ({output_dir.name})")
        print(f"Dice chart: {output_dir / 'dice.png'}")
    return table


if __name__ == "__main__":
    run_cli(main)
