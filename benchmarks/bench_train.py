"""Steady-state training speed: the real train.py loop and the bare step, side by side.

    python benchmarks/bench_train.py                    # CPU: small model, 32x64x64, small cases
    python benchmarks/bench_train.py --device cuda      # full model, 80x160x160, batch 2
    python benchmarks/bench_train.py --device cuda --variants published,bf16_cl_compile

Synthetic BraTS-like cases are generated into --work_dir (default: a temporary folder). For
each stage (--mode 0,1,2,3, then --mode random, both distilling from FLAIR) and each variant
(a row), in one process:
  step  train.build_model from the variant's flags, stepped on one batch of the real pipeline
        (cache -> sampler -> augmentation), no data loading: forward, Dice + BCE + 0.1 KD,
        backward, SGD. Stage 2 draws its subsets as training does, after a warm-up that sees
        every modality count (with --compile: each encoder shape compiles there);
  loop  train.main (cache -> sampler -> DataLoader -> augmentation -> step) for --warmup +
        --steps iterations (stage 2: a longer warm-up if --warmup did not draw every modality
        count): it/s over the last --steps (train.py's steady-state window), and
        the share of that window spent waiting for the DataLoader (host time in
        next(batches): an upper bound of the device's idle time for data).
The bare step is timed on the very subsets the loop's timed window draws (stage 2: k = 1, 2, 3
from train.py's seeded stream), so both do the same work.
FLOPs: the conv/matmul FLOPs of one step (forward + backward), counted by
torch.utils.flop_counter on an eager fp32 copy; in stage 2 they depend on the number of
available modalities: GFLOP/it and MFU use the mean over the timed window's subsets. MFU =
FLOPs x it/s / the device's dense peak for the row's precision (printed); n/a on a CPU, a MIG
slice or an unknown GPU. Peak memory: max_memory_allocated over each timed measurement, after
the warm-up (CUDA only; compare rows of one run). warm-up s: the bare step's warm-up
(compilation and cuDNN autotuning of every shape). wall s: the row's whole measurement (what a
row costs in a time-limited GPU session).
  election  (stage 2 rows) the teacher election with the variant's network on the validation
        case(s), once to warm up (eval-mode compilation), then timed: seconds per case.
At the end, for each variant measured in both stages: the projected wall time of the published
recipe (run.sh: 80 000 iterations of stage 1, 35 000 of stage 2, an election every 5 000 on
the 57 cases of datalist/BraTS18/BraTS18_val.csv) from the loop rates and the election time.

Rows are printed as they are measured (a run stopped at a time limit keeps the rows so far):
first the first three variants (the targets: the published step, run.sh's default and the bf16
eager step it is compared with) in both stages, then their projection, then the other
variants. A row whose measurement fails prints FAILED with the error, the others still run,
and the exit status is 1.

Variants (rows): published = the published step: all four modalities encoded per forward, fp16
autocast with a loss scaler (the baseline of the speed targets; the released train.py has no autocast and
trains in fp32), NCDHW, eager, torch's default SGD (whose loss scaler reads the overflow flag on
the host every step) (on a CPU in fp32: the published code needs a GPU, and CPU fp16 autocast
runs ~10x slower than fp32); fp32 = this repository's step before the speed options; fp32_cl =
fp32 + channels-last (the one option a CPU might use); bf16 = bf16 autocast; bf16_cl = +
channels-last; bf16_compile = bf16 + torch.compile; bf16_cl_compile = all three, run.sh's
default on a GPU (fp32 is its default on a CPU). Default rows, in this order (the targets
first): published, bf16_cl_compile, bf16, bf16_cl, fp32 on CUDA; published, fp32, fp32_cl on a
CPU.
"""
import argparse
import contextlib
import random
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train  # noqa: E402
from datasets.augment import augment_batch  # noqa: E402
from datasets.brats import datalist_entries, resolve_list  # noqa: E402
from datasets.preprocess import preprocess  # noqa: E402
from datasets.sampling import PatchDataset, loader_options  # noqa: E402
from datasets.synthetic import generate, split_counts, volume_shape  # noqa: E402
from models import MODEL_SIZES  # noqa: E402
from utils import distributed, speed  # noqa: E402
from utils.cli import PUBLISHED_INPUT_SIZE, ArgumentParser, UsageError, int_at_least, run_cli  # noqa: E402
from utils.election import elect  # noqa: E402
from utils.losses import segmentation_loss  # noqa: E402
from utils.modalities import FULL, parse_teachers  # noqa: E402

