"""The reward-model stage: the Bradley-Terry loss and its normalisation, accuracy rising on held-out
pairs, the saved directory scoring completions in `train`, a different tokenizer, bad input."""

from __future__ import annotations

import json
import random
import re
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from reinforce_lm import cli, files, toy
from reinforce_lm.distributed import Dist
from reinforce_lm.errors import ConfigError
from reinforce_lm.metrics import read_metrics
from reinforce_lm.rewards import RewardModel
from reinforce_lm.stages.reward_model import RewardConfig, RewardStage, pair_scores, run_reward
from reinforce_lm.trainer import split


def write_jsonl(path, rows):
    return str(files.write_jsonl(path, rows))


def letter_pairs(n, seed):
    """chosen: the asked letter repeated; rejected: other letters."""
    rng = random.Random(seed)
    rows = []
    for r in toy.letter_prompts(n, seed):
        others = [c for c in toy.TASK_LETTERS if c != r["letter"]]
        rejected = "".join(rng.choice(others) for _ in range(3))
        rows.append({"prompt": r["prompt"], "chosen": r["letter"] * 3, "rejected": rejected})
    return rows


class FixedScores(torch.nn.Module):
    """A 'model' whose score is w * (first token id): hand-made logits with a gradient."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.5))

    def forward(self, input_ids, attention_mask):
        return SimpleNamespace(logits=self.w * input_ids[:, :1].float())


def test_loss_matches_bradley_terry_formula_and_sums_over_micro_batches(llama_dir):
    cfg = RewardConfig(model=str(llama_dir), data="unused", center_rewards_coef=0.1)
    stage = RewardStage(cfg, FixedScores(), SimpleNamespace(pad_token_id=0), [], [], Dist())
    chosen, rejected, margin = [4.0, 1.0, 6.0], [2.0, 3.0, 6.0], [0.0, 0.5, 1.0]
    batch = stage._batch(
        [
            {"chosen_ids": [int(c), 9], "rejected_ids": [int(r)], "margin": m}
            for c, r, m in zip(chosen, rejected, margin, strict=True)
        ]
    )
    normalizer = {"seqs": torch.tensor(3.0, dtype=torch.double), "tokens": torch.tensor(3.0)}
    r_c, r_r = 0.5 * torch.tensor(chosen), 0.5 * torch.tensor(rejected)
    bt = -F.logsigmoid(r_c - r_r - torch.tensor(margin)).mean()  # -log sigmoid(r_c - r_r - m)
    center = ((r_c + r_r) ** 2).mean()
    totals = []
    for parts in (1, 3):
        metrics_sum = {}
        for micro in split(batch, torch.arange(3), parts):
            loss, metrics = stage.loss(micro, normalizer)
            for k, v in metrics.items():
                metrics_sum[k] = metrics_sum.get(k, 0.0) + v
        totals.append(metrics_sum)
    for m in totals:
        assert m["bt_loss"] == pytest.approx(bt.item(), rel=1e-6)
        assert m["center_loss"] == pytest.approx(center.item(), rel=1e-6)
        assert m["loss"] == pytest.approx(bt.item() + 0.1 * center.item(), rel=1e-6)
        assert m["accuracy"] == pytest.approx(1 / 3)  # only the first pair has r_c > r_r


def rm_args(model, data, out, *extra):
    return [
        "reward",
        "--model",
        str(model),
        "--data",
        data,
        "--output-dir",
        str(out),
        "--no-progress",
        *extra,
    ]


@pytest.fixture(scope="module")
def trained_rm(tmp_path_factory, llama_dir):
    root = tmp_path_factory.mktemp("rm")
    data = write_jsonl(root / "pairs.jsonl", letter_pairs(256, seed=0))
    cli.main(
        rm_args(llama_dir, data, root / "rm", "--steps", "24", "--lr", "3e-3", "--eval-fraction", "0.25")
    )
    return root / "rm"


def test_held_out_pairwise_accuracy_rises(trained_rm):
    rows = read_metrics(trained_rm / "metrics.jsonl")
    before, after = rows[0]["eval_accuracy"], rows[-1]["eval_accuracy"]
    print(f"held-out pairwise accuracy {before:.3f} -> {after:.3f}; eval_loss {rows[-1]['eval_loss']:.3f}")
    assert rows[0]["step"] == 0 and after >= 0.85 and after > before + 0.2
    assert rows[-1]["eval_loss"] < rows[0]["eval_loss"]
    assert [r["step"] for r in rows if "eval_accuracy" in r] == [0, 12, 24]  # once per epoch of 192 pairs


def test_saved_reward_model_scores_like_training(trained_rm):
    """`rewards.RewardModel` loads the checkpoint (one label) and scores prompt+completion exactly as
    the stage scored the pair during training (same tokens, same pooled position)."""
    path = trained_rm / (trained_rm / "latest").read_text().strip()
    rm = RewardModel(path)
    assert rm.model.config.num_labels == 1
    prompts, completions = ["c?", "c?", "h?"], ["ccc", "abd", "hhh"]
    scores = rm(prompts, completions)
    assert scores[0] > scores[1]
    tok = rm.tokenizer
    ids = [tok(p + c)["input_ids"] for p, c in zip(prompts, completions, strict=True)]
    pad = [x + [tok.pad_token_id] * (4 - len(x)) for x in ids]
    micro = {
        "chosen_input_ids": torch.tensor(pad),
        "chosen_attention_mask": torch.tensor([[1] * len(x) + [0] * (4 - len(x)) for x in ids]),
    }
    micro["rejected_input_ids"], micro["rejected_attention_mask"] = (
        micro["chosen_input_ids"],
        micro["chosen_attention_mask"],
    )
    with torch.no_grad():
        r_c, _ = pair_scores(rm.model, micro)
    assert r_c.tolist() == pytest.approx(scores, abs=1e-5)


def test_reward_model_with_a_different_tokenizer_drives_train(tmp_path, llama_dir):
    """Reward model on its own tokenizer (other alphabet order, other ids), policy on the toy one."""
    tok = toy.make_tokenizer(alphabet="jihgfedcba9876543210?=+:. xyz")
    base = tmp_path / "rm-base"
    toy.make_model("gpt2", tok).save_pretrained(base)
    tok.save_pretrained(base)
    assert tok("c?")["input_ids"] != toy.make_tokenizer()("c?")["input_ids"]
    data = write_jsonl(tmp_path / "pairs.jsonl", letter_pairs(32, seed=0))
    cli.main(rm_args(base, data, tmp_path / "rm", "--steps", "2", "--batch-size", "8", "--max-length", "48"))
    rm_path = tmp_path / "rm" / (tmp_path / "rm" / "latest").read_text().strip()
    assert json.loads((rm_path / "config.json").read_text())["reinforce_lm_pairs"] == "text"  # as RL scores
    # and cut to the length it trained on (it was RewardModel's 1024 whatever --max-length said)
    assert RewardModel(rm_path).max_length == 48 and RewardModel(rm_path, max_length=20).max_length == 20
    prompts = write_jsonl(tmp_path / "prompts.jsonl", toy.letter_prompts(8, seed=0))
    cli.main(
        ["train", "--model", str(llama_dir), "--reward-model", str(rm_path), "--prompts", prompts]
        + ["--output-dir", str(tmp_path / "rl"), "--steps", "1", "--prompts-per-step", "2"]
        + ["--samples-per-prompt", "2", "--max-new-tokens", "3", "--no-progress"]
    )
    row = read_metrics(tmp_path / "rl" / "metrics.jsonl")[0]
    assert row["reward_std"] > 0 and abs(row["reward_mean"]) < 100


@pytest.mark.parametrize(
    "row, message",
    [
        ({"prompt": "a?", "chosen": "aa", "rejectd": "bb"}, r"bad.jsonl:2: no 'rejected' column.*'rejectd'"),
        ({"prompt": "a?", "chosen": "aa", "rejected": "b", "margin": "x"}, r"bad.jsonl:2: column 'margin'"),
    ],
)
def test_bad_pairs_fail_before_training(tmp_path, llama_dir, capsys, row, message):
    data = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a?", "chosen": "aa", "rejected": "bb"}, row])
    with pytest.raises(SystemExit) as exit_info:
        cli.main(rm_args(llama_dir, data, tmp_path / "out"))
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def test_over_long_pairs_are_reported(tmp_path, llama_dir):
    rows = [{"prompt": "a?", "chosen": "aa", "rejected": "bb"}] * 3
    rows += [{"prompt": "a?", "chosen": "a" * 30, "rejected": "b" * 30}]  # cut, still different
    rows += [{"prompt": "a" * 20 + "?", "chosen": "a", "rejected": "b"}]  # cut: the ends still differ
    rows += [{"prompt": "a?", "chosen": "x" + "a" * 20, "rejected": "y" + "a" * 20}]  # same once cut
    rows += [{"prompt": "a?", "chosen": "aa", "rejected": "aa"}]  # the same as given
    cfg = RewardConfig(
        model=str(llama_dir),
        data=write_jsonl(tmp_path / "long.jsonl", rows),
        output_dir=str(tmp_path / "out"),
        max_length=12,
        steps=1,
        batch_size=2,
        eval_fraction=0.0,
        progress=False,
    )
    with pytest.warns(UserWarning) as record:
        assert run_reward(cfg) == 0
    text = " ".join(str(w.message) for w in record)
    assert re.search(
        r"3 row\(s\) longer than max_length=12 keep their last 12 tokens: .*long.jsonl:4, ", text
    )
    assert re.search(
        r"2 row\(s\) skipped: chosen and rejected are the same .*long.jsonl:6, .*long.jsonl:7", text
    )


def test_reward_help_hides_the_lora_flags_it_refuses(capsys):
    from reinforce_lm import cli
    from reinforce_lm.stages.reward_model import RewardConfig

    with pytest.raises(SystemExit):
        cli.main(["reward", "--help"])
    out = capsys.readouterr().out
    assert "--lora" not in out
    assert "Policy to train" not in out and "Model the reward model starts from" in " ".join(out.split())
    with pytest.raises(Exception, match="lora_r is not supported by `reward`"):
        RewardConfig(model="m", data="d.jsonl", lora_r=4)


def test_an_architecture_without_a_classification_head_is_named_in_one_line(tmp_path, tokenizer):
    """transformers lists every architecture that has the head (hundreds of names); the error names
    the one that has not, and what to do instead."""
    import transformers as T

    from reinforce_lm.stages.reward_model import load_reward_backbone

    config = T.MambaConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1)
    T.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="no sequence-classification head for MambaConfig") as e:
        load_reward_backbone(str(tmp_path), tokenizer, "float32", "cpu")
    assert "\n" not in str(e.value) and len(str(e.value)) < 400
