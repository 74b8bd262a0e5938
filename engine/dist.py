"""torch.distributed setup for torchrun (one node or many) and plain `python` (one process)."""

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from common import one_line

from .errors import UsageError


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(spec: str | torch.device | None) -> torch.device:
    """A --device value as a device (None: cuda if available, else cpu); a malformed name or
    CUDA on a machine without it is a UsageError."""
    if spec is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as err:
        raise UsageError(f"bad --device {spec!r}: {one_line(err)}") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {spec}: no CUDA GPU is available here; use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UsageError(f"--device {spec}: this machine has {torch.cuda.device_count()} GPUs")
    return device


def setup(device: str | None = None) -> DistInfo:
    """Join the process group torchrun describes (NCCL on GPUs, gloo on CPU), or run alone.

    The device is the *local* rank's GPU: DiT used the global rank, which breaks on node 2+.
    """
    use_cuda = resolve_device(device).type == "cuda"
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        if not dist.is_initialized():
            backend = "nccl" if use_cuda else "gloo"
            kwargs = {"device_id": dev} if use_cuda else {}
            dist.init_process_group(backend, **kwargs)
        return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev)
    return DistInfo(0, 1, 0, dev)


def cleanup():
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier():
    if dist.is_initialized():
        dist.barrier()


def all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    """Mean over ranks (a copy); identity when running alone."""
    values = values.detach().clone()
    if dist.is_initialized():
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        values /= dist.get_world_size()
    return values


def any_rank(flag: bool, device: torch.device) -> bool:
    """True when the flag is set on any rank, so all ranks take the same branch."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())
