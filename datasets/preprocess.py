"""Preprocessing cache (nnU-Net style): read, validate and normalise each case once.

    python -m datasets.preprocess --data_list datalist/BraTS18/BraTS18_train_all.csv \\
        --cache_dir cache/BraTS18 --data_root /data/BraTS2018 --num_workers 8

For each case, CACHE/<case>/ holds
  image.npy  float32 (4, D, H, W), normalised per modality (datasets.normalize)
  label.npy  uint8 (D, H, W) in {0, 1, 2, 4}, only when the case has a seg file
  meta.json  name, source files with size + mtime_ns, affine, NIfTI header, spacing,
             shapes, normalisation name/version
Every file is written atomically and meta.json last (after removing the old one), so a
case whose meta.json exists is complete. A case is re-used only while its source files keep
their size and mtime and the normalisation version is unchanged; otherwise it is rebuilt.
Training opens the arrays memory-mapped (load_cached) and reads patches, never volumes.
"""
import argparse
import base64
import contextlib
import dataclasses
import json
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import nibabel as nib
import numpy as np
from tqdm import tqdm

from datasets import normalize as norm
from datasets.brats import CaseError, find_case_files, load_case, read_datalist
from utils.io import atomic_path, write_text
from utils.modalities import MODALITIES

CACHE_VERSION = 1
IMAGE, LABEL, META = "image.npy", "label.npy", "meta.json"


@dataclasses.dataclass
class CachedCase:
    name: str
    image: np.ndarray  # memmap float32 (4, D, H, W), normalised
    label: np.ndarray | None  # memmap uint8 (D, H, W), or None for unlabelled cases
    meta: dict


def _settings():
    return {"cache_version": CACHE_VERSION, "normalization": {"name": norm.NAME, "version": norm.VERSION}}


