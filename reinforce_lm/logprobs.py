"""Per-token log-probs of chosen tokens (and entropies) from a causal LM, without `[B, T, V]` copies.

`token_logprobs` is what every scoring forward calls (the update, old and reference log-probs, SFT):
the LM head's input is taken by a hook and scored in chunks where the model allows it (`head_logprobs`),
else the model's own logits go through `selective_log_softmax`.
"""

from __future__ import annotations

import weakref

import torch
import torch.utils.checkpoint

from reinforce_lm.chosen_logp import (  # noqa: F401 (re-exported)
    _OUT_DTYPE,
    _add_matmul,
    _ChosenLogp,
    _HeadLogp,
    _LinearLogp,
)
from reinforce_lm.models import forward_kwargs, inner_model

CHUNK_ELEMENTS = 1 << 24  # logits upcast to float32 at once: 64 MiB
# The LM head runs in chunks only for logits of at least this many chunks (256 MiB of float32). Below
# that the head runs in one piece, exactly as the model's forward would, and a plain linear head's
# logits then become their own gradient (`_LinearLogp`): on CPU one piece is ~1.4x faster than chunks,
# whose backward runs the head's matmul again, for ~16x the memory (bench/head.py).
HEAD_CHUNKS_MIN = 4


def _rows(T: int, V: int) -> int:
    """Rows of [B, T, V] logits per chunk so that a chunk holds at most CHUNK_ELEMENTS (read at the
    call) values."""
    return max(1, CHUNK_ELEMENTS // max(1, T * V))


def selective_log_softmax(
    logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0, entropy: bool = False
):
    """log softmax(logits / temperature)[tokens] without a float32 copy of the whole `[B, T, V]` tensor.

    logits [B, T, V] (any dtype), tokens [B, T] -> [B, T] float32; with `entropy`, also the per-token
    entropy of softmax(logits / temperature) [B, T] float32 (no gradient), from the same passes. Rows are
    processed a few at a time (at most CHUNK_ELEMENTS logits per chunk are upcast), forward and backward
    (`_ChosenLogp`).
    """
    logp, ent = _ChosenLogp.apply(logits, tokens, _rows(*logits.shape[1:]), temperature, entropy)
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
    return selective_log_softmax(out.logits[:, -(n_response + 1) : -1], tokens, temperature, entropy)


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
        if not (torch.is_grad_enabled() and _linear_head(head, own_hook)):
            return selective_log_softmax(head(hidden), tokens, temperature, entropy)
        # a plain linear head in the same node: its logits become their own gradient (`_LinearLogp`)
        rows = _rows(T, vocab)
        logp, ent = _LinearLogp.apply(hidden, head.weight, head.bias, tokens, rows, temperature, entropy)
        return (logp, ent) if entropy else logp

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
