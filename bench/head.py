"""Log-probs through a large-vocabulary LM head: chunked (the default) against whole logits, side by side.

    python bench/head.py                     # Qwen-sized vocabulary (151,936), 4 x 256 tokens, fp32, CPU
    python bench/head.py --vocab 32000 --batch 8 --tokens 512

`logprobs.token_logprobs` runs the model's LM head itself, a chunk of tokens at a time (at most
`CHUNK_ELEMENTS` logits each), and recomputes each chunk in the backward pass instead of keeping it:
for a plain linear head in one autograd node (`chunked`), else through the head module under activation
checkpointing (`checkpointed`, forced here with a no-op hook on the head). The whole-logits path
(`whole`: the head in one piece, as reinforce-lm runs it below `HEAD_CHUNKS_MIN` chunks, then a chunked
float32 log-softmax) holds the `[B, T, V]` logits; its backward writes their gradient into the same
storage (TRL's `selective_log_softmax` path holds the logits and their gradient at once). Every
(variant, pass) runs in a fresh process on the same randomly initialised Llama-architecture model (built
from a config, nothing downloaded). Reported: the median wall time of the pass after a first call, and
the memory the first call needs beyond what it leaves allocated: its peak RSS above the RSS before it,
less the parameter gradients it creates (the same in both variants).
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

MiB = 2**20
# chunked: the default (a plain linear head: one autograd node, `logprobs._HeadLogp`); checkpointed: the
# same chunks through the head module's forward under activation checkpointing (what a hooked or
# non-linear head gets); whole: the model's own [B, T, V] logits.
VARIANTS = ("chunked", "checkpointed", "whole")


def worker(args) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from reinforce_lm import logprobs, models

    torch.set_num_threads(args.threads)
    variant, name = args.worker.split(":")
    if variant == "whole":
        logprobs.HEAD_CHUNKS_MIN = 1 << 62  # the head in one piece, as below the threshold
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
    )  # fmt: skip
    model = models.disable_dropout(LlamaForCausalLM(config)).train()
    if variant == "checkpointed":  # a hook on the head: the module's forward in checkpointed chunks
        model.get_output_embeddings().register_forward_hook(lambda module, args, out: None)
    ids = torch.randint(0, args.vocab, (args.batch, args.prompt + args.tokens))
    mask = torch.ones_like(ids)
    weights = torch.randn(args.batch, args.tokens)
    logprobs._plain_head(model, ids[:1], mask[:1])  # the once-per-model check, before measuring

    def policy():
        logp, _ = logprobs.token_logprobs(model, ids, mask, args.tokens, entropy=True)
        (logp * weights).sum().backward()

    def reference():
        with torch.inference_mode():
            logprobs.token_logprobs(model, ids, mask, args.tokens)

    fn = policy if name == "policy" else reference
    before = common.current_rss_mib()
    fn()
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    need = common.peak_rss_mib() - before - grads / MiB
    times = []
    for _ in range(args.repeats):
        model.zero_grad(set_to_none=False)
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return dict(seconds=statistics.median(times), need=need)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--vocab", type=int, default=151_936)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=256, help="response tokens per sequence")
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3, help="timed calls after the first (median)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args)))
        return
    results = {}
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TRANSFORMERS_VERBOSITY="error")
    for name in ("policy", "reference"):
        for variant in VARIANTS:  # interleaved over the passes
            cmd = [sys.executable, __file__, "--worker", f"{variant}:{name}"] + sys.argv[1:]
            p = subprocess.run(cmd, capture_output=True, text=True, env=env)
            line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
            if not line:
                raise SystemExit(p.stdout[-2000:] + p.stderr[-4000:])
            results[variant, name] = json.loads(line[-1][7:])
    logits_mib = args.batch * args.tokens * args.vocab * 4 / MiB
    print(
        f"Command: `{' '.join(['python bench/head.py', *sys.argv[1:]])}`  \n"
        f"V = {args.vocab}, {args.batch} x {args.tokens} response tokens (+{args.prompt} prompt), hidden "
        f"{args.hidden}, 2 layers, fp32, {args.threads} torch thread(s); the float32 logits of the batch "
        f"are {logits_mib:.0f} MiB.\n"
    )
    print("| pass | variant | seconds | **time vs whole** | MiB | **memory vs whole** |")
    print("|---|---|---|---|---|---|")
    for name, label in (("policy", "policy forward+backward"), ("reference", "reference forward")):
        w = results["whole", name]
        for variant in VARIANTS:
            c = results[variant, name]
            print(
                f"| {label} | {variant} | {c['seconds']:.2f} | **{c['seconds'] / w['seconds']:.2f}x** | "
                f"{c['need']:.0f} | **{c['need'] / max(w['need'], 1e-9):.2f}x** |"
            )


if __name__ == "__main__":
    main()
