"""A training run's snapshot folder: where a run starts (a new run, a resume, a finished run) and
which settings a resumed run must share with the run it continues."""
import json
from pathlib import Path

from utils.cli import UsageError
from utils.io import remove_stale_temps
from utils.modalities import parse_mode, parse_teachers

# What a run writes into its snapshot folder (with TensorBoard's events.out.tfevents.*).
RUN_FILES = ("config.json", "teachers.json", "last.pth", "final.pth")


def claim_snapshot_dir(args, folder, log):
    """Where this run starts, decided on rank 0 under the folder's lock, before anything is
    written: ("finished", final.pth), ("resume", checkpoint) or ("start", None).

    A folder that holds a run is never restarted silently: it resumes from its own last.pth
    (later than any --reload_path, such as stage 1's final.pth in a re-run of stage 2), or it
    is finished (final.pth), or it is refused; --overwrite True deletes the run's files first.
    Temporary files of writes killed mid-way are deleted (no other writer holds the lock).
    """
    stale = sum(remove_stale_temps(folder / name) for name in RUN_FILES)
    if stale:
        log(f"deleted {stale} temporary file(s) left in {folder} by interrupted writes")
    existing = [folder / n for n in RUN_FILES if (folder / n).exists()]
    existing += sorted(folder.glob("events.out.tfevents.*"))
    last, reload = folder / "last.pth", Path(args.reload_path) if args.reload_path else None
    if args.overwrite:
        if reload is not None and reload.resolve() in [p.resolve() for p in existing]:
            raise UsageError(f"--reload_path {reload} is one of the files --overwrite deletes")
        for path in existing:
            path.unlink()
        if existing:
            log(f"--overwrite: deleted the previous run in {folder} ({len(existing)} files)")
    elif (folder / "final.pth").exists():
        return "finished", folder / "final.pth"
    elif last.exists():
        if reload is not None and reload.resolve() != last.resolve():
            log(f"resuming from {last}, this folder's own checkpoint (it continues "
                f"--reload_path {reload})")
        return "resume", last
    elif existing:  # stopped before its first checkpoint: nothing to resume, nothing to lose
        if not _holds_run_config(folder / "config.json"):  # unless the files are not a run's
            raise UsageError(f"{folder} holds {', '.join(p.name for p in existing)} but no "
                             f"train.py run (no config.json of one): choose another "
                             f"--snapshot_dir, or --overwrite True to delete them")
        for path in existing:
            path.unlink()
        log(f"{folder} holds a run stopped before its first last.pth; starting it again "
            f"(deleted {', '.join(p.name for p in existing)})")
    return ("resume", reload) if reload is not None else ("start", None)


def _holds_run_config(path):
    """Whether `path` is a config.json train.py wrote (the first file a run writes)."""
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and "model_config" in config


# What a resumed run shares with the run it continues (the exact resume); the device, the
# workers, the speed options, logging and where the data are read from (not which cases) may
# change.
RUN_SETTINGS = ("patch_size", "batch_size", "learning_rate", "power", "momentum", "weight_decay",
                "kd_weight", "mode", "missing_schedule", "teachers", "num_steps", "random_seed",
                "random_mirror", "random_scale", "augment", "val_pred_every", "overlap", "amp",
                "world_size", "train_cases", "val_cases")
# A finished run is checked on what it trained: run.sh's next stage may use other processes
# (LAUNCH), autocast (AMP) or election overlap without making the finished one another run.
FINISHED_SETTINGS = tuple(k for k in RUN_SETTINGS if k not in ("world_size", "amp", "overlap"))
# Network fields that change memory or work, not results.
SPEED_FIELDS = ("checkpoint_encoder", "encode_all")
# Settings spelled in several ways ('0,2', 'flair,t1ce', '2, 0'): compared as parsed.
PARSED_SETTINGS = {"mode": parse_mode, "teachers": parse_teachers}


def same_setting(key, saved, given):
    """Whether the run's value of setting `key` and this command's are the same setting."""
    parse = PARSED_SETTINGS.get(key, lambda value: value)
    try:
        return parse(saved) == parse(given)
    except ValueError:  # recorded before such a spelling was refused ('0,0'): not this command's
        return False


def refuse_changed_settings(saved, config, folder, settings=RUN_SETTINGS):
    """UsageError naming the first of `settings` (or network field) in which `config` (this
    command's) differs from the run in `folder` (`saved`: its checkpoint's config), before
    anything is written: continuing it with other settings would silently give a run that
    neither command describes."""
    network = lambda c: {k: v for k, v in c.get("model_config", {}).items() if k not in SPEED_FIELDS}
    old, new = network(saved), network(config)
    if old != new:
        field = next(k for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k))
        raise UsageError(f"{folder} holds a run of another network ({field} {old.get(field)}, this "
                         f"command {new.get(field)}): pass the model flags it was trained with "
                         f"(its config.json), --overwrite True to start over, or another --snapshot_dir")
    for key in settings:
        if key in saved and not same_setting(key, saved[key], config[key]):
            setting = {"patch_size": "--input_size", "world_size": "processes",
                       "train_cases": "--train_list of", "val_cases": "--val_list of"
                       }.get(key, f"--{key}")
            raise UsageError(f"{folder} holds a run with {setting} {saved[key]} (this command: "
                             f"{config[key]}); run it with the same settings (its config.json), "
                             f"--overwrite True to start over, or choose another --snapshot_dir")
