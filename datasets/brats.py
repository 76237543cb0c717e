"""BraTS case discovery, NIfTI reading and validation.

A case is one folder holding the four modalities (and, for training data, a label map):

  BraTS 2018-2020  <case>_flair  _t1   _t1ce  _t2   _seg    (.nii or .nii.gz)
  BraTS 2021       BraTS2021_00000_flair ... (same suffixes)
  BraTS 2023       <case>-t2f    -t1n  -t1c   -t2w  -seg    (label 3 = ET, read as 4)

Arrays leave this module in network order: a NIfTI volume (X, Y, Z) becomes (Z, X, Y) =
(D, H, W), so an image is float32 (4, D, H, W) with channels in MODALITIES order.
Training needs all four modalities; inference (`allow_missing=True`) accepts any non-empty
subset of them, the missing ones' channels being zeros (`Case.available` says which are real).
Every problem with a case raises CaseError naming the case and the file.
"""
import contextlib
import dataclasses
import gzip
import os
import re
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError

from utils import metrics
from utils.modalities import BRATS_2023_NAMES, FULL, MODALITIES, subset_name

EXTENSIONS = (".nii.gz", ".nii")
# File-name suffix of each part, per naming scheme.
SCHEMES = {
    "brats2018": {"flair": "_flair", "t1": "_t1", "t1ce": "_t1ce", "t2": "_t2", "seg": "_seg"},
    "brats2023": {**{part: f"-{name}" for part, name in BRATS_2023_NAMES.items()}, "seg": "-seg"},
}
# Other names of each modality (the last '_' or '-' token of a file name): a case that lacks a
# modality beside such a file (X_T1w.nii.gz) holds its scan under a name no scheme uses.
ALIASES = {"flair": ("flair", "t2f", "t2flair", "fl"), "t1": ("t1", "t1w", "t1n", "t1native"),
           "t1ce": ("t1ce", "t1c", "t1gd", "t1wce", "t1post", "ce"), "t2": ("t2", "t2w")}
MODALITY_TOKENS = set().union(*ALIASES.values())  # any modality's name in a file name
# BraTS 2023's case names (BraTS-GLI-00000-000, BraTS-MEN-..., BraTS-PED-...)
BRATS_2023_CASE = re.compile(r"BraTS-[A-Za-z]+-\d+-\d+")
ALLOWED_LABELS = {"brats2018": (0, 1, 2, 4), "brats2023": (0, 1, 2, 3)}
ET_2018 = 4  # enhancing tumour's label in BraTS 2018-2021, ours
ET_2023 = 3  # BraTS 2023 writes enhancing tumour as 3; we read it as ET_2018
# What a 3 in a label map under BraTS 2018 names most likely means, and what to do.
SEG_LABEL_3_HINT = ("BraTS 2023 writes enhancing tumour as 3: its cases are read as such when "
                    "their files have BraTS 2023's names (<case>-seg.nii.gz, -t1c, -t1n, -t2w, -t2f)")
# What a 4 in a label map under BraTS 2023 names most likely means: a seg already relabelled.
SEG_LABEL_4_HINT = ("BraTS 2023 writes enhancing tumour as 3 (read as 4), and this file holds 4, "
                    "BraTS 2018's value: relabelled already? Set 4 back to 3, or name the case's "
                    "files as BraTS 2018-2021 do (_flair, _t1, _t1ce, _t2, _seg; ET 4)")
AFFINE_TOLERANCE = 1e-3
# What to do about a file off its case's grid (check_grid): the voxels of a case are read as one.
GRID_FIX = ("the files of a case must lie on one grid: resample (or reorient) the odd one onto "
            "the others' grid, e.g. onto the FLAIR's")
# What a BraTS-trained model assumes of its input (see brats_like_warnings).
SPACING_RANGE_MM = (0.8, 1.25)  # BraTS is resampled to 1 mm isotropic
MIN_BACKGROUND_FRACTION = 0.2  # skull-stripped BraTS volumes are about 80 % exact zeros
MIN_BRAIN_DICE = 0.9  # co-registered, skull-stripped modalities share their non-zero voxels
# What to do about an all-zero placeholder of a missing modality where every modality is read
# (training and its teacher election): eval.py and predict.py drop it.
PLACEHOLDER_FIX = ("training needs all four modalities: drop the case from the list (eval.py and "
                   "predict.py read the case without it)")
# An all-zero volume deflates 200:1 (nibabel's level) to 1000:1, a scan (even 80 % background)
# about 7:1: a .nii.gz smaller than 1/PLACEHOLDER_DEFLATE of its voxels' bytes is read to tell.
PLACEHOLDER_DEFLATE = 20
# A scan this module does not read, by its name: another image format (BraTS 2015's .mha,
# .nrrd, FreeSurfer's .mgz, Analyze .hdr/.img) or an unfinished download or a backup of one
# (X_t1.nii.gz.part, X_t1.nii.gz~); not a checksum or sidecar (X_t1.nii.gz.md5, X_t1.json).
# Group 1: the name before the extension.
OTHER_IMAGE = re.compile(r"(.+?)\.(?:mha|mhd|nrrd|nhdr|mgz|mgh|hdr|img|nii(?:\.gz)?)"
                         r"(?:\.(?:part|partial|crdownload|download|tmp)|~)?$", re.IGNORECASE)
# Errors nibabel, gzip and numpy raise on a missing, truncated or corrupt NIfTI.
READ_ERRORS = (ImageFileError, OSError, EOFError, ValueError, zlib.error)
GZIP_MAGIC = b"\x1f\x8b"  # the first bytes of a gzip stream
# The first bytes of an uncompressed NIfTI-1 or NIfTI-2 file -> its header size: sizeof_hdr,
# 348 or 540, in either byte order.
NIFTI_MAGICS = {size.to_bytes(4, order): size for size in (348, 540) for order in ("little", "big")}


class DataError(ValueError):
    """Bad input data: a datalist entry, a case folder or a file."""


