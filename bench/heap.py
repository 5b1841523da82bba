"""Peak RSS of a reinforce-lm run with and without the heap trim before each backward, side by side.

    python bench/heap.py                            # the 36M model, checkpointing on, 4 interleaved repeats
    python bench/heap.py --models medium bigvocab --checkpointing off --repeats 2
    MALLOC_MMAP_THRESHOLD_=131072 python bench/heap.py --variants no-trim   # glibc's fixed threshold

Each (variant, repeat) is a fresh process that trains the vs_trl.py job (GRPO, beta 0, fp32, 1 thread)
while a thread samples RSS and glibc's heap statistics (`mallinfo2`) every half millisecond, tagged with
the phase of the step (collect, forward, backward, optimiser step). Reported per variant: the median peak
RSS, the phase it fell in, the heap's free bytes at that moment (freed blocks that still count in RSS),
and the CPU seconds of the whole run. `no-trim` turns `host_memory.release_free_heap` off; environment
variables such as glibc's `MALLOC_MMAP_THRESHOLD_` pass through to every run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

SIZES = dict(tiny=(8, 8, 64, 16), medium=(4, 4, 32, 8), bigvocab=(4, 4, 32, 8))  # P, K, T, micro-batch


def worker(job: dict) -> dict:
    import ctypes

    import torch

    from reinforce_lm import host_memory
    from reinforce_lm.config import TrainConfig
    from reinforce_lm.runner import run_train
    from reinforce_lm.stages import reinforce

    torch.set_num_threads(1)
    if job["variant"] == "no-trim":
        host_memory.release_free_heap = lambda: False

    class MallInfo2(ctypes.Structure):
        _fields_ = [
            (n, ctypes.c_size_t) for n in "arena ordblks smblks hblks hblkhd usm fsm uord ford keep".split()
        ]

    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = MallInfo2
    phase, best = ["load"], {"rss": 0.0}

    def watch():
        while True:
            rss = common.current_rss_mib()
            if rss > best["rss"]:
                best.update(rss=rss, phase=phase[0], heap_free=libc.mallinfo2().ford / 2**20)
            time.sleep(0.0005)

    def tagged(name, fn, after="update"):
        def wrapped(*a, **kw):
            phase[0] = name
            try:
                return fn(*a, **kw)
            finally:
                phase[0] = after

        return wrapped

    reinforce.ReinforceStage.collect = tagged("collect", reinforce.ReinforceStage.collect)
    reinforce.ReinforceStage.loss = tagged("forward", reinforce.ReinforceStage.loss)
    torch.Tensor.backward = tagged("backward", torch.Tensor.backward)
    torch.optim.AdamW.step = tagged("optimiser step", torch.optim.AdamW.step)
    threading.Thread(target=watch, daemon=True).start()
    model = common.build(job["model"])
    p, k, t, micro = SIZES[job["model"]]
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(
            model=str(model), prompts=str(model / "prompts.jsonl"), reward=[f"{common.__file__}:reward"],
            output_dir=out, steps=job["steps"], lr=1e-5, estimator="grpo", beta=0.0, samples_per_prompt=k,
            prompts_per_step=p, max_new_tokens=t, micro_batch_size=micro, dtype="float32", device="cpu",
            progress=False, seed=0, gradient_checkpointing=job["checkpointing"] == "on",
        )  # fmt: skip
        cpu = time.process_time()
        run_train(cfg)
        cpu = time.process_time() - cpu
    return dict(best, cpu=cpu)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--models", nargs="+", default=["medium"], choices=list(SIZES))
    ap.add_argument("--checkpointing", choices=["on", "off"], default="on")
    ap.add_argument("--variants", nargs="+", default=["no-trim", "trim"], choices=["no-trim", "trim"])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=4, help="interleaved fresh processes per variant")
    args = ap.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))))
        return
    env = dict(
        os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", TRANSFORMERS_VERBOSITY="error"
    )
    cols = ["model", "checkpointing", "variant", "peak RSS MiB (runs)", "**median**", "phase of the peak"]
    print("| " + " | ".join(cols + ["heap free at peak MiB", "CPU s"]) + " |")
    print("|---|---|---|---|---|---|---|---|")
    for model in args.models:
        common.build(model)
        runs = {v: [] for v in args.variants}
        for _ in range(args.repeats):
            for v in args.variants:
                job = dict(model=model, variant=v, steps=args.steps, checkpointing=args.checkpointing)
                cmd = [sys.executable, __file__, "--worker", json.dumps(job)]
                out = subprocess.run(cmd, capture_output=True, text=True, env=env)
                lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
                if not lines:
                    raise SystemExit(out.stdout[-2000:] + out.stderr[-4000:])
                runs[v].append(json.loads(lines[-1][len("RESULT ") :]))
        for v, rs in runs.items():
            peaks = [r["rss"] for r in rs]
            phases = sorted({r["phase"] for r in rs})
            free = statistics.median(r["heap_free"] for r in rs)
            cpu = statistics.median(r["cpu"] for r in rs)
            runs_s = ", ".join(f"{x:.0f}" for x in peaks)
            print(f"| {model} | {args.checkpointing} | {v} | {runs_s} | **{statistics.median(peaks):.0f}** | "
                  f"{', '.join(phases)} | {free:.0f} | {cpu:.1f} |")  # fmt: skip


if __name__ == "__main__":
    main()
