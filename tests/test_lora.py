"""LoRA through peft: only adapters train; the reference is the base model with the adapter disabled."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from reinforce_lm import cli, toy
from reinforce_lm.config import TrainConfig
from reinforce_lm.distributed import Dist
from reinforce_lm.errors import ConfigError
from reinforce_lm.files import write_jsonl
from reinforce_lm.logprobs import token_logprobs
from reinforce_lm.lora import RefViaDisabledAdapter, apply_lora
from reinforce_lm.models import forward_kwargs, load_causal_lm
from reinforce_lm.runner import load_reference

peft = pytest.importorskip("peft")
REWARD = "reinforce_lm.toy:letter_reward"


def padded_batch(tok):
    """Left-padded prompts of different lengths + a response: position ids must follow the mask."""
    prompts = ["a?", "1+1+1+b?", "c?"]
    enc = tok(prompts, return_tensors="pt", padding=True)
    resp = torch.tensor([[5, 6, 7], [8, 9, 10], [11, 12, 13]])
    ids = torch.cat([enc.input_ids, resp], 1)
    attn = torch.cat([enc.attention_mask, torch.ones_like(resp)], 1)
    return ids, attn, resp.shape[1]


def test_reference_logprobs_are_the_base_models(llama_dir, tokenizer):
    base = load_causal_lm(str(llama_dir))
    policy = apply_lora(load_causal_lm(str(llama_dir)), 4, 16.0, 0.0, "all-linear")
    with torch.no_grad():  # a trained adapter: lora_B is no longer zero
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    ids, attn, T = padded_batch(tokenizer)
    ref = RefViaDisabledAdapter(policy)
    assert "position_ids" in forward_kwargs(ref, attn)  # through the PEFT wrapper to the HF model
    with torch.inference_mode():
        ref_logp = token_logprobs(ref, ids, attn, T)
        base_logp = token_logprobs(base, ids, attn, T)
        policy_logp = token_logprobs(policy, ids, attn, T)
    torch.testing.assert_close(ref_logp, base_logp, rtol=0, atol=1e-5)
    assert (policy_logp - base_logp).abs().max() > 1e-2  # the adapter is on again afterwards


def test_runner_uses_the_disabled_adapter_not_a_second_copy(llama_dir):
    cfg = TrainConfig(model=str(llama_dir), prompts="p.jsonl", reward=["m:f"], lora_r=4, beta=0.1)
    policy = apply_lora(load_causal_lm(str(llama_dir)), 4, 16.0, 0.0, "all-linear")
    ref = load_reference(cfg, Dist(), policy)
    assert isinstance(ref, RefViaDisabledAdapter) and ref.policy is policy


def test_lora_run_trains_only_adapters_and_saves_a_loadable_merged_model(tmp_path, llama_dir):
    from transformers import AutoModelForCausalLM

    prompts = tmp_path / "prompts.jsonl"
    write_jsonl(prompts, toy.letter_prompts(8))
    # a dense score (the letter reward of an untrained model is often 0 for every sample: no update)
    (tmp_path / "dense.py").write_text(
        "def score(prompts, completions, **_):\n    return [sum(map(ord, c)) % 7 / 7 for c in completions]\n"
    )
    out = tmp_path / "out"
    cli.main(
        [
            "train",
            f"--model={llama_dir}",
            f"--prompts={prompts}",
            f"--reward={tmp_path / 'dense.py'}:score",
            f"--output-dir={out}",
            "--steps=2",
            "--prompts-per-step=2",
            "--samples-per-prompt=4",
            "--max-new-tokens=6",
            "--lr=5e-2",
            "--lora-r=4",
            "--no-progress",
        ]
    )
    ckpt = out / "checkpoint-2"
    start = load_file(llama_dir / "model.safetensors")
    # the adapter alone, on the untouched base: base weights equal the start, adapters moved
    trained = peft.PeftModel.from_pretrained(load_causal_lm(str(llama_dir)), str(ckpt / "adapter"))
    n_base = 0
    for name, p in trained.named_parameters():
        if "lora_" in name:
            continue
        key = name.removeprefix("base_model.model.").replace(".base_layer", "")
        assert torch.equal(p, start[key]), name
        n_base += 1
    assert n_base == len(start)
    assert any(p.abs().max() > 0 for n, p in trained.named_parameters() if "lora_B" in n)
    # the top level is the merged model: plain transformers loads it, and it computes the same
    merged = AutoModelForCausalLM.from_pretrained(ckpt)
    ids = torch.tensor([[3, 10, 11, 12, 13]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, trained(input_ids=ids).logits, rtol=0, atol=1e-4)
    assert max((merged.state_dict()[k] - v).abs().max().item() for k, v in start.items()) > 1e-4


def test_an_adapter_saved_from_a_relative_model_path_loads_from_anywhere(tmp_path, llama_dir, monkeypatch):
    """peft records the base as named; `--model runs/sft` gave an adapter that loaded only from the
    directory the run started in. Now its base path is absolute and it carries the tokenizer."""
    from reinforce_lm.models import load_tokenizer

    write_jsonl(tmp_path / "prompts.jsonl", toy.letter_prompts(4))
    monkeypatch.chdir(llama_dir.parent)
    args = ["train", f"--model={llama_dir.name}", f"--prompts={tmp_path / 'prompts.jsonl'}", "--no-progress"]
    args += [f"--reward={REWARD}", f"--output-dir={tmp_path / 'out'}", "--steps=1", "--prompts-per-step=2"]
    cli.main(args + ["--samples-per-prompt=2", "--max-new-tokens=4", "--lora-r=2"])
    adapter = tmp_path / "out" / "checkpoint-1" / "adapter"
    monkeypatch.chdir(tmp_path)
    model = peft.AutoPeftModelForCausalLM.from_pretrained(adapter)
    assert model.peft_config["default"].base_model_name_or_path == str(llama_dir.resolve())
    assert load_tokenizer(str(adapter)).get_vocab() == load_tokenizer(str(llama_dir)).get_vocab()


def test_hf_backend_ignores_the_base_models_generation_config_under_lora(llama_dir, tokenizer):
    """peft's generate() runs the base model's, which reads the base's generation_config: the one the
    hf backend must blank out, not an attribute on the wrapper."""
    import copy

    from transformers import GenerationConfig

    from reinforce_lm.rollout import Sampler

    model = apply_lora(load_causal_lm(str(llama_dir)), 4, 8.0, 0.0, "all-linear")
    plain = copy.deepcopy(model)
    model.get_base_model().generation_config = GenerationConfig(do_sample=True, top_k=2, temperature=0.3)
    sampler = Sampler(tokenizer, max_new_tokens=6, backend="hf")
    runs = []
    for m in (model, plain):
        torch.manual_seed(1)
        runs.append(sampler.sample(m, ["a?", "b?"], torch.arange(2), 8).response_ids)
    assert torch.equal(*runs)
    assert model.get_base_model().generation_config.top_k == 2  # put back


def test_chunked_head_with_an_adapter_on_the_head(monkeypatch, llama_dir, tokenizer):
    """LoRA on the LM head too: the chunked head runs inside the forward, so the reference (adapter
    disabled) scores with the base head and the policy with its adapted head, as the model's logits do."""
    from reinforce_lm import logprobs

    base = load_causal_lm(str(llama_dir))
    policy = apply_lora(load_causal_lm(str(llama_dir)), 4, 16.0, 0.0, "q_proj,v_proj,lm_head")
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    ids, attn, T = padded_batch(tokenizer)
    ref = RefViaDisabledAdapter(policy)
    with torch.inference_mode():
        whole = [token_logprobs(m, ids, attn, T) for m in (ref, base, policy)]
        monkeypatch.setattr(logprobs, "CHUNK_ELEMENTS", 2 * base.config.vocab_size)  # 2 tokens per chunk
        chunked = [token_logprobs(m, ids, attn, T) for m in (ref, base, policy)]
    for a, b in zip(whole, chunked, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    torch.testing.assert_close(chunked[0], chunked[1], rtol=0, atol=1e-5)
    assert (chunked[2] - chunked[1]).abs().max() > 1e-2


def test_unknown_target_modules_name_the_model_layers(llama_dir):

    with pytest.raises(ConfigError, match=r"named 'qproj'; its layers are .*q_proj.*did you mean 'q_proj'"):
        apply_lora(load_causal_lm(str(llama_dir)), 4, 16.0, 0.0, "qproj,v_proj")
    apply_lora(load_causal_lm(str(llama_dir)), 4, 16.0, 0.0, "self_attn.q_proj, v_proj")  # suffixes work


def test_an_adapter_directory_as_the_policy_is_refused_with_the_merged_model_named(
    tmp_path, llama_dir, capsys
):
    """`--model RUN/checkpoint-N/adapter` loaded as a frozen base plus an inference adapter: an optimizer
    with no parameters (or peft wrapping it twice under --lora-r). The error names the merged model."""
    prompts = tmp_path / "prompts.jsonl"
    write_jsonl(prompts, toy.letter_prompts(8))
    common = [
        f"--prompts={prompts}",
        "--reward=reinforce_lm.toy:letter_reward",
        "--prompts-per-step=2",
        "--samples-per-prompt=2",
        "--max-new-tokens=4",
        "--no-progress",
    ]
    out = tmp_path / "out"
    cli.main(["train", f"--model={llama_dir}", f"--output-dir={out}", "--steps=1", "--lora-r=4", *common])
    adapter = out / "checkpoint-1" / "adapter"
    for lora in ([], ["--lora-r=4"]):
        with pytest.raises(SystemExit):
            cli.main(
                [
                    "train",
                    f"--model={adapter}",
                    f"--output-dir={tmp_path / 'again'}",
                    "--steps=1",
                    *lora,
                    *common,
                ]
            )
        err = capsys.readouterr().err
        assert "is a LoRA adapter directory" in err and f"({out / 'checkpoint-1'})" in err


def test_wrapping_a_model_raises_no_deprecation_warning_of_peft_s(llama_dir):
    """peft reads transformers 5's deprecated `is_gradient_checkpointing`: every LoRA run printed it."""
    import warnings

    model = load_causal_lm(str(llama_dir))
    model.gradient_checkpointing_enable()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        apply_lora(model, 4, 16.0, 0.0, "all-linear")
