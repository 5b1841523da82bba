"""Pure tensor maths of REINFORCE-family fine-tuning: advantages, KL, losses, GAE, whitening.

Tensors in, tensors out; imports torch and `masked.py` (its masked statistics) only. Shapes: ``B``
sequences, ``T`` response tokens; per-token tensors are ``[B, T]`` with a float ``mask`` (1 = response
token). ``reduce_sum`` is an optional callable that sums a tensor over all processes (``None`` = one
process); it is passed in so this module never touches ``torch.distributed``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Masked statistics live in masked.py; the estimators below use them, and callers find them here too.
from reinforce_lm.masked import ReduceSum, masked_mean, masked_sum, masked_whiten, wide
from reinforce_lm.masked import masked_var as masked_var

ESTIMATORS = ("none", "batch_mean", "running_mean", "rloo", "grpo", "dr_grpo", "remax",
              "reinforce_pp", "reinforce_pp_baseline")  # fmt: skip
KL_ESTIMATORS = ("k1", "k2", "k3")
LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
_GROUP_ESTIMATORS = ("rloo", "grpo", "dr_grpo", "reinforce_pp_baseline")


def _check(name: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ValueError(f"unknown {name} {value!r}; valid: {', '.join(valid)}")


class RunningMean:
    """Exponential moving average of earlier batches' mean reward, the ``running_mean`` baseline."""

    def __init__(self, decay: float = 0.9):
        self.decay = decay
        self.value: float | None = None

    def baseline(self) -> float:
        """The current baseline; 0.0 before the first batch."""
        return 0.0 if self.value is None else self.value

    def update(self, batch_mean: float) -> None:
        """Fold in one batch's mean reward: ``value = decay * value + (1 - decay) * batch_mean``."""
        batch_mean = float(batch_mean)
        self.value = (
            batch_mean if self.value is None else self.decay * self.value + (1 - self.decay) * batch_mean
        )

    def state_dict(self) -> dict:
        """The state to checkpoint: ``{"decay", "value"}``."""
        return {"decay": self.decay, "value": self.value}

    def load_state_dict(self, d: dict) -> None:
        """Restore from ``state_dict()`` (exact resume)."""
        self.decay = float(d["decay"])
        self.value = None if d["value"] is None else float(d["value"])


def place_at_last_token(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Put ``values[B]`` at each row's last valid token -> ``[B, T]``; a row with no valid token gets 0."""
    B, T = mask.shape
    positions = torch.arange(T, device=mask.device).expand(B, T)  # [B, T]
    last = torch.where(mask > 0, positions, -1).max(dim=1).values  # [B]
    has_token = (last >= 0).to(values.dtype)
    out = torch.zeros(B, T, dtype=values.dtype, device=values.device)
    return out.scatter_(1, last.clamp(min=0).unsqueeze(1), (values * has_token).unsqueeze(1))  # [B, T]


def discounted_returns(token_rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """Reward-to-go ``G_t = sum_{s >= t, valid} gamma^(s - t) r_s``, ``[B, T]`` -> ``[B, T]``.

    Sutton & Barto 2018, eq. 3.8. The exponent counts positions, so an interior masked position costs
    one discount step but adds no reward. Zero where masked. Loops over T only.
    """
    rewards = token_rewards * mask
    out = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])  # [B]
    for t in reversed(range(rewards.shape[1])):
        running = rewards[:, t] + gamma * running
        out[:, t] = running
    return out * mask


