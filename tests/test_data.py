"""Data loading: every format, every bad input with its location, chat templates, SFT labels, preferences."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from reinforce_lm import toy
from reinforce_lm.data import (
    IGNORE_INDEX,
    collate_sft,
    load_prompts,
    load_sft,
    pack_sft,
    read_rows,
    split_eval,
)
from reinforce_lm.errors import ConfigError, DataError
from reinforce_lm.files import write_jsonl
from reinforce_lm.preferences import collate_preferences, load_preferences

ROWS = [
    {"prompt": "a?", "letter": "a", "n": 1},
    {"prompt": "b?", "letter": "b", "n": 2},
    {"prompt": "c?", "letter": "c", "n": 3},
]


def write_all_formats(tmp_path, rows):
    """The same rows as .jsonl, .json, .csv, .parquet and a datasets directory."""
    import datasets

    paths = [write_jsonl(tmp_path / "p.jsonl", rows)]
    (tmp_path / "p.json").write_text(json.dumps(rows))
    paths.append(tmp_path / "p.json")
    with open(tmp_path / "p.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    paths.append(tmp_path / "p.csv")
    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "p.parquet"))
    paths.append(tmp_path / "p.parquet")
    ds.save_to_disk(str(tmp_path / "p_ds"))
    paths.append(tmp_path / "p_ds")
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "p_dd"))
    paths.append(tmp_path / "p_dd")
    return paths


def test_every_format_reads_the_same_rows(tmp_path):
    for path in write_all_formats(tmp_path, ROWS):
        rows = read_rows(path)
        # CSV has only text; compare as text.
        assert [{k: str(v) for k, v in r.items()} for r in rows] == [
            {k: str(v) for k, v in r.items()} for r in ROWS
        ], path
        assert len(rows.sources) == 3
    assert read_rows(tmp_path / "p.jsonl").locate(2).endswith("p.jsonl:3")
    assert read_rows(tmp_path / "p.csv").locate(0).endswith("p.csv:2")  # line 1 is the header
    assert read_rows(tmp_path / "p.parquet").locate(1).endswith("p.parquet: row index 1")


def test_jsonl_blank_lines_skipped_and_line_numbers_kept(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a"}\n\n  \n{"prompt": "b"}\n')
    rows = read_rows(path)
    assert [r["prompt"] for r in rows] == ["a", "b"]
    assert rows.locate(1).endswith("p.jsonl:4")


@pytest.mark.parametrize(
    "name, content, match",
    [
        # The column is where the value is missing, not column 1 of a line after the newline.
        (
            "p.jsonl",
            '{"prompt": "a"}\n{"prompt": \n',
            r"p\.jsonl:2: invalid JSON \(Expecting value at column 12\)",
        ),
        ("p.jsonl", '{"prompt": "a"}\n\n[1, 2]\n', r"p\.jsonl:3: expected a JSON object, got list"),
        ("p.json", '{"prompt": "a"}\n{"prompt": "b"}\n', r"p\.json:2: invalid JSON.*\.jsonl"),
        ("p.json", '{"prompt": "a"}', r"p\.json: expected a JSON list"),
        ("p.json", '[{"prompt": "a"}, 3]', r"p\.json: row index 1: expected a JSON object"),
        ("p.csv", "prompt,x\na,1\nb,2,3\n", r"p\.csv:3: more fields"),
        (
            "p.csv",
            "prompt,x,y\na,1,2\nb,2\n",
            r"p\.csv:3: fewer fields than the header's 3 .*no value for \['y'\]",
        ),
        ("p.jsonl", "", r"p\.jsonl: the file is empty"),
        ("p.jsonl", "\n\n", r"p\.jsonl: no rows"),
        ("p.txt", "hello", r"p\.txt: unknown file type '\.txt'"),
        ("p.parquet", "not parquet", r"p\.parquet: cannot read Parquet"),
        # Lone UTF-16 surrogates (no character; the tokenizer refuses them) and what json.loads raises
        # besides JSONDecodeError.
        (
            "p.jsonl",
            '{"prompt": "a"}\n{"prompt": "a\\ud800b"}\n',
            r"p\.jsonl:2: invalid JSON \(the escape \\ud800 is half of a UTF-16 surrogate pair",
        ),
        ("p.json", '[{"prompt": "a"}, {"\\uDC00": "b"}]', r"p\.json: row index 1: .*escape \\udc00"),
        ("p.jsonl", '{"p": "a"}\n' + "[" * 100_000 + "]" * 100_000, r"p\.jsonl:2: .*nested too deeply"),
        ("p.json", "[" * 100_000 + "]" * 100_000, r"p\.json: invalid JSON \(nested too deeply\)"),
        ("p.jsonl", '{"n": ' + "9" * 5000 + "}", r"p\.jsonl:1: invalid JSON \(an integer of more than"),
        ("p.csv", "prompt,x,prompt\na,1,b\n", r"p\.csv:1: the header names the column 'prompt' more than"),
    ],
)
def test_unreadable_files(tmp_path, name, content, match):
    (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match=match):
        read_rows(tmp_path / name)


@pytest.mark.parametrize(
    "name, content, match",
    [
        (
            "p.jsonl",
            '{"prompt": "a"}\n\n{"prompt": "caf\xe9"}\n',
            r"p\.jsonl:3: not UTF-8 \(byte 0xe9 at column 16\)",
        ),
        (
            "p.json",
            '[{"prompt": "a"},\n {"prompt": "\xe9"}]',
            r"p\.json:2: not UTF-8 \(byte 0xe9 at column 14\)",
        ),
        ("p.csv", "prompt\na\n\xe9t\xe9\n", r"p\.csv:3: not UTF-8 \(byte 0xe9 at column 1\); re-save"),
    ],
)
def test_not_utf8_names_file_line_and_byte(tmp_path, name, content, match):
    (tmp_path / name).write_bytes(content.encode("latin-1"))
    with pytest.raises(DataError, match=match):
        read_rows(tmp_path / name)


def test_utf8_bom_is_accepted(tmp_path):
    """Excel and some editors start UTF-8 files with a byte-order mark; it is not part of the first key."""
    bom = "\ufeff"
    (tmp_path / "p.csv").write_text(bom + "prompt,answer\r\ncafé?,4\r\n", encoding="utf-8")
    (tmp_path / "p.jsonl").write_text(bom + '{"prompt": "café?", "answer": "4"}\n', encoding="utf-8")
    (tmp_path / "p.json").write_text(bom + '[{"prompt": "café?", "answer": "4"}]', encoding="utf-8")
    for name in ("p.csv", "p.jsonl", "p.json"):
        assert list(read_rows(tmp_path / name)) == [{"prompt": "café?", "answer": "4"}], name


def test_a_bom_then_bytes_that_are_not_utf8_are_placed_right(tmp_path):
    """The error position counts from the file's start after the byte-order mark, in characters."""
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + '{"prompt": "é"}\n'.encode() + b'{"prompt": "ab\xe9"}\n')
    with pytest.raises(DataError, match=r"bom.jsonl:2: not UTF-8 \(byte 0xe9 at column 15\)"):
        read_rows(path)


