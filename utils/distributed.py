"""Process-group setup for `torchrun` (DDP); a plain `python train.py` is a world of one.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; one process drives one device. NCCL on GPUs,
gloo on CPUs. Every collective gives up after a timeout (a stopped rank would otherwise hold the
others forever); the barriers are gloo's monitored barrier, whose error names the ranks that did
not arrive.
"""
import contextlib
import datetime
import io
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    timeout: datetime.timedelta = datetime.timedelta(minutes=30)
    monitor: object = None  # a gloo group for monitored barriers (NCCL has none)
    timeout_flag: str = None  # the script's flag that sets `timeout`, for the messages

    def within_timeout(self):
        """'within --flag N' (a script with the flag) or 'within N min', for timeout errors."""
        minutes = f"{self.timeout.total_seconds() / 60:g}"
        if self.timeout_flag:
            return f"within {self.timeout_flag} {minutes}"
        return f"within {minutes} min"

    @property
    def is_main(self):
        """Only rank 0 writes files, TensorBoard events and prints."""
        return self.rank == 0

    @property
    def enabled(self):
        return self.world_size > 1


class DeviceError(RuntimeError):
    """The --device asked for is not there (a user mistake, reported in one line)."""


def device_kind(name):
    """--device as a kind: 'auto' -> 'cuda' where a GPU is visible, else 'cpu'."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


DEVICE_NAMES = "auto, cpu, cuda or cuda:N"  # what --device takes


def named_device(name):
    """A --device name other than 'auto' -> the torch.device it names, or None when it is none
    of DEVICE_NAMES. Parsing the name only: whether the device is here is resolve_device's."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        return None
    return device if device.type in ("cpu", "cuda") else None


def resolve_device(name, local_rank=None):
    """--device -> torch.device: 'auto' (a GPU if there is one, else the CPU), 'cpu', 'cuda' or
    'cuda:N'. With local_rank given (init passes torchrun's LOCAL_RANK, or 0 for a single
    process), a GPU is cuda:local_rank, made current, whatever index the name holds."""
    device = named_device(device_kind(name))
    if device is None:
        raise DeviceError(f"--device {name!r}: expected {DEVICE_NAMES}")
    if device.type == "cpu":
        return device
    if not torch.cuda.is_available():
        raise DeviceError(f"--device {name}: CUDA is not available here (no GPU, no driver, or a "
                          "CPU-only PyTorch); use --device cpu (run.sh, eval.sh: cpu in place of the GPU id)")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise DeviceError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)")
    if local_rank is not None:
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return device


def launched_world_size():
    """How many processes run this script: torchrun's WORLD_SIZE, 1 for a plain `python`."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched_rank():
    """This process's rank in torchrun's world, 0 for a plain `python` (whatever RANK says)."""
    return int(os.environ.get("RANK", "0")) if launched_world_size() > 1 else 0


def init(device_name="auto", timeout_min=30.0, timeout_flag=None):
    """Join the torchrun process group if launched by torchrun. Returns (Dist, device).
    timeout_flag: the script's flag that gave `timeout_min`, named when a rank times out."""
    world_size = launched_world_size()
    if world_size == 1:
        return Dist(), resolve_device(device_name, local_rank=0)
    local_rank = int(os.environ["LOCAL_RANK"])
    device = resolve_device(device_name, local_rank)
    timeout = datetime.timedelta(minutes=timeout_min)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=timeout,
                            device_id=device if device.type == "cuda" else None)
    # A separate group: a timed-out gloo group is unusable afterwards.
    monitor = dist.new_group(backend="gloo", timeout=timeout)
    return Dist(int(os.environ["RANK"]), world_size, timeout, monitor, timeout_flag), device


class RankTimeoutError(RuntimeError):
    """Some rank did not reach a barrier within the timeout (stopped, hung or dead)."""


def barrier(info: Dist, where):
    """Wait for every rank; after info.timeout raise RankTimeoutError (on rank 0 it names the
    ranks that did not arrive, the others refer to rank 0)."""
    if not info.enabled:
        return
    try:
        dist.monitored_barrier(group=info.monitor, timeout=info.timeout, wait_all_ranks=True)
    except RuntimeError as error:
        raise RankTimeoutError(f"rank {info.rank}: not every rank reached the barrier {where} "
                               f"{info.within_timeout()}: {str(error).splitlines()[0]}") from error