def _group_stats(r: torch.Tensor, group_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample group size n, group sum and group sum of squared deviations, all ``[B]``, by scatter."""
    _, inverse = torch.unique(group_ids, return_inverse=True)  # [B], ids need not be contiguous
    num_groups = int(inverse.max()) + 1
    zeros = torch.zeros(num_groups, dtype=r.dtype, device=r.device)  # [P]
    n = zeros.scatter_add(0, inverse, torch.ones_like(r))[inverse]  # [B]
    total = zeros.scatter_add(0, inverse, r)[inverse]  # [B]
    ssd = zeros.scatter_add(0, inverse, (r - total / n) ** 2)[inverse]  # [B]
    return n, total, ssd


def compute_advantages(
    estimator: str,
    *,
    rewards: torch.Tensor,
    mask: torch.Tensor,
    group_ids: torch.Tensor | None = None,
    baseline_rewards: torch.Tensor | None = None,
    gamma: float = 1.0,
    token_rewards: torch.Tensor | None = None,
    penalty: torch.Tensor | None = None,
    running_mean: RunningMean | None = None,
    eps: float = 1e-6,
    reduce_sum: ReduceSum | None = None,
) -> torch.Tensor:
    """Detached advantages ``[B, T]`` from scores ``rewards[B]``, zero where ``mask[B, T]`` is 0.

    With r the score, g the group (prompt) of a sample and n its size, the baseline b is:
    ``none`` 0 (Williams 1992); ``batch_mean`` the mean of r over the whole batch (all processes);
    ``running_mean`` ``running_mean.baseline()``, then the state is updated with this batch's global mean,
    so the batch never enters its own baseline; ``rloo`` the mean of the other n - 1 samples of g (Kool et
    al. 2019; Ahmadian et al. 2024); ``grpo`` mean_g, and A is divided by std_g + eps (Shao et al.
    2024, sec. 4.1.2); ``dr_grpo`` mean_g, no division (Liu et al. 2025); ``remax`` ``baseline_rewards``,
    the greedy completion's score (Li et al. 2023); ``reinforce_pp`` 0, then token returns are whitened
    over the batch (Hu 2025); ``reinforce_pp_baseline`` mean_g, then whitened the same way.

    Credit: without ``token_rewards`` A = r - b on every valid token (``gamma`` unused). With
    ``token_rewards[B, T]`` (e.g. a per-token KL penalty), or always for ``reinforce_pp*``, A_t = G_t - b
    with G_t the discounted returns of token_rewards plus r at the last valid token; b is not discounted,
    so it stays independent of the sample (a baseline times gamma^(tokens left) would not be). ``grpo`` and
    ``dr_grpo`` first replace r by the normalised score (r - mean_g) / (std_g + eps) (resp. r - mean_g),
    the reward of Shao et al., and then b = 0: std_g scales the score, never the token rewards.
    ``penalty[B]`` (e.g. -beta times a sequence's KL) is added to r: before the baseline, or for ``grpo``
    and ``dr_grpo`` after the normalisation, so that it is not divided by std_g either.

    Choices where implementations disagree:
    - group of one: no baseline (mean 0, std 1) for every group estimator. Its own reward as baseline
      would give A = 0 and 0/0 std, silently discarding the sample; RLOO has no "other" samples.
    - std: Bessel-corrected (``torch.std``, as TRL and verl do); eps is added to the std,
      not under the sqrt. Statistics in float64, so a tied group or batch gives 0, not one float32
      ulp / eps (up to ~0.8 for scores near 100).
    - whitening (reinforce_pp*): over valid tokens, not sequences, as in OpenRLHF; var + 1e-8 in the
      sqrt. Longer responses weigh more in the statistics, which matches a token-mean loss.
    - padded positions never enter any statistic and are 0 in the output; group statistics never
      cross processes (groups stay on one rank), batch statistics always do, via ``reduce_sum``.
    """
    _check("estimator", estimator, ESTIMATORS)
    out_dtype = rewards.dtype if rewards.is_floating_point() else torch.get_default_dtype()
    r = wide(rewards.detach())  # [B]
    mask = wide(mask.detach())  # [B, T]
    scale = torch.ones_like(r)  # [B]
    normalised = estimator in ("grpo", "dr_grpo")
    penalty = None if penalty is None else wide(penalty.detach())  # [B]
    if penalty is not None and not normalised:
        r = r + penalty

    if estimator in _GROUP_ESTIMATORS:
        if group_ids is None:
            raise ValueError(f"estimator {estimator!r} needs group_ids[B]")
        n, total, ssd = _group_stats(r, group_ids)
        single = n < 2
        if estimator == "rloo":
            baseline = torch.where(single, 0.0, (total - r) / (n - 1).clamp(min=1))
        else:
            baseline = torch.where(single, 0.0, total / n)
        if estimator == "grpo":
            std = torch.where(single, 1.0, (ssd / (n - 1).clamp(min=1)).sqrt())
            scale = 1.0 / (std + eps)
    elif estimator == "batch_mean":
        baseline = masked_mean(r, torch.ones_like(r), reduce_sum=reduce_sum).expand_as(r)
    elif estimator == "running_mean":
        if running_mean is None:
            raise ValueError("estimator 'running_mean' needs a RunningMean state object")
        baseline = torch.full_like(r, running_mean.baseline())
        running_mean.update(float(masked_mean(r, torch.ones_like(r), reduce_sum=reduce_sum)))
    elif estimator == "remax":
        if baseline_rewards is None:
            raise ValueError("estimator 'remax' needs baseline_rewards[B] (the greedy completions' scores)")
        baseline = wide(baseline_rewards.detach())
    else:  # none, reinforce_pp
        baseline = torch.zeros_like(r)

    if normalised:
        # The papers' normalised score r~ = (r - mean_g) / std_g is the reward: token returns are built
        # from it, so a KL penalty or discounting is never divided by std_g (a tied group has std_g = 0,
        # and that would multiply them by 1 / eps).
        r, baseline, scale = (r - baseline) * scale, torch.zeros_like(r), torch.ones_like(r)
        r = r if penalty is None else r + penalty
    if token_rewards is not None or estimator.startswith("reinforce_pp"):
        per_token = place_at_last_token(r, mask)  # [B, T]
        if token_rewards is not None:
            per_token = per_token + wide(token_rewards.detach())
        adv = discounted_returns(per_token, mask, gamma) - baseline.unsqueeze(1)  # [B, T]
    else:
        adv = (r - baseline).unsqueeze(1).expand_as(mask)  # [B, T]
    adv = adv * scale.unsqueeze(1)
    if estimator.startswith("reinforce_pp"):
        adv = masked_whiten(adv, mask, reduce_sum=reduce_sum)
    return (adv * mask).to(out_dtype).detach()


# k3 is exact while it is at most 10 (pi/ref >= 0.0735, log-ratio >= -2.6109: e^x - x - 1 = 10). Below,
# it continues along its tangent there: a sampled token the policy has made far less likely than the
# reference keeps a bounded pull back (slope 1 - e^2.6109 = -12.6) instead of none (clamping k3 at 10,
# as verl and OpenRLHF do) or e^|log-ratio| (no bound: one such token then sets the whole update).
_K3_KNEE = -2.610868638149876


def kl_divergence(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token estimate of KL(pi || ref) from samples of pi, ``[B, T]`` -> ``[B, T]`` (Schulman 2020).

    Values: ``k1`` = log(pi/ref) (unbiased, can be negative); ``k2`` = 0.5 log(pi/ref)^2 (biased, low
    variance); ``k3`` = ref/pi - log(ref/pi) - 1 (unbiased, never negative) while it is at most 10, then
    linear in the log-ratio (see _K3_KNEE): bounded gradient, no overflow.

    Gradients, as a loss term on samples of pi (exact enumeration, tests/test_algorithms.py; Tang & Munos
    2025): ``k2`` gives the gradient of KL(pi || ref), ``k3`` that of the reverse direction KL(ref || pi),
    ``k1`` zero in expectation (E_pi[grad log pi] = 0). Per token: each position's KL with its prefix
    held fixed, not the sequence KL, which also moves through the prefix's probability. ``k1`` belongs
    in the reward, detached, where (with the score-function gradient) it gives the gradient of the
    sequence's KL(pi || ref).
    """
    _check("KL estimator", estimator, KL_ESTIMATORS)
    log_ratio = logp - ref_logp
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    inside = log_ratio.clamp(min=_K3_KNEE)  # = log_ratio where k3 <= 10 (and on the whole upper side)
    slope = 1 - torch.exp(-inside)
    return torch.exp(-inside) + inside - 1 + (log_ratio - inside) * slope  # [B, T]


def aggregate_loss(
    loss_mat: torch.Tensor,
    mask: torch.Tensor,
    mode: str,
    normalizer: float | torch.Tensor | None = None,
    max_len: int | None = None,
) -> torch.Tensor:
    """Reduce a per-token loss ``[B, T]`` to a scalar.

    ``token-mean`` (DAPO, Yu et al. 2025 sec. 3.3): sum over valid tokens / normalizer (default: their count).
    ``seq-mean-token-mean`` (GRPO): sum of per-sequence token means / normalizer (default B).
    ``seq-mean-token-sum``: sum of per-sequence sums / normalizer (default B).
    ``seq-mean-token-sum-norm`` (Dr. GRPO, Liu et al. 2025): sum of per-sequence sums /
    (normalizer * max_len), max_len defaulting to T. Pass the GLOBAL token (token-mean) or sequence count
    as ``normalizer`` and the results of micro-batches and processes sum to the full-batch value. A row
    with no valid token adds 0.
    """
    _check("loss aggregation mode", mode, LOSS_AGG_MODES)
    if mode == "token-mean":
        return masked_sum(loss_mat, mask) / (mask.sum().clamp(min=1) if normalizer is None else normalizer)
    if normalizer is None:
        normalizer = mask.shape[0]
    if mode == "seq-mean-token-mean":
        return masked_mean(loss_mat, mask, dim=1).sum() / normalizer
    total = masked_sum(loss_mat, mask, dim=1).sum()
    if mode == "seq-mean-token-sum":
        return total / normalizer
    return total / (normalizer * (mask.shape[1] if max_len is None else max_len))


def policy_gradient_loss(
    logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    mode: str,
    old_logp: torch.Tensor | None = None,
    clip_eps: float | None = None,
    normalizer: float | torch.Tensor | None = None,
    max_len: int | None = None,
) -> torch.Tensor:
    """Policy-gradient loss; ``logp``, ``advantages``, ``mask`` ``[B, T]`` -> scalar aggregated by ``mode``.

    Plain: ``-A * logp`` (REINFORCE, Williams 1992). With ``old_logp``: ``-A * ratio``, ratio =
    exp(logp - old_logp), same gradient at ratio 1; with ``clip_eps`` the PPO clipped surrogate
    ``max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps))`` (Schulman et al. 2017 eq. 7). Advantages and
    old_logp are detached here, whatever the caller passes.
    """
    adv = advantages.detach()
    if old_logp is None:
        if clip_eps is not None:
            raise ValueError("clip_eps needs old_logp (the sampling policy's log-probs)")
        loss_mat = -adv * logp  # [B, T]
    else:
        ratio = torch.exp(logp - old_logp.detach())
        loss_mat = -adv * ratio
        if clip_eps is not None:
            loss_mat = torch.maximum(loss_mat, -adv * ratio.clamp(1 - clip_eps, 1 + clip_eps))
    return aggregate_loss(loss_mat, mask, mode, normalizer=normalizer, max_len=max_len)


@torch.no_grad()
def clip_fraction(
    logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor, clip_eps: float
) -> torch.Tensor:
    """Fraction of valid tokens with ``|ratio - 1| > clip_eps``, ``[B, T]`` -> scalar (a metric)."""
    clipped = ((torch.exp(logp - old_logp) - 1).abs() > clip_eps).to(logp.dtype)
    return masked_mean(clipped, mask.to(logp.dtype))


@torch.no_grad()
def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016 eq. 16), all ``[B, T]``.

    ``delta_t = r_t + gamma V_{t+1} - V_t``, ``A_t = delta_t + gamma lam A_{t+1}``, returns = A + V.
    Rewards and values are masked first, so V beyond the last valid token is 0 (the episode ends there).
    Returns (advantages, returns), detached and zero where masked. Loops over T only.
    """
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])  # [B]
    next_adv = torch.zeros_like(values[:, 0])  # [B]
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_adv = delta + gamma * lam * next_adv
        next_value = values[:, t]
        advantages[:, t] = next_adv
    return advantages * mask, (advantages + values) * mask


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float | None = None,
    mode: str = "token-mean",
    normalizer: float | torch.Tensor | None = None,
    max_len: int | None = None,
) -> torch.Tensor:
    """Value loss ``0.5 max((V - R)^2, (clip(V, V_old - eps, V_old + eps) - R)^2)``, ``[B, T]`` -> scalar.

    The clipped value term of PPO's reference implementation (Schulman et al. 2017; Huang et al. 2022,
    "The 37 implementation details of PPO", detail 9); no clipping when ``clip_eps`` is None.
    """
    returns, old_values = returns.detach(), old_values.detach()
    loss_mat = (values - returns) ** 2  # [B, T]
    if clip_eps is not None:
        clipped = old_values + (values - old_values).clamp(-clip_eps, clip_eps)
        loss_mat = torch.maximum(loss_mat, (clipped - returns) ** 2)
    return aggregate_loss(0.5 * loss_mat, mask, mode, normalizer=normalizer, max_len=max_len)


def bradley_terry_loss(
    chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None
) -> torch.Tensor:
    """Reward-model loss ``mean(-log sigmoid(chosen - rejected - margin))``, ``[N]`` -> scalar.

    Bradley & Terry 1952; Ouyang et al. 2022 eq. 1; the optional margin as in Touvron et al. 2023 (Llama 2)
    eq. 2. ``logsigmoid`` keeps large score gaps finite.
    """
    diff = chosen - rejected
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff).mean()