def test_surrogate_pairs_are_characters(tmp_path):
    """Only a lone surrogate is refused: an escaped pair is one character (here outside the BMP)."""
    (tmp_path / "p.jsonl").write_text('{"prompt": "\\ud83d\\ude00?"}\n')
    assert read_rows(tmp_path / "p.jsonl")[0] == {"prompt": "\U0001f600?"}


def test_an_empty_saved_dataset_says_so(tmp_path):
    """`datasets` saves a dataset of 0 rows without data files, then fails to load it (IndexError)."""
    import datasets

    empty = datasets.Dataset.from_dict(
        {"prompt": []}, features=datasets.Features({"prompt": datasets.Value("string")})
    )
    empty.save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(DataError, match=r"ds: the dataset is empty \(0 rows\)"):
        read_rows(tmp_path / "ds")
    datasets.DatasetDict({"train": empty}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match=r"dd/train: the dataset is empty \(0 rows\)"):
        read_rows(tmp_path / "dd")


def test_missing_file_and_bad_directory(tmp_path):
    with pytest.raises(DataError, match=r"nope\.jsonl: no such file"):
        read_rows(tmp_path / "nope.jsonl")
    (tmp_path / "d").mkdir()
    with pytest.raises(DataError, match=r"d: not a directory written by datasets"):
        read_rows(tmp_path / "d")


def test_load_prompts_text_and_messages_with_aligned_columns(tmp_path, tokenizer):
    rows = [
        {"prompt": "a?", "letter": "a"},
        {"messages": [{"role": "user", "content": "b?"}], "letter": "b", "extra": 7},
    ]
    data = load_prompts(write_jsonl(tmp_path / "p.jsonl", rows), tokenizer)
    assert data.texts == ["a?", "u:b?a:"]  # the toy template with the generation prompt
    chat = [None, [{"role": "user", "content": "b?"}]]  # the conversation a prompt was rendered from
    assert data.columns == {"letter": ["a", "b"], "extra": [None, 7], "messages": chat}
    assert data.sources[1].endswith("p.jsonl:2") and len(data) == 2