def broadcast_object(obj, info: Dist):
    """Rank 0's value of a picklable object, on every rank. Through the gloo group: a wait for
    rank 0 (its preprocessing) that times out is an error here, not NCCL's watchdog abort."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=info.monitor)
    return box[0]


class MainRankFailed(Exception):
    """Raised on the other ranks when rank 0 failed in `on_main_rank`. Rank 0 reports its error;
    the others leave quietly with the same exit status (utils.cli.run_cli), so a refusal is
    printed once, not once per process."""

    def __init__(self, error_type):
        super().__init__(f"rank 0 stopped with {error_type.__name__}")
        self.error_type = error_type


# How long the other processes of a machine hold back a failure before_init found: local rank
# 0 reports the same one, and torchrun (checking its workers every 0.1 s) then stops the rest.
REPORT_DELAY_S = 5.0


def before_init(fn):
    """fn() before the process group exists (flags, lists): every process of a machine gets the
    same result, so local rank 0 reports a failure (argparse's own errors included) and the
    others, stopped by torchrun meanwhile, do not repeat it: they report it only if they are
    still running REPORT_DELAY_S later (local rank 0 slower to start, or not failing)."""
    if launched_world_size() == 1 or int(os.environ.get("LOCAL_RANK", "0")) == 0:
        return fn()
    held = io.StringIO()
    try:
        with contextlib.redirect_stderr(held):
            return fn()
    except (Exception, SystemExit):  # SystemExit: argparse's errors
        time.sleep(REPORT_DELAY_S)
        sys.stderr.write(held.getvalue())
        raise


def on_main_rank(fn, info: Dist, what="rank 0's checks"):
    """fn() on rank 0 alone -> its result on rank 0, None on the other ranks, which wait for it.

    For what rank 0 does alone (checks before any work, writing files): when fn raises, rank 0
    raises its error and every other rank MainRankFailed, instead of running on into the next
    collective, which fails with the backend's traceback or waits until the timeout. `what`
    fn does, for the other ranks' message when rank 0 never answers.
    """
    if not info.enabled:
        return fn()
    if not info.is_main:
        started = time.monotonic()
        try:
            failed = broadcast_object(None, info)
        except RuntimeError as error:  # gloo / NCCL: a timeout, or rank 0's connection closed
            if time.monotonic() - started < 0.99 * info.timeout.total_seconds():
                raise PeerFailed(f"rank {info.rank}: rank 0 stopped during {what}") from error
            raise RankTimeoutError(f"rank {info.rank}: rank 0 did not finish {what} "
                                   f"{info.within_timeout()}") from error
        if failed is not None:
            raise MainRankFailed(failed)
        return None
    try:
        result = fn()
    except BaseException as error:  # Ctrl-C included: no rank may keep waiting
        try:
            broadcast_object(type(error), info)  # the class: it pickles whatever its arguments
        except RuntimeError:
            pass  # the others are gone already: rank 0's own error is the one to report
        raise
    try:
        broadcast_object(None, info)
    except RuntimeError as error:
        raise PeerFailed(f"rank 0: another process of this run stopped while rank 0 was busy with "
                         f"{what} (its message is printed with this one)") from error
    return result


class PeerFailed(RuntimeError):
    """Another rank stopped (on an error it printed, or killed) before a collective: this
    rank's one-line account instead of the backend's traceback."""


# What gloo says when another process is gone (killed without a word: the OOM killer,
# kill -9); under NCCL its watchdog aborts the process after the timeout instead.
PEER_GONE = ("Connection closed by peer", "Connection reset by peer")


@contextlib.contextmanager
def peers_present(info: Dist, what):
    """A collective inside (DDP's gradient all-reduce, a check point's) failing because another
    process is gone -> PeerFailed, one line, instead of the backend's traceback."""
    try:
        yield
    except RuntimeError as error:
        if not info.enabled or not any(text in str(error) for text in PEER_GONE):
            raise
        raise PeerFailed(f"rank {info.rank}: another process of this run is gone (killed? "
                         f"torchrun's summary below gives its exit code) during {what}; the same "
                         "command resumes the run from its last checkpoint") from error


def gather_object(obj, info: Dist):
    """Every rank's picklable object, in rank order, on rank 0 (None on the other ranks).
    PeerFailed when a rank stopped before sending its part: on an error it printed, or killed
    without a word (kill -9, the OOM killer; a stop signal sent to that process alone)."""
    if not info.enabled:
        return [obj]
    gathered = [None] * info.world_size if info.is_main else None
    try:
        dist.gather_object(obj, gathered, dst=0)
    except RuntimeError as error:  # gloo: 'Connection closed by peer'; NCCL: DistBackendError
        raise PeerFailed(f"rank {info.rank}: another process of this run stopped before the end "
                         "(on an error, printed with this one, or killed: torchrun's summary below "
                         "gives its exit code)") from error
    return gathered


def all_reduce_sum(tensor, info: Dist):
    """Sum a tensor over ranks in place (no-op in a world of one) and return it."""
    if info.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def any_rank(flag, info: Dist, device):
    """Whether `flag` is true on any rank (every rank must call it: an all-reduce)."""
    return bool(all_reduce_sum(torch.tensor([float(flag)], device=device), info).item())


def check_replicas_equal(model, info: Dist):
    """Raise unless every rank holds the same parameters (DDP's invariant; checked at the end
    of a run because a silent divergence would make rank 0's checkpoint unrepresentative)."""
    if not info.enabled:
        return
    flat = torch.cat([p.detach().double().flatten() for p in model.parameters()])
    checksum = torch.stack([flat.sum(), (flat * flat).sum(), (flat * torch.arange(
        flat.numel(), dtype=torch.float64, device=flat.device).remainder(7)).sum()])
    low, high = checksum.clone(), checksum.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    if not torch.equal(low, high):
        raise RuntimeError(f"rank {info.rank}: model replicas diverged (parameter checksums "
                           f"range from {low.tolist()} to {high.tolist()})")


def cleanup(info: Dist):
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
