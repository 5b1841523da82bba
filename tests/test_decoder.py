"""The lean decode step (reinforce_lm/decoder.py): the same log-probs as the model's own forward on every
architecture it takes, and a fallback to the model's forward for everything else."""

from __future__ import annotations

import pytest
import torch
import transformers as T
from transformers import AutoModelForCausalLM

from reinforce_lm import decoder, toy
from reinforce_lm.logprobs import token_logprobs
from reinforce_lm.models import disable_dropout, enable_activation_checkpointing
from reinforce_lm.rollout import Sampler, row_seeds

PROMPTS = ["a?", "bcd+1=", "j?", "0123456789?"]  # uneven lengths: left padding matters


def _model(name: str, tok, **extra):
    common = dict(
        vocab_size=len(tok),
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
    )
    common.update(extra)
    config = {
        "llama": T.LlamaConfig,
        "llama_bias_rope": lambda **kw: T.LlamaConfig(
            attention_bias=True,
            mlp_bias=True,
            rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0},
            **kw,
        ),
        # a window longer than the prompts (so the cache holds them) but shorter than prompt + completion
        "mistral_window": lambda **kw: T.MistralConfig(**{"sliding_window": 13, **kw}),
        # Llama 3.x: llama3 rope scaling and tied embeddings
        "llama3_tied": lambda **kw: T.LlamaConfig(
            tie_word_embeddings=True,
            rope_parameters={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
                "rope_theta": 500000.0,
            },
            **kw,
        ),
        # yarn scales cos/sin by an attention factor != 1
        "qwen2_yarn": lambda **kw: T.Qwen2Config(
            max_position_embeddings=64,
            rope_parameters={
                "rope_type": "yarn",
                "factor": 4.0,
                "original_max_position_embeddings": 16,
                "rope_theta": 10000.0,
            },
            **kw,
        ),
        "qwen2": T.Qwen2Config,
        "qwen3": lambda **kw: T.Qwen3Config(head_dim=16, **kw),
        # another activation: the MLP's own activation module is called
        "llama_gelu": lambda **kw: T.LlamaConfig(hidden_act="gelu_pytorch_tanh", **kw),
        # Gemma: scaled embeddings, (1 + w) norms in float32, tanh GELU, tied head
        "gemma": lambda **kw: T.GemmaConfig(head_dim=8, hidden_activation="gelu_pytorch_tanh", **kw),
        # Gemma 3: sliding and full layers with their own rope tables, norms around each block,
        # per-head q/k norms, query_pre_attn_scalar
        # Phi-3: fused q/k/v and gate/up projections, window from the config, partial rotary embedding
        "phi3": lambda **kw: T.Phi3Config(
            sliding_window=13,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
            **kw,
        ),
        "gemma3": lambda **kw: T.Gemma3TextConfig(
            head_dim=8,
            sliding_window=13,
            layer_types=["sliding_attention", "full_attention"],
            query_pre_attn_scalar=12,
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0},
            },
            **kw,
        ),
    }[name](**common)
    torch.manual_seed(0)
    return disable_dropout(AutoModelForCausalLM.from_config(config)).eval()


ARCHS = ["llama", "llama_bias_rope", "llama3_tied", "mistral_window", "qwen2", "qwen2_yarn", "qwen3"]
ARCHS += ["llama_gelu", "gemma", "gemma3", "phi3"]


@pytest.mark.parametrize("name", ARCHS)
def test_lean_steps_match_the_models_forward(name, tokenizer):
    model = _model(name, tokenizer)
    g = torch.arange(len(PROMPTS))
    seeds = row_seeds(0, 0, g, 3)
    lean = Sampler(tokenizer, max_new_tokens=9).sample(model, PROMPTS, g, 3, seeds)
    plain = Sampler(tokenizer, max_new_tokens=9, lean=False).sample(model, PROMPTS, g, 3, seeds)
    full = token_logprobs(model, lean.input_ids, lean.attention_mask, lean.response_ids.shape[1])
    assert torch.allclose(full * lean.response_mask, lean.logp, atol=1e-5)
    assert lean.completions == plain.completions  # the same Gumbel noise, the same logits to ~1e-7
    assert torch.allclose(lean.logp, plain.logp, atol=1e-5)