def test_load_prompts_custom_column(tmp_path, tokenizer):
    data = load_prompts(
        write_jsonl(tmp_path / "p.jsonl", [{"q": "a?", "k": 1}]), tokenizer, prompt_column="q"
    )
    assert data.texts == ["a?"] and data.columns == {"k": [1], "messages": [None]}


@pytest.mark.parametrize(
    "row, match",
    [
        (
            {"promt": "a?"},
            r"p\.jsonl:2: no 'prompt' or 'messages' column; this row has \['promt'\]; "
            r"is 'promt' a misspelling\? rename it to 'prompt', or pass --prompt-column promt$",
        ),
        ({"prompt": None, "answer": 1}, r"p\.jsonl:2: column 'prompt' is empty \(null\)"),
        ({"prompt": 3}, r"p\.jsonl:2: column 'prompt' must be text, got int"),
        ({"prompt": "  "}, r"p\.jsonl:2: empty prompt"),
        ({"messages": "hi"}, r"p\.jsonl:2: column 'messages' must be a non-empty list"),
        ({"messages": [{"role": "user"}]}, r"p\.jsonl:2: messages\[0\] must be an object"),
        (
            {"messages": [{"role": "user", "content": "a"}, {"role": " ", "content": "b"}]},
            r"p\.jsonl:2: messages\[1\] has an empty 'role'",
        ),
    ],
)
def test_load_prompts_bad_rows(tmp_path, tokenizer, row, match):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "ok"}, row])
    with pytest.raises(DataError, match=match):
        load_prompts(path, tokenizer)


def test_messages_without_chat_template(tmp_path):
    tok = toy.make_tokenizer()
    tok.chat_template = None
    path = write_jsonl(tmp_path / "p.jsonl", [{"messages": [{"role": "user", "content": "a"}]}])
    with pytest.raises(DataError, match=r"p\.jsonl:1: .*no(ne)? .*chat template|chat template.*none"):
        load_prompts(path, tok)


def test_sft_text_labels_mask_exactly_the_prompt(tmp_path, tokenizer):
    path = write_jsonl(
        tmp_path / "s.jsonl", [{"prompt": "a?", "completion": "aaa"}, {"prompt": "1+1=", "completion": "2"}]
    )
    ex = load_sft(path, tokenizer, max_length=64)
    eos = tokenizer.eos_token_id
    ids_a = tokenizer("a?")["input_ids"]
    assert ex[0]["input_ids"] == ids_a + tokenizer("aaa")["input_ids"] + [eos]
    assert ex[0]["labels"] == [IGNORE_INDEX] * 2 + tokenizer("aaa")["input_ids"] + [eos]
    assert [i for i, t in enumerate(ex[1]["labels"]) if t == IGNORE_INDEX] == [0, 1, 2, 3]
    assert tokenizer.decode(ex[1]["input_ids"][4:]) == "2<eos>"


def test_sft_messages_label_only_assistant_turns(tmp_path, tokenizer):
    msgs = [
        {"role": "user", "content": "ab"},
        {"role": "assistant", "content": "cd"},
        {"role": "user", "content": "e"},
        {"role": "assistant", "content": "f"},
    ]
    (ex,) = load_sft(write_jsonl(tmp_path / "s.jsonl", [{"messages": msgs}]), tokenizer, max_length=64)
    # Rendered: "u:ab" "a:" "cd<eos>" "u:e" "a:" "f<eos>"; one token per character, <eos> one token.
    assert ex["input_ids"] == tokenizer("u:aba:cd<eos>u:ea:f<eos>", add_special_tokens=False)["input_ids"]
    learned = [i for i, t in enumerate(ex["labels"]) if t != IGNORE_INDEX]
    assert learned == [6, 7, 8, 14, 15]
    assert all(ex["labels"][i] == ex["input_ids"][i] for i in learned)
    assert tokenizer.decode([ex["input_ids"][i] for i in learned]) == "cd<eos>f<eos>"


@pytest.mark.parametrize(
    "row, match",
    [
        ({"prompt": "a", "completion": ""}, r"s\.jsonl:1: empty completion"),
        (
            {"prompt": "a", "completon": "b"},
            r"s\.jsonl:1: no 'completion' column.*is 'completon' a misspelling",
        ),
        ({"messages": [{"role": "user", "content": "a"}]}, r"s\.jsonl:1: no assistant message"),
        (
            {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}]},
            r"s\.jsonl:1: empty completion",
        ),
    ],
)
def test_sft_bad_rows(tmp_path, tokenizer, row, match):
    with pytest.raises(DataError, match=match):
        load_sft(write_jsonl(tmp_path / "s.jsonl", [row]), tokenizer, max_length=64)