VARIANTS = {
    "published": ["--amp", "fp16", "--encode_all_modalities", "True", "--channels_last", "off", "--compile", "off"],
    "fp32": ["--amp", "off", "--channels_last", "off", "--compile", "off"],
    "fp32_cl": ["--amp", "off", "--channels_last", "on", "--compile", "off"],
    "bf16": ["--amp", "bf16", "--channels_last", "off", "--compile", "off"],
    "bf16_cl": ["--amp", "bf16", "--channels_last", "on", "--compile", "off"],
    "bf16_compile": ["--amp", "bf16", "--channels_last", "off", "--compile", "on"],
    "bf16_cl_compile": ["--amp", "bf16", "--channels_last", "on", "--compile", "on"],
}
STAGES = {"stage 1": "0,1,2,3", "stage 2": "random"}
# One subset per modality count: FLOPs and encoder shapes depend only on the count.
SUBSETS_BY_COUNT = ((0,), (0, 1), (0, 1, 2))

# The published recipe as run.sh runs it: stage 1 to iteration 80 000, stage 2 to 115 000, an
# election every 5 000 iterations (at 0, 5 000, ..., 110 000) on the published validation list.
RECIPE_STEPS = {"stage 1": (0, 80000), "stage 2": (80000, 115000)}
RECIPE_VAL_EVERY = 5000
RECIPE_ELECTIONS = sum(len(range(start, stop, RECIPE_VAL_EVERY)) for start, stop in RECIPE_STEPS.values())
RECIPE_VAL_LIST = Path(__file__).resolve().parents[1] / "datalist" / "BraTS18" / "BraTS18_val.csv"

# Dense peaks by the vendors' datasheets (half their sparsity figures), TFLOP/s.
PEAK_TFLOPS = {
    "H100 SXM, H200": {"bf16": 989.0, "fp16": 989.0, "tf32": 494.5, "fp32": 67.0},
    "H100 PCIe": {"bf16": 756.5, "fp16": 756.5, "tf32": 378.0, "fp32": 51.0},
    "H100 NVL, H200 NVL": {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0},
}


def card_family(name):
    """A CUDA device name -> its PEAK_TFLOPS key, or None (another card, or a MIG slice: a
    fraction of the card's units)."""
    if "MIG" in name:
        return None
    if "NVL" in name and ("H100" in name or "H200" in name):
        return "H100 NVL, H200 NVL"
    if "H100" in name and "PCIe" in name:
        return "H100 PCIe"
    if "H200" in name or ("H100" in name and ("HBM3" in name or "SXM" in name)):
        return "H100 SXM, H200"
    return None


def add_common_arguments(p):
    """The flags bench_train.py and profile_train.py share (defaults: resolve_defaults)."""
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--model", choices=MODEL_SIZES, help="default: full on CUDA, small on CPU")
    p.add_argument("--patch", help="D,H,W (default: 80,160,160 on CUDA, 32,64,64 on CPU)")
    p.add_argument("--batch", type=int, default=2)  # train.py's check names it (--batch_size)
    p.add_argument("--shape", type=volume_shape,
                   help="case size X,Y,Z (default: 240,240,155 on CUDA, 96,96,64 on CPU)")
    p.add_argument("--threads", type=int_at_least(0), default=0, help="CPU threads (0: PyTorch default)")