@pytest.mark.parametrize("name", ARCHS)
def test_lean_decoder_is_used_for_the_llama_family(name, tokenizer, monkeypatch):
    model = _model(name, tokenizer)
    made = []
    real = decoder.lean_decoder

    def spy(*args):
        made.append(real(*args))
        return made[-1]

    monkeypatch.setattr("reinforce_lm.rollout.lean_decoder", spy)
    Sampler(tokenizer, max_new_tokens=4).sample(model, PROMPTS[:2], torch.arange(2), 2)
    assert made and isinstance(made[0], decoder.LeanDecoder)


def test_lean_decoder_declines_what_it_does_not_reproduce(tokenizer):
    ids = tokenizer(["0123456789?"], return_tensors="pt").input_ids  # 11 tokens

    def attempt(model):
        with torch.no_grad():
            out = model(input_ids=ids, use_cache=True)
        cache = out.get("cache", None) or out.past_key_values
        return decoder.lean_decoder(model, cache, ids.shape[1], 4)

    llama = _model("llama", tokenizer)
    assert isinstance(attempt(llama), decoder.LeanDecoder)
    assert attempt(toy.make_model("gpt2", tokenizer)) is None  # another architecture
    hooked = _model("llama", tokenizer)
    hooked.model.layers[0].mlp.register_forward_hook(lambda *a: None)  # FSDP, probes...
    assert attempt(hooked) is None
    checkpointed = _model("llama", tokenizer)  # transformers hooks the embeddings: harmless here
    enable_activation_checkpointing(checkpointed)
    assert checkpointed.model.embed_tokens._forward_hooks
    assert isinstance(attempt(checkpointed), decoder.LeanDecoder)
    offloaded = _model("llama", tokenizer)
    offloaded.model.layers[1]._hf_hook = object()  # how accelerate marks a module whose forward it wraps
    assert attempt(offloaded) is None
    gemma2 = _model("gemma", tokenizer)
    gemma2.config.final_logit_softcapping = 30.0  # soft-capped logits (Gemma 2): not reproduced
    assert attempt(gemma2) is None
    gemma2.config.final_logit_softcapping = 0.0  # falsy, but still a cap (the forward divides by it)
    assert attempt(gemma2) is None
    layer_norm = _model("llama", tokenizer)
    layer_norm.model.norm = torch.nn.LayerNorm(32)  # has an eps, but is no RMSNorm
    assert attempt(layer_norm) is None
    # a window changed on the config after loading: the layers keep the old copy, the mask the new one
    rewindowed = _model("gemma3", tokenizer)
    rewindowed.config.sliding_window = 20
    assert attempt(rewindowed) is None
    dynamic = _model("llama", tokenizer, rope_parameters={"rope_type": "dynamic", "factor": 2.0})
    assert attempt(dynamic) is None
    # transformers keeps only the last `sliding_window` keys of a prompt longer than the window: the
    # cache does not hold the whole prompt, so the model's forward is used (tested in test_rollout)
    assert attempt(_model("mistral_window", tokenizer, sliding_window=5)) is None


