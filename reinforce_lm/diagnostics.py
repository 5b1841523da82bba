"""Measurements of an estimator, shared by `bench/compare.py` and the tests: gradient variance.

The variance of a policy-gradient estimator is what a baseline is for (Williams 1992; Greensmith et al.
2004), so it is measured directly: at FIXED parameters, many independent gradient estimates, each from
fresh rollouts (a new step index gives new prompts and new seeded samples), exactly as the loop computes
them (same normaliser, same micro-batches, before clipping), and their spread around their mean.
"""

from __future__ import annotations

import torch

from reinforce_lm.trainer import split


def policy_gradient(stage, step: int, micro_batch_size: int, d) -> torch.Tensor:
    """One estimate of the policy's gradient: `stage.collect(step)`, then the loss summed over the batch
    as one minibatch, backward. Returns the flat float64 gradient [D]; every `.grad` is cleared after."""
    batch, _ = stage.collect(step)
    n = batch["mask"].shape[0]
    normalizer = {  # as the loop builds it
        "tokens": d.reduce_sum(batch["mask"].sum().double()).clamp(min=1),
        "seqs": d.reduce_sum(torch.tensor(float(n), dtype=torch.double)),
    }
    for micro in split(batch, torch.arange(n), -(-n // micro_batch_size)):
        loss, _ = stage.loss(micro, normalizer)
        (loss * d.world_size).backward()
    groups = stage.param_groups()
    policy = next(m for name, m, _ in groups if name == "policy")
    params = [p for p in policy.parameters() if p.requires_grad]
    g = torch.cat(
        [(p.grad if p.grad is not None else torch.zeros_like(p)).flatten().double() for p in params]
    )
    for _, module, _ in groups:
        module.zero_grad(set_to_none=True)
    return g


def gradient_variance(
    stage, n_estimates: int = 32, micro_batch_size: int = 64, d=None, first_step: int = 0, warmup: int = 0
) -> dict[str, float]:
    """Spread of `n_estimates` independent policy-gradient estimates at the stage's current parameters.

    Returns ``variance`` = E||g - E g||^2 (Bessel-corrected), ``mean_sq_norm`` = ||E g||^2 estimated
    without the bias of the sample mean (the mean of pairwise dot products g_i . g_j, i != j; plain
    ||mean||^2 overstates it by variance / n), and ``relative_variance`` = their ratio: scale-free, so
    estimators that rescale advantages (GRPO, REINFORCE++, PPO's whitening) compare fairly. Only sums are
    kept, so memory is O(D). `warmup` collections first let stateful baselines (running_mean) settle;
    no optimiser step is ever taken.
    """
    if n_estimates < 2:
        raise ValueError("gradient_variance needs n_estimates >= 2")
    if d is None:
        from reinforce_lm.distributed import Dist

        d = Dist()
    for i in range(warmup):
        stage.collect(first_step + i)
    total, total_sq = None, None  # on the parameters' device
    for i in range(n_estimates):
        g = policy_gradient(stage, first_step + warmup + i, micro_batch_size, d)
        total = g if total is None else total + g
        total_sq = g.square().sum() if total_sq is None else total_sq + g.square().sum()
    n = n_estimates
    variance = (total_sq - total.square().sum() / n) / (n - 1)
    mean_sq = (total.square().sum() - total_sq) / (n * (n - 1))
    return {
        "variance": variance.item(),
        "mean_sq_norm": mean_sq.item(),
        "relative_variance": (variance / mean_sq).item() if mean_sq > 0 else float("inf"),
    }
