"""Prompts -> the token ids sampling starts from: how a text or chat-rendered prompt is tokenized (its
BOS once), cut to `max_prompt_length`, left-padded, and checked against the model's embedding.
"""

from __future__ import annotations

import torch

from reinforce_lm.errors import DataError
from reinforce_lm.models import embedding_rows
from reinforce_lm.tokens import keep_last, without_appended, writes_bos


def encode_prompts(
    tok, prompts: list[str], max_length: int, pad_id: int, templated=None
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Left-padded prompt ids [P, Lp], their mask, and whether any prompt was cut.

    A plain prompt gets the special tokens the tokenizer puts before a text (its BOS), once, and not
    those it appends (an EOS: `tokens.without_appended`); one rendered by a chat template
    (`templated[i]`) gets none, as SFT and `apply_chat_template(tokenize=True)` tokenize it: the
    template writes what it wants. A prompt longer than `max_length` keeps its last tokens, and its BOS
    (also one a template wrote).

    The padding repeats the row's first id, not the pad id. It is masked out of attention either way,
    but a pad id whose embedding row is zero (as `padding_idx` leaves it) can run through the layers as
    exact zeros, where a norm's derivative is infinite: Gemma 3n's gradients were NaN with left-padded
    prompts (0 * inf), and with a real token there they are finite."""
    templated = templated or [False] * len(prompts)
    plain = [not t and not writes_bos(tok, p) for p, t in zip(prompts, templated, strict=True)]
    rows = [None] * len(prompts)
    for special in (False, True):
        which = [i for i, w in enumerate(plain) if w == special]
        if which:
            ids = tok([prompts[i] for i in which], add_special_tokens=special)["input_ids"]
            for i, r in zip(which, ids, strict=True):
                rows[i] = without_appended(tok, r) if special else r  # its BOS, not an appended EOS
    cut = any(len(r) > max_length for r in rows)
    rows = [keep_last(r, max_length, tok.bos_token_id) for r in rows]
    empty = next((i for i, r in enumerate(rows) if not r), None)
    if empty is not None:
        raise DataError(
            f"prompt {empty} ({prompts[empty]!r}) has no tokens: there is nothing to sample after (this "
            "tokenizer adds no BOS to an empty prompt)"
        )
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :], mask[i, width - len(r) :] = torch.tensor(r), 1
        ids[i, : width - len(r)] = r[0]
    return ids, mask, cut


def check_ids(ids: torch.Tensor, mask: torch.Tensor, model, prompts, pad_id: int) -> None:
    """Token ids past the model's embedding (a tokenizer with tokens the model was never resized for)
    would be an index error deep inside the forward; name the prompt and the token instead. The pad id
    too: it is fed to finished rows and pads the responses, so it would fail later, at random."""
    rows = embedding_rows(model)
    if rows is None:  # a model that does not say: its forward will tell
        return
    if pad_id >= rows:
        raise DataError(
            f"the pad token id {pad_id} is past the model's embedding ({rows} rows): the tokenizer has "
            "tokens the model was not resized for (resize_token_embeddings), or set a pad_token that the "
            "model has, e.g. its EOS"
        )
    if int(ids.max()) < rows:
        return
    bad = (ids >= rows) & mask.bool()  # [P, Lp]
    i = int(bad.any(1).nonzero()[0])
    raise DataError(
        f"prompt {prompts[i][:60]!r} has token id {int(ids[i][bad[i]][0])}, but the model's embedding has "
        f"{rows} rows: its tokenizer has tokens the model was not resized for (resize_token_embeddings)"
    )
