"""Process-group setup for single-process runs and the DeepSpeed launcher alike."""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

import torch

from adarec.parallel import world_size


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    """A TCP port free on this host now (for a rendezvous started right after)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pick_device(requested: str) -> torch.device:
    """auto = CUDA when present, else CPU; an explicit cuda without a GPU is an error."""
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        from adarec.errors import ConfigError

        raise ConfigError("train.device=cuda but no CUDA device is available (use auto or cpu)")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def _default_group_timeout(timeout: datetime.timedelta) -> None:
    """Give the groups created later the timeout of the default group.

    DeepSpeed builds its data-parallel group (the one of the gradient all-reduce) with
    `torch.distributed.new_group(ranks)`, which takes torch's module default (30 minutes), not the
    timeout the default group was created with; torch reads that default when the group is made.
    """
    from torch.distributed import distributed_c10d

    for name in ("default_pg_timeout", "default_pg_nccl_timeout"):     # gloo's, NCCL's
        if getattr(distributed_c10d, name, None) is not None:
            setattr(distributed_c10d, name, timeout)


def setup_distributed(requested_device: str, timeout_s: float) -> DistInfo:
    """Initialise torch.distributed through DeepSpeed.

    Under `deepspeed --num_gpus N` the launcher sets RANK/WORLD_SIZE/MASTER_*; a plain
    `adarec train` gets a one-process group on a free local port so the same engine code runs.
    timeout_s (train.dist_timeout_s) bounds how long a collective of any group waits for the other
    ranks: a rank that is stopped or whose node vanished ends the run after that long rather than
    torch's default 30 minutes (engine/rank_watch.py then names it). gloo notices a peer whose
    process died at once.
    """
    import deepspeed

    device = pick_device(requested_device)
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    timeout = datetime.timedelta(seconds=timeout_s)
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo",
                                   timeout=timeout, verbose=False)
    _default_group_timeout(timeout)
    return DistInfo(
        rank=torch.distributed.get_rank(),
        world_size=torch.distributed.get_world_size(),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        device=device,
    )


def sync_ranks() -> None:
    """Wait until every rank gets here (nothing to wait for in a one-process run)."""
    if world_size() > 1:
        torch.distributed.barrier()


def share_from_rank0(value):
    """Rank 0's value on every rank, so that all of them act on one decision."""
    if world_size() == 1:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]
