"""Preprocessing cache (nnU-Net style): read, validate and compact each case once.

    python -m datasets.preprocess --data_list datalist/BraTS18/BraTS18_train_all.csv \\
        --cache_dir cache/BraTS18 --data_root /data/BraTS2018 --num_workers 8

For each case, CACHE/<case>/ holds (cache format CACHE_VERSION = 2)
  image.npy      (4, d, h, w) source intensities inside the case's box: int16 when every value
                 is, bit for bit, an int16 (BraTS: always), else float32 as read
  label.npy      uint8 (d, h, w) in {0, 1, 2, 4} inside the box   } only when the case
  locations.npy  int32 (n, 3) sampled ET, WT, TC voxels, full-volume } has a seg file
                 coordinates (datasets.sampling.foreground_locations)
  meta.json      the full volume's shape, the box, the normalisation parameters of each
                 modality (datasets.normalize.PARAMS), array dtypes and file sizes, the source
                 files and the arrays (size, mtime, ctime, SHA-256), affine, NIfTI header, spacing
The box is the bounding box of every voxel that is labelled or, in some modality, not
background as the published normalisation defines it; outside it every normalised voxel is 0
and every label 0, so nothing is lost. Normalising happens where the data are used
(datasets.normalize.apply_normalization, on the training device for patches), bit-identical
to normalising the whole source volume; CachedCase.normalized() returns the full normalised
image that format 1 stored as float32 (152 MB per synthetic 240x240x155 case with the label,
against 23-29 MB for everything now).

Trust: a case is opened only when its meta.json is valid and of this format, its arrays have
the recorded sizes, dtypes and shapes and its labels are in {0, 1, 2, 4} (a bincount of the
boxed uint8 map, ~3 ms); preprocess re-uses it only when, besides, its sources and its arrays
are unchanged. Both are compared by stat (size, mtime, ctime) and, when that differs, by
SHA-256 of the content: an in-place edit that keeps the size and mtime still changes the ctime,
so it is caught without re-reading unchanged files. Anything else is rebuilt with a message.
Each case is built under a lock (CACHE/<case>/.lock) by one process at a time, files are
written atomically and meta.json last (after removing the old one), and temporary files of
killed writers are removed on the next run. Case folders are confined to the cache folder.
preprocess() opens each case under its lock too (so no writer swaps the arrays between
meta.json and them) and refuses, with a CaseError, a case that another process sharing the
cache folder rebuilt meanwhile from other content (e.g. another dataset with the same case
names): its arrays are not this list's.
"""
import base64
import contextlib
import dataclasses
import errno
import io
import json
import multiprocessing
import os
import sys
from concurrent.futures import as_completed
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
from tqdm import tqdm

from datasets import normalize as norm
from datasets.brats import (CaseError, brats_like_warnings, case_files, read_datalist, read_files,
                            refuse_duplicates)
from datasets.sampling import foreground_locations
from utils.cli import (ArgumentParser, UsageError, int_at_least, path_given, progress_interval,
                       run_cli)
from utils.io import file_sha256, remove_stale_temps, write_bytes, write_text
from utils.lock import exclusive_lock
from utils.modalities import MODALITIES
from utils.regions import LABELS, REGIONS
from utils.workers import default_workers, worker_pool

CACHE_VERSION = 2
IMAGE, LABEL, LOCATIONS, META = "image.npy", "label.npy", "locations.npy", "meta.json"
RAW_DTYPES = ("int16", "float32")


class CacheInvalid(CaseError):
    """A cached case that is missing, broken, of another format or stale; preprocess rebuilds it."""


