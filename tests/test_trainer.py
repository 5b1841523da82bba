"""The REINFORCE trainer end to end, through the public interface (runner, CLI, checkpoints)."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from reinforce_lm import checkpoint, cli, distributed, toy
from reinforce_lm.config import TrainConfig
from reinforce_lm.errors import CheckpointError, ConfigError, DataError, RewardError, TrainingError
from reinforce_lm.files import write_jsonl
from reinforce_lm.metrics import read_metrics
from reinforce_lm.models import resolve_model_path
from reinforce_lm.runner import build_train_stage, run_train
from reinforce_lm.trainer import fit

REWARD = "reinforce_lm.toy:letter_reward"


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    root = tmp_path_factory.mktemp("task")
    toy.save_tiny_model(root / "model", arch="llama", hidden=32)
    toy.save_tiny_model(root / "other", arch="llama", hidden=32, seed=1)  # a reference unlike the policy
    write_jsonl(root / "prompts.jsonl", toy.letter_prompts(64))
    return root


def config(task: Path, out: Path, **kw) -> TrainConfig:
    base = dict(
        model=str(task / "model"),
        prompts=str(task / "prompts.jsonl"),
        reward=[REWARD],
        estimator="rloo",
        samples_per_prompt=8,
        prompts_per_step=8,
        max_new_tokens=6,
        lr=1e-2,
        steps=4,
        beta=0.0,
        output_dir=str(out),
        progress=False,
    )
    return TrainConfig(**{**base, **kw})


def weights(path) -> dict[str, torch.Tensor]:
    return AutoModelForCausalLM.from_pretrained(resolve_model_path(str(path))).state_dict()


@pytest.mark.parametrize("estimator", ["none", "rloo", "grpo", "remax", "reinforce_pp"])
def test_reward_rises(task, tmp_path, estimator):
    cfg = config(task, tmp_path, estimator=estimator, steps=40, prompts_per_step=16, seed=1)
    assert run_train(cfg) == 0
    rewards = [r["reward_mean"] for r in read_metrics(tmp_path / "metrics.jsonl")]
    first, last = sum(rewards[:8]) / 8, sum(rewards[-8:]) / 8
    assert last > first + 0.1, (estimator, first, last)


def test_a_models_own_sampling_settings_are_noted_not_used(task, tmp_path, capsys):
    """A Qwen-style generation_config.json (sampling at 0.7, top_k 20, ...) is not what train and eval
    sample with: they say so once, naming both."""
    import shutil

    from transformers import GenerationConfig

    from reinforce_lm.runner import run_eval_mean

    model = tmp_path / "qwen-like"
    shutil.copytree(task / "model", model)
    GenerationConfig(do_sample=True, temperature=0.7, top_k=20, repetition_penalty=1.05).save_pretrained(
        model
    )
    run_train(config(task, tmp_path / "run", model=str(model), steps=1))
    out = capsys.readouterr().out
    assert (
        f"note: {model}'s generation_config.json samples with temperature 0.7, top_k 20, repetition_penalty "
        "1.05; this run samples with temperature 1.0, top_p 1.0, top_k 0 (--temperature" in out
    )
    run_eval_mean(str(model), str(task / "prompts.jsonl"), [REWARD], max_new_tokens=2, temperature=0.5)
    assert "this run samples with temperature 0.5, top_p 1.0, top_k 0" in capsys.readouterr().out
    run_train(config(task, tmp_path / "plain", steps=1))  # the toy model does not sample by default
    assert "generation_config.json samples" not in capsys.readouterr().out


def test_chat_prompts_stop_at_the_templates_end_of_turn(task, tmp_path, capsys):
    """A base model's EOS is not the token its chat template ends a turn with (Qwen: <|endoftext|> and
    <|im_end|>): completions of chat prompts stop at that token too, with a note; a template that ends
    turns with EOS, or text prompts, add nothing."""
    from reinforce_lm.data import end_of_turn_id
    from reinforce_lm.distributed import Dist
    from reinforce_lm.runner import run_eval_mean

    tok = toy.make_tokenizer()
    assert end_of_turn_id(tok) == tok.eos_token_id  # the toy template ends assistant turns with EOS
    tok.add_special_tokens({"additional_special_tokens": ["<|im_end|>"]})
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'][0] }}:{{ m['content'] }}<|im_end|>{% endfor %}"
        "{% if add_generation_prompt %}a:{% endif %}"
    )
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert end_of_turn_id(tok) == end
    model_dir = tmp_path / "chatml"
    toy.make_model("llama", tok).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    chats = [{"messages": [{"role": "user", "content": r["prompt"]}]} for r in toy.letter_prompts(8)]
    write_jsonl(tmp_path / "chat.jsonl", chats)
    cfg = config(task, tmp_path / "run", model=str(model_dir), prompts=str(tmp_path / "chat.jsonl"), steps=1)
    stage = build_train_stage(cfg, Dist())
    assert end in stage.sampler.eos_ids(stage.policy)
    assert "note: completions also stop at '<|im_end|>'" in capsys.readouterr().out
    run_eval_mean(str(model_dir), str(tmp_path / "chat.jsonl"), [REWARD], max_new_tokens=2)
    assert "also stop at '<|im_end|>'" in capsys.readouterr().out
    text = config(task, tmp_path / "text", model=str(model_dir), steps=1)  # text prompts: no template
    assert end not in build_train_stage(text, Dist()).sampler.eos_ids(stage.policy)


def test_metrics_have_the_documented_keys(task, tmp_path):
    run_train(config(task, tmp_path, steps=2, beta=0.05))
    row = read_metrics(tmp_path / "metrics.jsonl")[-1]
    for key in (
        "step reward_mean reward_std kl entropy response_length grad_norm lr step_seconds "
        "generate_seconds score_seconds reference_seconds backward_seconds"
    ).split():
        assert key in row, key
    assert row["step"] == 2


def test_the_kl_is_logged_without_sampling_log_probs(task, tmp_path):
    """The hf backend returns no log-probs of its samples: on-policy, the KL metric comes from the loss's
    own KL (k3: never negative) instead of being left out."""
    run_train(config(task, tmp_path, steps=2, beta=0.05, generation_backend="hf"))
    rows = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "kl_loss" in r]
    assert len(rows) == 2 and all(r["kl"] >= 0 and r["kl"] == pytest.approx(r["kl_loss"]) for r in rows)


def test_reference_is_frozen_and_beta_zero_loads_none(task, tmp_path, monkeypatch):
    d = distributed.setup("cpu")
    cfg = config(task, tmp_path / "a", beta=0.1, kl_in="loss", steps=3)
    stage = build_train_stage(cfg, d)
    before = {k: v.clone() for k, v in stage.reference.state_dict().items()}
    policy_before = {k: v.clone() for k, v in stage.policy.state_dict().items()}
    fit(stage, cfg, d)
    assert all(torch.equal(before[k], v) for k, v in stage.reference.state_dict().items())
    assert not all(torch.equal(policy_before[k], v) for k, v in stage.policy.state_dict().items())
    assert not any(p.requires_grad for p in stage.reference.parameters())

    from reinforce_lm import runner

    loads = []
    real = runner.load_causal_lm
    monkeypatch.setattr(runner, "load_causal_lm", lambda *a, **k: loads.append(a) or real(*a, **k))
    stage = build_train_stage(config(task, tmp_path / "b", beta=0.0), d)
    assert stage.reference is None and len(loads) == 1


@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_micro_batch_size_does_not_change_the_update(task, tmp_path, loss_agg):
    kw = dict(steps=2, loss_agg=loss_agg, beta=0.05, estimator="grpo")
    run_train(config(task, tmp_path / "big", micro_batch_size=64, **kw))
    run_train(config(task, tmp_path / "small", micro_batch_size=5, **kw))
    a, b = weights(tmp_path / "big"), weights(tmp_path / "small")
    # Adam amplifies float summation-order noise a little; a wrong normaliser moves weights by ~lr.
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4
    # Adam hides a constant factor in the gradient; the logged (pre-clipping) gradient norm does not
    big, small = (
        read_metrics(tmp_path / "big" / "metrics.jsonl"),
        read_metrics(tmp_path / "small" / "metrics.jsonl"),
    )
    for x, y in zip(big, small, strict=True):
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-4)
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-4, abs=1e-7)


@pytest.mark.parametrize(
    "kl_in,credit,kl_estimator",
    [("reward", "sequence", "k1"), ("reward", "token", "k1"), ("loss", "token", "k2")],
)
def test_kl_placements_and_credit_run(task, tmp_path, kl_in, credit, kl_estimator):
    cfg = config(task, tmp_path, steps=2, beta=0.1, kl_in=kl_in, credit=credit, kl_estimator=kl_estimator)
    assert run_train(cfg) == 0
    assert read_metrics(tmp_path / "metrics.jsonl")[-1]["kl"] is not None


@pytest.mark.parametrize(
    "kw,message",
    [
        (dict(reward_weights=[float("nan")]), r"reward_weights\[0\] = nan: expected a finite number"),
        (dict(reward_weights=[1.0, 2.0]), "reward_weights has 2 values for 1 rewards"),
        (dict(seed=2**70), r"seed must be in \[0, 2\*\*32\)"),
        (dict(minibatches=100, prompts_per_step=2, samples_per_prompt=2), "minibatches=100 is more than"),
        (dict(eval_every=2), "eval_every=2 needs --eval-prompts"),
    ],
)
def test_nonsense_options_are_refused(task, tmp_path, kw, message):
    """Each of these was accepted: a NaN weight made every reward NaN, a huge seed overflowed in torch,
    100 minibatches of 4 sequences ran 4, eval_every without prompts evaluated nothing."""
    with pytest.raises(ConfigError, match=message):
        config(task, tmp_path, **kw)


def test_eval_refuses_a_non_finite_reward_weight(task):
    from reinforce_lm.config import EvalConfig

    with pytest.raises(ConfigError, match="expected a finite number"):
        EvalConfig(model="m", prompts="p", reward=[REWARD], reward_weights=[float("inf")])
    assert EvalConfig(model="m", prompts="p", reward=[REWARD], reward_weights=2).reward_weights == [2]


def test_k1_in_the_loss_is_refused(task, tmp_path):
    with pytest.raises(ConfigError, match="k1 in the loss has zero expected gradient"):
        config(task, tmp_path, beta=0.1, kl_in="loss", kl_estimator="k1")
    config(task, tmp_path, beta=0.0, kl_in="loss", kl_estimator="k1")  # no KL term: nothing to refuse


@pytest.mark.parametrize("estimator", ["rloo", "reinforce_pp"])
def test_a_discount_without_token_credit_is_refused(task, tmp_path, estimator):
    """Under sequence credit every token gets the whole score, so gamma < 1 would be ignored by most
    estimators and applied by reinforce_pp*'s returns: refused for all, accepted with token credit."""
    with pytest.raises(ConfigError, match="gamma=0.9 discounts token-level returns.*--credit token"):
        config(task, tmp_path, estimator=estimator, gamma=0.9)
    config(task, tmp_path, estimator=estimator, gamma=0.9, credit="token")
    config(task, tmp_path, algorithm="ppo", gamma=0.9)  # GAE's discount


