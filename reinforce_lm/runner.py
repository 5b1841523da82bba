"""Builders: turn a config into models, data, rewards and a stage, then hand them to the one loop.

Each `run_<command>(cfg) -> exit code` is what the CLI calls; they are also the library's Python entry
points (`from reinforce_lm.runner import run_train`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import socket
import sys
from pathlib import Path

import torch

from reinforce_lm import checkpoint, distributed
from reinforce_lm.data import end_of_turn_id, load_prompts
from reinforce_lm.errors import ConfigError, DataError, ReinforceLMError, RewardError
from reinforce_lm.lora import RefViaDisabledAdapter, apply_lora
from reinforce_lm.metrics import MetricsLogger
from reinforce_lm.models import (
    disable_dropout,
    embedding_rows,
    enable_activation_checkpointing,
    freeze,
    load_causal_lm,
    load_tokenizer,
    positions,
    resolve_model_path,
    sampling_settings,
)
from reinforce_lm.rewards import build_rewards
from reinforce_lm.runconfig import check_same_kind, write_run_config
from reinforce_lm.trainer import fit


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def prepare_output(cfg) -> Path | None:
    """The checkpoint to resume from, or None; refuses to overwrite a run without --resume, to resume a
    different kind of run, or an output directory it cannot write (before any model is loaded)."""
    out = Path(cfg.output_dir)
    inputs = [("--model", cfg.model), ("--ref-model", getattr(cfg, "ref_model", ""))]
    inputs += [("--critic-model", getattr(cfg, "critic_model", ""))]
    inputs += [("--reward-model", p) for p in getattr(cfg, "reward_model", [])]
    for flag, path in inputs:
        if path and out.resolve() == Path(path).expanduser().resolve():
            raise ConfigError(
                f"--output-dir {out} is the {flag} directory: its checkpoints would make {flag} mean the "
                "run's latest checkpoint instead of that model (on --resume too); choose another --output-dir"
            )
        try:  # a run directory as the model means its latest checkpoint: that one is an input too
            model_dir = Path(resolve_model_path(path)).resolve() if path else None
        except ConfigError:  # not a model (yet): loading it reports that
            model_dir = None
        if model_dir and out.resolve() == model_dir:
            raise ConfigError(
                f"--output-dir {out} is {flag} {path}'s latest checkpoint, the model it loads: its own "
                f"checkpoints would make {flag} mean this run's latest one; choose another --output-dir"
            )
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{socket.gethostname()}-{os.getpid()}"  # ranks may share storage
        probe.touch()
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"--output-dir {out}: cannot write there ({err.strerror or err})") from None
    found = checkpoint.latest_checkpoint(out)
    if cfg.resume:
        if found is None:
            print(f"--resume: no checkpoint in {out}, starting from scratch")
        else:
            check_same_kind(cfg, out)
        return found
    if found is not None:
        raise ConfigError(
            f"{out} already holds a run ({found.name}); "
            "pass --resume to continue it or choose another --output-dir"
        )
    return None


def same_vocabulary(path: str, tokenizer) -> bool:
    """Whether the tokenizer at `path` maps every token to the id that `tokenizer` does. A model saved
    without tokenizer files (`save_pretrained` alone) cannot say: it is taken at its word."""
    try:
        other = load_tokenizer(path)
    except ConfigError:
        return True
    return other.get_vocab() == tokenizer.get_vocab()


def check_vocabulary(path: str, tokenizer, what: str, flag: str) -> None:
    """A model that reads the policy's token ids (the reference, a critic) must share its tokenizer."""
    if not same_vocabulary(path, tokenizer):
        raise ConfigError(
            f"{flag} {path}: its tokenizer differs from the policy's, but the {what} reads the policy's "
            "token ids; use a model with the policy's tokenizer"
        )


def check_token_ids(model, tokenizer, examples: list[dict], keys: tuple[str, ...], path: str) -> None:
    """Every token id of the data (and the pad id) has a row in the model's embedding: a tokenizer with
    tokens the model was never resized for is a DataError naming the example, not an index error mid-step.
    Scanned only when the tokenizer is larger than the embedding."""
    rows = embedding_rows(model)
    if rows is None or len(tokenizer) <= rows:
        return
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id >= rows:
        raise DataError(
            f"the pad token id {tokenizer.pad_token_id} is past the model's embedding ({rows} rows)"
        )
    for i, ex in enumerate(examples):
        for key in keys:
            if ex[key] and max(ex[key]) >= rows:
                where = ex.get("source") or f"{path}: example {i}"  # packed examples have no one row
                raise DataError(
                    f"{where} has token id {max(ex[key])}, but the model's embedding has {rows} "
                    "rows: its tokenizer has tokens the model was not resized for (resize_token_embeddings)"
                )


