"""Sampling alone, side by side in one process: the decode paths of reinforce-lm's native sampler.

    python bench/sampling.py --device cuda --precision bf16     # the GPU figures of the README
    python bench/sampling.py                                     # CPU: no CUDA graphs there

On the bench models (`bench/common.py`), one `Sampler.sample` call of P prompts x K samples x T tokens
(EOS never sampled, so every completion is T tokens long), timed for each path, interleaved:

- `forward`: the model's own forward at every token (`lean=False`; its cache written in place);
- `lean`: reinforce-lm's lean decode step, eager (`cuda_graphs=False`);
- `graphs`: the lean step captured into a CUDA graph and replayed per token (the default on a GPU).

It prints completion tokens per second of sampling for each, the ratios to `forward` and to `lean`, and
how far each path's log-probs of its sampled tokens are from the model's forward over the finished
sequences (teacher-forced, `logprobs.token_logprobs`): the check that a faster path samples from the
same distribution. Whether two paths draw the same completions is no such check: the same seeded
uniforms pick the same tokens only while the logits agree to the last bit, and kernels that round
differently (bf16; a masked against an unmasked attention kernel) change a draw from a near-flat
distribution over a large vocabulary almost every time, and every token after it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def timed(sampler, call: tuple, amp, dev: torch.device):
    """(seconds, Rollout) of one `sampler.sample(*call)` under `amp`."""
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    with amp:
        r = sampler.sample(*call)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=list(common.MODELS), choices=common.MODELS)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument(
        "--precision", choices=["fp32", "bf16"], default="fp32", help="bf16: autocast, fp32 weights"
    )
    ap.add_argument("--prompts", type=int, default=16, help="P")
    ap.add_argument("--k", type=int, default=8, help="K samples per prompt")
    ap.add_argument("--max-new-tokens", type=int, default=128, help="T")
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per path after one warm-up (median)")
    ap.add_argument("--out", help="also write the table here (markdown)")
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM

    from reinforce_lm.logprobs import token_logprobs
    from reinforce_lm.models import load_tokenizer
    from reinforce_lm.rollout import Sampler, row_seeds

    torch.set_num_threads(1)
    paths = {"forward": dict(lean=False), "lean": dict(cuda_graphs=False)}
    if args.device == "cuda":
        paths["graphs"] = dict()
    dev = torch.device(args.device)
    amp = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")
    rows = []
    for name in args.models:
        path = common.build(name)
        tok = load_tokenizer(str(path))
        model = AutoModelForCausalLM.from_pretrained(path).to(dev).eval()
        prompts = common.load_prompts(path)[: args.prompts]
        g = torch.arange(len(prompts))
        seeds = row_seeds(0, 0, g, args.k)
        samplers = {p: Sampler(tok, args.max_new_tokens, **kw) for p, kw in paths.items()}
        times = {p: [] for p in paths}
        errors = {}

        call = (model, prompts, g, args.k, seeds)
        for p in paths:  # warm-up: kernels, allocator, cuBLAS workspaces
            r = timed(samplers[p], call, amp, dev)[1]
            with amp, torch.no_grad():
                full = token_logprobs(model, r.input_ids, r.attention_mask, r.response_ids.shape[1])
            err = ((full - r.logp) * r.response_mask).abs()
            errors[p] = (err.sum().item() / r.response_mask.sum().item(), err.max().item())
        for _ in range(args.repeats):
            for p in paths:
                times[p].append(timed(samplers[p], call, amp, dev)[0])
        n_tok = len(prompts) * args.k * args.max_new_tokens
        speed = {p: n_tok / statistics.median(t) for p, t in times.items()}
        rows.append((name, speed, errors))
        print(
            f"{name}: "
            + ", ".join(f"{p} {s:,.0f} tok/s" for p, s in speed.items())
            + " | logp error vs forward, mean/max: "
            + ", ".join(f"{p} {m:.1e}/{x:.1e}" for p, (m, x) in errors.items()),
            flush=True,
        )
        del model
    where = torch.cuda.get_device_name() if dev.type == "cuda" else "CPU, 1 thread"
    cols = list(paths)
    lines = [
        f"Sampling tok/s, {args.prompts} prompts x {args.k} samples x {args.max_new_tokens} tokens, "
        f"{where}, {args.precision}, torch {torch.__version__}; medians of {args.repeats}.",
        "",
        "| model | "
        + " | ".join(f"{c} tok/s" for c in cols)
        + " | lean / forward |"
        + (" **graphs / lean** | graphs / forward |" if "graphs" in cols else "")
        + " logp error vs forward, mean / max: "
        + ", ".join(cols)
        + " |",
        "|---|" + "---|" * (len(cols) + 2 + (2 if "graphs" in cols else 0)),
    ]
    for name, speed, errors in rows:
        line = f"| {name} | " + " | ".join(f"{speed[c]:,.0f}" for c in cols)
        line += f" | {speed['lean'] / speed['forward']:.2f}x |"
        if "graphs" in cols:
            line += (
                f" **{speed['graphs'] / speed['lean']:.2f}x** | {speed['graphs'] / speed['forward']:.2f}x |"
            )
        line += " " + ", ".join(f"{m:.1e} / {x:.1e}" for m, x in errors.values()) + " |"
        lines.append(line)
    print("\n".join(lines))
    if args.out:
        Path(args.out).write_text(f"Command: `python {' '.join(sys.argv)}`\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