def test_off_policy_updates_use_ratio_clipping(task, tmp_path):
    run_train(config(task, tmp_path, steps=2, updates_per_batch=2, minibatches=2))
    assert "clip_fraction" in read_metrics(tmp_path / "metrics.jsonl")[-1]


def test_an_error_mid_run_saves_the_last_finished_step_and_resume_is_exact(task, tmp_path, capsys):
    """A reward function that raises in step 3 (a judge server that went away): the run stops with the
    error, the state after step 2 is on disk, and --resume ends where an unbroken run ends."""
    flaky = tmp_path / "flaky.py"
    flaky.write_text(
        "from reinforce_lm.toy import letter_reward\n"
        "calls = 0\n\n"
        "def flaky(prompts, completions, **kw):\n"
        "    global calls\n"
        "    calls += 1\n"
        "    if calls == 3:\n"
        "        raise RuntimeError('judge went away')\n"
        "    return letter_reward(prompts, completions, **kw)\n"
    )
    kw = dict(steps=4, estimator="running_mean", beta=0.05, reward=[f"{flaky}:flaky"])
    with pytest.raises(RewardError, match="judge went away"):
        run_train(config(task, tmp_path / "part", **kw))
    assert "the state after step 2 is saved" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "part").glob("checkpoint-*")) == ["checkpoint-2"]
    run_train(config(task, tmp_path / "part", resume=True, **kw))  # a fresh module: calls start at 0
    run_train(config(task, tmp_path / "full", steps=4, estimator="running_mean", beta=0.05))
    a, b = weights(tmp_path / "full"), weights(tmp_path / "part")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_keyboard_interrupt_raised_in_a_reward_saves_the_last_finished_step(task, tmp_path, capsys):
    """Not the loop's own abort (a second Ctrl-C): a KeyboardInterrupt from a reward function (its worker
    pool's) lost every finished step."""
    (tmp_path / "r.py").write_text(
        "from reinforce_lm.toy import letter_reward\nn = 0\n\ndef r(prompts, completions, **kw):\n"
        "    global n\n    n += 1\n    if n == 3:\n        raise KeyboardInterrupt\n"
        "    return letter_reward(prompts, completions, **kw)\n"
    )
    with pytest.raises(KeyboardInterrupt):
        run_train(config(task, tmp_path / "out", steps=4, reward=[f"{tmp_path / 'r.py'}:r"]))
    assert "the state after step 2 is saved" in capsys.readouterr().err
    assert checkpoint.latest_checkpoint(tmp_path / "out").name == "checkpoint-2"


def test_an_error_in_the_evaluation_saves_the_step_it_follows(task, tmp_path, capsys):
    """The evaluation runs after the step's update: a reward that raises there (once) leaves the state
    after that step on disk, and --resume ends where an unbroken run ends."""
    once = tmp_path / "once.py"
    marker = str(tmp_path / "failed")
    once.write_text(  # raises on the first evaluation after two training steps, once
        "import os\n"
        "from reinforce_lm.toy import letter_reward\n"
        "trained = 0\n\n"
        "def once(prompts, completions, split=None, **kw):\n"
        "    global trained\n"
        "    trained += split is None\n"
        f"    if split is not None and trained >= 2 and not os.path.exists({marker!r}):\n"
        f"        open({marker!r}, 'w').close()\n"
        "        raise RuntimeError('judge went away')\n"
        "    return letter_reward(prompts, completions, **kw)\n"
    )
    write_jsonl(tmp_path / "eval.jsonl", [dict(r, split="eval") for r in toy.letter_prompts(16, seed=3)])
    kw = dict(steps=4, eval_every=2, eval_prompts=str(tmp_path / "eval.jsonl"), reward=[f"{once}:once"])
    with pytest.raises(RewardError, match="judge went away"):
        run_train(config(task, tmp_path / "part", **kw))
    assert "error in the evaluation after step 2: the state after step 2 is saved" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "part").glob("checkpoint-*")) == ["checkpoint-2"]
    assert [r["step"] for r in read_metrics(tmp_path / "part" / "metrics.jsonl")] == [
        0,
        1,
        2,
    ]  # step 2 logged
    run_train(config(task, tmp_path / "part", resume=True, **kw))
    assert [r["step"] for r in read_metrics(tmp_path / "part" / "metrics.jsonl")] == [0, 1, 2, 3, 4]
    run_train(config(task, tmp_path / "full", **kw))
    a, b = weights(tmp_path / "full"), weights(tmp_path / "part")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_non_finite_gradient_stops_the_run_before_it_reaches_the_weights(task, tmp_path, capsys):
    """Scores that are finite but whose differences overflow float32 make the loss infinite in step 2:
    the run stops with the error before the optimiser step, and the state after step 1 is on disk."""
    calls = []

    def overflowing(prompts, completions, **kw):
        calls.append(1)
        if len(calls) == 2:
            return [3e38 if i % 2 else -3e38 for i in range(len(completions))]
        return toy.letter_reward(prompts, completions, **kw)

    with pytest.raises(TrainingError, match=r"step 2: grad_norm (nan|inf); this update was not applied"):
        run_train(config(task, tmp_path, steps=3, estimator="none", reward=[overflowing]))
    assert "the state after step 1 is saved" in capsys.readouterr().err
    w = weights(tmp_path)
    assert all(torch.isfinite(v).all() for v in w.values())

    def too_large(prompts, completions, **kw):  # finite as a Python float, inf as a float32
        return [1e39] * len(completions)

    with pytest.raises(RewardError, match="must be finite float32"):
        run_train(config(task, tmp_path / "b", steps=1, reward=[too_large]))


