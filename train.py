"""Train LCKD (SPEC.md, "Training recipe"): Dice + BCE + 0.1 * KD, SGD with poly decay,
teacher election on the validation list at iteration 0 and every --val_pred_every iterations.

Examples (from the repository root):

    # published two-stage recipe on GPU 0 (what run.sh does)
    python train.py --snapshot_dir snapshots/LCKD_stage1/ --mode 0,1,2,3 --num_steps 80000
    python train.py --snapshot_dir snapshots/LCKD_stage2/ --mode random --num_steps 115000 \
        --reload_path snapshots/LCKD_stage1/final.pth --reload_from_checkpoint True

    # data elsewhere: re-base the list entries ('../data/BraTS-2018/HGG/<case>')
    python train.py --data_root /data/MICCAI_BraTS_2018_Data_Training ...

    # resume a killed run exactly where its last checkpoint left it
    python train.py <same flags> --reload_path snapshots/LCKD_stage1/last.pth \
        --reload_from_checkpoint True

    # CPU smoke run on synthetic data with the small network
    python -m datasets.synthetic --out_dir data/synthetic --num_cases 12
    python train.py --device cpu --model_size small --input_size 32,64,64 --num_steps 200 \
        --val_pred_every 100 --train_list data/synthetic/train.csv \
        --val_list data/synthetic/val.csv --num_workers 0 --snapshot_dir snapshots/cpu_demo/

    # several GPUs / machines: one process per GPU, the batch is per process
    torchrun --nproc_per_node 4 train.py ...

Outputs in --snapshot_dir: config.json (resolved configuration), last.pth (every
--val_pred_every iterations), final.pth, teachers.json (election history) and TensorBoard events.
"""
import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from datasets.augment import augment_batch
from datasets.brats import resolve_list
from datasets.preprocess import preprocess
from datasets.sampling import PatchDataset
from models import LCKD, LCKDConfig
from utils import distributed, speed
from utils.checkpoint import load_checkpoint, make_checkpoint, save_checkpoint, set_rng_state, unwrap
from utils.cli import str2bool
from utils.election import append_history, elect, format_result, overlay_panel
from utils.inference import AMP_DTYPES
from utils.io import write_text
from utils.losses import segmentation_loss
from utils.modalities import FULL, MODALITIES, parse_mode, parse_teachers, sample_subset, subset_name
from utils.regions import REGIONS


def get_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", default="", help="JSON file of flag defaults (e.g. a run's "
                   "config.json); flags on the command line override it")
    g = p.add_argument_group("data (published flag names)")
    g.add_argument("--data_dir", default="datalist/", help="folder that --train_list/--val_list "
                   "are relative to when they do not exist as given (published)")
    g.add_argument("--train_list", default="datalist/BraTS18/BraTS18_train.csv")
    g.add_argument("--val_list", default="datalist/BraTS18/BraTS18_val.csv",
                   help="labelled cases for the teacher election ('' = no election)")
    g.add_argument("--data_root", default="", help="re-base the lists' case paths onto this folder")
    g.add_argument("--cache_dir", default="", help="preprocessed-case cache "
                   "(default: cache/<name of the train list's folder>)")
    g.add_argument("--input_size", default="80,160,160", help="patch D,H,W")
    g.add_argument("--batch_size", type=int, default=2, help="per process")
    g.add_argument("--num_workers", type=int, default=4)
    g.add_argument("--random_mirror", type=str2bool, default=True)
    g.add_argument("--random_scale", type=str2bool, default=True)
    g.add_argument("--augment", type=str2bool, default=True,
                   help="nnU-Net-style batch augmentation on the device")
    g = p.add_argument_group("model")
    g.add_argument("--model_size", choices=("full", "small"), default="full",
                   help="full = published network; small = CPU-trainable, same code path")
    g.add_argument("--num_classes", type=int, default=3)
    g.add_argument("--weight_std", type=str2bool, default=True)
    g.add_argument("--norm_cfg", choices=("IN", "BN"), default="IN")
    g.add_argument("--activation_cfg", choices=("LeakyReLU", "ReLU"), default="LeakyReLU")
    g.add_argument("--checkpoint_encoder", type=str2bool, default=False,
                   help="activation checkpointing in the encoder (less memory, ~30%% slower)")
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
                   help="autocast dtype; fp16 adds a gradient scaler")
    g.add_argument("--random_seed", type=int, default=1234)
    g = p.add_argument_group("run")
    g.add_argument("--snapshot_dir", default="snapshots/LCKD/")
    g.add_argument("--val_pred_every", type=int, default=5000,
                   help="teacher election and last.pth every this many iterations")
    g.add_argument("--overlap", type=float, default=1 / 3, help="sliding-window overlap in the election")
    g.add_argument("--reload_path", default="")
    g.add_argument("--reload_from_checkpoint", type=str2bool, default=False)
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    g.add_argument("--log_every", type=int, default=10, help="TensorBoard scalars every N iterations")
    g.add_argument("--stop_at", type=int, default=0, help="testing: stop before this iteration "
                   "without writing final.pth, as if the run were killed")
    g.add_argument("--timing_warmup", type=int, default=0, help="benchmarks: iterations left "
                   "out of the returned steady-state timing (benchmarks/bench_train.py)")
    return p


