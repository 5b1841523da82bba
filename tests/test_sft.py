"""The SFT stage: labels, exact normalisation, held-out loss falling, packing, resume, bad input."""

from __future__ import annotations

import pytest
import torch

from reinforce_lm import cli, files, toy
from reinforce_lm.data import IGNORE_INDEX
from reinforce_lm.distributed import Dist
from reinforce_lm.metrics import read_metrics
from reinforce_lm.models import load_causal_lm, load_tokenizer
from reinforce_lm.stages.sft import SFTConfig, SFTStage, load_sft_splits, run_sft, sum_nll
from reinforce_lm.trainer import split


def write_jsonl(path, rows):
    return str(files.write_jsonl(path, rows))


def letter_rows(n, seed, length=4):
    return [{"prompt": r["prompt"], "completion": r["letter"] * length} for r in toy.letter_prompts(n, seed)]


def test_prompt_tokens_get_no_loss(tmp_path, llama_dir):
    tok = load_tokenizer(str(llama_dir))
    rows = [
        {"prompt": "c?", "completion": "ccc"},
        {"messages": [{"role": "user", "content": "d?"}, {"role": "assistant", "content": "dd"}]},
    ]
    cfg = SFTConfig(
        model=str(llama_dir), data=write_jsonl(tmp_path / "d.jsonl", rows), eval_fraction=0.0, batch_size=2
    )
    train, held_out = load_sft_splits(cfg, tok)
    assert held_out == []
    ids = tok("c?")["input_ids"]
    c, eos = tok.convert_tokens_to_ids("c"), tok.eos_token_id
    assert train[0]["labels"] == [IGNORE_INDEX] * len(ids) + [c, c, c, eos]
    labelled = [t for t, lab in zip(train[1]["input_ids"], train[1]["labels"], strict=True) if lab != -100]
    assert tok.decode(labelled) == "dd<eos>"  # the assistant turn and its end, not "u:d?a:"

    # The stage's loss counts exactly those tokens: compare with cross-entropy on them by hand.
    stage = SFTStage(cfg, load_causal_lm(str(llama_dir)), tok, train, [], Dist())
    batch, _ = stage.collect(0)
    assert batch["mask"].sum() == 4 + 3  # shifted: mask[:, j] says whether token j+1 is labelled
    model = stage.model
    nll, count = sum_nll(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    manual = 0.0
    for b in range(len(batch["input_ids"])):
        for j in range(batch["input_ids"].shape[1] - 1):
            if batch["labels"][b, j + 1] != IGNORE_INDEX:
                manual -= torch.log_softmax(logits[b, j], -1)[batch["labels"][b, j + 1]].item()
    assert count == 7 and nll.item() == pytest.approx(manual, rel=1e-5)


def test_a_prompt_that_writes_its_bos_gets_one_as_in_rl(tmp_path):
    """A tokenizer that adds BOS and a text prompt that starts with it: SFT's prompt ids equal the ids
    RL samples from (one BOS), where SFT added a second one."""
    from tokenizers import processors

    from reinforce_lm.data import load_sft
    from reinforce_lm.rollout import Sampler

    tok = toy.make_tokenizer()
    bos, bos_id = tok.bos_token, tok.bos_token_id
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, bos_id)]
    )
    for prompt in (bos + "c?", "c?"):
        path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": prompt, "completion": "cc"}])
        (ex,) = load_sft(path, tok, max_length=64)
        n_prompt = ex["labels"].index(next(x for x in ex["labels"] if x != IGNORE_INDEX))
        ids, _ = Sampler(tok, max_new_tokens=2).encode([prompt], "cpu")
        assert (
            ex["input_ids"][:n_prompt]
            == ids[0].tolist()
            == [bos_id, *tok("c?", add_special_tokens=False)["input_ids"]]
        )


