"""Statistics of masked ``[B, T]`` tensors, global over processes: sums, means, variances, whitening.

Pure tensor maths, imports torch only (the estimators in `algorithms.py` build on it). ``reduce_sum`` is
an optional callable that sums a tensor over all processes (``None`` = one process). Statistics are taken
in float64 (`wide`), so tied values give deviations of ~1e-16, not one float32 ulp.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

ReduceSum = Callable[[torch.Tensor], torch.Tensor]


def _sum_all(t: torch.Tensor, reduce_sum: ReduceSum | None) -> torch.Tensor:
    return t if reduce_sum is None else reduce_sum(t)


def wide(t: torch.Tensor) -> torch.Tensor:
    """float64 for statistics (float32 on MPS, which has none). Tied values then give deviations of
    ~1e-16 instead of one float32 ulp, which a std of 0 + eps would turn into advantages of order 1."""
    return t.to(torch.float32 if t.device.type == "mps" else torch.float64)


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of ``x`` where ``mask`` is 1: ``[B, T]`` -> scalar, or ``[B]`` with dim=1."""
    x = x * mask
    return x.sum() if dim is None else x.sum(dim)


def masked_mean(
    x: torch.Tensor, mask: torch.Tensor, dim: int | None = None, reduce_sum: ReduceSum | None = None
) -> torch.Tensor:
    """Mean of ``x`` over valid positions, ``[B, T]`` -> scalar, global over processes via ``reduce_sum``.

    With ``dim`` the mean is local along that axis (``[B, T]`` -> ``[B]`` for dim=1), a row with no valid
    position gets 0, not NaN, and ``reduce_sum`` is ignored (rows never span processes).
    """
    if dim is not None:
        return masked_sum(x, mask, dim) / mask.sum(dim).clamp(min=1)
    return _mean_var(x, mask, reduce_sum, with_var=False)[0].to(x.dtype)


def _mean_var(
    x: torch.Tensor,
    mask: torch.Tensor,
    reduce_sum: ReduceSum | None,
    with_var: bool = True,
    unbiased: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Global mean and variance: one all-reduce of (sum, count), one of the squared deviations from the
    global mean (two passes are numerically safer than a sum of squares). In float64 (`_wide`)."""
    x, mask = wide(x), wide(mask)
    total, count = _sum_all(torch.stack([masked_sum(x, mask), mask.sum().to(x.dtype)]), reduce_sum)
    mean = total / count.clamp(min=1)
    if not with_var:
        return mean, None
    ssd = _sum_all(masked_sum((x - mean) ** 2, mask), reduce_sum)
    return mean, ssd / ((count - 1).clamp(min=1) if unbiased else count.clamp(min=1))


def masked_var(
    x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True, reduce_sum: ReduceSum | None = None
) -> torch.Tensor:
    """Variance of ``x`` over all valid positions, ``[B, T]`` -> scalar, global via ``reduce_sum``.

    ``unbiased`` divides by n - 1 (Bessel's correction), else by n; with n <= 1 the result is 0.
    """
    return _mean_var(x, mask, reduce_sum, unbiased=unbiased)[1].to(x.dtype)


def masked_whiten(
    x: torch.Tensor,
    mask: torch.Tensor,
    shift_mean: bool = True,
    eps: float = 1e-8,
    reduce_sum: ReduceSum | None = None,
) -> torch.Tensor:
    """``(x - mean) / sqrt(var + eps)`` over all valid positions, ``[B, T]`` -> ``[B, T]``, 0 where masked.

    Bessel-corrected variance; statistics global over processes through ``reduce_sum``. With
    ``shift_mean=False`` the mean is added back (only the scale is normalised).
    """
    mean, var = _mean_var(x, mask, reduce_sum)
    out = (wide(x) - mean) * torch.rsqrt(var + eps)
    return ((out if shift_mean else out + mean) * mask).to(x.dtype)
