"""The only importer of `torch.distributed`: one process, or many under `torchrun`, detected from the env.

Gloo on CPU, NCCL on GPU. Everything that spans the batch (token counts, whitening statistics,
metrics) goes through `reduce_sum`, so N processes with P/N prompts each compute what one process
with P prompts computes. Models are replicated with DDP, or sharded with FSDP2 (`fully_shard`, one
unit per transformer block, then the root); saving gathers a full state dict, and optimiser state is
saved keyed by parameter name and unsharded, so a run resumes on any number of processes, with or
without FSDP.
"""

from __future__ import annotations

import contextlib
import math
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

    def all_true(self, flag: bool) -> bool:
        """True when `flag` holds on every process: a stop condition that all ranks agree on."""
        if not self.enabled:
            return flag
        return self.reduce_sum(torch.tensor(0.0 if flag else 1.0)).item() == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def gather_shares(self, mine: list) -> list:
        """The whole list from each rank's `rank_chunks` share (every world_size-th item), in order."""
        if not self.enabled:
            return mine
        shares = [None] * self.world_size
        dist.all_gather_object(shares, mine)
        return [s[i] for i in range(max(map(len, shares))) for s in shares if i < len(s)]


def rank_chunks(items: list, d: Dist, size: int) -> list[tuple[list, float]]:
    """This rank's share of `items` (every world_size-th) in chunks of `size`, as (chunk, weight). Every
    rank gets the same number of chunks, because a sharded (FSDP) forward is collective: a rank that has
    run out gets a stand-in chunk with weight 0."""
    mine = items[d.rank :: d.world_size]
    n_chunks = math.ceil(math.ceil(len(items) / d.world_size) / size)
    out = []
    for i in range(n_chunks):
        chunk = mine[i * size : (i + 1) * size]
        out.append((chunk, 1.0) if chunk else (items[:1], 0.0))
    return out


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


def teardown(clean: bool = True) -> None:
    """End the process group. `clean`: every rank got here without an error, so they meet in a barrier
    first. Without it, a process that destroyed its group while a peer was still finishing the last
    collective aborted them both now and then with gloo ("terminate called without an active
    exception", exit code 1 after a finished eval). After an error no collective: it could wait forever."""
    if dist.is_available() and dist.is_initialized():
        if clean:
            dist.barrier()
        dist.destroy_process_group()


def wrap(model: torch.nn.Module, d: Dist, fsdp: bool = False) -> torch.nn.Module:
    """DDP on several processes (or FSDP2 with `fsdp`); the model itself on one process."""
    if not d.enabled:
        return model
    if fsdp:
        return shard(model)
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [d.device.index] if d.device.type == "cuda" else None
    return DDP(model, device_ids=ids)


def shard(model: torch.nn.Module) -> torch.nn.Module:
    """FSDP2: each transformer block is one unit (all-gathered for its forward and backward, then
    freed), the root holds the rest (embeddings, head). Parameters become DTensor shards, moved to the
    accelerator shard by shard, so a model loaded on CPU never sits whole on one GPU. The module keeps
    its class and names: no wrapper, `unwrap` is the identity, forward all-gathers on every rank (so
    every rank must make the same number of forward calls; see `Sampler.sync_stop`)."""
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # torch < 2.6 kept FSDP2 under its composable namespace
        from torch.distributed._composable.fsdp import fully_shard

    blocks = set(getattr(model, "_no_split_modules", None) or [])
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT
    blocks |= set(getattr(inner, "_no_split_modules", None) or [])
    for m in model.modules():
        if type(m).__name__ in blocks:
            fully_shard(m)
    fully_shard(model)
    return model


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def reshard(model: torch.nn.Module) -> None:
    """After a no-grad forward, FSDP2 leaves the root's parameters unsharded (gathered); put the shards
    back, or the optimiser (which holds the shards) and the checkpoint no longer see the same tensors.
    Every stage's `evaluate` ends with it: the step-0 one runs before the optimiser is built."""
    if is_sharded(model):
        model.reshard()


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") and hasattr(model, "no_sync") else model


@contextlib.contextmanager
def _fsdp_no_sync(model):
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def no_sync(model: torch.nn.Module, skip: bool):
    """Skip the gradient all-reduce (DDP) or reduce-scatter (FSDP2) on all but the last micro-batch."""
    if skip and hasattr(model, "no_sync"):
        return model.no_sync()
    if skip and is_sharded(model):
        return _fsdp_no_sync(model)
    return contextlib.nullcontext()


def as_float(x) -> float:
    """A scalar tensor, DTensor (FSDP's clipped grad norm) or number as a Python float."""
    return float(x.full_tensor() if hasattr(x, "full_tensor") else x)


def autocast(device: torch.device, mixed_precision: str):
    """bf16 autocast for forwards (parameters, gradients and optimiser state stay fp32), or nothing."""
    if mixed_precision == "no":
        return contextlib.nullcontext()
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        from reinforce_lm.errors import ConfigError

        raise ConfigError("mixed_precision=bf16: this GPU has no bfloat16 support")
    return torch.autocast(device.type, dtype=torch.bfloat16)


# -- saving and resuming: full, unsharded, keyed by parameter name -----------------------------------
def _full_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


class _WithStateDict:
    """Rank 0's stand-in for a sharded model: `save_pretrained` writes the gathered full state dict."""

    def __init__(self, model, state_dict):
        self.model, self.state_dict = model, state_dict

    def save_pretrained(self, path, **kw):
        self.model.save_pretrained(path, state_dict=self.state_dict, **kw)


def saveable(model: torch.nn.Module) -> torch.nn.Module:
    """What rank 0 passes to `save_pretrained`. Collective under FSDP: every rank must call it."""
    model = unwrap(model)
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return _WithStateDict(model, get_model_state_dict(model, options=_full_options()))
    return model


def _names(model: torch.nn.Module, optimizer) -> list[str]:
    by_id = {id(p): n for n, p in unwrap(model).named_parameters()}
    return [by_id[id(p)] for g in optimizer.param_groups for p in g["params"]]


def optimizer_state(model: torch.nn.Module, optimizer) -> dict:
    """The optimiser's state keyed by parameter name, unsharded (collective under FSDP)."""
    if is_sharded(unwrap(model)):
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(unwrap(model), optimizer, options=_full_options())
    sd, names = optimizer.state_dict(), _names(model, optimizer)
    return {
        "state": {names[i]: v for i, v in sd["state"].items()},
        "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in sd["param_groups"]],
    }


def load_optimizer_state(model: torch.nn.Module, optimizer, state: dict) -> None:
    """Inverse of `optimizer_state`, on any number of processes, sharded or not."""
    if is_sharded(unwrap(model)):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True)
        set_optimizer_state_dict(unwrap(model), optimizer, state, options=options)
        return
    index = {n: i for i, n in enumerate(_names(model, optimizer))}
    optimizer.load_state_dict(
        {
            "state": {index[n]: v for n, v in state["state"].items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in state["param_groups"]],
        }
    )
