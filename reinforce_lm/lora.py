"""LoRA (optional extra `peft`): wrapping a policy in adapters, its frozen reference (the same model
with the adapter switched off), and what its checkpoint holds."""

from __future__ import annotations

import difflib
import warnings

import torch

from reinforce_lm.errors import ConfigError


def apply_lora(model, r: int, alpha: float, dropout: float, target_modules: str, adapter: str | None = None):
    """Wrap `model` in a PEFT LoRA model: only the adapters train. `adapter`: a saved adapter directory
    to continue from (resume) instead of fresh adapters."""
    try:
        from peft import LoraConfig, PeftModel, get_peft_model
    except ImportError:
        raise ConfigError("lora_r > 0 needs peft: pip install 'reinforce-lm[peft]'") from None
    if adapter is not None:
        return _absolute_base(PeftModel.from_pretrained(model, adapter, is_trainable=True))
    targets = target_modules
    if targets != "all-linear":  # peft's own error is a traceback: name the layers the model has instead
        targets = [t.strip() for t in target_modules.split(",")]
        names = [n for n, _ in model.named_modules()]
        if unknown := [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]:
            kinds = (torch.nn.Linear, torch.nn.Embedding)  # and transformers' Conv1D (GPT-2)
            layers = sorted(
                {n.rpartition(".")[2] for n, m in model.named_modules()
                 if isinstance(m, kinds) or type(m).__name__ == "Conv1D"}
            )  # fmt: skip
            hints = [
                f"{m[0]!r} for {t!r}" for t in unknown if (m := difflib.get_close_matches(t, layers, n=1))
            ]
            raise ConfigError(
                f"lora_target_modules: no module of this model is named {', '.join(map(repr, unknown))}; "
                f"its layers are {', '.join(layers)}"
                + (f" (did you mean {', '.join(hints)}?)" if hints else "")
            )
    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, task_type="CAUSAL_LM"
    )
    with warnings.catch_warnings():  # peft reads transformers 5's deprecated name: not the user's to fix
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return _absolute_base(get_peft_model(model, config))


def _absolute_base(model):
    """peft records the base model as it was named (`--model runs/sft`); a saved adapter then loads only
    from that working directory. A local base directory is recorded by its absolute path."""
    from pathlib import Path

    for config in model.peft_config.values():
        base = config.base_model_name_or_path
        if base and Path(base).is_dir():
            config.base_model_name_or_path = str(Path(base).resolve())
    return model


def is_lora(model) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "merge_and_unload")


class RefViaDisabledAdapter:
    """The frozen reference of a LoRA policy: the same model with its adapter switched off.

    No second copy of the base weights; called like a model (`token_logprobs(ref, ...)`). The base
    weights never train, so this is exactly the starting policy.
    """

    def __init__(self, policy):
        self.policy = policy  # the PeftModel itself, not a DDP wrapper: no gradient hooks

    def get_base_model(self):
        return self.policy.get_base_model()

    def __call__(self, *args, **kwargs):
        with self.policy.disable_adapter():
            return self.policy(*args, **kwargs)


def lora_for_saving(model) -> dict:
    """A LoRA policy's checkpoint: the merged model at the top level (loads with `from_pretrained`
    anywhere, no peft needed) and the adapter alone in `adapter/`, which resume trains on. The merge
    happens on a copy, so the training weights are untouched (merging in place and unmerging would
    not round-trip exactly)."""
    import copy

    merged = copy.deepcopy(model).merge_and_unload()
    return {"policy": merged, "adapter": model}
