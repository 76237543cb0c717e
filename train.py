r"""Train LCKD with the published recipe: Dice + BCE + 0.1 * KD, SGD with poly decay,
teacher election on the validation list at iteration 0 and every --val_pred_every iterations.

Examples (from the repository root):

    # published two-stage recipe on GPU 0 (what run.sh does)
    python train.py --snapshot_dir snapshots/LCKD_stage1/ --mode 0,1,2,3 --num_steps 80000
    python train.py --snapshot_dir snapshots/LCKD_stage2/ --mode random --num_steps 115000 \
        --reload_path snapshots/LCKD_stage1/final.pth

    # data elsewhere: re-base the list entries
    # ('../data/BraTS-2018/MICCAI_BraTS_2018_Data_Training/HGG/<case>')
    python train.py --data_root /data/MICCAI_BraTS_2018_Data_Training ...

    # after a crash, a kill, SIGTERM or Ctrl-C: the same command again resumes exactly where
    # the folder's last.pth left it; --overwrite True instead deletes the run and starts over

    # CPU smoke run on synthetic data with the small network
    python -m datasets.synthetic --out_dir data/synthetic --num_cases 12
    python train.py --device cpu --model_size small --input_size 32,64,64 --num_steps 200 \
        --val_pred_every 100 --train_list data/synthetic/train.csv \
        --val_list data/synthetic/val.csv --num_workers 0 --snapshot_dir snapshots/cpu_demo/

    # several GPUs / machines: one process per GPU, the batch is per process
    torchrun --nproc_per_node 4 train.py ...

Outputs in --snapshot_dir: config.json (resolved configuration), last.pth (every
--val_pred_every iterations, every --save_every_min minutes, on SIGTERM/SIGINT and after a
non-finite loss), final.pth, teachers.json (election history) and TensorBoard events; .lock
while a run uses the folder. Exit status: 0 done (or already finished), 1 error, 2 bad flags
(also settings that differ from the folder's run), 130/143 stopped by SIGINT/SIGTERM after
saving last.pth (or after final.pth, for a signal that came as the run finished; before the
first iteration, nothing to save).
"""
import argparse
import contextlib
import copy
import hashlib
import json
import math
import random
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from datasets.augment import augment_batch
from datasets.brats import read_datalist, resolve_list
from datasets.preprocess import preprocess
from datasets.sampling import IterationSampler, PatchDataset, loader_options
from models import ACTIVATIONS, LCKD, MODEL_SIZES, NORMS, LCKDConfig
from utils import distributed, speed
from utils.checkpoint import (CheckpointError, load_checkpoint, make_checkpoint, network_mismatch,
                              non_finite, save_checkpoint, set_rng_state, unwrap)
from utils.cli import (PUBLISHED_INPUT_SIZE, USER_ERRORS, ArgumentParser, StopSignals, UsageError,
                       ignore_stop_signals, overlap_fraction, progress_interval, run_cli,
                       str2bool, window_size)
from utils.election import (append_history, elect, format_result, mean_dice, read_history,
                            teacher_names)
from utils.overlay import overlay_panel
from utils.inference import AMP_DTYPES, autocast
from utils.io import write_text, writing_in
from utils.lock import exclusive_lock
from utils.losses import segmentation_loss
from utils.modalities import FULL, MODALITIES, parse_mode, parse_teachers, sample_subset, subset_name
from utils.regions import REGIONS
from utils.run_folder import (FINISHED_SETTINGS, claim_snapshot_dir, refuse_changed_settings,
                              same_setting)
from utils.segment import MODEL_FLAGS