def resolve_defaults(args, defaults=None):
    """args.device becomes 'cuda' or 'cpu'; flags left unset take their (CUDA, CPU) default."""
    cuda = distributed.device_kind(args.device) == "cuda"
    args.device = "cuda" if cuda else "cpu"
    defaults = {"model": ("full", "small"), "patch": (PUBLISHED_INPUT_SIZE, "32,64,64"),
                "shape": ((240, 240, 155), (96, 96, 64)), **(defaults or {})}
    for name, (on_cuda, on_cpu) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, on_cuda if cuda else on_cpu)
    return args


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(p)
    p.add_argument("--variants", help="comma-separated rows from: " + ", ".join(VARIANTS))
    p.add_argument("--stages", default="stage 1,stage 2", help="comma-separated: stage 1, stage 2")
    p.add_argument("--warmup", type=int, help="untimed iterations (default 10 on CUDA, 3 on CPU)")
    p.add_argument("--steps", type=int, help="timed iterations (default 30 on CUDA, 10 on CPU)")
    p.add_argument("--num_workers", type=int, help="DataLoader workers (default -1 on CUDA: sized "
                   "from the machine, as run.sh's train.py; 1 on CPU)")
    p.add_argument("--cases", type=int, default=4, help="synthetic cases (60%% train)")
    p.add_argument("--work_dir", default="", help="data, cache, snapshots (default: temporary)")
    p.add_argument("--election", action=argparse.BooleanOptionalAction, default=True,
                   help="time the teacher election in the stage 2 rows (for the projection)")
    args = resolve_defaults(p.parse_args(argv), {
        "variants": ("published,bf16_cl_compile,bf16,bf16_cl,fp32", "published,fp32,fp32_cl"),
        "warmup": (10, 3), "steps": (30, 10), "num_workers": (-1, 1)})
    args.variants = args.variants.split(",")
    args.stages = [s.strip() for s in args.stages.split(",")]
    for name in args.variants:
        if name not in VARIANTS:
            p.error(f"unknown variant {name!r}: use {', '.join(VARIANTS)}")
    for name in args.stages:
        if name not in STAGES:
            p.error(f"unknown stage {name!r}: use {', '.join(STAGES)}")
    if args.warmup < 1 or args.steps < 1:
        p.error("--warmup and --steps must be >= 1")
    if split_counts(args.cases)[0] < 1 or (args.election and split_counts(args.cases)[1] < 1):
        p.error(f"--cases {args.cases} leaves no training case or, for --election, no validation case")
    check_train_flags(p, args, args.stages, args.variants)
    return args


def check_train_flags(parser, args, stages, variants):
    """What train.py would refuse (a patch the network cannot take, a batch of 0) is a usage
    error here, once, rather than a failed row per variant."""
    for stage in stages:
        for variant in variants:
            try:
                train.parse_args(train_flags(args, Path(args.work_dir or "."), stage, variant))
            except UsageError as error:
                parser.error(f"train.py refuses these settings: {error}")


def peak_tflops(device, amp):
    """(dense peak TFLOP/s for this precision, description) or (None, why not)."""
    if device.type != "cuda":
        return None, "n/a on a CPU"
    name = torch.cuda.get_device_name(device)
    family = card_family(name)
    if family is None:
        return None, f"n/a: no datasheet peak here for {name}"
    if amp in ("bf16", "fp16"):
        precision = amp
    else:  # convolutions run on TF32 tensor cores unless cuDNN is told otherwise
        precision = "tf32" if torch.backends.cudnn.allow_tf32 else "fp32"
    peak = PEAK_TFLOPS[family][precision]
    return peak, f"{precision} {peak:g} TFLOP/s dense ({name}: {family}, datasheet)"


def variant_flags(variant, device_type):
    if variant == "published" and device_type == "cpu":
        return VARIANTS[variant] + ["--amp", "off"]  # the last --amp wins
    return VARIANTS[variant]


def train_flags(args, work, stage, variant, warmup=None):
    warmup = args.warmup if warmup is None else warmup
    return ["--device", args.device, "--model_size", args.model, "--input_size", args.patch,
            "--batch_size", str(args.batch), "--num_workers", str(args.num_workers),
            "--train_list", str(work / "data" / "train.csv"), "--val_list", "",
            "--cache_dir", str(work / "cache"), "--mode", STAGES[stage], "--teachers", "0",
            "--snapshot_dir", str(work / "snapshots" / f"{stage.replace(' ', '')}_{variant}"),
            "--overwrite", "True",  # a re-run with the same --work_dir measures afresh
            "--num_steps", "1000000", "--val_pred_every", "1000000000",
            "--stop_at", str(warmup + args.steps), "--timing_warmup", str(warmup),
            *variant_flags(variant, args.device)]


def loop_subsets(targs, warmup, steps):
    """(warm-up iterations, the subsets of the timed window) of train.main's loop: the subsets
    come from its seeded stream; in stage 2 the warm-up is lengthened until it has drawn every
    modality count (each is an encoder shape that compiles, or cuDNN autotunes, once, which the
    timed window must not contain)."""
    rng = random.Random(train.derived_seed(targs.random_seed, targs.start_iters))
    drawn = []
    while len(drawn) < warmup or len({len(s) for s in drawn}) < len(count_subsets(targs)):
        drawn.append(train.draw_subset(targs.mode_parsed, rng, 1.0))
    return len(drawn), [train.draw_subset(targs.mode_parsed, rng, 1.0) for _ in range(steps)]


