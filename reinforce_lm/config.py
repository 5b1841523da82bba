"""Typed configuration: dataclasses whose field `help` is the `--help` text. defaults < YAML < --flags.

Every value is checked when the config is built (`__post_init__`); an unknown key is an error that
suggests the nearest valid name. Values are parsed from YAML and flags in `options.py`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import warnings
from dataclasses import dataclass, field
from typing import Any

from reinforce_lm.errors import ConfigError
from reinforce_lm.options import build_config, field_type, load_yaml  # noqa: F401  (re-exported)

ESTIMATORS = (
    "none",
    "batch_mean",
    "running_mean",
    "rloo",
    "grpo",
    "dr_grpo",
    "remax",
    "reinforce_pp",
    "reinforce_pp_baseline",
)
LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


def _f(default: Any, help: str, **kw) -> Any:
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


def _choice(cfg, name: str, choices) -> None:
    value = getattr(cfg, name)
    if value not in choices:
        near = difflib.get_close_matches(str(value).lower(), [str(c) for c in choices], n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise ConfigError(f"{name}={value!r} is not one of {', '.join(map(str, choices))}{hint}")


_MAY_BE_INF = ("max_grad_norm", "reward_clip", "clip_eps", "value_clip_eps")  # inf: no clipping


def _changed(cfg, *names: str) -> list[str]:
    """The flags (`--lora-alpha`) of the fields among `names` whose value is not their default."""
    defaults = {f.name: f.default for f in dataclasses.fields(cfg)}
    return ["--" + n.replace("_", "-") for n in names if getattr(cfg, n) != defaults[n]]


def _positive(cfg, *names: str, allow_zero: bool = False) -> None:
    for name in names:
        value = getattr(cfg, name)
        if value is None:
            continue
        if not (value > 0 or (allow_zero and value == 0)):  # also refuses NaN
            raise ConfigError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")
        if value == float("inf") and name not in _MAY_BE_INF:  # lr=inf made every weight NaN
            raise ConfigError(f"{name} must be finite, got {value!r}")


def _fraction(cfg, *names: str) -> None:
    """Probabilities and decays: in [0, 1)."""
    for name in names:
        value = getattr(cfg, name)
        if not 0 <= value < 1:
            raise ConfigError(f"{name} must be in [0, 1), got {value!r}")


def _types(cfg) -> None:
    """Values given from Python have the field's type (flags and YAML are coerced in `build_config`):
    steps="10" is an error here, not a TypeError from a comparison further on."""
    for f in dataclasses.fields(cfg):
        t, value = field_type(type(cfg), f), getattr(cfg, f.name)
        ok = {
            bool: isinstance(value, bool),
            int: isinstance(value, int) and not isinstance(value, bool),
            float: isinstance(value, int | float) and not isinstance(value, bool),
            str: isinstance(value, str),
        }.get(t, True)  # lists are checked where they are used (_rewards)
        if not ok:
            raise ConfigError(f"{f.name} expects {t.__name__}, got {value!r}")


def _device(cfg) -> None:
    """A device torch knows and this machine has: a typo or a missing GPU is an error here, not a
    traceback from deep inside torch once the models are loading."""
    import torch

    if cfg.device == "auto":
        return
    try:
        device = torch.device(cfg.device)
    except RuntimeError:
        raise ConfigError(f"device={cfg.device!r} is not a device: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={cfg.device!r} but CUDA is not available here (torch {torch.__version__})")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"device={cfg.device!r} but this machine has {torch.cuda.device_count()} GPU(s)")


def _rewards(cfg) -> None:
    """`reward` and `reward_model` are lists; from Python a single one may be given as is. Functions are
    FILE.py:FUNCTION / module:FUNCTION strings or (from Python) callables; reward models are paths."""
    from reinforce_lm.rewards import as_list  # None (`reward:` left empty in YAML) is [], one is [one]

    cfg.reward, cfg.reward_model = as_list(cfg.reward), as_list(cfg.reward_model)
    for i, r in enumerate(cfg.reward):
        if not (isinstance(r, str) or callable(r)):
            raise ConfigError(
                f"reward[{i}] = {r!r}: expected FILE.py:FUNCTION, module:FUNCTION or a callable"
            )
    for i, r in enumerate(cfg.reward_model):
        if not isinstance(r, str):
            raise ConfigError(f"reward_model[{i}] = {r!r}: expected a directory or hub id")
    if not cfg.reward and not cfg.reward_model:
        raise ConfigError("no reward: pass --reward FILE.py:FUNC and/or --reward-model DIR")
    w = cfg.reward_weights
    cfg.reward_weights = [w] if isinstance(w, int | float) else as_list(w)
    if cfg.reward_weights and len(cfg.reward_weights) != len(cfg.reward) + len(cfg.reward_model):
        raise ConfigError(
            f"reward_weights has {len(cfg.reward_weights)} values for "
            f"{len(cfg.reward) + len(cfg.reward_model)} rewards (functions first, then models)"
        )
    for i, w in enumerate(cfg.reward_weights):
        if isinstance(w, bool) or not isinstance(w, int | float) or not math.isfinite(w):
            raise ConfigError(f"reward_weights[{i}] = {w!r}: expected a finite number")


def _seed(cfg) -> None:
    if not 0 <= cfg.seed < 2**32:
        raise ConfigError(f"seed must be in [0, 2**32), got {cfg.seed}")


@dataclass
class EngineConfig:
    """Options every stage shares: the model, optimiser, schedule, checkpoints and devices."""

    model: str = _f("", "Policy to train: a local Hugging Face directory or a hub id.", required=True)
    output_dir: str = _f("runs/out", "Where checkpoints, the final model and metrics.jsonl go.")
    steps: int = _f(100, "Number of optimiser steps (for RL: batches of rollouts).")
    lr: float = _f(1e-5, "Peak learning rate of AdamW.")
    warmup_steps: int = _f(0, "Linear learning-rate warm-up, in steps (as --steps counts them).")
    lr_schedule: str = _f("constant", "After warm-up: constant, linear (to 0) or cosine (to 0).")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    max_grad_norm: float = _f(1.0, "Clip the global gradient norm to this value (0 disables clipping).")
    micro_batch_size: int = _f(8, "Sequences per forward/backward; gradients accumulate over the batch.")
    seed: int = _f(0, "Random seed: sampling, data order and initialisation.")
    save_every: int = _f(0, "Write a checkpoint every N steps (0: only at the end and on Ctrl-C).")
    keep_checkpoints: int = _f(2, "How many most recent checkpoints to keep on disk.")
    resume: bool = _f(False, "Continue from the latest checkpoint in output_dir.")
    dtype: str = _f("float32", "Parameter dtype: float32, bfloat16 or float16.")
    device: str = _f("auto", "cpu, cuda, cuda:N or auto (cuda when available, else cpu).")
    gradient_checkpointing: bool = _f(False, "Recompute activations in backward to save memory.")
    mixed_precision: str = _f(
        "no", "bf16: autocast forwards to bfloat16, keeping fp32 weights, gradients and optimiser state."
    )
    fsdp: bool = _f(
        False, "Under torchrun: shard the policy and its optimiser with FSDP2 instead of replicating (DDP)."
    )
    lora_r: int = _f(0, "LoRA rank (needs `pip install 'reinforce-lm[peft]'`); 0 trains all weights.")
    lora_alpha: float = _f(16.0, "LoRA scaling numerator (the update is scaled by lora_alpha / lora_r).")
    lora_dropout: float = _f(0.0, "Dropout on the LoRA branch (0 keeps the sampler and update consistent).")
    lora_target_modules: str = _f(
        "all-linear", "Modules that get adapters: all-linear, or comma-separated names (q_proj,v_proj)."
    )
    progress: bool = _f(True, "Show a progress bar.")

    def __post_init__(self) -> None:
        _types(self)
        if not self.model:
            raise ConfigError("model is required: pass --model DIR_OR_ID (or `model:` in the YAML file)")
        if not self.output_dir.strip():
            raise ConfigError("output_dir is empty: pass --output-dir DIR")
        _positive(self, "steps", "lr", "micro_batch_size", "keep_checkpoints")
        _positive(self, "warmup_steps", "weight_decay", "max_grad_norm", "save_every", allow_zero=True)
        _choice(self, "lr_schedule", ("constant", "linear", "cosine"))
        _choice(self, "dtype", ("float32", "bfloat16", "float16"))
        _choice(self, "mixed_precision", ("no", "bf16"))
        _positive(self, "lora_r", allow_zero=True)
        _fraction(self, "lora_dropout")
        _positive(self, "lora_alpha")
        _device(self)
        _seed(self)
        if self.lora_r and self.fsdp:
            raise ConfigError("lora_r with fsdp is not supported yet: LoRA runs replicate (DDP) instead")
        if not self.lora_r and (
            unused := _changed(self, "lora_alpha", "lora_dropout", "lora_target_modules")
        ):
            warnings.warn(f"{', '.join(unused)} without --lora-r: LoRA is off, and every weight trains",
                          stacklevel=3)  # fmt: skip


@dataclass
class TrainConfig(EngineConfig):
    """`reinforce-lm train`: REINFORCE-family estimators, or PPO with a critic."""

    prompts: str = _f(
        "", "Prompts file (JSONL, CSV, Parquet, JSON or a saved datasets directory).", required=True
    )
    prompt_column: str = _f("prompt", "Column with the prompt text.")
    messages_column: str = _f("messages", "Column with chat messages, rendered with the chat template.")
    reward: list = _f([], "Reward function(s) as path/to/file.py:function or module:function.")
    reward_model: list = _f([], "Learned reward model directory(ies) (AutoModelForSequenceClassification).")
    reward_weights: list = _f([], "Weights of the rewards, functions first then models (default 1 each).")
    ref_model: str = _f("", "Frozen reference model (default: the starting policy, --model).")
    algorithm: str = _f("reinforce", "reinforce (critic-free, see --estimator) or ppo (with a critic).")
    estimator: str = _f("rloo", "Advantage estimator: " + ", ".join(ESTIMATORS) + ".")
    samples_per_prompt: int = _f(4, "K: completions sampled per prompt (a group).")
    prompts_per_step: int = _f(8, "P: prompts per step, over all processes; the batch is P*K sequences.")
    max_new_tokens: int = _f(64, "Maximum completion length in tokens.")
    max_prompt_length: int = _f(512, "Prompts longer than this many tokens keep their last tokens.")
    temperature: float = _f(1.0, "Sampling temperature (log-probs are taken at the same temperature).")
    top_p: float = _f(1.0, "Nucleus sampling threshold (1.0 disables).")
    top_k: int = _f(0, "Top-k sampling (0 disables).")
    beta: float = _f(0.05, "KL coefficient against the frozen reference; 0 loads no reference model.")
    kl_estimator: str = _f(
        "k3",
        "KL estimator: k1 (log-ratio), k2 (half squared log-ratio), k3 (Schulman). In the loss, k2's "
        "gradient is that of each token's KL(policy||ref), k3's that of KL(ref||policy); in the reward, "
        "k1 gives the sequence's KL(policy||ref). REINFORCE only: PPO always puts k1 in the per-token "
        "reward (InstructGPT).",
    )
    kl_in: str = _f(
        "loss", "Where the KL goes: reward (subtracted from the score) or loss (added to it). REINFORCE only."
    )
    credit: str = _f("sequence", "sequence (one advantage per completion) or token (reward-to-go).")
    gamma: float = _f(1.0, "Discount of token-level returns (--credit token; PPO: GAE's gamma).")
    loss_agg: str = _f("token-mean", "Loss aggregation: " + ", ".join(LOSS_AGG_MODES) + ".")
    updates_per_batch: int = _f(1, "Passes (epochs) over each batch of rollouts; >1 uses ratio clipping.")
    minibatches: int = _f(1, "Optimiser steps per pass over a batch of rollouts.")
    clip_eps: float = _f(0.2, "Ratio clipping epsilon, used when a batch is reused (off-policy updates).")
    running_mean_decay: float = _f(0.9, "Decay of the running-mean baseline (estimator running_mean).")
    reward_clip: float = _f(0.0, "Clip scores to [-x, x] before advantages (0 disables).")
    sampling: str = _f(
        "seeded", "seeded (per-prompt noise, same samples on any number of processes) or torch."
    )
    generation_backend: str = _f("native", "native (lean KV-cache loop) or hf (transformers generate).")
    lean_decode: bool = _f(
        True,
        "native backend, Llama/Mistral/Qwen2/Qwen3/Gemma/Gemma 3/Phi-3 models: decode steps by "
        "reinforce-lm's own step over the model's weights (same log-probs, fewer ops); off: the model's "
        "forward at every token.",
    )
    cuda_graphs: bool = _f(
        True,
        "On a GPU, with the lean decode step: each decode step replays a captured CUDA graph (one launch "
        "per token instead of one per op); off: eager steps.",
    )
    generation_batch_size: int = _f(
        0, "Completions sampled per call, whole groups (bounds the KV cache); 0: this process's whole batch."
    )
    # PPO
    critic_model: str = _f("", "PPO critic backbone (default: the first reward model, else the policy).")
    critic_lr: float = _f(0.0, "PPO critic learning rate; 0: 10x lr.")
    vf_coef: float = _f(0.1, "PPO value-loss coefficient.")
    value_clip_eps: float = _f(0.2, "PPO value clipping epsilon.")
    lam: float = _f(0.95, "PPO GAE lambda.")
    eval_prompts: str = _f("", "Held-out prompts scored every eval_every steps and at the end.")
    eval_every: int = _f(0, "Evaluate on eval_prompts every N steps (0: only at the end).")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.prompts:
            raise ConfigError("prompts is required: pass --prompts FILE")
        _rewards(self)
        _choice(self, "algorithm", ("reinforce", "ppo"))
        if self.estimator == "ppo":
            raise ConfigError("ppo is an algorithm, not an estimator: pass --algorithm ppo")
        if self.algorithm == "ppo" and _changed(self, "estimator"):
            warnings.warn(f"--estimator {self.estimator} is for --algorithm reinforce: PPO's advantages "
                          "are GAE over its critic's values", stacklevel=3)  # fmt: skip
        _choice(self, "estimator", ESTIMATORS)
        _choice(self, "kl_estimator", ("k1", "k2", "k3"))
        _choice(self, "kl_in", ("reward", "loss"))
        _choice(self, "credit", ("sequence", "token"))
        _choice(self, "loss_agg", LOSS_AGG_MODES)
        _choice(self, "sampling", ("seeded", "torch"))
        _choice(self, "generation_backend", ("native", "hf"))
        _positive(self, "samples_per_prompt", "prompts_per_step", "max_new_tokens", "max_prompt_length")
        _positive(self, "temperature", "updates_per_batch", "minibatches")
        _positive(
            self,
            "beta",
            "top_k",
            "clip_eps",
            "reward_clip",
            "critic_lr",
            "eval_every",
            "generation_batch_size",
            "vf_coef",
            "value_clip_eps",
            allow_zero=True,
        )
        _fraction(self, "running_mean_decay")
        if 0 < self.generation_batch_size < self.samples_per_prompt:
            k = self.samples_per_prompt
            warnings.warn(f"--generation-batch-size {self.generation_batch_size} is below "
                          f"--samples-per-prompt {k}: each sampling call takes one whole group, {k} "
                          "completions", stacklevel=3)  # fmt: skip
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not 0 <= self.gamma <= 1 or not 0 <= self.lam <= 1:
            raise ConfigError("gamma and lam must be in [0, 1]")
        if (
            self.algorithm == "reinforce"
            and self.beta > 0
            and self.kl_in == "loss"
            and self.kl_estimator == "k1"
        ):
            raise ConfigError(
                "kl_estimator k1 in the loss has zero expected gradient (E[grad log pi] = 0): it adds noise, "
                "not a KL penalty. Use --kl-in reward with k1, or --kl-estimator k2 or k3 in the loss"
            )
        if self.algorithm == "reinforce" and self.gamma < 1 and self.credit == "sequence":
            raise ConfigError(
                f"gamma={self.gamma} discounts token-level returns, but credit is 'sequence' (every token "
                "gets the whole score, undiscounted): pass --credit token, or leave gamma at 1"
            )
        if self.minibatches > self.prompts_per_step * self.samples_per_prompt:
            raise ConfigError(
                f"minibatches={self.minibatches} is more than the {self.prompts_per_step} x "
                f"{self.samples_per_prompt} sequences of a step"
            )
        if self.eval_every and not self.eval_prompts:
            raise ConfigError(f"eval_every={self.eval_every} needs --eval-prompts FILE to evaluate on")
        group_estimators = ("rloo", "grpo", "dr_grpo", "reinforce_pp_baseline")
        if (
            self.algorithm == "reinforce"
            and self.estimator in group_estimators
            and self.samples_per_prompt < 2
        ):
            raise ConfigError(f"estimator {self.estimator} needs samples_per_prompt >= 2 (a group baseline)")


@dataclass
class EvalConfig:
    """`reinforce-lm eval`: mean reward of a model's completions on a prompts file."""

    model: str = _f(
        "", "Model to evaluate: a directory (a run's output directory works) or hub id.", required=True
    )
    prompts: str = _f("", "Prompts file.", required=True)
    prompt_column: str = _f("prompt", "Column with the prompt text.")
    messages_column: str = _f("messages", "Column with chat messages, rendered with the chat template.")
    reward: list = _f([], "Reward function(s) as path/to/file.py:function or module:function.")
    reward_model: list = _f([], "Learned reward model directory(ies).")
    reward_weights: list = _f([], "Weights of the rewards, functions first then models (default 1 each).")
    max_new_tokens: int = _f(64, "Maximum completion length in tokens.")
    max_prompt_length: int = _f(512, "Prompts longer than this many tokens keep their last tokens.")
    temperature: float = _f(1.0, "Sampling temperature.")
    top_p: float = _f(1.0, "Nucleus sampling threshold.")
    top_k: int = _f(0, "Top-k sampling (0 disables).")
    greedy: bool = _f(False, "Greedy decoding instead of sampling.")
    lean_decode: bool = _f(
        True, "Llama/Mistral/Qwen/Gemma/Phi-3 models: reinforce-lm's decode step; off: the model's forward."
    )
    cuda_graphs: bool = _f(True, "On a GPU, with the lean decode step: replay each step as a CUDA graph.")
    show: int = _f(5, "How many sample completions to print.")
    seed: int = _f(0, "Sampling seed.")
    device: str = _f("auto", "cpu, cuda, cuda:N or auto.")
    dtype: str = _f("float32", "float32, bfloat16 or float16.")

    def __post_init__(self) -> None:
        _types(self)
        if not self.model or not self.prompts:
            raise ConfigError("eval needs --model and --prompts")
        _rewards(self)
        _positive(self, "max_new_tokens", "max_prompt_length", "temperature")
        _positive(self, "top_k", "show", allow_zero=True)
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p!r}")
        _choice(self, "dtype", ("float32", "bfloat16", "float16"))
        _device(self)
        _seed(self)