def test_a_non_finite_gradient_of_a_finite_loss_is_said_to_come_from_the_backward_pass(
    task, tmp_path, monkeypatch
):
    """With a finite loss, rewards and log-probs are not the cause: the error says where to look."""
    clip = torch.nn.utils.clip_grad_norm_

    def nan_norm(params, max_norm):
        clip(params, max_norm)
        return torch.tensor(float("nan"))

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", nan_norm)
    with pytest.raises(
        TrainingError, match=r"grad_norm nan.*The loss was finite \(.*\): the model's backward"
    ):
        run_train(config(task, tmp_path, steps=1))


def test_an_error_after_the_first_optimiser_step_of_a_step_saves_nothing(task, tmp_path, monkeypatch):
    """Mid-step (here: between two minibatch updates of step 3) the weights are neither step 2's nor
    step 3's: nothing is saved under either name."""
    calls = []
    step = torch.optim.AdamW.step

    def failing_step(self, *a, **k):
        calls.append(1)
        if len(calls) == 6:  # two updates per step: step 3's second
            raise RuntimeError("out of memory")
        return step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", failing_step)
    with pytest.raises(RuntimeError, match="out of memory"):
        run_train(config(task, tmp_path, steps=4, minibatches=2))
    assert not list(tmp_path.glob("checkpoint-*"))


def test_the_logged_learning_rate_is_the_one_the_step_used(task, tmp_path):
    run_train(config(task, tmp_path, steps=2, lr_schedule="linear"))
    assert [r["lr"] for r in read_metrics(tmp_path / "metrics.jsonl")] == pytest.approx([1e-2, 5e-3])


def _short_gpt2(path, positions: int = 24, alphabet: str = toy.ALPHABET):
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = toy.make_tokenizer(alphabet)
    config = GPT2Config(n_embd=16, n_layer=1, n_head=2, n_positions=positions, vocab_size=len(tok),
                        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)  # fmt: skip
    GPT2LMHeadModel(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_prompts_are_cut_to_fit_the_model_context(tmp_path, capsys):
    """A GPT-2 with 24 learned positions, 40-token prompts and 6 new tokens: prompts keep their last 18
    tokens (a note says so) instead of an index error past the position table."""
    model = _short_gpt2(tmp_path / "short")
    write_jsonl(tmp_path / "long.jsonl", [{"prompt": "ab" * 20 + "c?", "letter": "c"}] * 4)
    cfg = TrainConfig(model=str(model), prompts=str(tmp_path / "long.jsonl"), reward=[REWARD], steps=1,
                      samples_per_prompt=2, prompts_per_step=2, max_new_tokens=6, beta=0.05,
                      max_prompt_length=100, output_dir=str(tmp_path / "o"), progress=False)  # fmt: skip
    with pytest.warns(UserWarning, match="prompts longer than max_prompt_length=18 tokens keep their last"):
        assert run_train(cfg) == 0
    assert "max_prompt_length lowered from 100 to 18 tokens" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="max_new_tokens=24 leaves no room for a prompt"):
        run_train(dataclasses.replace(cfg, max_new_tokens=24, output_dir=str(tmp_path / "o2")))


def test_prompts_fit_a_reference_and_critic_shorter_than_the_policy(tmp_path, capsys):
    """A reference or critic with fewer positions than the policy reads the same token ids: prompts are
    cut to fit the shortest of them, not to the policy alone (an index error in the reference's forward)."""
    policy, short = _short_gpt2(tmp_path / "policy", positions=64), _short_gpt2(tmp_path / "short")
    write_jsonl(tmp_path / "long.jsonl", [{"prompt": "ab" * 20 + "c?", "letter": "c"}] * 4)
    base = dict(model=str(policy), prompts=str(tmp_path / "long.jsonl"), reward=[REWARD], steps=1,
                samples_per_prompt=2, prompts_per_step=2, max_new_tokens=6, beta=0.05,
                progress=False)  # fmt: skip
    for i, kw in enumerate([dict(ref_model=str(short)), dict(algorithm="ppo", critic_model=str(short))]):
        with pytest.warns(UserWarning, match="max_prompt_length=18 tokens"):  # 24 positions - 6 new tokens
            assert run_train(TrainConfig(**base, **kw, output_dir=str(tmp_path / f"o{i}"))) == 0
        assert "max_prompt_length lowered" not in capsys.readouterr().out  # the default, fitted quietly
    cfg = TrainConfig(**base, ref_model=str(short), max_prompt_length=100, output_dir=str(tmp_path / "o3"))
    with pytest.warns(UserWarning, match="max_prompt_length=18 tokens"):
        assert run_train(cfg) == 0
    assert f"lowered from 100 to 18 tokens: {short} has 24 positions" in capsys.readouterr().out


def test_a_reference_or_critic_with_another_tokenizer_is_refused(task, tmp_path):
    other = _short_gpt2(tmp_path / "other", positions=64, alphabet="xyz0123456789 ?")
    with pytest.raises(ConfigError, match="--ref-model .*tokenizer differs from the policy's"):
        run_train(config(task, tmp_path / "a", beta=0.05, ref_model=str(other)))
    with pytest.raises(ConfigError, match="--critic-model .*tokenizer differs from the policy's"):
        run_train(config(task, tmp_path / "b", algorithm="ppo", critic_model=str(other)))


def test_resume_checks_the_run_and_stops_when_it_is_done(task, tmp_path, capsys):
    run_train(config(task, tmp_path, steps=2))
    saved = (tmp_path / "run_config.json").read_text()
    assert run_train(config(task, tmp_path, steps=2, resume=True)) == 0
    assert "already at step 2 (--steps 2): nothing to do" in capsys.readouterr().out
    assert (tmp_path / "run_config.json").read_text() == saved  # still describes the model there
    for kw, diff in [
        (dict(algorithm="ppo"), "algorithm: reinforce there, ppo now"),
        (dict(lora_r=4), "lora_r: 0 there, 4 now"),
        (dict(model=str(task / "other")), "model: .*model there, .*other now"),  # another reference
        (dict(lr=1e-3), "lr: 0.01 there, 0.001 now"),  # the schedule resumes from the checkpoint
    ]:
        with pytest.raises(ConfigError, match=f"was started with other options .{diff}"):
            run_train(config(task, tmp_path, steps=3, resume=True, **kw))


