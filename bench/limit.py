"""How close a reinforce-lm step is to the work it cannot avoid, and where its memory goes.

    python bench/limit.py                         # both models, beta 0 and 0.05
    python bench/limit.py --models medium --repeats 5

The step is split into its necessary parts, each timed alone in plain PyTorch on the same model and
sizes as `bench/vs_trl.py`:

1. sampling: one prefill per prompt, its KV cache repeated K times, T decode steps through the model's
   own `DynamicCache`, `torch.multinomial` on the last position's softmax (no trainer around it); and
   the same loop with reinforce-lm's lean decode step instead of the model's forward (the faster of the
   two counts: it is the cheapest sampling we know);
2. one reference forward over the B sequences under `inference_mode` (only when beta > 0);
3. one policy forward and backward per micro-batch (log-softmax of the chosen tokens, a REINFORCE loss);
4. one optimiser step (clip the gradient norm, AdamW step, zero the gradients).

A reinforce-lm step (`run_train`, the same sizes) is then timed in the same process, and the ratio of its
median step to the sum of the parts' medians is printed. Times are wall and CPU seconds of one thread
(the CPU is shared: CPU time is the steadier of the two). Memory: the parameter, gradient and optimiser
bytes, the activations that one micro-batch keeps for backward (summed with saved-tensor hooks) and the
KV cache, against the peak RSS of a fresh process running reinforce-lm minus its RSS after imports, and
how much of that peak the allocator held as free memory.
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

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from vs_trl import SIZES  # noqa: E402

HERE = Path(__file__).resolve().parent
MiB = 2**20


def timed(fn, repeats: int) -> tuple[float, float]:
    """Median (wall, CPU) seconds of `fn()` over `repeats` calls after one warm-up call."""
    fn()
    wall, cpu = [], []
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - w)
        cpu.append(time.process_time() - c)
    return statistics.median(wall), statistics.median(cpu)


def batch(tok, prompts: list[str], P: int, K: int, T: int, vocab: int):
    enc = tok(prompts[:P], return_tensors="pt", padding=True)
    ids, mask = enc.input_ids, enc.attention_mask  # [P, Lp]
    resp = torch.randint(1, vocab, (P * K, T))
    full = torch.cat([ids.repeat_interleave(K, 0), resp], 1)  # [B, Lp+T]
    fmask = torch.cat([mask.repeat_interleave(K, 0), torch.ones_like(resp)], 1)
    return ids, mask, full, fmask


def draw(logits: torch.Tensor) -> torch.Tensor:
    """[B, V] -> [B, 1]: reinforce-lm's inverse-transform draw with plain `torch.rand` uniforms (on a 152k
    vocabulary `torch.multinomial` costs several times more on CPU): the cheapest plain draw we know."""
    from reinforce_lm.draws import _draw

    return _draw(logits, torch.rand(logits.shape[0], dtype=torch.float64))[0][:, None]


def sample_plain(model, ids, mask, K: int, T: int):
    """The necessary sampling work: prefill once per prompt, repeat the cache, T cached decode steps."""
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1)
        cache = out.past_key_values if "past_key_values" in out else out.cache
        cache.batch_repeat_interleave(K)
        logits, mask = out.logits[:, -1].repeat_interleave(K, 0), mask.repeat_interleave(K, 0)
        for _ in range(T):
            tok = draw(logits)  # [B, 1]
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
            logits = model(input_ids=tok, attention_mask=mask, past_key_values=cache, use_cache=True).logits[
                :, -1
            ]


def sample_lean(model, ids, mask, K: int, T: int):
    """The same sampling with reinforce-lm's lean decode step (reinforce_lm/decoder.py) for the per-token
    forwards instead of the model's own forward: the fastest plain loop we know for Llama-family models."""
    from reinforce_lm.decoder import lean_decoder

    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1)
        cache = out.past_key_values if "past_key_values" in out else out.cache
        cache.batch_repeat_interleave(K)
        logits, mask = out.logits[:, -1].repeat_interleave(K, 0), mask.repeat_interleave(K, 0)
        dec = lean_decoder(model, cache, mask.shape[1], T)
        pos = mask.sum(1) - 1
        full = torch.cat([mask, mask.new_ones(mask.shape[0], T)], 1)
        padded = not bool(mask.all())
        for t in range(T):
            tok = draw(logits).squeeze(1)  # [B]
            pos = pos + 1
            logits = dec.step(tok, pos, full[:, : mask.shape[1] + t + 1] if padded else None)


