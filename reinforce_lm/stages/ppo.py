"""PPO with a learned critic, in the same loop as every REINFORCE estimator (Schulman et al. 2017).

One step, as data: the REINFORCE stage's `sample_and_score` (rollouts, scores, old and reference
log-probs; composed, not copied) -> the critic's values V(s_t) -> per-token rewards
``r_t = -beta * (logp_old - ref_logp)_t`` plus the score at the last valid token (Ziegler et al. 2019;
Ouyang et al. 2022) -> GAE(gamma, lam) advantages and returns -> advantages whitened over the whole batch
-> per micro-batch: clipped surrogate (the REINFORCE stage's loss with `old_logp`) + vf_coef * clipped
value loss. The loop gives the policy and the critic one AdamW each and clips their gradients apart.

The loop runs `updates_per_batch` passes of `minibatches` optimiser steps over each batch of rollouts.
PPO as usually run reuses each batch: pass `--updates-per-batch 4 --minibatches 2` (the defaults, 1 and 1,
are kept as given: one on-policy step per batch, where the ratio is 1 and nothing is clipped).

The critic is a value head (Linear hidden -> 1) on a transformer backbone (`AutoModel`: the base model of
a causal LM or of a sequence classifier). It starts from `--critic-model`, else the first reward model,
else the policy; a checkpoint holds it in `checkpoint-N/critic/` (backbone + `value_head.safetensors`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from reinforce_lm import algorithms as A
from reinforce_lm.distributed import unwrap, wrap
from reinforce_lm.errors import CheckpointError, ConfigError
from reinforce_lm.logprobs import in_chunks
from reinforce_lm.models import (
    DTYPES,
    disable_dropout,
    enable_activation_checkpointing,
    forward_kwargs,
    load_errors,
    resolve_model_path,
)
from reinforce_lm.stages.reinforce import ReinforceStage, trim

VALUE_HEAD_FILE = "value_head.safetensors"


class Critic(torch.nn.Module):
    """V(s_t) for every response position: a transformer backbone and a linear value head."""

    def __init__(self, backbone: torch.nn.Module):
        super().__init__()
        self.backbone = backbone
        # float32 head whatever the backbone dtype: values are small regression targets.
        self.value_head = torch.nn.Linear(_output_width(backbone), 1)
        torch.nn.init.zeros_(self.value_head.weight)  # V = 0 at first: GAE starts as lambda-returns
        torch.nn.init.zeros_(self.value_head.bias)

    def forward(self, input_ids, attention_mask, n_response: int) -> torch.Tensor:
        """Values of the states before each of the last `n_response` tokens: [B, L] -> [B, T] float32.

        Aligned like `logprobs.token_logprobs`: position t is the prefix that token t is sampled from.
        """
        out = self.backbone(input_ids=input_ids, **forward_kwargs(self.backbone, attention_mask))
        hidden = out.last_hidden_state[:, -(n_response + 1) : -1]  # [B, T, H]
        return self.value_head(hidden.float()).squeeze(-1)  # [B, T]

    @property
    def _no_split_modules(self):  # FSDP2 shards the backbone's blocks one by one (distributed.shard)
        return getattr(self.backbone, "_no_split_modules", None)

    def save_pretrained(self, path, safe_serialization: bool = True, state_dict=None, **kw) -> None:
        """The backbone as a Hugging Face directory, plus the head in `value_head.safetensors`.

        `state_dict` (the gathered full state under FSDP) has this module's names, split here."""
        from safetensors.torch import save_file

        path = Path(path)
        state = self.state_dict() if state_dict is None else state_dict
        part = {name: {} for name in ("backbone", "value_head")}
        for k, v in state.items():
            owner, _, rest = k.partition(".")
            part[owner][rest] = v
        self.backbone.save_pretrained(
            path, state_dict=part["backbone"], safe_serialization=safe_serialization, **kw
        )
        head = {k: v.detach().contiguous().cpu() for k, v in part["value_head"].items()}
        save_file(head, str(path / VALUE_HEAD_FILE))


def _output_width(backbone) -> int:
    """Width of the backbone's `last_hidden_state`: its config's hidden size, except where the last states
    are projected to another width (OPT-350m: 1024-wide layers, 512-wide output, `word_embed_proj_dim`).
    A config that names neither is asked by a one-token forward."""
    cfg = backbone.config.get_text_config()
    width = getattr(cfg, "word_embed_proj_dim", None) or getattr(cfg, "hidden_size", None)
    if width:
        return width
    param = next(backbone.parameters())
    with torch.no_grad():
        out = backbone(input_ids=torch.zeros(1, 1, dtype=torch.long, device=param.device))
    return out.last_hidden_state.shape[-1]


def load_critic(path: str, dtype: str = "float32", device="cpu") -> Critic:
    """A critic from a saved critic (with its value head), or a fresh head on any model's backbone."""
    from safetensors.torch import load_file
    from transformers import AutoModel

    path = resolve_model_path(str(path))
    try:
        backbone = AutoModel.from_pretrained(path, dtype=DTYPES[dtype])
    except load_errors() as e:
        raise ConfigError(f"cannot load a critic backbone from {path!r}: {e}") from None
    critic = Critic(disable_dropout(backbone))
    head = Path(path) / VALUE_HEAD_FILE
    if head.is_file():
        try:
            critic.value_head.load_state_dict(load_file(str(head)))
        except (RuntimeError, OSError) as e:
            raise CheckpointError(f"{head}: cannot load the value head: {e}") from None
    return critic.to(device)