class CaseError(DataError):
    """A case that cannot be used; the message names the case and the file."""

    def __init__(self, case, path, problem):
        self.case, self.path, self.problem = case, path, problem
        super().__init__(f"case {case}: {path}: {problem}")

    def __reduce__(self):  # re-raised from worker processes: rebuild from the three fields
        return CaseError, (self.case, self.path, self.problem)


@dataclasses.dataclass
class Case:
    name: str
    files: dict  # part ("flair", "t1", "t1ce", "t2", "seg"; only those present) -> Path
    image: np.ndarray  # float32 (4, D, H, W), raw intensities, MODALITIES order; zeros if missing
    label: np.ndarray | None  # uint8 (D, H, W) in {0, 1, 2, 4}, or None without a seg file
    affine: np.ndarray  # (4, 4) voxel -> world, of the first modality present (FLAIR if any)
    header: nib.Nifti1Header  # of that file, for exporting predictions on the same grid
    shape_xyz: tuple  # (X, Y, Z) as stored in the NIfTI files
    spacing: tuple  # voxel size in mm, network order (D, H, W)
    available: tuple = FULL  # indices of the modalities read from files (a subset)


def to_network_order(vol_xyz):
    """NIfTI (..., X, Y, Z) is read as (X, Y, Z); network order is (Z, X, Y) = (D, H, W)."""
    return vol_xyz.transpose(2, 0, 1)


def to_nifti_order(vol_dhw):
    """Inverse of to_network_order: (D, H, W) -> (X, Y, Z)."""
    return vol_dhw.transpose(1, 2, 0)


# ---------------------------------------------------------------------------------- datalists
def _strip_relative_prefix(entry):
    """'../data/BraTS-2018/X' -> ('data', 'BraTS-2018', 'X'): drop the anchor and ../ ./."""
    parts = list(Path(entry).parts)
    if Path(entry).anchor:
        parts = parts[1:]
    while parts and parts[0] in ("..", "."):
        parts = parts[1:]
    return parts


def _candidates(entry, list_dir, data_root):
    """Where a datalist entry may live, most specific first."""
    if data_root is None:
        path = Path(entry)
        if path.is_absolute():
            return [path]
        return list(dict.fromkeys([list_dir / path, Path.cwd() / path]))  # the same one once
    parts = _strip_relative_prefix(entry)
    # data_root/data/BraTS-2018/.../HGG/X, then .../HGG/X, then data_root/X.
    return [Path(data_root).joinpath(*parts[i:]) for i in range(len(parts))]


def resolve_list(path, data_dir):
    """A datalist path as given if it exists, else data_dir/path (published: --data_dir +
    --train_list/--data_list, e.g. datalist/ + BraTS18/BraTS18_test.csv). -> Path; DataError
    naming both when neither exists."""
    if Path(path).exists() or not data_dir:
        return Path(path)
    if not (Path(data_dir) / path).exists():
        if Path(path).is_absolute():  # data_dir / path is path itself
            raise DataError(f"datalist {path} not found; check the path")
        raise DataError(f"datalist {path} not found, nor {Path(data_dir) / path} (--data_dir "
                        f"{data_dir}); check the path (relative paths start in the current "
                        "folder: run from the repository root, or pass --data_dir)")
    return Path(data_dir) / path


def datalist_entries(list_path):
    """A datalist's entries as written: [(line number, entry)], blank and '#' lines skipped."""
    if Path(list_path).is_dir():  # said as such, not as errno 21
        raise DataError(f"datalist {list_path} is a folder, not a list (a text file naming one "
                        "case folder per line)")
    try:
        # utf-8-sig: a byte-order mark (Excel's "CSV UTF-8") would be part of the first entry
        text = Path(list_path).read_text(encoding="utf-8-sig")
    except OSError as err:
        raise DataError(f"cannot read datalist {list_path}: {err}") from err
    except UnicodeDecodeError as err:  # UTF-16 (Windows' "Unicode"), Latin-1, ...
        line = err.object[:err.start].count(b"\n") + 1
        raise DataError(f"cannot read datalist {list_path}: line {line} is not UTF-8 text (byte "
                        f"0x{err.object[err.start]:02x}); save the list as UTF-8 text") from None
    if "\0" in text:  # UTF-16 without a byte-order mark decodes as UTF-8 with NUL bytes
        line = text[:text.index("\0")].count("\n") + 1
        raise DataError(f"cannot read datalist {list_path}: line {line} holds NUL bytes (UTF-16 "
                        "text?); save the list as UTF-8 text")
    return [(number, line.strip()) for number, line in enumerate(text.splitlines(), 1)
            if line.strip() and not line.strip().startswith("#")]


def named_folder(folder):
    """A case folder under its own name: '.' or '..' names it only once resolved (other folders
    keep their path, so a symlinked case keeps the name it is listed under). -> Path"""
    folder = Path(folder)
    return folder.resolve() if folder.name in ("", ".", "..") else folder


def read_datalist(list_path, data_root=None):
    """Datalist file (one case folder per line) -> list of existing case folders (Path).

    Without data_root, a relative entry resolves against the list file's folder, then the
    current directory. With data_root, each entry is re-based under data_root: its leading
    '../' and './' are dropped, then its leading components one at a time
    (data_root/data/BraTS-2018/.../HGG/X, ..., data_root/HGG/X, data_root/X); the first
    that exists wins. So the published lists work wherever the data lives. An entry such as
    '.' is resolved (named_folder): the case is named after the folder.
    """
    list_path = Path(list_path)
    if data_root is not None:  # a typo is named as such, not as the list's first case missing
        require_folder(data_root, "--data_root ")
    entries = datalist_entries(list_path)
    found = [next((path for path in _candidates(entry, list_path.parent, data_root)
                   if path.is_dir()), None) for _, entry in entries]
    missing = [i for i, path in enumerate(found) if path is None]
    if missing:
        # All of them counted: a partial download is then fixed in one go, not one run per case.
        number, entry = entries[missing[0]]
        tried = _candidates(entry, list_path.parent, data_root)
        others = (f" (and {len(missing) - 1} more of its {len(entries)} entries)"
                  if len(missing) > 1 else "")
        # a header's word ('case', 'ID'): every other entry found, no digit as case names have
        header = (missing == [0] and len(entries) > 1 and "/" not in entry
                  and not any(c.isdigit() for c in entry))
        raise DataError(f"{list_path}:{number}: case folder {entry!r} not found{others}; tried "
                        + ", ".join(str(path) for path in tried)
                        + ("; the other entries were found: is line 1 a header? A datalist has "
                           "none: delete the line" if header else
                           _missing_entry_hint(entry, tried, data_root)))
    return [named_folder(path) for path in found]