def logp_of(model, full, fmask, T: int) -> torch.Tensor:
    pos = (fmask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=full, attention_mask=fmask, position_ids=pos, logits_to_keep=T + 1).logits[
        :, :-1
    ]
    return logits.log_softmax(-1).gather(-1, full[:, -T:, None]).squeeze(-1)  # [B, T]


def policy_fwd_bwd(model, full, fmask, T: int, micro: int):
    adv = torch.randn(full.shape[0], 1)
    for i in range(0, full.shape[0], micro):
        loss = -(logp_of(model, full[i : i + micro], fmask[i : i + micro], T) * adv[i : i + micro]).mean()
        loss.backward()


def activation_bytes(model, full, fmask, T: int, micro: int) -> int:
    """Bytes of the distinct storages one micro-batch's forward keeps for its backward."""
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
        return t

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = logp_of(model, full[:micro], fmask[:micro], T).sum()
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(b for ptr, b in seen.items() if ptr not in params)


def reinforce_lm_steps(model_dir: str, size: dict, beta: float, steps: int, watch=None) -> list[dict]:
    from reinforce_lm import trainer as trainer_mod
    from reinforce_lm.config import TrainConfig, build_config
    from reinforce_lm.runner import run_train
    from reinforce_lm.stages import reinforce as stage_mod

    rows, marks = [], [(time.perf_counter(), time.process_time())]

    class Marked(trainer_mod.MetricsLogger):
        def log(self, step, metrics):
            marks.append((time.perf_counter(), time.process_time()))
            w, c = marks[-1][0] - marks[-2][0], marks[-1][1] - marks[-2][1]
            rows.append(dict(metrics, wall=w, cpu=c, peak=common.peak_rss_mib()))
            super().log(step, metrics)

    trainer_mod.MetricsLogger = Marked
    if watch is not None:  # the start of step 1: models loaded, nothing of training allocated yet
        collect = stage_mod.ReinforceStage.collect

        def marked_collect(self, step):
            if step == 0:
                watch.start_training()
            return collect(self, step)

        stage_mod.ReinforceStage.collect = marked_collect

    with tempfile.TemporaryDirectory() as out:
        cfg = build_config(
            TrainConfig,
            dict(
                model=model_dir,
                prompts=str(Path(model_dir) / "prompts.jsonl"),
                reward=[f"{HERE / 'common.py'}:reward"],
                output_dir=out,
                steps=steps,
                lr=1e-5,
                estimator="grpo",
                samples_per_prompt=size["k"],
                prompts_per_step=size["p"],
                max_new_tokens=size["t"],
                micro_batch_size=size["micro"],
                beta=beta,
                dtype="float32",
                device="cpu",
                progress=False,
            ),
        )
        run_train(cfg)
    return rows  # the first row's wall/cpu include loading


