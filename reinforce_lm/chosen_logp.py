"""The autograd kernels behind `logprobs`: log softmax(logits / temperature) of chosen tokens in float32
(and the entropy), chunk by chunk, without float32 `[B, T, V]` copies; from given logits (`_ChosenLogp`),
or from a plain linear LM head's inputs, in one piece with the head's matmul in the same node
(`_LinearLogp`) or in chunks whose logits are never kept (`_HeadLogp`). Pure tensor maths: no model, no
I/O; chunk sizes are the caller's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class _ChosenLogp(torch.autograd.Function):
    """log softmax(logits / temperature)[tokens] in float32 (and the entropy, no gradient), a few rows
    of logits at a time.

    Each chunk is upcast before it is divided: bf16 logits divided in bf16 would round every scaled
    logit once more (log-prob errors of ~0.02 at temperature 0.7, where the sampler, which divides in
    float32, sees none). The forward reuses one or two chunk-sized work tensors for the log-normaliser
    and the entropy together, where logsumexp and a separate entropy would allocate three or four fresh
    ones per chunk (temporaries of 18-56 MB a chunk on a 152k vocabulary, which fragment the C heap).
    Saved for backward: the logits themselves and the [B, T] log-normalisers, nothing of size V in
    float32. The backward writes g * (onehot(tokens) - softmax) / temperature chunk by chunk into one
    gradient tensor of the logits' dtype (`_chosen_grad`).
    """

    @staticmethod
    def forward(ctx, logits, tokens, rows: int, temperature: float, entropy: bool):
        # [B, T, V], [B, T] -> log-probs [B, T] float32, entropy [B, T] float32 or None
        logp, ent, lse = _chosen_forward(logits, tokens, rows, temperature, entropy)
        ctx.save_for_backward(logits, tokens, lse)
        ctx.rows, ctx.temperature = rows, temperature
        if entropy:
            ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g, _g_entropy):  # g [B, T] -> [B, T, V]
        logits, tokens, lse = ctx.saved_tensors
        return _chosen_grad(logits, tokens, lse, g, ctx.rows, ctx.temperature, False), *[None] * 4


class _LinearLogp(torch.autograd.Function):
    """`_ChosenLogp` of a plain linear LM head's output, the head's matmul in the same autograd node.

    hidden [B, T, H], weight [V, H], bias [V] or None, tokens [B, T] -> log-probs [B, T] float32 (and
    entropy [B, T] or None, no gradient). The logits are computed as the head would (`F.linear`, under
    the caller's autocast) and kept for backward, where they become their own gradient in place: they
    and their gradient never both exist. The weight's gradient is added straight into `weight.grad`
    when autograd would add it there anyway (`_into_grad`: from the second micro-batch of a step on), so
    no [V, H] temporary sits beside the logits' gradient at the backward's peak (78 MB on a 152k x 128
    head). A second backward through the same graph fails on the saved logits' version check.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, tokens, rows: int, temperature: float, entropy: bool):
        logits = F.linear(hidden, weight, bias)  # [B, T, V]
        logp, ent, lse = _chosen_forward(logits, tokens, rows, temperature, entropy)
        ctx.save_for_backward(hidden, weight, logits, tokens, lse)
        ctx.rows, ctx.temperature = rows, temperature
        ctx.bias_dtype = bias.dtype if bias is not None else None
        if entropy:
            ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g, _g_entropy):  # g [B, T] -> grads of hidden, weight, bias
        hidden, weight, logits, tokens, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        d = _chosen_grad(logits, tokens, lse, g, ctx.rows, ctx.temperature, True).flatten(0, -2)  # [N, V]
        grad_h = (d @ weight.to(d.dtype)).to(hidden.dtype).view(hidden.shape) if need_h else None
        grad_w = None
        if need_w:
            h = hidden.reshape(-1, hidden.shape[-1]).to(d.dtype)  # [N, H], as autocast cast it
            if d.dtype == weight.dtype and _into_grad(weight):
                weight.grad.addmm_(d.T, h)  # what AccumulateGrad would do, without a fresh [V, H] product
            else:
                grad_w = (d.T @ h).to(weight.dtype)
        grad_b = d.sum(0).to(ctx.bias_dtype) if need_b else None
        return grad_h, grad_w, grad_b, None, None, None, None


def _into_grad(param: torch.Tensor) -> bool:
    """Whether a backward may add `param`'s gradient into `param.grad` itself and give autograd None.

    Only where autograd would do just that next (its AccumulateGrad adds `grad += new` in place, after
    the backward allocated `new`): inside a `.backward()` that runs param's accumulation (not
    `torch.autograd.grad`, nor `backward(inputs=...)` without param), onto an existing dense contiguous
    `.grad` of param's dtype (and no graph of its own), with no hook on param (its hooks would see None)
    and no process group (DDP's reducer hooks the accumulation where it cannot be seen from here).
    """
    grad = param.grad
    if grad is None or grad.layout != torch.strided or grad.dtype != param.dtype or grad.requires_grad:
        return False
    hooks = getattr(param, "_backward_hooks", None), getattr(param, "_post_accumulate_grad_hooks", None)
    if not grad.is_contiguous() or any(hooks):
        return False
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return False
    try:  # raises inside torch.autograd.grad; private, so a torch without it just keeps the default
        return bool(torch._C._will_engine_execute_node(torch.autograd.graph.get_gradient_edge(param).node))
    except (RuntimeError, AttributeError):
        return False


