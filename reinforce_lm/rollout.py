"""Prompts -> `Rollout`: the only module that samples.

Two backends behind one interface, `sampler.sample(model, prompts, group_ids, k, row_seed) -> Rollout`:

- `native` (default): a lean KV-cache loop. The prompt is prefilled once and its cache repeated K times
  (not K prefills), only the last position goes through the LM head, and the log-prob of each sampled
  token is kept (so no extra forward is needed for the KL-in-reward term or for old log-probs).
  The per-token steps run through `decoder.LeanDecoder` for Llama, Mistral, Qwen, Gemma and Phi-3 models
  (`lean=True`; on a GPU each step is a replayed CUDA graph, `cuda_graphs=True`), else through the
  model's forward with its cache written in place (`kv_cache.preallocate`).
  With `seeded=True` each token is drawn with a uniform that is a hash of (seed, step, prompt, k, t):
  the samples do not depend on the batch layout, so a run is the same on 1 or N processes.
- `hf`: `transformers`' `generate` (`hf_generate.py`), for models with exotic caches.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from reinforce_lm.decoder import graphable, lean_decoder

# row_seeds: the seeds `Sampler.sample` takes, imported from here by its callers
from reinforce_lm.draws import _draw, _uniforms, filter_logits, row_seeds  # noqa: F401
from reinforce_lm.hf_generate import generate
from reinforce_lm.kv_cache import attends, can_select, preallocate, repeat_cache
from reinforce_lm.models import cache_kwarg, forward_kwargs, takes_position_ids
from reinforce_lm.prompt_ids import check_ids, encode_prompts


@dataclass
class Rollout:
    """P prompts x K completions, groups contiguous. B = P*K, Lp prompt tokens, T response tokens."""

    prompt_ids: torch.Tensor  # [B, Lp] left-padded
    prompt_mask: torch.Tensor  # [B, Lp] long
    response_ids: torch.Tensor  # [B, T] right-padded
    response_mask: torch.Tensor  # [B, T] float: 1 up to and including EOS
    group_ids: torch.Tensor  # [B] long
    prompts: list[str]  # [B]
    completions: list[str]  # [B]
    logp: torch.Tensor | None = None  # [B, T] float32 log-probs at sampling time, if the backend has them

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)  # [B, Lp+T]

    def completion_ids(self) -> list[list[int]]:
        """Each completion's valid token ids (what reward functions get as `completion_ids`)."""
        lengths = self.response_mask.sum(1).long().tolist()  # the valid tokens are a prefix of each row
        return [r[:n] for r, n in zip(self.response_ids.tolist(), lengths, strict=True)]

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prompt_mask, self.response_mask.long()], dim=1)  # [B, Lp+T]


def _cache_of(out, ckw: str):
    """The cache a forward returned (under `ckw`, or `past_key_values`), or None."""
    cache = out.get(ckw)
    return out.get("past_key_values") if cache is None else cache


def concat_rollouts(parts: list[Rollout], pad_id: int) -> Rollout:
    """Join rollouts along the batch: prompts left-padded and responses right-padded to common widths."""

    def pad(x: torch.Tensor, width: int, value, left: bool) -> torch.Tensor:
        fill = x.new_full((x.shape[0], width - x.shape[1]), value)
        return torch.cat([fill, x] if left else [x, fill], dim=1)

    def pad_prompts(x: torch.Tensor, width: int) -> torch.Tensor:  # with each row's first id (`encode`)
        return torch.cat([x[:, :1].expand(-1, width - x.shape[1]), x], dim=1)

    lp = max(r.prompt_ids.shape[1] for r in parts)
    t = max(r.response_ids.shape[1] for r in parts)
    logp = None
    if all(r.logp is not None for r in parts):
        logp = torch.cat([pad(r.logp, t, 0.0, left=False) for r in parts])  # [B, T]
    return Rollout(
        prompt_ids=torch.cat([pad_prompts(r.prompt_ids, lp) for r in parts]),  # [B, Lp]
        prompt_mask=torch.cat([pad(r.prompt_mask, lp, 0, left=True) for r in parts]),
        response_ids=torch.cat([pad(r.response_ids, t, pad_id, left=False) for r in parts]),  # [B, T]
        response_mask=torch.cat([pad(r.response_mask, t, 0.0, left=False) for r in parts]),
        group_ids=torch.cat([r.group_ids for r in parts]),
        prompts=[p for r in parts for p in r.prompts],
        completions=[c for r in parts for c in r.completions],
        logp=logp,
    )


