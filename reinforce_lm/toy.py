"""Tiny models, tokenizers and a built-in task, made locally with no download.

Used by `reinforce-lm demo`, the tests and the benchmarks. The tokenizer is a character-level
`tokenizers` model wrapped as a Hugging Face fast tokenizer, with a chat template, so everything
downstream goes through the same `AutoTokenizer` / `AutoModelForCausalLM` code path as a real model.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

ALPHABET = "abcdefghij0123456789+=:?. "
SPECIAL_TOKENS = ["<pad>", "<eos>", "<unk>", "<bos>"]
ARCHITECTURES = ("gpt2", "llama", "qwen2")

# A minimal chat template: "<bos>user: ...\nassistant: ..." rendered with plain characters.
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'][0] }}:{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}a:{% endif %}"
)


def make_tokenizer(alphabet: str = ALPHABET):
    """A character-level fast tokenizer over `alphabet` plus pad/eos/unk/bos; no download."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = list(dict.fromkeys(alphabet + "\n"))
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS + chars)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>", bos_token="<bos>"
    )
    hf.chat_template = CHAT_TEMPLATE
    return hf


def make_model(arch: str, tokenizer, hidden: int = 32, layers: int = 2, heads: int = 2, seed: int = 0):
    """A randomly initialised causal LM of architecture `arch` (gpt2, llama, qwen2) sized for tests."""
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, Qwen2Config

    common = dict(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    if arch == "gpt2":
        config = GPT2Config(n_embd=hidden, n_layer=layers, n_head=heads, n_positions=256, **common)
    elif arch in ("llama", "qwen2"):
        config = (LlamaConfig if arch == "llama" else Qwen2Config)(
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=max(1, heads // 2),
            max_position_embeddings=256,
            **common,
        )
    else:
        raise ValueError(f"unknown toy architecture {arch!r}; choose from {ARCHITECTURES}")
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def save_tiny_model(path: str | Path, arch: str = "llama", seed: int = 0, **sizes) -> Path:
    """Write a tiny model and its tokenizer as a Hugging Face directory that `from_pretrained` loads."""
    path = Path(path)
    tokenizer = make_tokenizer()
    model = make_model(arch, tokenizer, seed=seed, **sizes)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# ---------------------------------------------------------------------------------------------
# The built-in task: "repeat the letter". A prompt "c?" asks for a completion made of the letter c.
# The verifiable reward is the fraction of completion characters equal to the asked letter, so a
# random policy scores about 1/|vocab| and a perfect one scores 1.
# ---------------------------------------------------------------------------------------------
TASK_LETTERS = "abcdefghij"


def letter_prompts(n: int, seed: int = 0) -> list[dict]:
    """`n` prompt rows {"prompt": "c?", "letter": "c"} for the built-in task."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        letter = rng.choice(TASK_LETTERS)
        rows.append({"prompt": f"{letter}?", "letter": letter})
    return rows


def letter_reward(prompts, completions, letter=None, **_) -> list[float]:
    """Fraction of the completion's characters equal to the asked letter (0 for an empty one)."""
    letters = letter if letter is not None else [p.strip()[0] for p in prompts]
    scores = []
    for want, text in zip(letters, completions, strict=True):
        text = text.strip()
        scores.append(sum(ch == want for ch in text) / len(text) if text else 0.0)
    return scores


def completion_with(rng: random.Random, letter: str, hits: int, length: int) -> str:
    """A string of `length` task letters of which exactly `hits` are `letter`, in random order."""
    others = [c for c in TASK_LETTERS if c != letter]
    chars = [letter] * hits + [rng.choice(others) for _ in range(length - hits)]
    rng.shuffle(chars)
    return "".join(chars)


def sft_rows(n: int, length: int, seed: int) -> list[dict]:
    """Demonstrations: the asked letter `length` times."""
    return [{"prompt": r["prompt"], "completion": r["letter"] * length} for r in letter_prompts(n, seed)]


def preference_rows(n: int, length: int, seed: int) -> list[dict]:
    """Pairs ranked by the task's verifiable reward (the share of the asked letter), of three kinds, so
    that the reward model must read the prompt rather than learn that some letters are good:
    graded (chosen holds more of the asked letter), another letter repeated (rejected "iiii" for "c?"),
    and an empty rejected answer."""
    rng = random.Random(seed)
    rows = []
    for i, r in enumerate(letter_prompts(n, seed)):
        letter, kind = r["letter"], i % 4
        better = rng.randint(1, length)
        chosen = completion_with(rng, letter, better, length)
        if kind == 2:
            rejected = rng.choice([c for c in TASK_LETTERS if c != letter]) * length
        elif kind == 3:
            rejected = ""
        else:
            rejected = completion_with(rng, letter, rng.randint(0, better - 1), length)
        rows.append({"prompt": r["prompt"], "chosen": chosen, "rejected": rejected})
    return rows