@dataclasses.dataclass
class CachedCase:
    """A preprocessed case; load_cached memory-maps the arrays (nothing is read until sliced).

    raw and label cover the box starting at `offset` of the full (D, H, W) volume `shape`
    (module docstring); outside the box the normalised image and the labels are 0.
    """
    name: str
    raw: np.ndarray  # int16 or float32 (4, d, h, w): source intensities inside the box
    label: np.ndarray | None  # uint8 (d, h, w) inside the box, or None for unlabelled cases
    locations: tuple | None  # ET, WT, TC: int32 (n_r, 3) voxels, full-volume coordinates
    offset: tuple  # (D, H, W) index of the box's first voxel
    shape: tuple  # (D, H, W) of the full volume
    params: np.ndarray  # float32 (4, 4): datasets.normalize.PARAMS of each modality
    meta: dict

    @classmethod
    def from_arrays(cls, name, image, label, params):
        """Compact a case held in memory (what the cache stores; nothing is written).

        image float32 (4, D, H, W) source intensities, label uint8 (D, H, W) or None,
        params float32 (4, 4) the modalities' PARAMS (datasets.normalize.case_params).
        """
        image, params = np.asarray(image, np.float32), np.asarray(params, np.float32)
        shape = image.shape[1:]
        keep = label != 0 if label is not None else np.zeros(shape, bool)
        for channel, p in zip(image, params):  # one channel at a time: one extra mask in memory
            keep |= norm.foreground(torch.from_numpy(channel), torch.from_numpy(p))[1].numpy()
        # keep's bounding box: that of label 1. keep is never empty (every modality that the
        # normalisation accepted has a foreground), else find_objects returns no box.
        box = ndimage.find_objects(keep.view(np.uint8))[0]
        raw = image[(slice(None), *box)]
        info = np.iinfo(np.int16)
        if info.min <= raw.min() and raw.max() <= info.max:
            as_int16 = raw.astype(np.int16)
            # Bit for bit (not ==), so that e.g. -0.0 stays float32: the normalisation of the
            # stored values must be exactly the normalisation of the source values.
            if np.array_equal(as_int16.astype(np.float32).view(np.int32), raw.view(np.int32)):
                raw = as_int16
        return cls(
            name=name, raw=np.ascontiguousarray(raw),
            label=None if label is None else np.ascontiguousarray(label[box]),
            locations=None if label is None else foreground_locations(label),
            offset=tuple(s.start for s in box), shape=tuple(shape),
            params=params, meta={})

    @property
    def box(self):
        """Slices of the full volume that raw and label cover."""
        return tuple(slice(o, o + n) for o, n in zip(self.offset, self.raw.shape[1:]))

    def normalized(self):
        """The normalised image, float32 (4, D, H, W): what format 1 stored in image.npy,
        bit-identical to datasets.normalize.normalize of each source volume."""
        image = np.zeros((len(self.raw), *self.shape), np.float32)
        raw = torch.from_numpy(np.array(self.raw, dtype=np.float32))  # reads the box once
        image[(slice(None), *self.box)] = norm.apply_normalization(
            raw, torch.from_numpy(self.params)).numpy()
        return image

    def full_label(self):
        """The label map uint8 (D, H, W) of the full volume, or None for unlabelled cases."""
        if self.label is None:
            return None
        label = np.zeros(self.shape, np.uint8)
        label[self.box] = self.label
        return label


def case_folder(cache_dir, name):
    """CACHE/<name>, refusing a name that would place the case outside the cache folder."""
    if name in ("", ".", "..") or Path(name).name != name:
        raise CaseError(name, cache_dir, "not a case folder name: its cache would lie outside "
                        "the cache folder")
    return Path(cache_dir) / name


# ------------------------------------------------------------------------- source fingerprints
@contextlib.contextmanager
def _reading_source(name, path):
    """An OSError on a source file (a broken symlink, no permission) -> CaseError naming it."""
    try:
        yield
    except OSError as err:
        raise CaseError(name, path, f"unreadable source file ({err.strerror or err})") from err


def _stat(name, path):
    with _reading_source(name, path):
        stat = os.stat(path)
        if not Path(path).is_file():
            raise IsADirectoryError(errno.EISDIR, "a folder, not a file")
    return {"path": str(Path(path).resolve()), "size": stat.st_size,
            "mtime_ns": stat.st_mtime_ns, "ctime_ns": stat.st_ctime_ns}


def _sha256(name, path):
    with _reading_source(name, path):
        return file_sha256(path)


def fingerprint(name, files):
    """{part: Path} -> {part: {path, size, mtime_ns, ctime_ns, sha256}}.

    The stat is taken before hashing (and hashing happens before the case is read), so a file
    changed meanwhile leaves a stat that differs next time, and its content is compared again.
    """
    out = {}
    for part, path in files.items():
        out[part] = _stat(name, path)
        out[part]["sha256"] = _sha256(name, path)
    return out