# Entries of config.json that are not flags (so the file can be fed back to --config).
DERIVED = ("model_config", "world_size", "patch_size", "cache_dir_resolved")


def parse_args(argv=None):
    parser = get_parser()
    known, _ = parser.parse_known_args(argv)
    if known.config:
        defaults = json.loads(Path(known.config).read_text())
        flags = {a.dest for a in parser._actions}
        unknown = set(defaults) - flags - set(DERIVED)
        if unknown:
            raise ValueError(f"{known.config}: unknown settings {sorted(unknown)}")
        parser.set_defaults(**{k: v for k, v in defaults.items() if k in flags and k != "config"})
    args = parser.parse_args(argv)
    args.patch_size = tuple(int(s) for s in args.input_size.split(","))
    args.mode_parsed = parse_mode(args.mode)
    if args.mode_parsed == "all":
        raise ValueError("--mode all is for evaluation; train with 'random' or a subset")
    if args.missing_schedule != "off" and not args.missing_schedule.startswith("ramp:"):
        raise ValueError(f"--missing_schedule must be 'off' or 'ramp:N', got {args.missing_schedule!r}")
    return args


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


class IterationSampler(torch.utils.data.Sampler):
    """Patch indices for iterations [start, stop): iteration i, rank r, sample j gets item
    (i * world_size + r) * batch_size + j. The patch stream is a function of the iteration,
    so a resumed run draws exactly the patches the uninterrupted run would have drawn."""

    def __init__(self, start, stop, batch_size, rank, world_size):
        self.start, self.stop = start, stop
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size

    def __iter__(self):
        for i in range(self.start, self.stop):
            first = (i * self.world_size + self.rank) * self.batch_size
            yield from range(first, first + self.batch_size)

    def __len__(self):
        return (self.stop - self.start) * self.batch_size