def measure(model_name: str, beta: float, repeats: int, steps: int) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = str(common.build(model_name))
    size = SIZES[model_name]
    P, K, T, micro = size["p"], size["k"], size["t"], size["micro"]
    tok = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).train()
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval().requires_grad_(False)
    prompts = common.load_prompts(Path(model_dir))
    ids, mask, full, fmask = batch(tok, prompts, P, K, T, policy.config.vocab_size)
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-5, fused=True)  # the fastest plain AdamW

    def ref_fwd():
        with torch.inference_mode():
            logp_of(ref, full, fmask, T)

    def opt_step():
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=False)

    policy.eval()
    parts = {"sampling (KV cache)": timed(lambda: sample_plain(policy, ids, mask, K, T), repeats)}
    lean = timed(lambda: sample_lean(policy, ids, mask, K, T), repeats)
    alternatives = {"sampling, model forward": parts["sampling (KV cache)"], "sampling, lean step": lean}
    parts["sampling (KV cache)"] = min(parts["sampling (KV cache)"], lean)  # the faster of the two
    policy.train()
    if beta > 0:
        parts["reference forward"] = timed(ref_fwd, repeats)
    parts["policy forward+backward"] = timed(lambda: policy_fwd_bwd(policy, full, fmask, T, micro), repeats)
    parts["optimiser step"] = timed(opt_step, repeats)
    n_param = sum(p.numel() * p.element_size() for p in policy.parameters())
    act = activation_bytes(policy, full, fmask, T, micro)
    cfg = policy.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv = 2 * cfg.num_hidden_layers * P * K * (ids.shape[1] + T) * cfg.num_key_value_heads * head_dim * 4

    rows = reinforce_lm_steps(model_dir, size, beta, steps)[1:]  # the first step is warm-up
    step_wall = statistics.median(r["wall"] for r in rows)
    step_cpu = statistics.median(r["cpu"] for r in rows)
    return dict(
        step_cpu=step_cpu,
        model=model_name,
        beta=beta,
        size=size,
        parts=parts,
        sampling=alternatives,
        step_wall=step_wall,
        phases={k: statistics.median(r[k] for r in rows) for k in ("generate_seconds", "backward_seconds")},
        memory=dict(
            policy=n_param,
            reference=n_param if beta > 0 else 0,
            gradients=n_param,
            optimiser=2 * n_param,
            activations=act,
            kv_cache=kv,
        ),
    )


