"""The reward-model stage: Bradley-Terry loss on preference pairs, in the one loop.

A causal LM directory becomes an `AutoModelForSequenceClassification` with one label (a new scalar head
on the last non-pad token). One step: the next `batch_size` pairs of a seeded stream (position derived
from the step) -> this rank's share, one batch row per pair -> per micro-batch, chosen and rejected in
one forward -> sum over pairs of -log sigmoid(r_c - r_r - margin) (Bradley & Terry 1952; Ouyang et al.
2022 eq. 1; margin as Touvron et al. 2023 eq. 2) divided by the GLOBAL pair count, plus the optional
centring term coef * (r_c + r_r)^2 (Eisenstein et al. 2023) that keeps scores near zero.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from reinforce_lm import algorithms as A
from reinforce_lm import distributed
from reinforce_lm.cli import register
from reinforce_lm.config import EngineConfig, _f, _positive
from reinforce_lm.data import split_eval, step_indices
from reinforce_lm.distributed import Dist, rank_chunks, unwrap
from reinforce_lm.errors import ConfigError
from reinforce_lm.preferences import collate_preferences, load_preferences
from reinforce_lm.stages.sft import resolve_eval_every


@dataclass
class RewardConfig(EngineConfig):
    """`reinforce-lm reward`: a Bradley-Terry reward model on prompt/chosen/rejected pairs."""

    # Inherited options this command refuses: kept out of `reward --help` (still parsed, to say so).
    hidden_flags: ClassVar[tuple[str, ...]] = ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules")

    model: str = _f(
        "",
        "Model the reward model starts from (its body; the one-output score head is new): a local "
        "Hugging Face directory or a hub id.",
        required=True,
    )
    data: str = _f(
        "",
        "Preference file: `prompt`/`chosen`/`rejected` text (or chosen/rejected message lists), optional "
        "`margin` column. JSONL, CSV, Parquet, JSON or a saved datasets directory.",
        required=True,
    )
    eval_data: str = _f("", "Held-out pairs in the same format (default: eval_fraction of --data).")
    eval_fraction: float = _f(
        0.1, "Share of --data held out for eval_accuracy when --eval-data is not given."
    )
    eval_every: int = _f(
        0, "Report eval_accuracy every N steps (0: once per epoch of the data, and at the end)."
    )
    batch_size: int = _f(16, "Preference pairs per optimiser step, over all processes.")
    max_length: int = _f(1024, "Longest prompt+response in tokens; longer ones keep their last tokens.")
    center_rewards_coef: float = _f(
        0.0, "Weight of the centring term (r_chosen + r_rejected)^2 (0 disables)."
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.data:
            raise ConfigError("data is required: pass --data FILE")
        _positive(self, "batch_size", "max_length")
        _positive(self, "eval_every", "center_rewards_coef", allow_zero=True)
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ConfigError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.lora_r:
            raise ConfigError("lora_r is not supported by `reward` yet: the reward model trains all weights")


def _config_name(message: str) -> str:
    """'FalconH1Config' from transformers' "Unrecognized configuration class <class '...FalconH1Config'>"."""
    start = message.find("<class '")
    return message[start + 8 : message.find("'>", start)].rsplit(".", 1)[-1] if start >= 0 else "this model"


def load_reward_backbone(path: str, tokenizer, dtype: str, device):
    """`AutoModelForSequenceClassification` with one label from a causal LM (or reward model) directory.
    The head pools the last token that is not `pad_token_id`, so the config must know the pad id."""
    from transformers import AutoModelForSequenceClassification

    from reinforce_lm.models import DTYPES, load_errors, resolve_model_path

    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            resolve_model_path(path), num_labels=1, dtype=DTYPES[dtype]
        )
    except load_errors() as e:
        why = str(e).split("\n")[0]  # not transformers' list of every architecture that has such a head
        if "Unrecognized configuration class" in why:
            why = (
                f"transformers has no sequence-classification head for {_config_name(why)}; "
                "train the reward model from a model of an architecture that has one (Llama, Qwen2, Mistral, "
                "GPT-2, ...), or score with a reward function"
            )
        raise ConfigError(f"cannot load {path!r} as a sequence-classification model: {why}") from None
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.get_text_config().pad_token_id = tokenizer.pad_token_id
    return model.to(device)


