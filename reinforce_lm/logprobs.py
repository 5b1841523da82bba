"""Per-token log-probs of chosen tokens (and entropies) from a causal LM, without `[B, T, V]` copies.

`token_logprobs` is what every scoring forward calls (the update, old and reference log-probs, SFT):
the LM head's input is taken by a hook and scored in chunks where the model allows it (`head_logprobs`),
else the model's own logits go through `selective_log_softmax`.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from reinforce_lm.models import forward_kwargs, inner_model

CHUNK_ELEMENTS = 1 << 24  # logits upcast to float32 at once: 64 MiB
# The LM head runs in chunks only for logits of at least this many chunks (256 MiB of float32). Below
# that the head runs in one piece, exactly as the model's forward would, and a plain linear head's
# logits then become their own gradient (`_ChosenLogp`'s `consume`): on CPU one piece is ~1.4x faster
# than chunks, whose backward runs the head's matmul again, for ~16x the memory (bench/head.py).
HEAD_CHUNKS_MIN = 4


def _rows(logits: torch.Tensor, elements: int | None = None) -> int:
    """Rows of `logits` [B, T, V] per chunk so that a chunk holds at most `elements` (default
    CHUNK_ELEMENTS, read at the call) values."""
    elements = CHUNK_ELEMENTS if elements is None else elements
    return max(1, elements // max(1, logits.shape[1] * logits.shape[2]))


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
    gradient tensor of the logits' dtype; with `consume` (the caller holds the only reference to the
    logits, e.g. an LM head's fresh output), that tensor is the logits themselves, overwritten in place,
    so the logits and their gradient never both exist. A second backward through the same graph then
    fails on the saved logits' version check rather than reading overwritten values.
    """

    @staticmethod
    def forward(ctx, logits, tokens, rows: int, temperature: float, entropy: bool, consume: bool):
        # [B, T, V], [B, T] -> log-probs [B, T] float32, entropy [B, T] float32 or None
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
        ctx.save_for_backward(logits, tokens, lse)
        ctx.rows, ctx.temperature, ctx.consume = rows, temperature, consume
        if entropy:
            ctx.mark_non_differentiable(ent)
        return logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1).float() / temperature - lse, ent

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g, _g_entropy):  # g [B, T] -> [B, T, V]
        logits, tokens, lse = ctx.saved_tensors
        if ctx.consume and logits.is_contiguous():
            grad = logits  # read by nothing else: each chunk is read, then overwritten
        else:
            grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
        in_place = logits.dtype == torch.float32  # float32: computed in the gradient tensor itself
        work = None if in_place else _work(logits, ctx.rows)
        for i in range(0, logits.shape[0], ctx.rows):
            rows = slice(i, i + ctx.rows)
            gi = g[rows].unsqueeze(-1).float() / ctx.temperature  # [b, T, 1]
            out = grad[rows] if in_place else work[: len(tokens[rows])]
            p = _float32_scaled(logits[rows], ctx.temperature, out)
            p = torch.sub(p, lse[rows].unsqueeze(-1), out=out)  # in place but for float32 at T = 1
            p.exp_().mul_(-gi).scatter_add_(-1, tokens[rows].unsqueeze(-1), gi)  # g * (onehot - softmax) / T
            if not in_place:
                grad[rows] = p  # cast into the logits' dtype
        return grad, None, None, None, None, None


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


def selective_log_softmax(
    logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0, entropy: bool = False
):
    """log softmax(logits / temperature)[tokens] without a float32 copy of the whole `[B, T, V]` tensor.

    logits [B, T, V] (any dtype), tokens [B, T] -> [B, T] float32; with `entropy`, also the per-token
    entropy of softmax(logits / temperature) [B, T] float32 (no gradient), from the same passes. Rows are
    processed a few at a time (at most CHUNK_ELEMENTS logits per chunk are upcast), forward and backward
    (`_ChosenLogp`).
    """
    return _from_logits(logits, tokens, temperature, entropy)


def _from_logits(logits, tokens, temperature: float, entropy: bool, consume: bool = False):
    """`selective_log_softmax`; with `consume`, the backward may overwrite `logits` with their gradient
    (only for logits that nothing else reads: see `_ChosenLogp`)."""
    logp, ent = _ChosenLogp.apply(logits, tokens, _rows(logits), temperature, entropy, consume)
    return (logp, ent) if entropy else logp