def test_sft_truncation_and_skips_are_reported(tmp_path, tokenizer):
    rows = [
        {"prompt": "ab", "completion": "c"},  # 4 tokens: kept whole
        {"prompt": "ab", "completion": "cdefgh"},  # 9 tokens: truncated to 6
        {"prompt": "abcdefgh", "completion": "c"},  # prompt alone fills max_length: skipped
    ]
    path = write_jsonl(tmp_path / "s.jsonl", rows)
    with pytest.warns(UserWarning) as record:
        ex = load_sft(path, tokenizer, max_length=6)
    messages = [str(w.message) for w in record]
    assert any("1 row(s)" in m and "truncated" in m and "s.jsonl:2" in m for m in messages)
    assert any("1 row(s)" in m and "skipped" in m and "s.jsonl:3" in m for m in messages)
    assert len(ex) == 2 and len(ex[1]["input_ids"]) == 6
    assert ex[1]["labels"][:2] == [IGNORE_INDEX] * 2 and IGNORE_INDEX not in ex[1]["labels"][2:]
    with pytest.warns(UserWarning, match=r"2 row\(s\).*skipped.*truncate=False.*s\.jsonl:2, .*s\.jsonl:3"):
        assert len(load_sft(path, tokenizer, max_length=6, truncate=False)) == 1


