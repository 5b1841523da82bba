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

import torch

from reinforce_lm import toy
from reinforce_lm.checkpoint import latest_checkpoint
from reinforce_lm.config import TrainConfig
from reinforce_lm.errors import ConfigError
from reinforce_lm.files import write_jsonl
from reinforce_lm.metrics import read_metrics

REWARD = "reinforce_lm.toy:letter_reward"


def sparkline(values: list[float]) -> str:
    """Values scaled between their min and max, as block characters."""
    bars = "▁▂▃▄▅▆▇█"
    lo, hi = min(values), max(values)
    return "".join(bars[int((v - lo) / (hi - lo + 1e-12) * 7 + 0.5)] for v in values)


def train_curve(run_dir: Path) -> list[float]:
    rewards = [row["reward_mean"] for row in read_metrics(run_dir / "metrics.jsonl")]
    chunk = max(1, len(rewards) // 10)
    return [sum(rewards[i : i + chunk]) / len(rewards[i : i + chunk]) for i in range(0, len(rewards), chunk)]


def run_demo(output_dir: str | None = None, steps: int | None = None, seed: int = 0) -> dict:
    """SFT -> reward model -> REINFORCE (RLOO) on the built-in task; prints curves and a held-out table."""
    from reinforce_lm.runner import run_eval_mean, run_train
    from reinforce_lm.stages.reward_model import RewardConfig, run_reward
    from reinforce_lm.stages.sft import SFTConfig, run_sft

    start = time.perf_counter()
    torch.set_num_threads(1)  # tiny models: one thread beats two (and leaves a core for the tokenizer)
    root = Path(output_dir) if output_dir else Path(tempfile.mkdtemp(prefix="reinforce-lm-demo-"))
    steps = 100 if steps is None else steps
    if steps < 1:
        raise ConfigError(f"demo steps must be > 0, got {steps}")
    settings, stamp = {"steps": steps, "seed": seed}, root / "demo.json"
    if root.is_file() or (root.is_dir() and any(root.iterdir()) and not stamp.is_file()):
        raise ConfigError(  # it writes prompts.jsonl, sft.jsonl, base/, sft/ ...: never over a user's own
            f"--output-dir {root}: not empty and not a demo's directory (no demo.json); the demo writes "
            "its data files and runs there: pass a new or empty directory"
        )
    root.mkdir(parents=True, exist_ok=True)
    if stamp.is_file() and json.loads(stamp.read_text()) != settings:  # its runs resume, not restart
        raise ConfigError(
            f"{root} holds a demo with {json.loads(stamp.read_text())}, not {settings}; "
            "pass those settings or another --output-dir"
        )
    stamp.write_text(json.dumps(settings))
    base = root / "base"
    if not (base / "config.json").exists():
        toy.save_tiny_model(base, arch="llama", seed=seed, hidden=64)
    files = {
        "sft": write_jsonl(root / "sft.jsonl", toy.sft_rows(256, 4, seed)),
        "pairs": write_jsonl(root / "preferences.jsonl", toy.preference_rows(512, 4, seed + 1)),
        "prompts": write_jsonl(root / "prompts.jsonl", toy.letter_prompts(512, seed + 2)),
        "held_out": write_jsonl(root / "held_out.jsonl", toy.letter_prompts(100, seed + 3)),
    }
    print("demo: a tiny Llama learns to answer 'c?' with c's (reward: share of c's), no download")
    common = dict(seed=seed, progress=False)

    def resume(run: str) -> bool:  # a second demo in the same directory picks up its finished runs
        return latest_checkpoint(root / run) is not None

    print("\n[1/4] SFT on demonstrations (a few steps: a weak start leaves RL something to do)")
    run_sft(
        SFTConfig(
            model=str(base),
            data=str(files["sft"]),
            output_dir=str(root / "sft"),
            resume=resume("sft"),
            steps=max(2, steps // 25),
            lr=3e-3,
            batch_size=16,
            **common,
        )
    )
    print("[2/4] Bradley-Terry reward model on preference pairs")
    run_reward(
        RewardConfig(
            model=str(root / "sft"),
            data=str(files["pairs"]),
            output_dir=str(root / "rm"),
            resume=resume("rm"),
            steps=max(2, steps // 2),
            lr=1e-3,
            batch_size=32,
            **common,
        )
    )
    rl = dict(
        prompts=str(files["prompts"]),
        estimator="rloo",
        samples_per_prompt=8,
        prompts_per_step=16,
        micro_batch_size=64,  # tiny model: few large micro-batches are fastest
        max_new_tokens=8,
        lr=5e-3,
        warmup_steps=5,
        steps=steps,
        beta=0.02,
        **common,
    )
    print("[3/4] REINFORCE (RLOO) against the verifiable reward")
    run_train(
        TrainConfig(
            model=str(root / "sft"),
            reward=[REWARD],
            output_dir=str(root / "rl_verifiable"),
            resume=resume("rl_verifiable"),
            **rl,
        )
    )
    print("[4/4] REINFORCE (RLOO) against the learned reward model")
    run_train(
        TrainConfig(
            model=str(root / "sft"),
            reward_model=[str(root / "rm")],
            output_dir=str(root / "rl_reward_model"),
            resume=resume("rl_reward_model"),
            **rl,
        )
    )

    def held_out(model: Path) -> tuple[float, float]:
        kw = dict(max_new_tokens=8, seed=seed)
        task = run_eval_mean(str(model), str(files["held_out"]), [REWARD], **kw)
        rm = run_eval_mean(str(model), str(files["held_out"]), [], reward_model=[str(root / "rm")], **kw)
        return task, rm

    rows = {
        name: held_out(root / d)
        for name, d in [
            ("base model", "base"),
            ("SFT", "sft"),
            ("RL, verifiable reward", "rl_verifiable"),
            ("RL, reward model", "rl_reward_model"),
        ]
    }
    for name, run in (("verifiable", "rl_verifiable"), ("reward model", "rl_reward_model")):
        curve = train_curve(root / run)
        print(f"\ntraining reward, RL against the {name} (mean of each tenth of the run):")
        print("  " + "  ".join(f"{v:.2f}" for v in curve) + f"   {sparkline(curve)}")
    print("\nheld-out prompts (100, one sample each): mean reward")
    print("  | policy                 | task reward | reward-model score |")
    print("  |------------------------|-------------|--------------------|")
    for name, (task, rm) in rows.items():
        print(f"  | {name:<22} | {task:11.3f} | {rm:18.3f} |")
    print(f"\ndone in {time.perf_counter() - start:.0f} s; files in {root}")
    return {"table": rows, "root": str(root)}
