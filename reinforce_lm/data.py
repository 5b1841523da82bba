"""Prompt and SFT datasets from JSONL, JSON, CSV, Parquet or a saved `datasets` directory (preference
pairs: `preferences.py`).

Every row remembers where it came from (`Rows.locate(i)` -> "prompts.jsonl:17"), so each error names
the file and line (JSONL/CSV: 1-based line; JSON/Parquet/`datasets`: 0-based row index, said as such)
and the column at fault. Warnings about truncated or skipped rows name the rows too.
"""

from __future__ import annotations

import difflib
import math
import random
import warnings
from dataclasses import dataclass, field

import torch

from .errors import ConfigError, DataError
from .files import Rows, read_rows  # noqa: F401 - re-exported: data.read_rows is public
from .tokens import keep_last, text_ids, without_appended, writes_bos  # noqa: F401 - also data.*

IGNORE_INDEX = -100  # label value that the cross-entropy loss skips
_SHOW = 3  # how many row locations a warning lists


def _missing(where: str, wanted: str | list[str], row: dict, option: str = "") -> DataError:
    """A DataError for a row without column `wanted` (or any of them), listing the row's columns and the
    nearest name (and the `option` that names the column instead), or saying that the column is there
    but empty."""
    names = [wanted] if isinstance(wanted, str) else wanted
    empty = [k for k in names if k in row]
    if empty:  # there, but null: an empty CSV cell, a JSON null
        return DataError(f"{where}: column {empty[0]!r} is empty (null)")
    near = difflib.get_close_matches(names[0], [str(k) for k in row], n=1, cutoff=0.6)
    hint = (
        f"; is {near[0]!r} a misspelling? rename it to {names[0]!r}"
        + (f", or pass {option} {near[0]}" if option else "")
        if near
        else ""
    )
    listed = " or ".join(map(repr, names))
    if len(row) == 1 and (sep := next((c for c in ";\t|" if c in str(next(iter(row)))), None)):
        hint = f"; is the file separated by {sep!r}? A CSV file's columns are separated by commas"
    return DataError(f"{where}: no {listed} column; this row has {sorted(map(str, row))}{hint}")


def _check_messages(where: str, key: str, messages) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: column {key!r} must be a non-empty list of {{role, content}} messages")
    for j, m in enumerate(messages):
        if (
            not isinstance(m, dict)
            or not isinstance(m.get("role"), str)
            or not isinstance(m.get("content"), str)
        ):
            raise DataError(
                f"{where}: {key}[{j}] must be an object with string 'role' and 'content', got {m!r}"
            )
        # Templates write the role verbatim or branch on it: an empty one renders a header that names
        # no one, or no turn at all. Other roles are left to the template (tool, developer, ipython...).
        if not m["role"].strip():
            raise DataError(f"{where}: {key}[{j}] has an empty 'role'")
    return messages


def render_chat(tokenizer, where: str, messages: list[dict], add_generation_prompt: bool) -> str:
    if tokenizer is None or getattr(tokenizer, "chat_template", None) is None:
        raise DataError(
            f"{where}: a messages row needs a tokenizer with a chat template, and this one has "
            "none; use a 'prompt' text column or set tokenizer.chat_template"
        )
    try:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except Exception as err:
        raise DataError(f"{where}: the chat template failed on these messages: {err}") from None


_FLOAT32_MAX = torch.finfo(torch.float32).max


def finite_float32(value) -> float | None:
    """`value` as a float where it is a finite float32 number, else None: NaN, inf, or past float32's
    range, which is inf once in a float32 tensor (10**400 included, which float() cannot even convert).
    Raises float()'s TypeError or ValueError for what is no number at all."""
    try:
        x = float(value)
    except OverflowError:  # an int (or Fraction) beyond any float
        return None
    return x if math.isfinite(x) and abs(x) <= _FLOAT32_MAX else None