def test_pack_and_collate_sft():
    examples = [{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, {"input_ids": [4, 5], "labels": [-100, 5]}]
    packed = pack_sft(examples, max_length=2)
    assert packed == [
        {"input_ids": [1, 2], "labels": [-100, 2]},
        {"input_ids": [3, 4], "labels": [3, -100]},
        {"input_ids": [5], "labels": [5]},
    ]
    batch = collate_sft(examples, pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 5, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [[-100, 2, 3], [-100, 5, -100]]
    assert batch["input_ids"].dtype == torch.long


def test_preferences_text_messages_and_margin(tmp_path, tokenizer):
    rows = [
        {"prompt": "a?", "chosen": "aa", "rejected": "bb", "margin": 0.5},
        {
            "chosen": [{"role": "user", "content": "a?"}, {"role": "assistant", "content": "a"}],
            "rejected": [{"role": "user", "content": "a?"}, {"role": "assistant", "content": "b"}],
        },
        {
            "prompt": "c?",
            "chosen": [{"role": "assistant", "content": "c"}],
            "rejected": [{"role": "assistant", "content": "d"}],
        },
    ]
    pairs = load_preferences(write_jsonl(tmp_path / "p.jsonl", rows), tokenizer, max_length=64)
    assert pairs[0] == {
        "chosen_ids": tokenizer("a?aa")["input_ids"],
        "rejected_ids": tokenizer("a?bb")["input_ids"],
        "margin": 0.5,
        "source": f"{tmp_path / 'p.jsonl'}:1",  # named in errors found later (token ids, ...)
        "chat": False,  # text, not messages: how a reward model trained on it scores completions
    }
    assert [p["chat"] for p in pairs] == [False, True, True]
    assert pairs[1]["chosen_ids"] == tokenizer("u:a?a:a<eos>")["input_ids"] and pairs[1]["margin"] == 0.0
    assert pairs[2]["rejected_ids"] == tokenizer("u:c?a:d<eos>")["input_ids"]
    batch = collate_preferences(pairs, pad_id=tokenizer.pad_token_id)
    n = max(len(p[k]) for p in pairs for k in ("chosen_ids", "rejected_ids"))
    assert batch["chosen_input_ids"].shape == batch["rejected_input_ids"].shape == (3, n)
    assert batch["chosen_attention_mask"][0].tolist() == [1] * 4 + [0] * (n - 4)
    assert batch["margin"].tolist() == [0.5, 0.0, 0.0] and batch["margin"].dtype == torch.float32


@pytest.mark.parametrize(
    "row, match",
    [
        ({"prompt": "a", "chosen": "x", "rejectd": "y"}, r"p\.jsonl:1: no 'rejected' column.*'rejectd'"),
        ({"promt": "a", "chosen": "x", "rejected": "y"}, r"p\.jsonl:1: no 'prompt' column.*'promt'"),
        ({"prompt": "a", "chosen": "x", "rejected": "y", "margin": "big"}, r"p\.jsonl:1: column 'margin'"),
        # Beyond any float (OverflowError), and finite as a float64 but inf as the loss's float32.
        (
            {"prompt": "a", "chosen": "x", "rejected": "y", "margin": 9**400},
            r"p\.jsonl:1: column 'margin' must be a finite float32 number, got \d+\.\.\.\d+$",
        ),
        (
            {"prompt": "a", "chosen": "x", "rejected": "y", "margin": -1e308},
            r"p\.jsonl:1: column 'margin' must be a finite float32 number, got -1e\+308",
        ),
    ],
)
def test_preferences_bad_rows(tmp_path, tokenizer, row, match):
    with pytest.raises(DataError, match=match):
        load_preferences(write_jsonl(tmp_path / "p.jsonl", [row]), tokenizer, max_length=64)


def test_preferences_truncation_reported(tmp_path, tokenizer):
    rows = [
        {"prompt": "a", "chosen": "bcdefgh", "rejected": "c"},
        {"prompt": "a", "chosen": "xbcde", "rejected": "ybcde"},  # the same once cut to their last 4
        {"prompt": "a", "chosen": "b", "rejected": "c"},
        {"prompt": "a", "chosen": "b", "rejected": "b"},  # the same as given: teaches nothing
    ]
    with pytest.warns(UserWarning) as record:
        pairs = load_preferences(write_jsonl(tmp_path / "p.jsonl", rows), tokenizer, max_length=4)
    messages = " | ".join(str(w.message) for w in record)
    assert "keep their last 4 tokens: " in messages and "p.jsonl:1" in messages
    assert "2 row(s) skipped: chosen and rejected are the same" in messages and "p.jsonl:2, " in messages
    assert "p.jsonl:4" in messages
    assert len(pairs) == 2 and pairs[0]["chosen_ids"] == tokenizer("efgh")["input_ids"]


def test_split_eval_is_deterministic_and_disjoint():
    items = list(range(20))
    train, eval_ = split_eval(items, 0.25, seed=3)
    assert (train, eval_) == split_eval(items, 0.25, seed=3)
    assert len(eval_) == 5 and sorted(train + eval_) == items and train == sorted(train)
    assert split_eval(items, 0.25, seed=4) != (train, eval_)
    assert split_eval(items, 0.0, seed=0) == (items, [])
    assert len(split_eval([1, 2, 3], 0.01, seed=0)[1]) == 1
    with pytest.raises(ConfigError, match="eval_fraction"):
        split_eval(items, 1.0, seed=0)


def test_moved_names_still_import_from_their_old_modules():
    """Preference loading moved to preferences.py and LoRA to lora.py; the old import paths still work."""
    from reinforce_lm import data, lora, models, preferences

    assert data.load_preferences is preferences.load_preferences
    assert data.collate_preferences is preferences.collate_preferences
    assert models.apply_lora is lora.apply_lora and models.RefViaDisabledAdapter is lora.RefViaDisabledAdapter
    with pytest.raises(AttributeError, match="no attribute 'load_prefs'"):
        data.load_prefs  # noqa: B018


def test_text_prompts_pass_messages_as_none(tmp_path):
    """The README's promise: `messages` reaches reward functions for every prompt, None for a text one,
    so one reward function (`def r(prompts, completions, messages, **kw)`) fits both kinds of file."""
    from reinforce_lm.rewards import build_rewards

    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "ab?", "answer": 1}, {"prompt": "c?", "answer": 2}])
    data = load_prompts(path, toy.make_tokenizer())
    assert data.columns == {"answer": [1, 2], "messages": [None, None]}

    def r(prompts, completions, messages):
        return [float(m is None) for m in messages]

    rewards = build_rewards([r], [])
    rewards.check(data.columns)
    total, _ = rewards(data.texts, ["x", "y"], columns=data.columns)
    assert total.tolist() == [1.0, 1.0]


def test_an_unterminated_json_string_is_reported_once_with_its_column(tmp_path, tokenizer):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a?"}\n{"prompt": "b?}\n')
    with pytest.raises(
        DataError, match=r"p\.jsonl:2: invalid JSON \(Unterminated string starting at column 12\)"
    ):
        load_prompts(path, tokenizer)


def test_a_csv_separated_by_semicolons_is_named_as_such(tmp_path, tokenizer):
    path = tmp_path / "p.csv"
    path.write_text("prompt;answer\na?;aa\n")
    with pytest.raises(DataError, match=r"p\.csv:2: no 'prompt' .* separated by ';'\? A CSV file's columns"):
        load_prompts(path, tokenizer)