def get_parser():
    p = ArgumentParser(prog="train.py", description=__doc__.split("\n\n")[0],
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", default="", help="JSON file of flag defaults (e.g. a run's "
                   "config.json); flags on the command line override it")
    g = p.add_argument_group("data (published flag names)")
    g.add_argument("--data_dir", default="datalist/", help="folder that --train_list/--val_list "
                   "are relative to when they do not exist as given (published)")
    # the published train.py's default; the published run.sh (and ours) passes the 285 cases
    # of BraTS18_train_all.csv
    g.add_argument("--train_list", default="datalist/BraTS18/BraTS18_train.csv")
    g.add_argument("--val_list", default="datalist/BraTS18/BraTS18_val.csv",
                   help="labelled cases for the teacher election ('' = no election)")
    g.add_argument("--data_root", default="", help="re-base the lists' case paths onto this folder")
    # '%(default)s' (empty) keeps argparse from appending '(default: )'
    g.add_argument("--cache_dir", default="", help="preprocessed-case cache (default%(default)s: "
                   "cache/<name of the train list's folder>)")
    g.add_argument("--input_size", default=PUBLISHED_INPUT_SIZE, help="patch D,H,W")
    g.add_argument("--batch_size", type=int, default=2, help="per process")
    g.add_argument("--num_workers", type=int, default=-1, help="DataLoader workers per process "
                   "(-1: sized from the machine, see datasets.sampling.loader_options); also "
                   "the preprocessing processes (-1: utils.workers.default_workers)")
    g.add_argument("--random_mirror", type=str2bool, default=True)
    g.add_argument("--random_scale", type=str2bool, default=True)
    g.add_argument("--augment", type=str2bool, default=True,
                   help="nnU-Net-style batch augmentation on the device")
    g = p.add_argument_group("model")
    g.add_argument("--model_size", choices=MODEL_SIZES, default="full",
                   help="full = published network; small = CPU-trainable, same code path")
    g.add_argument("--num_classes", type=int, default=3)
    g.add_argument("--weight_std", type=str2bool, default=True)
    g.add_argument("--norm_cfg", choices=NORMS, default="IN")
    g.add_argument("--activation_cfg", choices=ACTIVATIONS, default="LeakyReLU")
    g.add_argument("--checkpoint_encoder", type=str2bool, default=False,
                   help="activation checkpointing in the encoder (less memory; its forward runs twice)")
    g.add_argument("--encode_all_modalities", type=str2bool, default=False,
                   help="encode all four modalities in every forward, missing ones zeroed, as "
                   "the published code does (same results, more work; for benchmarks)")
    g = p.add_argument_group("speed (same maths; README, 'Speed options')")
    g.add_argument("--channels_last", choices=("auto", "on", "off"), default="auto",
                   help="channels-last 3D memory format; auto = on for CUDA")
    g.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                   help="torch.compile of the encoder and decoder; auto = on for CUDA")
    g = p.add_argument_group("optimisation")
    g.add_argument("--num_steps", type=int, default=80000, help="last iteration (exclusive); "
                   "also the poly schedule's length")
    g.add_argument("--start_iters", type=int, default=0, help="first iteration; a value > 0 "
                   "overrides the iteration stored in --reload_path")
    g.add_argument("--learning_rate", type=float, default=1e-2)
    g.add_argument("--power", type=float, default=0.9, help="poly decay exponent")
    g.add_argument("--momentum", type=float, default=0.99)
    g.add_argument("--weight_decay", type=float, default=0.0, help="published code defines "
                   "0.0005 but never passes it to SGD, so the published value is 0")
    g.add_argument("--kd_weight", type=float, default=0.1)
    g.add_argument("--mode", default="0,1,2,3", help="modalities seen in training: a subset "
                   "('0,1,2,3' = all, stage 1) or 'random' (k in {1,2,3} per iteration, stage 2)")
    g.add_argument("--missing_schedule", default="off", help="'off' (published) or 'ramp:N': "
                   "with --mode random, the probability of dropping modalities rises linearly "
                   "from 0 to 1 over the first N iterations of the random stage (otherwise all "
                   "four are kept)")
    g.add_argument("--teachers", default="0", help="teacher modalities before the first election")
    g.add_argument("--amp", choices=tuple(AMP_DTYPES), default="off",
                   help="autocast dtype; fp16 adds a gradient scaler; bf16 on a GPU only")
    g.add_argument("--random_seed", type=int, default=1234)
    g = p.add_argument_group("run")
    g.add_argument("--snapshot_dir", default="snapshots/LCKD/", help="one run per folder: a "
                   "folder holding a run resumes from its last.pth (see --overwrite)")
    g.add_argument("--overwrite", type=str2bool, default=False, help="delete the run already "
                   "in --snapshot_dir (checkpoints, config.json, teachers.json, TensorBoard "
                   "events) and start over")
    g.add_argument("--val_pred_every", type=int, default=5000,
                   help="teacher election and last.pth every this many iterations")
    g.add_argument("--save_every_min", type=float, default=30.0,
                   help="also write last.pth when this many minutes passed since the last one (0 = off)")
    g.add_argument("--overlap", type=overlap_fraction, default=1 / 3,
                   help="sliding-window overlap in the election, e.g. 1/3 or 0.5")
    g.add_argument("--reload_path", default="", help="checkpoint to start from (e.g. stage 1's "
                   "final.pth); the snapshot folder's own last.pth takes precedence")
    g.add_argument("--reload_from_checkpoint", type=str2bool, default=False,
                   help="accepted for the published commands; --reload_path alone loads the checkpoint")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    g.add_argument("--log_every", type=int, default=10, help="loss check (NaN/inf), progress and "
                   "TensorBoard scalars every N iterations: the loop's only host synchronisation")
    g.add_argument("--dist_timeout_min", type=float, default=30.0, help="DDP: a rank that does "
                   "not answer within this many minutes stops the run with an error (also bounds "
                   "the wait for rank 0's first preprocessing)")
    g.add_argument("--stop_at", type=int, default=0, help="testing: stop before this iteration, "
                   "as if the run were killed (final.pth only when it is --num_steps)")
    g.add_argument("--timing_warmup", type=int, default=0, help="benchmarks: iterations left "
                   "out of the returned steady-state timing (benchmarks/bench_train.py)")
    return p


# Entries of config.json that are not flags (so the file can be fed back to --config).
DERIVED = ("model_config", "world_size", "patch_size", "cache_dir_resolved", "train_cases",
           "val_cases")


