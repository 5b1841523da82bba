"""Small data for the three-stage pipeline on the built-in "repeat the letter" task (reinforce_lm.toy).

Writes, under --out:
  sft.jsonl          {"prompt": "c?", "completion": "cccc"}            demonstrations
  preferences.jsonl  {"prompt": "c?", "chosen": "ccac", "rejected": "bcai"}
                     chosen has more of the asked letter than rejected (the verifiable reward, learned);
                     some rejected answers are another letter repeated, or empty
  prompts.jsonl      {"prompt": "c?", "letter": "c"}                    RL prompts
  eval_prompts.jsonl held-out prompts, same format
and, with --base-model DIR, a tiny randomly initialised Llama-style model to start from (no download).

    python examples/pipeline/make_data.py --out runs/pipeline/data --base-model runs/pipeline/base
"""

from __future__ import annotations

import argparse
from pathlib import Path

from reinforce_lm import toy
from reinforce_lm.files import write_jsonl


def make_all(
    out: str | Path,
    n_sft: int = 512,
    n_pairs: int = 1024,
    n_prompts: int = 512,
    n_eval: int = 64,
    length: int = 4,
    seed: int = 0,
    base_model: str | Path | None = None,
) -> dict[str, Path]:
    """Write the four files (and the base model); returns their paths by name."""
    out = Path(out)
    paths = {
        "sft": write_jsonl(out / "sft.jsonl", toy.sft_rows(n_sft, length, seed)),
        "preferences": write_jsonl(out / "preferences.jsonl", toy.preference_rows(n_pairs, length, seed + 1)),
        "prompts": write_jsonl(out / "prompts.jsonl", toy.letter_prompts(n_prompts, seed + 2)),
        "eval_prompts": write_jsonl(out / "eval_prompts.jsonl", toy.letter_prompts(n_eval, seed + 3)),
    }
    if base_model is not None and not (Path(base_model) / "config.json").exists():
        paths["base_model"] = toy.save_tiny_model(base_model, arch="llama", seed=seed)
    return paths


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="Directory for the JSONL files.")
    p.add_argument("--base-model", default=None, help="Also write a tiny base model here.")
    p.add_argument("--n-sft", type=int, default=512)
    p.add_argument("--n-pairs", type=int, default=1024)
    p.add_argument("--n-prompts", type=int, default=512)
    p.add_argument("--n-eval", type=int, default=64)
    p.add_argument("--length", type=int, default=4, help="Characters per completion.")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    paths = make_all(a.out, a.n_sft, a.n_pairs, a.n_prompts, a.n_eval, a.length, a.seed, a.base_model)
    for name, path in paths.items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
