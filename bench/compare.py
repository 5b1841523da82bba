"""REINFORCE estimators against PPO, measured side by side in one run (Ahmadian et al. 2024's claim).

The same tiny model, from the same start, on the built-in letter task (`reinforce_lm.toy`), trained with
every method for the same number of samples (steps x prompts x samples per prompt), over several seeds,
through the public API (`runner.run_train`). Printed as one table and written to
bench/results/compare.md, with the reward curves in bench/results/compare.png:

- peak memory: each run is a fresh process; on CPU its peak RSS (VmHWM) and the part of it that
  training adds (peak minus the RSS before `run_train`, after imports); on GPU the peak allocated.
- seconds per step: median of `step_seconds` in metrics.jsonl (the first step left out), mean over seeds.
- gradient variance: `diagnostics.gradient_variance` at FIXED parameters (no optimiser step), many
  independent estimates from fresh rollouts: E||g - E g||^2 / ||E g||^2, and that ratio over no
  baseline's. Measured at a warm point (the start after a few RLOO steps), KL off, so only the
  estimator differs.
- final reward: mean of `reward_mean` over the last steps, mean +- std over seeds.

    python bench/compare.py                      # defaults: about 5-8 minutes on 2 CPU cores
    python bench/compare.py --seeds 5 --steps 80 --device cuda

Tiny models run faster single-threaded (intra-op threads cost more than they save), so each process uses
`--threads 1` by default; every method gets the same.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

METHODS = ("none", "running_mean", "rloo", "grpo", "dr_grpo", "remax", "reinforce_pp", "ppo")
REWARD = "reinforce_lm.toy:letter_reward"
RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--seeds", type=int, default=3, help="training seeds per method")
    p.add_argument("--steps", type=int, default=60, help="RL steps per run")
    p.add_argument("--prompts-per-step", type=int, default=16)
    p.add_argument("--samples-per-prompt", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--hidden", type=int, default=32, help="width of the tiny Llama")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--beta", type=float, default=0.01, help="KL coefficient (training runs)")
    p.add_argument("--ppo-updates", type=int, default=2, help="PPO passes over each batch")
    p.add_argument("--ppo-minibatches", type=int, default=2, help="PPO optimiser steps per pass")
    p.add_argument("--last", type=int, default=10, help="final reward = mean over this many last steps")
    p.add_argument("--variance-estimates", type=int, default=256, help="gradient estimates per method")
    p.add_argument("--variance-prompts", type=int, default=8, help="prompts per gradient estimate")
    p.add_argument("--variance-samples", type=int, default=4, help="samples per prompt per estimate")
    p.add_argument("--warm-steps", type=int, default=20, help="RLOO steps to the warm variance point")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (0: torch default)")
    p.add_argument("--out", type=Path, default=RESULTS, help="where compare.md and compare.png go")
    p.add_argument("--workdir", type=Path, default=None, help="keep runs here (default: a temp dir)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def train_config(args, root: Path, method: str, seed: int, output_dir: Path, **over):
    from reinforce_lm.config import TrainConfig

    kw = dict(algorithm="ppo") if method == "ppo" else dict(estimator=method)
    if method == "ppo":
        kw.update(updates_per_batch=args.ppo_updates, minibatches=args.ppo_minibatches)
    values = dict(
        model=str(root / "model"),
        prompts=str(root / "prompts.jsonl"),
        reward=[REWARD],
        steps=args.steps,
        prompts_per_step=args.prompts_per_step,
        samples_per_prompt=args.samples_per_prompt,
        max_new_tokens=args.max_new_tokens,
        lr=args.lr,
        beta=args.beta,
        micro_batch_size=64,
        seed=seed,
        device=args.device,
        output_dir=str(output_dir),
        progress=False,
        **kw,
    )
    values.update(over)
    return TrainConfig(**values)


# -- one training run in a fresh process (memory is per process) --------------------------------------
def peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM; not `ru_maxrss`, which a child inherits from its parent)."""
    import common

    return common.peak_rss_mib()


def current_rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def counted_state_kb(run: Path, reference: bool) -> float:
    """Bytes every method must hold, counted from the saved weights: each trained model (policy, and
    PPO's critic) 4x (weights, gradients, AdamW's two moments), the frozen reference 1x."""
    from reinforce_lm.checkpoint import latest_checkpoint

    ckpt = latest_checkpoint(run)
    policy = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
    critic = sum(f.stat().st_size for f in (ckpt / "critic").glob("*.safetensors"))
    return (4 * policy + 4 * critic + (policy if reference else 0)) / 2**10