def config_value(action, value, config):
    """A --config file's value for a flag, converted by the flag's type as argparse converts
    the command line's (it leaves defaults that are not text as they are)."""
    if not isinstance(value, (bool, int, float, str)):
        raise UsageError(f"--config {config}: {action.dest} {json.dumps(value)}: expected a "
                         "number, true/false or text")
    try:
        return action.type(str(value)) if action.type else str(value)
    except (ValueError, argparse.ArgumentTypeError) as error:
        raise UsageError(f"--config {config}: {action.dest} {json.dumps(value)}: {error}") from None


def parse_args(argv=None):
    parser = get_parser()
    known, _ = parser.parse_known_args(argv)
    if known.config:
        try:
            defaults = json.loads(Path(known.config).read_text())
        except (OSError, ValueError) as error:  # missing, unreadable, not JSON
            raise UsageError(f"--config {known.config}: {error}") from None
        if not isinstance(defaults, dict):
            raise UsageError(f"--config {known.config}: expected a JSON object of flag values")
        actions = {a.dest: a for a in parser._actions}
        unknown = set(defaults) - set(actions) - set(DERIVED)
        if unknown:
            raise UsageError(f"--config {known.config}: unknown settings {sorted(unknown)}; "
                             "remove them (the flags: train.py --help)")
        parser.set_defaults(**{k: config_value(actions[k], v, known.config)
                               for k, v in defaults.items() if k in actions and k != "config"})
    args = parser.parse_args(argv)
    for action in parser._actions:  # argparse checks the command line's values, not defaults
        value = getattr(args, action.dest, None)
        if action.choices is not None and value not in action.choices:
            raise UsageError(f"--{action.dest} {value!r} (from --config {known.config}): choose "
                             f"from {', '.join(map(str, action.choices))}")
    validate_args(args)
    return args


def validate_args(args):
    """Refuse impossible flag values up front (one line each), before anything is written.
    Sets args.patch_size and args.mode_parsed."""
    def need(ok, message):
        if not ok:
            raise UsageError(message)

    try:
        args.patch_size = window_size(args.input_size)
    except argparse.ArgumentTypeError as error:
        raise UsageError(f"--input_size: {error}") from None
    try:
        args.mode_parsed = parse_mode(args.mode)
        parse_teachers(args.teachers)
    except ValueError as error:
        raise UsageError(f"--mode/--teachers: {error}") from None
    need(args.mode_parsed != "all", "--mode all is for evaluation; train with 'random' or a subset")
    ramp = args.missing_schedule.removeprefix("ramp:")
    need(args.missing_schedule == "off" or (ramp.isdigit() and int(ramp) >= 1),
         f"--missing_schedule must be 'off' or 'ramp:N' with N >= 1, got {args.missing_schedule!r}")
    need(args.num_classes == 3, f"--num_classes must be 3 (the regions ET, WT, TC), got {args.num_classes}")
    need(math.isfinite(args.learning_rate) and args.learning_rate > 0,
         f"--learning_rate must be a finite number > 0, got {args.learning_rate}")
    need(math.isfinite(args.power) and args.power >= 0, f"--power must be finite and >= 0, got {args.power}")
    need(0 <= args.momentum < 1, f"--momentum must be in [0, 1), got {args.momentum}")
    for name in ("weight_decay", "kd_weight"):
        value = getattr(args, name)
        need(math.isfinite(value) and value >= 0, f"--{name} must be finite and >= 0, got {value}")
    need(args.start_iters >= 0, f"--start_iters must be >= 0, got {args.start_iters}")
    # NumPy's global seed takes 32 bits
    need(0 <= args.random_seed < 2**32, f"--random_seed must be in [0, 2**32), got {args.random_seed}")
    need(args.num_steps > args.start_iters, f"--num_steps {args.num_steps} leaves nothing to "
         f"train (it must be greater than --start_iters {args.start_iters})")
    need(args.stop_at == 0 or args.start_iters < args.stop_at <= args.num_steps,
         f"--stop_at must be 0 (off) or in ({args.start_iters}, --num_steps {args.num_steps}], "
         f"got {args.stop_at}")
    for name in ("val_pred_every", "log_every", "batch_size"):
        need(getattr(args, name) >= 1, f"--{name} must be >= 1, got {getattr(args, name)}")
    need(args.timing_warmup >= 0, f"--timing_warmup must be >= 0, got {args.timing_warmup}")
    need(args.num_workers >= -1, f"--num_workers must be >= 0, or -1 (sized from the machine), "
         f"got {args.num_workers}")
    need(math.isfinite(args.save_every_min) and args.save_every_min >= 0,
         f"--save_every_min must be >= 0 (0 = off), got {args.save_every_min}")
    need(math.isfinite(args.dist_timeout_min) and args.dist_timeout_min > 0,
         f"--dist_timeout_min must be > 0, got {args.dist_timeout_min}")
    need(args.snapshot_dir.strip(), "--snapshot_dir '' names no folder: give the run's folder")
    # A re-run resumes the folder's own checkpoint: --reload_path is needed only without one.
    own = any((Path(args.snapshot_dir) / name).is_file() for name in ("last.pth", "final.pth"))
    need(not args.reload_path or Path(args.reload_path).is_file() or (own and not args.overwrite),
         f"--reload_path {args.reload_path} does not exist")
    # Silent, not slow: on a CPU, PyTorch's bf16 conv3d returns wrong weight gradients for
    # 3x3x3 convolutions on maps of depth 2 (torch 2.11 and 2.13, oneDNN; forward and input
    # gradients are right), which this network meets at a patch depth of 16 or 32.
    need(not (distributed.device_kind(args.device) == "cpu" and args.amp == "bf16"),
         "--amp bf16 trains on a GPU only: PyTorch's CPU bf16 convolution returns wrong weight "
         "gradients for some shapes; use --amp off on a CPU")