def _chosen_forward(logits, tokens, rows: int, temperature: float, entropy: bool):
    """log softmax(logits / temperature)[tokens] chunk by chunk: [B, T, V], [B, T] -> log-probs [B, T]
    float32, entropy [B, T] float32 or None, log-normalisers [B, T] float32 (what the backward needs)."""
    lse = torch.empty(tokens.shape, dtype=torch.float32, device=logits.device)  # [B, T]
    ent = torch.empty_like(lse) if entropy else None
    step = max(1, rows // 16)  # smaller chunks here: one or two work tensors live at once
    work = [_work(logits, step) for _ in range(2 if entropy else 1)]
    for i in range(0, logits.shape[0], step):
        chunk = logits[i : i + step]
        x = _float32_scaled(chunk, temperature, work[0])  # [b, T, V]; `chunk` when nothing changes
        lse[i : i + step], e = _normaliser(x, work, owned=x is not chunk, entropy=entropy)
        if entropy:
            ent[i : i + step] = e
    return logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1).float() / temperature - lse, ent, lse


def _chosen_grad(logits, tokens, lse, g, rows: int, temperature: float, consume: bool):
    """The gradient of `_chosen_forward`'s log-probs: g [B, T] -> g * (onehot(tokens) - softmax) /
    temperature [B, T, V] in the logits' dtype, `rows` rows at a time. With `consume` (the caller holds
    the only reference to the logits, e.g. an LM head's fresh output) it is written over the logits
    themselves: each chunk is read, then overwritten."""
    if consume and logits.is_contiguous():
        grad = logits
    else:
        grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
    in_place = logits.dtype == torch.float32  # float32: computed in the gradient tensor itself
    work = None if in_place else _work(logits, rows)
    for i in range(0, logits.shape[0], rows):
        span = slice(i, i + rows)
        gi = g[span].unsqueeze(-1).float() / temperature  # [b, T, 1]
        out = grad[span] if in_place else work[: len(tokens[span])]
        p = _float32_scaled(logits[span], temperature, out)
        p = torch.sub(p, lse[span].unsqueeze(-1), out=out)  # in place but for float32 at T = 1
        p.exp_().mul_(-gi).scatter_add_(-1, tokens[span].unsqueeze(-1), gi)  # g * (onehot - softmax) / T
        if not in_place:
            grad[span] = p  # cast into the logits' dtype
    return grad


def _normaliser(x: torch.Tensor, work: list, owned: bool, entropy: bool):
    """log sum exp(x) over the last dim, and with `entropy` the entropy of softmax(x) (else None):
    [n, ..., V] float32 -> [n, ...], [n, ...] or None. One pass each, on reused work tensors: x - max is
    written over x when `owned` (x is scratch), else into work[0]; exp(x - max) for the entropy into
    work[1]."""
    n = x.shape[0]
    top = x.amax(-1, keepdim=True)
    top = top.masked_fill(top.isinf(), 0.0)  # rows at +-inf: as torch.logsumexp does
    x = x.sub_(top) if owned else torch.sub(x, top, out=work[0][:n])
    ent = None
    if entropy:  # entropy = log s - sum(e * x) / s with e = exp(x), s = sum(e)
        e = torch.exp(x, out=work[1][:n])
        total = e.sum(-1)
        ent = total.log() - e.mul_(x).sum(-1) / total
    else:
        total = x.exp_().sum(-1)
    return total.log_() + top.squeeze(-1), ent


def _work(logits: torch.Tensor, rows: int) -> torch.Tensor:
    """An empty float32 work tensor for `rows` rows of `logits` [B, T, V]: [min(rows, B), T, V]."""
    return logits.new_empty((min(rows, logits.shape[0]), *logits.shape[1:]), dtype=torch.float32)


def _float32_scaled(chunk: torch.Tensor, temperature: float, out: torch.Tensor) -> torch.Tensor:
    """chunk / temperature in float32, upcast before the division (never divided in bf16): `chunk`
    itself when it is float32 and the temperature 1, else written into `out` (float32, a leading slice
    of it when the chunk has fewer rows)."""
    if chunk.dtype == torch.float32 and temperature == 1.0:
        return chunk
    out = out[: chunk.shape[0]]
    if chunk.dtype == torch.float32:
        return torch.div(chunk, temperature, out=out)
    out.copy_(chunk)
    return out.div_(temperature) if temperature != 1.0 else out


