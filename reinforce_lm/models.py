"""Loading models and tokenizers, freezing the reference, the keyword arguments of a forward.

Per-token log-probs of chosen tokens are in `logprobs.py`, LoRA in `lora.py`."""

from __future__ import annotations

import difflib
import inspect
import logging
from functools import cache
from pathlib import Path

import torch

from reinforce_lm.checkpoint import AS_LOADED, STATE_FILE, earlier_checkpoint, latest_checkpoint
from reinforce_lm.errors import ConfigError
from reinforce_lm.lora import RefViaDisabledAdapter, apply_lora, is_lora, lora_for_saving  # noqa: F401 (moved)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# What some tokenizer class reads: fast (tokenizer.json), BPE (vocab.json), WordPiece (vocab.txt),
# SentencePiece (*.model), tiktoken; tokenizer_config.json alone can name a hub tokenizer.
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "vocab.txt",
    "*.model",
    "*.tiktoken",
)


def resolve_model_path(path: str) -> str:
    """A local model directory, a run's output directory (its latest complete checkpoint) or a hub id.

    Anything that cannot be a hub id ("name" or "org/name") or whose first part exists here is taken as
    local, so a typo in `runs/sft` fails at once, naming near misses, instead of retrying the hub.
    """
    p = Path(path).expanduser()
    if p.is_dir() and _is_run_dir(p):
        found = latest_checkpoint(p)
        if found is None:
            raise ConfigError(
                f"{path} is a run's output directory but holds no complete checkpoint (a checkpoint-N "
                f"directory with {STATE_FILE}); `latest` names a missing or incomplete one"
            )
        p = found
    elif not p.exists():  # a hub id is "name" or "org/name" and starts with neither "." nor "/"
        looks_local = path.startswith(("/", ".", "~")) or path.count("/") > 1 or path.endswith("/")
        if looks_local or ("/" in path and Path(path.split("/")[0]).is_dir()):
            raise ConfigError(f"model directory {path} does not exist{_near_misses(p)}")
        return path  # a hub id
    _check_model_dir(path, p)
    return str(p)


def _is_run_dir(p: Path) -> bool:
    """`latest` marks a run's output directory (even a model directory reused as one); checkpoint-N
    directories without config.json do too (a run whose `latest` was lost)."""
    if (p / "latest").is_file():
        return True
    return not (p / "config.json").is_file() and any(c.is_dir() for c in p.glob("checkpoint-*"))


def _near_misses(p: Path) -> str:
    """' (runs/ exists; did you mean runs/sft?)': the deepest part of `p` that exists and its entries
    closest to the next part of the path."""
    base = next((a for a in p.parents if a.is_dir()), None)
    if base is None:
        return ""
    wanted = p.relative_to(base).parts[0]
    try:
        names = sorted(c.name for c in base.iterdir() if c.is_dir())
    except OSError:
        names = []
    close = [str(base / n) for n in difflib.get_close_matches(wanted, names, n=3)]
    notes = [] if base == Path(".") else [f"{str(base).rstrip('/')}/ exists"]
    if close:
        notes.append(f"did you mean {' or '.join(close)}?")
    return f" ({'; '.join(notes)})" if notes else ""


def _check_model_dir(path: str, p: Path) -> None:
    """transformers says "sentencepiece or tiktoken" about a directory without a model; name what is
    missing instead. A PEFT adapter directory (adapter_config.json) loads through its base model."""
    if p.is_file():
        raise ConfigError(f"{path} is a file; a model is a directory (config.json, weights) or a hub id")
    if not (p / "config.json").is_file() and not (p / "adapter_config.json").is_file():
        held = sorted(c.name for c in p.iterdir())
        what = f"it holds {', '.join(held[:5])}{', ...' if len(held) > 5 else ''}" if held else "it is empty"
        raise ConfigError(
            f"{path}: no config.json: not a model directory ({what}); a run's output directory holds a "
            "model only after its first checkpoint"
        )


def positions(config) -> int | None:
    """Positions a model's config says it covers (None where it does not say)."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            # RoBERTa-family position ids start after the padding index (512 usable of 514)
            offset = (config.pad_token_id or 0) + 1 if "roberta" in str(config.model_type) else 0
            return value - offset
    return None


def embedding_rows(model) -> int | None:
    """Rows of the model's input embedding: every token id must be below it (None where it does not say)."""
    try:
        return model.get_input_embeddings().num_embeddings
    except (AttributeError, NotImplementedError):
        return None