# The official lists' root is the parent of both challenge folders: the Training one would not
# hold BraTS18_test.csv's cases (MICCAI_BraTS_2018_Data_Validation/<case>).
DATA_ROOT_HINT = ("the folder holding the cases (for the official lists, the one holding "
                  "MICCAI_BraTS_2018_Data_Training/ and _Validation/)")


def _missing_entry_hint(entry, tried, data_root):
    """What to do about a datalist entry found nowhere (`tried`): '; ...' or ''."""
    if re.search(r"[,;\t\"']", entry):  # a spreadsheet's export: columns, quotes
        return ("; a datalist names one case folder per line and nothing else (no header, no "
                "other columns, no quotes)")
    if "\\" in entry:
        return "; separate its folders with '/' (a list written on Windows uses '\\')"
    if _split_name(Path(entry)) or any(path.is_file() for path in tried):
        return "; an entry names a case folder (the folder holding its files), not a file"
    if data_root is None:
        return (f"; pass --data_root DIR, {DATA_ROOT_HINT}, to re-base the entries (DATA_ROOT=DIR "
                "for run.sh and eval.sh)")
    if holds_nifti(Path(data_root)):
        return f"; --data_root {data_root} is one case's folder: give {DATA_ROOT_HINT}"
    return f"; check --data_root: {DATA_ROOT_HINT}"


def require_folder(folder, what=""):
    """DataError '<what><folder> (<absolute>): not found' (or 'not a folder') unless `folder` is
    a folder; a relative one is shown absolute too, since it depends on the script's cwd."""
    folder = Path(folder)
    if not folder.is_dir():
        where = "" if folder.is_absolute() else f" ({folder.absolute()})"
        raise DataError(f"{what}{folder}{where}: "
                        f"{'not a folder' if folder.exists() else 'not found'}")


def holds_nifti(folder):
    """Whether `folder` directly holds a NIfTI file (hidden ones aside)."""
    return any(_split_name(p) for p in folder.iterdir() if not p.name.startswith("."))


def find_cases(folder):
    """A folder of case folders, or one case folder -> list of case folders (Path, sorted).

    `folder` is one case when it directly holds NIfTI files; otherwise every sub-folder not
    starting with '.' is a case (an empty one then fails to load, naming itself). Loose NIfTI
    files beside case folders (sub-folders holding NIfTI files) are refused unless they are
    a case themselves (two parts or more, e.g. a case with a backup sub-folder): a template at
    the top of a folder of cases is not. So is a dead link among the cases: skipped, the case
    would silently go missing.
    """
    folder = named_folder(folder)
    require_folder(folder)
    entries = [p for p in sorted(folder.iterdir()) if not p.name.startswith(".")]
    loose = [p for p in entries if not p.is_dir() and _split_name(p)]
    cases = [p for p in entries if p.is_dir()]
    if loose:
        nested = [p for p in cases if holds_nifti(p)]
        if nested and len(_parts_found(folder)) < 2:
            raise DataError(f"{folder}: NIfTI files {[p.name for p in loose]} lie beside case "
                            f"folders (e.g. {nested[0].name}) and are not a case: move them out, "
                            "or point --input at one case folder")
        return [folder]
    # a dead link named like a case (no extension): a name_mapping.csv link is not one
    dead = [p for p in entries if p.is_symlink() and not p.exists() and not p.suffix]
    if dead:
        raise CaseError(dead[0].name, dead[0], f"a dead link (to {os.readlink(dead[0])}): mount "
                        "the data or remove the link")
    if not cases:
        raise DataError(f"{folder}: holds neither NIfTI files nor case folders")
    return cases


def _parts_found(folder):
    """The parts (modalities, seg) find_case_files recognises in `folder`; none if it cannot."""
    try:
        return find_case_files(folder, allow_missing=True)
    except CaseError:
        return {}


def refuse_duplicates(folders, source):
    """Raise CaseError when two folders share a case name (their outputs would clash) or are
    one folder under two names (a symlink: the case would count twice)."""
    names = [Path(f).name for f in folders]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise CaseError(duplicates[0], source, "case name listed more than once: keep one entry")
    seen = {}
    for folder in folders:
        first = seen.setdefault(Path(folder).resolve(), folder)
        if first is not folder:
            raise CaseError(Path(folder).name, source, f"the same folder as {Path(first).name} "
                            f"({Path(folder).resolve()}), listed again under another name: keep "
                            "one of them")


# ----------------------------------------------------------------------------- case folders
def _split_name(path):
    """'X_flair.nii.gz' -> ('X_flair', '.nii.gz'), or None if not a NIfTI name (any case: .NII.GZ;
    nothing before the extension, as '$CASE.nii.gz' with CASE unset, is not one)."""
    name = path.name
    for ext in EXTENSIONS:
        if name.lower().endswith(ext) and len(name) > len(ext):
            return name[: -len(ext)], ext
    return None


def named_like_a_scan(path):
    """Whether a NIfTI file is named as a scan or label in its case folder (X/X_flair, X/X-t1c,
    X/X_T1w, X/X_seg: the folder's name, then a scheme's suffix or an ALIASES token), not as a
    mask eval.py writes (<subset>/<case>.nii.gz, whatever the case's name ends with)."""
    return scan_of(path, {Path(path).parent.name.lower()}) is not None