def _add_matmul(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b, the product summed in acc's dtype (float32) also for bf16/fp16 a and b.

    A chunked head adds one weight gradient per chunk: rounded to bf16 before the sum, as a plain
    `(a @ b).float()` would, each of dozens of partial sums loses its low bits, where whole logits round
    once. CUDA (torch >= 2.8) writes the float32 product directly; elsewhere the chunk is upcast.
    """
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
        return
    if acc.device.type == "cuda" and _OUT_DTYPE.get(a.dtype, True):
        try:
            torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
            return
        except (TypeError, RuntimeError):  # a torch without out_dtype for these dtypes: not again
            _OUT_DTYPE[a.dtype] = False
    acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


_OUT_DTYPE: dict = {}  # dtype -> False once torch.addmm(out_dtype=float32) refused it


class _HeadLogp(torch.autograd.Function):
    """log softmax((h @ W.T + b) / temperature)[tokens] for a linear LM head, `rows` tokens at a time.

    hidden [N, H], weight [V, H], bias [V] or None, tokens [N] -> log-probs [N] float32 (and entropy [N]
    or None, no gradient). Saved for backward: the inputs and the [N] log-normalisers, no logits. The
    backward recomputes each chunk's logits and turns them in place into g * (onehot - softmax) /
    temperature, then takes the two matmuls: three float32 passes over a chunk where autograd through a
    checkpointed chunk takes about ten (recompute, log-softmax and gather backward, their sum, casts),
    with its bookkeeping on every chunk. Matmuls run in `dtype` (autocast's, or the weight's); the
    weight gradient is summed over the chunks in float32 (`_add_matmul`), into `weight.grad` itself
    where autograd would add it there next (`_into_grad`).
    """

    @staticmethod
    def _logits(h, w, b, temperature, out):  # [n, H] -> [n, V] float32, written into out [>= n, V]
        if h.dtype == w.dtype == out.dtype:  # float32 matmuls straight into the reused tensor
            lg = out[: h.shape[0]]
            torch.mm(h, w.t(), out=lg) if b is None else torch.addmm(b, h, w.t(), out=lg)
        else:
            lg = out[: h.shape[0]].copy_(F.linear(h, w, b))  # bf16/fp16 product, upcast
        return lg.div_(temperature) if temperature != 1.0 else lg

    @staticmethod
    def forward(ctx, hidden, weight, bias, tokens, temperature: float, rows: int, dtype, entropy: bool):
        w = weight.to(dtype)
        b = bias.to(dtype) if bias is not None else None
        lse = torch.empty(tokens.shape, dtype=torch.float32, device=hidden.device)  # [N]
        chosen = torch.empty_like(lse)
        ent = torch.empty_like(lse) if entropy else None
        # One or two [rows, V] float32 tensors serve every chunk: a fresh one per chunk (64 MB) costs
        # page faults on CPU whenever glibc serves it by mmap.
        shape = (min(rows, hidden.shape[0]), weight.shape[0])
        work = [hidden.new_empty(shape, dtype=torch.float32) for _ in range(2 if entropy else 1)]
        for i in range(0, hidden.shape[0], rows):
            lg = _HeadLogp._logits(hidden[i : i + rows].to(dtype), w, b, temperature, work[0])  # [n, V]
            chosen[i : i + rows] = lg.gather(-1, tokens[i : i + rows, None]).squeeze(-1)
            lse[i : i + rows], e = _normaliser(lg, work, owned=True, entropy=entropy)
            if entropy:
                ent[i : i + rows] = e
        ctx.save_for_backward(hidden, weight, bias, tokens, lse)
        ctx.temperature, ctx.rows, ctx.dtype = temperature, rows, dtype
        if entropy:
            ctx.mark_non_differentiable(ent)
        return chosen - lse, ent

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g, _g_entropy):  # g [N] -> grads of hidden, weight, bias
        hidden, weight, bias, tokens, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        w = weight.to(ctx.dtype)
        b = bias.to(ctx.dtype) if bias is not None else None
        grad_h = torch.empty_like(hidden) if need_h else None
        acc = torch.promote_types(weight.dtype, torch.float32)  # float32 sums for bf16/fp16 weights
        into = need_w and acc == weight.dtype and _into_grad(weight)  # summed in weight.grad itself
        if into:
            grad_w = weight.grad
        else:
            grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if need_b else None
        work = hidden.new_empty((min(ctx.rows, hidden.shape[0]), weight.shape[0]), dtype=torch.float32)
        for i in range(0, hidden.shape[0], ctx.rows):
            h = hidden[i : i + ctx.rows].to(ctx.dtype)
            gi = g[i : i + ctx.rows, None].float() / ctx.temperature  # [n, 1]
            lg = _HeadLogp._logits(h, w, b, ctx.temperature, work)
            lg.sub_(lse[i : i + ctx.rows, None]).exp_().mul_(-gi)  # -g * softmax / temperature
            d = lg.scatter_add_(-1, tokens[i : i + ctx.rows, None], gi).to(ctx.dtype)  # [n, V]
            if need_h:
                grad_h[i : i + ctx.rows] = d @ w
            if need_w:
                _add_matmul(grad_w, d.T, h)
            if need_b:
                grad_b += d.sum(0, dtype=acc)
        grad_w = grad_w.to(weight.dtype) if need_w and not into else None
        grad_b = grad_b.to(bias.dtype) if need_b else None
        return grad_h, grad_w, grad_b, None, None, None, None, None