def end_of_turn_id(tokenizer) -> int | None:
    """The special token the chat template writes right after an assistant's message (ChatML's
    <|im_end|>, Gemma's <end_of_turn>, Llama 3's <|eot_id|>), or None: no template, no special token
    there, or a template that cannot render a plain user/assistant exchange."""
    mark = "reinforce-lm-end-of-turn-probe"
    try:
        text = render_chat(
            tokenizer, "", [{"role": "user", "content": "hi"}, {"role": "assistant", "content": mark}], False
        )
    except DataError:
        return None
    after = text[text.find(mark) + len(mark) :] if mark in text else ""
    ids = tokenizer(after, add_special_tokens=False)["input_ids"] if after.strip() else []
    return ids[0] if ids and ids[0] in set(tokenizer.all_special_ids) else None


def conversation_ids(tokenizer, where: str, messages: list[dict]) -> list[int]:
    """Token ids of a whole conversation as its chat template renders it (the template writes any special
    tokens itself): what a reward model is trained on and scores (`rewards.RewardModel`)."""
    return tokenizer(render_chat(tokenizer, where, messages, False), add_special_tokens=False)["input_ids"]


# ------------------------------------------------------------------------------------------------
# Prompts (the RL stage)
# ------------------------------------------------------------------------------------------------
@dataclass
class PromptData:
    """Rendered prompt texts, every other column aligned with them, and where each row came from."""

    texts: list[str]
    columns: dict[str, list] = field(default_factory=dict)
    sources: list[str] = field(default_factory=list)
    templated: list[bool] = field(default_factory=list)  # rendered by a chat template (no BOS added)

    def is_templated(self, indices) -> list[bool] | None:
        """Which of these rows a chat template rendered, for `Sampler.sample` (None: none of them)."""
        return [self.templated[i] for i in indices] if any(self.templated) else None

    def __len__(self) -> int:
        return len(self.texts)


def load_prompts(
    path, tokenizer, prompt_column: str = "prompt", messages_column: str = "messages"
) -> PromptData:
    """Read prompts: a `prompt_column` string used as is, or a `messages_column` list rendered with the
    tokenizer's chat template (with the generation prompt). A row with both uses the prompt column.
    Other columns are kept, aligned, for reward functions; a row without one of them gets None. So is
    `messages_column`: the conversation a prompt was rendered from (None for a text prompt), which a
    learned reward model trained on conversations renders again with the completion."""
    rows = read_rows(path)
    texts, keys, chats = [], {}, []
    for i, row in enumerate(rows):
        where = rows.locate(i)
        chats.append(None)
        if row.get(prompt_column) is not None:
            text = row[prompt_column]
            if not isinstance(text, str):
                raise DataError(f"{where}: column {prompt_column!r} must be text, got {type(text).__name__}")
        elif row.get(messages_column) is not None:
            messages = _check_messages(where, messages_column, row[messages_column])
            text = render_chat(tokenizer, where, messages, add_generation_prompt=True)
            chats[-1] = messages
        else:
            raise _missing(where, [prompt_column, messages_column], row, "--prompt-column")
        if not text.strip():
            raise DataError(f"{where}: empty prompt")
        texts.append(text)
        keys.update(dict.fromkeys(k for k in row if k not in (prompt_column, messages_column)))
    columns = {k: [row.get(k) for row in rows] for k in keys}
    columns[messages_column] = chats  # all None in a file of text prompts: one reward fits both kinds
    templated = [c is not None for c in chats]
    return PromptData(texts=texts, columns=columns, sources=list(rows.sources), templated=templated)