def context_length(path: str) -> int | None:
    """Positions the model at `path` covers, from its config (None where the config does not say)."""
    from transformers import AutoConfig

    try:
        return positions(AutoConfig.from_pretrained(resolve_model_path(path)))
    except (OSError, ValueError):  # e.g. a PEFT adapter directory: loading the model will say more
        return None


def fit_to_context(cfg, key: str, paths: str | list[str], d, reserve: int = 0):
    """`cfg` with `key` lowered so that `key` + `reserve` tokens fit the positions of every model at
    `paths` (all of them read the same token ids: policy, reference, critic), with a note where the value
    was set, not defaulted. Past them, models with learned positions (GPT-2, OPT) fail with an index
    error and rotary ones degrade."""
    known = [
        (n, p)
        for p in dict.fromkeys([paths] if isinstance(paths, str) else paths)
        if (n := context_length(p))
    ]
    if not known:
        return cfg
    ctx, path = min(known)
    if getattr(cfg, key) + reserve <= ctx:
        return cfg
    if reserve >= ctx:
        raise ConfigError(f"max_new_tokens={reserve} leaves no room for a prompt: {path} has {ctx} positions")
    default = {f.name: f.default for f in dataclasses.fields(cfg)}.get(key)
    if d.is_main and getattr(cfg, key) != default:  # a default that does not fit is fitted quietly
        print(f"note: {key} lowered from {getattr(cfg, key)} to {ctx - reserve} tokens: {path} has {ctx} "
              f"positions" + (f" and max_new_tokens is {reserve}" if reserve else ""))  # fmt: skip
    return dataclasses.replace(cfg, **{key: ctx - reserve})


def stop_at_end_of_turn(sampler, tokenizer, datasets: list, model, d) -> None:
    """Chat prompts: stop completions at the token that ends the assistant's turn in the template, where
    neither the tokenizer's EOS nor the model's generation_config lists it (a base Qwen's EOS is
    <|endoftext|>, its template ends turns with <|im_end|>): else they run to max_new_tokens and on into
    invented turns."""
    chat = any(any(data.templated) for data in datasets if data is not None)
    end = end_of_turn_id(tokenizer) if chat else None
    if end is not None and end not in sampler.eos_ids(model):
        sampler.stop_ids.add(end)
        if d.is_main:
            print(f"note: completions also stop at {tokenizer.convert_ids_to_tokens(end)!r}, which ends "
                  "the assistant's turn in the chat template (it is not the model's EOS)")  # fmt: skip


def note_sampling(cfg, model, d) -> None:
    """Say once where the model's generation_config.json would sample otherwise than this run does."""
    theirs = sampling_settings(model)
    if theirs and d.is_main:
        ours = f"temperature {cfg.temperature}, top_p {cfg.top_p}, top_k {cfg.top_k}"
        listed = ", ".join(f"{k} {v}" for k, v in theirs.items())
        print(f"note: {cfg.model}'s generation_config.json samples with {listed}; this run samples with "
              f"{ours} (--temperature, --top-p, --top-k), not with those")  # fmt: skip


def load_policy(cfg, d, init_path: str, resume=None):
    # FSDP moves each shard to the device as it shards, so the whole model only ever sits in CPU memory.
    sharded = cfg.fsdp and d.enabled
    p = Path(init_path)
    if (p / "adapter_config.json").is_file() and not (p / "config.json").is_file():
        # transformers loads it as a frozen base with an inference adapter: nothing to train (and peft
        # wraps it a second time under --lora-r)
        raise ConfigError(
            f"--model {init_path} is a LoRA adapter directory; a policy trains from a whole model: the "
            f"merged model of that checkpoint ({p.resolve().parent}), with --lora-r for new adapters, or "
            "--resume the run it came from"
        )
    if cfg.lora_r and resume is not None:  # a LoRA checkpoint is merged: train on from base + adapter
        init_path = cfg.model
    policy = load_causal_lm(init_path, cfg.dtype, "cpu" if sharded else d.device)
    disable_dropout(policy)
    if cfg.gradient_checkpointing:
        enable_activation_checkpointing(policy)
        policy.config.use_cache = True  # the sampler needs the cache; checkpointing only applies in train()
    if cfg.lora_r:
        adapter = str(Path(resume) / "adapter") if resume is not None else None
        policy = apply_lora(
            policy, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules, adapter
        )
    policy.train()
    return policy


def load_reference(cfg, d, policy):
    """The frozen reference: the LoRA policy with its adapter off, else a copy (sharded under FSDP)."""
    if cfg.lora_r and cfg.ref_model in ("", cfg.model):
        return RefViaDisabledAdapter(policy)
    if cfg.fsdp and d.enabled:
        return distributed.shard(freeze(load_causal_lm(cfg.ref_model or cfg.model, cfg.dtype, "cpu")))
    return freeze(load_causal_lm(cfg.ref_model or cfg.model, cfg.dtype, d.device))


