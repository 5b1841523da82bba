"""A learned reward: a one-label sequence-classification model, scoring completions with its own
tokenizer exactly as the reward stage (`reinforce-lm reward`) trained it (`preferences.load_preferences`).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from .data import _pad, conversation_ids, keep_last, text_ids
from .errors import ReinforceLMError, RewardError


class RewardModel:
    """A learned scalar reward, scoring with its own tokenizer (which may differ from the policy's) the
    token ids the reward stage trains on (`preferences.load_preferences`): prompt+completion text, or for a
    prompt given as a conversation (the `messages_key` column) that conversation with the completion as
    the assistant's turn, rendered by its chat template (unless the reward stage recorded in its
    config that it trained on text pairs only). In batches, right-padded; a text longer than
    `max_length` tokens (default: the `--max-length` it was trained with, recorded in its config)
    keeps its last ones (and BOS), so the completion is always scored.

    The score is read where the model's own pooling reads it: at the last token that is not its pad
    id. A tokenizer without a pad token pads with EOS, so a text that ends with EOS (a chat template's
    end of turn, Llama 3's <|eot_id|>) is scored at the token before it, in training and here alike."""

    def __init__(
        self,
        path,
        device="cpu",
        dtype=None,
        batch_size: int = 32,
        max_length: int | None = None,
        messages_key: str = "messages",
    ):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from reinforce_lm.models import positions, resolve_model_path, saved_architectures

        self.name = f"reward_model:{Path(str(path)).name}"
        try:
            path = resolve_model_path(str(path))  # a reward run's output directory: its latest checkpoint
            self.tokenizer = AutoTokenizer.from_pretrained(str(path))
            self.model = AutoModelForSequenceClassification.from_pretrained(
                str(path),
                **({} if dtype is None else {"dtype": dtype}),  # None: the saved dtype
            )
        except Exception as err:
            why = str(err) if isinstance(err, ReinforceLMError) else f"{type(err).__name__}: {err}"
            raise RewardError(f"reward model {path}: cannot load: {why}") from err
        saved = saved_architectures(self.model.config)
        if saved and all("CausalLM" in a or "LMHead" in a for a in saved):  # its score head: random
            raise RewardError(
                f"reward model {path}: is a causal LM ({saved[0]}), not a reward model; train one on "
                "preference pairs with `reinforce-lm reward`, or pass this one as --model"
            )
        if self.model.config.num_labels != 1:
            raise RewardError(
                f"reward model {path}: has num_labels={self.model.config.num_labels}; a reward model "
                "needs exactly one output (num_labels=1)"
            )
        pad_id = self.model.config.pad_token_id
        if pad_id is None:
            pad_id = self.tokenizer.pad_token_id
            pad_id = self.tokenizer.eos_token_id if pad_id is None else pad_id
            if pad_id is None:
                raise RewardError(f"reward model {path}: its tokenizer has neither a pad nor an eos token")
            # Sequence-classification heads pool the last token that is not pad_token_id: set it.
            self.model.config.pad_token_id = pad_id
            self.model.config.get_text_config().pad_token_id = pad_id
        self.pad_id = pad_id  # we pad with the model's own id, so its pooling finds the last real token
        self.model.to(device).eval().requires_grad_(False)
        if max_length is None:  # the length `reinforce-lm reward` trained it on (config.json), else 1024
            max_length = getattr(self.model.config, "reinforce_lm_max_length", None) or 1024
        ctx = positions(self.model.config)  # past them, learned position tables raise an index error
        max_length = min(max_length, ctx) if ctx else max_length
        self.device, self.batch_size, self.max_length = torch.device(device), batch_size, max_length
        self.messages_key = messages_key
        self._warned = False

    def token_ids(self, prompts: list[str], completions: list[str], chats=None) -> list[list[int]]:
        """What is scored, as `preferences._pair_ids` tokenizes preference pairs (before any cut)."""
        chats = chats if chats is not None else [None] * len(prompts)
        # A model `reinforce-lm reward` trained on text pairs scores text; others render conversations.
        templated = getattr(self.tokenizer, "chat_template", None) is not None
        templated &= getattr(self.model.config, "reinforce_lm_pairs", None) != "text"
        is_chat = [templated and isinstance(chat, list) for chat in chats]
        plain = [i for i, c in enumerate(is_chat) if not c]
        out: list = [None] * len(prompts)
        if plain:
            for i in plain:
                out[i] = text_ids(self.tokenizer, prompts[i] + completions[i])
        for i in (i for i, c in enumerate(is_chat) if c):
            turns = [*chats[i], {"role": "assistant", "content": completions[i]}]
            out[i] = conversation_ids(self.tokenizer, f"{self.name}, sample {i}", turns)
        return out

    def __call__(self, prompts: list[str], completions: list[str], **columns) -> list[float]:
        every = self.token_ids(prompts, completions, columns.get(self.messages_key))
        if any(len(x) > self.max_length for x in every) and not self._warned:
            self._warned = True
            warnings.warn(
                f"{self.name}: texts longer than {self.max_length} tokens keep their last {self.max_length}",
                stacklevel=2,
            )
        bos = self.tokenizer.bos_token_id
        every = [keep_last(x, self.max_length, bos) for x in every]
        scores = []
        for start in range(0, len(every), self.batch_size):
            ids = every[start : start + self.batch_size]
            input_ids = _pad(ids, self.pad_id).to(self.device)  # [b, L], right-padded
            mask = _pad([[1] * len(x) for x in ids], 0).to(self.device)  # [b, L]
            with torch.inference_mode():
                logits = self.model(input_ids=input_ids, attention_mask=mask).logits  # [b, 1]
            scores.extend(logits[:, 0].float().tolist())
        return scores
