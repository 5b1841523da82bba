"""Builders: turn a config into models, data, rewards and a stage, then hand them to the one loop.

Each `run_<command>(cfg) -> exit code` is what the CLI calls; they are also the library's Python entry
points (`from reinforce_lm.runner import run_train`).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from reinforce_lm import checkpoint, distributed
from reinforce_lm.data import load_prompts
from reinforce_lm.errors import ConfigError
from reinforce_lm.models import disable_dropout, freeze, load_causal_lm, load_tokenizer
from reinforce_lm.rewards import build_rewards
from reinforce_lm.trainer import fit


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def prepare_output(cfg) -> Path | None:
    """The checkpoint to resume from, or None; refuses to overwrite a run without --resume."""
    out = Path(cfg.output_dir)
    found = checkpoint.latest_checkpoint(out)
    if cfg.resume:
        if found is None:
            print(f"--resume: no checkpoint in {out}, starting from scratch")
        return found
    if found is not None:
        raise ConfigError(
            f"{out} already holds a run ({found.name}); "
            "pass --resume to continue it or choose another --output-dir"
        )
    return None


def load_policy(cfg, d, init_path: str):
    policy = load_causal_lm(init_path, cfg.dtype, d.device)
    disable_dropout(policy)
    if cfg.gradient_checkpointing:
        policy.gradient_checkpointing_enable()
        policy.config.use_cache = True  # the sampler needs the cache; checkpointing only applies in train()
    policy.train()
    return policy


def run_train(cfg) -> int:
    d = distributed.setup(cfg.device)
    try:
        seed_everything(cfg.seed)
        resume = prepare_output(cfg)
        tokenizer = load_tokenizer(cfg.model)
        prompts = load_prompts(cfg.prompts, tokenizer, cfg.prompt_column, cfg.messages_column)
        eval_prompts = None
        if cfg.eval_prompts:
            eval_prompts = load_prompts(cfg.eval_prompts, tokenizer, cfg.prompt_column, cfg.messages_column)
        rewards = build_rewards(
            cfg.reward, cfg.reward_model, cfg.reward_weights or None, device=str(d.device)
        )
        rewards.check(prompts.columns)
        policy = load_policy(cfg, d, str(resume) if resume else cfg.model)
        reference = None
        if cfg.beta > 0:  # beta == 0: no reference model is loaded at all
            reference = freeze(load_causal_lm(cfg.ref_model or cfg.model, cfg.dtype, d.device))
        if cfg.algorithm == "ppo":
            from reinforce_lm.stages.ppo import build_ppo_stage

            stage = build_ppo_stage(
                cfg, policy, tokenizer, reference, rewards, prompts, d, eval_prompts, resume
            )
        else:
            from reinforce_lm.stages.reinforce import ReinforceStage

            policy = distributed.wrap(policy, d)
            stage = ReinforceStage(cfg, policy, tokenizer, reference, rewards, prompts, d, eval_prompts)
        if d.is_main:
            Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
            (Path(cfg.output_dir) / "config.json").write_text(json.dumps(vars(cfg), indent=2, default=str))
        result = fit(stage, cfg, d, resume_from=resume)
        if d.is_main:
            what = "interrupted; checkpoint" if result["interrupted"] else "done; model"
            print(f"{what} at {result['checkpoint']} (step {result['step']})")
        return 130 if result["interrupted"] else 0
    finally:
        distributed.teardown()


def run_eval(cfg) -> int:
    from reinforce_lm.rollout import Sampler
    from reinforce_lm.stages.reinforce import evaluate_policy

    d = distributed.setup(cfg.device)
    try:
        tokenizer = load_tokenizer(cfg.model)
        prompts = load_prompts(cfg.prompts, tokenizer, cfg.prompt_column, cfg.messages_column)
        rewards = build_rewards(
            cfg.reward, cfg.reward_model, cfg.reward_weights or None, device=str(d.device)
        )
        rewards.check(prompts.columns)
        model = freeze(load_causal_lm(cfg.model, cfg.dtype, d.device))
        sampler = Sampler(
            tokenizer, cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.top_k, cfg.max_prompt_length
        )
        mean, rows = evaluate_policy(model, sampler, rewards, prompts, cfg.seed, d, greedy=cfg.greedy)
        if d.is_main:
            print(f"mean reward over {len(prompts)} prompts: {mean:.4f}")
            for prompt, completion, score in rows[: cfg.show]:
                print(f"  [{score:+.3f}] {prompt!r} -> {completion!r}")
        return 0
    finally:
        distributed.teardown()
