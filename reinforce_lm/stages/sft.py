"""The SFT stage: token-mean cross-entropy on completion (or assistant-turn) tokens, in the one loop.

One step, as data: the next `batch_size` examples of an endless stream of seeded permutations (the
position is derived from the step, so resume is exact and N processes read what one reads) -> this
rank's share, right-padded -> per micro-batch, the summed cross-entropy of the labelled tokens divided
by the GLOBAL label-token count, so micro-batching and processes change nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from reinforce_lm import distributed
from reinforce_lm.cli import register
from reinforce_lm.config import EngineConfig, _f, _positive
from reinforce_lm.data import IGNORE_INDEX, collate_sft, load_sft, pack_sft, split_eval, step_indices
from reinforce_lm.distributed import Dist, rank_chunks, unwrap
from reinforce_lm.errors import ConfigError
from reinforce_lm.logprobs import token_logprobs


@dataclass
class SFTConfig(EngineConfig):
    """`reinforce-lm sft`: supervised fine-tuning on prompt/completion or messages rows."""

    data: str = _f(
        "",
        "Training file: `prompt`/`completion` text columns (loss on the completion) or a `messages` "
        "column (loss on assistant turns). JSONL, CSV, Parquet, JSON or a saved datasets directory.",
        required=True,
    )
    eval_data: str = _f("", "Held-out file in the same format (default: eval_fraction of --data).")
    eval_fraction: float = _f(0.05, "Share of --data held out for eval_loss when --eval-data is not given.")
    eval_every: int = _f(0, "Report eval_loss every N steps (0: once per epoch of the data, and at the end).")
    batch_size: int = _f(16, "Examples per optimiser step, over all processes.")
    max_length: int = _f(1024, "Longest example in tokens (and the packed chunk length).")
    truncate: bool = _f(True, "Cut over-long examples from the right (--no-truncate skips them).")
    packing: bool = _f(
        False,
        "Concatenate training examples into max_length chunks (no padding). Packed examples attend to "
        "the ones before them in their chunk (no block-diagonal mask); the loss stays on completions.",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.data:
            raise ConfigError("data is required: pass --data FILE")
        _positive(self, "batch_size", "max_length")
        _positive(self, "eval_every", allow_zero=True)
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ConfigError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")


def shifted_mask(labels: torch.Tensor) -> torch.Tensor:
    """Which next-token predictions carry loss: labels [B, L] -> float mask [B, L-1]."""
    return (labels[:, 1:] != IGNORE_INDEX).float()


def sum_nll(model, input_ids, attention_mask, labels) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy of the labelled next tokens and their count (scalars). Padding columns of
    this micro-batch are dropped first; the log-probs come from `token_logprobs` (float32, chunked
    through the LM head for large vocabularies: no [B, L, V] logits)."""
    width = max(2, int(attention_mask.sum(1).max().item()))
    input_ids, attention_mask, labels = input_ids[:, :width], attention_mask[:, :width], labels[:, :width]
    logp = token_logprobs(model, input_ids, attention_mask, width - 1)  # [B, L-1] of tokens 1..L-1
    labelled = labels[:, 1:] != IGNORE_INDEX  # [B, L-1]; a label is its input token or IGNORE_INDEX
    return -logp.masked_fill(~labelled, 0.0).sum(), labelled.sum()