def _unchanged_sources(name, recorded, files):
    """The recorded source fingerprints brought up to date, or CacheInvalid when a source's
    content changed. A file whose stat matches is not read; one whose stat differs is
    hashed, and the same content (e.g. the data were copied or touched) keeps the cache."""
    if set(recorded) != set(files):
        raise CacheInvalid(name, next(iter(files.values())).parent,
                           f"source files {sorted(files)}, cached from {sorted(recorded)}")
    return _unchanged(name, recorded, files, "changed since it was cached (content differs)")


def _unchanged(name, recorded, files, change):
    """{part: Path} -> their fingerprints, `recorded` brought up to date; CacheInvalid(change)
    when a file's content differs from its record. A file whose stat matches its record is not
    read; one without a record (a cache written before arrays had one) is recorded as it is."""
    current = {}
    for part, path in files.items():
        old, stat = recorded.get(part), _stat(name, path)
        if old is not None and all(old.get(k) == v for k, v in stat.items()):
            current[part] = old
            continue
        digest = _sha256(name, path)
        if old is not None and (stat["size"] != old.get("size") or digest != old.get("sha256")):
            raise CacheInvalid(name, path, change)
        current[part] = {**stat, "sha256": digest}
    return current


# ------------------------------------------------------------------------ reading and checking
_META_FIELDS = {
    "name": str, "cache_version": int, "normalization": dict, "sources": dict, "has_label": bool,
    "affine": list, "nifti_header": str, "spacing": list, "shape_xyz": list, "shape": list,
    "box_offset": list, "box_size": list, "raw_dtype": str, "params": list, "locations_count": list,
    "bytes": dict, "modalities": list,
}


def _settings():
    return {"cache_version": CACHE_VERSION, "normalization": {"name": norm.NAME, "version": norm.VERSION}}


def _read_meta(case_cache, name):
    """meta.json -> dict, checked field by field; CacheInvalid when missing or not usable."""
    path = case_cache / META
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise CacheInvalid(name, path, "not preprocessed") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CacheInvalid(name, path, f"unreadable cache metadata: {err}") from err
    if not isinstance(meta, dict):
        raise CacheInvalid(name, path, f"cache metadata is a JSON {type(meta).__name__}, not an object")
    version = meta.get("cache_version")
    if version != CACHE_VERSION:
        old = " (normalised float32 image.npy)" if version == 1 else ""
        raise CacheInvalid(name, path, f"cache format {version}{old}; this version reads format "
                           f"{CACHE_VERSION}")
    for key, kind in _META_FIELDS.items():
        if type(meta.get(key)) is not kind:  # `type is`: a bool is not an int here
            raise CacheInvalid(name, path, f"cache metadata field {key!r} missing or not a {kind.__name__}")
    problem = _meta_problem(meta, name)
    if problem:
        raise CacheInvalid(name, path, f"cache metadata: {problem}")
    return meta


def _ints(values, count):
    return len(values) == count and all(type(v) is int for v in values)


def _meta_problem(meta, name):
    """What is inconsistent in a meta.json whose fields have the right types, or None."""
    if meta["name"] != name:
        return f"describes case {meta['name']!r}"
    if meta["normalization"] != _settings()["normalization"]:
        return f"normalisation {meta['normalization']}, expected {_settings()['normalization']}"
    if meta["raw_dtype"] not in RAW_DTYPES:
        return f"image dtype {meta['raw_dtype']!r} not in {RAW_DTYPES}"
    shape, offset, size = meta["shape"], meta["box_offset"], meta["box_size"]
    if not (_ints(shape, 3) and _ints(offset, 3) and _ints(size, 3)) or not all(
            0 <= o and 1 <= n and o + n <= s for s, o, n in zip(shape, offset, size)):
        return f"box at {offset} of size {size} does not fit the volume {shape}"
    params = np.asarray(meta["params"], dtype=object)
    if params.shape != (len(MODALITIES), len(norm.PARAMS)) or not all(
            type(v) in (int, float) and np.isfinite(v) for v in params.ravel()):
        return f"normalisation parameters are not {len(MODALITIES)} x {len(norm.PARAMS)} finite numbers"
    if meta["has_label"] and not (_ints(meta["locations_count"], len(REGIONS))
                                  and min(meta["locations_count"]) >= 0):
        return f"locations_count {meta['locations_count']} is not {len(REGIONS)} counts"
    if not all(isinstance(s, dict) for s in meta["sources"].values()):
        return "sources are not file records"
    return None