def set_backends(device):
    """cuDNN autotuning on CUDA; deterministic algorithms on a CPU (exact resume). Also used
    by bench_train.py, whose bare steps must run as the loop does."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    else:
        torch.use_deterministic_algorithms(True)


def build_model(args, device):
    """The network and its SGD as the flags configure them (also used by bench_train.py).
    Returns (model, optimizer, {speed option: on/off})."""
    model_config = LCKDConfig.from_name(
        args.model_size, num_classes=args.num_classes, weight_std=args.weight_std,
        norm=args.norm_cfg, activation=args.activation_cfg,
        checkpoint_encoder=args.checkpoint_encoder, encode_all=args.encode_all_modalities)
    model = LCKD(model_config).to(device)
    options = speed.prepare_model(model, device, args.channels_last, args.compile)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.learning_rate, momentum=args.momentum,
                                nesterov=True, weight_decay=args.weight_decay,
                                **speed.sgd_implementation(device))
    return model, optimizer, options


def main(argv=None):
    args = parse_args(argv)
    dist_info, device = distributed.init(args.device)
    main_rank = dist_info.is_main
    log = tqdm.write if main_rank else (lambda *a, **k: None)
    snapshot_dir = Path(args.snapshot_dir)

    torch.manual_seed(args.random_seed)  # same initial weights on every rank (DDP also broadcasts)
    random.seed(args.random_seed)
    np.random.seed(args.random_seed)
    set_backends(device)

    # ---- data: preprocess once (rank 0), then every rank opens the memory-mapped cache
    train_list = resolve_list(args.train_list, args.data_dir)
    val_list = resolve_list(args.val_list, args.data_dir) if args.val_list else None
    cache_dir = Path(args.cache_dir or Path("cache") / train_list.parent.name)
    data_root = args.data_root or None
    for rank_turn in (True, False):  # rank 0 writes the cache, the others then re-use it
        if main_rank == rank_turn:
            workers = max(1, args.num_workers)
            train_cases = preprocess(train_list, cache_dir, data_root, workers, progress=main_rank)
            val_cases = (preprocess(val_list, cache_dir, data_root, workers, progress=main_rank)
                         if val_list else [])
        distributed.barrier(dist_info)
    world_batches = args.num_steps * dist_info.world_size * args.batch_size
    dataset = PatchDataset(train_cases, args.patch_size, random_scale=args.random_scale,
                           random_mirror=args.random_mirror, seed=args.random_seed,
                           length=world_batches)

    # ---- model, optimiser
    model, optimizer, speed_options = build_model(args, device)
    model_config = model.config
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    autocast_dtype = AMP_DTYPES[args.amp]
    config = {k: v for k, v in vars(args).items() if k not in ("patch_size", "mode_parsed")}
    config.update(model_config=model_config.to_dict(), world_size=dist_info.world_size,
                  patch_size=list(args.patch_size), cache_dir_resolved=str(cache_dir))

    # ---- resume: weights, optimiser, scaler, iteration, teachers, RNG streams
    start = args.start_iters
    teachers, elected_at = parse_teachers(args.teachers), None
    subset_rng = random.Random(derived_seed(args.random_seed, start))
    random_start = start
    if args.reload_from_checkpoint:
        checkpoint = load_checkpoint(args.reload_path)
        if "model" not in checkpoint:  # a bare state_dict: weights only
            model.load_state_dict(checkpoint)
            log(f"loaded weights from {args.reload_path}")
        else:
            model.load_state_dict(checkpoint["model"])
            optimizer.load_state_dict(checkpoint["optimizer"])
            for group in optimizer.param_groups:  # this run's flags, not the checkpoint's
                group.update(momentum=args.momentum, weight_decay=args.weight_decay, nesterov=True,
                             **speed.sgd_implementation(device))
            if checkpoint["scaler"] and scaler.is_enabled():
                scaler.load_state_dict(checkpoint["scaler"])
            teachers, elected_at = tuple(checkpoint["teachers"]), checkpoint["elected_at"]
            set_rng_state(checkpoint["rng"], subset_rng)
            start = args.start_iters or checkpoint["iteration"]
            same_stage = checkpoint["config"].get("mode") == args.mode
            random_start = checkpoint.get("random_start", start) if same_stage else start
            log(f"reloaded {args.reload_path}: iteration {checkpoint['iteration']} "
                f"(mode {checkpoint['config'].get('mode')}), continuing at {start} in mode {args.mode}")
    if not 0 <= start <= args.num_steps:
        raise ValueError(f"start iteration {start} outside [0, --num_steps {args.num_steps}]")

    if dist_info.enabled:
        # Every parameter takes part in every forward, whatever the modalities (missing skips
        # come from the encoded all-zero image; the 1x1x1 InstanceNorm of the ASPP image branch
        # passes an exact zero gradient), so DDP needs no unused-parameter search.
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    stop = min(args.num_steps, args.stop_at) if args.stop_at else args.num_steps
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=args.batch_size,
        sampler=IterationSampler(start, stop, args.batch_size, dist_info.rank, dist_info.world_size),
        num_workers=args.num_workers, pin_memory=device.type == "cuda",
        prefetch_factor=4 if args.num_workers else None)

    writer = None
    if main_rank:
        snapshot_dir.mkdir(parents=True, exist_ok=True)
        write_text(snapshot_dir / "config.json", json.dumps(config, indent=2) + "\n")
        writer = SummaryWriter(str(snapshot_dir))
        n_params = sum(p.numel() for p in model.parameters())
        log(f"LCKD ({args.model_size}, {n_params / 1e6:.2f} M parameters) on {device} x "
            f"{dist_info.world_size}; {len(train_cases)} training / {len(val_cases)} validation "
            f"cases; iterations {start} -> {args.num_steps}; mode {args.mode}; amp {args.amp}, "
            + ", ".join(f"{k} {'on' if v else 'off'}" for k, v in speed_options.items()))

    def checkpoint_now(iteration):
        return make_checkpoint(model, optimizer, scaler, iteration, teachers, elected_at,
                               subset_rng, config, random_start=random_start)

    def run_election(iteration):
        t_start = time.perf_counter()
        result = elect(unwrap(model), val_cases, args.patch_size, overlap=args.overlap,
                       batch_size=args.batch_size, amp=args.amp, device=device,
                       dist_info=dist_info)
        if main_rank:
            log(format_result(result, iteration) + f"  [{time.perf_counter() - t_start:.1f} s]")
            for name, per_region in result["dice"].items():
                for region in REGIONS:
                    writer.add_scalar(f"val/dice/{name}/{region}",
                                      per_region[region] / max(result["num_cases"], 1), iteration)
            for m, name in enumerate(MODALITIES):
                writer.add_scalar(f"teachers/{name}", float(m in result["teachers"]), iteration)
            writer.add_text("teachers", ", ".join(MODALITIES[t] for t in result["teachers"]), iteration)
            if result["sample"] is not None:
                writer.add_image("val/overlay", overlay_panel(result["sample"]), iteration,
                                 dataformats="HWC")
            append_history(snapshot_dir / "teachers.json", result, iteration)
        return tuple(result["teachers"])

    # ---- the loop
    model.train()
    losses = []
    progress = tqdm(total=args.num_steps, initial=start, disable=not main_rank, dynamic_ncols=True)
    batches = iter(loader)
    t0 = time.perf_counter()
    window_start, data_wait = None, 0.0  # steady-state timing, after --timing_warmup iterations
    for iteration in range(start, stop):
        if iteration == start + args.timing_warmup:
            speed.synchronize(device)  # the window starts with no queued work (once per run)
            window_start, data_wait = time.perf_counter(), 0.0
        if val_cases and iteration % args.val_pred_every == 0 and elected_at != iteration:
            teachers, elected_at = run_election(iteration), iteration
        if iteration % args.val_pred_every == 0 and iteration != start and main_rank:
            save_checkpoint(checkpoint_now(iteration), snapshot_dir / "last.pth")

        lr = poly_lr(args.learning_rate, iteration, args.num_steps, args.power)
        for group in optimizer.param_groups:
            group["lr"] = lr
        subset_state = subset_rng.getstate()  # a non-finite step is saved as not yet drawn
        subset = draw_subset(args.mode_parsed, subset_rng,
                             missing_probability(args.missing_schedule, iteration, random_start))
        t_wait = time.perf_counter()
        image, regions = next(batches)
        data_wait += time.perf_counter() - t_wait
        image = image.to(device, non_blocking=True)
        regions = regions.to(device, non_blocking=True)
        if args.augment:
            image, regions = augment_batch(
                image, regions, seed=derived_seed(args.random_seed, iteration, dist_info.rank))

        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits, kd = model(image, subset=subset, teachers=teachers)
        loss, parts = segmentation_loss(logits, regions, kd, args.kd_weight)

        # One sync per iteration: the loss parts averaged over ranks, for the log and the
        # finiteness check every rank must agree on (a rank that skipped backward would hang DDP).
        stats = torch.stack([loss.detach(), parts["dice"].detach(), parts["bce"].detach(),
                             parts["kd"].detach()])
        stats = distributed.all_reduce_sum(stats, dist_info).cpu() / dist_info.world_size
        if not torch.isfinite(stats).all():
            subset_rng.setstate(subset_state)
            progress.close()
            if main_rank:
                save_checkpoint(checkpoint_now(iteration), snapshot_dir / "last.pth")
                writer.close()
            distributed.cleanup(dist_info)
            raise FloatingPointError(
                f"non-finite loss at iteration {iteration} (total, dice, bce, kd = "
                f"{stats.tolist()}, modalities {subset_name(subset)}); the state before this "
                f"iteration is saved in {snapshot_dir / 'last.pth'}")

        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

        total, dice, bce, kd_value = stats.tolist()
        losses.append(total)
        if main_rank:
            progress.update(1)
            progress.set_postfix(loss=f"{total:.4f}", lr=f"{lr:.2e}", mods=subset_name(subset))
            if iteration % args.log_every == 0:
                for name, value in (("total", total), ("dice", dice), ("bce", bce), ("kd", kd_value)):
                    writer.add_scalar(f"loss/{name}", value, iteration)
                writer.add_scalar("lr", lr, iteration)
    progress.close()
    speed.synchronize(device)
    timed = window_start is not None
    window = {"steady_iterations": stop - start - args.timing_warmup if timed else 0,
              "steady_seconds": time.perf_counter() - window_start if timed else 0.0,
              "data_wait_seconds": data_wait if timed else 0.0}
    distributed.check_replicas_equal(model, dist_info)

    if stop == args.num_steps and main_rank:
        save_checkpoint(checkpoint_now(args.num_steps), snapshot_dir / "final.pth")
    seconds = time.perf_counter() - t0
    if main_rank:
        memory = (f"; peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB"
                  if device.type == "cuda" else "")
        log(f"{stop - start} iterations in {seconds:.1f} s (elections included; "
            f"{(stop - start) / max(seconds, 1e-9):.2f} it/s){memory}; outputs in {snapshot_dir}")
        writer.close()
    distributed.barrier(dist_info)
    distributed.cleanup(dist_info)
    return {"losses": losses, "teachers": teachers, "iteration": stop, "seconds": seconds, **window}


if __name__ == "__main__":
    try:
        main()
    except FloatingPointError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
