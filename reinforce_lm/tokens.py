"""How a text becomes the token ids every stage reads: with the tokenizer's BOS once (also where the text
writes it itself); for a prompt or an SFT example, without the special tokens the tokenizer appends; and,
over its budget, cut to its last tokens (and its BOS). Prompts (`prompt_ids`), SFT and preference data
(`data`, `preferences`) and learned rewards (`learned_reward`) share these, so that a text is the same
ids in every stage.
"""

from __future__ import annotations

import contextlib
import weakref


def writes_bos(tokenizer, text: str) -> bool:
    """The text starts with the tokenizer's BOS string (a rendered chat template, a prompt written so):
    tokenized without the tokenizer's own special tokens, it gets one BOS, not two."""
    bos = tokenizer.bos_token
    return bool(bos) and text.startswith(bos)


def text_ids(tokenizer, text: str) -> list[int]:
    """Token ids of a plain text as every stage reads it: with the tokenizer's special tokens (its BOS),
    unless the text writes its BOS itself (`Sampler.encode` applies the same rule to a batch)."""
    return tokenizer(text, add_special_tokens=not writes_bos(tokenizer, text))["input_ids"]


_APPENDED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> ids it appends


def appended_ids(tokenizer) -> list[int]:
    """The special tokens the tokenizer puts after a text (an EOS with `add_eos_token`, BERT's [SEP]);
    most causal-LM tokenizers put none."""
    try:
        return _APPENDED[tokenizer]
    except (KeyError, TypeError):  # TypeError: a tokenizer that takes no weak reference
        pass
    probe = "reinforce lm probe"
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe, add_special_tokens=True)["input_ids"]
    found = next(
        (
            full[i + len(plain) :]
            for i in range(len(full) - len(plain) + 1)
            if full[i : i + len(plain)] == plain
        ),
        [],
    )
    with contextlib.suppress(TypeError):
        _APPENDED[tokenizer] = found
    return found


def without_appended(tokenizer, ids: list[int]) -> list[int]:
    """`ids` of a prompt or an SFT example without the special tokens the tokenizer appends: a prompt
    that ended in EOS would teach the policy to go on after its own EOS, and an SFT example would train
    on `prompt <eos> completion <eos>`. (A reward model keeps them: it was trained on its tokenizer's
    output, and scores it.)"""
    tail = appended_ids(tokenizer)
    return ids[: len(ids) - len(tail)] if tail and ids[len(ids) - len(tail) :] == tail else ids


def keep_last(ids: list[int], n: int, bos_id: int | None) -> list[int]:
    """The last `n` of `ids`, with its first token among them if that is BOS. What a sequence longer
    than its budget keeps: a prompt keeps the text nearest its completion, a scored text its completion."""
    if len(ids) <= n:
        return ids
    if n > 1 and bos_id is not None and ids[0] == bos_id:
        return ids[:1] + ids[len(ids) - n + 1 :]
    return ids[len(ids) - n :]
