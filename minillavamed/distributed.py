"""The processes of a training run: one, or many under torchrun (paper §4.1 trains on 8 A100s).

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; a run without them is one process. GPUs talk over NCCL, CPUs over
gloo. Everything here is a no-op for a single process, so the training loop is written once for both.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    # Host-side flags (the stop signal) are reduced over gloo, so that checking them never waits for a GPU.
    cpu_group: object = None

    @property
    def master(self) -> bool:
        return self.rank == 0


def setup_distributed(cfg) -> Dist:
    """This process's place among torchrun's (one process without it); `cfg` (train.py's TrainConfig) gets
    the local GPU as its device."""
    if "RANK" not in os.environ:
        return Dist()
    d = Dist(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"]))
    if cfg.device.startswith("cuda"):
        cfg.device = f"cuda:{d.local_rank}"
        torch.cuda.set_device(cfg.device)
    dist.init_process_group("nccl" if cfg.device.startswith("cuda") else "gloo")
    d.cpu_group = dist.new_group(backend="gloo") if cfg.device.startswith("cuda") else None
    return d


def barrier(d: Dist) -> None:
    if d.world > 1:
        dist.barrier()


def all_sum(t: torch.Tensor, d: Dist, group=None, op=None) -> torch.Tensor:
    """`t` summed (or reduced by `op`) over the processes, in place."""
    if d.world > 1:
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM, group=group)
    return t


def raw(model):
    """The model inside a DDP wrapper (or the model itself)."""
    return model.module if hasattr(model, "module") else model
