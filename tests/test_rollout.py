"""The sampler: seeded samples independent of batch layout, log-probs that match a full forward, EOS
handling, filtering, and the Gumbel-max draw matching softmax."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from transformers import AutoModelForCausalLM

from reinforce_lm import draws, toy
from reinforce_lm.logprobs import token_logprobs
from reinforce_lm.models import disable_dropout, load_tokenizer
from reinforce_lm.rollout import Sampler, filter_logits, row_seeds


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    out = {}
    for arch in toy.ARCHITECTURES:
        path = toy.save_tiny_model(tmp_path_factory.mktemp(arch), arch=arch)
        model = disable_dropout(AutoModelForCausalLM.from_pretrained(path)).eval()
        out[arch] = (model, load_tokenizer(str(path)))
    return out


PROMPTS = ["a?", "bcd+1=", "j?", "0123456789?"]  # uneven lengths: left padding matters


@pytest.mark.parametrize("arch", toy.ARCHITECTURES)
def test_sampling_logprobs_match_a_full_forward(models, arch):
    model, tok = models[arch]
    sampler = Sampler(tok, max_new_tokens=7)
    g = torch.arange(len(PROMPTS))
    r = sampler.sample(model, PROMPTS, g, 3, row_seeds(0, 0, g, 3))
    assert r.response_ids.shape[0] == 12 and r.group_ids.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    full = token_logprobs(model, r.input_ids, r.attention_mask, r.response_ids.shape[1])
    assert torch.allclose(full * r.response_mask, r.logp, atol=1e-4)


@pytest.mark.parametrize("arch", toy.ARCHITECTURES)
def test_seeded_samples_do_not_depend_on_the_batch(models, arch):
    """The same prompt id, step and seed give the same completion alone or in any batch: this is what
    makes a run the same on 1 or N processes."""
    model, tok = models[arch]
    sampler = Sampler(tok, max_new_tokens=6)
    g = torch.tensor([10, 11, 12, 13])
    together = sampler.sample(model, PROMPTS, g, 2, row_seeds(3, 5, g, 2)).completions
    for i in range(len(PROMPTS)):
        alone = sampler.sample(model, PROMPTS[i : i + 1], g[i : i + 1], 2, row_seeds(3, 5, g[i : i + 1], 2))
        assert alone.completions == together[2 * i : 2 * i + 2]
    other_step = sampler.sample(model, PROMPTS, g, 2, row_seeds(3, 6, g, 2)).completions
    assert other_step != together


def test_response_mask_stops_after_the_first_eos(models):
    model, tok = models["llama"]
    sampler = Sampler(tok, max_new_tokens=5)
    r = sampler.sample(model, ["a?"], torch.tensor([0]), 64, row_seeds(0, 0, torch.tensor([0]), 64))
    eos = tok.eos_token_id
    for ids, mask in zip(r.response_ids, r.response_mask, strict=True):
        n = int(mask.sum())
        valid = ids[:n].tolist()
        assert eos not in valid[:-1]  # EOS, if any, is the last valid token
        assert mask[:n].eq(1).all() and mask[n:].eq(0).all()
        assert ids[n:].eq(tok.pad_token_id).all()
    ended_early = (r.response_mask.sum(1) < 5) & r.response_ids.eq(eos).any(1)
    assert ended_early.any()  # a random tiny model samples EOS now and then (seeded: deterministic)


def test_greedy_and_hf_backend(models):
    model, tok = models["qwen2"]
    g = torch.arange(2)
    a = Sampler(tok, max_new_tokens=5).sample(model, PROMPTS[:2], g, 1, greedy=True)
    b = Sampler(tok, max_new_tokens=5, backend="hf").sample(model, PROMPTS[:2], g, 1, greedy=True)
    assert a.completions == b.completions


def test_hf_backend_ignores_the_models_generation_config(models):
    """generate() fills unset fields from the model's generation_config.json; a Qwen checkpoint's top_k,
    repetition penalty and n-gram ban would then shape the samples, unlike the softmax the update's
    log-probs are of. With the same torch seed, samples equal those of a model with a blank config."""
    from transformers import GenerationConfig

    model, tok = models["qwen2"]
    plain = copy.deepcopy(model)
    model.generation_config = own = GenerationConfig(
        do_sample=True, temperature=0.3, top_k=2, min_p=0.2, repetition_penalty=1.5, no_repeat_ngram_size=1
    )
    plain.generation_config = GenerationConfig()
    sampler = Sampler(tok, max_new_tokens=6, backend="hf")
    g = torch.arange(2)
    for greedy in (False, True):
        torch.manual_seed(1)
        a = sampler.sample(model, PROMPTS[:2], g, 8, greedy=greedy)
        torch.manual_seed(1)
        b = sampler.sample(plain, PROMPTS[:2], g, 8, greedy=greedy)
        assert torch.equal(a.response_ids, b.response_ids)
    assert model.generation_config is own  # put back


def test_filter_logits_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[False, False, True, True]]
    # top_p=0.7: 0.5 alone is below 0.7, so the token that crosses it (0.3) is kept too
    assert torch.isinf(filter_logits(logits, top_p=0.7)).tolist() == [[False, False, True, True]]
    assert not torch.isinf(filter_logits(logits, top_p=1.0)).any()


def test_seeded_draws_follow_the_softmax():
    """Many completions of one prompt with a fixed next-token distribution: the first-token frequencies
    match softmax(logits / temperature); tokens filtered to -inf are never drawn."""
    tok = toy.make_tokenizer()
    vocab = len(tok)
    logits = torch.randn(vocab, generator=torch.Generator().manual_seed(0)) * 1.5
    seeds = row_seeds(0, 0, torch.arange(20000), 1)
    u = draws._uniforms(seeds, 0, 1)[:, 0]
    assert 0 < u.min() and u.max() < 1 and abs(u.mean().item() - 0.5) < 0.01
    drawn, logp = draws._draw(logits.expand(len(seeds), vocab), u)
    freq = torch.bincount(drawn, minlength=vocab).double() / len(drawn)
    expected = logits.double().softmax(-1)
    assert (freq - expected).abs().max() < 0.015
    assert torch.allclose(logp, logits.log_softmax(-1)[drawn], atol=1e-6)  # each draw's log-prob
    few, few_logp = draws._draw(logits.expand(8, vocab), u[:8])  # below _FEW: the plain ops
    assert 8 * vocab <= draws._FEW < len(seeds) * vocab
    assert torch.equal(few, drawn[:8]) and torch.allclose(few_logp, logp[:8], atol=1e-6)
    top = filter_logits(logits.expand(len(seeds), vocab), top_k=3)
    kept = set(logits.topk(3).indices.tolist())
    assert set(draws._draw(top, u)[0].tolist()) == kept
    last = torch.full((2, vocab), float("-inf"))
    last[:, -1] = 0.0  # all mass on the last token; u close to 1 must not run past it
    assert draws._draw(last, torch.tensor([1e-9, 1 - 1e-9]))[0].tolist() == [vocab - 1, vocab - 1]
    buffers = {}  # work tensors handed out for reuse: the same draws and log-probs

    def scratch(name, shape, dtype):
        buffers.setdefault(name, torch.empty(shape, dtype=dtype))
        return buffers[name][: shape[0]]

    again = draws._draw(logits.expand(len(seeds), vocab), u, scratch)
    assert torch.equal(again[0], drawn) and torch.equal(again[1], logp) and len(buffers) == 2


def _config(name: str, tok):
    import transformers as T

    common = dict(
        vocab_size=len(tok),
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
    )
    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    return {
        # sliding windows shorter than the prompts, ALiBi, learned positions, parallel attention, ...
        "mistral": lambda: T.MistralConfig(**small, num_key_value_heads=1, sliding_window=4, **common),
        "gemma2": lambda: T.Gemma2Config(
            **small, num_key_value_heads=1, head_dim=16, sliding_window=4, **common
        ),
        "phi3": lambda: T.Phi3Config(**small, num_key_value_heads=1, **common),
        "gpt_neox": lambda: T.GPTNeoXConfig(**small, **common),
        "opt": lambda: T.OPTConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            ffn_dim=64,
            word_embed_proj_dim=32,
            **common,
        ),
        "bloom": lambda: T.BloomConfig(hidden_size=32, n_layer=2, n_head=2, **common),
        "falcon": lambda: T.FalconConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, **common
        ),
        "gptj": lambda: T.GPTJConfig(n_embd=32, n_layer=2, n_head=2, rotary_dim=8, **common),
    }[name]()


@pytest.mark.parametrize("name", ["mistral", "gemma2", "phi3", "gpt_neox", "opt", "bloom", "falcon", "gptj"])
def test_more_architectures_sample_consistently(name, tokenizer):
    """Any AutoModelForCausalLM: the KV-cache loop's log-probs equal a full forward, and a prompt's samples
    do not depend on what else is in the batch."""
    torch.manual_seed(0)
    model = disable_dropout(AutoModelForCausalLM.from_config(_config(name, tokenizer))).eval()
    sampler = Sampler(tokenizer, max_new_tokens=8)
    g = torch.arange(3)
    r = sampler.sample(model, PROMPTS[1:], g, 2, row_seeds(0, 0, g, 2))
    full = token_logprobs(model, r.input_ids, r.attention_mask, r.response_ids.shape[1])
    assert torch.allclose(full * r.response_mask, r.logp, atol=1e-4)
    alone = sampler.sample(model, PROMPTS[3:], g[2:], 2, row_seeds(0, 0, g[2:], 2))
    assert alone.completions == r.completions[4:]


def test_sampling_in_chunks_of_whole_groups_gives_the_same_rollout(models):
    """`max_batch` bounds the sequences per sampling call; seeded completions, their log-probs and the
    group layout are those of one call (prompts of different lengths: left padding is re-aligned)."""
    model, tok = models["llama"]
    g = torch.arange(len(PROMPTS))
    seeds = row_seeds(0, 2, g, 3)
    whole = Sampler(tok, max_new_tokens=6).sample(model, PROMPTS, g, 3, seeds)
    parts = Sampler(tok, max_new_tokens=6, max_batch=7).sample(model, PROMPTS, g, 3, seeds)  # 2 prompts/call
    assert parts.completions == whole.completions
    assert torch.equal(parts.group_ids, whole.group_ids)
    assert torch.equal(parts.response_mask, whole.response_mask)
    assert torch.allclose(parts.logp, whole.logp, atol=1e-5)
    full = token_logprobs(model, parts.input_ids, parts.attention_mask, parts.response_ids.shape[1])
    assert torch.allclose(full * parts.response_mask, parts.logp, atol=1e-4)


def test_a_prompt_token_past_the_embedding_is_named(tokenizer):
    """A tokenizer with more tokens than the model's embedding (never resized): a DataError naming the
    prompt, not an index error inside the forward."""
    from reinforce_lm.errors import DataError

    model = toy.make_model("llama", tokenizer)
    model.resize_token_embeddings(len(tokenizer) - 3)  # the last 3 characters are past the table
    last = tokenizer.convert_ids_to_tokens(len(tokenizer) - 1)
    sampler = Sampler(tokenizer, max_new_tokens=2)
    with pytest.raises(
        DataError, match=rf"prompt {re.escape(repr('x' + last + '?'))} has token id {len(tokenizer) - 1}"
    ):
        sampler.sample(model, ["a?", f"x{last}?"], torch.arange(2), 1)


def test_a_pad_id_past_the_embedding_is_named_before_sampling(tokenizer):
    """The pad id never appears in a prompt (left padding repeats a real token), but finished rows are fed
    it and responses are padded with it: past the embedding, that was an IndexError at some later step."""
    from reinforce_lm.errors import DataError

    tok = copy.deepcopy(tokenizer)
    tok.pad_token = tok.convert_ids_to_tokens(len(tok) - 1)  # the last id pads, and has no row:
    model = toy.make_model("llama", tok)
    model.resize_token_embeddings(len(tok) - 1)
    sampler = Sampler(tok, max_new_tokens=2)
    with pytest.raises(DataError, match=rf"pad token id {len(tok) - 1} is past the model's embedding"):
        sampler.sample(model, ["a?", "b?"], torch.arange(2), 1)


def test_long_prompts_keep_their_last_tokens_and_their_bos(tokenizer):
    """--max-prompt-length cuts from the left, but a BOS (here written by a chat template) stays first."""
    sampler = Sampler(tokenizer, max_new_tokens=2, max_prompt_length=5)
    bos = tokenizer.bos_token
    with pytest.warns(UserWarning, match="longer than max_prompt_length=5 tokens keep their last"):
        ids, mask = sampler.encode([bos + "abcdefgh?", bos + "ab?"], "cpu")
    assert tokenizer.convert_ids_to_tokens(ids[0].tolist()) == [bos, "f", "g", "h", "?"]
    assert tokenizer.convert_ids_to_tokens(ids[1][mask[1].bool()].tolist()) == [bos, "a", "b", "?"]
    assert mask.tolist() == [[1] * 5, [0, 1, 1, 1, 1]]
    ids, _ = sampler.encode(["abcdefgh?"], "cpu")  # no BOS: simply the last 5 tokens
    assert tokenizer.convert_ids_to_tokens(ids[0].tolist()) == ["e", "f", "g", "h", "?"]


def test_a_bos_written_by_a_template_is_not_doubled_beside_plain_prompts():
    """One batch with a templated prompt (its text starts with BOS) and a plain one: each gets one BOS
    (the tokenizer adds it to the plain one only), the same ids as when each is encoded alone."""
    from tokenizers import processors

    tok = toy.make_tokenizer()
    bos, bos_id = tok.bos_token, tok.bos_token_id
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, bos_id)]
    )
    sampler = Sampler(tok, max_new_tokens=2)
    both, mask = sampler.encode([bos + "ab?", "cd?"], "cpu")
    for i, text in enumerate([bos + "ab?", "cd?"]):
        alone, _ = sampler.encode([text], "cpu")
        assert both[i][mask[i].bool()].tolist() == alone[0].tolist()
        assert alone[0].tolist().count(bos_id) == 1


def test_a_chat_rendered_prompt_gets_no_special_tokens_a_plain_one_its_bos(tmp_path):
    """A tokenizer that adds BOS with a chat template that does not write it (Phi-3's): the rollout's
    prompt ids are the template's own, as SFT and apply_chat_template(tokenize=True) see them, not BOS +
    template; a plain text prompt beside it keeps its BOS."""
    import json

    from tokenizers import processors

    from reinforce_lm.data import load_prompts

    tok = toy.make_tokenizer()
    bos, bos_id = tok.bos_token, tok.bos_token_id
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, bos_id)]
    )
    chat = [{"role": "user", "content": "ab?"}]
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"messages": chat}) + "\n" + json.dumps({"prompt": "cd?"}) + "\n")
    data = load_prompts(path, tok)
    model = toy.make_model("llama", tok)
    r = Sampler(tok, max_new_tokens=2).sample(
        model, data.texts, torch.arange(2), 1, templated=data.is_templated([0, 1])
    )
    got = [row[m.bool()].tolist() for row, m in zip(r.prompt_ids, r.prompt_mask, strict=True)]
    templated = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
    assert got[0] == list(getattr(templated, "input_ids", templated)) and got[0][0] != bos_id
    assert got[1] == [bos_id] + tok("cd?", add_special_tokens=False)["input_ids"]


def test_a_tokenizer_and_model_without_eos_are_warned_about_once(tokenizer):
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.eos_token = None
    model = toy.make_model("llama", tokenizer).eval()
    model.generation_config.eos_token_id = None
    sampler = Sampler(tok, max_new_tokens=4)
    with pytest.warns(UserWarning, match="no EOS token|has an EOS token"):
        r = sampler.sample(model, ["ab", "c"], torch.arange(2), 1)
    assert r.response_mask.sum(1).tolist() == [4, 4]  # every completion runs to max_new_tokens
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sampler.sample(model, ["ab"], torch.arange(1), 1)  # once


def test_a_prompt_with_no_tokens_is_named(tokenizer):
    """A prompt that tokenizes to nothing (an empty one, with a tokenizer that adds no BOS) has nothing to
    sample after: a DataError naming it, not an error from `max()` of an empty tensor."""
    from reinforce_lm.errors import DataError

    model = toy.make_model("llama", tokenizer)
    with pytest.raises(DataError, match=r"prompt 1 \(''\) has no tokens"):
        Sampler(tokenizer, max_new_tokens=2).sample(model, ["a?", ""], torch.arange(2), 1)