def test_a_completion_is_tokenized_as_the_prompts_continuation(tmp_path):
    """A SentencePiece-style tokenizer prepends a space to a text tokenized alone: "A:" + "4" was trained
    as "A: 4". The completion now continues the prompt's tokens; and a text that writes its BOS gets no
    second one in preference pairs either."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from reinforce_lm.data import load_sft
    from reinforce_lm.preferences import load_preferences

    chars = ["<pad>", "<eos>", "<unk>", "<bos>", "\u2581", *"A:4"]
    sp = Tokenizer(models.WordLevel({c: i for i, c in enumerate(chars)}, unk_token="<unk>"))
    sp.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Metaspace(prepend_scheme="always"), pre_tokenizers.Split(Regex("."), "isolated")]
    )
    sp.decoder = decoders.Metaspace(prepend_scheme="always")
    tok = PreTrainedTokenizerFast(
        tokenizer_object=sp, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>"
    )
    assert tok.convert_ids_to_tokens(tok("4")["input_ids"]) == ["\u2581", "4"]  # alone: a space first
    (ex,) = load_sft(write_jsonl(tmp_path / "d.jsonl", [{"prompt": "A:", "completion": "4"}]), tok, 64)
    assert tok.convert_ids_to_tokens(ex["input_ids"]) == ["\u2581", "A", ":", "4", "<eos>"]
    assert tok.convert_ids_to_tokens([x for x in ex["labels"] if x != IGNORE_INDEX]) == ["4", "<eos>"]

    tok = toy.make_tokenizer()
    bos = tok.bos_token
    from tokenizers import processors

    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, tok.bos_token_id)]
    )
    rows = [{"prompt": bos + "c?", "chosen": "cc", "rejected": "dd"}]
    (pair,) = load_preferences(write_jsonl(tmp_path / "p.jsonl", rows), tok, 64)
    assert pair["chosen_ids"].count(tok.bos_token_id) == 1


def test_micro_batches_sum_to_the_batch_loss(tmp_path, llama_dir):
    """Loss divided by the global label-token count: any micro-batching gives the same gradient."""
    tok = load_tokenizer(str(llama_dir))
    rows = [{"prompt": "a?", "completion": "a" * (1 + i % 5)} for i in range(8)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    cfg = SFTConfig(model=str(llama_dir), data=data, batch_size=8, eval_fraction=0.0)
    train, _ = load_sft_splits(cfg, tok)
    stage = SFTStage(cfg, load_causal_lm(str(llama_dir)), tok, train, [], Dist())
    batch, _ = stage.collect(0)
    normalizer = {"tokens": batch["mask"].sum().double(), "seqs": torch.tensor(8.0)}
    grads = []
    for parts in (1, 3, 8):
        stage.model.zero_grad()
        total = 0.0
        for micro in split(batch, torch.arange(8), parts):
            loss, _ = stage.loss(micro, normalizer)
            loss.backward()
            total += loss.item()
        grads.append(torch.cat([p.grad.flatten() for p in stage.model.parameters()]))
        if parts == 1:
            whole = total
        assert total == pytest.approx(whole, rel=1e-5)
    assert torch.allclose(grads[0], grads[1], atol=1e-6) and torch.allclose(grads[0], grads[2], atol=1e-6)


def sft_args(model, data, out, *extra):
    return ["sft", "--model", str(model), "--data", data, "--output-dir", str(out), "--no-progress", *extra]


def test_sft_lowers_held_out_loss(tmp_path, llama_dir, capsys):
    train = write_jsonl(tmp_path / "train.jsonl", letter_rows(128, seed=0))
    held_out = write_jsonl(tmp_path / "held_out.jsonl", letter_rows(32, seed=1))
    out = tmp_path / "sft"
    cli.main(sft_args(llama_dir, train, out, "--eval-data", held_out, "--steps", "16", "--lr", "1e-2"))
    rows = read_metrics(out / "metrics.jsonl")
    before, after = rows[0]["eval_loss"], rows[-1]["eval_loss"]
    print(capsys.readouterr().out)
    assert rows[0]["step"] == 0 and rows[-1]["step"] == 16
    assert [r["step"] for r in rows if "eval_loss" in r] == [0, 8, 16]  # once per epoch (128/16 steps)
    assert after < 0.5 * before, (before, after)
    # The run directory stands for its last checkpoint, which is a plain causal-LM directory.
    model = load_causal_lm(str(out))
    assert type(model).__name__ == "LlamaForCausalLM"


def test_packing_and_exact_resume(tmp_path, llama_dir):
    data = write_jsonl(tmp_path / "train.jsonl", letter_rows(64, seed=0))
    common = ("--packing", "--max-length", "24", "--batch-size", "4", "--lr", "1e-2", "--eval-fraction", "0")
    cli.main(sft_args(llama_dir, data, tmp_path / "once", "--steps", "4", *common))
    cli.main(sft_args(llama_dir, data, tmp_path / "twice", "--steps", "2", *common))
    cli.main(sft_args(llama_dir, data, tmp_path / "twice", "--steps", "4", "--resume", *common))
    once = load_causal_lm(str(tmp_path / "once")).state_dict()
    twice = load_causal_lm(str(tmp_path / "twice")).state_dict()
    assert all(torch.equal(once[k], twice[k]) for k in once)
    losses = [r["loss"] for r in read_metrics(tmp_path / "twice" / "metrics.jsonl")]
    assert losses == [r["loss"] for r in read_metrics(tmp_path / "once" / "metrics.jsonl")]


@pytest.mark.parametrize(
    "row, message",
    [
        ({"prompt": "a?", "completion": "  "}, r"bad.jsonl:2: empty completion"),
        (
            {"prompt": "a?", "completon": "aa"},
            r"bad.jsonl:2: no 'completion' column.*is 'completon' a misspelling\? rename it to 'completion'$",
        ),
    ],
)
def test_bad_rows_fail_before_training(tmp_path, llama_dir, capsys, row, message):
    data = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a?", "completion": "aa"}, row])
    with pytest.raises(SystemExit) as exit_info:
        cli.main(sft_args(llama_dir, data, tmp_path / "out"))
    assert exit_info.value.code == 2
    assert __import__("re").search(message, capsys.readouterr().err)
    assert not (tmp_path / "out" / "metrics.jsonl").exists()  # nothing was trained


@pytest.mark.parametrize("truncate, word", [(True, "truncated"), (False, "skipped")])
def test_over_long_rows_are_reported(tmp_path, llama_dir, truncate, word):
    rows = [{"prompt": "a?", "completion": "aa"}] * 3 + [{"prompt": "b?", "completion": "b" * 40}]
    data = write_jsonl(tmp_path / "long.jsonl", rows)
    cfg = SFTConfig(
        model=str(llama_dir),
        data=data,
        output_dir=str(tmp_path / "out"),
        max_length=16,
        truncate=truncate,
        steps=1,
        batch_size=2,
        eval_fraction=0.0,
        progress=False,
    )
    with pytest.warns(UserWarning, match=rf"1 row\(s\) longer than max_length=16 {word}.*long.jsonl:4"):
        assert run_sft(cfg) == 0


def test_a_token_past_the_embedding_is_a_data_error(tmp_path):
    """A tokenizer larger than the model's embedding (never resized): SFT names the example."""
    from reinforce_lm.errors import DataError

    tok = toy.make_tokenizer()
    model = toy.make_model("llama", tok)
    model.resize_token_embeddings(len(tok) - 3)  # the last 3 characters have no row
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    rows = [{"prompt": "a?", "completion": "aa"}] * 3 + [{"prompt": "b?", "completion": "b."}]
    write_jsonl(tmp_path / "d.jsonl", rows)
    cfg = SFTConfig(model=str(tmp_path / "m"), data=str(tmp_path / "d.jsonl"), output_dir=str(tmp_path / "o"),
                    steps=1, eval_fraction=0.25, progress=False)  # fmt: skip
    dot = tok.convert_tokens_to_ids(".")  # one of the last 3
    with pytest.raises(DataError, match=rf"d.jsonl:4 has token id {dot}, but the model"):  # the file's line
        run_sft(cfg)