class SFTStage:
    updates_per_batch = 1
    minibatches = 1

    def __init__(
        self, cfg: SFTConfig, model, tokenizer, train: list[dict], eval_examples: list[dict], d: Dist
    ):
        if cfg.batch_size % d.world_size:
            raise ConfigError(f"batch_size={cfg.batch_size} must divide by {d.world_size} processes")
        self.cfg, self.model, self.tokenizer, self.d = cfg, model, tokenizer, d
        self.train, self.eval_examples = train, eval_examples
        self.pad_id = tokenizer.pad_token_id

    def param_groups(self):
        return [("policy", self.model, self.cfg.lr)]

    def state_dict(self) -> dict:
        return {}  # the data position is a function of the step

    def load_state_dict(self, state: dict) -> None:
        pass

    def collect(self, step: int):
        cfg, d = self.cfg, self.d
        idx = step_indices(len(self.train), step, cfg.batch_size, d.rank, d.world_size, cfg.seed)
        batch = collate_sft([self.train[i] for i in idx.tolist()], self.pad_id)
        batch["mask"] = shifted_mask(batch["labels"])  # [B, L-1]: the loop's token count
        batch = {k: v.to(d.device) for k, v in batch.items()}
        tokens = d.reduce_sum(batch["mask"].sum().double()).item()
        return batch, {"train_tokens": tokens, "epoch": (step + 1) * cfg.batch_size / len(self.train)}

    def loss(self, micro, normalizer):
        nll, _ = sum_nll(self.model, micro["input_ids"], micro["attention_mask"], micro["labels"])
        loss = nll / normalizer["tokens"]
        return loss, {"loss": loss.item()}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        if not self.eval_examples:
            return {}
        model, d = unwrap(self.model), self.d
        was_training = model.training
        model.eval()
        total = torch.zeros((), dtype=torch.double, device=d.device)
        count = torch.zeros((), dtype=torch.double, device=d.device)
        for items, real in rank_chunks(self.eval_examples, d, self.cfg.micro_batch_size):
            b = {k: v.to(d.device) for k, v in collate_sft(items, self.pad_id).items()}
            nll, n = sum_nll(model, b["input_ids"], b["attention_mask"], b["labels"])
            total += nll.double() * real
            count += n.double() * real
        model.train(was_training)
        distributed.reshard(model)
        loss = (d.reduce_sum(total) / d.reduce_sum(count).clamp(min=1)).item()
        return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0))}


def load_sft_splits(cfg: SFTConfig, tokenizer) -> tuple[list[dict], list[dict]]:
    """Training and held-out examples. Data errors (missing column, empty completion) and warnings
    (over-long rows truncated or skipped, naming the rows) come from here, before any model is loaded."""
    examples = load_sft(cfg.data, tokenizer, cfg.max_length, truncate=cfg.truncate)
    if cfg.eval_data:
        train, held_out = examples, load_sft(cfg.eval_data, tokenizer, cfg.max_length, cfg.truncate)
    else:
        train, held_out = split_eval(examples, cfg.eval_fraction, cfg.seed)
    if cfg.packing:
        train = pack_sft(train, cfg.max_length)
    return train, held_out


def resolve_eval_every(cfg, n_train: int):
    """eval_every=0 means once per epoch of the training data (the loop also evaluates at the end)."""
    import dataclasses

    if cfg.eval_every:
        return cfg
    return dataclasses.replace(cfg, eval_every=max(1, math.ceil(n_train / cfg.batch_size)))


def build_sft_stage(cfg: SFTConfig, d: Dist, resume=None) -> SFTStage:
    """Tokenizer, data (errors before any model is loaded), policy -> the SFT stage."""
    from reinforce_lm.models import load_tokenizer
    from reinforce_lm.runner import check_token_ids, fit_to_context, load_policy

    tokenizer = load_tokenizer(str(resume) if resume else cfg.model)
    cfg = fit_to_context(cfg, "max_length", cfg.model, d)
    train, held_out = load_sft_splits(cfg, tokenizer)
    cfg = resolve_eval_every(cfg, len(train))
    if d.is_main:
        print(f"sft: {len(train)} training and {len(held_out)} held-out examples")
    policy = load_policy(cfg, d, str(resume) if resume else cfg.model, resume)
    check_token_ids(policy, tokenizer, train + held_out, ("input_ids",), cfg.data)
    return SFTStage(cfg, distributed.wrap(policy, d, fsdp=cfg.fsdp), tokenizer, train, held_out, d)


def run_sft(cfg: SFTConfig) -> int:
    """`reinforce-lm sft`; also the Python entry point. Returns an exit code (130 when interrupted)."""
    from reinforce_lm.runner import run_stage

    return run_stage(cfg, build_sft_stage)


register(
    "sft",
    SFTConfig,
    "Supervised fine-tuning on prompt/completion or chat data.",
    "reinforce_lm.stages.sft:run_sft",
)
