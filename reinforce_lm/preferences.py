"""Preference pairs for the reward-model stage: prompt/chosen/rejected text or chosen/rejected message
lists, with an optional margin, tokenized exactly as `learned_reward.RewardModel` scores completions.
Errors and warnings name the file and line of the row, as in `data.py`."""

from __future__ import annotations

import reprlib

import torch

from .data import (
    _check_messages,
    _missing,
    _pad,
    _warn,
    conversation_ids,
    finite_float32,
    keep_last,
    text_ids,
)
from .errors import DataError
from .files import read_rows


def _pair_ids(tokenizer, where: str, row: dict) -> tuple[list[int], list[int]]:
    for key in ("chosen", "rejected"):
        if row.get(key) is None:
            raise _missing(where, key, row)
    chosen, rejected, prompt = row["chosen"], row["rejected"], row.get("prompt")
    if isinstance(chosen, list) and isinstance(rejected, list):
        # Conversational pair: the prompt (optional) is a message list or a user turn's text.
        head = (
            []
            if prompt is None
            else prompt
            if isinstance(prompt, list)
            else [{"role": "user", "content": prompt}]
        )
        out = []
        for key, turns in (("chosen", chosen), ("rejected", rejected)):
            messages = _check_messages(where, key, head + turns)
            out.append(conversation_ids(tokenizer, where, messages))
        return out[0], out[1]
    if prompt is None:
        raise _missing(where, "prompt", row)
    for key in ("prompt", "chosen", "rejected"):
        if not isinstance(row[key], str):
            raise DataError(
                f"{where}: column {key!r} must be text (or chosen/rejected both message lists), "
                f"got {type(row[key]).__name__}"
            )
    # Tokenized as prompt+completion text, exactly as `rewards.RewardModel` scores completions.
    return text_ids(tokenizer, prompt + chosen), text_ids(tokenizer, prompt + rejected)


def _margin(where: str, value) -> float:
    if value is None or value == "":
        return 0.0
    try:
        if isinstance(value, bool):
            raise ValueError
        margin = finite_float32(value)  # float32 in the loss (`collate_preferences`)
    except (TypeError, ValueError):
        raise DataError(f"{where}: column 'margin' must be a number, got {reprlib.repr(value)}") from None
    if margin is None:
        raise DataError(
            f"{where}: column 'margin' must be a finite float32 number, got {reprlib.repr(value)}"
        )
    return margin


def load_preferences(path, tokenizer, max_length: int) -> list[dict]:
    """Preference pairs {"chosen_ids", "rejected_ids", "margin"} from `prompt`/`chosen`/`rejected` text
    (prompt + chosen, prompt + rejected) or `chosen`/`rejected` message lists (prompt optional), with an
    optional `margin` column (0 when absent). Sequences longer than `max_length` keep their last tokens
    (and BOS), where the responses differ and the score is read, as `rewards.RewardModel` scores them. A
    pair whose two sides are the same token ids (as given, or once cut) teaches nothing and is skipped.
    Both are reported in one warning each."""
    rows = read_rows(path)
    pairs, cut, skipped = [], [], []
    bos = getattr(tokenizer, "bos_token_id", None)
    for i, row in enumerate(rows):
        where = rows.locate(i)
        chosen, rejected = _pair_ids(tokenizer, where, row)
        margin = _margin(where, row.get("margin"))
        if max(len(chosen), len(rejected)) > max_length:
            chosen, rejected = keep_last(chosen, max_length, bos), keep_last(rejected, max_length, bos)
            cut.append(where)
        if chosen == rejected:
            skipped.append(where)
            continue
        chat = isinstance(row["chosen"], list)  # how it was rendered; `rewards.RewardModel` scores alike
        pairs.append(
            {"chosen_ids": chosen, "rejected_ids": rejected, "margin": margin, "source": where, "chat": chat}
        )
    _warn(cut, f"longer than max_length={max_length} keep their last {max_length} tokens")
    _warn(skipped, f"skipped: chosen and rejected are the same tokens (within max_length={max_length})")
    if not pairs:
        raise DataError(f"{path}: every preference pair was skipped")
    return pairs


def collate_preferences(items: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad chosen and rejected to one common length L (so they can be concatenated into one batch):
    chosen_/rejected_ input_ids and attention_mask [N, L], and margin [N] float32."""
    length = max(len(s) for it in items for s in (it["chosen_ids"], it["rejected_ids"]))
    out = {}
    for key in ("chosen", "rejected"):
        seqs = [it[f"{key}_ids"] for it in items]
        out[f"{key}_input_ids"] = _pad(seqs, pad_id, length)  # [N, L]
        out[f"{key}_attention_mask"] = _pad([[1] * len(s) for s in seqs], 0, length)  # [N, L]
    out["margin"] = torch.tensor([float(it.get("margin", 0.0)) for it in items], dtype=torch.float32)  # [N]
    return out
