"""The REINFORCE stage: rollouts -> rewards -> reference log-probs -> advantages -> policy-gradient loss.

Every estimator of `algorithms.compute_advantages` is a name here, not a subclass. One step, as data:
this rank's prompts -> K samples each (groups stay on one rank) -> scores -> frozen-reference log-probs
under `inference_mode` -> detached advantages -> per-micro-batch loss normalised by the global count.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import torch

from reinforce_lm import algorithms as A
from reinforce_lm.data import PromptData, step_indices
from reinforce_lm.distributed import Dist, rank_chunks, reshard, unwrap
from reinforce_lm.logprobs import in_chunks, token_logprobs
from reinforce_lm.rewards import RewardSet
from reinforce_lm.rollout import Rollout, Sampler, row_seeds

# |sampler - update| log-prob of a sampled token that rounding explains: the largest in float32, the
# mean over tokens in bf16 (at most ~1e-3; 5e-8 for toy models on CPU); a fault gives ~0.1-1
GAP_WARN, GAP_WARN_MEAN_BF16 = 1e-3, 0.02


def _float32_matmuls(device: torch.device) -> bool:
    """Whether float32 matmuls and convolutions round as float32 (not TF32's 10-bit mantissa) on
    `device`. cuDNN's TF32 is on by default: float32 convolution models (Mamba without its kernels,
    LFM2) on a GPU are then checked on the mean gap, as reduced precision."""
    try:
        cuda_tf32 = device.type == "cuda" and (
            torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32
        )
        return torch.get_float32_matmul_precision() == "highest" and not cuda_tf32
    except RuntimeError:  # set through torch's newer fp32_precision API: the legacy reads refuse
        every = getattr(torch.backends, "fp32_precision", "none")  # what a backend's "none" inherits

        def ieee(backend) -> bool:
            own = getattr(backend, "fp32_precision", "none")
            return (every if own == "none" else own) == "ieee"

        return ieee(torch.backends.cuda.matmul) and (device.type != "cuda" or ieee(torch.backends.cudnn))


def trim(batch: dict[str, torch.Tensor], n_prompt: int) -> dict[str, torch.Tensor]:
    """Drop all-padding columns: left of the prompts and right of the responses of this micro-batch."""
    mask = batch["mask"]
    t = max(1, int(mask.sum(1).max().item()))
    first = int((batch["attention_mask"][:, :n_prompt].sum(0) > 0).long().argmax().item())
    out = {}
    for k, v in batch.items():
        if v.dim() == 2 and k in ("input_ids", "attention_mask"):
            out[k] = v[:, first : n_prompt + t]
        elif v.dim() == 2:
            out[k] = v[:, :t]
        else:
            out[k] = v
    return out


@dataclass
class Scored:
    """One step's rollouts, scored, with the log-probs that advantages need. B sequences, T tokens."""

    rollout: Rollout
    scores: torch.Tensor  # [B] after reward_clip
    parts: dict[str, torch.Tensor]  # [B] each reward function's score
    old_logp: torch.Tensor | None  # [B, T] sampling policy, masked
    ref_logp: torch.Tensor | None  # [B, T] frozen reference, masked
    baseline: torch.Tensor | None  # [B] ReMax: the greedy completion's score
    times: tuple[float, float, float, float]  # perf_counter at sample, score, reference, done