def scan_of(path, cases):
    """The case among `cases` (lower-case names) that a NIfTI file is named as a scan or label
    of ('X_seg.nii.gz', 'X-T2-FLAIR.nii.gz': 'x'; the name goes on after a '_' or '-' and ends
    in a scheme's suffix or an ALIASES token), or None."""
    stem = nifti_stem(path)
    if stem is None or name_tokens(path)[-1] not in (*MODALITY_TOKENS, "seg"):
        return None
    stem = stem.lower()
    return next((stem[:sep.start()] for sep in re.finditer("[_-]", stem)
                 if stem[:sep.start()] in cases), None)


def name_tokens(path):
    """'P01_T2-FLAIR.nii.gz' -> ['p01', 't2', 'flair'], 'X_t1.mha' -> ['x', 't1']: the
    '_'- or '-'-separated tokens of a NIfTI or OTHER_IMAGE name's stem, lower."""
    split = _split_name(Path(path))
    stem = split[0] if split else OTHER_IMAGE.match(Path(path).name).group(1)
    return re.split(r"[_-]", stem.lower())


def modality_named(path, among=MODALITIES):
    """The modality among `among` that `path` is named after (its last token is one of its
    ALIASES: 'X_T1w.nii.gz' -> 't1'), or None."""
    return next((part for part in among if name_tokens(path)[-1] in ALIASES[part]), None)


def nifti_stem(path):
    """'P01_mask.nii.gz' -> 'P01_mask', or None if not a NIfTI name."""
    split = _split_name(Path(path))
    return None if split is None else split[0]


def naming_scheme(files):
    """The naming scheme of a {part: Path} mapping (find_case_files's, or predict.py's files):
    'brats2023' when every file has BraTS 2023's suffix for its part, else 'brats2018'."""
    return next(
        (scheme for scheme, suffixes in SCHEMES.items()
         if all((_split_name(path) or (path.name,))[0].lower().endswith(suffixes[part])
                for part, path in files.items())),
        "brats2018",  # no file to tell: name expectations after the 2018 scheme
    )


def is_brats_2023(case, folder=None):
    """Whether a case is BraTS 2023's: its folder's files named so, or, without a folder to
    read, its name."""
    if folder is not None:
        try:
            return naming_scheme(find_case_files(folder, allow_missing=True)) == "brats2023"
        except (DataError, OSError):  # moved, changed or unreadable since: its name still tells
            pass
    return BRATS_2023_CASE.fullmatch(case) is not None


def expected_file(case_dir, files, part):
    """The path `part` would have in this case folder, in the scheme, prefix and extension of
    the files found (for messages about a missing file); without files, the folder's name."""
    case_dir = Path(case_dir)
    scheme = SCHEMES[naming_scheme(files)]
    found = sorted((_split_name(p), name) for name, p in files.items())
    prefix, ext = case_dir.name, ".nii.gz"
    if found:
        (stem, ext), name = found[0]
        prefix = stem[:len(stem) - len(scheme[name])]
    return case_dir / f"{prefix}{scheme[part]}{ext}"


def find_case_files(case_dir, allow_missing=False):
    """Case folder -> {"flair", "t1", "t1ce", "t2", "seg": Path}, the parts present.

    Recognises the BraTS 2018/2021 (_flair, _t1, _t1ce, _t2, _seg) and 2023 (-t2f, -t1n,
    -t1c, -t2w, -seg) suffixes with .nii or .nii.gz. Raises CaseError naming the expected
    file when a modality is missing (with allow_missing: when none is present), or the files
    when a part is ambiguous, a file's prefix differs from the others', or a modality is missing
    beside a file named after it in another way (ALIASES).
    """
    case_dir = Path(case_dir)
    case = case_dir.name
    if not case_dir.is_dir():
        raise CaseError(case, case_dir, "case folder not found")
    found = {scheme: {} for scheme in SCHEMES}
    unknown = []  # NIfTI files of no part's name, and OTHER_IMAGE files
    for path in sorted(case_dir.iterdir()):
        split = _split_name(path)
        if path.name.startswith("."):  # hidden files, e.g. macOS '._X.nii'
            continue
        if split is None:
            if OTHER_IMAGE.match(path.name):
                unknown.append(path)
            continue
        stem = split[0].lower()
        parts = [(scheme, part) for scheme, suffixes in SCHEMES.items()
                 for part, suffix in suffixes.items() if stem.endswith(suffix)]
        for scheme, part in parts:
            found[scheme].setdefault(part, []).append(path)
        if not parts:
            unknown.append(path)
    # The scheme with more parts present wins; mixing schemes inside one case is an error.
    scheme = max(SCHEMES, key=lambda s: len(found[s]))
    other = [s for s in SCHEMES if s != scheme and found[s]]
    if other:
        stray = [p.name for paths in found[other[0]].values() for p in paths]
        raise CaseError(case, case_dir, f"mixes naming schemes ({scheme} and {other[0]}: {stray}); "
                        f"name its files after one ({scheme}: {', '.join(SCHEMES[scheme].values())})")
    files = {}
    for part, paths in found[scheme].items():
        if len(paths) > 1:
            raise CaseError(case, paths[0], f"several {part} files: {[p.name for p in paths]}: "
                            "keep one (move the others out of the case folder)")
        files[part] = paths[0]
    missing = [part for part in MODALITIES if part not in files]
    _refuse_strangers(case_dir, files, scheme, unknown, missing)
    if len(missing) == len(MODALITIES):
        names = ", ".join(expected_file(case_dir, files, part).name for part in MODALITIES)
        nested = _nested_case(case_dir)
        if nested is None:
            hint = ""
        elif nested.parent == case_dir:
            hint = (f"; it is a folder of case folders (e.g. {nested.name}), not a case: point "
                    "--input at it, or list its case folders")
        else:  # a dataset's root (MICCAI_BraTS_2018_Data_Training/HGG/<case>)
            hint = (f"; case folders lie two levels down (e.g. {nested.parent.name}/{nested.name}), "
                    f"not a case: point --input at {case_dir / nested.parent.name}, or give a "
                    f"--data_list with --data_root {case_dir.parent}")
        raise CaseError(case, case_dir,
                        f"no modality file (expected at least one of {names}){hint}")
    if missing and not allow_missing:
        raise CaseError(case, expected_file(case_dir, files, missing[0]),
                        f"missing {missing[0]} file (found {sorted(files)})")
    return {part: files[part] for part in (*MODALITIES, "seg") if part in files}