def pipeline_batch(targs, device):
    """One training batch as the loop makes it: cached cases -> PatchDataset -> augmentation."""
    cases = preprocess(resolve_list(targs.train_list, targs.data_dir), targs.cache_dir)
    dataset = PatchDataset(cases, targs.patch_size, seed=targs.random_seed, length=targs.batch_size)
    batch = torch.utils.data.default_collate([dataset[i] for i in range(targs.batch_size)])
    image, regions = dataset.to_device(batch, device)
    return augment_batch(image, regions, seed=targs.random_seed)


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device):
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def fresh_compiler(targs, device):
    """Before a compiled network is built: forget the graphs of the networks measured before.

    Each measurement then compiles its own graphs (Inductor's on-disk cache makes the repeats
    cheap) and never reaches dynamo's recompile limit through graphs of earlier rows; past the
    limit dynamo would run eager silently, so that is made an error where torch allows it.
    """
    if not speed.resolve_compile(targs.compile, torch.device(device)):
        return
    from torch import _dynamo

    _dynamo.reset()
    if hasattr(_dynamo.config, "fail_on_recompile_limit_hit"):
        _dynamo.config.fail_on_recompile_limit_hit = True


def count_subsets(targs):
    """One subset per modality count the stage trains with (FLOPs and encoder shapes depend
    only on the count)."""
    return [FULL] if targs.mode_parsed != "random" else list(SUBSETS_BY_COUNT)


def warmed_step(targs, device, batch, warmup):
    """The configured network, stepped on `batch` for `warmup` steps (at least one per
    modality count: each is an encoder shape, autotuned by cuDNN and compiled once).

    Returns (step, options): step(subset) runs one train.step on the batch, as the loop does.
    """
    fresh_compiler(targs, device)
    model, optimizer, options = train.build_model(targs, device)
    model.train()
    scaler = torch.amp.GradScaler(device.type, enabled=targs.amp == "fp16")
    teachers = parse_teachers(targs.teachers)
    image, regions = batch

    def step(subset):
        train.step(model, optimizer, scaler, image, regions, subset, teachers, targs.amp, targs.kd_weight)

    warm = count_subsets(targs)
    for i in range(max(warmup, len(warm))):
        step(warm[i % len(warm)])
    return step, options


def bare_step(targs, device, batch, timed, warmup):
    """Step the configured network on one batch, once per subset of `timed` after the warm-up;
    returns (it/s, peak GiB, warm-up seconds)."""
    speed.synchronize(device)
    start = time.perf_counter()
    step, _ = warmed_step(targs, device, batch, warmup)
    speed.synchronize(device)
    warmup_seconds = time.perf_counter() - start
    reset_peak(device)
    speed.synchronize(device)
    start = time.perf_counter()
    for subset in timed:
        step(subset)
    speed.synchronize(device)
    rate = len(timed) / (time.perf_counter() - start)
    memory = peak_gib(device)
    del step  # the network and its optimiser, before the next measurement
    return rate, memory, warmup_seconds


_FLOPS = {}  # step_flops' counts of this run, by (modality counts, all modalities encoded)


def step_flops(targs, device, batch):
    """{modality count: conv/matmul FLOPs of one training step (forward + backward)}, counted
    once per stage and encoder work on an eager fp32 NCDHW model (FLOPs depend on none of
    those), with cuDNN's autotuning off: a counting pass need not tune fp32 kernels."""
    key = (tuple(len(s) for s in count_subsets(targs)), targs.encode_all_modalities)
    if key in _FLOPS:
        return _FLOPS[key]
    eager = argparse.Namespace(**{**vars(targs), "amp": "off", "channels_last": "off", "compile": "off"})
    model, _, _ = train.build_model(eager, device)
    model.train()
    image, regions = batch
    counts, benchmark = {}, torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = False
    try:
        for subset in count_subsets(targs):
            counter = FlopCounterMode(display=False)
            with counter:
                logits, kd = model(image, subset=subset, teachers=parse_teachers(targs.teachers))
                segmentation_loss(logits, regions, kd, targs.kd_weight)[0].backward()
            counts[len(subset)] = counter.get_total_flops()
    finally:
        torch.backends.cudnn.benchmark = benchmark
    del model
    _FLOPS[key] = counts
    return counts