def _lora(name: str, tokenizer, **extra):
    """`name` wrapped in LoRA adapters on every linear layer, with B made non-zero (peft starts it at 0,
    where an adapter changes nothing and a lean step that ignored it would pass)."""
    peft = pytest.importorskip("peft")
    model = _model(name, tokenizer)
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules="all-linear", **extra)
    lora = peft.get_peft_model(model, config)
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    return lora.eval()


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
@pytest.mark.parametrize("name", ["llama", "phi3", "gemma3"])
def test_lean_steps_with_lora_adapters_match_the_forward(name, static, tokenizer, monkeypatch):
    """A LoRA policy (`--lora-r`) decodes with the lean step: each projection adds B(A(x)) * scaling as
    peft does, Phi-3's fused projections with B split by rows; the same log-probs as peft's forward."""
    lora = _lora(name, tokenizer)
    built = _static(monkeypatch) if static else []
    if not static:
        real = decoder.lean_decoder
        monkeypatch.setattr(
            "reinforce_lm.rollout.lean_decoder", lambda *a: built.append(real(*a)) or built[-1]
        )
    g = torch.arange(len(PROMPTS))
    seeds = row_seeds(0, 0, g, 2)
    r = Sampler(tokenizer, max_new_tokens=9).sample(lora, PROMPTS, g, 2, seeds)
    assert isinstance(built[0], decoder.LeanDecoder)
    full = token_logprobs(lora, r.input_ids, r.attention_mask, r.response_ids.shape[1])
    assert torch.allclose(full * r.response_mask, r.logp, atol=1e-5)
    monkeypatch.undo()
    plain = Sampler(tokenizer, max_new_tokens=9, lean=False).sample(lora, PROMPTS, g, 2, seeds)
    assert plain.completions == r.completions
    # the adapters matter here: the base model alone samples other completions
    built = _static(monkeypatch)
    with lora.disable_adapter():
        base = Sampler(tokenizer, max_new_tokens=9).sample(lora, PROMPTS, g, 2, seeds)
        full = token_logprobs(lora, base.input_ids, base.attention_mask, base.response_ids.shape[1])
    assert isinstance(built[0], decoder.LeanDecoder) and base.completions != r.completions
    assert torch.allclose(full * base.response_mask, base.logp, atol=1e-5)  # disabled: the base alone


def test_lean_steps_with_merged_lora_and_declined_variants(tokenizer, monkeypatch):
    g = torch.arange(len(PROMPTS))
    seeds = row_seeds(0, 0, g, 2)
    merged = _lora("qwen3", tokenizer)
    merged.merge_adapter()  # the base weights now hold W + BA * scaling; the forward uses them alone
    built = _static(monkeypatch)
    r = Sampler(tokenizer, max_new_tokens=9).sample(merged, PROMPTS, g, 2, seeds)
    assert isinstance(built[0], decoder.LeanDecoder)
    full = token_logprobs(merged, r.input_ids, r.attention_mask, r.response_ids.shape[1])
    assert torch.allclose(full * r.response_mask, r.logp, atol=1e-5)
    dora = _lora("llama", tokenizer, use_dora=True)  # a LoRA variant: the model's forward samples
    ids = tokenizer(["a?"], return_tensors="pt").input_ids
    with torch.no_grad():
        out = dora(input_ids=ids, use_cache=True)
    cache = out.get("cache", None) or out.past_key_values
    assert decoder.lean_decoder(dora, cache, ids.shape[1], 4) is None
    r = Sampler(tokenizer, max_new_tokens=9).sample(dora, PROMPTS, g, 2, seeds)
    full = token_logprobs(dora, r.input_ids, r.attention_mask, r.response_ids.shape[1])
    assert torch.allclose(full * r.response_mask, r.logp, atol=1e-5)


def test_finished_rows_are_dropped_in_the_lean_decoder(tokenizer):
    """Many samples of a tiny random Llama hit EOS early: rows are dropped from the lean decoder's
    cache, and every log-prob still matches the full forward."""
    model = toy.make_model("llama", tokenizer)
    g = torch.arange(1)
    r = Sampler(tokenizer, max_new_tokens=12).sample(model, ["a?"], g, 64, row_seeds(0, 0, g, 64))
    lengths = r.response_mask.sum(1)
    assert (lengths < 12).float().mean() > 0.25  # enough finished rows to trigger a drop
    full = token_logprobs(model, r.input_ids, r.attention_mask, r.response_ids.shape[1])
    assert torch.allclose(full * r.response_mask, r.logp, atol=1e-5)


