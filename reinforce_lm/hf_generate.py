"""The `hf` sampling backend: transformers' `generate`, for models whose forward has no usable KV cache
(`rollout.Sampler` falls back to it) or on request (`--generation-backend hf`). It records no
log-probs; the update computes them."""

from __future__ import annotations

import torch


def generate(
    model,
    ids: torch.Tensor,
    mask: torch.Tensor,
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    top_k: int,
    greedy: bool,
    pad_id: int,
    eos_ids: list[int],
    synced: bool = False,
) -> torch.Tensor:
    """Left-padded prompts ids/mask [B, Lp] -> response ids [B, T] (T >= 1), with these settings alone.

    `generate` fills every field left unset from the model's generation_config.json (Qwen's: top_k 20,
    top_p 0.8, repetition_penalty 1.05), which would sample from another distribution than the one the
    update's log-probs are of; so the model's config is swapped for a blank one during the call (the
    base model's under peft, whose generate reads it), and transformers' neutral defaults fill in.
    `synced`: every rank decodes until all are done (FSDP's collective forwards)."""
    from transformers import GenerationConfig

    cfg = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=not greedy,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,  # 0: off (transformers' own default is 50)
        pad_token_id=pad_id,
        eos_token_id=eos_ids,
    )
    owner = model.get_base_model() if hasattr(model, "get_base_model") else model
    own, owner.generation_config = owner.generation_config, GenerationConfig()
    try:
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=cfg, synced_gpus=synced)
    finally:
        owner.generation_config = own
    resp = out[:, ids.shape[1] :]
    if resp.shape[1] == 0:
        resp = torch.full((ids.shape[0], 1), pad_id, device=ids.device)
    return resp