# ------------------------------------------------------------------------------------------------
# SFT
# ------------------------------------------------------------------------------------------------
def _text_sft(tokenizer, where: str, row: dict) -> tuple[list[int], list[int]]:
    for key in ("prompt", "completion"):
        if key not in row or row[key] is None:
            raise _missing(where, key, row)
        if not isinstance(row[key], str):
            raise DataError(f"{where}: column {key!r} must be text, got {type(row[key]).__name__}")
    if not row["completion"].strip():
        raise DataError(f"{where}: empty completion")
    prompt_ids = without_appended(tokenizer, text_ids(tokenizer, row["prompt"]))
    # The completion as the continuation of the prompt: tokenized alone, a SentencePiece tokenizer would
    # prepend a space ("A:" + "4" trained as "A: 4"). Where the tokens merge across the join (a prompt
    # ending in a space), the prompt keeps its own ids, as RL samples after them, and the completion
    # is tokenized alone.
    full = without_appended(tokenizer, text_ids(tokenizer, row["prompt"] + row["completion"]))
    if full[: len(prompt_ids)] == prompt_ids and len(full) > len(prompt_ids):
        completion_ids = full[len(prompt_ids) :]
    else:
        completion_ids = tokenizer(row["completion"], add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        completion_ids = completion_ids + [tokenizer.eos_token_id]
    return prompt_ids + completion_ids, [IGNORE_INDEX] * len(prompt_ids) + completion_ids


def _messages_sft(tokenizer, where: str, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Label the assistant turns only. Template-agnostic: the characters of assistant turn i are those
    between render(messages[:i], generation prompt) and render(messages[:i+1]); tokens whose first
    character falls in such a span get labels (via the fast tokenizer's offsets)."""
    full = render_chat(tokenizer, where, messages, add_generation_prompt=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        if not m["content"].strip():
            raise DataError(f"{where}: empty completion (assistant message {i} has no content)")
        start = render_chat(tokenizer, where, messages[:i], True) if i else ""
        upto = render_chat(tokenizer, where, messages[: i + 1], False)
        if not (full.startswith(upto) and upto.startswith(start)):
            raise DataError(
                f"{where}: the chat template does not render conversations prefix by prefix "
                "(it rewrites earlier turns), so assistant turns cannot be located for the loss"
            )
        spans.append((len(start), len(upto)))
    if not spans:
        raise DataError(f"{where}: no assistant message to learn from")
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(f"{where}: SFT on messages needs a fast tokenizer (for character offsets)")
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    labels = [
        t if any(s <= a < e for s, e in spans) else IGNORE_INDEX
        for t, (a, _) in zip(ids, enc["offset_mapping"], strict=True)
    ]
    return ids, labels


def _warn(rows: list[str], what: str) -> None:
    if rows:
        shown = ", ".join(rows[:_SHOW]) + (", ..." if len(rows) > _SHOW else "")
        warnings.warn(f"{len(rows)} row(s) {what}: {shown}", stacklevel=3)


def load_sft(path, tokenizer, max_length: int, truncate: bool = True) -> list[dict]:
    """SFT examples {"input_ids", "labels"} with labels -100 on everything but the completion: from
    `prompt`/`completion` text (input = prompt + completion + eos) or `messages` (assistant turns only).
    A row longer than `max_length` is cut from the right when `truncate`, else skipped; a row whose
    prompt alone fills `max_length` is always skipped. Both are reported in one warning each."""
    rows = read_rows(path)
    examples, cut, skipped, text = [], [], [], 0
    for i, row in enumerate(rows):
        where = rows.locate(i)
        if row.get("messages") is not None:
            ids, labels = _messages_sft(tokenizer, where, _check_messages(where, "messages", row["messages"]))
        else:
            ids, labels = _text_sft(tokenizer, where, row)
            text += 1
        if len(ids) > max_length:
            first = next(j for j, t in enumerate(labels) if t != IGNORE_INDEX)
            if not truncate or first >= max_length:
                skipped.append(where)
                continue
            ids, labels = ids[:max_length], labels[:max_length]
            cut.append(where)
        examples.append({"input_ids": ids, "labels": labels, "source": where})
    if text and tokenizer.eos_token_id is None:  # a chat template ends its turns itself
        warnings.warn(
            f"{path}: the tokenizer has no EOS token, so its {text} prompt/completion rows end without "
            "one: the model does not learn where a completion stops",
            stacklevel=2,
        )
    if len(rows) > text and end_of_turn_id(tokenizer) is None:
        warnings.warn(
            f"{path}: the chat template writes no special token after an assistant's message, so its "
            f"{len(rows) - text} messages rows end without one: the model does not learn where a reply "
            "stops (sampling runs to max_new_tokens)",
            stacklevel=2,
        )
    _warn(cut, f"longer than max_length={max_length} truncated from the right")
    _warn(
        skipped,
        f"longer than max_length={max_length} skipped"
        + ("" if truncate else " (truncate=False)")
        + " or with a prompt that fills it",
    )
    if not examples:
        raise DataError(f"{path}: every row was skipped as longer than max_length={max_length}")
    return examples


def pack_sft(examples: list[dict], max_length: int) -> list[dict]:
    """Concatenate examples end to end and cut the stream into chunks of `max_length` (the last may be
    shorter). Packed examples attend to each other; each starts with prompt tokens, which carry no loss."""
    ids = [t for ex in examples for t in ex["input_ids"]]
    labels = [t for ex in examples for t in ex["labels"]]
    return [
        {"input_ids": ids[s : s + max_length], "labels": labels[s : s + max_length]}
        for s in range(0, len(ids), max_length)
    ]


def _pad(seqs: list[list], value, length: int | None = None) -> torch.Tensor:
    length = length or max(len(s) for s in seqs)
    return torch.tensor([list(s) + [value] * (length - len(s)) for s in seqs])


def collate_sft(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch: input_ids, attention_mask and labels [N, L] (labels -100 at pads)."""
    ids = [ex["input_ids"] for ex in examples]
    return {
        "input_ids": _pad(ids, pad_id),  # [N, L]
        "attention_mask": _pad([[1] * len(s) for s in ids], 0),  # [N, L]
        "labels": _pad([ex["labels"] for ex in examples], IGNORE_INDEX),  # [N, L]
    }


def split_eval(items: list, eval_fraction: float, seed: int) -> tuple[list, list]:
    """Deterministic split: round(len * eval_fraction) items (at least one when the fraction is > 0 and
    there are two items or more) go to eval, chosen by `seed`; both parts keep the original order."""
    if not 0.0 <= eval_fraction < 1.0:
        raise ConfigError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    n_eval = round(len(items) * eval_fraction)
    if eval_fraction > 0 and len(items) >= 2:
        n_eval = min(max(n_eval, 1), len(items) - 1)
    chosen = set(random.Random(seed).sample(range(len(items)), n_eval))
    train = [x for i, x in enumerate(items) if i not in chosen]
    return train, [x for i, x in enumerate(items) if i in chosen]


def epoch_indices(n: int, start: int, count: int, seed: int) -> torch.Tensor:
    """Positions start..start+count of an endless stream of seeded permutations of range(n): [count]."""
    out, pos = [], start
    while len(out) < count:
        epoch, offset = divmod(pos, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
        take = perm[offset : offset + count - len(out)].tolist()
        out += take
        pos += len(take)
    return torch.tensor(out, dtype=torch.long)


def step_indices(n: int, step: int, batch_size: int, rank: int, world_size: int, seed: int) -> torch.Tensor:
    """This rank's rows of the global batch of `step`: the data position is a function of the step (exact
    resume), and N processes together read exactly what one process reads. [batch_size // world_size]"""
    per_rank = batch_size // world_size
    return epoch_indices(n, step * batch_size + rank * per_rank, per_rank, seed)


def __getattr__(name: str):
    """`data.load_preferences` and `data.collate_preferences` moved to `preferences.py` (which imports
    this module, so they are found here on first use)."""
    if name in ("load_preferences", "collate_preferences"):
        from . import preferences

        return getattr(preferences, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
