"""reinforce-lm against TRL's GRPOTrainer and RLOOTrainer on identical work, side by side in one run.

    python bench/vs_trl.py                      # defaults: < ~10 min on 2 CPU cores
    python bench/vs_trl.py --models medium --steps 6 --repeats 3 --betas 0 0.05

TRL is a bench-only dependency: run this with a Python that has `trl` installed next to reinforce-lm
(see bench/README in the project README). Every (model, trainer) run is a fresh subprocess, so its peak
RSS is its own; runs are interleaved (r-lm, TRL, r-lm, TRL, ...) over `--repeats` and the medians kept,
because the CPU is shared. Identical work for both: the same model directory (bench/common.py), the same
prompts of one fixed token length, P prompts x K samples per step, completions of exactly T tokens
(EOS cannot be sampled, see bench/common.py), fp32, AdamW at the same constant learning rate, gradient
clipping at 1, the same micro-batch size and beta (0 loads no reference model in either), and the same
number of steps. Activation checkpointing is each trainer's default unless `--checkpointing both` or
`neither` sets it alike (TRL's GRPOConfig turns it on by default, reinforce-lm does not). The first
`--warmup` steps are not timed. Tokens per second = completion tokens of the
timed steps / wall time from the end of the last warm-up step to the end of the last step.

On a GPU (`--device cuda`), peak memory is `torch.cuda.max_memory_allocated` (what the tensors took, not
the process), each step's end is timed after `torch.cuda.synchronize()`, and `--precision bf16` runs
both trainers with fp32 weights and optimiser state and bf16 autocast forwards (ours:
`--mixed-precision bf16`; TRL: `bf16=True`):

    python bench/vs_trl.py --device cuda --precision bf16 --prompts-per-step 16 --k 8 --max-new-tokens 128
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import trainers  # noqa: E402

HERE = Path(__file__).resolve().parent
PAIRS = {"grpo": ("grpo", "GRPOTrainer"), "rloo": ("rloo", "RLOOTrainer")}


# ------------------------------------------------------------------------------------------------
# Driver
# ------------------------------------------------------------------------------------------------
def run_job(job: dict, verbose: bool) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(job)]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", TRANSFORMERS_VERBOSITY="error")
    env.update(OMP_NUM_THREADS=str(job["threads"]), MKL_NUM_THREADS=str(job["threads"]))
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if p.returncode or not lines:
        sys.stderr.write(p.stdout[-3000:] + p.stderr[-6000:])
        raise SystemExit(f"{job['impl']} {job['estimator']} on {job['model']} failed (rc {p.returncode})")
    res = json.loads(lines[-1][len("RESULT ") :])
    if verbose:
        print(
            f"  {job['model']:6s} {job['impl']:12s} {job['estimator']} beta={job['beta']}: "
            f"{res['tokens_per_s']:8.1f} tok/s ({res['cpu_tokens_per_s']:8.1f} per CPU-s), "
            f"step {res['step_s']:.3f}s, peak {res['peak_rss']:.0f} MiB, "
            f"tokens/step {res['mean_tokens_per_step']:.0f}",
            flush=True,
        )
        if "phases" in res:  # reinforce-lm's own split of a step (median seconds), GPU peaks per phase
            w = job["warmup"]
            split = {
                k.removesuffix("_seconds"): statistics.median(v[w:])
                for k, v in res["phases"].items()
                if v[w:] and None not in v[w:]
            }
            print("    phases (s): " + ", ".join(f"{k} {v:.3f}" for k, v in split.items()), flush=True)
            if res.get("phase_peaks"):
                print("    peaks (MiB): " + json.dumps({k: round(v) for k, v in res["phase_peaks"].items()}))
    return res


CHECKPOINTING = {
    "defaults": "each trainer's default (TRL: on, reinforce-lm: off)",
    "both": "on in both",
    "neither": "off in both",
}
SIZES = {  # P prompts, K samples, T tokens, micro-batch, steps
    "tiny": dict(p=8, k=8, t=64, micro=16, steps=8),
    "medium": dict(p=4, k=4, t=32, micro=8, steps=4),
    "bigvocab": dict(p=4, k=4, t=32, micro=8, steps=4),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--models", nargs="+", default=list(common.MODELS), choices=common.MODELS)
    ap.add_argument("--pairs", nargs="+", default=["grpo", "rloo"], choices=list(PAIRS))
    ap.add_argument("--betas", nargs="+", type=float, default=[0.0])
    ap.add_argument("--steps", type=int, help="steps per run (default per model: tiny 8, others 4)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed first steps")
    ap.add_argument("--prompts-per-step", type=int, help="P (default: tiny 8, others 4)")
    ap.add_argument("--k", type=int, help="K samples per prompt (default: tiny 8, others 4)")
    ap.add_argument("--max-new-tokens", type=int, help="T (default: tiny 64, others 32)")
    ap.add_argument("--micro-batch", type=int, help="sequences per forward/backward (tiny 16, others 8)")
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads of every run (1 by default: on a shared, oversubscribed CPU two OpenMP threads "
        "wait on each other at every op, and the timings measure the neighbours rather than the trainers)",
    )
    ap.add_argument(
        "--checkpointing",
        choices=["defaults", "both", "neither"],
        default="defaults",
        help="activation (gradient) checkpointing: each trainer's default (TRL on, reinforce-lm off), on in "
        "both, or off in both",
    )
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument(
        "--precision",
        choices=["fp32", "bf16"],
        default="fp32",
        help="fp32, or bf16 autocast forwards over fp32 weights in both trainers (GPU)",
    )
    ap.add_argument(
        "--chunk-elements",
        type=int,
        default=0,
        help="reinforce-lm's logprobs.CHUNK_ELEMENTS for this run (0: the library's default; a huge value "
        "runs the LM head in one piece)",
    )
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repeats; medians are reported")
    ap.add_argument("--out", default=str(HERE / "results" / "vs_trl.md"))
    args = ap.parse_args()
    if args.worker:
        return trainers.worker(json.loads(args.worker))

    rows, t0 = [], time.time()
    for model in args.models:
        size = dict(SIZES[model])
        for key, flag in [("p", "prompts_per_step"), ("k", "k"), ("t", "max_new_tokens")]:
            size[key] = getattr(args, flag) or size[key]
        size["micro"] = args.micro_batch or size["micro"]
        size["steps"] = args.steps or size["steps"]
        model_dir = str(common.build(model))
        print(f"{model}: {common.n_params(Path(model_dir)) / 1e6:.2f}M parameters, {size}", flush=True)
        for pair in args.pairs:
            for beta in args.betas:
                base = dict(size, model=model, model_dir=model_dir, estimator=pair, beta=beta, lr=args.lr)
                base.update(warmup=args.warmup, threads=args.threads, checkpointing=args.checkpointing)
                base.update(device=args.device, precision=args.precision, chunk_elements=args.chunk_elements)
                runs = {"reinforce-lm": [], "trl": []}
                for _ in range(args.repeats):
                    for impl in runs:
                        runs[impl].append(run_job(dict(base, impl=impl), verbose=True))
                rows.append((model, pair, beta, size, runs))
    table = render(rows, args)
    print("\n" + table)
    print(f"total wall time {time.time() - t0:.0f}s")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(table)


def render(rows, args) -> str:
    med = statistics.median
    cmd = "python bench/vs_trl.py " + " ".join(sys.argv[1:])
    if args.device == "cpu":
        where = f"CPU, {args.precision}, {os.cpu_count()} cores, {args.threads} torch thread(s) per run"
        peak = (
            "peak: peak RSS of the process up to the end of the last training step (reinforce-lm then "
            "writes its final checkpoint, TRL here saves nothing); +train: peak minus RSS at the start of "
            "step 1 (models loaded, no optimiser state yet)"
        )
    else:
        import torch

        where = f"{torch.cuda.get_device_name()}, {args.precision}, torch {torch.__version__}"
        peak = (
            "peak: torch.cuda.max_memory_allocated up to the end of the last training step; +train: peak "
            "minus the memory allocated at the start of step 1 (models loaded, no optimiser state yet)"
        )
    import transformers

    versions = f"transformers {transformers.__version__}"
    try:
        import trl

        versions += f", TRL {trl.__version__}"
    except ImportError:
        pass
    out = [
        "# reinforce-lm vs TRL",
        "",
        f"Command: `{cmd.strip()}`  ",
        f"Medians of {args.repeats} interleaved runs, each a fresh process ({where}; {versions}). "
        "tok/s: completion tokens per second of training after the warm-up step(s); tok/CPU-s: the same "
        "per second of the process's CPU time (steadier while neighbours take the CPU); "
        f"{peak}. Activation checkpointing: {CHECKPOINTING[args.checkpointing]}.",
        "",
        "| model | TRL trainer | beta | P x K x T | r-lm tok/s | TRL tok/s | **speed ratio** "
        "| r-lm tok/CPU-s | TRL tok/CPU-s | **CPU ratio** | r-lm peak MiB "
        "| TRL peak MiB | **peak ratio** | r-lm +train MiB | TRL +train MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for model, pair, beta, size, runs in rows:
        r, t = runs["reinforce-lm"], runs["trl"]
        rt, tt = med(x["tokens_per_s"] for x in r), med(x["tokens_per_s"] for x in t)
        rc, tc = med(x["cpu_tokens_per_s"] for x in r), med(x["cpu_tokens_per_s"] for x in t)
        rp, tp = med(x["peak_rss"] for x in r), med(x["peak_rss"] for x in t)
        rd = med(x["peak_rss"] - x["rss_start"] for x in r)
        td = med(x["peak_rss"] - x["rss_start"] for x in t)
        out.append(
            f"| {model} | {PAIRS[pair][1]} | {beta:g} | {size['p']}x{size['k']}x{size['t']} | {rt:.0f} | "
            f"{tt:.0f} | **{rt / tt:.2f}x** | {rc:.0f} | {tc:.0f} | **{rc / tc:.2f}x** "
            f"| {rp:.0f} | {tp:.0f} | **{rp / tp:.2f}x** | "
            f"{rd:.0f} | {td:.0f} |"
        )
    out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    main()