def read_lists(args):
    """The training and validation lists -> [(path, case folders)] ((None, []) for
    --val_list ''); an empty list is a mistake, named here."""
    lists = []
    if not args.train_list:
        raise UsageError("--train_list '' names no list: give the list of training cases")
    for flag, path in (("--train_list", args.train_list), ("--val_list", args.val_list)):
        if not path:  # --val_list '': no election
            lists.append((None, []))
            continue
        path = resolve_list(path, args.data_dir)
        folders = read_datalist(path, args.data_root or None)
        if not folders:
            raise UsageError(f"{flag} {path} lists no cases" +
                             (" (--val_list '' turns the election off)" if flag == "--val_list" else ""))
        lists.append((path, folders))
    return lists


def cases_summary(folders):
    """What a run records of a list: its cases in order, by name (the sampler's draws and the
    elections depend on them; a dataset moved to another root keeps them)."""
    if not folders:
        return "no cases"
    names = "\n".join(folder.name for folder in folders).encode()
    count = f"{len(folders)} case{'s' if len(folders) > 1 else ''}"
    return f"{count}, names sha256 {hashlib.sha256(names).hexdigest()[:12]}"


def poly_lr(base_lr, iteration, num_steps, power):
    return base_lr * (1 - iteration / num_steps) ** power


def missing_probability(schedule, iteration, random_start):
    """Probability that this iteration drops modalities (published: always 1 in stage 2)."""
    if schedule == "off":
        return 1.0
    ramp = int(schedule.split(":", 1)[1])
    return min(1.0, max(0, iteration - random_start) / ramp)


def draw_subset(mode, rng, p_missing):
    """The modalities the whole batch keeps this iteration (same on every rank: same rng)."""
    if mode != "random":
        return mode
    if p_missing < 1.0 and rng.random() >= p_missing:
        return FULL
    return sample_subset(rng)


def derived_seed(*values):
    """An int seed that is a pure function of the values (for per-iteration, per-rank streams)."""
    return int(np.random.SeedSequence([int(v) for v in values]).generate_state(1, np.uint64)[0] >> 1)


class EventWriter:
    """TensorBoard's SummaryWriter into `folder`, whose failures (a full disk) are reported as
    every other write's: DiskFullError or NotWritableError naming the folder. Its thread meets
    them first; the next call raises them here."""

    def __init__(self, folder, **options):
        self.folder = folder
        with writing_in(folder):
            self.writer = SummaryWriter(str(folder), **options)

    def add_scalar(self, *args, **kwargs):
        with writing_in(self.folder):
            self.writer.add_scalar(*args, **kwargs)

    def add_text(self, *args, **kwargs):
        with writing_in(self.folder):
            self.writer.add_text(*args, **kwargs)

    def add_image(self, *args, **kwargs):
        with writing_in(self.folder):
            self.writer.add_image(*args, **kwargs)

    def close(self):
        with writing_in(self.folder):
            self.writer.close()