def election_seconds(targs, device, cases):
    """Seconds per case of train.py's teacher election with the configured network, timed on
    the second of two elections (the first compiles the eval-mode graphs and autotunes)."""
    fresh_compiler(targs, device)
    model, _, _ = train.build_model(targs, device)
    times = []
    for _ in range(2):
        speed.synchronize(device)
        start = time.perf_counter()
        elect(model, cases, targs.patch_size, overlap=targs.overlap, batch_size=targs.batch_size,
              amp=targs.amp, device=device)  # ends with a host read of the Dice sums
        times.append(time.perf_counter() - start)
    del model
    return times[-1] / len(cases)


@contextlib.contextmanager
def optimizer_of(variant):
    """The published row steps torch's default SGD, as the published code did (its loss scaler
    then reads the overflow flag on the host every step); the others the SGD train.py picks."""
    if variant != "published":
        yield
        return
    picked = speed.sgd_implementation
    speed.sgd_implementation = lambda device: {"fused": None, "foreach": None}
    try:
        yield
    finally:
        speed.sgd_implementation = picked


def measure(args, work, stage, variant, device):
    t_start = time.perf_counter()
    targs = train.parse_args(train_flags(args, work, stage, variant))
    warmup, timed = loop_subsets(targs, args.warmup, args.steps)  # the same for every variant
    flags = train_flags(args, work, stage, variant, warmup)
    batch = pipeline_batch(targs, device)
    with optimizer_of(variant):
        step_rate, step_memory, warmup_seconds = bare_step(targs, device, batch, timed, args.warmup)
    flops_by_count = step_flops(targs, device, batch)
    flops = statistics.mean(flops_by_count[len(s)] for s in timed)  # the timed window's work
    reset_peak(device)
    fresh_compiler(targs, device)
    with contextlib.redirect_stdout(sys.stderr), optimizer_of(variant):  # its log lines, away from the tables
        result = train.main(flags)
    loop_rate = result["steady_iterations"] / result["steady_seconds"]
    loop_memory = peak_gib(device)
    election = None
    if args.election and STAGES[stage] == "random":
        val_cases = preprocess(work / "data" / "val.csv", targs.cache_dir)
        election = election_seconds(targs, device, val_cases)
    peak, _ = peak_tflops(device, targs.amp)
    return {"stage": stage, "variant": variant, "amp": targs.amp, "timed": result["steady_iterations"],
            "loop": loop_rate, "step": step_rate,
            "wait": result["data_wait_seconds"] / result["steady_seconds"],
            "mem_loop": loop_memory, "mem_step": step_memory, "gflop": flops / 1e9,
            "mfu_loop": flops * loop_rate / (peak * 1e12) if peak else None,
            "mfu_step": flops * step_rate / (peak * 1e12) if peak else None,
            "election": election, "warmup": warmup_seconds, "wall": time.perf_counter() - t_start}


def measure_row(args, work, stage, variant, device):
    """measure(), or the row's error: one failing variant (a compiler error, out of memory)
    must not cost the rows after it on a GPU held for minutes. The traceback goes to stderr."""
    try:
        return measure(args, work, stage, variant, device)
    except Exception as error:  # noqa: BLE001 (reported in the table and the exit status)
        traceback.print_exc()
        message = (str(error).strip().splitlines() or [""])[0][:160]
        return {"stage": stage, "variant": variant, "error": f"{type(error).__name__}: {message}"}


COLUMNS = ("variant", "amp", "loop it/s", "step it/s", "loop/step", "data wait", "loop x published",
           "step x published", "peak GiB loop", "peak GiB step", "GFLOP/it", "MFU loop", "MFU step",
           "election s/case", "warm-up s", "wall s")


def format_row(r, ref):
    """One row of a stage's '|' table; ratios are to `ref`, the stage's published row (n/a
    without one)."""
    if "error" in r:
        return f"{r['variant']} | FAILED: {r['error']}"

    def num(value, fmt=".2f"):
        return "n/a" if value is None else format(value, fmt)

    def pct(value):
        return "n/a" if value is None else f"{100 * value:.1f}%"

    return " | ".join([
        r["variant"], r["amp"], num(r["loop"], ".3f"), num(r["step"], ".3f"), num(r["loop"] / r["step"]),
        pct(r["wait"]), num(r["loop"] / ref["loop"] if ref else None),
        num(r["step"] / ref["step"] if ref else None), num(r["mem_loop"]), num(r["mem_step"]),
        num(r["gflop"], ".1f"), pct(r["mfu_loop"]), pct(r["mfu_step"]), num(r["election"], ".3f"),
        num(r["warmup"], ".0f"), num(r["wall"], ".0f"),
    ])


