"""Training checkpoints: plain state_dicts and primitives, written atomically, read weights-only.

A checkpoint is a dict (every value loadable by `torch.load(..., weights_only=True)`):

    model       model.state_dict() (unwrapped from DDP)
    optimizer   optimizer.state_dict()
    scaler      GradScaler.state_dict() ({} when fp16 is off)
    iteration   number of iterations completed = the next iteration to run
    teachers    list of modality indices used for distillation from `iteration` on
    elected_at  iteration of the election that chose `teachers` (None: from --teachers)
    rng         RNG states (see `rng_state`), so a resumed run continues the same streams
    config      the resolved training configuration (a JSON-able dict)
    ...         entries the caller adds (train.py: random_start, the first iteration of the
                random-missing stage, for --missing_schedule)

Nothing pickles code: numpy's and Python's RNG states are converted to lists and tensors.
"""
import io
import itertools
import random
import re
import zipfile
from pathlib import Path

import numpy as np
import torch

from models import LCKD, MODEL_SIZES, NORMS, LCKDConfig
from utils.io import write_bytes


def unwrap(model):
    """The module whose state_dict is saved: strips DistributedDataParallel's `.module`."""
    return model.module if hasattr(model, "module") else model


def rng_state(subset_rng: random.Random):
    """Every RNG the training loop touches, as weights_only-safe values."""
    np_state = np.random.get_state(legacy=False)
    state = {
        "python": _python_state(random.getstate()),
        "subset": _python_state(subset_rng.getstate()),
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state, subset_rng: random.Random):
    """Inverse of `rng_state`."""
    random.setstate(_python_tuple(state["python"]))
    subset_rng.setstate(_python_tuple(state["subset"]))
    np_state = state["numpy"]
    np.random.set_state({
        "bit_generator": np_state["bit_generator"],
        "state": {"key": np_state["key"].numpy().astype(np.uint32), "pos": np_state["pos"]},
        "has_gauss": np_state["has_gauss"],
        "gauss": np_state["gauss"],
    })
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _python_state(state):
    version, internal, gauss_next = state
    return {"version": version, "internal": list(internal), "gauss_next": gauss_next}


def _python_tuple(state):
    return (state["version"], tuple(state["internal"]), state["gauss_next"])


def make_checkpoint(model, optimizer, scaler, iteration, teachers, elected_at, subset_rng, config,
                    **extra):
    """The checkpoint dict described in the module docstring; `extra` adds primitive entries."""
    return {
        "model": unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else {},
        "iteration": int(iteration),
        "teachers": [int(t) for t in teachers],
        "elected_at": None if elected_at is None else int(elected_at),
        "rng": rng_state(subset_rng),
        "config": dict(config),
        **extra,
    }


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read."""


def non_finite(state_dict):
    """Names of the floating tensors holding a NaN or an infinity (one host sync per tensor)."""
    return [name for name, value in state_dict.items()
            if value.is_floating_point() and not torch.isfinite(value).all()]


def state_mismatch(expected, state):
    """What keeps `state` from loading into a network whose state_dict is `expected` -> one
    line (load_state_dict's own message lists every tensor: ~100 lines), or None."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    resized = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    parts = ([f"{len(resized)} tensors of another shape, e.g. {resized[0]} "
              f"{tuple(state[resized[0]].shape)} for {tuple(expected[resized[0]].shape)}"] if resized else [])
    parts += [f"{len(keys)} {what}, e.g. {keys[0]}" for keys, what in
              ((missing, "tensors missing"), (unexpected, "unexpected tensors")) if keys]
    return "; ".join(parts) or None


def network_mismatch(model, state, given=""):
    """What keeps `state` from loading into `model` (an LCKD), then the model flags of a network
    it fits -> '(what); it holds …', one line, or None. given: the model flags of this command
    (e.g. '--model_size full'), named as the ones to replace."""
    problem = state_mismatch(model.state_dict(), state)
    if problem is None:
        return None
    config = model.config
    for size, norm in itertools.product(MODEL_SIZES, NORMS):
        candidate = LCKDConfig.from_name(size, weight_std=config.weight_std, norm=norm,
                                         activation=config.activation)
        if candidate != config and not state_mismatch(LCKD(candidate).state_dict(), state):
            return (f"({problem}); it holds a network of --model_size {size} --norm_cfg {norm}: "
                    f"pass those flags{f' instead of {given}' if given else ''}")
    return f"({problem}); is it a checkpoint of this repository's LCKD?"


def save_checkpoint(checkpoint, path):
    """Write atomically: a kill mid-write leaves the previous file intact. Weights with a NaN or
    an infinity are refused: such a file would replace a usable one with a useless one."""
    bad = non_finite(checkpoint.get("model", {}))
    if bad:
        raise FloatingPointError(f"refusing to write {path}: {len(bad)}/{len(checkpoint['model'])} "
                                 f"weight tensors are non-finite (first: {bad[0]})")
    buffer = io.BytesIO()  # then written by write_bytes, which names a full disk
    torch.save(checkpoint, buffer)
    write_bytes(path, buffer.getbuffer(), durable=True)  # a crash must not cost the run


def load_checkpoint(path):
    """Read a checkpoint (or a bare state_dict) without executing pickled code."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} " + ("is a folder, not a file" if path.is_dir()
                                                         else "does not exist"))
    damaged = _failed_checksum(path)
    if damaged is not None:
        raise CheckpointError(f"cannot read checkpoint {path}: its record {damaged} does not match "
                              "its checksum (a damaged file?)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
        raise CheckpointError(f"cannot read checkpoint {path}: {_load_failure(error, path)}"
                              ) from error


def _failed_checksum(path):
    """The first record of a zip checkpoint (torch.save's format) whose bytes fail its CRC-32,
    or None. torch.load does not check them: a flipped bit on a disk or in a copy loads as a
    changed weight. Of a file that is not a whole zip archive, or not readable, torch.load
    says what is wrong."""
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.testzip()
    except Exception:  # BadZipFile, OSError, EOFError, ...: torch.load's error names it
        return None


# How every file torch.save writes begins: a zip archive, or (before PyTorch 1.6) a pickle
TORCH_SAVE_STARTS = (b"PK\x03\x04", b"\x80")


def _load_failure(error, path):
    """torch.load's error -> what it says of the file, in one line. (Its text, coloured with
    terminal escapes, advises weights_only=False, which would run the file's pickled code; of a
    text file it says 'KeyError: 101'.)"""
    if isinstance(error, OSError) and error.strerror:  # not opened (permissions): not damaged
        return f"{error.strerror.lower()}; check the file's permissions"
    with open(path, "rb") as file:
        start = file.read(4)
    if start == b"":
        return "the file is empty"
    if not start.startswith(TORCH_SAVE_STARTS):
        return "not a PyTorch checkpoint (torch.save writes a zip archive or a pickle)"
    pickled = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
    if pickled:
        return (f"it pickles {pickled.group(1)} objects (the published code saves whole models), "
                "which are never unpickled here; load it where that class exists and save its "
                "state_dict()")
    if "Weights only load failed" in str(error):
        return "not a PyTorch checkpoint of tensors and plain values"
    return f"{type(error).__name__}: {' '.join(str(error).split())} (a truncated or damaged file?)"