@pytest.mark.parametrize("name", ["qwen2", "gemma3"])
def test_lean_steps_under_bf16_autocast(name, tokenizer):
    """Mixed precision (`--mixed-precision bf16`): the lean step follows the model's forward under the
    same autocast, to bf16 accuracy."""
    model = _model(name, tokenizer)
    g = torch.arange(len(PROMPTS))
    seeds = row_seeds(0, 0, g, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        r = Sampler(tokenizer, max_new_tokens=6).sample(model, PROMPTS, g, 2, seeds)
        plain = Sampler(tokenizer, max_new_tokens=6, lean=False).sample(model, PROMPTS, g, 2, seeds)
        full = token_logprobs(model, r.input_ids, r.attention_mask, r.response_ids.shape[1])
    assert r.completions == plain.completions  # the model's own loop, to float rounding
    assert torch.allclose(plain.logp, r.logp, atol=1e-5)
    assert torch.allclose(full * r.response_mask, r.logp, atol=0.05)


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (6, 1)])
def test_eager_and_fused_single_query_attention_agree(heads, kv_heads):
    """The CPU path (two matmuls, float32 softmax) and the fused kernel used on GPUs give the same
    attention, with grouped queries and a padding mask."""
    g = torch.Generator().manual_seed(0)
    B, n, hd = 3, 7, 8
    q = torch.randn(B, heads, hd, generator=g)
    k, v = torch.randn(2, B, kv_heads, n, hd, generator=g)
    mask = torch.ones(B, 1, 1, n, dtype=torch.bool)
    mask[0, ..., :3] = False  # a left-padded row
    for m in (None, mask):
        eager = decoder._attend(q, k, v, m, 0.3, fused=False)
        fused = decoder._attend(q, k, v, m, 0.3, fused=True)
        assert eager.shape == (B, heads * hd)
        assert torch.allclose(eager, fused, atol=1e-5)


@pytest.mark.parametrize("name", ["mistral_window", "qwen3"])
def test_lean_steps_with_the_fused_attention_match_the_forward(name, tokenizer, monkeypatch):
    """The GPU path of the lean step (the fused attention kernel), run on CPU: same log-probs."""
    real = decoder._attend
    monkeypatch.setattr(decoder, "_attend", lambda *a: real(*a, fused=True))
    model = _model(name, tokenizer)
    g = torch.arange(len(PROMPTS))
    r = Sampler(tokenizer, max_new_tokens=9).sample(model, PROMPTS, g, 2, row_seeds(0, 0, g, 2))
    full = token_logprobs(model, r.input_ids, r.attention_mask, r.response_ids.shape[1])
    assert torch.allclose(full * r.response_mask, r.logp, atol=1e-5)


@pytest.mark.parametrize("name", ["llama", "qwen3", "gemma3", "phi3"])
def test_lean_steps_of_a_bf16_model(name, tokenizer):
    """Weights in bfloat16 (`--dtype bfloat16`): the log-probs of the model's own KV-cache loop (both
    ~1e-3 from a full forward, which rounds differently), not a drift of their own: the attention takes
    the fused kernel, as the forward does, whose scores are not rounded to bf16 (the two-matmul CPU
    path was ~1e-3 off the loop, 10^4 times the float32 gap)."""
    model = _model(name, tokenizer).to(torch.bfloat16)
    g = torch.arange(len(PROMPTS))
    seeds = row_seeds(0, 0, g, 2)
    r = Sampler(tokenizer, max_new_tokens=9).sample(model, PROMPTS, g, 2, seeds)
    plain = Sampler(tokenizer, max_new_tokens=9, lean=False).sample(model, PROMPTS, g, 2, seeds)
    assert r.completions == plain.completions
    assert torch.allclose(plain.logp, r.logp, atol=1e-5)
    full = token_logprobs(model, r.input_ids, r.attention_mask, r.response_ids.shape[1])
    assert torch.allclose(full * r.response_mask, r.logp, atol=1e-2)