def recipe_seconds(loop_rates, election_s_per_case, val_cases):
    """Wall seconds of the published recipe: {stage 1, stage 2, elections, total}.

    loop_rates: {stage: train.py loop it/s}; RECIPE_ELECTIONS elections, one at every multiple
    of RECIPE_VAL_EVERY in each stage's iterations. Preprocessing (once per dataset) and the
    checkpoint writes (every 5 000 iterations and 30 minutes, about a second each) are left out.
    """
    seconds = {stage: (stop - start) / loop_rates[stage] for stage, (start, stop) in RECIPE_STEPS.items()}
    seconds["elections"] = RECIPE_ELECTIONS * val_cases * election_s_per_case
    seconds["total"] = sum(seconds.values())
    return seconds


def format_projection(rows):
    """Lines projecting the recipe's wall time for each variant measured in both stages."""
    ok = {(r["stage"], r["variant"]): r for r in rows if "error" not in r}
    val_cases = len(datalist_entries(RECIPE_VAL_LIST))
    lines = []
    for variant in dict.fromkeys(r["variant"] for r in rows):
        stage_rows = [ok.get((stage, variant)) for stage in RECIPE_STEPS]
        if None in stage_rows or stage_rows[1]["election"] is None:
            continue
        s = recipe_seconds({st: r["loop"] for st, r in zip(RECIPE_STEPS, stage_rows)},
                           stage_rows[1]["election"], val_cases)
        lines.append(f"{variant}: {s['total'] / 3600:.1f} h (stage 1 {s['stage 1'] / 3600:.1f} h + "
                     f"stage 2 {s['stage 2'] / 3600:.1f} h + elections {s['elections'] / 60:.0f} min)")
    if not lines:
        return []
    steps = " + ".join(f"{b - a:,} iterations of {st}" for st, (a, b) in RECIPE_STEPS.items())
    return [f"projected wall time of the published recipe (run.sh: {steps} at the loop rates "
            f"above; {RECIPE_ELECTIONS} elections of {val_cases} validation cases at the stage 2 rows' "
            f"s/case; preprocessing and checkpoint writes not included):"] + lines


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    train.set_backends(device)  # the bare steps run as train.main's loop does
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"bench_train: {name} | torch {torch.__version__} | model {args.model} | patch {args.patch} "
          f"batch {args.batch} | {args.warmup} warm-up + {args.steps} timed iterations | "
          f"{loader_options(args.num_workers, device)['num_workers']} DataLoader workers", flush=True)
    amps = [train.parse_args(variant_flags(v, device.type)).amp for v in args.variants]
    for amp in dict.fromkeys(amps):
        print(f"MFU peak for amp {amp}: {peak_tflops(device, amp)[1]}", flush=True)
    rows, refs = [], {}  # refs: each stage's published row, for the ratios
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        work = Path(args.work_dir or tmp)
        if not (work / "data" / "train.csv").exists():
            generate(work / "data", args.cases, shape_xyz=args.shape)
        # The targets first (the first three variants, both stages, their projection): a run
        # stopped at a GPU session's time limit keeps them. Each row is printed when measured.
        for group in (args.variants[:3], args.variants[3:]):
            group_rows = []
            for stage in args.stages if group else ():
                print(f"\n{stage} (--mode {STAGES[stage]}){' continued' if rows else ''}:")
                print("  " + " | ".join(COLUMNS), flush=True)
                for variant in group:
                    row = measure_row(args, work, stage, variant, device)
                    if variant == "published" and "error" not in row:
                        refs[stage] = row
                    print("  " + format_row(row, refs.get(stage)), flush=True)
                    group_rows.append(row)
            projection = format_projection(group_rows)
            if projection:
                print("\n" + "\n  ".join(projection), flush=True)
            rows += group_rows
    return rows


if __name__ == "__main__":
    rows = run_cli(main)  # SIGTERM and Ctrl-C unwind: the temporary cases and cache are deleted
    sys.exit(1 if any("error" in r for r in rows) else 0)