def token_logprobs(
    model, input_ids, attention_mask, n_response: int, temperature: float = 1.0, entropy=False
):
    """Log-probs of the last `n_response` tokens of `input_ids` under `model`: [B, T] float32.

    input_ids/attention_mask [B, L] = left-padded prompt + right-padded response. With `entropy`, also
    returns the per-token entropy [B, T] (no gradient), for metrics.

    Where the model's logits are exactly its LM head's output (checked once per model, see
    `_plain_head`), the head runs here instead, on the hidden states it would have received
    (`head_logprobs`; in chunks once the logits are large, then no `[B, T, V]` tensor exists at once).
    Otherwise the model's own logits are used.
    """
    tokens = input_ids[:, -n_response:]
    head = _plain_head(model, input_ids[:1], attention_mask[:1])
    taken: dict = {}

    def take(module, args):  # forward pre-hook on the head: score here, let the head see one position
        h = args[0]
        if taken or h.dim() != 3 or h.shape[0] != input_ids.shape[0] or h.shape[1] < n_response + 1:
            return None  # a call from inside head_logprobs, or an input not shaped [B, L, H]
        taken["busy"] = True
        taken["out"] = head_logprobs(
            module, h[:, -(n_response + 1) : -1], tokens, temperature, entropy, own_hook=handle.id
        )
        return (h[:, -1:], *args[1:])

    handle = head.register_forward_pre_hook(take) if head is not None else None
    try:
        out = model(input_ids=input_ids, **forward_kwargs(model, attention_mask, keep=n_response + 1))
    finally:
        if handle is not None:
            handle.remove()
    if "out" in taken:
        return taken["out"]
    return _from_logits(out.logits[:, -(n_response + 1) : -1], tokens, temperature, entropy)


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
    weight gradient is summed over the chunks in float32 (`_add_matmul`).
    """

    @staticmethod
    def _logits(h, w, b, temperature, out=None):  # [n, H] -> [n, V] float32, in `out` [>= n, V] if given
        if out is None:
            lg = F.linear(h, w, b).float()
        elif h.dtype == w.dtype == out.dtype:  # float32 matmuls straight into the reused tensor
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
        grad_w = grad_w.to(weight.dtype) if need_w else None
        grad_b = grad_b.to(bias.dtype) if need_b else None
        return grad_h, grad_w, grad_b, None, None, None, None, None


def _linear_head(head, own_hook: int | None = None) -> bool:
    """A plain `nn.Linear` whose forward `_HeadLogp` may stand in for: not a subclass (LoRA, quantised
    layers), no DTensor weight, no patched `forward`, and no hook of any kind on it or on every module
    but `own_hook` (token_logprobs' pre-hook). A hooked head (accelerate's offload, a user's hook) keeps
    the module's forward, in checkpointed chunks."""
    import torch.nn.modules.module as nn_module

    pre = {k: v for k, v in head._forward_pre_hooks.items() if k != own_hook}
    hooks = (head._forward_hooks, head._backward_hooks, getattr(head, "_backward_pre_hooks", {}), pre)
    everywhere = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks")
    return (
        type(head) is torch.nn.Linear
        and type(head.weight) is torch.nn.Parameter
        and "forward" not in vars(head)
        and not any(hooks)
        and not any(getattr(nn_module, name, None) for name in everywhere)
        and getattr(head, "_hf_hook", None) is None
    )


def head_logprobs(head, hidden, tokens, temperature: float = 1.0, entropy=False, own_hook=None):
    """log softmax(head(hidden) / temperature)[tokens], without all of `[B, T, V]` at once.

    hidden [B, T, H] (what the LM head sees at the positions that predict `tokens`), tokens [B, T] ->
    log-probs [B, T] float32 (and entropy [B, T], no gradient). Below HEAD_CHUNKS_MIN x CHUNK_ELEMENTS
    logits the head runs in one piece, exactly as a model forward would. Beyond that it runs on
    CHUNK_ELEMENTS logits' worth of tokens at a time, and with a gradient each chunk is recomputed in the
    backward pass (one more head matmul) instead of kept: with a 152k vocabulary, 8 x 1024 tokens of
    bf16 logits and their gradient are 5 GB; chunked they are ~0.1 GB.
    """
    B, T, H = hidden.shape
    vocab = getattr(head, "out_features", None) or getattr(head, "weight", torch.empty(1, 1)).shape[0]
    per_chunk = max(1, CHUNK_ELEMENTS // vocab)
    if B * T * vocab < HEAD_CHUNKS_MIN * CHUNK_ELEMENTS:  # one piece: the logits are small
        # a plain linear head's output is read by nothing else: its gradient may overwrite it
        consume = _linear_head(head, own_hook) and torch.is_grad_enabled()
        return _from_logits(head(hidden), tokens, temperature, entropy, consume)

    if _linear_head(head, own_hook):  # in one autograd node, the logits never kept (`_HeadLogp`)
        device, dtype = hidden.device.type, head.weight.dtype
        if torch.is_autocast_enabled(device) and dtype in (torch.float32, torch.float16, torch.bfloat16):
            dtype = torch.get_autocast_dtype(device)  # as autocast would cast the head (not float64)
        with torch.autocast(device, enabled=False):
            logp, ent = _HeadLogp.apply(
                hidden.reshape(B * T, H), head.weight, head.bias, tokens.reshape(B * T), temperature,
                per_chunk, dtype, entropy,
            )  # fmt: skip
        return (logp.view(B, T), ent.view(B, T)) if entropy else logp.view(B, T)

    grad = torch.is_grad_enabled() and (
        hidden.requires_grad or any(p.requires_grad for p in head.parameters())
    )
    forward_done = False  # later calls of `chunk` are the backward's recomputations: no entropy there

    def chunk(h, tk):  # [n, H], [n] -> [n], [n]
        lg = head(h).float()
        lg = lg / temperature if temperature != 1.0 else lg
        lse = torch.logsumexp(lg, -1)  # [n]
        ent = None
        if entropy and not forward_done:
            with torch.no_grad():  # entropy = logsumexp - sum p * logits, with one [n, V] temporary
                ent = lse - (lg - lse[:, None]).exp_().mul_(lg).sum(-1)
        return lg.gather(-1, tk[:, None]).squeeze(-1) - lse, ent

    pieces = []
    flat_h, flat_tk = hidden.reshape(B * T, H), tokens.reshape(B * T)  # [B*T, H], [B*T]
    for h, tk in zip(flat_h.split(per_chunk), flat_tk.split(per_chunk), strict=True):
        if grad:
            pieces.append(torch.utils.checkpoint.checkpoint(chunk, h, tk, use_reentrant=False))
        else:
            pieces.append(chunk(h, tk))
    forward_done = True
    logp = torch.cat([p[0] for p in pieces]).view(B, T)
    return (logp, torch.cat([p[1] for p in pieces]).view(B, T)) if entropy else logp


_HEAD_CHECKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _plain_head(model, input_ids, attention_mask):
    """The model's output-embedding module if its logits are exactly that module's output, else None.

    Checked once per model, on one row, by comparing the logits a forward returns with what the head
    returned inside it: a model that rescales or soft-caps its logits (Gemma 2's `final_logit_softcapping`,
    Cohere's `logit_scale`, Granite's `logits_scaling`, ...), calls its head more than once, or has none
    keeps its own logits. FSDP-sharded heads (DTensor weights, gathered only inside the forward) too.
    """
    inner = inner_model(model)
    try:  # some remote-code models raise NotImplementedError here
        head = inner.get_output_embeddings()
    except Exception:
        head = None
    if not isinstance(head, torch.nn.Module):
        return None
    if any(type(p).__name__ == "DTensor" for p in head.parameters()):
        return None
    if inner not in _HEAD_CHECKED:
        seen = []
        handle = head.register_forward_hook(lambda mod, args, out: seen.append(out))
        try:
            with torch.no_grad():
                out = inner(input_ids=input_ids, **forward_kwargs(inner, attention_mask, keep=1))
        except Exception:  # not scored through the head; the model's own forward comes next and speaks
            out = None
        finally:
            handle.remove()
        logits = getattr(out, "logits", None)
        _HEAD_CHECKED[inner] = (
            len(seen) == 1
            and isinstance(seen[0], torch.Tensor)
            and isinstance(logits, torch.Tensor)
            and seen[0].shape == logits.shape
            and torch.equal(seen[0].to(logits.dtype), logits)
        )
    return head if _HEAD_CHECKED[inner] else None


def in_chunks(fn, input_ids, attention_mask, rows: int) -> torch.Tensor:
    """`fn(ids, mask) -> [b, ...]` over `rows` sequences at a time, concatenated: [B, ...].

    For the no-gradient forwards of a whole batch of rollouts (reference and old log-probs, PPO values):
    one forward over B sequences would hold B rows of activations and logits at once, more than the
    micro-batch the update itself is sized for.
    """
    return torch.cat(
        [fn(i, m) for i, m in zip(input_ids.split(rows), attention_mask.split(rows), strict=True)]
    )