class Sampler:
    """Samples K completions per prompt; see the module docstring for the two backends."""

    def __init__(
        self,
        tokenizer,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        max_prompt_length: int = 512,
        backend: str = "native",
        seeded: bool = True,
        max_batch: int = 0,
        lean: bool = True,
        cuda_graphs: bool = True,
    ):
        self.tok = tokenizer
        self.lean = lean  # native backend: decode steps by `decoder.LeanDecoder` where the model allows
        self.cuda_graphs = cuda_graphs  # ... replayed as CUDA graphs on a GPU (`LeanDecoder`, static)
        self.max_batch = max_batch  # sequences per sampling call (the KV cache's batch); 0: no limit
        self.max_new_tokens = max_new_tokens
        self.temperature, self.top_p, self.top_k = temperature, top_p, top_k
        self.max_prompt_length = max_prompt_length
        self.backend, self.seeded = backend, seeded
        self._said_hf = False  # warned that a model without a KV cache samples with generate()
        self.pad_id = tokenizer.pad_token_id
        # Under FSDP every forward all-gathers across ranks, so all ranks must decode the same number
        # of steps: `sync_stop(local_done) -> bool` makes "all sequences finished" global (Dist.all_true).
        self.sync_stop = None
        self._warned_cut = False
        self._said_no_eos = False
        self.stop_ids: set[int] = set()  # ends a completion besides EOS (`stop_at_end_of_turn`)

    @classmethod
    def from_config(cls, tokenizer, cfg) -> Sampler:
        """The sampler a train or eval config describes (eval's has no backend, seeding or batch keys)."""
        return cls(
            tokenizer,
            cfg.max_new_tokens,
            cfg.temperature,
            cfg.top_p,
            cfg.top_k,
            cfg.max_prompt_length,
            backend=getattr(cfg, "generation_backend", "native"),
            seeded=getattr(cfg, "sampling", "seeded") == "seeded",
            max_batch=getattr(cfg, "generation_batch_size", 0),
            lean=cfg.lean_decode,
            cuda_graphs=cfg.cuda_graphs,
        )

    def eos_ids(self, model) -> list[int]:
        ids = {self.tok.eos_token_id, *self.stop_ids}
        gen = getattr(model, "generation_config", None)
        extra = getattr(gen, "eos_token_id", None) if gen is not None else None
        ids |= set(extra if isinstance(extra, list) else [extra])
        ids = sorted(i for i in ids if i is not None)
        if not ids and not self._said_no_eos:
            self._said_no_eos = True
            warnings.warn("neither the tokenizer nor the model's generation_config has an EOS token: every "
                          "completion runs to max_new_tokens", stacklevel=3)  # fmt: skip
        return ids

    def encode(self, prompts: list[str], device, templated=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded prompt ids [P, Lp] and mask (`prompt_ids.encode_prompts`); warns once a run when
        prompts are cut to `max_prompt_length`."""
        ids, mask, cut = encode_prompts(self.tok, prompts, self.max_prompt_length, self.pad_id, templated)
        if cut and not self._warned_cut:
            self._warned_cut = True  # once a run
            warnings.warn(f"prompts longer than max_prompt_length={self.max_prompt_length} tokens keep their "
                          "last ones (and BOS)", stacklevel=3)  # fmt: skip
        return ids.to(device), mask.to(device)

    @torch.no_grad()
    def sample(
        self, model, prompts, group_ids, k: int, row_seed=None, greedy: bool = False, templated=None
    ) -> Rollout:
        """prompts: P texts, group_ids [P] -> Rollout of B = P*K completions (groups contiguous).
        templated: P bools, the prompts a chat template rendered (`encode`); None: none.

        row_seed: [P*K] int64 from `row_seeds`, for seeded sampling; ignored when greedy. With
        `max_batch`, whole groups are sampled `max_batch // k` prompts per call and joined; seeded samples
        are the same either way (the noise belongs to the completion, not to its place in a call).
        """
        per_call = max(1, self.max_batch // k) if self.max_batch else len(prompts)
        if per_call >= len(prompts):
            return self._sample(model, prompts, group_ids, k, row_seed, greedy, templated)
        parts = []
        for i in range(0, len(prompts), per_call):
            seeds = row_seed[i * k : (i + per_call) * k] if row_seed is not None else None
            parts.append(
                self._sample(
                    model,
                    prompts[i : i + per_call],
                    group_ids[i : i + per_call],
                    k,
                    seeds,
                    greedy,
                    templated[i : i + per_call] if templated else None,
                )
            )
        return concat_rollouts(parts, self.pad_id)

    def _sample(self, model, prompts, group_ids, k: int, row_seed, greedy: bool, templated) -> Rollout:
        device = next(model.parameters()).device
        ids, mask = self.encode(list(prompts), device, templated)  # [P, Lp]
        check_ids(ids, mask, model, prompts, self.pad_id)
        was_training = model.training
        model.eval()
        try:
            native = self._native(model, ids, mask, k, row_seed, greedy) if self.backend != "hf" else None
            if native is None:
                if self.backend != "hf" and not self._said_hf:
                    self._said_hf = True
                    warnings.warn(
                        f"{type(model).__name__}'s forward returns no KV cache: sampling with its generate()",
                        stacklevel=3,
                    )
                resp, logp = self._hf(model, ids, mask, k, greedy), None
            else:
                resp, logp = native
        finally:
            model.train(was_training)
        return self._finish(model, ids, mask, resp, logp, group_ids, prompts, k)

    def _finish(self, model, ids, mask, resp, logp, group_ids, prompts, k) -> Rollout:
        eos = torch.tensor(self.eos_ids(model), device=resp.device)
        is_eos = torch.isin(resp, eos)
        # valid = up to and including the first EOS
        after = (is_eos.long().cumsum(1) - is_eos.long()) > 0
        rmask = (~after).float()  # [B, T]
        length = int(rmask.sum(1).max().item()) if rmask.numel() else 0
        length = max(length, 1)
        resp, rmask = resp[:, :length], rmask[:, :length]  # trim padding columns
        resp = resp.masked_fill(rmask == 0, self.pad_id)
        if logp is not None:
            logp = logp[:, :length] * rmask
        lengths = rmask.sum(1).long().tolist()  # valid tokens are a prefix: up to and including EOS
        rows = [r[:n] for r, n in zip(resp.tolist(), lengths, strict=True)]
        texts = self.tok.batch_decode(rows, skip_special_tokens=True)
        return Rollout(
            prompt_ids=ids.repeat_interleave(k, 0),
            prompt_mask=mask.repeat_interleave(k, 0),
            response_ids=resp,
            response_mask=rmask,
            group_ids=group_ids.to(resp.device).repeat_interleave(k),
            prompts=[p for p in prompts for _ in range(k)],
            completions=texts,
            logp=logp,
        )

    def _native(self, model, ids, mask, k, row_seed, greedy):
        ckw = cache_kwarg(model)
        out = model(input_ids=ids, **forward_kwargs(model, mask, keep=1, use_cache=True))
        cache = _cache_of(out, ckw)
        if cache is None:  # no cache to decode with (RecurrentGemma keeps its state inside): generate()
            return None
        logits = out.logits[:, -1]  # [P, V]
        if k > 1 and repeat_cache(cache, k):  # one prefill per prompt, cache repeated
            logits, mask = logits.repeat_interleave(k, 0), mask.repeat_interleave(k, 0)
        elif k > 1:  # a cache that cannot be repeated (custom models, Mamba's): prefill every sample
            ids, mask = ids.repeat_interleave(k, 0), mask.repeat_interleave(k, 0)
            out = model(input_ids=ids, **forward_kwargs(model, mask, keep=1, use_cache=True))
            cache, logits = _cache_of(out, ckw), out.logits[:, -1]  # [B, V]
        B, Lp, T, dev = logits.shape[0], mask.shape[1], self.max_new_tokens, ids.device
        static = self.cuda_graphs and graphable(dev)  # static shapes only where graphs capture them
        lean = lean_decoder(model, cache, Lp, T, static) if self.lean else None
        if lean is None:
            preallocate(cache, T)  # in-place KV writes, not a torch.cat of the whole cache per token
        padded = not bool(mask.all())  # without padding no attention mask is needed at all
        mask_steps = attends(cache)  # a state-space model's cache has no keys to mask
        eos = torch.tensor(self.eos_ids(model), device=dev)
        is_eos = (lambda x: x == eos[0]) if len(eos) == 1 else (lambda x: torch.isin(x, eos))
        amask = torch.cat([mask, mask.new_ones(B, T)], dim=1)  # [B, Lp+T]; step t reads a prefix view
        pos = mask.sum(1) - 1  # [B] position of the last prompt token
        with_pos = takes_position_ids(model)
        seeds = row_seed.to(dev) if self.seeded and row_seed is not None and not greedy else None
        tokens = torch.full((B, T), self.pad_id, dtype=torch.long, device=dev)  # [B, T]
        logps = torch.zeros(B, T, device=dev)  # [B, T]
        u = _uniforms(seeds, 0, T) if seeds is not None else None  # [B, T], one per token drawn
        rows = None  # indices (into B) of the rows still decoded; None: all of them
        done = torch.zeros(B, dtype=torch.bool, device=dev)  # [n] over the decoded rows
        n_done = 0
        columns = []  # (tokens [B], log-probs [B]) of each step while no row has been dropped
        work: dict = {}  # [B, V] work tensors of `_draw`, reused by every step (rows only shrink)

        def scratch(name, shape, dtype):
            if name not in work or work[name].shape[1:] != shape[1:]:
                work[name] = torch.empty(shape, dtype=dtype, device=dev)
            return work[name][: shape[0]]

        def flush():  # the columns into tokens/logps, once
            if columns:
                tokens[:, : len(columns)] = torch.stack([c[0] for c in columns], 1)
                logps[:, : len(columns)] = torch.stack([c[1] for c in columns], 1)

        can_drop = lean is not None or can_select(cache)
        for t in range(T):
            scaled = logits.float()  # [n, V]
            if self.temperature != 1.0:
                scaled = scaled / self.temperature
            lp = None
            if greedy:
                tok = scaled.argmax(-1)
            else:
                filtered = filter_logits(scaled, self.top_k, self.top_p)
                if u is not None:
                    tok, lp = _draw(filtered, u[:, t], scratch)
                    lp = lp if filtered is scaled else None  # the policy's log-prob, not the filtered one
                else:
                    tok = torch.multinomial(filtered.softmax(-1), 1).squeeze(1)
            if rows is not None or n_done:  # finished rows still decoded emit padding (lp: masked)
                tok = tok.masked_fill(done, self.pad_id)
            if lp is None:
                lp = scaled.log_softmax(-1).gather(1, tok[:, None]).squeeze(1)
            if rows is None:  # all rows: kept as columns, stacked once at the end
                columns.append((tok, lp))
            else:
                tokens[rows, t], logps[rows, t] = tok, lp
            hit = is_eos(tok)
            if hit.any():  # the one host sync per token
                done = done | hit
                n_done = int(done.sum())
            n = done.shape[0]
            finished = n_done == n if self.sync_stop is None else self.sync_stop(n_done == n)
            if finished or t == T - 1:
                break
            if can_drop and 0 < n_done < n and 4 * n_done >= n:
                if rows is None:
                    flush()
                # Finished rows are not decoded further: drop them once a quarter of the batch is done
                # (each drop copies the cache, so not on every single EOS).
                keep = (~done).nonzero().squeeze(1)
                (lean.select if lean is not None else cache.batch_select_indices)(keep)
                rows = keep if rows is None else rows[keep]
                tok, pos, amask, done, n_done = tok[keep], pos[keep], amask[keep], done[keep], 0
                if u is not None:
                    u = u[keep]
            pos = pos + 1
            if lean is not None:
                logits = lean.step(tok, pos, amask[:, : Lp + t + 1] if padded else None)
                continue
            kw = {"attention_mask": amask[:, : Lp + t + 1]} if padded and mask_steps else {}
            if with_pos:
                kw["position_ids"] = pos[:, None]
            out = model(input_ids=tok[:, None], use_cache=True, **{ckw: cache}, **kw)
            logits = out.logits[:, -1]
            new = _cache_of(out, ckw)  # the same object for transformers' caches; a new one for tuples
            cache = cache if new is None else new
        if rows is None:
            flush()
        return tokens, logps  # [B, T], [B, T]

    def _hf(self, model, ids, mask, k, greedy):
        return generate(
            model,
            ids.repeat_interleave(k, 0),
            mask.repeat_interleave(k, 0),
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature if not greedy else 1.0,
            top_p=self.top_p if not greedy else 1.0,
            top_k=self.top_k if not greedy else 0,
            greedy=greedy,
            pad_id=self.pad_id,
            eos_ids=self.eos_ids(model),
            synced=self.sync_stop is not None,
        )
