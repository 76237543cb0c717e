"""Process-group setup for `torchrun` (DDP); a plain `python train.py` is a world of one.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; one process drives one device. NCCL on GPUs,
gloo on CPUs.
"""
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self):
        """Only rank 0 writes files, TensorBoard events and prints."""
        return self.rank == 0

    @property
    def enabled(self):
        return self.world_size > 1


def resolve_device(name, local_rank=0):
    """'auto' -> this process's GPU if there is one, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda requested but torch.cuda.is_available() is False")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    if name == "cpu":
        return torch.device("cpu")
    raise ValueError(f"unknown --device {name!r}: use auto, cpu or cuda")


def init(device_name="auto"):
    """Join the torchrun process group if launched by torchrun. Returns (Dist, device)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Dist(), resolve_device(device_name)
    info = Dist(int(os.environ["RANK"]), world_size, int(os.environ["LOCAL_RANK"]))
    device = resolve_device(device_name, info.local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    return info, device


def barrier(info: Dist):
    if info.enabled:
        dist.barrier()


def all_reduce_sum(tensor, info: Dist):
    """Sum a tensor over ranks in place (no-op in a world of one) and return it."""
    if info.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


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
