"""Shared pieces of the benchmarks: the two locally built models, their prompts and the reward.

Nothing is downloaded. Both models are Llama-architecture causal LMs saved as Hugging Face directories
in a cache under the temp dir, so every trainer loads them with `from_pretrained`:

- `tiny`: the toy model of `reinforce_lm.toy` (hidden 32, 2 layers) over its character vocabulary.
- `medium`: ~36M parameters (hidden 512, 6 layers, untied head) over a 16,384-token byte-level BPE
  vocabulary trained here with `tokenizers` on generated text.
- `bigvocab`: ~39M parameters, almost all of them in the embeddings and the untied head: hidden 128, 2
  layers, over a 151,936-token vocabulary (Qwen2's size) of generated pseudo-words, one token each.
  Here the `[B, T, V]` logits, not the layers, set the memory.

Fixed completion length, the same way for every trainer: the tokenizer's EOS token has the id V, one past
the model's output vocabulary (`vocab_size = V`), and the model config has no EOS of its own. EOS is a
real token that both trainers stop on, but no model can ever sample it, so every completion is exactly
`max_new_tokens` long without a logits processor, a min-length setting or any trainer-specific switch.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

CACHE = Path(os.environ.get("REINFORCE_LM_BENCH_CACHE", Path(tempfile.gettempdir()) / "reinforce_lm_bench"))
MODELS = ("tiny", "medium", "bigvocab")


def reward(prompts, completions, **_) -> list[float]:
    """Fraction of vowels in the completion: cheap, dense, the same function for every trainer."""
    return [sum(c in "aeiou" for c in t) / max(1, len(t)) for t in completions]


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, MiB.

    Linux: VmHWM of /proc/self/status, the high-water mark of this process image. Not `ru_maxrss`: that
    one survives exec, so a child started by a large parent reports the parent's RSS at fork as its
    own peak (it inflated the figures of a process started from a driver holding models).
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB elsewhere


def current_rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class RssWatch:
    """A thread that samples RSS and the allocator's free bytes every millisecond; keeps the sample with
    the highest RSS after `start_training()` and the RSS at that call."""

    def __init__(self):
        import ctypes
        import threading

        class MallInfo2(ctypes.Structure):
            _fields_ = [
                (n, ctypes.c_size_t)
                for n in "arena ordblks smblks hblks hblkhd usm fsm uord ford keep".split()
            ]

        try:
            libc = ctypes.CDLL("libc.so.6")
            libc.mallinfo2.restype = MallInfo2
            self.mallinfo = libc.mallinfo2
        except (OSError, AttributeError):  # not glibc
            self.mallinfo = None
        self.training, self.at_start, self.best = False, None, (0.0, float("nan"))
        self.running = True
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def start_training(self):
        self.at_start, self.training = current_rss_mib(), True

    def _run(self):
        while self.running:
            rss = current_rss_mib()
            if self.training and rss > self.best[0]:
                free = self.mallinfo().ford / 2**20 if self.mallinfo else float("nan")
                self.best = (rss, free)
            time.sleep(0.001)

    def stop(self):
        self.running = False
        self.thread.join()

    def result(self) -> dict:
        return {"at_start": self.at_start, "sampled_peak": self.best[0], "free_at_peak": self.best[1]}


def _words(n: int, seed: int) -> list[str]:
    """A Zipf-distributed lexicon of pronounceable pseudo-words, `n` words of running text."""
    rng = random.Random(seed)
    onsets = ["", "b", "c", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "st", "tr"]
    nuclei = ["a", "e", "i", "o", "u", "ai", "ou", "ea"]
    codas = ["", "", "n", "r", "s", "t", "l", "nd", "ck"]
    lexicon = sorted(
        {
            "".join(
                rng.choice(onsets) + rng.choice(nuclei) + rng.choice(codas) for _ in range(rng.randint(1, 4))
            )
            for _ in range(60_000)
        }
    )
    rng.shuffle(lexicon)
    weights = [1.0 / (i + 1) for i in range(len(lexicon))]
    return rng.choices(lexicon, weights=weights, k=n)


def _corpus(seed: int = 0, sentences: int = 40_000) -> list[str]:
    rng = random.Random(seed + 1)
    words = iter(_words(sentences * 12, seed))
    out = []
    for _ in range(sentences):
        s = " ".join(next(words) for _ in range(rng.randint(4, 18)))
        out.append(s.capitalize() + rng.choice([".", ".", "?", "!", ","]))
    return out


def _wrap(tok, eos: str):
    from transformers import PreTrainedTokenizerFast

    tok.add_special_tokens([eos])  # added last: its id is one past the model's vocabulary
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token=eos, unk_token=None)


def _tiny_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    from reinforce_lm.toy import ALPHABET

    vocab = {t: i for i, t in enumerate(["<pad>", "<unk>", *dict.fromkeys(ALPHABET + "\n")])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    hf = _wrap(tok, "<eos>")
    hf.unk_token = "<unk>"
    return hf


def _word_tokenizer(n_words: int):
    """A word-level tokenizer of `n_words` distinct pseudo-words (syllable strings) plus <pad>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]  # consonant + vowel: unambiguous

    def word(i: int) -> str:  # bijective base-70 digits as syllables: distinct words for distinct i
        out = syllables[i % len(syllables)]
        while i >= len(syllables):
            i = i // len(syllables) - 1
            out = syllables[i % len(syllables)] + out
        return out

    vocab = {"<pad>": 0, **{word(i): i + 1 for i in range(n_words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return _wrap(tok, "<eos>")


def _bpe_tokenizer(vocab_size: int, corpus: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    return _wrap(tok, "<eos>")


def _llama(vocab: int, hidden: int, layers: int, heads: int, kv_heads: int, inter: int, tied: bool, seed=0):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=512,
        tie_word_embeddings=tied,
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=None,  # see the module docstring: EOS lives outside the vocabulary
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.eos_token_id = None
    model.generation_config.bos_token_id = None
    return model


def build(name: str) -> Path:
    """Directory of model `name` (see MODELS) with its tokenizer and prompts.jsonl; built once, cached."""
    path = CACHE / name
    if (path / "prompts.jsonl").exists():
        return path
    tmp = Path(tempfile.mkdtemp(dir=CACHE.parent if CACHE.parent.exists() else None))
    if name == "tiny":
        tok = _tiny_tokenizer()
        model = _llama(len(tok) - 1, 32, 2, 2, 1, 64, tied=False)
        rng = random.Random(0)
        letters = "abcdefghij0123456789"
        prompts = ["".join(rng.choice(letters) for _ in range(7)) + "?" for _ in range(4096)]
    elif name == "medium":
        corpus = _corpus()
        tok = _bpe_tokenizer(16_384, corpus)
        model = _llama(len(tok) - 1, 512, 6, 8, 8, 1376, tied=False)
        prompts = _fixed_length_prompts(tok, corpus, 16, 4096)
    elif name == "bigvocab":
        tok = _word_tokenizer(151_935)  # + <pad> = 151,936 ids for the model, <eos> one past them
        model = _llama(len(tok) - 1, 128, 2, 4, 2, 256, tied=False)
        rng = random.Random(0)
        words = [w for w, i in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]) if 0 < i < len(tok) - 1]
        cum = list(itertools.accumulate(1.0 / (i + 1) for i in range(len(words))))  # Zipf
        prompts = [" ".join(rng.choices(words, cum_weights=cum, k=16)) for _ in range(4096)]
    else:
        raise ValueError(f"unknown bench model {name!r}; choose from {MODELS}")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    with open(tmp / "prompts.jsonl", "w") as f:
        for p in prompts:
            f.write(json.dumps({"prompt": p}) + "\n")
    CACHE.mkdir(parents=True, exist_ok=True)
    try:
        tmp.rename(path)
    except OSError:  # another process built it first
        pass
    return path


def _fixed_length_prompts(tok, corpus: list[str], n_tokens: int, n: int) -> list[str]:
    """Prompts of exactly `n_tokens` tokens (padding is then the same for every trainer)."""
    out = []
    for text in corpus:
        ids = tok(text, add_special_tokens=False).input_ids
        if len(ids) < n_tokens:
            continue
        s = tok.decode(ids[:n_tokens])
        if len(tok(s, add_special_tokens=False).input_ids) == n_tokens:
            out.append(s)
        if len(out) == n:
            break
    return out


def load_prompts(path: Path) -> list[str]:
    return [json.loads(line)["prompt"] for line in open(path / "prompts.jsonl")]


def n_params(path: Path) -> int:
    from transformers import AutoConfig, AutoModelForCausalLM

    with __import__("torch").device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    return sum(p.numel() for p in model.parameters())