def load_tokenizer(path: str, padding_side: str = "left"):
    """The model's own tokenizer; a missing pad token falls back to EOS (common for decoder-only LMs).

    Both changes are for training only: checkpoints save the tokenizer as it was loaded."""
    from transformers import AutoTokenizer

    resolved = resolve_model_path(path)
    try:
        tok = AutoTokenizer.from_pretrained(resolved)
    except (OSError, ValueError) as e:
        local = Path(resolved)  # transformers' message for a missing tokenizer is about sentencepiece
        if local.is_dir() and not any(next(local.glob(f), None) for f in _TOKENIZER_FILES):
            raise ConfigError(
                f"{resolved} holds a model but no tokenizer (tokenizer.json, tokenizer_config.json, ...); "
                "save the tokenizer there too, e.g. copy those files from the model it was trained from"
            ) from None
        raise ConfigError(f"cannot load a tokenizer from {path!r}: {e}") from None
    setattr(tok, AS_LOADED, {"pad_token": tok.pad_token, "padding_side": tok.padding_side})  # for saving
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ConfigError(f"tokenizer of {path!r} has neither a pad nor an EOS token")
        tok.pad_token = tok.eos_token
    tok.padding_side = padding_side
    return tok


def load_errors() -> tuple[type[Exception], ...]:
    """What `from_pretrained` raises for a directory it cannot load: missing or unreadable files
    (OSError), an unknown model_type (ValueError), truncated or corrupt weights (SafetensorError)."""
    from safetensors import SafetensorError

    return OSError, ValueError, SafetensorError


def load_causal_lm(path: str, dtype: str = "float32", device: torch.device | str = "cpu"):
    """`AutoModelForCausalLM` from a local directory or hub id, in `dtype`, on `device`."""
    from transformers import AutoModelForCausalLM

    resolved = resolve_model_path(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(resolved, dtype=DTYPES[dtype])
    except load_errors() as e:
        raise ConfigError(
            f"cannot load a causal LM from {resolved!r}: {e}{earlier_checkpoint(resolved)}"
        ) from None
    saved = saved_architectures(model.config)
    if saved and all(a.endswith(NOT_LM_HEADS) for a in saved):  # the LM head would be random, silently
        raise ConfigError(
            f"{resolved} is a {saved[0]} (a reward model, from `reinforce-lm reward`?), not a causal LM: "
            "its LM head would start random; pass a causal LM"
        )
    return model.to(device)


NOT_LM_HEADS = ("ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering")


_NEUTRAL = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "typical_p": 1.0,
            "repetition_penalty": 1.0, "no_repeat_ngram_size": 0}  # fmt: skip


def sampling_settings(model) -> dict:
    """The settings of the model's generation_config.json that shape sampling and are not neutral
    (Qwen2.5-Instruct's: temperature 0.7, top_p 0.8, top_k 20, repetition_penalty 1.05); {} when it
    does not sample by default. reinforce-lm samples with its own flags, never these."""
    gen = getattr(model, "generation_config", None)
    if gen is None or not getattr(gen, "do_sample", False):
        return {}
    got = {k: getattr(gen, k, None) for k in _NEUTRAL}
    return {k: v for k, v in got.items() if v is not None and v != _NEUTRAL[k]}


def saved_architectures(config) -> list[str]:
    """The model classes a checkpoint was saved as (config.json's `architectures`), [] where unsaid."""
    return [str(a) for a in (getattr(config, "architectures", None) or [])]


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """Eval mode and no gradients, once and for all: the frozen reference (and reward models)."""
    model.eval()
    model.requires_grad_(False)
    return model


@cache
def _forward_params(cls: type) -> frozenset[str]:
    return frozenset(inspect.signature(cls.forward).parameters)


def inner_model(model):
    """The Hugging Face model under DDP (`.module`), a PEFT model or the LoRA reference view.

    Their `forward(*args, **kwargs)` hides the signature; reading the inner one keeps `position_ids`
    (left padding) and `logits_to_keep` flowing through the wrappers, which pass kwargs on.
    """
    while True:
        if hasattr(model, "module") and hasattr(model, "no_sync"):
            model = model.module
        elif hasattr(model, "get_base_model"):
            model = model.get_base_model()
        else:
            return model


def cache_kwarg(model) -> str:
    """transformers 5.x renamed `past_key_values` to `cache`; speak whichever the model takes."""
    return "cache" if "cache" in _forward_params(type(inner_model(model))) else "past_key_values"