def _nested_case(folder):
    """The first folder holding NIfTI files one or two levels below `folder` (what a folder of
    case folders taken for a case holds), or None. Only for a message."""
    def subfolders(f):
        return [p for p in sorted(f.iterdir()) if p.is_dir() and not p.name.startswith(".")]

    level1 = subfolders(folder)
    return next((p for p in level1 if holds_nifti(p)), None) or next(
        (q for p in level1 for q in subfolders(p) if holds_nifti(q)), None)


def _refuse_strangers(case_dir, files, scheme, unknown, missing):
    """CaseError for files that would silently give the case wrong inputs: a part whose prefix
    differs from the others' (another patient's scan: every BraTS case has the same grid), or,
    among the `unknown` files, a missing modality's scan that is skipped: under another name
    ('X_T1w.nii.gz'), in another format or not fully copied (OTHER_IMAGE: 'X_t1.mha',
    'X_t1ce.nii.gz.part')."""
    case = Path(case_dir).name
    prefixes = {name: _split_name(path)[0][:-len(SCHEMES[scheme][name])].lower()
                for name, path in files.items()}
    common = max(prefixes.values(), key=list(prefixes.values()).count, default=None)
    odd = [name for name, prefix in prefixes.items() if prefix != common]
    if odd:
        others = [files[name].name for name in files if name not in odd]
        raise CaseError(case, files[odd[0]], f"its name does not start as the case's other files "
                        f"do ({others}): a file of another case? Rename or move it")
    for path in unknown:
        part = modality_named(path, missing)
        if part:
            expected = expected_file(case_dir, files, part).name
            problem, fix = (("under another name", f"name it {expected} if it is one")
                            if _split_name(path) else
                            ("but is not a NIfTI file (.nii or .nii.gz)",
                             f"convert it (or finish copying it) to {expected}"))
            raise CaseError(case, path, f"looks like a {part} scan {problem}, and the case has "
                            f"no {part} file: {fix}, or move it out of the case folder")


def available_subset(files):
    """{part: Path} -> sorted tuple of the indices of the modalities present."""
    return tuple(i for i, part in enumerate(MODALITIES) if part in files)


def require_modalities(case_dir, files, subset):
    """Raise CaseError naming the first file of `subset` (modality indices) that is missing."""
    for i in subset:
        if MODALITIES[i] not in files:
            raise CaseError(Path(case_dir).name, expected_file(case_dir, files, MODALITIES[i]),
                            f"missing {MODALITIES[i]} file, needed by subset {subset_name(subset)} "
                            "(--mode available predicts each case from the modalities it has)")


# ------------------------------------------------------------------------------ reading
def _guarded(case, path, read):
    """Run read(), turning any NIfTI read failure into a CaseError naming the file."""
    try:
        return read()
    except READ_ERRORS as err:
        detail = " ".join(str(err).split())  # one line: nibabel's messages span several
        raise CaseError(case, path, f"unreadable NIfTI ({type(err).__name__}: "
                                    f"{detail}){_misnamed(path) or _damaged(path, err)}"
                        ) from err


def _misnamed(path):
    """': it is gzip-compressed; name it X.nii.gz' for a .nii file that is (a .nii.gz renamed),
    of which nibabel only says that it cannot tell the file type, and ': it is not
    gzip-compressed; name it X.nii' for a .nii.gz file holding an uncompressed NIfTI (a .nii
    renamed), of which nibabel only says that it 'is not a gzip file'; else ''."""
    path = Path(path)
    start = _file_start(path)
    if path.name.lower().endswith(".nii") and start[:2] == GZIP_MAGIC:
        return f": it is gzip-compressed; name it {path.name}.gz"
    if path.name.lower().endswith(".nii.gz") and start in NIFTI_MAGICS:
        return f": it is not gzip-compressed; name it {path.name[:-3]}"
    return ""


def _file_start(path):
    """A file's first 4 bytes (its magic number), b'' where it cannot be read (a folder, a dead
    link)."""
    with contextlib.suppress(OSError), open(path, "rb") as f:
        return f.read(4)
    return b""


def _damaged(path, error):
    """': truncated, ...' for an uncompressed NIfTI shorter than its header says, of which
    nibabel says 'Whoops, not enough data in file' or 'Expected N bytes, got M bytes', or cut
    inside its header (nibabel: 'Cannot work out file type'), or for a .nii.gz whose gzip stream
    ends early (`error` an EOFError: 'Compressed file ended before ...'; its size says nothing
    of the voxels'); ': damaged, ...' for a .nii.gz whose bytes changed (gzip: 'CRC check
    failed' or 'Incorrect length of data produced', zlib: 'invalid ...'); else ''."""
    path = Path(path)
    again = ": an interrupted copy or download? Copy it again"
    if path.name.lower().endswith(".gz"):
        if isinstance(error, EOFError):
            return ": truncated, its compressed stream cut short" + again
        if isinstance(error, zlib.error) or any(
                check in str(error) for check in ("CRC check failed", "Incorrect length of data")):
            return (": damaged, its bytes fail the compressed stream's check: a bad copy or "
                    "disk? Copy it again")
        return ""
    with contextlib.suppress(*READ_ERRORS):
        size, header = path.stat().st_size, NIFTI_MAGICS.get(_file_start(path))
        if header is not None and size < header:
            return f": truncated, {size} bytes, shorter than its {header}-byte header" + again
        voxels = nib.load(path).dataobj  # the header only: where the voxels start, how many
        needed = voxels.offset + voxels.dtype.itemsize * int(np.prod(voxels.shape))
        if size < needed:
            return f": truncated, {size} bytes where its header says {needed}" + again
    return ""


