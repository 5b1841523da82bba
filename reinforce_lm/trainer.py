"""The one training loop. SFT, reward-model training, REINFORCE (every estimator) and PPO plug into it.

    collect -> (passes x minibatches x micro-batches: loss -> backward) -> clip -> step -> log -> save

A stage (see `Stage`) owns its models and data; this loop owns the optimisers, schedules, gradient
accumulation, clipping, checkpoints, metrics and Ctrl-C. It reads top to bottom.
"""

from __future__ import annotations

import copy
import functools
import math
import os
import signal
import sys
import time
from typing import Protocol

import torch

from reinforce_lm import checkpoint, host_memory
from reinforce_lm.config import EngineConfig
from reinforce_lm.distributed import (
    Dist,
    as_float,
    autocast,
    load_optimizer_state,
    no_sync,
    optimizer_state,
    saveable,
)
from reinforce_lm.errors import CheckpointError, TrainingError
from reinforce_lm.lora import is_lora, lora_for_saving
from reinforce_lm.metrics import MetricsLogger

Batch = dict[str, torch.Tensor]  # every tensor has the batch dimension first


class Stage(Protocol):
    """What a stage provides to the loop."""

    updates_per_batch: int  # passes over each collected batch
    minibatches: int  # optimiser steps per pass
    tokenizer: object

    def param_groups(self) -> list[tuple[str, torch.nn.Module, float]]:
        """(name, trainable module, learning rate); one AdamW each. 'policy' is saved at the top level."""

    def collect(self, step: int) -> tuple[Batch, dict[str, float]]:
        """This rank's batch for `step` (rollouts, or a batch of examples) and its metrics."""

    def loss(self, micro: Batch, normalizer: dict) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss of one micro-batch, already divided by the global `normalizer` ('tokens', 'seqs') so that
        summing over micro-batches and processes gives the minibatch loss. Metrics are additive likewise
        (the loop averages them over the step's optimiser updates: `normalizer['update']` of
        `normalizer['updates']`, 0 while the policy is still the one that collected the batch)."""

    def evaluate(self) -> dict[str, float]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def lr_lambda(cfg: EngineConfig):
    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        if cfg.lr_schedule == "linear":
            return max(0.0, 1.0 - progress)
        if cfg.lr_schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return f


def make_optimizer(module: torch.nn.Module, lr: float, cfg: EngineConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters, fused where possible.

    The fused kernel (CPU and CUDA) updates each parameter in one pass: on a 42M-parameter model on CPU
    it steps 6x faster than the default multi-tensor version and its peak memory is ~160 MiB lower,
    because it allocates no temporaries the size of the model. FSDP2's sharded (DTensor) parameters
    keep the default implementation.
    """
    params = [p for p in module.parameters() if p.requires_grad]
    fused = not getattr(cfg, "fsdp", False) and all(p.is_floating_point() for p in params)
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay, fused=fused or None)
    except (RuntimeError, ValueError):  # a device or dtype without the fused kernel
        return torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)


def split(batch: Batch, index: torch.Tensor, parts: int) -> list[Batch]:
    """Rows `index` of `batch` cut into `parts` nearly equal pieces (empty pieces dropped)."""
    return [{k: v[i] for k, v in batch.items()} for i in index.tensor_split(parts) if len(i)]