def test_a_chat_template_that_ends_no_turn_is_warned_about(tmp_path, llama_dir):
    """Messages rows whose template writes nothing after the assistant's text (no EOS, no end-of-turn
    token) never teach the model to stop; the toy template (EOS after each reply) is not warned about."""
    import copy
    import warnings

    from reinforce_lm.data import load_sft

    tok = copy.deepcopy(load_tokenizer(str(llama_dir)))
    rows = [{"messages": [{"role": "user", "content": "a?"}, {"role": "assistant", "content": "aa"}]}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_sft(path, tok, 64)
    tok.chat_template = "{% for m in messages %}{{ m['role'][0] }}:{{ m['content'] }}\n{% endfor %}"
    with pytest.warns(UserWarning, match="d.jsonl: the chat template writes no special token after an assis"):
        load_sft(path, tok, 64)


def test_a_tokenizer_without_eos_is_warned_about(tmp_path, llama_dir):
    import copy

    tok = copy.deepcopy(load_tokenizer(str(llama_dir)))
    tok.eos_token = None
    rows = [{"prompt": "a?", "completion": "bb"}]
    cfg = SFTConfig(model=str(llama_dir), data=write_jsonl(tmp_path / "d.jsonl", rows), eval_fraction=0.0)
    with pytest.warns(
        UserWarning, match="d.jsonl: the tokenizer has no EOS token, so its 1 prompt/completion"
    ):
        load_sft_splits(cfg, tok)


def test_a_tokenizer_that_appends_eos_puts_none_after_prompts(tmp_path):
    """A tokenizer with `<bos> $A <eos>` (add_eos_token): RL prompts and SFT prompts keep the BOS and lose
    the EOS, so the policy never learns to go on after its own EOS; SFT trains on prompt, completion,
    one EOS."""
    from tokenizers import processors

    from reinforce_lm.data import load_sft
    from reinforce_lm.rollout import Sampler

    tok = toy.make_tokenizer()
    bos, bos_id, eos, eos_id = tok.bos_token, tok.bos_token_id, tok.eos_token, tok.eos_token_id
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", special_tokens=[(bos, bos_id), (eos, eos_id)]
    )
    assert tok("c?")["input_ids"][-1] == eos_id  # what the tokenizer itself does
    ids, mask = Sampler(tok, max_new_tokens=2).encode(["c?", "ab?"], "cpu")
    for row, m in zip(ids, mask, strict=True):
        kept = row[m.bool()].tolist()
        assert kept[0] == bos_id and eos_id not in kept
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "c?", "completion": "cc"}])
    (ex,) = load_sft(path, tok, max_length=64)
    assert ex["input_ids"] == [bos_id, *tok("c?cc", add_special_tokens=False)["input_ids"], eos_id]
