"""Token draws, pure tensor maths: counter-based uniforms (so a run samples the same completions on 1
or N processes), inverse-transform sampling with each draw's log-prob, top-k/top-p filtering.

`rollout.Sampler` draws every sampled token with these; they take logits and seeds, not models.
"""

from __future__ import annotations

import torch

_M1 = 0xBF58476D1CE4E5B9 - (1 << 64)
_M2 = 0x94D049BB133111EB - (1 << 64)
_GOLD = 0x9E3779B97F4A7C15 - (1 << 64)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """splitmix64 finaliser on int64 tensors (logical shifts emulated with masks)."""
    x = x ^ ((x >> 30) & ((1 << 34) - 1))
    x = x * _M1
    x = x ^ ((x >> 27) & ((1 << 37) - 1))
    x = x * _M2
    return x ^ ((x >> 31) & ((1 << 33) - 1))


def row_seeds(seed: int, step: int, group_ids: torch.Tensor, k: int) -> torch.Tensor:
    """One int64 seed per completion from (seed, step, prompt id, sample index): [P] -> [P*K]."""
    g = group_ids.long().repeat_interleave(k)
    j = torch.arange(k, dtype=torch.long).repeat(len(group_ids))
    base = _mix(torch.tensor(seed, dtype=torch.long) + torch.tensor(step, dtype=torch.long) * _GOLD)
    return _mix(_mix(base + g * _GOLD) + j)


def _uniforms(seeds: torch.Tensor, t: int, n: int) -> torch.Tensor:
    """Counter-based uniforms in (0, 1), one per completion and position t..t+n-1: [B] seeds -> [B, n]
    float64 (53 random bits each)."""
    steps = torch.arange(t, t + n, dtype=torch.long, device=seeds.device) * _GOLD  # [n]
    x = (_mix(_mix(seeds.unsqueeze(1) + steps)) >> 11) & ((1 << 53) - 1)  # [B, n]
    return (x.double() + 0.5) / float(1 << 53)


_FEW = 1 << 14  # logits per step below which `_draw` takes fewer ops rather than fewer passes


def _draw(logits: torch.Tensor, u: torch.Tensor, scratch=None) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row from softmax(logits) by inverse transform sampling, and its log-prob:
    [n, V], [n] -> tokens [n] long, log-probs [n] float32.

    Token i is drawn when u falls in its slice of the cumulative distribution (accumulated in float64),
    so a row needs one uniform, not one per vocabulary entry as Gumbel-max does: on a 152k vocabulary
    the per-token noise was ~20 int64 passes over [n, V], most of a small model's sampling time.
    Tokens with probability 0 (filtered to -inf) are never drawn: their slice is empty.

    Large logits: the slices are exp(logits - max), unnormalised (u scales with their sum), and the same
    sum gives the log-prob, two passes over [n, V] where softmax, cumsum and log_softmax took five; and
    `scratch(name, shape, dtype)` may hand out the two work tensors, reused across decode steps (fresh
    ones cost page faults whenever glibc serves them by mmap: 1.0 or 1.45 s of sampling per step on
    the 152k benchmark model, by the run, now 0.85 s). Below _FEW values per-op overhead, not passes,
    sets the time, and the three plain ops are 2-9% faster on the tiny benchmark model.
    """
    n, V = logits.shape
    if n * V <= _FEW:  # per-op overhead, not passes, sets the time here: the fewest ops
        cdf = logits.softmax(-1).cumsum(-1, dtype=torch.float64)  # [n, V]
        tok = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1), right=True).squeeze(1).clamp_(max=V - 1)
        return tok, logits.log_softmax(-1).gather(1, tok[:, None]).squeeze(1)
    new = scratch or (lambda name, shape, dtype: torch.empty(shape, dtype=dtype, device=logits.device))
    top = logits.amax(-1, keepdim=True)  # [n, 1]
    w = torch.sub(logits, top, out=new("w", (n, V), torch.float32)).exp_()  # [n, V]
    # Upcast into the float64 work tensor, then accumulate in place: `cumsum(w, dtype=float64)` would
    # allocate a float64 copy of w on every call (18.5 MB a token at 16 x 152k), and those copies, freed
    # between calls of other sizes, grew the C heap by ~200 MB over one rollout.
    cdf = new("cdf", (n, V), torch.float64).copy_(w).cumsum_(-1)  # [n, V]
    total = cdf[:, -1]  # [n]
    v = (u * total).unsqueeze(1)  # [n, 1], strictly below the total
    tok = torch.searchsorted(cdf, v, right=True).squeeze(1).clamp_(max=V - 1)
    logp = (logits.gather(1, tok[:, None]).squeeze(1) - top.squeeze(1)).double() - total.log()
    return tok, logp.float()


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Top-k then nucleus (top-p) filtering: [B, V] -> [B, V] with removed tokens at -inf."""
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, idx = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # keep the token that crosses p
        logits = logits.masked_fill(drop.scatter(-1, idx, drop), float("-inf"))
    return logits