class GracefulInterrupt:
    """First Ctrl-C (or SIGTERM, what SLURM and Kubernetes send before they kill a job) asks the loop to
    stop after the current step and checkpoint; a second signal is immediate. An exception (not a second
    signal) calls `on_error(exception)` on its way out, to save what can be."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, on_error=None):
        self.requested = self.aborted = False
        self.on_error = on_error
        self.previous: dict = {}

    def __enter__(self):
        self.pid = os.getpid()
        for sig in self.SIGNALS:
            try:
                self.previous[sig] = signal.getsignal(sig)
                signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                self.previous.pop(sig, None)
        return self

    def _handle(self, signum, frame):
        if os.getpid() != self.pid:  # a forked child (a reward's worker process): its own default
            signal.signal(signum, self.previous.get(signum) or signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        if self.requested:
            self.aborted = True
            raise KeyboardInterrupt
        self.requested = True
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        print(f"\n{name}: finishing this step and writing a checkpoint ({name} again to abort)", flush=True)

    def __exit__(self, exc_type, exc, tb):
        # The save after an error runs with these handlers still in place: a first signal there waits
        # for it (a default handler would cut it short and lose the state it saves). A KeyboardInterrupt
        # that is not the second signal's abort (one raised in a reward function or its worker) saves too.
        foreign = exc_type is not None and issubclass(exc_type, KeyboardInterrupt) and not self.aborted
        if exc_type is not None and (issubclass(exc_type, Exception) or foreign) and self.on_error:
            try:
                self.on_error(exc)
            except Exception as err:  # the original error matters more than this one
                print(f"could not save a checkpoint after the error: {err!r}", file=sys.stderr)
        for sig, previous in self.previous.items():
            if previous is not None:  # None: set from C, not restorable
                signal.signal(sig, previous)
        return False


def fit(stage: Stage, cfg: EngineConfig, d: Dist, resume_from=None) -> dict:
    """Run `cfg.steps` steps of `stage`. Returns {'step', 'interrupted', 'checkpoint'}."""
    groups = stage.param_groups()
    optimizers = [make_optimizer(module, lr, cfg) for _, module, lr in groups]
    schedulers = [torch.optim.lr_scheduler.LambdaLR(o, lr_lambda(cfg)) for o in optimizers]
    start = 0
    if resume_from is not None:
        state = checkpoint.load_state(resume_from)
        try:
            for (_, module, _), o, s in zip(groups, optimizers, state["optimizers"], strict=True):
                load_optimizer_state(module, o, s)  # saved by name, unsharded: any world size, FSDP or not
            for sc, s in zip(schedulers, state["schedulers"], strict=True):
                sc.load_state_dict(s)
                # The saved rate is the old run's schedule; --steps (or the warm-up or schedule) may be
                # new: the next step takes its rate from this run's schedule, as if it had run throughout.
                for group, base, f in zip(sc.optimizer.param_groups, sc.base_lrs, sc.lr_lambdas, strict=True):
                    group["lr"] = base * f(sc.last_epoch)
            stage.load_state_dict(state["stage"])
            checkpoint.set_rng_state(state["rng"])
            start = state["step"]
        except (KeyError, ValueError, TypeError) as err:  # another command, algorithm or LoRA setting
            raise CheckpointError(
                f"{resume_from}: its trainer state does not fit this run ({type(err).__name__}: {err}); "
                "resume with the options the run was started with"
            ) from None

    # What a checkpoint of the last finished step holds, taken before this step changes any of it. An
    # error before this step's first optimiser update (a reward function or judge that raises, an OOM)
    # leaves the weights and optimiser as that step left them: save them, so --resume loses nothing. One
    # process only: a failed rank cannot join the others in a collective save.
    safe: dict = {"step": start, "saved": start}

    def save(step: int, rng: dict | None = None, stage_state: dict | None = None):
        safe["saved"] = step
        full = {name: saveable(m) for name, m, _ in groups}  # collective under FSDP: gathers shards
        state = {
            "optimizers": [optimizer_state(m, o) for (_, m, _), o in zip(groups, optimizers, strict=True)],
            "schedulers": [s.state_dict() for s in schedulers],
            "rng": rng if rng is not None else checkpoint.rng_state(),
            "stage": stage_state if stage_state is not None else stage.state_dict(),
            "world_size": d.world_size,
        }
        path = None
        if d.is_main:
            models = {}
            for name, m in full.items():  # a LoRA policy: merged model + adapter/
                models.update(lora_for_saving(m) if name == "policy" and is_lora(m) else {name: m})
            path = checkpoint.save_checkpoint(
                cfg.output_dir, step, models, stage.tokenizer, state, cfg.keep_checkpoints
            )
        d.barrier()
        return path

    logger = MetricsLogger(cfg.output_dir, cfg.steps, start, enabled=d.is_main, progress=cfg.progress)
    modules = [m for _, m, _ in groups]
    amp = functools.partial(autocast, d.device, cfg.mixed_precision)  # bf16 forwards, fp32 master weights
    step, last_saved, interrupted = start, None, False

    def save_on_error(err: Exception):
        # One process, or an error that every process meets at the same point (the gradient norm is
        # global): the save is collective. Any other error may be one rank's alone, which cannot save.
        together = isinstance(err, TrainingError)
        if safe["step"] in (None, safe["saved"]) or (d.world_size > 1 and not together):
            return
        if "metrics" in safe:  # the evaluation failed: the step itself finished, log it as finished
            logger.log(safe["step"], safe.pop("metrics"))
        path = save(safe["step"], safe["rng"], safe["stage"])
        if d.is_main:
            step_, where = safe["step"], "step" if safe["step"] < step else "the evaluation after step"
            print(f"error in {where} {step}: the state after step {step_} is saved at {path}; fix the "
                  "cause and pass --resume to continue from it", file=sys.stderr)  # fmt: skip

    with GracefulInterrupt(save_on_error) as interrupt:
        for step in range(start + 1, cfg.steps + 1):
            t_step = time.perf_counter()
            safe.update(step=step - 1, rng=checkpoint.rng_state(), stage=copy.deepcopy(stage.state_dict()))
            with amp():  # rollouts and old log-probs at the precision the update will see
                batch, metrics = stage.collect(step - 1)
            t_update = time.perf_counter()
            sums: dict[str, float] = {}
            n_updates = 0
            n = next(iter(batch.values())).shape[0]
            order_gen = torch.Generator().manual_seed(cfg.seed * 100_003 + step)
            for epoch in range(stage.updates_per_batch):
                index = torch.arange(n) if epoch == 0 else torch.randperm(n, generator=order_gen)
                minibatches = split(batch, index, stage.minibatches)
                for mb in minibatches:
                    normalizer = {
                        "tokens": d.reduce_sum(mb["mask"].sum().double()).clamp(min=1),
                        "seqs": d.reduce_sum(torch.tensor(float(mb["mask"].shape[0]), dtype=torch.double)),
                        # which optimiser update of the step this is (0: the policy that sampled), of how many
                        "update": n_updates,
                        "updates": stage.updates_per_batch * len(minibatches),
                    }
                    micros = split(
                        mb, torch.arange(len(mb["mask"])), -(-len(mb["mask"]) // cfg.micro_batch_size)
                    )
                    for i, micro in enumerate(micros):
                        last = i == len(micros) - 1
                        with no_sync_all(modules, skip=not last):
                            t_forward = time.perf_counter()
                            with amp():
                                loss, m = stage.loss(micro, normalizer)
                            took = time.perf_counter() - t_forward
                            if d.device.type == "cpu" and took >= host_memory.MIN_FORWARD_SECONDS:
                                host_memory.release_free_heap()  # the forward's freed memory, to the OS
                            # DDP averages gradients over processes, but the loss is already divided
                            # by the global count: scale back so the gradient is the global sum.
                            (loss * d.world_size).backward()
                        for k, v in m.items():
                            sums[k] = sums.get(k, 0.0) + float(v)
                    norms = {}  # every group's norm first: none steps if one is not finite
                    for name, module, _ in groups:
                        if cfg.max_grad_norm > 0:
                            gn = torch.nn.utils.clip_grad_norm_(module.parameters(), cfg.max_grad_norm)
                        else:
                            gn = _grad_norm(module)
                        norms["grad_norm" if name == "policy" else f"grad_norm_{name}"] = as_float(gn)
                    if bad := [f"{k} {v}" for k, v in norms.items() if not math.isfinite(v)]:
                        finite_loss = d.all_true(math.isfinite(sums.get("loss", math.nan)))  # every share
                        raise TrainingError(  # stepping would make every weight NaN
                            f"step {step}: {', '.join(bad)}; this update was not applied"
                            + ("" if safe["step"] is not None else " (earlier updates of this step were)")
                            + (
                                f". The loss was finite ({sums['loss']:.4g}): the model's backward pass "
                                "gave the non-finite gradients. Lower --lr, or try float32 if the run is "
                                "in bf16/fp16"
                                if finite_loss
                                else ". Look for non-finite rewards or log-probs, or lower --lr"
                            )
                        )
                    for (key, v), opt in zip(norms.items(), optimizers, strict=True):
                        sums[key] = sums.get(key, 0.0) + v
                        opt.step()
                        safe["step"] = None  # weights changed: mid-step until the step ends
                        opt.zero_grad(set_to_none=True)
                    n_updates += 1
            metrics["lr"] = optimizers[0].param_groups[0]["lr"]  # the rate this step used
            for s in schedulers:
                s.step()
            # Loss metrics are per-process shares of the global value: one all-reduce sums them all.
            # Gradient norms are already global (clipping reduces them).
            keys = sorted(k for k in sums if not k.startswith("grad_norm"))
            totals = d.reduce_sum(torch.tensor([sums[k] for k in keys], dtype=torch.double)).tolist()
            metrics.update({k: v / n_updates for k, v in zip(keys, totals, strict=True)})
            metrics.update({k: v / n_updates for k, v in sums.items() if k.startswith("grad_norm")})
            metrics["backward_seconds"] = time.perf_counter() - t_update
            metrics["step_seconds"] = time.perf_counter() - t_step
            if "completion_tokens" in metrics:
                metrics["tokens_per_second"] = metrics["completion_tokens"] / metrics["step_seconds"]
            every = getattr(cfg, "eval_every", 0)
            if step == cfg.steps or (every and step % every == 0):
                # The step is finished: an error in the evaluation (a judge that went away) saves it,
                # with its training metrics logged (`save_on_error`)
                state = copy.deepcopy(stage.state_dict())
                safe.update(step=step, rng=checkpoint.rng_state(), stage=state, metrics=dict(metrics))
                metrics.update(stage.evaluate())
                safe.pop("metrics")
            logger.log(step, metrics)
            # A Ctrl-C may reach some processes only (or a step apart): all stop when any one asked.
            if not d.all_true(not interrupt.requested):
                interrupted = True
                break
            if cfg.save_every and step % cfg.save_every == 0 and step != cfg.steps:
                last_saved = save(step)
        logger.close()
        # The final save, inside the handlers too: a Ctrl-C or SIGTERM during it waits for it.
        if step > start or resume_from is None or interrupted:
            last_saved = save(step)
    return {"step": step, "interrupted": interrupted, "checkpoint": last_saved}


def no_sync_all(modules, skip: bool):
    """Enter `no_sync` of every DDP-wrapped module at once."""
    import contextlib

    stack = contextlib.ExitStack()
    for m in modules:
        stack.enter_context(no_sync(m, skip))
    return stack


def _grad_norm(module) -> torch.Tensor:
    norms = [p.grad.detach().norm() for p in module.parameters() if p.grad is not None]
    return torch.stack(norms).norm() if norms else torch.tensor(0.0)
