"""How a Hugging Face model's decoder is laid out, read into plain tensors for `decoder.LeanDecoder`.

`read(model, cache, n_cached)` returns a `Layout` (each layer's projections, norms, window, scaling,
activation and rope table; the embeddings, final norm and head; the prefilled cache's keys and values)
for the architectures whose forward the lean step reproduces exactly, and None for anything else:
other architectures, quantised layers or LoRA variants (plain LoRA adapters are read), hooked (FSDP)
modules, norms or rope scalings it does not know, soft-capped attention, a cache that dropped prompt
keys. No maths here: the step is in decoder.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "GemmaForCausalLM",
    "Gemma3ForCausalLM",  # Gemma 3's text-only models (1B, 270M)
    "Phi3ForCausalLM",  # Phi-3 (4k), Phi-4: fused q/k/v and gate/up projections
)
STATIC_ROPE = ("default", "linear", "llama3", "yarn")  # inverse frequencies that do not depend on length
CONFIG_WINDOW = ("MistralForCausalLM", "Phi3ForCausalLM")  # attention reads sliding_window from the config
RMS_NORMS = tuple(f"{m}RMSNorm" for m in ("Llama", "Mistral", "Qwen2", "Qwen3", "Gemma", "Gemma3", "Phi3"))


class Layer(NamedTuple):
    """One decoder layer: norms as (weight, eps, gemma) for `decoder._rms`, projections as
    (weight, bias, loras) for `decoder._linear`; optional parts None."""

    ln1: tuple  # before attention
    q: tuple
    k: tuple
    v: tuple
    o: tuple
    post_attn: tuple | None  # Gemma 3: on the attention's output
    ln2: tuple  # before the MLP
    gate: tuple
    up: tuple
    down: tuple
    post_mlp: tuple | None  # Gemma 3: on the MLP's output
    q_norm: tuple | None  # Qwen3, Gemma 3: over each head
    k_norm: tuple | None
    window: int | None  # sliding window (the last `window` positions), None: all
    scale: float  # attention's score scaling
    act: Callable  # the MLP's activation
    rope: int  # which rotary table (`Layout.ropes`)


@dataclass
class Layout:
    """A decoder read from a model: its `layers`, `ropes` the (inverse frequencies, scaling) of each
    rotary table, `keys`/`values` the prefilled cache per layer [B, KV, Lp, hd]."""

    layers: list[Layer]
    ropes: list[tuple]
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    embed: torch.Tensor  # [V, D]
    embed_scale: torch.Tensor | None  # Gemma multiplies the embeddings by sqrt(D), in their dtype
    norm: tuple
    head: tuple  # (weight [V, D], bias)
    heads: int
    kv_heads: int


def read(model, cache, n_cached: int) -> Layout | None:
    """The `Layout` of `model` over `cache` (a prefilled transformers cache holding `n_cached` positions),
    or None when it is not one the lean step reproduces exactly."""
    if type(getattr(model, "base_model", None)).__name__ == "LoraModel":  # peft: the model it wraps
        model = model.base_model.model
    if type(model).__name__ not in ARCHITECTURES:
        return None
    try:
        return _read(model, cache, n_cached)
    except AttributeError:  # a variant of these classes laid out differently: use the model's forward
        return None


def _rms_norm(norm) -> bool:
    """One of the RMSNorm classes `_rms` reproduces (`_norm` tells Gemma's from the others), with an eps."""
    name = type(norm).__name__
    return name in RMS_NORMS and _eps(norm) is not None


def _eps(norm) -> float | None:
    return getattr(norm, "variance_epsilon", getattr(norm, "eps", None))


def _hooked(module) -> bool:
    """Forward hooks other than the one transformers' activation checkpointing puts on the input
    embeddings (`enable_input_require_grads`: it marks the embeddings' output as requiring grad, which
    changes nothing under `no_grad`; refusing it made sampling 3x slower with checkpointing on)."""
    hooks = [*module._forward_hooks.values(), *module._forward_pre_hooks.values()]
    return any(getattr(h, "__name__", "") != "make_inputs_require_grads" for h in hooks)


def _plain(*modules) -> bool:
    """Exactly `nn.Linear` (not LoRA, not quantised) with no hooks."""
    return all(type(m) is torch.nn.Linear and not (m._forward_hooks or m._forward_pre_hooks) for m in modules)


def _norm(norm) -> tuple:
    """(weight, eps, gemma) for `_rms`; Gemma's norms scale by 1 + their parameter, in float32."""
    gemma = type(norm).__name__.startswith("Gemma")
    return (1.0 + norm.weight.float() if gemma else norm.weight, _eps(norm), gemma)


def _act(mlp):
    """The MLP's activation: SiLU as a function (the common case, one call fewer), else the model's own
    module (Gemma's tanh-approximated GELU), which computes exactly what the model computes."""
    act = mlp.act_fn if hasattr(mlp, "act_fn") else mlp.activation_fn  # Phi-3's name
    return F.silu if type(act).__name__ in ("SiLU", "SiLUActivation") else act


def _ropes(model, inner) -> tuple[list, list[int]] | None:
    """The rotary tables' (inverse frequencies, scaling) and each layer's table, or None for a rope
    scaling that changes with the length. Gemma 3 has one per layer type (local and global layers)."""
    rot, types = inner.rotary_emb, getattr(inner.rotary_emb, "layer_types", None)
    if types is None:
        if getattr(rot, "rope_type", None) not in STATIC_ROPE:
            return None
        return [(rot.inv_freq, rot.attention_scaling)], [0] * len(inner.layers)
    if any(rot.rope_type[t] not in STATIC_ROPE for t in types):
        return None
    ropes = [(getattr(rot, f"{t}_inv_freq"), getattr(rot, f"{t}_attention_scaling")) for t in types]
    return ropes, [types.index(t) for t in model.config.layer_types[: len(inner.layers)]]


def _projection(m) -> tuple | None:
    """(weight, bias, loras) for `decoder._linear`: a plain `nn.Linear`, or peft's LoRA `Linear` over one
    (its active adapters as (A, B, B's bias, scaling), nothing once merged or disabled, as its forward
    does); None for anything else (quantised layers, DoRA and other LoRA variants)."""
    if _plain(m):
        return (m.weight, m.bias, ())
    if type(m).__name__ != "Linear" or not type(m).__module__.startswith("peft.tuners.lora"):
        return None
    base = m.base_layer
    if not _plain(base):
        return None
    if m.merged or m.disable_adapters:  # the base layer alone (a merged one holds the adapters' sum)
        return (base.weight, base.bias, ())
    loras = []
    for name in m.active_adapters:
        if name not in m.lora_A:
            continue
        if name in getattr(m, "lora_variant", {}) or getattr(m, "use_dora", {}).get(name):
            return None
        a, b = m.lora_A[name], m.lora_B[name]
        if not _plain(a, b):
            return None
        loras.append((a.weight, b.weight, b.bias, m.scaling[name]))
    return (base.weight, base.bias, tuple(loras))


def _split(linear: tuple, sizes: list[int], names: list[str]) -> dict:
    """A fused projection's (weight, bias, loras) as one per output block: views without copies (a LoRA
    adapter's B splits by rows; its A is shared)."""

    def rows(t):
        return t.split(sizes) if t is not None else [None] * len(sizes)

    w, b, loras = linear
    per_lora = [list(zip(rows(bw), rows(bb), strict=True)) for _, bw, bb, _ in loras]
    return {
        name: (wi, bi, tuple((a, *parts[i], s) for (a, _, _, s), parts in zip(loras, per_lora, strict=True)))
        for i, (name, wi, bi) in enumerate(zip(names, rows(w), rows(b), strict=True))
    }


def _read(model, cache, n_cached: int) -> Layout | None:
    cfg, inner = model.config, model.model
    if not _plain(model.lm_head) or not _rms_norm(inner.norm):
        return None
    embed = inner.embed_tokens
    if type(embed) is not torch.nn.Embedding and not type(embed).__name__.endswith("ScaledWordEmbedding"):
        return None
    if any(getattr(cfg, f, None) is not None for f in ("attn_logit_softcapping", "final_logit_softcapping")):
        return None  # Gemma 2: soft-capped attention scores and logits
    if getattr(cfg, "use_bidirectional_attention", False):
        return None
    ropes = _ropes(model, inner)
    if ropes is None:
        return None
    if any(_hooked(m) or hasattr(m, "_hf_hook") for m in model.modules()):
        return None  # FSDP, accelerate's offloading (it wraps `forward`), probes, ...
    if any(p.device.type == "meta" for p in model.parameters()):
        return None
    cached = getattr(cache, "layers", None)
    if not cached or len(cached) != len(inner.layers):
        return None
    layers, keys, values = [], [], []
    for layer, c, table in zip(inner.layers, cached, ropes[1], strict=True):
        a, mlp = layer.self_attn, layer.mlp
        parts = dict(o=a.o_proj, down=mlp.down_proj)
        if hasattr(a, "qkv_proj"):  # Phi-3: fused, split below into views of the fused weights
            parts.update(qkv=a.qkv_proj, gate_up=mlp.gate_up_proj)
        else:
            parts.update(q=a.q_proj, k=a.k_proj, v=a.v_proj, gate=mlp.gate_proj, up=mlp.up_proj)
        if hasattr(layer, "pre_feedforward_layernorm"):  # Gemma 3: a norm before and after each block
            norms = dict(ln1=layer.input_layernorm, post_attn=layer.post_attention_layernorm)
            norms.update(ln2=layer.pre_feedforward_layernorm, post_mlp=layer.post_feedforward_layernorm)
        else:
            norms = dict(ln1=layer.input_layernorm, ln2=layer.post_attention_layernorm)
        if getattr(a, "q_norm", None) is not None:  # Qwen3, Gemma 3
            norms.update(q_norm=a.q_norm, k_norm=a.k_norm)
        k, v = getattr(c, "keys", None), getattr(c, "values", None)
        lin = {name: _projection(m) for name, m in parts.items()}  # decoder._linear(x, w, b, loras)
        if None in lin.values() or not all(_rms_norm(n) for n in norms.values()):
            return None
        if k is None or k.dim() != 4 or k.shape[-2] != n_cached:  # e.g. a sliding cache that dropped keys
            return None
        if hasattr(a, "sliding_window"):  # a copy the layer took of the config's, which the mask reads
            window = a.sliding_window
            if window is not None and window != getattr(cfg, "sliding_window", None):
                return None  # the config's was changed after loading: which one the forward uses varies
        else:  # Mistral and Phi-3 read it from the config
            window = cfg.sliding_window if type(model).__name__ in CONFIG_WINDOW else None
        if "qkv" in lin:
            q, kv = cfg.num_attention_heads * a.head_dim, cfg.num_key_value_heads * a.head_dim
            lin.update(_split(lin.pop("qkv"), [q, kv, kv], ["q", "k", "v"]))
            half = lin["gate_up"][0].shape[0] // 2  # gate first, then up (`chunk(2)`)
            lin.update(_split(lin.pop("gate_up"), [half, half], ["gate", "up"]))
        rms = {name: _norm(n) for name, n in norms.items()}  # _rms(x, w, eps, gemma)
        layers.append(
            Layer(
                **{n: lin[n] for n in ("q", "k", "v", "o", "gate", "up", "down")},
                **{n: rms.get(n) for n in ("ln1", "post_attn", "ln2", "post_mlp", "q_norm", "k_norm")},
                window=window,
                scale=a.scaling,
                act=_act(mlp),
                rope=table,
            )
        )
        keys.append(k)
        values.append(v)
    scale = getattr(embed, "embed_scale", None)  # Gemma's scaled embeddings
    return Layout(
        layers,
        ropes[0],
        keys,
        values,
        embed=embed.weight,
        embed_scale=scale.to(embed.weight.dtype) if scale is not None else None,
        norm=_norm(inner.norm),
        head=(model.lm_head.weight, model.lm_head.bias),
        heads=cfg.num_attention_heads,
        kv_heads=cfg.num_key_value_heads,
    )