def _static(monkeypatch):
    """Make the sampler build static-shape lean decoders (what it does on a GPU) on the CPU."""
    built = []

    def static(*args):
        built.append(decoder.lean_decoder(*args[:4], static=True))
        return built[-1]

    monkeypatch.setattr("reinforce_lm.rollout.lean_decoder", static)
    return built


@pytest.mark.parametrize("name", ARCHS)
def test_static_lean_steps_match_the_models_forward(name, tokenizer, monkeypatch):
    """The static-shape step that CUDA graphs capture (attention over the whole cache under a mask of
    the positions written so far, the write position a tensor): the same log-probs as the forward, on
    every architecture, sliding windows and left padding included."""
    built = _static(monkeypatch)
    model = _model(name, tokenizer)
    g = torch.arange(len(PROMPTS))
    seeds = row_seeds(0, 0, g, 3)
    r = Sampler(tokenizer, max_new_tokens=9).sample(model, PROMPTS, g, 3, seeds)
    assert built and built[0].static and not built[0].graphs  # eager on the CPU
    full = token_logprobs(model, r.input_ids, r.attention_mask, r.response_ids.shape[1])
    assert torch.allclose(full * r.response_mask, r.logp, atol=1e-5)
    monkeypatch.undo()
    dynamic = Sampler(tokenizer, max_new_tokens=9).sample(model, PROMPTS, g, 3, seeds)
    assert dynamic.completions == r.completions


@pytest.mark.parametrize("name", ["llama", "mistral_window", "gemma3"])
def test_static_lean_steps_attend_in_spans(name, tokenizer, monkeypatch):
    """Attention over the cache up to the next multiple of SPAN positions (a new span every 4 tokens
    here, so each rollout crosses several): the same log-probs as the forward, with a sliding window."""
    monkeypatch.setattr(decoder, "SPAN", 4)
    _static(monkeypatch)
    model = _model(name, tokenizer)
    g = torch.arange(len(PROMPTS))
    r = Sampler(tokenizer, max_new_tokens=9).sample(model, PROMPTS, g, 2, row_seeds(0, 0, g, 2))
    full = token_logprobs(model, r.input_ids, r.attention_mask, r.response_ids.shape[1])
    assert torch.allclose(full * r.response_mask, r.logp, atol=1e-5)


def test_static_lean_steps_after_dropping_finished_rows(tokenizer, monkeypatch):
    """Rows dropped mid-rollout (a smaller batch) keep their own cache, mask and write position."""
    _static(monkeypatch)
    model = toy.make_model("llama", tokenizer)
    g = torch.arange(2)
    r = Sampler(tokenizer, max_new_tokens=12).sample(model, ["a?", "0123?"], g, 32, row_seeds(0, 0, g, 32))
    assert (r.response_mask.sum(1) < 12).float().mean() > 0.25  # enough finished rows to drop some
    full = token_logprobs(model, r.input_ids, r.attention_mask, r.response_ids.shape[1])
    assert torch.allclose(full * r.response_mask, r.logp, atol=1e-5)


def test_static_lean_steps_under_bf16_autocast(tokenizer, monkeypatch):
    _static(monkeypatch)
    model = _model("qwen3", tokenizer)
    g = torch.arange(len(PROMPTS))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        r = Sampler(tokenizer, max_new_tokens=6).sample(model, PROMPTS, g, 2, row_seeds(0, 0, g, 2))
        full = token_logprobs(model, r.input_ids, r.attention_mask, r.response_ids.shape[1])
    assert torch.allclose(full * r.response_mask, r.logp, atol=0.05)