def test_resume_of_a_lora_run_refuses_other_adapter_options(task, tmp_path):
    """A resumed LoRA run continues its saved adapter, whose config fixes alpha, dropout and targets:
    other values would be ignored while run_config.json recorded them as applied."""
    pytest.importorskip("peft")
    run_train(config(task, tmp_path, steps=1, lora_r=4))
    for kw, diff in [
        (dict(lora_alpha=4.0), "lora_alpha: 16.0 there, 4.0 now"),
        (dict(lora_target_modules="q_proj"), "lora_target_modules: all-linear there, q_proj now"),
        (dict(lora_dropout=0.1), "lora_dropout: 0.0 there, 0.1 now"),
    ]:
        with pytest.raises(ConfigError, match=f"was started with other options .{diff}"):
            run_train(config(task, tmp_path, steps=2, resume=True, lora_r=4, **kw))
    assert run_train(config(task, tmp_path, steps=2, resume=True, lora_r=4)) == 0
    # a full-weight run ignores the LoRA options: other values there change nothing
    run_train(config(task, tmp_path / "full", steps=1))
    with pytest.warns(UserWarning, match="--lora-alpha without --lora-r"):
        assert run_train(config(task, tmp_path / "full", steps=2, resume=True, lora_alpha=4.0)) == 0


def test_resume_knows_a_model_directory_however_it_is_written(task, tmp_path, monkeypatch):
    """A job requeued from another working directory, or with the path spelled otherwise, resumes."""
    monkeypatch.chdir(task)
    run_train(config(task, tmp_path / "run", steps=1, model="model", prompts="prompts.jsonl"))
    monkeypatch.chdir(tmp_path)
    assert run_train(config(task, tmp_path / "run", steps=2, model=f"{task}/model/", resume=True)) == 0
    assert (tmp_path / "run" / "checkpoint-2").is_dir()
    # the project moved (or was mounted elsewhere): the same words as before still name the same model
    saved = tmp_path / "run" / "run_config.json"
    options = json.loads(saved.read_text())
    saved.write_text(json.dumps({**options, "resolved": {"model": "/old/mount/model", "ref_model": None}}))
    monkeypatch.chdir(task)
    assert run_train(config(task, tmp_path / "run", steps=3, model=options["model"], resume=True)) == 0


def test_a_run_refused_before_training_leaves_no_empty_output_dir(task, tmp_path):
    write_jsonl(tmp_path / "empty_prompt.jsonl", [{"prompt": ""}])
    with pytest.raises(DataError):
        run_train(config(task, tmp_path / "new", prompts=str(tmp_path / "empty_prompt.jsonl")))
    assert not (tmp_path / "new").exists()
    (tmp_path / "mine").mkdir()  # a directory that was there before stays
    with pytest.raises(DataError):
        run_train(config(task, tmp_path / "mine", prompts=str(tmp_path / "empty_prompt.jsonl")))
    assert (tmp_path / "mine").is_dir()


