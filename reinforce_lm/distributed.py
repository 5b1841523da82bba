"""The only importer of `torch.distributed`: one process, or many under `torchrun`, detected from the env.

Gloo on CPU, NCCL on GPU. Everything that spans the batch (token counts, whitening statistics,
metrics) goes through `reduce_sum`, so N processes with P/N prompts each compute what one process
with P prompts computes.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def reduce_sum(self, x: torch.Tensor) -> torch.Tensor:
        """Sum a tensor over all processes (identity on one process). Returns a new tensor."""
        if not self.enabled:
            return x
        y = x.detach().clone().to(self.device)
        dist.all_reduce(y, op=dist.ReduceOp.SUM)
        return y.to(x.device)

    def reduce_max(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        y = x.detach().clone().to(self.device)
        dist.all_reduce(y, op=dist.ReduceOp.MAX)
        return y.to(x.device)

    def mean_metrics(self, metrics: dict[str, float], weight: float = 1.0) -> dict[str, float]:
        """Weighted mean of scalar metrics over processes (weight: e.g. this rank's sample count)."""
        if not self.enabled or not metrics:
            return metrics
        keys = sorted(metrics)
        t = torch.tensor([metrics[k] * weight for k in keys] + [weight], dtype=torch.float64)
        t = self.reduce_sum(t)
        return {k: (t[i] / t[-1]).item() for i, k in enumerate(keys)}

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def broadcast_object(self, obj):
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def setup(device: str = "auto") -> Dist:
    """Initialise from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK), or a single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank if world_size > 1 else 0)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: torch.nn.Module, d: Dist) -> torch.nn.Module:
    """Data-parallel wrapper (DDP) when running on several processes; the model itself otherwise."""
    if not d.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [d.device.index] if d.device.type == "cuda" else None
    return DDP(model, device_ids=ids)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") and hasattr(model, "no_sync") else model


def no_sync(model: torch.nn.Module, skip: bool):
    """Skip DDP's gradient all-reduce on all but the last micro-batch of an optimiser step."""
    if skip and hasattr(model, "no_sync"):
        return model.no_sync()
    return contextlib.nullcontext()