def _in_memory(path, img):
    """img (from nib.load) with its voxels in memory. A .nii.gz is decompressed whole at once:
    its CRC and length are checked at the end of the stream, which nibabel, reading only the
    bytes the image needs, never reaches, so a corrupted file would give garbage intensities
    without an error. (One decompression, as nibabel's own read.)"""
    if not path.name.lower().endswith(".gz"):
        return img
    return type(img).from_bytes(gzip.decompress(path.read_bytes()))


def _check_label(case, path, data, scheme, label_3_hint):
    """Label map as stored -> uint8 (X, Y, Z) in {0,1,2,4}; 2023's ET 3 becomes 4. A 3 under
    the 2018 scheme is refused with `label_3_hint` appended."""
    allowed = ALLOWED_LABELS[scheme]
    if data.dtype.kind == "f":
        bad = ~np.isfinite(data) | (data != np.round(data))
        if bad.any():  # counted, one shown: 3.2 tells of labels 2 and 4 blended by resampling
            raise CaseError(case, path, f"label map has non-integer or non-finite values "
                            f"({np.count_nonzero(bad)} voxels, e.g. {data[bad][0]:g}): labels "
                            "must be whole numbers; resampled with linear interpolation? Resample "
                            "it with nearest-neighbour")
    if data.min() < 0 or data.max() > max(allowed):
        # only 0/1/2/4: relabelled; a 3 beside a 4 is another labelling (BraTS-PED's four)
        hint = (f"; {SEG_LABEL_4_HINT}" if scheme == "brats2023"
                and set(np.unique(data).tolist()) <= {0, 1, 2, 4} else "")
        raise CaseError(case, path,
                        f"labels outside {allowed}: min {data.min()}, max {data.max()}{hint}")
    label = data.astype(np.uint8)
    present = np.nonzero(np.bincount(label.reshape(-1)))[0]
    unexpected = sorted(set(present.tolist()) - set(allowed))
    if unexpected:
        hint = f"; {label_3_hint}" if scheme == "brats2018" and ET_2023 in unexpected else ""
        raise CaseError(case, path, f"unexpected label values {unexpected}; allowed {allowed}{hint}")
    if scheme == "brats2023":
        label[label == ET_2023] = ET_2018
    return label


def _grid_shape(case, path, img):
    """A volume's (X, Y, Z): its shape less trailing dimensions of size 1 (some converters
    store a 3-D volume as (X, Y, Z, 1)). Anything else is refused, naming the file."""
    shape = tuple(int(s) for s in img.shape)
    if len(shape) < 3 or any(s != 1 for s in shape[3:]):
        raise CaseError(case, path, f"expected a 3-D volume, got shape {img.shape}; store each "
                        "volume as a 3-D file of its own (split a 4-D file, e.g. with fslsplit)")
    return shape[:3]


def read_label_map(case, path, img, scheme="brats2018", label_3_hint=SEG_LABEL_3_HINT):
    """The voxels of a label map (img: the file opened by open_files) -> uint8 (X, Y, Z) in
    {0, 1, 2, 4}, checked by _check_label. Read as stored (no scaling to float) to check the
    exact values, the whole .gz stream checked (_in_memory). Raises CaseError naming the file."""
    loaded = _guarded(case, path, lambda: _in_memory(path, img))
    grid = img.shape[:3]  # open_files checked that any further dimensions are 1
    data = _guarded(case, path, lambda: np.asanyarray(loaded.dataobj)).reshape(grid)
    return _check_label(case, path, data, scheme, label_3_hint)


def open_files(case, files):
    """{part: Path} -> {part: nibabel image}, checked from the headers alone (no voxel is
    read, so a whole list can be checked before any work): every file readable and 3-D (see
    _grid_shape), with the shape and affine (within 1e-3) of the first one. Raises CaseError
    naming the file."""
    images = _opened(case, files)
    _check_grids(case, files, images)
    return images


def _opened(case, files):
    """{part: Path} -> {part: nibabel image}, each readable, 3-D (see _grid_shape) and of one
    real number per voxel (an RGB file failed deep in numpy; a complex one lost its imaginary
    part with no word of the case)."""
    images = {}
    for part, path in files.items():
        images[part] = _guarded(case, path, lambda: nib.load(path))
        _grid_shape(case, path, images[part])
        dtype = images[part].get_data_dtype()
        if dtype.kind not in "iuf":
            kind = "RGB" if dtype.fields else dtype.name
            raise CaseError(case, path, f"voxels of type {kind}, not one real number each; store "
                            "a scalar volume (e.g. int16 or float32)")
    return images


def _check_grids(case, files, images):
    """Raise CaseError naming the first file of `files` not on the grid of the first one (and
    saying so when it is an all-zero placeholder, often written with a default affine)."""
    reference = None
    for part, path in files.items():
        shape, affine = images[part].shape[:3], images[part].affine
        if reference is None:
            reference = path, shape, affine
        try:
            check_grid(case, path, shape, affine, reference)
        except CaseError:
            _name_placeholder_off_grid(case, files, images)
            raise


