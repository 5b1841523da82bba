"""`reinforce-lm demo`: the main job on an embedded default, with no download.

Makes a tiny Llama-style model and the built-in "repeat the letter" task (prompt "c?", reward = share
of completion characters equal to c), trains it with RLOO through the same CLI code path a user runs,
and prints the reward curve and held-out reward before and after.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from reinforce_lm import toy
from reinforce_lm.config import TrainConfig
from reinforce_lm.metrics import read_metrics

REWARD = "reinforce_lm.toy:letter_reward"


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def sparkline(values: list[float], width: int = 40) -> str:
    bars = " ▁▂▃▄▅▆▇█"
    return "".join(bars[min(8, max(0, int(v * 8 + 0.5)))] for v in values[:width])


def run_demo(output_dir: str | None = None, steps: int | None = None, seed: int = 0) -> dict:
    from reinforce_lm.runner import run_eval_mean, run_train

    start = time.perf_counter()
    root = Path(output_dir) if output_dir else Path(tempfile.mkdtemp(prefix="reinforce-lm-demo-"))
    root.mkdir(parents=True, exist_ok=True)
    model_dir = root / "model"
    if not (model_dir / "config.json").exists():
        toy.save_tiny_model(model_dir, arch="llama", seed=seed, hidden=64)
    prompts = write_jsonl(root / "prompts.jsonl", toy.letter_prompts(512, seed=seed))
    held_out = write_jsonl(root / "held_out.jsonl", toy.letter_prompts(100, seed=seed + 1))
    print(f"demo: tiny Llama ({model_dir}), task: answer 'c?' with c's; reward = share of c's")

    cfg = TrainConfig(
        model=str(model_dir),
        prompts=str(prompts),
        eval_prompts=str(held_out),
        reward=[REWARD],
        estimator="rloo",
        samples_per_prompt=8,
        prompts_per_step=16,
        max_new_tokens=8,
        lr=1e-2,
        warmup_steps=5,
        steps=steps or 120,
        beta=0.01,
        seed=seed,
        output_dir=str(root / "rl"),
        resume=True,
    )
    before = run_eval_mean(str(model_dir), str(held_out), [REWARD], max_new_tokens=8, seed=seed)
    run_train(cfg)
    after = run_eval_mean(str(root / "rl"), str(held_out), [REWARD], max_new_tokens=8, seed=seed)
    rewards = [row["reward_mean"] for row in read_metrics(root / "rl" / "metrics.jsonl")]
    chunk = max(1, len(rewards) // 10)
    curve = [sum(rewards[i : i + chunk]) / len(rewards[i : i + chunk]) for i in range(0, len(rewards), chunk)]
    print("\nreward during training (mean of each tenth of the run):")
    for i, v in enumerate(curve):
        print(
            f"  steps {i * chunk + 1:4d}-{min(len(rewards), (i + 1) * chunk):4d}  {v:.3f}  {'#' * int(v * 50)}"
        )
    print(f"\n  {sparkline(curve)}")
    print("\nheld-out reward (100 prompts, one sample each)")
    print("  | stage        | reward |")
    print("  |--------------|--------|")
    print(f"  | before RL    | {before:.3f}  |")
    print(f"  | after RLOO   | {after:.3f}  |")
    print(f"\ndone in {time.perf_counter() - start:.0f} s; files in {root}")
    return {"before": before, "after": after, "curve": curve, "root": str(root)}
