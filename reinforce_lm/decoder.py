"""A lean decode step for Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma 3 (text) and Phi-3 models, used by
the native sampler.

A decode step through a Hugging Face model spends, per decoder layer, dozens of small tensor ops and
several Python layers (mask building, output dataclasses, config lookups, cache objects). On small
models and small batches that overhead, not the arithmetic, sets the sampling speed (1.2 ms per token
for a batch of 64 on the tiny benchmark model, 0.5 ms here). `LeanDecoder` runs the same maths on the
model's own weights with few ops: per layer two RMSNorms, the q/k/v/o and MLP projections, rotary
embedding from tables computed once per rollout, K/V written in place into a preallocated cache, and one
attention (two matmuls and a float32 softmax on CPU, the fused kernel elsewhere). Its log-probs match the
model's forward (tests/test_decoder.py). The prompt is still prefilled by the model's own forward; only
the per-token steps run here.

`lean_decoder` returns None (and the sampler calls the model's forward instead) for anything that
`lean_layout.read` does not recognise exactly: other architectures, LoRA or quantised layers, hooked
(FSDP) modules, rope scalings that change with the length, caches that do not hold the whole prompt. For
those models `kv_cache.preallocate` makes the model's own `DynamicCache` write each new key and value in
place (transformers appends with `torch.cat`, copying the whole cache at every token).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from reinforce_lm.kv_cache import grown
from reinforce_lm.lean_layout import Layout, read

SPAN = 256  # static steps attend over the cache in spans of this many positions (`LeanDecoder`)


def graphable(device: torch.device) -> bool:
    """Whether decode steps on `device` can be CUDA graphs: capture and replay use the current CUDA
    device's streams, so only a model on that device."""
    return device.type == "cuda" and device.index == torch.cuda.current_device()


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float, gemma: bool = False) -> torch.Tensor:
    """Hugging Face's RMSNorms, [..., D] -> [..., D], normalising in float32. Llama's casts back, then
    scales; Gemma's scales in float32 by 1 + its parameter (`weight` here: made once per rollout), then
    casts back."""
    if (
        x.dtype == torch.float32
        and weight.dtype == torch.float32
        and not torch.is_autocast_enabled(x.device.type)
    ):
        return F.rms_norm(x, weight.shape, weight, eps)  # one fused op, same result in float32
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (normed * weight).to(x.dtype) if gemma else weight * normed.to(x.dtype)