def build_train_stage(cfg, d, resume=None):
    """Tokenizer, prompts, rewards, policy, reference -> the REINFORCE or PPO stage for `fit`."""
    if cfg.prompts_per_step % d.world_size:  # all K samples of a prompt stay on one process
        raise ConfigError(f"prompts_per_step={cfg.prompts_per_step} must divide by {d.world_size} processes")
    tokenizer = load_tokenizer(cfg.model)
    readers = [cfg.model]  # every model that reads the rollouts' token ids must hold them
    if cfg.beta > 0 and cfg.ref_model:
        readers.append(cfg.ref_model)
    if cfg.algorithm == "ppo":
        from reinforce_lm.stages.ppo import critic_source

        readers.append(critic_source(cfg, tokenizer))
    cfg = fit_to_context(cfg, "max_prompt_length", readers, d, reserve=cfg.max_new_tokens)
    if cfg.beta > 0 and cfg.ref_model and cfg.ref_model != cfg.model:
        check_vocabulary(cfg.ref_model, tokenizer, "reference", "--ref-model")
    if cfg.algorithm == "ppo" and cfg.critic_model:
        check_vocabulary(cfg.critic_model, tokenizer, "critic", "--critic-model")
    prompts = load_prompts(cfg.prompts, tokenizer, cfg.prompt_column, cfg.messages_column)
    eval_prompts = None
    if cfg.eval_prompts:
        eval_prompts = load_prompts(cfg.eval_prompts, tokenizer, cfg.prompt_column, cfg.messages_column)
    rewards = build_rewards(
        cfg.reward, cfg.reward_model, cfg.reward_weights or None, str(d.device), cfg.messages_column
    )
    for data in (prompts, eval_prompts):  # a column a reward needs is missing: say so before training
        if data is not None:
            rewards.check(data.columns)
    policy = load_policy(cfg, d, str(resume) if resume else cfg.model, resume)
    note_sampling(cfg, policy, d)
    reference = None
    if cfg.beta > 0:  # beta == 0: no reference model is loaded at all
        reference = load_reference(cfg, d, policy)
    if cfg.algorithm == "ppo":
        from reinforce_lm.stages.ppo import build_ppo_stage

        stage = build_ppo_stage(cfg, policy, tokenizer, reference, rewards, prompts, d, eval_prompts, resume)
    else:
        from reinforce_lm.stages.reinforce import ReinforceStage

        policy = distributed.wrap(policy, d, fsdp=cfg.fsdp)
        stage = ReinforceStage(cfg, policy, tokenizer, reference, rewards, prompts, d, eval_prompts)
    if cfg.fsdp and d.enabled:  # sharded forwards are collective: ranks stop decoding together
        stage.sampler.sync_stop = d.all_true
    stop_at_end_of_turn(stage.sampler, tokenizer, [prompts, eval_prompts], distributed.unwrap(policy), d)
    if d.is_main:
        method = "ppo" if cfg.algorithm == "ppo" else cfg.estimator
        n = sum(p.numel() for p in policy.parameters())  # FSDP2's DTensors report their full size
        ref = "none (beta=0)" if reference is None else (cfg.ref_model or cfg.model)
        print(
            f"train: {method} on {len(prompts)} prompts, {cfg.prompts_per_step} x {cfg.samples_per_prompt} "
            f"samples per step on {d.world_size} process(es) ({d.device}); "
            f"policy {n / 1e6:.3g}M parameters; "
            f"reference: {ref}; rewards: {', '.join(rewards.names)}"
        )
    return stage