def forward_kwargs(model, attention_mask: torch.Tensor, keep: int | None = None, use_cache=False) -> dict:
    """The attention mask and position ids (left padding), `logits_to_keep` and `use_cache` where supported.

    `use_cache` is off unless asked for: a scoring or training forward that builds a KV cache spends
    time and memory on nothing.

    A mask that pads only on the right is left out: under causal attention no token attends to a later
    padding token, and the positions are 0..L-1, the default. The model then takes its unmasked causal
    attention path (no [B, 1, L, L] mask is built; flash kernels on GPU). Outputs at padded positions
    are not used.
    """
    params = _forward_params(type(inner_model(model)))
    kw = {}
    right_only, unpadded = _padding(attention_mask)
    if not right_only:
        kw["attention_mask"] = attention_mask
        if "position_ids" in params:
            kw["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    elif not unpadded:
        _quiet_padding_warning()  # the mask is left out on purpose; see below
    if keep is not None and "logits_to_keep" in params:
        kw["logits_to_keep"] = keep
    if "use_cache" in params:
        kw["use_cache"] = use_cache
    return kw


class _PaddingWarningFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "strongly recommend passing in an `attention_mask`" not in record.getMessage()


@cache
def _quiet_padding_warning() -> None:
    """Some models (GPT-2, ...) warn once when they see padding ids without an attention mask. Here the
    mask is left out deliberately (right padding under causal attention), so that one message of
    transformers' model logger is filtered out; nothing else is."""
    logging.getLogger("transformers.modeling_utils").addFilter(_PaddingWarningFilter())


def takes_position_ids(model) -> bool:
    return "position_ids" in _forward_params(type(inner_model(model)))


def only_right_padding(attention_mask: torch.Tensor) -> bool:
    """[B, L] mask -> True when every row is ones then zeros (no padding counts too)."""
    return _padding(attention_mask)[0]


def _padding(attention_mask: torch.Tensor) -> tuple[bool, bool]:
    """(only right padding, no padding at all) of a [B, L] mask, read with one host transfer."""
    m = attention_mask.bool()
    right_only = m[:, 0].all() & (m[:, 1:] <= m[:, :-1]).all()
    right_only, unpadded = torch.stack([right_only, m.all()]).tolist()
    return bool(right_only), bool(unpadded)


def disable_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """Zero every dropout probability (and route as in eval mode): the policy that is trained must be the
    policy that sampled.

    With dropout on, the log-probs of the update differ from those of the sampler and the KL/ratio
    terms pick up noise (the RLHF practice since Ziegler et al. 2019). Train mode is kept, so gradient
    checkpointing still works.
    """
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        # Many models keep the probability as a float attribute and call F.dropout(p=self.dropout) (OPT:
        # dropout 0.1 by default; BART-style decoders, XGLM), or skip layers with it (`layerdrop`)
        for name, value in vars(m).items():
            if isinstance(value, float) and ("dropout" in name or name.endswith(("pdrop", "layerdrop"))):
                setattr(m, name, 0.0)
        # Mixture-of-experts routers with "jitter" are random in train mode too: noise on the router's
        # input or logits (Mixtral-style `jitter_noise`, DBRX), or experts drawn instead of the top ones
        # (PhiMoE's sparsemixer). The sampler runs in eval mode; such a module runs as in eval mode in the
        # update too, so both route alike (PhiMoE's router then gets no gradient where one expert
        # survives its mask).
        if any(isinstance(v, float) and v > 0 and "jitter" in k for k, v in vars(m).items()):
            m.register_forward_pre_hook(_as_in_eval)
    for key in ("attention_dropout", "attn_pdrop", "resid_pdrop", "embd_pdrop", "hidden_dropout", "dropout"):
        if isinstance(getattr(model.config, key, None), float):
            setattr(model.config, key, 0.0)
    return model


def _as_in_eval(module, args) -> None:
    module.training = False  # model.train() sets it again; this hook clears it before every forward


def enable_activation_checkpointing(model) -> None:
    """Recompute activations in backward: `activation_checkpointing_enable` in transformers 5.x, its old
    name `gradient_checkpointing_enable` before (deprecated there, removed in v6)."""
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    try:
        enable()
    except ValueError as err:  # transformers refuses it for architectures without support (JetMoE)
        raise ConfigError(
            f"--gradient-checkpointing: {type(model).__name__} does not support it ({err}); leave it off"
        ) from None