class ReinforceStage:
    def __init__(
        self,
        cfg,
        policy,
        tokenizer,
        reference,
        rewards: RewardSet,
        prompts: PromptData,
        d: Dist,
        eval_prompts: PromptData | None = None,
    ):
        self.cfg, self.policy, self.tokenizer, self.reference = cfg, policy, tokenizer, reference
        self.rewards, self.prompts, self.d, self.eval_prompts = rewards, prompts, d, eval_prompts
        self.updates_per_batch, self.minibatches = cfg.updates_per_batch, cfg.minibatches
        self.sampler = Sampler.from_config(tokenizer, cfg)
        self.running_mean = A.RunningMean(cfg.running_mean_decay)
        self.off_policy = cfg.updates_per_batch > 1 or cfg.minibatches > 1
        self._kl_from_loss = False  # set by collect: the KL metric comes from the loss (see `loss`)
        self._gap_warned = False  # the sampler's log-probs against the update's (see `loss`)
        self._old_sampled = False  # whether old log-probs are the sampler's (set per batch)

    # -- the loop's interface ------------------------------------------------------------------
    def param_groups(self):
        return [("policy", self.policy, self.cfg.lr)]

    def state_dict(self) -> dict:
        return {"running_mean": self.running_mean.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.running_mean.load_state_dict(state["running_mean"])

    def score(
        self, r: Rollout, columns: dict[str, list], sources: list[str] | None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        total, parts = self.rewards(r.prompts, r.completions, r.completion_ids(), columns, sources)
        if self.cfg.reward_clip:
            total = total.clamp(-self.cfg.reward_clip, self.cfg.reward_clip)
        return total.to(r.response_mask.device), parts

    def _columns(self, data: PromptData, idx: torch.Tensor, k: int) -> dict[str, list]:
        return {name: [col[i] for i in idx.tolist() for _ in range(k)] for name, col in data.columns.items()}

    @torch.no_grad()
    def sample_and_score(self, step: int, need_old_logp: bool, greedy_baseline: bool = False) -> Scored:
        """This rank's prompts for `step` -> K samples each -> scores -> old and reference log-probs.

        Everything an estimator (or PPO) needs before advantages; shared so PPO composes, not copies.
        """
        cfg, d = self.cfg, self.d
        P = cfg.prompts_per_step // d.world_size
        K = cfg.samples_per_prompt
        positions = torch.arange(step * cfg.prompts_per_step, (step + 1) * cfg.prompts_per_step)
        positions = positions[d.rank * P : (d.rank + 1) * P]  # this rank's prompts; groups never split
        idx = step_indices(len(self.prompts), step, cfg.prompts_per_step, d.rank, d.world_size, cfg.seed)
        texts = [self.prompts.texts[i] for i in idx.tolist()]
        columns = self._columns(self.prompts, idx, K)
        where = self.prompts.sources  # named in reward errors (empty for prompts built in Python)
        sources = [where[i] for i in idx.tolist() for _ in range(K)] if where else None
        policy = unwrap(self.policy)

        t0 = time.perf_counter()
        chat = self.prompts.is_templated(idx.tolist())
        r = self.sampler.sample(
            policy, texts, positions, K, row_seeds(cfg.seed, step, positions, K), templated=chat
        )
        greedy = None
        if greedy_baseline:  # ReMax: the greedy completion's score is the baseline
            greedy = self.sampler.sample(policy, texts, positions, 1, greedy=True, templated=chat)
        t1 = time.perf_counter()
        scores, parts = self.score(r, columns, sources)
        baseline = None
        if greedy is not None:
            greedy_sources = [where[i] for i in idx.tolist()] if where else None
            baseline = self.score(greedy, self._columns(self.prompts, idx, 1), greedy_sources)[0]
            baseline = baseline.repeat_interleave(K)
        t2 = time.perf_counter()

        mask, T = r.response_mask, r.response_ids.shape[1]
        ids, attn = r.input_ids, r.attention_mask
        old_logp = r.logp
        self._old_sampled = old_logp is not None  # the sampler's own log-probs (see `loss`)
        rows = cfg.micro_batch_size  # no-grad forwards go micro-batch by micro-batch too
        if old_logp is None and need_old_logp:
            old_logp = in_chunks(
                lambda i, m: token_logprobs(policy, i, m, T, cfg.temperature), ids, attn, rows
            )
            old_logp = old_logp * mask
        ref_logp = None
        if self.reference is not None:
            with torch.inference_mode():
                ref = self.reference
                ref_logp = in_chunks(
                    lambda i, m: token_logprobs(ref, i, m, T, cfg.temperature), ids, attn, rows
                )
            ref_logp = ref_logp.clone() * mask  # out of inference mode: usable in autograd later
        t3 = time.perf_counter()
        self._n_prompt = r.prompt_ids.shape[1]
        return Scored(r, scores, parts, old_logp, ref_logp, baseline, (t0, t1, t2, t3))

    @torch.no_grad()
    def collect(self, step: int):
        cfg, d = self.cfg, self.d
        need_old = self.off_policy or (cfg.beta > 0 and cfg.kl_in == "reward")
        s = self.sample_and_score(step, need_old, greedy_baseline=cfg.estimator == "remax")
        r, scores, old_logp, ref_logp, baseline = s.rollout, s.scores, s.old_logp, s.ref_logp, s.baseline
        mask, ids, attn = r.response_mask, r.input_ids, r.attention_mask

        token_rewards, penalty, kl = None, None, None
        if ref_logp is not None and old_logp is not None:
            kl = A.kl_divergence(old_logp, ref_logp, cfg.kl_estimator) * mask  # [B, T]
        self._kl_from_loss = kl is None and ref_logp is not None
        if cfg.beta > 0 and cfg.kl_in == "reward":
            if cfg.credit == "token":
                token_rewards = -cfg.beta * kl
            else:
                penalty = -cfg.beta * kl.sum(1)  # [B]
        if cfg.credit == "token" and token_rewards is None:
            token_rewards = torch.zeros_like(mask)
        adv = A.compute_advantages(
            cfg.estimator,
            rewards=scores,
            mask=mask,
            group_ids=r.group_ids,
            baseline_rewards=baseline,
            gamma=cfg.gamma,
            token_rewards=token_rewards,
            penalty=penalty,
            running_mean=self.running_mean,
            reduce_sum=d.reduce_sum,
        )
        batch = {"input_ids": ids, "attention_mask": attn, "mask": mask, "advantages": adv}
        if self.off_policy:
            batch["old_logp"] = old_logp
        elif s.rollout.logp is not None:  # on-policy: what the sampler recorded, to compare (`loss`)
            batch["sample_logp"] = s.rollout.logp
        if ref_logp is not None and cfg.kl_in == "loss":
            batch["ref_logp"] = ref_logp
        return batch, self.step_metrics(s, kl)

    def step_metrics(self, s: Scored, kl: torch.Tensor | None) -> dict[str, float]:
        """Reward, length, KL and timing metrics of one step, reduced over processes in one all-reduce."""
        r, scores, parts, (t0, t1, t2, t3) = s.rollout, s.scores, s.parts, s.times
        lengths, dev = r.response_mask.sum(1).double(), scores.device
        local = {  # per-process sums; every metric below is a ratio of global sums
            "n": torch.tensor(float(len(scores)), dtype=torch.double),
            "s1": scores.double().sum(),
            "s2": (scores.double() ** 2).sum(),
            "tokens": lengths.sum(),
            "truncated": (lengths >= self.cfg.max_new_tokens).double().sum(),
            **{f"reward/{name}": v.double().sum() for name, v in parts.items()},
        }
        if kl is not None:
            local["kl"] = kl.double().sum()
        keys = list(local)
        sums = self.d.reduce_sum(torch.stack([local[k].to(dev) for k in keys])).tolist()  # one host sync
        total = dict(zip(keys, sums, strict=True))
        n, tokens = total["n"], total["tokens"]
        mean = total["s1"] / n
        var = (total["s2"] - n * mean**2) / max(n - 1, 1)
        m = {
            "reward_mean": mean,
            "reward_std": max(var, 0.0) ** 0.5,
            "response_length": tokens / n,
            "completion_tokens": tokens,
            "generate_seconds": t1 - t0,
            "score_seconds": t2 - t1,
            "reference_seconds": t3 - t2,
        }
        m.update({k: total[k] / n for k in keys if k.startswith("reward/")})
        if kl is not None:
            m["kl"] = total["kl"] / max(tokens, 1.0)
        m["truncated_ratio"] = total["truncated"] / n  # completions that hit max_new_tokens
        return m

    def loss(self, micro, normalizer):
        cfg = self.cfg
        micro = trim(micro, self._n_prompt)
        mask, T = micro["mask"], micro["mask"].shape[1]
        norm = normalizer["tokens"] if cfg.loss_agg == "token-mean" else normalizer["seqs"]
        logp, entropy = token_logprobs(
            self.policy, micro["input_ids"], micro["attention_mask"], T, cfg.temperature, entropy=True
        )
        old = micro.get("old_logp")
        pg = A.policy_gradient_loss(
            logp,
            micro["advantages"],
            mask,
            cfg.loss_agg,
            old_logp=old,
            clip_eps=cfg.clip_eps if old is not None else None,
            normalizer=norm,
            max_len=cfg.max_new_tokens,
        )
        loss = pg
        tok = normalizer["tokens"]
        metrics = {"pg_loss": pg.item(), "entropy": ((entropy * mask).sum() / tok).item()}
        if "ref_logp" in micro and cfg.beta > 0:
            kl = A.kl_divergence(logp, micro["ref_logp"], cfg.kl_estimator)
            kl_loss = A.aggregate_loss(kl, mask, cfg.loss_agg, normalizer=norm, max_len=cfg.max_new_tokens)
            loss = loss + cfg.beta * kl_loss
            metrics["kl_loss"] = kl_loss.item()
            if self._kl_from_loss:  # no sampling log-probs (hf backend): the on-policy KL is this one
                metrics["kl"] = ((kl.detach() * mask).sum() / tok).item()
        sampled = micro.get("sample_logp")  # on-policy: the update's log-probs are these, up to rounding
        if sampled is None and old is not None and self._old_sampled and normalizer.get("update") == 0:
            sampled = old  # a reused batch (PPO) before its first update: the sampler's log-probs too
        if sampled is not None:
            gap = (logp.detach() - sampled).abs() * mask  # [b, T]
            # the loop averages metrics over the step's updates; this one is the first update's alone
            metrics["logp_gap"] = (gap.sum() / tok).item() * normalizer.get("updates", 1)
            if not self._gap_warned:  # every micro-batch until it warns (LoRA dropout shows from step 2)
                self._gap_warned = self._check_gap(gap.max().item(), (gap.sum() / mask.sum().clamp(1)).item())
        if old is not None:
            metrics["clip_fraction"] = (
                A.clip_fraction(logp, old, mask, cfg.clip_eps) * mask.sum() / tok
            ).item()
        metrics["loss"] = loss.item()
        return loss, metrics

    def _check_gap(self, worst: float, mean: float) -> bool:
        """Warn (and return True) when the update scores the sampled tokens differently from the sampler
        beyond rounding: the model computes another distribution decoding with its cache than in one
        forward over the whole sequence (left padding, dropout, custom code), so on-policy is not."""
        cfg = self.cfg
        exact = cfg.dtype == "float32" and cfg.mixed_precision == "no" and _float32_matmuls(self.d.device)
        if exact and worst > GAP_WARN:
            found = f"differs by up to {worst:.3g} (float32: expected below 1e-4)"
        elif not exact and mean > GAP_WARN_MEAN_BF16:
            found = f"differs by {mean:.3g} on average (reduced precision: expected ~1e-3)"
        else:
            return False
        lora = " (here: --lora-dropout, which the sampler does not apply)" if cfg.lora_dropout else ""
        warnings.warn(  # by any rank that sees it: a rank's own prompts may be the ones
            f"the policy's log-prob of a sampled token {found} between the sampler and the update. The "
            "model does not give the same distribution when sampling as in the update's forward over the "
            f"whole sequence: dropout{lora}, its handling of left padding or of its cache, custom code. "
            "The updates are then off-policy and the KL estimates off; `logp_gap` in metrics.jsonl "
            "tracks it. `--generation-backend hf` samples with the model's own generate()",
            stacklevel=2,
        )
        return True

    # -- evaluation ----------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        if self.eval_prompts is None:
            return {}
        scores = evaluate_policy(
            unwrap(self.policy), self.sampler, self.rewards, self.eval_prompts, self.cfg.seed, self.d
        )[0]
        reshard(unwrap(self.policy))
        return {"eval_reward_mean": scores}


@torch.no_grad()
def evaluate_policy(
    policy, sampler: Sampler, rewards: RewardSet, data: PromptData, seed: int, d: Dist, batch=32, greedy=False
):
    """Mean reward of one seeded sample per prompt of `data` (this rank's share, reduced).

    Returns (mean reward, list of (prompt, completion, score) for this rank's prompts).
    """
    n = len(data)
    total, rows = torch.zeros((), dtype=torch.double), []
    # rank_chunks: the same number of sample calls on every rank (collective under FSDP).
    for chunk, weight in rank_chunks(list(range(n)), d, batch):
        texts = [data.texts[i] for i in chunk]
        cols = {name: [col[i] for i in chunk] for name, col in data.columns.items()}
        g = torch.tensor(chunk)
        chat = data.is_templated(chunk)
        r = sampler.sample(policy, texts, g, 1, row_seeds(seed, -1, g, 1), greedy=greedy, templated=chat)
        where = [data.sources[i] for i in chunk] if data.sources else None
        s, _ = rewards(r.prompts, r.completions, r.completion_ids(), cols, where)
        if weight:  # a stand-in chunk (this rank ran out of prompts) is sampled but not counted
            total += s.double().sum()
            rows += list(zip(r.prompts, r.completions, s.tolist(), strict=True))
    mean = (d.reduce_sum(total) / n).item()
    return mean, rows