def critic_source(cfg, tokenizer) -> str:
    """Where a new critic starts: --critic-model, else the first reward model if it shares the policy's
    tokenizer (the critic reads the policy's token ids), else the policy."""
    from reinforce_lm.runner import same_vocabulary

    if cfg.critic_model:
        return cfg.critic_model
    if cfg.reward_model and same_vocabulary(cfg.reward_model[0], tokenizer):
        return cfg.reward_model[0]
    return cfg.model


class PPOStage:
    """The loop's stage for `--algorithm ppo`; sampling, scoring and the policy loss are the REINFORCE
    stage's, held by composition (`self.rl`)."""

    def __init__(self, cfg, rl: ReinforceStage, critic: torch.nn.Module, d):
        self.cfg, self.rl, self.critic, self.d = cfg, rl, critic, d
        self.policy, self.tokenizer, self.sampler = rl.policy, rl.tokenizer, rl.sampler
        self.updates_per_batch, self.minibatches = cfg.updates_per_batch, cfg.minibatches

    def param_groups(self):
        cfg = self.cfg
        return [("policy", self.policy, cfg.lr), ("critic", self.critic, cfg.critic_lr or 10 * cfg.lr)]

    def state_dict(self) -> dict:
        return self.rl.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.rl.load_state_dict(state)

    def evaluate(self) -> dict[str, float]:
        return self.rl.evaluate()

    @torch.no_grad()
    def collect(self, step: int):
        cfg, d = self.cfg, self.d
        s = self.rl.sample_and_score(step, need_old_logp=True)
        r = s.rollout
        mask, ids, attn, T = r.response_mask, r.input_ids, r.attention_mask, r.response_ids.shape[1]
        critic = unwrap(self.critic)
        values = (
            in_chunks(lambda i, m: critic(i, m, T), ids, attn, cfg.micro_batch_size) * mask
        )  # [B, T] V(s_t)
        token_rewards = A.place_at_last_token(s.scores.to(mask.dtype), mask)  # [B, T]
        kl = None
        if s.ref_logp is not None and cfg.beta > 0:
            kl = A.kl_divergence(s.old_logp, s.ref_logp, "k1") * mask  # [B, T] per-token KL penalty
            token_rewards = token_rewards - cfg.beta * kl
        advantages, returns = A.gae(token_rewards, values, mask, cfg.gamma, cfg.lam)  # [B, T] each
        advantages = A.masked_whiten(advantages, mask, reduce_sum=d.reduce_sum)
        batch = {
            "input_ids": ids,
            "attention_mask": attn,
            "mask": mask,
            "advantages": advantages,
            "old_logp": s.old_logp,
            "old_values": values,
            "returns": returns,
        }
        metrics = self.rl.step_metrics(s, kl)
        tokens = d.reduce_sum(mask.sum().double()).clamp(min=1)
        metrics["value_mean"] = (d.reduce_sum(values.double().sum()) / tokens).item()
        metrics["returns_mean"] = (d.reduce_sum(returns.double().sum()) / tokens).item()
        return batch, metrics

    def loss(self, micro, normalizer):
        cfg = self.cfg
        # The REINFORCE stage's loss sees `old_logp` and so gives the clipped surrogate (plus entropy
        # and clip-fraction metrics); the KL is in the reward here, so no `ref_logp` goes with it.
        policy_loss, metrics = self.rl.loss(micro, normalizer)
        micro = trim(micro, micro["input_ids"].shape[1] - micro["mask"].shape[1])  # prompt width
        mask, T = micro["mask"], micro["mask"].shape[1]
        values = self.critic(micro["input_ids"], micro["attention_mask"], T)  # [B, T]
        vf = A.value_loss(
            values,
            micro["old_values"],
            micro["returns"],
            mask,
            clip_eps=cfg.value_clip_eps,
            normalizer=normalizer["tokens"],
        )
        loss = policy_loss + cfg.vf_coef * vf
        metrics["vf_loss"] = vf.item()
        metrics["loss"] = loss.item()
        return loss, metrics


def build_ppo_stage(cfg, policy, tokenizer, reference, rewards, prompts, d, eval_prompts=None, resume=None):
    """PPOStage for `run_train`: the critic from `resume/critic` when resuming, else `critic_source`."""
    source = critic_source(cfg, tokenizer)
    if resume is not None:
        source = Path(resume) / "critic"
        if not (source / VALUE_HEAD_FILE).is_file():
            raise CheckpointError(f"{resume} holds no PPO critic ({source / VALUE_HEAD_FILE} is missing)")
    critic = load_critic(str(source), cfg.dtype, d.device)
    if cfg.gradient_checkpointing:
        enable_activation_checkpointing(critic.backbone)
    critic.train()
    fsdp = getattr(cfg, "fsdp", False)
    policy, critic = wrap(policy, d, fsdp=fsdp), wrap(critic, d, fsdp=fsdp)
    rl = ReinforceStage(cfg, policy, tokenizer, reference, rewards, prompts, d, eval_prompts)
    return PPOStage(cfg, rl, critic, d)