def test_an_unreadable_run_config_or_another_command_is_named_on_resume(task, tmp_path):
    run_train(config(task, tmp_path, steps=1))
    saved = tmp_path / "run_config.json"
    text = saved.read_text()
    saved.write_text(text.replace('"command": "TrainConfig"', '"command": "SFTConfig"'))
    with pytest.raises(ConfigError, match="command: sft there, train now"):
        run_train(config(task, tmp_path, steps=2, resume=True))
    saved.write_text(text[: len(text) // 2])  # cut short
    with pytest.raises(ConfigError, match="run_config.json is unreadable .*delete it to resume"):
        run_train(config(task, tmp_path, steps=2, resume=True))


def test_a_trainer_state_that_does_not_fit_is_a_checkpoint_error(task, tmp_path):
    """Without run_config.json to compare, the state itself tells (here: one that `sft` saved, with no
    baseline state), as a CheckpointError instead of a KeyError."""
    from reinforce_lm.errors import CheckpointError

    run_train(config(task, tmp_path, steps=1))
    (tmp_path / "run_config.json").unlink()
    state_file = tmp_path / "checkpoint-1" / checkpoint.STATE_FILE
    state = checkpoint.load_state(tmp_path / "checkpoint-1")
    torch.save({**state, "stage": {}}, state_file)
    with pytest.raises(
        CheckpointError, match="trainer state does not fit this run .KeyError: 'running_mean'"
    ):
        run_train(config(task, tmp_path, steps=2, resume=True))
    torch.save({k: v for k, v in state.items() if k != "rng"}, state_file)  # a state without its RNG
    with pytest.raises(CheckpointError, match="does not fit this run .KeyError: 'rng'"):
        run_train(config(task, tmp_path, steps=2, resume=True))


def test_a_line_cut_short_in_metrics_jsonl_is_dropped_on_resume(task, tmp_path):
    """A process killed mid-write leaves half a line; resume kept it (it counted as step 0), and every
    reader of the file then failed on it."""
    run_train(config(task, tmp_path, steps=1))
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 2, "reward_me')
    run_train(config(task, tmp_path, steps=2, resume=True))
    assert [row["step"] for row in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]


def test_a_latest_pointer_that_cannot_be_written_costs_no_checkpoint(tmp_path, capsys):
    model, tok = toy.make_model("llama", toy.make_tokenizer()), toy.make_tokenizer()
    (tmp_path / "latest").mkdir()  # outside damage: a directory where the pointer goes
    path = checkpoint.save_checkpoint(tmp_path, 3, {"policy": model}, tok, {"x": 1})
    assert "could not update" in capsys.readouterr().err
    assert checkpoint.latest_checkpoint(tmp_path) == path


def test_no_input_model_directory_is_an_output_directory(task, tmp_path):
    """A run's checkpoints would turn the directory into a run directory, which then means its latest
    checkpoint: with the reference's, --resume trained against the policy itself (KL 0)."""
    model = toy.save_tiny_model(tmp_path / "m")
    with pytest.raises(ConfigError, match="is the --model directory"):
        run_train(TrainConfig(model=str(model), prompts="p.jsonl", reward=[REWARD], output_dir=str(model)))
    other = str(task / "other")
    for flag, kw in [
        ("--ref-model", dict(ref_model=other, beta=0.1)),
        ("--reward-model", dict(reward_model=["rm", other])),
        ("--critic-model", dict(critic_model=other, algorithm="ppo")),
    ]:
        with pytest.raises(ConfigError, match=f"is the {flag} directory"):
            run_train(config(task, Path(other + "/./"), **kw))
    assert not (task / "other" / "run_config.json").exists()
    # A run directory as --model means its latest checkpoint: writing into that checkpoint (or below it)
    # would make the checkpoint a run directory, and --model that checkpoint the new run's latest one
    run_train(config(task, tmp_path / "sft", steps=1))
    with pytest.raises(ConfigError, match=r"checkpoint-1 is --model .*sft's latest checkpoint"):
        run_train(config(task, tmp_path / "sft" / "checkpoint-1", model=str(tmp_path / "sft")))
    assert not (tmp_path / "sft" / "checkpoint-1" / "run_config.json").exists()
    with pytest.raises(ConfigError, match="output_dir is empty"):
        config(task, tmp_path, output_dir=" ")


def test_an_unwritable_output_dir_fails_before_loading(task, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="--output-dir .*file/out: cannot write there"):
        run_train(config(task, tmp_path / "file" / "out"))


def test_a_reference_saved_without_tokenizer_files_is_taken_at_its_word(task, tmp_path):
    """`model.save_pretrained` alone writes no tokenizer: nothing to compare, so no refusal."""
    AutoModelForCausalLM.from_pretrained(task / "other").save_pretrained(tmp_path / "bare")
    assert (
        run_train(config(task, tmp_path / "run", beta=0.05, ref_model=str(tmp_path / "bare"), steps=1)) == 0
    )


def test_prompts_built_in_python_without_sources(task):
    """PromptData made by hand has no file lines to name: scoring works without them."""
    from reinforce_lm.data import PromptData
    from reinforce_lm.models import load_causal_lm, load_tokenizer
    from reinforce_lm.rewards import build_rewards
    from reinforce_lm.rollout import Sampler
    from reinforce_lm.stages.reinforce import evaluate_policy

    tok = load_tokenizer(str(task / "model"))
    data = PromptData(texts=["a?", "b?"], columns={"letter": ["a", "b"]})
    mean, rows = evaluate_policy(
        load_causal_lm(str(task / "model")), Sampler(tok, max_new_tokens=3), build_rewards([REWARD], []),
        data, 0, distributed.setup("cpu"),
    )  # fmt: skip
    assert len(rows) == 2


def test_resume_continues_exactly(task, tmp_path):
    run_train(config(task, tmp_path / "full", steps=6, beta=0.05, estimator="running_mean"))
    run_train(config(task, tmp_path / "part", steps=3, beta=0.05, estimator="running_mean"))
    run_train(config(task, tmp_path / "part", steps=6, beta=0.05, estimator="running_mean", resume=True))
    a, b = weights(tmp_path / "full"), weights(tmp_path / "part")
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [r["step"] for r in read_metrics(tmp_path / "part" / "metrics.jsonl")]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_checkpoints_keep_the_users_tokenizer_settings(task, tmp_path):
    """Training pads on the left with EOS standing in for a missing pad token; the saved tokenizer does not
    (pad == EOS in a checkpoint would make a later fine-tune mask every EOS out of its labels)."""
    import shutil

    from transformers import AutoTokenizer

    model = tmp_path / "no-pad"
    shutil.copytree(task / "model", model)
    tok = AutoTokenizer.from_pretrained(model)
    tok.pad_token, tok.padding_side = None, "right"
    tok.save_pretrained(model)
    run_train(config(task, tmp_path / "out", model=str(model), steps=1))
    run_train(config(task, tmp_path / "out", model=str(model), steps=2, resume=True))
    saved = AutoTokenizer.from_pretrained(resolve_model_path(str(tmp_path / "out")))
    assert saved.pad_token is None and saved.padding_side == "right"
    assert saved.eos_token == tok.eos_token


def test_a_warmup_as_long_as_the_run_is_noted(task, tmp_path, capsys):
    run_train(config(task, tmp_path / "a", steps=2, warmup_steps=2))
    assert "never reaches --lr" in capsys.readouterr().out
    run_train(config(task, tmp_path / "b", steps=2, warmup_steps=1))
    assert "never reaches" not in capsys.readouterr().out
    lrs = [r["lr"] for r in read_metrics(tmp_path / "b" / "metrics.jsonl") if "lr" in r]
    assert lrs == pytest.approx([0.5e-2, 1e-2])  # reaches the peak at the step after the warm-up


def test_resume_with_more_steps_follows_the_new_schedule(task, tmp_path):
    """A linear schedule over 4 steps, resumed after 2 that were run with --steps 2: steps 3 and 4 take
    the 4-step schedule's rates (not the 2-step run's last one), and end where a straight run does."""
    kw = dict(estimator="running_mean", lr_schedule="linear", warmup_steps=1)
    run_train(config(task, tmp_path / "full", steps=4, **kw))
    run_train(config(task, tmp_path / "part", steps=2, **kw))
    run_train(config(task, tmp_path / "part", steps=4, resume=True, **kw))
    lrs = [
        [r["lr"] for r in read_metrics(tmp_path / run / "metrics.jsonl") if "lr" in r]
        for run in ("full", "part")
    ]
    assert lrs[0] == pytest.approx([0.5e-2, 1e-2, 2 / 3 * 1e-2, 1 / 3 * 1e-2])
    assert lrs[1] == pytest.approx(lrs[0])
    a, b = weights(tmp_path / "full"), weights(tmp_path / "part")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_existing_run_without_resume_is_refused(task, tmp_path):
    run_train(config(task, tmp_path, steps=1))
    with pytest.raises(Exception, match="--resume"):
        run_train(config(task, tmp_path, steps=2))


def test_crash_inside_checkpoint_write_keeps_previous(task, tmp_path, monkeypatch):
    model = AutoModelForCausalLM.from_pretrained(task / "model")
    tok = toy.make_tokenizer()
    checkpoint.save_checkpoint(tmp_path, 1, {"policy": model}, tok, {"x": 1})

    def boom(obj, f, *a, **k):
        Path(f).write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.torch, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save_checkpoint(tmp_path, 2, {"policy": model}, tok, {"x": 2})
    assert checkpoint.latest_checkpoint(tmp_path).name == "checkpoint-1"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]
    assert not (tmp_path / "checkpoint-2").exists()
    AutoModelForCausalLM.from_pretrained(tmp_path / "checkpoint-1")
    assert checkpoint.load_state(tmp_path / "checkpoint-1")["x"] == 1


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_or_sigterm_writes_a_checkpoint_and_exits_cleanly(task, tmp_path, sig):
    """SIGTERM is what a scheduler sends before it kills a preempted job: the same as Ctrl-C."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "reinforce_lm", "train", "--model", str(task / "model")]
    cmd += ["--prompts", str(task / "prompts.jsonl"), "--reward", REWARD, "--steps", "100000"]
    cmd += ["--max-new-tokens", "4", "--output-dir", str(out), "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "metrics.jsonl").exists():
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    ckpt = checkpoint.latest_checkpoint(out)
    assert ckpt is not None and "interrupted" in stdout
    AutoModelForCausalLM.from_pretrained(ckpt)
    assert checkpoint.load_state(ckpt)["step"] == read_metrics(out / "metrics.jsonl")[-1]["step"]


@pytest.mark.parametrize("when", ["final save", "save after an error"])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_signal_during_the_last_save_waits_for_it(task, tmp_path, monkeypatch, capsys, sig, when):
    """The final checkpoint and the one after an error were written after the loop had put the default
    handlers back: one Ctrl-C there deleted the half-written checkpoint (the whole run lost), a SIGTERM
    killed the process. Now the first signal waits for the save."""
    save = checkpoint.save_checkpoint

    def signalled(*a, **kw):
        os.kill(os.getpid(), sig)  # handled at once, in this thread: mid-save
        return save(*a, **kw)

    monkeypatch.setattr(checkpoint, "save_checkpoint", signalled)
    kw = dict(steps=2)
    if when != "final save":  # a reward that fails in step 2: the state after step 1 is saved
        (tmp_path / "r.py").write_text(
            "from reinforce_lm.toy import letter_reward\nn = 0\n\ndef r(prompts, completions, **kw):\n"
            "    global n\n    n += 1\n    assert n < 2, 'judge went away'\n"
            "    return letter_reward(prompts, completions, **kw)\n"
        )
        kw["reward"] = [f"{tmp_path / 'r.py'}:r"]
        with pytest.raises(RewardError, match="judge went away"):
            run_train(config(task, tmp_path / "out", **kw))
    else:
        assert run_train(config(task, tmp_path / "out", **kw)) == 0
    assert "writing a checkpoint" in capsys.readouterr().out
    step = 2 if when == "final save" else 1
    assert checkpoint.latest_checkpoint(tmp_path / "out").name == f"checkpoint-{step}"
    assert checkpoint.load_state(tmp_path / "out" / f"checkpoint-{step}")["step"] == step
    assert signal.getsignal(sig) is signal.default_int_handler or sig != signal.SIGINT  # put back


def test_a_config_error_is_printed_by_rank_0_only(task, tmp_path, monkeypatch, capsys):
    for rank, printed in (("1", False), ("0", True)):
        monkeypatch.setenv("RANK", rank)
        with pytest.raises(SystemExit):
            cli.main([*args(task, tmp_path), "--estimator", "rlooo"])
        assert ("did you mean 'rloo'" in capsys.readouterr().err) == printed


def test_ctrl_c_before_training_exits_130_without_a_traceback(task, tmp_path, monkeypatch, capsys):
    """Ctrl-C while models load or torch imports (before the loop's own handler): exit code 130 and one
    line, no traceback."""
    from reinforce_lm import runner

    def loading(*_):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "build_train_stage", loading)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(args(task, tmp_path))
    assert exit_info.value.code == 130
    assert capsys.readouterr().err.strip() == "reinforce-lm train: interrupted"
    monkeypatch.setattr(cli, "_load_stage_commands", loading)  # earlier still: while torch imports
    with pytest.raises(SystemExit) as exit_info:
        cli.main(args(task, tmp_path))
    assert exit_info.value.code == 130
    assert capsys.readouterr().err.strip() == "reinforce-lm: interrupted"


# ---------------------------------------------------------------------------------------------
# Bad input: a clear error that names the file, line, key or sample, before training starts.
# ---------------------------------------------------------------------------------------------
def run_cli(args: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as e:
        cli.main(args)
    assert e.value.code == 2
    return capsys.readouterr().err


def args(task, tmp_path, reward=REWARD, prompts=None) -> list[str]:
    a = ["train", "--model", str(task / "model"), "--prompts", str(prompts or task / "prompts.jsonl")]
    return a + ["--reward", reward, "--steps", "1", "--output-dir", str(tmp_path / "o"), "--no-progress"]


def test_missing_prompt_column_names_file_and_line(task, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a?"}\n{"promt": "b?"}\n')
    err = run_cli(args(task, tmp_path, prompts=bad), capsys)
    assert "bad.jsonl:2" in err and "prompt" in err


def test_unreadable_prompts_file(task, tmp_path, capsys):
    err = run_cli(args(task, tmp_path, prompts=tmp_path / "nope.jsonl"), capsys)
    assert "nope.jsonl" in err


@pytest.mark.parametrize(
    "body,needle",
    [
        (
            "def f(prompts, completions, **kw):\n    if any(p[0] in 'abcde' for p in prompts):\n"
            "        raise KeyError('boom')\n    return [0.0] * len(prompts)",
            "sample",
        ),
        ("def f(prompts, completions, **kw):\n    return [0.0]", "expected"),
        ("def f(prompts, completions, **kw):\n    return [float('nan')] * len(prompts)", "nan"),
        ("def f(prompts, completions, **kw):\n    return ['high'] * len(prompts)", "high"),
    ],
)
def test_bad_reward_functions(task, tmp_path, capsys, body, needle):
    file = tmp_path / "my_reward.py"
    file.write_text(body + "\n")
    err = run_cli(args(task, tmp_path, reward=f"{file}:f"), capsys)
    assert "f" in err and needle in err.lower()


def test_unknown_config_key_suggests_the_nearest(task, tmp_path, capsys):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("samples_per_promt: 4\n")
    err = run_cli(args(task, tmp_path) + ["--config", str(yaml_file)], capsys)
    assert "samples_per_promt" in err and "samples_per_prompt" in err


@pytest.mark.parametrize(
    "argv,said",
    [
        (["train", "--estimater", "rloo"], "(did you mean --estimator for --estimater?)"),
        (["sft", "--max-lenght=64"], "(did you mean --max-length for --max-lenght?)"),
        (["demo", "--sed", "3"], "(did you mean --seed for --sed?)"),
        (["eval", "--zzzz"], "unrecognized arguments: --zzzz\n"),
        (["eval", "--no-progress"], "(--no-progress is an option of train, sft, reward, not of eval)"),
    ],
)
def test_an_unknown_flag_names_the_nearest_one(argv, said, capsys):
    """A misspelt flag is an error of its command (its usage line), naming the nearest flag it has."""
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and f"reinforce-lm {argv[0]}: error:" in err and said in err, err


def test_an_empty_yaml_reward_says_no_reward(task, tmp_path, capsys):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text(f"model: {task / 'model'}\nprompts: {task / 'prompts.jsonl'}\nreward:\n")
    with pytest.raises(SystemExit):
        cli.main(["train", "--config", str(yaml_file)])
    assert "no reward: pass --reward" in capsys.readouterr().err


def test_yaml_values_the_shell_would_have_expanded_or_left_empty(task, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HOME", str(task))
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text(
        "model: ~/model\nprompts: ~/prompts.jsonl\noutput_dir: ~/out\nreward: [~/r.py:f]\n"
        "lora_target_modules: [q_proj, v_proj]\n"
    )
    parsed = cli.build_parser().parse_args(["train", "--config", str(yaml_file)])
    with pytest.warns(UserWarning, match="--lora-target-modules without --lora-r"):
        cfg = cli.parse_config(TrainConfig, parsed)
    assert (cfg.model, cfg.prompts, cfg.output_dir) == (
        f"{task}/model",
        f"{task}/prompts.jsonl",
        f"{task}/out",
    )
    assert cfg.reward == [f"{task}/r.py:f"] and cfg.lora_target_modules == "q_proj,v_proj"
    for text, message in [
        ("model:\n", "model is required"),  # not the hub repo 'None'
        ("model: [a, b]\n", r"model expects str, got \['a', 'b'\]"),
        ("model: m\nreward_weights: [a]\n", r"reward_weights expects numbers, got \['a'\]"),
    ]:
        yaml_file.write_text(text)
        with pytest.raises(SystemExit):
            cli.main(["train", "--config", str(yaml_file)])
        assert re.search(message, capsys.readouterr().err)


def test_yaml_config_with_flag_override(task, tmp_path):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text(
        f"model: {task / 'model'}\nprompts: {task / 'prompts.jsonl'}\nreward: [{REWARD}]\nsteps: 5\n"
    )
    parsed = cli.build_parser().parse_args(["train", "--config", str(yaml_file), "--steps", "2"])
    cfg = cli.parse_config(TrainConfig, parsed)
    assert cfg.steps == 2 and cfg.reward == [REWARD]


def test_inf_switches_clipping_off_where_zero_cannot(task):
    inf = float("inf")
    config(task, Path("x"), algorithm="ppo", clip_eps=inf, value_clip_eps=inf, max_grad_norm=inf)


def test_a_forked_child_of_the_training_process_still_dies_of_sigterm():
    """A reward's worker process (multiprocessing forks on Linux) inherits the handler; terminate()
    must still end it, not ask it to checkpoint."""
    import multiprocessing

    from reinforce_lm.trainer import GracefulInterrupt

    with GracefulInterrupt() as interrupt:
        child = multiprocessing.get_context("fork").Process(target=time.sleep, args=(30,))
        child.start()
        time.sleep(0.2)
        child.terminate()
        child.join(10)
        assert not child.is_alive() and child.exitcode == -signal.SIGTERM
        assert not interrupt.requested


def test_bad_values_are_rejected(task):
    with pytest.raises(Exception, match="estimator"):
        config(task, Path("x"), estimator="rlooo")
    with pytest.raises(Exception, match="samples_per_prompt"):
        config(task, Path("x"), estimator="grpo", samples_per_prompt=1)
    config(task, Path("x"), algorithm="ppo", samples_per_prompt=1)  # PPO's critic is its baseline


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(estimator="GRPO"), "did you mean 'grpo'"),
        (dict(estimator="ppo"), "pass --algorithm ppo"),
        (dict(lr=float("nan")), "lr must be > 0, got nan"),
        (dict(device="tpuu"), "not a device"),
        (dict(reward=[3]), r"reward\[0\] = 3: expected FILE.py:FUNCTION"),
        (dict(reward=None), "no reward"),
        (dict(steps="10"), "steps expects int, got '10'"),
        (dict(lr="1e-5"), "lr expects float, got '1e-5'"),
        (dict(progress="no"), "progress expects bool"),
        (dict(lr=float("inf")), "lr must be finite, got inf"),
        (dict(running_mean_decay=5.0), r"running_mean_decay must be in \[0, 1\), got 5.0"),
        (dict(vf_coef=-1.0), "vf_coef must be >= 0"),
        (dict(value_clip_eps=-1.0), "value_clip_eps must be >= 0"),
        (dict(lora_r=2, lora_dropout=1.5), r"lora_dropout must be in \[0, 1\)"),
    ],
)
def test_bad_options_name_the_option(task, kw, message):
    with pytest.raises(ConfigError, match=message):
        config(task, Path("x"), **kw)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_a_missing_gpu_is_a_config_error(task):
    from reinforce_lm.config import EvalConfig

    with pytest.raises(ConfigError, match="CUDA is not available"):
        config(task, Path("x"), device="cuda")
    with pytest.raises(ConfigError, match="CUDA is not available"):
        EvalConfig(model="m", prompts="p", reward=[REWARD], device="cuda:0")


def test_eval_options_are_checked():
    from reinforce_lm.config import EvalConfig

    for kw, message in [
        (dict(top_p=5.0), "top_p"),
        (dict(top_k=-3), "top_k must be >= 0"),
        (dict(dtype="float64"), "dtype='float64' is not one of"),
        (dict(max_prompt_length=0), "max_prompt_length must be > 0"),
    ]:
        with pytest.raises(ConfigError, match=message):
            EvalConfig(model="m", prompts="p", reward=[REWARD], **kw)


def test_a_single_reward_or_a_callable_from_python(task, tmp_path, capsys):
    """From Python a reward may be one string, or a function object (as TRL takes them)."""
    cfg = config(task, tmp_path / "a", reward=REWARD, steps=1)
    assert cfg.reward == [REWARD]
    assert run_train(config(task, tmp_path / "b", reward=[toy.letter_reward], steps=1)) == 0
    assert "rewards: letter_reward" in capsys.readouterr().out


def test_the_demo_refuses_a_directory_with_other_files(tmp_path, capsys):
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "MINE"}\n')
    with pytest.raises(SystemExit):
        cli.main(["demo", "--output-dir", str(tmp_path), "--steps", "1"])
    assert "not empty and not a demo's directory" in capsys.readouterr().err
    assert (tmp_path / "prompts.jsonl").read_text() == '{"prompt": "MINE"}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prompts.jsonl"]


def test_demo_runs(tmp_path, capsys):
    cli.main(["demo", "--output-dir", str(tmp_path), "--steps", "4"])
    out = capsys.readouterr().out
    for row in ("base model", "SFT", "RL, verifiable reward", "RL, reward model"):
        assert f"| {row}" in out
    assert (tmp_path / "rl_verifiable" / "latest").is_file()
    assert "starting from scratch" not in out  # a first demo does not talk about resuming
    cli.main(["demo", "--output-dir", str(tmp_path), "--steps", "4"])  # again: its runs are done
    assert "already at step 4" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # other settings: an error, not the old runs' table
        cli.main(["demo", "--output-dir", str(tmp_path), "--steps", "5"])
    assert "holds a demo with {'steps': 4, 'seed': 0}" in capsys.readouterr().err


@pytest.mark.skipif(os.name != "posix", reason="signals")
def test_cli_help_lists_every_estimator(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    out = capsys.readouterr().out
    for name in ("rloo", "grpo", "dr_grpo", "remax", "reinforce_pp"):
        assert name in out


def test_missing_model_directory_is_named(task, tmp_path, capsys):
    a = args(task, tmp_path)
    a[a.index("--model") + 1] = str(tmp_path / "no-such-model")
    assert "no-such-model does not exist" in run_cli(a, capsys)


@pytest.mark.parametrize("credit", ["sequence", "token"])
def test_kl_in_reward_is_wired_into_the_advantages(task, tmp_path, credit):
    """With estimator `none`, the advantages are exactly the KL-penalised returns, from the sampling
    log-probs and the frozen reference: sum_t (score - beta * kl) per sequence, or its reward-to-go."""
    from reinforce_lm import algorithms as A

    beta = 0.5
    cfg = config(
        task,
        tmp_path,
        estimator="none",
        beta=beta,
        kl_in="reward",
        kl_estimator="k1",
        credit=credit,
        ref_model=str(task / "other"),
    )
    stage = build_train_stage(cfg, distributed.setup("cpu"))
    batch, _ = stage.collect(0)
    s = stage.sample_and_score(0, need_old_logp=True)  # seeded: the same rollouts again
    mask = s.rollout.response_mask
    kl = (s.old_logp - s.ref_logp) * mask
    assert kl.abs().sum() / mask.sum() > 0.1  # a reference unlike the policy: the KL term matters
    if credit == "sequence":
        expected = (s.scores - beta * kl.sum(1))[:, None] * mask
    else:
        per_token = -beta * kl + A.place_at_last_token(s.scores, mask)
        expected = per_token.flip(1).cumsum(1).flip(1) * mask  # reward-to-go, gamma = 1
    assert torch.allclose(batch["advantages"], expected, atol=1e-5)


def test_hf_generate_backend_and_unseeded_sampling_train(task, tmp_path):
    cfg = config(
        task,
        tmp_path,
        steps=2,
        generation_backend="hf",
        sampling="torch",
        top_k=8,
        top_p=0.9,
        temperature=0.8,
    )
    assert run_train(cfg) == 0
    row = read_metrics(tmp_path / "metrics.jsonl")[-1]
    assert row["step"] == 2 and 0 < row["response_length"] <= 6


def test_prompts_per_step_must_divide_by_the_processes(task, tmp_path):
    from reinforce_lm.distributed import Dist

    with pytest.raises(ConfigError, match="prompts_per_step=8 must divide by 3 processes"):
        build_train_stage(config(task, tmp_path), Dist(world_size=3))


def test_generation_batch_size_does_not_change_the_run(task, tmp_path):
    kw = dict(steps=2, beta=0.05, estimator="grpo")
    run_train(config(task, tmp_path / "one", **kw))
    run_train(config(task, tmp_path / "chunked", generation_batch_size=16, **kw))  # 2 of 8 prompts per call
    a, b = weights(tmp_path / "one"), weights(tmp_path / "chunked")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4
    ra = read_metrics(tmp_path / "one" / "metrics.jsonl")[-1]["reward_mean"]
    assert ra == read_metrics(tmp_path / "chunked" / "metrics.jsonl")[-1]["reward_mean"]


def _sampler_off_by(monkeypatch, offset: float) -> None:
    """Make the sampler record log-probs `offset` above the true ones (a model that decodes differently
    with its cache than in one forward)."""
    from reinforce_lm import rollout

    sample = getattr(rollout.Sampler.sample, "unshifted", rollout.Sampler.sample)  # not offsets on offsets

    def off(self, *args, **kw):
        r = sample(self, *args, **kw)
        r.logp = r.logp + offset
        return r

    off.unshifted = sample
    monkeypatch.setattr(rollout.Sampler, "sample", off)


def _gap_warnings(cfg) -> list[str]:
    """The sampler-against-update warnings that `run_train(cfg)` gives."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_train(cfg)
    return [str(w.message) for w in caught if "between the sampler and the update" in str(w.message)]


@pytest.mark.parametrize(
    "kw",
    [dict(), dict(updates_per_batch=2, minibatches=2), dict(algorithm="ppo")],
    ids=["on-policy", "reused-batch", "ppo"],
)
def test_the_sampler_and_the_update_agree_and_a_disagreement_is_reported(task, tmp_path, monkeypatch, kw):
    """`logp_gap` (the update's log-probs against what the sampler recorded) is float32 rounding; a
    sampler whose log-probs are off gets one warning naming the size of the gap. Off-policy (PPO, or a
    batch reused over several updates) the old log-probs are the sampler's, and the gap is the first
    update's, before it moves the policy (not diluted by the later updates)."""
    run_train(config(task, tmp_path / "same", steps=2, **kw))
    rows = [r for r in read_metrics(tmp_path / "same" / "metrics.jsonl") if r["step"] > 0]
    assert all(0 <= r["logp_gap"] < 1e-5 for r in rows)
    if "updates_per_batch" in kw:
        assert rows[-1]["clip_fraction"] > 0  # the later updates moved the policy

    _sampler_off_by(monkeypatch, 0.01)
    said = _gap_warnings(config(task, tmp_path / "off", steps=2, **kw))
    assert len(said) == 1 and "up to 0.01" in said[0]
    rows = [r for r in read_metrics(tmp_path / "off" / "metrics.jsonl") if r["step"] > 0]
    assert all(r["logp_gap"] == pytest.approx(0.01, rel=1e-3) for r in rows)

    if kw:
        return
    # bf16 rounds: 0.01 on average is within what it explains, 0.05 is not
    for offset, warned in ((0.01, 0), (0.05, 1)):
        _sampler_off_by(monkeypatch, offset)
        said = _gap_warnings(config(task, tmp_path / f"bf16-{offset}", steps=1, mixed_precision="bf16"))
        assert len(said) == warned and all("on average" in m for m in said)


def test_tf32_set_through_the_newer_torch_api_does_not_break_the_gap_check(task, tmp_path, monkeypatch):
    """torch refuses the legacy TF32 reads once `torch.backends.*.fp32_precision` was set; the check
    then reads the new setting (here: TF32 on, so float32 is not exact and only the mean is checked)."""
    from reinforce_lm.stages import reinforce

    def refuses():
        raise RuntimeError("you have used mix of the legacy and new APIs to set the TF32 status")

    monkeypatch.setattr(torch, "get_float32_matmul_precision", refuses)
    assert not reinforce._float32_matmuls(torch.device("cpu"))
    run_train(config(task, tmp_path, steps=1))
    assert read_metrics(tmp_path / "metrics.jsonl")[-1]["logp_gap"] < 1e-5


def test_a_gap_that_appears_after_the_first_step_is_reported(task, tmp_path, monkeypatch):
    """LoRA dropout shows only once the adapters have moved off zero: the check runs on until it warns."""
    from reinforce_lm import rollout

    sample, calls = rollout.Sampler.sample, []

    def later(self, *args, **kw):
        r = sample(self, *args, **kw)
        calls.append(1)
        if len(calls) > 1:
            r.logp = r.logp + 0.05
        return r

    monkeypatch.setattr(rollout.Sampler, "sample", later)
    assert len(_gap_warnings(config(task, tmp_path, steps=3))) == 1


def test_the_heap_is_trimmed_before_a_cpu_backward_after_a_long_forward(task, tmp_path, monkeypatch):
    from reinforce_lm import host_memory

    calls = []
    monkeypatch.setattr(host_memory, "release_free_heap", lambda: calls.append(1) or True)
    monkeypatch.setattr(host_memory, "MIN_FORWARD_SECONDS", 1e9)
    run_train(config(task, tmp_path / "a", steps=2, micro_batch_size=5))  # 64 sequences: 13 micro-batches
    assert calls == []
    monkeypatch.setattr(host_memory, "MIN_FORWARD_SECONDS", 0.0)
    run_train(config(task, tmp_path / "b", steps=2, micro_batch_size=5))
    assert len(calls) == 2 * 13


_HEAP = """
import ctypes, os, torch
from reinforce_lm.host_memory import release_free_heap
ctypes.CDLL(None).mallopt(-3, 8 << 20)  # M_MMAP_THRESHOLD: what glibc's own threshold becomes in a step
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2**20
kept, freed = [], []
for i in range(64):  # 2 MiB each, touched; every other one freed leaves holes below kept blocks
    (kept if i % 2 else freed).append(torch.ones(512 * 1024))
del freed
before = rss()
assert release_free_heap()
print(before - rss())
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc_trim")
def test_release_free_heap_gives_the_heaps_free_pages_back():
    out = subprocess.run([sys.executable, "-c", _HEAP], capture_output=True, text=True, check=True)
    assert float(out.stdout) > 40, out.stdout  # 64 MiB of holes; nothing kept is released


def test_resume_notes_the_options_it_changes(task, tmp_path, capsys):
    run_train(config(task, tmp_path, steps=2, micro_batch_size=16))
    capsys.readouterr()
    run_train(config(task, tmp_path, steps=3, micro_batch_size=16, resume=True))  # longer: nothing to note
    assert "note: --resume" not in capsys.readouterr().out
    run_train(config(task, tmp_path, steps=4, beta=0.05, temperature=0.7, resume=True))
    out = capsys.readouterr().out
    assert "note: --resume with options the run was not started with" in out
    assert "beta: 0.0 there, 0.05 now" in out and "temperature: 1.0 there, 0.7 now" in out
    assert (
        "micro_batch_size: 16 there" in out and "steps" not in out.split("note: --resume")[1].split("\n")[0]
    )
    # The record stays the one the run was started with, which the next resume compares with again
    assert json.loads((tmp_path / "run_config.json").read_text())["beta"] == 0.0
    run_train(config(task, tmp_path, steps=5, beta=0.05, temperature=0.7, resume=True))
    assert "beta: 0.0 there, 0.05 now" in capsys.readouterr().out


def test_the_cli_prints_a_warning_as_one_line_once(task, tmp_path):
    cmd = [sys.executable, "-m", "reinforce_lm", *args(task, tmp_path), "--lora-alpha", "8"]
    err = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    line = "warning: --lora-alpha without --lora-r: LoRA is off, and every weight trains\n"
    assert err.count(line) == 1 and "UserWarning" not in err, err


def test_fsdp_on_one_process_says_it_trains_the_whole_model(task, tmp_path, capsys):
    assert run_train(config(task, tmp_path, steps=1, fsdp=True)) == 0
    assert "note: --fsdp shards over torchrun's processes; this is one process" in capsys.readouterr().out


def test_progress_off_from_python_draws_no_transformers_bars(task, tmp_path, capfd):
    from transformers.utils import logging as hf_logging

    hf_logging.enable_progress_bar()
    run_train(config(task, tmp_path, steps=1))  # progress=False
    err = capfd.readouterr().err
    assert "Loading weights" not in err and "Writing model shards" not in err, err
    assert hf_logging.is_progress_bar_enabled()  # as it was


def test_eval_shows_the_end_of_a_long_prompt(task, tmp_path, capsys):
    from reinforce_lm.config import EvalConfig
    from reinforce_lm.runner import run_eval

    long = "ab " * 400 + "c?"
    write_jsonl(tmp_path / "p.jsonl", [{"prompt": long, "letter": "c"}])
    cfg = EvalConfig(model=str(task / "model"), prompts=str(tmp_path / "p.jsonl"), reward=[REWARD])
    with pytest.warns(UserWarning, match="keep their last ones"):  # what the model sees is cut too
        assert run_eval(dataclasses.replace(cfg, max_new_tokens=2, show=1)) == 0
    (line,) = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("  [")]
    assert "'...ab ab" in line and "c?' -> " in line and len(line) < 300, line


def test_a_broken_latest_checkpoint_names_the_earlier_one(task, tmp_path):
    run_train(config(task, tmp_path, steps=2, save_every=1))
    (tmp_path / "checkpoint-2" / checkpoint.STATE_FILE).write_bytes(b"truncated")
    with pytest.raises(CheckpointError, match="earlier checkpoint, checkpoint-1: move checkpoint-2 out of"):
        run_train(config(task, tmp_path, steps=3, resume=True))
    (tmp_path / "checkpoint-2").rename(tmp_path.parent / f"{tmp_path.name}-broken")
    assert run_train(config(task, tmp_path, steps=3, resume=True)) == 0  # `latest` falls back to step 1
    assert checkpoint.load_state(tmp_path / "checkpoint-3")["step"] == 3
    (tmp_path / "checkpoint-3" / "model.safetensors").write_bytes(b"garbage")  # broken weights: the same
    with pytest.raises(ConfigError, match="earlier checkpoint, checkpoint-1: move checkpoint-3 out of"):
        run_train(config(task, tmp_path, steps=4, resume=True))