def _open_array(name, path, meta, dtype, shape):
    """Memory-map one cached array after checking its recorded size, dtype and shape."""
    expected = meta["bytes"].get(path.name)
    try:
        size = path.stat().st_size
        if size != expected:
            raise CacheInvalid(name, path, f"{size} bytes, expected {expected} (truncated or replaced)")
        array = np.load(path, mmap_mode="r")
    except CacheInvalid:
        raise
    except (OSError, ValueError) as err:  # missing, or a corrupt .npy header
        raise CacheInvalid(name, path, f"unreadable cached array: {err}") from err
    if array.dtype != dtype or array.shape != shape or not array.flags.c_contiguous:
        raise CacheInvalid(name, path, f"cached array is {array.dtype} {array.shape}, expected "
                           f"{np.dtype(dtype)} {shape}")
    return array


def _open(case_cache, name):
    """Open and check a cached case -> CachedCase, or CacheInvalid naming the file."""
    meta = _read_meta(case_cache, name)
    size = tuple(meta["box_size"])
    raw = _open_array(name, case_cache / IMAGE, meta, np.dtype(meta["raw_dtype"]), (len(MODALITIES), *size))
    label = locations = None
    if meta["has_label"]:
        label = _open_array(name, case_cache / LABEL, meta, np.uint8, size)
        counts = np.bincount(label.reshape(-1), minlength=256)
        unexpected = sorted(set(np.flatnonzero(counts).tolist()) - set(LABELS))
        if unexpected:
            raise CacheInvalid(name, case_cache / LABEL, f"label values {unexpected} not in {LABELS}")
        flat = _open_array(name, case_cache / LOCATIONS, meta, np.int32,
                           (sum(meta["locations_count"]), 3))
        offset = np.array(meta["box_offset"])
        if len(flat) and ((flat.min(0) < offset).any() or (flat.max(0) >= offset + size).any()):
            raise CacheInvalid(name, case_cache / LOCATIONS, "foreground locations outside the box")
        locations = tuple(np.split(flat, np.cumsum(meta["locations_count"])[:-1]))
    return CachedCase(name=name, raw=raw, label=label, locations=locations,
                      offset=tuple(meta["box_offset"]), shape=tuple(meta["shape"]),
                      params=np.array(meta["params"], np.float32), meta=meta)


def load_cached(cache_dir, name):
    """Open a preprocessed case memory-mapped -> CachedCase, after checking it (module docstring).

    Raises CacheInvalid (a CaseError) naming the case and the file when the case is missing,
    broken or of another format; preprocess() rebuilds such cases.
    """
    case_cache = case_folder(cache_dir, name)
    try:
        return _open(case_cache, name)
    except CacheInvalid as err:
        raise CacheInvalid(name, err.path, f"{err.problem} (run python -m datasets.preprocess, "
                           "or train.py, to rebuild it)") from None


# ---------------------------------------------------------------------------------- building
def _save_npy(path, array):
    """np.save's format, C order as _open_array expects (written by utils.io.write_bytes, which
    names a full disk)."""
    array = np.ascontiguousarray(array)
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, np.lib.format.header_data_from_array_1_0(array))
    # The bytes as a numpy view, not memoryview.cast, which refuses an empty array (the
    # locations of a case without tumour).
    write_bytes(path, header.getbuffer(), array.reshape(-1).view(np.uint8))


