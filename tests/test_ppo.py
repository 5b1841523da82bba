"""PPO end to end through the CLI: reward rises, the critic is checkpointed and resumed, the reference
stays frozen. GAE and the value loss are tested against hand-computed values in test_algorithms.py."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from reinforce_lm import toy
from reinforce_lm.cli import main
from reinforce_lm.files import write_jsonl
from reinforce_lm.metrics import read_metrics
from reinforce_lm.stages.ppo import VALUE_HEAD_FILE, Critic, load_critic


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    root = tmp_path_factory.mktemp("ppo")
    toy.save_tiny_model(root / "model", arch="llama", seed=0)
    rows = toy.letter_prompts(256, seed=0)
    write_jsonl(root / "prompts.jsonl", rows)
    return root


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model runs faster on one thread than on two shared ones
    yield
    torch.set_num_threads(threads)


def ppo_args(root, out, steps, *extra):
    return [
        "train",
        "--algorithm=ppo",
        f"--model={root / 'model'}",
        f"--prompts={root / 'prompts.jsonl'}",
        "--reward=reinforce_lm.toy:letter_reward",
        f"--output-dir={out}",
        f"--steps={steps}",
        "--prompts-per-step=16",
        "--samples-per-prompt=4",
        "--max-new-tokens=8",
        "--lr=1e-2",
        "--beta=0.01",
        "--updates-per-batch=2",
        "--minibatches=2",
        "--micro-batch-size=32",
        "--no-progress",
        *extra,
    ]


def test_ppo_reward_rises_and_reference_stays_frozen(task, monkeypatch):
    import reinforce_lm.stages.ppo as ppo

    seen, real = {}, ppo.build_ppo_stage  # run_train imports it at call time: spy on the reference

    def spy(cfg, policy, tokenizer, reference, *rest):
        seen["reference"] = reference
        seen["before"] = {k: v.clone() for k, v in reference.state_dict().items()}
        return real(cfg, policy, tokenizer, reference, *rest)

    monkeypatch.setattr(ppo, "build_ppo_stage", spy)
    out = task / "rise"
    main(ppo_args(task, out, 40, "--seed=0"))
    rewards = [r["reward_mean"] for r in read_metrics(out / "metrics.jsonl")]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    print(f"PPO reward: first 5 steps {first:.3f}, last 5 steps {last:.3f}")
    assert last > first + 0.15, rewards
    ref = seen["reference"]
    assert not ref.training and not any(p.requires_grad for p in ref.parameters())
    for k, v in ref.state_dict().items():
        assert torch.equal(v, seen["before"][k]), k
    rows = read_metrics(out / "metrics.jsonl")
    assert {"vf_loss", "value_mean", "grad_norm_critic", "clip_fraction", "kl"} <= set(rows[-1])


def test_critic_is_checkpointed_and_resumed(task):
    out = task / "resume"
    main(ppo_args(task, out, 2, "--save-every=1"))
    ckpt = out / "checkpoint-2"
    assert (ckpt / "critic" / VALUE_HEAD_FILE).is_file()
    critic = load_critic(str(ckpt / "critic"))
    assert isinstance(critic, Critic)
    head = load_file(str(ckpt / "critic" / VALUE_HEAD_FILE))
    assert torch.equal(critic.value_head.weight, head["weight"]) and head["weight"].abs().sum() > 0

    # Two steps then one more with --resume equals three steps in one go (critic included).
    main(ppo_args(task, out, 3, "--resume", "--save-every=1"))
    straight = task / "straight"
    main(ppo_args(task, straight, 3))
    a = load_file(str(out / "checkpoint-3" / "critic" / VALUE_HEAD_FILE))
    b = load_file(str(straight / "checkpoint-3" / "critic" / VALUE_HEAD_FILE))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)
    pa = load_file(str(out / "checkpoint-3" / "model.safetensors"))
    pb = load_file(str(straight / "checkpoint-3" / "model.safetensors"))
    for k in pa:
        torch.testing.assert_close(pa[k], pb[k], rtol=1e-4, atol=1e-6)
    ra = [r["reward_mean"] for r in read_metrics(out / "metrics.jsonl")]
    rb = [r["reward_mean"] for r in read_metrics(straight / "metrics.jsonl")]
    assert ra[-1] == pytest.approx(rb[-1])


def test_the_critic_starts_from_the_reward_model_only_if_it_shares_the_policy_tokenizer(task, tmp_path):
    """The critic reads the policy's token ids: a reward model with its own tokenizer (allowed for
    scoring, which decodes text) cannot be its backbone, so the policy is."""
    from types import SimpleNamespace

    from reinforce_lm.models import load_tokenizer
    from reinforce_lm.stages.ppo import critic_source

    policy_tok = load_tokenizer(str(task / "model"))
    same = toy.save_tiny_model(tmp_path / "same", arch="gpt2")  # the toy tokenizer, another model
    other, other_tok = tmp_path / "other", toy.make_tokenizer("xyz0123456789 ?")
    toy.make_model("llama", other_tok).save_pretrained(other)
    other_tok.save_pretrained(other)
    cfg = SimpleNamespace(model=str(task / "model"), critic_model="", reward_model=[str(same)])
    assert critic_source(cfg, policy_tok) == str(same)
    cfg.reward_model = [str(other)]
    assert critic_source(cfg, policy_tok) == str(task / "model")
    cfg.critic_model = "chosen"
    assert critic_source(cfg, policy_tok) == "chosen"


def test_a_critic_whose_states_are_narrower_than_its_hidden_size(tmp_path):
    """OPT-350m projects its last hidden states from hidden_size down to word_embed_proj_dim: the value
    head takes the width the backbone returns, and the critic saves and loads with it."""
    from transformers import AutoModelForCausalLM, OPTConfig

    tok = toy.make_tokenizer()
    config = OPTConfig(
        vocab_size=len(tok), hidden_size=32, word_embed_proj_dim=16, num_hidden_layers=1,
        num_attention_heads=2, ffn_dim=32, max_position_embeddings=64, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "opt")
    tok.save_pretrained(tmp_path / "opt")
    critic = load_critic(str(tmp_path / "opt"))
    ids = tok(["ab?cd", "xy?z"], padding=True, return_tensors="pt")
    values = critic(ids.input_ids, ids.attention_mask, 2)
    assert values.shape == (2, 2) and critic.value_head.in_features == 16
    critic.save_pretrained(tmp_path / "saved")
    assert load_critic(str(tmp_path / "saved")).value_head.in_features == 16