def worker(spec: str) -> None:
    job = json.loads(spec)
    import torch

    from reinforce_lm.runner import run_train

    if job["threads"]:
        torch.set_num_threads(job["threads"])
    args = argparse.Namespace(**job["args"])
    cfg = train_config(args, Path(job["root"]), job["method"], job["seed"], Path(job["output_dir"]))
    before = current_rss_mb()
    code = run_train(cfg)
    out = {"code": code, "rss_before_mb": before, "peak_rss_mb": peak_rss_mb()}
    out["state_kb"] = counted_state_kb(Path(job["output_dir"]), cfg.beta > 0)
    if torch.cuda.is_available() and cfg.device != "cpu":
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    Path(job["result"]).write_text(json.dumps(out))


def train_run(args, root: Path, method: str, seed: int) -> dict:
    from reinforce_lm.metrics import read_metrics

    run = root / "runs" / f"{method}-seed{seed}"
    job = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "root": str(root),
        "method": method,
        "seed": seed,
        "output_dir": str(run),
        "result": str(run) + ".json",
        "threads": args.threads,
    }
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(job)], env=env, capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{method} seed {seed} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    result = json.loads(Path(job["result"]).read_text())
    rows = read_metrics(run / "metrics.jsonl")
    result["rewards"] = [r["reward_mean"] for r in rows]
    result["step_seconds"] = statistics.median(r["step_seconds"] for r in rows[1:] or rows)
    return result


# -- gradient variance at fixed parameters -------------------------------------------------------------
def variances(args, root: Path, model: str) -> dict[str, float]:
    from reinforce_lm.diagnostics import gradient_variance
    from reinforce_lm.distributed import setup
    from reinforce_lm.runner import build_train_stage

    out = {}
    for method in args.methods:
        cfg = train_config(
            args,
            root,
            method,
            0,
            root / "variance",
            model=model,
            beta=0.0,
            prompts_per_step=args.variance_prompts,
            samples_per_prompt=args.variance_samples,
        )
        stage = build_train_stage(cfg, setup(cfg.device))
        warmup = 5 if method == "running_mean" else 0  # let the running mean settle first
        r = gradient_variance(stage, args.variance_estimates, first_step=10_000, warmup=warmup)
        out[method] = r["relative_variance"]
    return out


# -- report ------------------------------------------------------------------------------------------
def fmt_ratio(x: float, ref: float) -> str:
    if not (x < float("inf")) or not (0 < ref < float("inf")):
        return "n/a"
    return f"{x / ref:.2f}"