def _linear(x: torch.Tensor, w: torch.Tensor, b, loras: tuple) -> torch.Tensor:
    """A projection [..., in] -> [..., out]: the layer's `F.linear`, plus each LoRA adapter's
    B(A(x)) * scaling in the order peft adds them (x cast to A's dtype; the sum cast back to the base
    output's dtype). `loras`: (A weight, B weight, B bias, scaling) per active adapter."""
    y = F.linear(x, w, b)
    if not loras:
        return y
    dtype = y.dtype
    for a, b_w, b_b, scaling in loras:
        xa = x if x.dtype == a.dtype else x.to(a.dtype)
        y = y + F.linear(F.linear(xa, a), b_w, b_b) * scaling
    return y.to(dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding: x*cos + rotate_half(x)*sin, with rotate_half(x) = [-x2, x1].

    x [B, H, hd], cos/sin [B, 1, hd]; `sin` comes with its first half negated, so [-x2, x1]*sin equals
    [x2, x1]*sin_signed: swapping the halves is one `flip` of a [2, hd/2] view (negation is exact).
    """
    rd = cos.shape[-1]
    if rd < x.shape[-1]:  # partial rotary embedding: the last dimensions pass through unrotated
        return torch.cat([_rotate(x[..., :rd], cos, sin), x[..., rd:]], dim=-1)
    swapped = x.unflatten(-1, (2, -1)).flip(-2).flatten(-2)  # [x2, x1]
    return x * cos + swapped * sin


def _attend(q, k, v, mask, scale: float, fused: bool | None = None) -> torch.Tensor:
    """One query per row over the cache: q [B, H, hd], k/v [B, KV, n, hd], mask [B, 1, 1, n] bool or
    None -> [B, H*hd]. Grouped queries share their key/value head without copying it.

    On CPU in float32, for a single query, two matmuls and a float32 softmax (Hugging Face's eager
    attention) beat `scaled_dot_product_attention` by 1.2-1.9x. Elsewhere (or with `fused=True`) the fused
    kernel is used: also on CPU in bf16 (weights or autocast), where the two matmuls round the scores to
    bf16 and the fused kernel, which the model's forward uses, accumulates them in float32 (sampling
    drifted from the update by ~1e-3 in log-prob, against ~1e-7 with the fused kernel).
    """
    B, H, hd = q.shape
    KV = k.shape[1]
    if fused is None:
        cpu = q.device.type == "cpu"
        fused = not cpu or q.dtype != torch.float32 or torch.is_autocast_enabled("cpu")
    if fused:
        o = F.scaled_dot_product_attention(
            q[:, :, None], k, v, attn_mask=mask, scale=scale, enable_gqa=H != KV
        )
        return o.reshape(B, H * hd)
    s = torch.matmul(q.view(B, KV, H // KV, hd), k.transpose(-1, -2)) * scale  # [B, KV, H/KV, n]
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return torch.matmul(s.float().softmax(-1).to(q.dtype), v).view(B, H * hd)


class LeanDecoder:
    """Decode steps over a prefilled cache. B rows, Lp prompt positions, room for `extra` more.

    `static=True` keeps every shape fixed from step to step: attention runs over the preallocated cache
    with a mask of the positions written so far (not over a growing slice), and the position a step
    writes is a one-element tensor that the step advances itself. On CUDA such a step is captured into a CUDA
    graph and replayed for every token: one launch per token instead of one per op (~40 per layer),
    which sets the sampling speed of small and medium models on a GPU. Attention reads the cache up to
    the next multiple of `SPAN` positions, so a graph serves SPAN tokens and is captured again for the
    next span, and after finished rows are dropped (a smaller batch). Elsewhere the static step runs
    eagerly (the tests check it against the model's forward on CPU).
    """

    def __init__(self, layout: Layout, extra: int, static: bool = False):
        self.layers = layout.layers
        self.embed, self.embed_scale, self.norm, self.head = (
            layout.embed,
            layout.embed_scale,
            layout.norm,
            layout.head,
        )
        keys = layout.keys
        # cos/sin of every position the rollout can reach, computed once as the model's rotary module
        # does (float32 angles, scaled, cast to the hidden dtype), one table per (inverse frequencies,
        # scaling) in `ropes` (Gemma 3: local and global layers); the rotate_half sign is folded into sin
        positions = torch.arange(keys[0].shape[-2] + extra + 1, device=self.embed.device).float()[:, None]
        self.tables = []
        for inv_freq, scaling in layout.ropes:
            freqs = positions * inv_freq.to(self.embed.device).float()  # [P, hd/2]
            emb = torch.cat([freqs, freqs], dim=-1)  # [P, hd]
            sin = (emb.sin() * scaling).to(self.embed.dtype)
            half = sin.shape[1] // 2
            self.tables.append(
                ((emb.cos() * scaling).to(self.embed.dtype), torch.cat([-sin[:, :half], sin[:, half:]], 1))
            )
        self.heads, self.kv_heads = layout.heads, layout.kv_heads
        self.n = keys[0].shape[-2]  # positions written so far
        # [B, KV, Lp+extra, hd] per layer. Static steps attend over the whole buffer, positions not
        # written yet masked: zeros there, since a softmax weight of 0 times uninitialised NaN is NaN.
        self.k = [grown(k, extra, zeros=static) for k in keys]
        self.v = [grown(v, extra, zeros=static) for v in layout.values]
        self.out = None  # [B, V] logits, written by every step (the caller reads them before the next)
        self.static = static
        self.graphs = static and graphable(self.embed.device)
        self._valid = None  # static: [B, 1, 1, Lp+extra] bool, the positions attended to
        self._graph = self._stream = self._key = None
        self.captures = 0  # CUDA graphs captured (one per batch size and span decoded)

    def select(self, rows: torch.Tensor) -> None:
        """Keep only `rows` (finished rows are not decoded further)."""
        self.k = [k[rows] for k in self.k]
        self.v = [v[rows] for v in self.v]
        if self._valid is not None:
            self._valid, self._tok, self._pos = self._valid[rows], self._tok[rows], self._pos[rows]
            self._graph = None  # a smaller batch: captured again at its next step

    def step(self, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """tokens [B] long, positions [B] long (their position ids), mask [B, n+1] or None -> logits [B, V].

        `mask` is the attention mask over every cached position plus this one (None: no padding). The
        one-token sequence dimension is left out throughout: hidden states are [B, D], heads [B, H, hd].
        """
        if self.static:
            return self._static_step(tokens, positions, mask)
        n = self.n + 1
        am = mask.bool()[:, None, None, :] if mask is not None else None  # [B, 1, 1, n]

        def write_and_span(kc, vc, k, v, window):  # the cache [B, KV, Lp+T, hd] gets this position
            kc[:, :, n - 1], vc[:, :, n - 1] = k, v
            lo = max(0, n - window) if window else 0  # sliding window: the last `window` keys
            return kc[:, :, lo:n], vc[:, :, lo:n], am[..., lo:n] if am is not None else None

        logits = self._forward(tokens, positions, write_and_span, reuse_out=True)
        self.n = n
        return logits

    def _forward(self, tokens, positions, write_and_span, reuse_out: bool) -> torch.Tensor:
        """The model's maths for one token per row: [B], [B] -> logits [B, V]. `write_and_span(kc, vc,
        k, v, window)` stores this position's key/value and returns (keys, values, mask) to attend over."""
        B, H, KV = tokens.shape[0], self.heads, self.kv_heads
        h = F.embedding(tokens, self.embed)  # [B, D]
        if self.embed_scale is not None:
            h = h * self.embed_scale
        rope = [(cos[positions][:, None], sin[positions][:, None]) for cos, sin in self.tables]  # [B, 1, hd]
        for L, kc, vc in zip(self.layers, self.k, self.v, strict=True):  # L: a lean_layout.Layer
            cos, sin = rope[L.rope]
            x = _rms(h, *L.ln1)
            q = _linear(x, *L.q).view(B, H, -1)  # [B, H, hd]
            k = _linear(x, *L.k).view(B, KV, -1)
            if L.q_norm is not None:  # Qwen3, Gemma 3: RMSNorm over each head
                q, k = _rms(q, *L.q_norm), _rms(k, *L.k_norm)
            v = _linear(x, *L.v).view(B, KV, -1)
            keys, values, m = write_and_span(kc, vc, _rotate(k, cos, sin), v, L.window)
            o = _linear(_attend(_rotate(q, cos, sin), keys, values, m, L.scale), *L.o)  # [B, D]
            h = h + (_rms(o, *L.post_attn) if L.post_attn is not None else o)  # Gemma 3 norms both outputs
            x = _rms(h, *L.ln2)
            x = _linear(L.act(_linear(x, *L.gate)) * _linear(x, *L.up), *L.down)
            h = h + (_rms(x, *L.post_mlp) if L.post_mlp is not None else x)
        x, (w, b) = _rms(h, *self.norm), self.head
        if torch.is_autocast_enabled(x.device.type) or not reuse_out:  # autocast: its dtype, as the model
            return F.linear(x, w, b)  # [B, V]
        # Into one [B, V] tensor for the whole rollout: a fresh one per token costs page faults when
        # glibc serves it by mmap (a 152k vocabulary: 9.7 MB a step for 16 rows).
        if self.out is None or self.out.shape[0] < B or self.out.dtype != x.dtype:
            self.out = torch.empty(B, w.shape[0], dtype=x.dtype, device=x.device)
        out = self.out[:B]
        return torch.mm(x, w.t(), out=out) if b is None else torch.addmm(b, x, w.t(), out=out)  # [B, V]

    # -- static shapes, CUDA graphs --------------------------------------------------------------
    def _static_step(self, tokens, positions, mask) -> torch.Tensor:
        if self._valid is None:  # first step: the prompt's padding, then nothing written yet
            B, L, dev = tokens.shape[0], self.k[0].shape[-2], tokens.device
            self._valid = torch.zeros(B, 1, 1, L, dtype=torch.bool, device=dev)
            self._valid[..., : self.n] = mask[:, None, None, : self.n].bool() if mask is not None else True
            self._at = torch.tensor([self.n], device=dev)  # [1] the position the next step writes
            self._range = torch.arange(L, device=dev)  # [L]
            self._tok, self._pos = tokens.clone(), positions.clone()  # [B] the step's inputs
        self._tok.copy_(tokens)
        self._pos.copy_(positions)
        self.n += 1
        # Attention spans the cache up to the next multiple of SPAN positions: one graph per span (and
        # batch size), and a long generation does not read its whole reserved cache at every token.
        span = min(self.k[0].shape[-2], -(-self.n // SPAN) * SPAN)
        if not self.graphs:
            return self._static_forward(span)
        key = (self._tok.shape[0], span)
        if self._graph is not None and self._key == key:
            self._graph.replay()
            return self._graph_out
        self._graph = None  # the last span's graph, freed before the next one is captured
        return self._capture(key)

    def _static_forward(self, span: int) -> torch.Tensor:
        """One step on the static buffers (`_tok`, `_pos`, `_at`, `_valid`); no host sync, so that it can
        be captured. Attention reads the cache's first `span` positions, those not written yet masked."""
        at, windows, valid = self._at, {}, self._valid[..., :span]  # [B, 1, 1, span]
        self._valid.index_fill_(-1, at, True)

        def write_and_span(kc, vc, k, v, window):
            kc.index_copy_(2, at, k[:, :, None])
            vc.index_copy_(2, at, v[:, :, None])
            if window and window not in windows:  # keys at positions > at - window
                windows[window] = valid & (self._range[:span] > at - window)
            return kc[:, :, :span], vc[:, :, :span], windows[window] if window else valid

        logits = self._forward(self._tok, self._pos, write_and_span, reuse_out=False)
        at.add_(1)
        return logits

    def _capture(self, key: tuple[int, int]) -> torch.Tensor:
        """This step eagerly, at a (batch size, span) not seen yet; else captured into a CUDA graph and
        replayed. Both run on the side stream that captures, so that lazily made state (cuBLAS's
        workspace for that stream) exists before the capture. A capture that fails (an op that cannot be
        captured) warns, and the steps run eagerly from then on."""
        cur = torch.cuda.current_stream()
        if self._stream is None:
            self._stream, self._warm = torch.cuda.Stream(device=cur.device), set()
        s, out = self._stream, None
        s.wait_stream(cur)
        with torch.cuda.stream(s):
            if key not in self._warm:  # eagerly once at these shapes; captured at the next step
                self._warm.add(key)
                out = self._static_forward(key[1])
                out.record_stream(cur)
            else:
                try:
                    graph = torch.cuda.CUDAGraph()
                    graph.capture_begin(capture_error_mode="thread_local")  # records, runs nothing
                    try:
                        self._graph_out = self._static_forward(key[1])
                    finally:
                        graph.capture_end()
                    self._graph, self._key, self.captures = graph, key, self.captures + 1
                except RuntimeError as e:
                    self.graphs = False
                    warnings.warn(f"decode steps run eagerly: CUDA graph capture failed ({e})", stacklevel=2)
        cur.wait_stream(s)
        if out is not None:
            return out
        if self._graph is None:  # the capture failed: nothing ran
            return self._static_forward(key[1])
        self._graph.replay()
        return self._graph_out


def lean_decoder(model, cache, n_cached: int, extra: int, static: bool = False) -> LeanDecoder | None:
    """A `LeanDecoder` over `cache` (a prefilled transformers cache holding `n_cached` positions) with
    room for `extra` tokens, or None when `model` is not one it reproduces exactly (`lean_layout.read`).
    `static`: fixed shapes, captured into CUDA graphs on a GPU (see `LeanDecoder`)."""
    layout = read(model, cache, n_cached)
    return LeanDecoder(layout, extra, static) if layout is not None else None