def fingerprint(files):
    """{part: Path} -> {part: {path, size, mtime_ns}}: what makes a cached case stale."""
    out = {}
    for part, path in files.items():
        stat = Path(path).stat()
        out[part] = {"path": str(Path(path).resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    return out


def header_from_meta(meta):
    """The NIfTI header of the case's FLAIR file, kept in meta.json for exporting predictions."""
    return nib.Nifti1Header(base64.b64decode(meta["nifti_header"]))


def _read_meta(case_cache):
    path = case_cache / META
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as err:
        raise CaseError(case_cache.name, path, f"unreadable cache metadata: {err}") from err


def _is_fresh(case_cache, sources):
    """True when the cached case exists, is complete and matches the source fingerprint."""
    try:
        meta = _read_meta(case_cache)
    except CaseError:  # corrupt metadata: the cache is disposable, rebuild the case
        return False
    if meta is None or {k: meta.get(k) for k in _settings()} != _settings():
        return False
    if meta.get("sources") != sources:
        return False
    needed = [IMAGE] + ([LABEL] if meta["has_label"] else [])
    return all((case_cache / name).is_file() for name in needed)


def _save_npy(path, array):
    with atomic_path(path) as tmp:
        np.save(tmp, array)


def _build(case_dir, case_cache, sources):
    """Read, validate, normalise and write one case; meta.json goes last.

    `sources` is fingerprinted before reading, so a file changed while we read it leaves
    a stale fingerprint and the case is rebuilt next time.
    """
    case = load_case(case_dir)
    image = norm.normalize_case(case)
    (case_cache / META).unlink(missing_ok=True)  # the case is invalid until its meta is back
    _save_npy(case_cache / IMAGE, image)
    if case.label is not None:
        _save_npy(case_cache / LABEL, case.label)
    else:
        (case_cache / LABEL).unlink(missing_ok=True)
    meta = {
        "name": case.name,
        **_settings(),
        "sources": sources,
        "has_label": case.label is not None,
        "affine": case.affine.tolist(),
        "nifti_header": base64.b64encode(case.header.binaryblock).decode("ascii"),
        "spacing": list(case.spacing),
        "shape_xyz": list(case.shape_xyz),
        "shape": list(image.shape[1:]),
        "modalities": list(MODALITIES),
    }
    write_text(case_cache / META, json.dumps(meta, indent=1))


def _process(job):
    """Worker: (case_dir, case_cache) -> (name, rebuilt?)."""
    case_dir, case_cache = job
    sources = fingerprint(find_case_files(case_dir))
    if _is_fresh(case_cache, sources):
        return case_dir.name, False
    _build(case_dir, case_cache, sources)
    return case_dir.name, True


def load_cached(cache_dir, name):
    """Open a preprocessed case memory-mapped -> CachedCase (nothing is read until sliced)."""
    case_cache = Path(cache_dir) / name
    meta = _read_meta(case_cache)
    if meta is None:
        raise CaseError(name, case_cache / META, "not preprocessed (run python -m datasets.preprocess)")
    image = np.load(case_cache / IMAGE, mmap_mode="r")
    label = np.load(case_cache / LABEL, mmap_mode="r") if meta["has_label"] else None
    return CachedCase(name=name, image=image, label=label, meta=meta)


def default_workers():
    return max(1, min(8, os.cpu_count() or 1))


def _run(jobs, num_workers, bar):
    """Run _process over jobs (in this process, or over num_workers processes) -> number rebuilt.

    The first error is raised as soon as its case finishes; cases not yet started are
    cancelled. A worker that dies (killed for memory, or cannot start) raises
    BrokenProcessPool instead of hanging, which multiprocessing.Pool would do.
    """
    rebuilt = 0
    if num_workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            with _named_errors(job[0]):
                rebuilt += _process(job)[1]
            bar.update()
        return rebuilt
    # spawn, not fork: callers such as train.py have imported torch and may have started
    # threads (torch, CUDA, tqdm's monitor) whose locks a forked child would inherit held.
    # The cost: a child re-imports the main script, so a script piped to `python -`
    # cannot start workers (BrokenProcessPool below; use num_workers=1 there).
    context = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(min(num_workers, len(jobs)), mp_context=context)
    try:
        futures = {pool.submit(_process, job): job for job in jobs}
        for future in as_completed(futures):
            with _named_errors(futures[future][0]):
                rebuilt += future.result()[1]
            bar.update()
    finally:
        pool.shutdown(cancel_futures=True)  # after an error: wait only for the running cases
    return rebuilt


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


def preprocess(list_path, cache_dir, data_root=None, num_workers=None, progress=False):
    """Cache every case of a datalist; returns the CachedCases in datalist order.

    Fresh cases are re-used; stale or missing ones are rebuilt, over num_workers processes
    (1 = in this process). Returns once every case is valid; the first case that fails
    raises (CaseError naming the case and the file) and stops the others.
    """
    cache_dir = Path(cache_dir)
    folders = read_datalist(list_path, data_root)
    names = [folder.name for folder in folders]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise CaseError(duplicates[0], list_path, "case name listed more than once (cache key clash)")
    jobs = [(folder, cache_dir / folder.name) for folder in folders]
    num_workers = default_workers() if num_workers is None else num_workers
    bar = tqdm(total=len(jobs), desc="preprocess", unit="case", disable=not progress)
    try:
        rebuilt = _run(jobs, num_workers, bar)
        bar.set_postfix(rebuilt=rebuilt, reused=len(jobs) - rebuilt)
    finally:
        bar.close()
    return [load_cached(cache_dir, name) for name in names]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data_list", required=True, help="datalist file, one case folder per line")
    parser.add_argument("--cache_dir", required=True, help="output folder (one subfolder per case)")
    parser.add_argument("--data_root", default=None, help="re-base the datalist entries under this folder")
    parser.add_argument("--num_workers", type=int, default=default_workers())
    args = parser.parse_args(argv)
    cases = preprocess(args.data_list, args.cache_dir, args.data_root, args.num_workers, progress=True)
    labelled = sum(case.label is not None for case in cases)
    print(f"{len(cases)} cases ({labelled} with labels) cached in {args.cache_dir}")


if __name__ == "__main__":
    main()