def pair_scores(model, micro) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores of the chosen and rejected sequences, one forward for both: [N], [N] float32."""
    ids = torch.cat([micro["chosen_input_ids"], micro["rejected_input_ids"]])  # [2N, L]
    attn = torch.cat([micro["chosen_attention_mask"], micro["rejected_attention_mask"]])  # [2N, L]
    width = max(1, int(attn.sum(1).max().item()))  # drop this micro-batch's all-padding columns
    scores = model(input_ids=ids[:, :width], attention_mask=attn[:, :width]).logits[:, 0].float()  # [2N]
    return scores.chunk(2)


class RewardStage:
    updates_per_batch = 1
    minibatches = 1

    def __init__(
        self, cfg: RewardConfig, model, tokenizer, train: list[dict], eval_pairs: list[dict], d: Dist
    ):
        if cfg.batch_size % d.world_size:
            raise ConfigError(f"batch_size={cfg.batch_size} must divide by {d.world_size} processes")
        self.cfg, self.model, self.tokenizer, self.d = cfg, model, tokenizer, d
        self.train, self.eval_pairs = train, eval_pairs

    def param_groups(self):
        return [("policy", self.model, self.cfg.lr)]  # saved at the top level: a plain HF directory

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def _batch(self, items: list[dict]) -> dict[str, torch.Tensor]:
        b = collate_preferences(items, self.tokenizer.pad_token_id)
        b["mask"] = torch.ones(len(items), 1)  # [N, 1]: one row per pair, so normalizer['seqs'] = pairs
        return {k: v.to(self.d.device) for k, v in b.items()}

    def collect(self, step: int):
        cfg, d = self.cfg, self.d
        idx = step_indices(len(self.train), step, cfg.batch_size, d.rank, d.world_size, cfg.seed)
        return self._batch([self.train[i] for i in idx.tolist()]), {
            "epoch": (step + 1) * cfg.batch_size / len(self.train)
        }

    def loss(self, micro, normalizer):
        n, pairs = micro["mask"].shape[0], normalizer["seqs"]
        r_c, r_r = pair_scores(self.model, micro)
        # bradley_terry_loss is a mean over this micro-batch; times n / global pairs = its share of the sum
        bt = A.bradley_terry_loss(r_c, r_r, micro["margin"]) * n / pairs
        loss = bt
        metrics = {
            "bt_loss": bt.item(),
            "accuracy": ((r_c > r_r).double().sum() / pairs).item(),
            "reward_chosen": (r_c.detach().double().sum() / pairs).item(),
            "reward_rejected": (r_r.detach().double().sum() / pairs).item(),
        }
        if self.cfg.center_rewards_coef > 0:
            center = ((r_c + r_r) ** 2).sum() / pairs
            loss = loss + self.cfg.center_rewards_coef * center
            metrics["center_loss"] = center.item()
        metrics["loss"] = loss.item()
        return loss, metrics

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        if not self.eval_pairs:
            return {}
        d, model = self.d, unwrap(self.model)
        was_training = model.training
        model.eval()
        sums = torch.zeros(4, dtype=torch.double, device=d.device)  # loss, correct, margin, pairs
        for items, real in rank_chunks(self.eval_pairs, d, self.cfg.micro_batch_size):
            b = self._batch(items)
            r_c, r_r = pair_scores(model, b)
            n = len(r_c)
            sums += real * torch.stack(
                [
                    A.bradley_terry_loss(r_c, r_r, b["margin"]).double() * n,
                    (r_c > r_r).double().sum(),
                    (r_c - r_r).double().sum(),
                    torch.tensor(float(n), dtype=torch.double, device=d.device),
                ]
            )
        model.train(was_training)
        distributed.reshard(model)
        sums = d.reduce_sum(sums)
        loss, correct, gap, count = (sums / sums[3].clamp(min=1)).tolist()
        return {"eval_loss": loss, "eval_accuracy": correct, "eval_reward_gap": gap}


def load_preference_splits(cfg: RewardConfig, tokenizer) -> tuple[list[dict], list[dict]]:
    """Training and held-out pairs. Data errors (chosen == rejected, missing column) and warnings
    (over-long pairs truncated or skipped, naming the rows) come from here, before any model is loaded."""
    pairs = load_preferences(cfg.data, tokenizer, cfg.max_length)
    if cfg.eval_data:
        return pairs, load_preferences(cfg.eval_data, tokenizer, cfg.max_length)
    return split_eval(pairs, cfg.eval_fraction, cfg.seed)


def build_reward_stage(cfg: RewardConfig, d: Dist, resume=None) -> RewardStage:
    """Tokenizer, preference pairs (errors before any model is loaded), a one-label scorer -> the stage."""
    from reinforce_lm.models import disable_dropout, enable_activation_checkpointing, load_tokenizer
    from reinforce_lm.runner import check_token_ids, fit_to_context

    source = str(resume) if resume else cfg.model
    tokenizer = load_tokenizer(source, padding_side="right")
    cfg = fit_to_context(cfg, "max_length", cfg.model, d)
    train, held_out = load_preference_splits(cfg, tokenizer)
    cfg = resolve_eval_every(cfg, len(train))
    if d.is_main:
        print(f"reward: {len(train)} training and {len(held_out)} held-out pairs")
    sharded = cfg.fsdp and d.enabled  # FSDP shards from CPU memory, moving shard by shard
    model = load_reward_backbone(source, tokenizer, cfg.dtype, "cpu" if sharded else d.device)
    check_token_ids(model, tokenizer, train + held_out, ("chosen_ids", "rejected_ids"), cfg.data)
    # Saved in config.json: RL then scores completions as these pairs were rendered (rewards.RewardModel).
    chat = {p["chat"] for p in train + held_out}
    model.config.reinforce_lm_pairs = "messages" if chat == {True} else "text" if chat == {False} else "mixed"
    model.config.reinforce_lm_max_length = cfg.max_length  # and cut them to the length it trained on
    disable_dropout(model)
    if cfg.gradient_checkpointing:
        enable_activation_checkpointing(model)
    model.train()
    return RewardStage(cfg, distributed.wrap(model, d, fsdp=cfg.fsdp), tokenizer, train, held_out, d)


def run_reward(cfg: RewardConfig) -> int:
    """`reinforce-lm reward`; also the Python entry point. Returns an exit code (130 when interrupted)."""
    from reinforce_lm.runner import run_stage

    return run_stage(cfg, build_reward_stage, use_as="--reward-model")


register(
    "reward",
    RewardConfig,
    "Train a Bradley-Terry reward model on preference pairs.",
    "reinforce_lm.stages.reward_model:run_reward",
)