def peak_rss_of_run(model_name: str, beta: float, steps: int, threads: int) -> dict:
    """Memory of reinforce-lm training in a fresh process: RSS after imports, at the start of step 1
    (models loaded), the peak up to the end of the last step (before the final checkpoint), and how much
    of that peak the C allocator held as free memory (glibc `mallinfo2`, sampled with RSS every ms)."""
    code = (
        f"import sys, json, torch; sys.path.insert(0, {str(HERE)!r}); import common, limit\n"
        f"torch.set_num_threads({threads}); import reinforce_lm.runner, transformers\n"
        "base = common.current_rss_mib()\n"
        "watch = common.RssWatch()\n"
        f"d = str(common.build({model_name!r}))\n"
        f"rows = limit.reinforce_lm_steps(d, limit.SIZES[{model_name!r}], {beta}, {steps}, watch)\n"
        "watch.stop()\n"
        "print('RESULT', json.dumps(dict(base=base, peak=rows[-1]['peak'], **watch.result())))\n"
    )
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), TRANSFORMERS_VERBOSITY="error")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if not line:
        raise SystemExit(p.stdout[-2000:] + p.stderr[-4000:])
    return json.loads(line[-1][7:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=list(common.MODELS), choices=common.MODELS)
    ap.add_argument("--betas", nargs="+", type=float, default=[0.0, 0.05])
    ap.add_argument("--repeats", type=int, default=3, help="timed calls of each part (medians)")
    ap.add_argument("--steps", type=int, default=5, help="reinforce-lm steps (the first is not timed)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (see bench/vs_trl.py --help)")
    ap.add_argument("--out", default=str(HERE / "results" / "limit.md"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    results = []
    for name in args.models:
        for beta in args.betas:
            r = measure(name, beta, args.repeats, args.steps)
            r["rss"] = peak_rss_of_run(name, beta, args.steps, args.threads)
            results.append(r)
            print(json.dumps(r, default=str), flush=True)
    table = render(results, args)
    print("\n" + table)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(table)


def render(results, args) -> str:
    cmd = "python bench/limit.py " + " ".join(sys.argv[1:])
    out = [
        "# reinforce-lm against the limit",
        "",
        f"Command: `{cmd.strip()}`  ",
        f"{args.threads} torch thread(s), fp32, medians; sizes as in vs_trl.md. Parts are timed alone in "
        "plain PyTorch; the step is the median time between the ends of `run_train`'s steps after a "
        "warm-up step. Sampling is timed twice, with the model's own forward and with the lean decode "
        "step at every token; the sum takes the faster.",
        "",
        "## Time",
        "",
        "| model | beta | P x K x T | sampling: model forward / lean step | ref fwd | policy fwd+bwd | optim "
        "| **sum (wall)** "
        "| r-lm step (wall) | **ratio (wall)** | sum (CPU) | r-lm step (CPU) | **ratio (CPU)** "
        "| r-lm generate / update (wall) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        p, s = r["parts"], r["size"]
        total = sum(w for w, _ in p.values())
        total_cpu = sum(c for _, c in p.values())
        ref = p.get("reference forward", (0.0, 0.0))[0]
        out.append(
            f"| {r['model']} | {r['beta']:g} | {s['p']}x{s['k']}x{s['t']} "
            f"| {r['sampling']['sampling, model forward'][0]:.3f} "
            f"/ {r['sampling']['sampling, lean step'][0]:.3f} "
            f"| {ref:.3f} | {p['policy forward+backward'][0]:.3f} "
            f"| {p['optimiser step'][0]:.3f} | **{total:.3f}** | {r['step_wall']:.3f} "
            f"| **{r['step_wall'] / total:.2f}x** | {total_cpu:.3f} | {r['step_cpu']:.3f} "
            f"| **{r['step_cpu'] / total_cpu:.2f}x** "
            f"| {r['phases']['generate_seconds']:.3f} / {r['phases']['backward_seconds']:.3f} |"
        )
    out += [
        "",
        "CPU seconds of the parts (steadier on a shared machine): "
        + "; ".join(
            f"{r['model']} beta {r['beta']:g}: "
            + ", ".join(f"{k} {c:.3f}" for k, (_, c) in r["parts"].items())
            for r in results
        ),
        "",
        "## Peak memory (MiB)",
        "",
        "| model | beta | policy | reference | gradients | AdamW state | activations (1 micro-batch) "
        "| KV cache | **sum** | RSS after imports | at step 1 (models loaded) | peak "
        "| allocator free at peak "
        "| **(peak - imports) / sum** | **(peak - at step 1 - free) / sum** |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        m = {k: v / MiB for k, v in r["memory"].items()}
        total = sum(m.values())
        rss = r["rss"]
        measured = rss["peak"] - rss["base"]
        free = rss["free_at_peak"]
        live = rss["peak"] - rss["at_start"] - free
        out.append(
            f"| {r['model']} | {r['beta']:g} | {m['policy']:.1f} | {m['reference']:.1f} "
            f"| {m['gradients']:.1f} | {m['optimiser']:.1f} | {m['activations']:.1f} | {m['kv_cache']:.1f} "
            f"| **{total:.1f}** | {rss['base']:.0f} | {rss['at_start']:.0f} | {rss['peak']:.0f} | {free:.0f} "
            f"| **{measured / total:.2f}x** | **{live / total:.2f}x** |"
        )
    out += [
        "",
        "RSS after imports: torch, transformers and reinforce-lm imported. At step 1: the models and "
        "tokenizer loaded, which also imports the parts of transformers that loading needs (~100 MiB "
        "of modules, the same for every trainer); the weights are memory-mapped by `from_pretrained` and "
        "become resident when step 1 first reads them, so they count in the peak, not here. Allocator "
        "free at peak: bytes that glibc's malloc held as free (freed by PyTorch, not returned to the "
        "system) at the moment of the highest sampled RSS. The last column is then the memory training "
        "really holds at its peak against the sum of the parts.",
    ]
    out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    main()