def _name_placeholder_off_grid(case, files, images):
    """After a grid mismatch in `files`: raise CaseError naming an all-zero placeholder that
    is off the grid of the other files (the scans and the label), or naming the first of
    those off the grid of the others; return when neither explains it. The grid is the
    scans', not the first file's: a placeholder on it is not named when another file is off."""
    placeholders = [part for part in files
                    if part in MODALITIES and is_placeholder(case, files[part], images[part])]
    others = [part for part in files if part not in placeholders]
    if not placeholders or not others:
        return
    grid = lambda part: (files[part], images[part].shape[:3], images[part].affine)
    for part in others[1:]:  # a scan or label off the scans' grid: named as such
        check_grid(case, *grid(part), grid(others[0]))
    off = []
    for part in placeholders:
        try:
            check_grid(case, *grid(part), grid(others[0]))
        except CaseError:
            off.append(files[part])
    if off:
        also = f" (so is {', '.join(p.name for p in off[1:])})" if off[1:] else ""
        raise CaseError(case, off[0], "all zero, the placeholder of a missing modality, on "
                        f"another grid than {files[others[0]].name}{also}: {PLACEHOLDER_FIX}"
                        ) from None


def is_placeholder(case, path, img):
    """Whether the modality file `path` (img: its 3-D image, nib.load's) holds only zeros: how a
    missing modality is filled for the published code, which reads four files per case (and
    what the network is given for one). Cheap on a scan: a .nii.gz is ruled out by its size,
    an uncompressed file by its middle slice; only a file that may be all zero is read whole
    (its .gz stream checked, as _in_memory does). Raises CaseError naming an unreadable file."""
    if path.name.lower().endswith(".gz"):
        voxel_bytes = int(np.prod(img.shape)) * img.get_data_dtype().itemsize
        if path.stat().st_size * PLACEHOLDER_DEFLATE > voxel_bytes:
            return False
    else:
        middle = _guarded(case, path, lambda: np.asanyarray(img.dataobj[:, :, img.shape[2] // 2]))
        if np.any(middle):
            return False
    loaded = _guarded(case, path, lambda: _in_memory(path, img))
    return not _guarded(case, path, lambda: np.any(np.asanyarray(loaded.dataobj)))


def without_placeholders(case, files):
    """{part: Path} less the modality files that are all-zero placeholders (is_placeholder)
    -> (the files left, {part: Path} of those dropped), checked as open_files does, the grid
    among the files left: a placeholder is never read, whatever its grid (one is often written
    with a default affine). Raises CaseError naming the file when no modality file is left."""
    images = _opened(case, files)
    dropped = {part: path for part, path in files.items()
               if part in MODALITIES and is_placeholder(case, path, images[part])}
    kept = {part: path for part, path in files.items() if part not in dropped}
    if dropped and not available_subset(kept):
        raise CaseError(case, next(iter(dropped.values())), "all zero, as every modality file "
                        "of the case: nothing to predict from")
    _check_grids(case, kept, images)
    return kept, dropped


def check_grid(case, path, shape, affine, reference, fix=GRID_FIX):
    """Raise CaseError naming `path` unless a volume of this shape and affine lies on the grid
    of `reference`, the (path, shape, affine) of a file of the same case: the same shape, and
    affines equal within AFFINE_TOLERANCE. `fix` (what to do) ends the message; None leaves it
    to the caller (eval.py --resume: a mask off the grid is predicted again, not resampled)."""
    fix = f"; {fix}" if fix else ""
    reference_path, reference_shape, reference_affine = reference
    if not np.isfinite(affine).all():  # NaN compares unequal to itself: named as such, here
        raise CaseError(case, path, f"its affine holds non-finite values "
                        f"({np.asarray(affine).round(4).tolist()}): a broken sform/qform in "
                        "the header; give it a valid one (e.g. another modality's: fslcpgeom)")
    if tuple(shape) != tuple(reference_shape):
        raise CaseError(case, path, f"shape {tuple(shape)} differs from "
                                    f"{Path(reference_path).name} {tuple(reference_shape)}{fix}")
    if not np.allclose(affine, reference_affine, rtol=0, atol=AFFINE_TOLERANCE):
        difference = np.abs(affine - reference_affine).max()
        raise CaseError(  # one line: the affines as nested lists
            case, path,
            f"affine differs from {Path(reference_path).name} by up to {difference:.3g} (more "
            f"than {AFFINE_TOLERANCE}): {affine.round(4).tolist()} vs "
            f"{reference_affine.round(4).tolist()}{fix}",
        )


def case_files(case_dir, require_label=False, allow_missing=False):
    """find_case_files, and with require_label a CaseError naming the missing seg file."""
    case_dir = Path(case_dir)
    files = find_case_files(case_dir, allow_missing)
    if require_label and "seg" not in files:
        raise CaseError(case_dir.name, expected_file(case_dir, files, "seg"), "missing label (seg) "
                        "file (training and the teacher election of --val_list need labels)")
    return files


def read_files(case, files):
    """Read and validate explicit files -> Case. case: the name for messages; files: {part:
    Path} with at least one modality ("flair", "t1", "t1ce", "t2") and optionally "seg".

    Checks: every file readable, 3-D, the same shape and the same affine (within 1e-3) as
    the first modality, finite intensities; the label map only allowed values. Modalities
    not given are zero channels, absent from Case.available. Raises CaseError naming the file.
    """
    files = {part: Path(files[part]) for part in (*MODALITIES, "seg") if part in files}
    available = available_subset(files)
    if not available:
        raise CaseError(case, next(iter(files.values()), Path(case)), "no modality file given")
    images = open_files(case, files)
    reference = images[MODALITIES[available[0]]]
    grid = reference.shape[:3]  # open_files checked that any further dimensions are 1
    x, y, z = grid
    image = np.zeros((len(MODALITIES), z, x, y), dtype=np.float32)  # network order
    label = None
    for part, path in files.items():
        if part == "seg":
            label = to_network_order(read_label_map(case, path, images[part], naming_scheme(files)))
            continue
        img = _guarded(case, path, lambda: _in_memory(path, images[part]))
        data = _guarded(case, path, lambda: img.get_fdata(dtype=np.float32)).reshape(grid)
        if not np.isfinite(data).all():
            raise CaseError(case, path, f"{np.count_nonzero(~np.isfinite(data))} non-finite voxels "
                            "(NaN or infinity): a damaged or badly converted scan")
        image[MODALITIES.index(part)] = to_network_order(data)
        _refuse_copy(case, files, image, part)

    header = reference.header
    zooms = tuple(float(z) for z in header.get_zooms()[:3])
    return Case(
        name=case,
        files=files,
        image=image,
        label=None if label is None else np.ascontiguousarray(label),
        affine=np.asarray(reference.affine, dtype=np.float64),
        header=header,
        shape_xyz=tuple(int(s) for s in grid),
        spacing=(zooms[2], zooms[0], zooms[1]),  # (X, Y, Z) -> network order (D, H, W)
        available=available,
    )


def _refuse_copy(case, files, image, part):
    """CaseError when modality `part`, just read into `image`, holds the very voxels of a
    modality read before it: a copy or link of another scan standing in for a missing one (as
    all-zero placeholders do for the published code, which reads four files per case). The
    network would take, say, the FLAIR for a T2; two sequences never give identical volumes.
    A strided sample rules a scan out cheaply; all-zero volumes are placeholders, not copies."""
    i = MODALITIES.index(part)
    if not image[i].any():
        return
    sample = image[i].reshape(-1)[::997]
    for j, other in enumerate(MODALITIES[:i]):
        if (other in files and np.array_equal(sample, image[j].reshape(-1)[::997])
                and np.array_equal(image[i], image[j])):
            raise CaseError(case, files[part], f"the same voxels as {files[other].name}: a copy of "
                            f"the {other} scan standing in for a missing {part}? The network "
                            f"would take it for a {part}; leave it out (eval.py and predict.py "
                            f"then predict the case without {part}; training needs all four)")


def load_case(case_dir, require_label=False, allow_missing=False):
    """Read and validate one case folder -> Case (arrays in network order, see module doc).

    All four modalities are required unless allow_missing (inference on incomplete cases:
    any non-empty subset, see read_files); the label map (if present, or required) must lie on
    the same grid. Raises CaseError naming the case and the file.
    """
    return read_files(Path(case_dir).name, case_files(case_dir, require_label, allow_missing))


def brats_like_warnings(case):
    """What a BraTS-trained model assumes that this case does not look like -> list of str.

    BraTS volumes are co-registered on one grid (load_case already refuses different shapes
    or affines), about 1 mm isotropic, and skull-stripped with a background of exactly 0, the
    same brain voxels being non-zero in every modality. A model given anything else returns
    masks that look plausible and are wrong, so these deserve a warning, not silence.
    """
    warnings = []
    z, x, y = case.spacing
    lo, hi = SPACING_RANGE_MM
    if not all(lo <= s <= hi for s in case.spacing):
        warnings.append(f"case {case.name}: voxel size {x:g} x {y:g} x {z:g} mm; a BraTS-trained "
                        "model expects about 1 mm isotropic volumes (resample them first)")
    # Training mirrors every axis, so flipped axes (RAS or LPS) are seen, not swapped ones: a
    # volume stored sagittal or coronal is read as a brain lying on its side (measured on
    # 3 synthetic cases, small model: WT Dice 83 % as stored, 73 % and 53 % axes permuted).
    # HD95 is in mm of the pixdim (header.get_zooms()), as ITK's (BraTS's evaluation) reads it
    affine_sizes = tuple(nib.affines.voxel_sizes(case.affine))
    if not np.allclose(affine_sizes, (x, y, z), rtol=1e-3):
        warnings.append(f"case {case.name}: voxel size {x:g} x {y:g} x {z:g} mm in the header "
                        "(pixdim), " + " x ".join(f"{s:.4g}" for s in affine_sizes) +
                        " mm in its affine: distances (HD95) use the pixdim; fix the header")
    axes = nib.aff2axcodes(case.affine)
    if not (axes[0] in ("L", "R") and axes[1] in ("A", "P") and axes[2] in ("S", "I")):
        warnings.append(f"case {case.name}: voxel axes {''.join(a or '?' for a in axes)}; a "
                        "BraTS-trained model expects axial volumes, x left-right, y "
                        "anterior-posterior, z inferior-superior (reorient them first, e.g. "
                        "fslreorient2std)")
    reference = None
    for i in case.available:
        path = case.files[MODALITIES[i]]
        top = case.image[i].max()
        if 0 < top <= max(max(labels) for labels in ALLOWED_LABELS.values()) and (
                case.image[i].min() >= 0 and np.array_equal(case.image[i], np.round(case.image[i]))):
            warnings.append(f"case {case.name}: {path.name} holds only whole numbers from 0 to "
                            f"{top:g}, as a label map (segmentation) does: no scan does; check "
                            "the files given as scans")
            continue
        brain = case.image[i] != 0
        background = 1 - np.count_nonzero(brain) / brain.size
        if background < MIN_BACKGROUND_FRACTION:
            warnings.append(f"case {case.name}: {path.name}: only {background:.0%} of the voxels "
                            "are 0; not skull-stripped? BraTS volumes are skull-stripped with a "
                            "background of exactly 0 (about 80 % of the voxels)")
            continue
        corner = case.image[i][0, 0, 0]
        if corner != 0:
            warnings.append(f"case {case.name}: {path.name}: its corner voxel is {corner:g}, not 0: "
                            "the normalisation takes the corner's value for the background (as "
                            f"published), so the {background:.0%} of the voxels that are 0 are "
                            "normalised as brain; BraTS volumes are 0 outside the brain")
        if reference is None:
            reference = path, brain
            continue
        dice = metrics.dice(brain, reference[1])
        if dice < MIN_BRAIN_DICE:
            warnings.append(f"case {case.name}: {path.name}: its non-zero voxels (the brain) "
                            f"overlap those of {reference[0].name} with a Dice of only {dice:.2f}; "
                            "not co-registered, or skull-stripped differently?")
    return warnings