def _build(name, files, case_cache, sources):
    """Read and validate the case `name` from `files` ({part: Path}), compact and write it;
    meta.json goes last. -> what the case does not look like of BraTS (brats_like_warnings:
    training on it would go on without a word).

    `sources` is fingerprinted before reading, so a file changed while we read it leaves
    a stale fingerprint and the case is rebuilt next time.
    """
    case = read_files(name, files)
    warnings = brats_like_warnings(case)
    cached = CachedCase.from_arrays(case.name, case.image, case.label, norm.case_params(case))
    (case_cache / META).unlink(missing_ok=True)  # the case is invalid until its meta is back
    arrays = {IMAGE: cached.raw, LABEL: cached.label,
              LOCATIONS: None if cached.locations is None else np.concatenate(cached.locations)}
    sizes = {}
    for file, array in arrays.items():
        if array is None:
            (case_cache / file).unlink(missing_ok=True)
        else:
            _save_npy(case_cache / file, array)
            sizes[file] = (case_cache / file).stat().st_size
    written = fingerprint(case.name, {file: case_cache / file for file in sizes})
    meta = {
        "name": case.name,
        **_settings(),
        "sources": sources,
        "has_label": case.label is not None,
        "affine": case.affine.tolist(),
        "nifti_header": base64.b64encode(case.header.binaryblock).decode("ascii"),
        "spacing": list(case.spacing),
        "shape_xyz": list(case.shape_xyz),
        "shape": list(cached.shape),
        "box_offset": list(cached.offset),
        "box_size": list(cached.raw.shape[1:]),
        "raw_dtype": cached.raw.dtype.name,
        "params": cached.params.tolist(),  # float32 -> float is exact, and JSON round-trips floats
        "locations_count": [] if cached.locations is None else [len(r) for r in cached.locations],
        "bytes": sizes,
        "arrays": written,  # what the arrays hold: an edit at the same size is caught on re-use
        "modalities": list(MODALITIES),
    }
    write_text(case_cache / META, json.dumps(meta, indent=1))
    return warnings


def _process(job):
    """Worker: bring one case's cache up to date -> (name, why it was built: None if it was
    re-used, '' for a case never (completely) cached, else the CacheInvalid message; the
    fingerprints of the sources its cache now holds; the warnings of a built case)."""
    case_dir, case_cache, require_label = job
    name = case_cache.name
    # One writer per case; a second preprocessor waits here, then finds the case fresh.
    with exclusive_lock(case_cache, f"cache of case {name}", wait=True):
        for file in (IMAGE, LABEL, LOCATIONS, META):
            remove_stale_temps(case_cache / file)  # left by a killed writer: nobody else writes now
        files = case_files(case_dir, require_label)
        if not (case_cache / META).exists():
            reason = ""
        else:
            try:
                meta = _open(case_cache, name).meta
                sources = _unchanged_sources(name, meta["sources"], files)
                arrays = _unchanged(name, meta.get("arrays", {}),
                                    {file: case_cache / file for file in meta["bytes"]},
                                    "changed since it was written (content differs from its record)")
                if (sources, arrays) != (meta["sources"], meta.get("arrays")):  # same content, new
                    with contextlib.suppress(OSError):  # stat: recorded to save hashing it again
                        write_text(case_cache / META, json.dumps(
                            {**meta, "sources": sources, "arrays": arrays}, indent=1))
                return name, None, sources, []
            except CacheInvalid as err:
                reason = str(err)
        sources = fingerprint(name, files)
        return name, reason, sources, _build(case_dir.name, files, case_cache, sources)


def _open_own(cache_dir, name, sources):
    """load_cached under the case's lock, refusing a case whose sources differ in content
    (size, SHA-256, as for re-use) from `sources`, those preprocess checked or built it from:
    another process sharing the cache folder rebuilt it in between from other data under the
    same case name, and returning its arrays would silently swap datasets."""
    case_cache = case_folder(cache_dir, name)
    with exclusive_lock(case_cache, f"cache of case {name}", wait=True):
        case = load_cached(cache_dir, name)

    def content(records):
        return {part: (r.get("size"), r.get("sha256")) for part, r in records.items()}

    theirs = case.meta["sources"]
    if content(theirs) != content(sources):
        raise CaseError(name, case_cache, "rebuilt meanwhile by another process from other source "
                        f"files ({next(iter(theirs.values()), {}).get('path')}); give each dataset "
                        "its own cache folder (--cache_dir)")
    return case


def _run(jobs, num_workers, done):
    """Run _process over jobs (in this process, or over num_workers processes), calling
    done(result) as each case finishes.

    The first error is raised as soon as its case finishes; cases not yet started are
    cancelled. A worker that dies (killed for memory, or cannot start) raises
    BrokenProcessPool (see worker_pool).
    """
    if num_workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            with _named_errors(job[0]):
                done(_process(job))
        return
    # spawn, not fork: callers such as train.py have imported torch and may have started
    # threads (torch, CUDA, tqdm's monitor) whose locks a forked child would inherit held.
    # The cost: a child re-imports the main script, so a script piped to `python -`
    # cannot start workers (BrokenProcessPool below; use num_workers=1 there).
    context = multiprocessing.get_context("spawn")
    pool = worker_pool(min(num_workers, len(jobs)), context)
    try:
        futures = {pool.submit(_process, job): job for job in jobs}
        for future in as_completed(futures):
            with _named_errors(futures[future][0]):
                done(future.result())
    finally:
        pool.shutdown(cancel_futures=True)  # after an error: wait only for the running cases