def table(args, runs: dict, var: dict) -> str:
    gpu = any("cuda_peak_mb" in r for rs in runs.values() for r in rs)
    mem = "peak GPU alloc (MB)" if gpu else "peak RSS (MB)"
    head = [
        "method",
        mem,
        "training RSS (MB)",
        "weights+grads+Adam (KB, counted)",
        "s / step",
        "grad variance (x none)",
        f"final reward (last {args.last} steps)",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    v0 = var.get("none", float("nan"))
    for method, rs in runs.items():
        peak = statistics.mean(r["cuda_peak_mb"] if gpu else r["peak_rss_mb"] for r in rs)
        train = statistics.mean(r["peak_rss_mb"] - r["rss_before_mb"] for r in rs)
        sps = statistics.mean(r["step_seconds"] for r in rs)
        finals = [statistics.mean(r["rewards"][-args.last :]) for r in rs]
        spread = statistics.stdev(finals) if len(finals) > 1 else 0.0
        v = var.get(method, float("nan"))
        # inf: the unbiased ||E g||^2 came out <= 0, the mean gradient lost in the noise of few estimates
        vs = "unresolved" if v == float("inf") else f"{v:.1f} ({fmt_ratio(v, v0)})"
        lines.append(
            f"| {method} | {peak:.0f} | {train:.0f} | {rs[0]['state_kb']:.0f} | {sps:.3f} "
            f"| {vs} | {statistics.mean(finals):.3f} +- {spread:.3f} |"
        )
    return "\n".join(lines)


def plot(runs: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(8, 5))
    for method, rs in runs.items():
        curves = np.array([r["rewards"] for r in rs])  # [seeds, steps]
        mean, std = curves.mean(0), curves.std(0)
        x = np.arange(1, curves.shape[1] + 1)
        ax.plot(x, mean, label=method, lw=2 if method in ("rloo", "ppo") else 1.2)
        ax.fill_between(x, mean - std, mean + std, alpha=0.12)
    ax.set_xlabel("step (same samples per step for every method)")
    ax.set_ylabel("mean reward of the step's samples")
    ax.set_title(f"letter task, tiny Llama; mean +- std over {len(next(iter(runs.values())))} seeds")
    ax.legend(ncol=2, fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        return worker(args.worker)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    from reinforce_lm import toy
    from reinforce_lm.files import write_jsonl
    from reinforce_lm.runner import run_train

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    root = args.workdir or Path(tempfile.mkdtemp(prefix="reinforce-lm-compare-"))
    root.mkdir(parents=True, exist_ok=True)
    toy.save_tiny_model(root / "model", arch="llama", seed=0, hidden=args.hidden, layers=args.layers)
    rows = toy.letter_prompts(512, seed=0)
    write_jsonl(root / "prompts.jsonl", rows)

    runs: dict[str, list[dict]] = {}
    for method in args.methods:
        runs[method] = []
        for seed in range(args.seeds):
            t = time.perf_counter()
            runs[method].append(train_run(args, root, method, seed))
            r = runs[method][-1]
            print(
                f"{method:>13} seed {seed}: final reward {statistics.mean(r['rewards'][-args.last :]):.3f}"
                f"  {r['step_seconds']:.3f} s/step  peak RSS {r['peak_rss_mb']:.0f} MB"
                f"  ({time.perf_counter() - t:.0f} s)",
                flush=True,
            )

    warm = train_config(args, root, "rloo", 0, root / "warm", steps=args.warm_steps, beta=0.0)
    run_train(warm)
    print("gradient variance at fixed parameters ...", flush=True)
    var_warm = variances(args, root, str(root / "warm"))

    text = table(args, runs, var_warm)
    print("\n" + text)
    args.out.mkdir(parents=True, exist_ok=True)
    plot(runs, args.out / "compare.png")
    command = "python bench/compare.py " + " ".join(a for a in (argv or sys.argv[1:]))
    samples = args.steps * args.prompts_per_step * args.samples_per_prompt
    notes = (
        f"Command: `{command.strip()}` ({time.perf_counter() - t0:.0f} s, device {args.device}, "
        f"{args.threads or 'default'} torch thread(s) per process, {os.cpu_count()} CPUs visible).\n\n"
        f"Tiny Llama (hidden {args.hidden}, {args.layers} layers), letter task, {args.steps} steps x "
        f"{args.prompts_per_step} prompts x {args.samples_per_prompt} samples = {samples} samples per run, "
        f"{args.max_new_tokens} new tokens at most, lr {args.lr}, beta {args.beta}, {args.seeds} seeds. "
        f"REINFORCE estimators take one on-policy step per batch; PPO takes {args.ppo_updates} passes x "
        f"{args.ppo_minibatches} minibatches with a critic on the policy's backbone. ReMax also decodes one "
        "greedy completion per prompt.\n\n"
        f"Gradient variance: E||g - E g||^2 / ||E g||^2 over {args.variance_estimates} independent "
        f"estimates of {args.variance_prompts} prompts x {args.variance_samples} samples each "
        "at fixed parameters (KL off, so only the estimator differs), in brackets relative to "
        f"no baseline; the parameters are the start after {args.warm_steps} RLOO steps (at the start "
        "itself the reward is about 0.03 and the mean gradient is lost in its noise); PPO's critic is "
        "untrained there (V = 0); 'unresolved': too few estimates to tell ||E g||^2 from zero. Memory: "
        "peak RSS of the run's process (on a GPU: torch.cuda.max_memory_allocated); 'training RSS' is that "
        "process's peak RSS "
        "minus the RSS before `run_train` (after imports); 'weights+grads+Adam' counts the bytes of "
        "the trained models' weights, gradients and two AdamW moments plus the frozen reference.\n\n"
        "Caveat: with few samples per estimate the estimates are heavy-tailed (a rare low-probability "
        "token has a large score), so ||E g||^2 is poorly determined and these ratios move between "
        "runs; a baseline can also raise variance here (a global baseline when prompts differ in "
        "difficulty, ReMax when the greedy answer scores far above the samples). The robust check is "
        "tests/test_variance.py (score shifted by +1, where every baseline must win by 3x).\n"
    )
    (args.out / "compare.md").write_text(text + "\n\n" + notes)
    print(
        f"\nwrote {args.out / 'compare.md'} and {args.out / 'compare.png'} ({time.perf_counter() - t0:.0f} s)"
    )


if __name__ == "__main__":
    main()