def log_initial_eval(stage, cfg, d) -> dict[str, float]:
    """Evaluate the starting model and log it as step 0 of metrics.jsonl (kept by the loop's logger)."""
    metrics = stage.evaluate()
    if metrics:
        logger = MetricsLogger(cfg.output_dir, cfg.steps, 0, enabled=d.is_main, progress=False)
        logger.log(0, metrics)
        logger.close()
        if d.is_main:
            print("before training: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    return metrics


def run_stage(cfg, build, use_as: str = "--model") -> int:
    """The life of every run: processes, seed, resume, `build(cfg, d, resume) -> stage`, a step-0
    evaluation, the one loop, and the closing line. Returns the exit code (130 when interrupted)."""
    d = distributed.setup(cfg.device)
    hf_bars = contextlib.ExitStack()
    try:
        if not cfg.progress:  # no transformers bars either (from Python: the CLI turns them all off)
            hf_bars.enter_context(checkpoint.quiet_hf_progress())
        seed_everything(cfg.seed)
        if getattr(cfg, "fsdp", False) and not d.enabled:
            print("note: --fsdp shards over torchrun's processes; this is one process, which trains the "
                  "whole model")  # fmt: skip
        fresh = not Path(cfg.output_dir).exists()
        resume = prepare_output(cfg)
        done = checkpoint.step_of(resume) if resume is not None else 0
        if done >= cfg.steps:  # nothing to train; run_config.json keeps describing the model there
            if d.is_main:
                print(f"{cfg.output_dir} is already at step {done} (--steps {cfg.steps}): nothing to do; "
                      f"the model is {resume}")  # fmt: skip
            return 0
        try:
            stage = build(cfg, d, resume)
        except ReinforceLMError:  # bad data, options or models: leave no empty --output-dir behind
            if fresh and d.is_main:
                with contextlib.suppress(OSError):  # not empty (another process wrote there): keep it
                    Path(cfg.output_dir).rmdir()
            raise
        cfg = getattr(stage, "cfg", cfg)  # a stage may settle defaults that depend on its data
        write_run_config(cfg, d, resumed=resume is not None)
        if d.is_main and resume is not None:
            print(f"resuming from {resume}, towards step {cfg.steps}")
        if d.is_main and cfg.warmup_steps >= cfg.steps and resume is None:
            print(f"note: --warmup-steps {cfg.warmup_steps} is not below --steps {cfg.steps}: the learning "
                  f"rate never reaches --lr {cfg.lr:g} in this run")  # fmt: skip
        try:
            if resume is None:
                log_initial_eval(stage, cfg, d)
            result = fit(stage, cfg, d, resume_from=resume)
        except (RewardError, DataError) as err:
            if d.world_size > 1:  # this process's prompts or rewards: the others may not have hit it
                err.rank = d.rank
            raise
        if d.is_main:
            what = "interrupted; checkpoint" if result["interrupted"] else "done; model"
            again = ", or --resume to continue the run" if result["interrupted"] else ""
            print(f"{what} at {result['checkpoint']} (step {result['step']}); pass {use_as} {cfg.output_dir}"
                  f"{again}")  # fmt: skip
        return 130 if result["interrupted"] else 0
    finally:
        hf_bars.close()
        distributed.teardown(clean=sys.exc_info()[0] is None)


def run_train(cfg) -> int:
    """`reinforce-lm train`: REINFORCE estimators or PPO."""
    return run_stage(cfg, build_train_stage)


def evaluate(cfg, d):
    """Mean reward and (prompt, completion, score) rows of `cfg.model` on `cfg.prompts` (an EvalConfig)."""
    from reinforce_lm.rollout import Sampler
    from reinforce_lm.stages.reinforce import evaluate_policy

    tokenizer = load_tokenizer(cfg.model)
    cfg = fit_to_context(cfg, "max_prompt_length", cfg.model, d, reserve=cfg.max_new_tokens)
    prompts = load_prompts(cfg.prompts, tokenizer, cfg.prompt_column, cfg.messages_column)
    rewards = build_rewards(
        cfg.reward, cfg.reward_model, cfg.reward_weights or None, str(d.device), cfg.messages_column
    )
    rewards.check(prompts.columns)
    model = freeze(load_causal_lm(cfg.model, cfg.dtype, d.device))
    if not cfg.greedy:
        note_sampling(cfg, model, d)
    sampler = Sampler.from_config(tokenizer, cfg)
    stop_at_end_of_turn(sampler, tokenizer, [prompts], model, d)
    mean, rows = evaluate_policy(model, sampler, rewards, prompts, cfg.seed, d, greedy=cfg.greedy)
    return mean, d.gather_shares(rows)  # every rank's rows, in the file's order


def run_eval(cfg) -> int:
    d = distributed.setup(cfg.device)
    try:
        mean, rows = evaluate(cfg, d)
        if d.is_main:
            names = [getattr(r, "__name__", str(r)) for r in cfg.reward] + list(cfg.reward_model)
            weights = f" x {cfg.reward_weights}" if cfg.reward_weights else ""
            print(f"mean reward over {cfg.prompts} of {cfg.model} ({', '.join(names)}{weights}): {mean:.4f}")
            for prompt, completion, score in rows[: cfg.show]:
                # a long prompt's end: the text that leads to the completion
                end = prompt if len(prompt) <= 200 else "..." + prompt[-200:]
                print(f"  [{score:+.3f}] {end!r} -> {completion!r}")
        return 0
    finally:
        distributed.teardown(clean=sys.exc_info()[0] is None)


def run_eval_mean(model: str, prompts: str, reward: list[str], reward_model=(), **kw) -> float:
    """Python shortcut: the mean reward of `model` on `prompts` (single process)."""
    from reinforce_lm.config import EvalConfig

    cfg = EvalConfig(model=model, prompts=prompts, reward=list(reward), reward_model=list(reward_model), **kw)
    return evaluate(cfg, distributed.setup(cfg.device))[0]