@contextlib.contextmanager
def _named_errors(case_dir):
    """Name the case on errors that do not name it already (CaseError does)."""
    try:
        yield
    except BrokenProcessPool as err:  # no case to blame: the pool, not a case, failed
        raise BrokenProcessPool(
            "a preprocessing worker process died or could not start (out of memory? a script "
            "piped to `python -`, which 'spawn' workers cannot re-import?); "
            "num_workers=1 preprocesses in this process"
        ) from err
    except CaseError:
        raise
    except Exception as err:  # not a data error (e.g. the cache disk is full): keep its type
        err.add_note(f"while preprocessing case {case_dir.name} ({case_dir})")
        raise


def preprocess(list_path, cache_dir, data_root=None, num_workers=None, progress=False,
               require_label=False):
    """Cache every case of a datalist; returns the CachedCases in datalist order.

    Valid, fresh cases are re-used; missing, broken, outdated or stale ones are (re)built over
    num_workers processes (0 or 1: in this process), each rebuild of an existing case announced
    on stderr with its reason. Returns once every case is valid; the first case that fails
    raises (CaseError naming the case and the file) and stops the others; so does a case that
    another process sharing cache_dir rebuilt meanwhile from other sources (other data under
    the same case name). require_label: a case without a label (seg) file is such an error
    (training and its validation list).
    """
    cache_dir = Path(cache_dir)
    folders = read_datalist(list_path, data_root)
    refuse_duplicates(folders, list_path)  # one cache folder per case name
    names = [folder.name for folder in folders]
    jobs = [(folder, case_folder(cache_dir, name), require_label) for folder, name in zip(folders, names)]
    for folder, case_cache, _ in jobs:  # the cache's files (meta.json, label.npy...) among the scans
        if case_cache.resolve() == folder.resolve():
            raise UsageError(f"--cache_dir {cache_dir} is the folder of the cases (it holds "
                             f"{folder.name}): the cache would be written into, and its files "
                             "deleted from, the case folders; choose another --cache_dir")
    num_workers = default_workers() if num_workers is None else num_workers
    bar = tqdm(total=len(jobs), desc="preprocess", unit="case", disable=not progress,
               mininterval=progress_interval())
    built, sources = [], {}

    def done(result):
        name, reason, sources[name], warnings = result
        if reason:
            tqdm.write(f"{reason}; rebuilt", file=sys.stderr)
        for warning in warnings:
            tqdm.write(f"warning: {warning}", file=sys.stderr)
        if reason is not None:
            built.append(name)
        bar.update()

    try:
        _run(jobs, num_workers, done)
        bar.set_postfix(built=len(built), reused=len(jobs) - len(built))
    finally:
        bar.close()
    return [_open_own(cache_dir, name, sources[name]) for name in names]


def main(argv=None):
    parser = ArgumentParser(prog="python -m datasets.preprocess", description=__doc__.split("\n")[0])
    parser.add_argument("--data_list", type=path_given, required=True,
                        help="datalist file, one case folder per line")
    parser.add_argument("--cache_dir", type=path_given, required=True,
                        help="output folder (one subfolder per case)")
    parser.add_argument("--data_root", default=None,
                        help="re-base the datalist entries under this folder ('': none, as in train.py)")
    parser.add_argument("--num_workers", type=int_at_least(0), default=default_workers(),
                        help="parallel processes; 0 or 1: in this process (default %(default)s)")
    args = parser.parse_args(argv)
    cases = preprocess(args.data_list, args.cache_dir, args.data_root or None, args.num_workers,
                       progress=True)
    if not cases:  # as train.py and eval.py say: '0 cases cached' would pass for a success
        raise UsageError(f"--data_list {args.data_list} lists no cases")
    labelled = sum(case.label is not None for case in cases)
    print(f"{len(cases)} cases ({labelled} with labels) cached in {args.cache_dir}")


if __name__ == "__main__":
    run_cli(main)