def set_backends(device):
    """cuDNN autotuning on CUDA; deterministic algorithms on a CPU (exact resume). Also used
    by bench_train.py, whose bare steps must run as the loop does."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    else:
        torch.use_deterministic_algorithms(True)


def step(model, optimizer, scaler, image, regions, subset, teachers, amp, kd_weight):
    """One optimisation step on a batch (also bench_train.py's bare step). Returns the loss
    and its parts, still on the device (reading them would synchronise)."""
    with autocast(image.device, amp):
        logits, kd = model(image, subset=subset, teachers=teachers)
    loss, parts = segmentation_loss(logits, regions, kd, kd_weight)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss, parts


def network_config(args):
    """The LCKDConfig the flags describe."""
    return LCKDConfig.from_name(
        args.model_size, num_classes=args.num_classes,
        **{field: getattr(args, flag) for flag, field in MODEL_FLAGS.items()},
        checkpoint_encoder=args.checkpoint_encoder, encode_all=args.encode_all_modalities)


def run_config(args, world_size, cache_dir, lists):
    """What config.json and every checkpoint record: the flags and what they resolve to."""
    config = {k: v for k, v in vars(args).items()  # overwrite: a fed-back config must not delete
              if k not in ("patch_size", "mode_parsed", "overwrite")}
    (_, train_folders), (_, val_folders) = lists
    config.update(model_config=network_config(args).to_dict(), world_size=world_size,
                  patch_size=list(args.patch_size), cache_dir_resolved=str(cache_dir),
                  train_cases=cases_summary(train_folders), val_cases=cases_summary(val_folders))
    return config


def build_model(args, device):
    """The network and its SGD as the flags configure them (also used by bench_train.py).
    Returns (model, optimizer, {speed option: on/off})."""
    model = LCKD(network_config(args)).to(device)
    options = speed.prepare_model(model, device, args.channels_last, args.compile)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.learning_rate, momentum=args.momentum,
                                nesterov=True, weight_decay=args.weight_decay,
                                **speed.sgd_implementation(device))
    return model, optimizer, options


def checked_start(source, own, model, config, args):
    """The checkpoint a run starts from (a full one, or a bare state_dict: weights only),
    refused when it cannot continue this run. `own`: the folder's last.pth, whose settings
    must be this run's."""
    try:
        checkpoint = load_checkpoint(source)
    except CheckpointError as error:
        if own:  # written atomically, so damaged since: the run cannot be continued
            raise CheckpointError(f"{error}; --overwrite True starts the run over") from error
        raise
    weights = checkpoint.get("model", checkpoint)
    bad = non_finite(weights)
    if bad:
        raise FloatingPointError(f"{source} holds non-finite weights ({len(bad)}/{len(weights)} "
                                 f"tensors, first {bad[0]}): start from another checkpoint")
    if own:
        snapshot_dir = Path(args.snapshot_dir)
        refuse_changed_settings(checkpoint["config"], config, snapshot_dir)
        read_history(snapshot_dir / "teachers.json")  # damaged: said now, not at the next election
    mismatch = network_mismatch(model, weights, f"--model_size {args.model_size} "
                                                f"--norm_cfg {args.norm_cfg}")
    if mismatch:
        raise UsageError(f"{source} holds another network {mismatch}")
    return checkpoint


def resume(checkpoint, own, optimizer, scaler, subset_rng, args, device):
    """Load a full checkpoint's optimiser, scaler and subset stream (the weights are loaded
    already). Returns (start, teachers, elected_at, random_start): the iteration to continue
    at, the teachers and when they were elected, and where --mode random began."""
    optimizer.load_state_dict(checkpoint["optimizer"])
    for group in optimizer.param_groups:  # this run's flags, not the checkpoint's
        group.update(momentum=args.momentum, weight_decay=args.weight_decay, nesterov=True,
                     **speed.sgd_implementation(device))
    if checkpoint["scaler"] and scaler.is_enabled():
        scaler.load_state_dict(checkpoint["scaler"])
    set_rng_state(checkpoint["rng"], subset_rng)
    # --start_iters re-bases a run started from --reload_path, not the folder's own
    start = checkpoint["iteration"] if own else args.start_iters or checkpoint["iteration"]
    mode = checkpoint["config"].get("mode")  # None: a checkpoint of another version
    same_stage = mode is not None and same_setting("mode", mode, args.mode)
    random_start = checkpoint.get("random_start", start) if same_stage else start
    return start, tuple(checkpoint["teachers"]), checkpoint["elected_at"], random_start


def sync_point(model, window, flags, dist_info):
    """The loop's host synchronisation (and, with DDP, its one all-reduce). `window`: each
    iteration's (total, dice, bce, kd) since the last check, on the device. Returns those
    averaged over ranks (iterations, 4), whether any rank's weights hold NaN/inf, and each
    of `flags` raised on any rank."""
    weights_ok = torch.stack([w.isfinite().all() for w in unwrap(model).state_dict().values()
                              if w.is_floating_point()]).all()
    sync = torch.cat([torch.stack(window).flatten(), (~weights_ok).float()[None],
                      torch.tensor(flags, dtype=torch.float32, device=weights_ok.device)])
    sync = distributed.all_reduce_sum(sync, dist_info).cpu()
    raised = (sync[-1 - len(flags):] > 0).tolist()
    return (sync[:-1 - len(flags)].view(-1, 4) / dist_info.world_size, *raised)


def main(argv=None):
    def read_flags():
        args = parse_args(argv)
        return args, read_lists(args)

    args, lists = distributed.before_init(read_flags)
    dist_info, device = distributed.init(args.device, args.dist_timeout_min, "--dist_timeout_min")
    try:
        with contextlib.ExitStack() as held:
            # One run per snapshot folder: rank 0 holds the lock until the run ends (released by
            # the kernel if the process dies); a refusal stops every rank.
            distributed.on_main_rank(lambda: held.enter_context(
                exclusive_lock(args.snapshot_dir, "snapshot folder")), dist_info)
            return train(args, lists, dist_info, device)
    finally:
        distributed.cleanup(dist_info)


def train(args, lists, dist_info, device):
    main_rank = dist_info.is_main
    log = tqdm.write if main_rank else (lambda *a, **k: None)
    snapshot_dir = Path(args.snapshot_dir)
    (train_list, _), (val_list, _) = lists
    cache_dir = Path(args.cache_dir or Path("cache") / train_list.parent.name)
    config = run_config(args, dist_info.world_size, cache_dir, lists)
    # Decided on rank 0; a refusal there stops every rank at once (no wait for the timeout).
    decision, source = distributed.broadcast_object(distributed.on_main_rank(
        lambda: claim_snapshot_dir(args, snapshot_dir, log), dist_info), dist_info)
    if decision == "finished":
        # A finished run with other settings (more --num_steps, another patch) is not this one.
        def check_finished():
            try:
                saved = load_checkpoint(source)["config"]
            except CheckpointError as error:
                raise CheckpointError(f"{error}; remove it to resume from last.pth, or "
                                      "--overwrite True to start over") from error
            refuse_changed_settings(saved, config, snapshot_dir, FINISHED_SETTINGS)

        distributed.on_main_rank(check_finished, dist_info, f"checking {source}")
        log(f"{source} exists: this run is finished, nothing to do (--overwrite True starts it over)")
        return None

    torch.manual_seed(args.random_seed)  # same initial weights on every rank (DDP also broadcasts)
    random.seed(args.random_seed)
    np.random.seed(args.random_seed)
    set_backends(device)

    # ---- data: preprocess once (rank 0), then every rank opens the memory-mapped cache
    data_root = args.data_root or None

    def open_cases():
        workers = None if args.num_workers < 0 else args.num_workers
        # Both lists need labels: a missing seg file is named here, before any training.
        return [preprocess(data_list, cache_dir, data_root, workers, progress=main_rank,
                           require_label=True) if data_list else []
                for data_list in (train_list, val_list)]

    # Rank 0 builds the cache (an error there stops every rank), then the others open it.
    cases = distributed.on_main_rank(open_cases, dist_info, "preprocessing")
    train_cases, val_cases = cases if main_rank else open_cases()
    distributed.barrier(dist_info, "after preprocessing")
    world_batches = args.num_steps * dist_info.world_size * args.batch_size
    dataset = PatchDataset(train_cases, args.patch_size, random_scale=args.random_scale,
                           random_mirror=args.random_mirror, seed=args.random_seed,
                           length=world_batches)

    # ---- model, optimiser
    model, optimizer, speed_options = build_model(args, device)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")

    # ---- resume: weights, optimiser, scaler, iteration, teachers, RNG streams
    start = random_start = args.start_iters
    teachers, elected_at = parse_teachers(args.teachers), None
    subset_rng = random.Random(derived_seed(args.random_seed, start))
    own = source == snapshot_dir / "last.pth"  # this folder's run, continued where it stopped
    if source is not None:
        # The same file on every rank: rank 0 checks it (and alone reports what is wrong).
        checkpoint = distributed.on_main_rank(
            lambda: checked_start(source, own, model, config, args), dist_info, f"checking {source}")
        checkpoint = checkpoint if main_rank else load_checkpoint(source)
        model.load_state_dict(checkpoint.get("model", checkpoint))
        if "model" not in checkpoint:
            log(f"loaded weights from {source}")
        else:
            start, teachers, elected_at, random_start = resume(
                checkpoint, own, optimizer, scaler, subset_rng, args, device)
            log(f"reloaded {source}: iteration {checkpoint['iteration']} (mode "
                f"{checkpoint['config'].get('mode')}), continuing at {start} in mode {args.mode}")
    if start >= args.num_steps:
        raise UsageError(f"nothing to train: the run would start at iteration {start} ({source}) "
                         f"and --num_steps is {args.num_steps}")
    if args.stop_at and args.stop_at <= start:
        raise UsageError(f"--stop_at {args.stop_at} is not after iteration {start}, where this "
                         f"run resumes ({source})")

    if dist_info.enabled:
        # Every parameter takes part in every forward, whatever the modalities (missing skips
        # come from the encoded all-zero image; the 1x1x1 InstanceNorm of the ASPP image branch
        # passes an exact zero gradient), so DDP needs no unused-parameter search.
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    stop = args.stop_at or args.num_steps
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=args.batch_size,
        sampler=IterationSampler(start, stop, args.batch_size, dist_info.rank, dist_info.world_size),
        **loader_options(args.num_workers, device), worker_init_fn=ignore_stop_signals)

    # Rank 0 writes every file; each write runs under on_main_rank, so that its failure (a
    # full disk) stops the other ranks at once instead of in their next collective.
    def open_log():
        write_text(snapshot_dir / "config.json", json.dumps(config, indent=2) + "\n")
        n_params = sum(p.numel() for p in model.parameters())
        log(f"LCKD ({args.model_size}, {n_params / 1e6:.2f} M parameters) on {device} x "
            f"{dist_info.world_size}; {len(train_cases)} training / {len(val_cases)} validation "
            f"cases; iterations {start} -> {args.num_steps}; mode {args.mode}; amp {args.amp}, "
            + ", ".join(f"{k} {'on' if v else 'off'}" for k, v in speed_options.items()))
        # A resumed run hides what the interrupted one logged after `start` (it logs it again),
        # and at `start` too when it elects there again (a stop during or just after that
        # election); an election at `start` the checkpoint holds stays.
        purge = start if election_due(start) else start + 1
        return EventWriter(snapshot_dir, purge_step=purge if source is not None else None)

    def election_due(iteration):
        return bool(val_cases) and iteration % args.val_pred_every == 0 and elected_at != iteration

    writer = distributed.on_main_rank(open_log, dist_info, "writing config.json")

    def snapshot(iteration):
        """Rank 0's copy of the whole training state on the device (a later step cannot
        change it): what a non-finite loss, a signal or a scheduled save writes."""
        if not main_rank:
            return None
        return copy.deepcopy(make_checkpoint(model, optimizer, scaler, iteration, teachers,
                                             elected_at, subset_rng, config,
                                             random_start=random_start))

    last_saved = time.monotonic()

    def save_last(state):  # on every rank
        nonlocal last_saved
        distributed.on_main_rank(lambda: save_checkpoint(state, snapshot_dir / "last.pth"),
                                 dist_info, "writing last.pth")
        last_saved = time.monotonic()

    def leave(where):
        """Before stopping early: rank 0 writes the last good state; every rank waits for it."""
        progress.close()
        save_last(good)
        if main_rank:
            writer.close()
        distributed.barrier(dist_info, where)

    def saved_at(iteration):
        return (f"{snapshot_dir / 'last.pth'} holds the state before iteration {iteration}, "
                f"the last one checked to be finite")

    def stopped(signum, how):
        """Exit 128 + the signal, rank 0 saying `how` (signum None: another rank's signal)."""
        signum = signum or signal.SIGTERM
        if main_rank:
            print(f"stopped by {signal.Signals(signum).name} {how}", file=sys.stderr)
        raise SystemExit(128 + signum)

    def stop_early(signum, when):
        """A stop signal: last.pth holds the last good state, then exit 128 + the signal."""
        leave("after saving the interrupted run")
        again = ("the same command without --overwrite True" if args.overwrite
                 else "the same command again")
        stopped(signum, f"{when}: {snapshot_dir / 'last.pth'} holds the state; run {again} to "
                "resume")

    def run_election(iteration, stop_signals):
        """The teachers elected at `iteration`; a stop signal during the election stops the run
        (the resumed run elects again)."""
        t_start = time.perf_counter()
        result = elect(unwrap(model), val_cases, args.patch_size, overlap=args.overlap,
                       batch_size=args.batch_size, amp=args.amp, device=device,
                       dist_info=dist_info, stop_requested=lambda: stop_signals.signum is not None)
        if result is None:
            stop_early(stop_signals.signum, f"during the teacher election at iteration {iteration}")
        seconds = time.perf_counter() - t_start
        distributed.on_main_rank(lambda: report_election(result, iteration, seconds), dist_info,
                                 "writing teachers.json")
        return tuple(result["teachers"])

    def report_election(result, iteration, seconds):
        log(format_result(result, iteration) + f"  [{seconds:.1f} s]")
        for name, per_region in mean_dice(result).items():
            for region in REGIONS:
                writer.add_scalar(f"val/dice/{name}/{region}", per_region[region], iteration)
        for m, name in enumerate(MODALITIES):
            writer.add_scalar(f"teachers/{name}", float(m in result["teachers"]), iteration)
        writer.add_text("teachers", teacher_names(result), iteration)
        if result["sample"] is not None:
            writer.add_image("val/overlay", overlay_panel(result["sample"]), iteration,
                             dataformats="HWC")
        append_history(snapshot_dir / "teachers.json", result, iteration)

    # ---- the loop. The host reads the device only at check points (every --log_every
    # iterations, before every checkpoint and at the end): there the loss parts of the
    # iterations since the last check are averaged over ranks and checked, with the weights,
    # for NaN/inf, and a signal or the clock may stop or save the run (every rank agrees: the
    # flags travel in the same all-reduce). `good` is the state that passed the last check.
    model.train()
    losses = []
    good = snapshot(start)  # checked finite when loaded, or freshly initialised
    window, window_subsets, window_start = [], [], start
    progress = tqdm(total=args.num_steps, initial=start, disable=not main_rank, dynamic_ncols=True,
                    mininterval=progress_interval())
    t0 = time.perf_counter()
    timing_start, data_wait = None, 0.0  # steady-state timing, after --timing_warmup iterations
    with (StopSignals(log) as stop_signals, progress,  # the bar is closed before any message
          distributed.peers_present(dist_info, "the training loop")):
        # Started under StopSignals: a signal that interrupted the start of the loader's workers
        # (which ignore stop signals) left one that nothing told to exit, and Python's exit
        # waited on it forever.
        batches = iter(loader)
        for iteration in range(start, stop):
            if iteration == start + args.timing_warmup:
                speed.synchronize(device)  # the window starts with no queued work (once per run)
                timing_start, data_wait = time.perf_counter(), 0.0
            if election_due(iteration):
                teachers, elected_at = run_election(iteration, stop_signals), iteration
                good = snapshot(iteration)  # same weights, checked at the end of the last iteration
            if iteration % args.val_pred_every == 0 and iteration != start:
                save_last(good)

            lr = poly_lr(args.learning_rate, iteration, args.num_steps, args.power)
            for group in optimizer.param_groups:
                group["lr"] = lr
            subset = draw_subset(args.mode_parsed, subset_rng,
                                 missing_probability(args.missing_schedule, iteration, random_start))
            t_wait = time.perf_counter()
            batch = next(batches)
            data_wait += time.perf_counter() - t_wait
            image, regions = dataset.to_device(batch, device)  # normalise, resize, flip
            if args.augment:
                image, regions = augment_batch(
                    image, regions, seed=derived_seed(args.random_seed, iteration, dist_info.rank))

            loss, parts = step(model, optimizer, scaler, image, regions, subset, teachers,
                               args.amp, args.kd_weight)
            window.append(torch.stack([loss, parts["dice"], parts["bce"], parts["kd"]]).detach().float())
            window_subsets.append(subset)
            progress.update(1)

            done = iteration + 1
            if (done % args.log_every and done % args.val_pred_every and done != stop
                    and not (stop_signals.signum and not dist_info.enabled)):
                continue
            # ---- check point
            save_due = (main_rank and args.save_every_min > 0
                        and time.monotonic() - last_saved >= 60 * args.save_every_min)
            window_parts, weights_bad, stop_requested, save_due = sync_point(
                model, window, (stop_signals.signum is not None, save_due), dist_info)
            finite = torch.isfinite(window_parts).all(1)
            if not finite.all():
                row = int((~finite).nonzero()[0])
                leave("after saving the last good state")
                raise FloatingPointError(
                    f"non-finite loss at iteration {window_start + row} (total, dice, bce, kd = "
                    f"{window_parts[row].tolist()}, modalities {subset_name(window_subsets[row])}); "
                    f"{saved_at(window_start)}")
            if weights_bad:
                leave("after saving the last good state")
                raise FloatingPointError(f"non-finite weights after iteration {iteration} (the "
                                         f"loss was finite); {saved_at(window_start)}")
            good = snapshot(done)
            losses += window_parts[:, 0].tolist()
            window, window_subsets, window_start = [], [], done
            if main_rank:
                mean = dict(zip(("total", "dice", "bce", "kd"), window_parts.mean(0).tolist()))
                progress.set_postfix(loss=f"{mean['total']:.4f}", lr=f"{lr:.2e}",
                                     mods=subset_name(subset), refresh=False)  # at its interval
                for name, value in mean.items():  # the mean since the last check point
                    writer.add_scalar(f"loss/{name}", value, iteration)
                writer.add_scalar("lr", lr, iteration)
            if done == stop:  # finished: nothing to stop or save early
                break
            if stop_requested:
                stop_early(stop_signals.signum, f"after iteration {iteration}")
            if save_due and done % args.val_pred_every:  # (at a multiple, the next iteration saves)
                save_last(good)
        progress.close()
        speed.synchronize(device)
        timed = timing_start is not None
        timing = {"steady_iterations": stop - start - args.timing_warmup if timed else 0,
                  "steady_seconds": time.perf_counter() - timing_start if timed else 0.0,
                  "data_wait_seconds": data_wait if timed else 0.0}
        distributed.check_replicas_equal(model, dist_info)
        if stop == args.num_steps:
            distributed.on_main_rank(lambda: save_checkpoint(good, snapshot_dir / "final.pth"),
                                     dist_info, "writing final.pth")

    seconds = time.perf_counter() - t0
    if main_rank:
        memory = (f"; peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB"
                  if device.type == "cuda" else "")
        log(f"{stop - start} iterations in {seconds:.1f} s (elections included; "
            f"{(stop - start) / max(seconds, 1e-9):.2f} it/s){memory}; outputs in {snapshot_dir}")
        writer.close()
    distributed.barrier(dist_info, "at the end of the run")
    # A signal after the last check point: the run is done, but a chained command (stage 1 &&
    # stage 2) must still stop, as the signal asked, and every rank with it.
    if distributed.any_rank(stop_signals.signum is not None, dist_info, device):
        stopped(stop_signals.signum, "as the run finished: " + (
            f"{snapshot_dir / 'final.pth'} is written, nothing is left to resume"
            if stop == args.num_steps else f"--stop_at {stop} reached"))
    return {"losses": losses, "teachers": teachers, "iteration": stop, "seconds": seconds, **timing}


# User mistakes and outside conditions: one line `error: ...`, exit status 1 (UsageError: 2).
TRAIN_ERRORS = (*USER_ERRORS, FloatingPointError, CheckpointError)

if __name__ == "__main__":
    run_cli(main, TRAIN_ERRORS)
