"""The CUDA paths: the same commands on a GPU as on the CPU. Skipped where torch sees no GPU (CI has none).

Run them on a machine with one: `python -m pytest -q tests/test_cuda.py`. They check what only a GPU
exercises: the fused-attention lean decode step, the bf16 autocast and bf16-weight paths, the chunked LM
head's float32 weight-gradient matmul, resume, NCCL under torchrun (two GPUs, with and without FSDP),
and that a step on the GPU is the step on the CPU.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import test_decoder
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from reinforce_lm import cli, toy
from reinforce_lm.config import TrainConfig
from reinforce_lm.diagnostics import gradient_variance
from reinforce_lm.distributed import setup as setup_dist
from reinforce_lm.files import write_jsonl
from reinforce_lm.logprobs import token_logprobs
from reinforce_lm.metrics import read_metrics
from reinforce_lm.models import load_tokenizer
from reinforce_lm.rollout import Sampler, row_seeds
from reinforce_lm.runner import build_train_stage

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
PROMPTS = ["a?", "bcd+1=", "j?", "0123456789?"]  # uneven lengths: left padding matters


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cuda")
    model = toy.save_tiny_model(root / "tiny", arch="llama", hidden=64, layers=2, heads=4)
    prompts = root / "prompts.jsonl"
    write_jsonl(prompts, toy.letter_prompts(32, seed=1))
    return root, model, prompts


def train_args(model, prompts, out, estimator, steps, *extra) -> list[str]:
    return [
        "train",
        f"--model={model}",
        f"--prompts={prompts}",
        "--reward=reinforce_lm.toy:letter_reward",
        f"--output-dir={out}",
        "--algorithm=ppo" if estimator == "ppo" else f"--estimator={estimator}",
        f"--steps={steps}",
        "--prompts-per-step=4",
        "--samples-per-prompt=4",
        "--max-new-tokens=8",
        "--micro-batch-size=8",
        "--lr=1e-2",
        "--no-progress",
        *extra,
    ]


def max_diff(a, b) -> float:
    x, y = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert x.keys() == y.keys()
    return max((x[k].float() - y[k].float()).abs().max().item() for k in x)


@pytest.mark.parametrize("arch", toy.ARCHITECTURES)
def test_lean_decode_on_cuda_matches_the_models_forward(arch, tmp_path):
    """The lean step takes the fused-attention path on a GPU: the same tokens and log-probs as the model."""
    path = toy.save_tiny_model(tmp_path, arch=arch, hidden=64, heads=4)
    tok = load_tokenizer(str(path))
    model = AutoModelForCausalLM.from_pretrained(path).to("cuda").eval()
    g = torch.arange(len(PROMPTS))
    seeds = row_seeds(0, 0, g, 3)
    lean = Sampler(tok, max_new_tokens=9).sample(model, PROMPTS, g, 3, seeds)
    plain = Sampler(tok, max_new_tokens=9, lean=False).sample(model, PROMPTS, g, 3, seeds)
    assert lean.logp.device.type == "cuda"
    full = token_logprobs(model, lean.input_ids, lean.attention_mask, lean.response_ids.shape[1])
    assert torch.allclose(full * lean.response_mask, lean.logp, atol=1e-4)
    assert lean.completions == plain.completions
    # and a CPU copy of the model samples the same completions (counter-based noise, device-independent)
    cpu = Sampler(tok, max_new_tokens=9).sample(model.cpu(), PROMPTS, g, 3, seeds)
    assert cpu.completions == lean.completions
    assert torch.allclose(cpu.logp, lean.logp.cpu(), atol=1e-4)


def test_lean_decode_on_cuda_in_bfloat16(tmp_path):
    path = toy.save_tiny_model(tmp_path, arch="llama", hidden=64, heads=4)
    tok = load_tokenizer(str(path))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to("cuda").eval()
    g = torch.arange(len(PROMPTS))
    lean = Sampler(tok, max_new_tokens=9).sample(model, PROMPTS, g, 2, row_seeds(0, 0, g, 2))
    full = token_logprobs(model, lean.input_ids, lean.attention_mask, lean.response_ids.shape[1])
    assert torch.isfinite(lean.logp).all()
    assert (full * lean.response_mask - lean.logp).abs().max().item() < 0.1  # bf16: ~3 significant digits


def _graphed(monkeypatch):
    """Spy on the lean decoders the sampler builds."""
    from reinforce_lm import decoder

    built, real = [], decoder.lean_decoder

    def spy(*args):
        built.append(real(*args))
        return built[-1]

    monkeypatch.setattr("reinforce_lm.rollout.lean_decoder", spy)
    return built


@pytest.mark.parametrize("name", test_decoder.ARCHS)
def test_cuda_graph_decode_steps_match_the_models_forward(name, tokenizer, monkeypatch):
    """Decode steps replayed from a CUDA graph (the default on a GPU): the log-probs of the model's
    forward, and the completions of eager steps, on every architecture the lean step takes."""
    built = _graphed(monkeypatch)
    model = test_decoder._model(name, tokenizer).to("cuda")
    g = torch.arange(len(PROMPTS))
    seeds = row_seeds(0, 0, g, 3)
    graphed = Sampler(tokenizer, max_new_tokens=9).sample(model, PROMPTS, g, 3, seeds)
    assert built[-1].graphs and built[-1].captures >= 1
    eager = Sampler(tokenizer, max_new_tokens=9, cuda_graphs=False).sample(model, PROMPTS, g, 3, seeds)
    assert not built[-1].static
    full = token_logprobs(model, graphed.input_ids, graphed.attention_mask, graphed.response_ids.shape[1])
    assert torch.allclose(full * graphed.response_mask, graphed.logp, atol=1e-4)
    assert graphed.completions == eager.completions
    assert torch.allclose(graphed.logp, eager.logp, atol=1e-4)


def test_cuda_graphs_are_captured_again_after_finished_rows_are_dropped(tokenizer, monkeypatch):
    built = _graphed(monkeypatch)
    model = toy.make_model("llama", tokenizer).to("cuda")
    g = torch.arange(2)
    r = Sampler(tokenizer, max_new_tokens=12).sample(model, ["a?", "0123?"], g, 32, row_seeds(0, 0, g, 32))
    assert (r.response_mask.sum(1) < 12).float().mean() > 0.25  # rows finished early were dropped
    assert built[-1].captures >= 2  # the full batch, then a smaller one
    full = token_logprobs(model, r.input_ids, r.attention_mask, r.response_ids.shape[1])
    assert torch.allclose(full * r.response_mask, r.logp, atol=1e-4)


def test_cuda_graphs_are_captured_for_each_attention_span(tokenizer, monkeypatch):
    from reinforce_lm import decoder

    monkeypatch.setattr(decoder, "SPAN", 4)
    built = _graphed(monkeypatch)
    model = test_decoder._model("mistral_window", tokenizer).to("cuda")
    g = torch.arange(len(PROMPTS))
    seeds = row_seeds(0, 0, g, 2)
    r = Sampler(tokenizer, max_new_tokens=12).sample(model, PROMPTS, g, 2, seeds)
    assert built[-1].captures >= 2  # 11 prompt positions + 12 tokens: spans ending at 12, 16, 20, 23
    full = token_logprobs(model, r.input_ids, r.attention_mask, r.response_ids.shape[1])
    assert torch.allclose(full * r.response_mask, r.logp, atol=1e-4)
    eager = Sampler(tokenizer, max_new_tokens=12, cuda_graphs=False).sample(model, PROMPTS, g, 2, seeds)
    assert eager.completions == r.completions


def test_cuda_graphs_under_bf16_autocast(tokenizer, monkeypatch):
    built = _graphed(monkeypatch)
    model = test_decoder._model("qwen3", tokenizer).to("cuda")
    g = torch.arange(len(PROMPTS))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        r = Sampler(tokenizer, max_new_tokens=9).sample(model, PROMPTS, g, 2, row_seeds(0, 0, g, 2))
        full = token_logprobs(model, r.input_ids, r.attention_mask, r.response_ids.shape[1])
    assert built[-1].captures >= 1
    assert torch.allclose(full * r.response_mask, r.logp, atol=0.05)


def test_a_failed_cuda_graph_capture_warns_and_steps_eagerly(tokenizer, monkeypatch):
    def refuse(self, *a, **kw):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(torch.cuda.CUDAGraph, "capture_begin", refuse)
    built = _graphed(monkeypatch)
    model = toy.make_model("llama", tokenizer).to("cuda")
    g = torch.arange(len(PROMPTS))
    with pytest.warns(UserWarning, match="CUDA graph capture failed"):
        r = Sampler(tokenizer, max_new_tokens=9).sample(model, PROMPTS, g, 2, row_seeds(0, 0, g, 2))
    assert built[-1].captures == 0 and not built[-1].graphs
    full = token_logprobs(model, r.input_ids, r.attention_mask, r.response_ids.shape[1])
    assert torch.allclose(full * r.response_mask, r.logp, atol=1e-4)


def test_a_step_on_cuda_is_the_step_on_cpu(setup):
    """One RLOO step with the KL in the reward: the same completions, rewards and (to float error) weights."""
    root, model, prompts = setup
    one = {d: root / f"step-{d}" for d in ("cpu", "cuda")}
    for d, out in one.items():
        cli.main(train_args(model, prompts, out, "rloo", 1, f"--device={d}", "--beta=0.05"))
    (a,), (b,) = (read_metrics(one[d] / "metrics.jsonl") for d in ("cpu", "cuda"))
    assert a["reward_mean"] == pytest.approx(b["reward_mean"], abs=1e-6)
    assert a["completion_tokens"] == b["completion_tokens"]
    assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-3)
    diff = max_diff(one["cpu"] / "checkpoint-1", one["cuda"] / "checkpoint-1")
    print(f"max |cuda - cpu| after one step: {diff:.2e}")
    assert diff < 1e-3  # Adam's first step moves every weight by ~lr = 1e-2
    assert max_diff(one["cuda"] / "checkpoint-1", model) > 1e-3


@pytest.mark.parametrize(
    "estimator,extra",
    [
        ("grpo", []),
        ("rloo", ["--mixed-precision=bf16", "--gradient-checkpointing"]),
        ("reinforce_pp", ["--beta=0.05", "--kl-in=loss", "--kl-estimator=k3"]),
        ("remax", ["--dtype=bfloat16"]),
        ("ppo", ["--mixed-precision=bf16"]),
    ],
)
def test_estimators_train_and_resume_on_cuda(setup, estimator, extra):
    """Two steps, then a resume to three, equal the uninterrupted three steps; checkpoints load on CPU."""
    root, model, prompts = setup
    full, cut = root / f"{estimator}-full", root / f"{estimator}-cut"
    cli.main(train_args(model, prompts, full, estimator, 3, "--device=cuda", *extra))
    cli.main(train_args(model, prompts, cut, estimator, 2, "--device=cuda", *extra))
    cli.main(train_args(model, prompts, cut, estimator, 3, "--device=cuda", "--resume", *extra))
    rows = read_metrics(full / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["grad_norm"] > 0 and r["loss"] == r["loss"] for r in rows)
    weights = load_file(full / "checkpoint-3" / "model.safetensors")
    want = torch.bfloat16 if "--dtype=bfloat16" in extra else torch.float32
    assert {w.dtype for w in weights.values()} == {want}
    assert max_diff(full / "checkpoint-3", model) > 1e-3
    # bf16 (forwards or weights) rounds a float-level difference (CUDA's atomic adds) to a bf16 step
    loose = any("bf" in e for e in extra)
    assert max_diff(full / "checkpoint-3", cut / "checkpoint-3") < (5e-2 if loose else 1e-3)
    assert [r["step"] for r in read_metrics(cut / "metrics.jsonl")] == [1, 2, 3]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs a GPU per process: two GPUs")
@pytest.mark.parametrize("extra", [[], ["--fsdp"]], ids=["ddp", "fsdp"])
def test_torchrun_on_two_gpus_with_nccl(setup, extra):
    """torchrun with two processes (NCCL; DDP or FSDP) trains what one process trains on one GPU. One
    process under torchrun would not do: at world size 1 no process group is made and nothing wrapped."""
    root, model, prompts = setup
    name = "fsdp" if extra else "ddp"
    plain, launched = root / f"nccl-plain-{name}", root / f"nccl-{name}"
    cli.main(train_args(model, prompts, plain, "grpo", 2, "--device=cuda"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m"]
    argv = train_args(model, prompts, launched, "grpo", 2, "--device=cuda", *extra)
    p = subprocess.run([*cmd, "reinforce_lm", *argv], env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "2 process(es)" in p.stdout
    assert max_diff(plain / "checkpoint-2", launched / "checkpoint-2") < 1e-3
    assert max_diff(launched / "checkpoint-2", model) > 1e-3


@pytest.mark.parametrize("weights", [torch.float32, torch.bfloat16])
def test_chunked_head_on_cuda_under_bf16_autocast(weights, monkeypatch):
    """The fused chunked head (`_HeadLogp`) on the GPU, bf16 autocast over float32 or bf16 weights: the
    log-probs and gradients of the head module's own logits, and the weight gradient summed in float32
    by the matmul itself (torch.addmm out_dtype), not by the upcast fallback."""
    from reinforce_lm import logprobs

    torch.manual_seed(0)
    V, H = 1000, 64
    head = torch.nn.Linear(H, V, bias=False).to("cuda", weights)
    hidden = torch.randn(4, 24, H, device="cuda", dtype=weights, requires_grad=True)
    tokens = torch.randint(0, V, (4, 24), device="cuda")
    g = torch.randn(4, 24, device="cuda")
    monkeypatch.setattr(logprobs, "CHUNK_ELEMENTS", 10 * V)  # 10 tokens a chunk: 10 chunks
    assert logprobs._linear_head(head)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = logprobs.head_logprobs(head, hidden, tokens)
        want = torch.log_softmax(head(hidden).float(), -1).gather(-1, tokens[..., None]).squeeze(-1)
    grads = [torch.autograd.grad((x * g).sum(), (hidden, head.weight)) for x in (got, want)]
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
    for a, b in zip(*grads, strict=True):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a.float(), b.float(), atol=2e-2, rtol=5e-2)
    acc = torch.zeros(V, H, device="cuda")
    a, b = torch.randn(V, 8, device="cuda", dtype=torch.bfloat16), torch.randn(8, H, device="cuda").bfloat16()
    logprobs._add_matmul(acc, a, b)
    torch.testing.assert_close(acc, a.float() @ b.float(), atol=1e-4, rtol=1e-4)
    assert logprobs._OUT_DTYPE.get(torch.bfloat16, True), "torch.addmm(out_dtype=float32) was refused"


def test_sft_reward_model_and_eval_on_cuda(setup):
    root, model, prompts = setup
    sft, pairs = root / "sft.jsonl", root / "pairs.jsonl"
    write_jsonl(sft, toy.sft_rows(64, length=6, seed=0))
    write_jsonl(pairs, toy.preference_rows(64, length=6, seed=0))
    common = ["--device=cuda", "--steps=6", "--batch-size=8", "--no-progress"]
    cli.main(
        ["sft", f"--model={model}", f"--data={sft}", f"--output-dir={root / 'sft'}", "--lr=1e-2", *common]
    )
    cli.main(["reward", f"--model={model}", f"--data={pairs}", f"--output-dir={root / 'rm'}", *common])
    s, r = ([m for m in read_metrics(root / d / "metrics.jsonl") if m["step"] > 0] for d in ("sft", "rm"))
    assert len(s) == len(r) == 6  # (step 0 is the evaluation before training)
    assert s[-1]["loss"] < s[0]["loss"]
    rm = root / "rm" / (root / "rm" / "latest").read_text().strip()
    policy = root / "sft" / (root / "sft" / "latest").read_text().strip()
    cli.main(
        [
            "eval",
            f"--model={policy}",
            f"--prompts={prompts}",
            f"--reward-model={rm}",
            "--max-new-tokens=4",
            "--device=cuda",
        ]
    )


def test_gradient_variance_on_cuda(setup):
    """The diagnostic that bench/compare.py reports, on parameters that live on the GPU."""
    root, model, prompts = setup
    cfg = TrainConfig(
        model=str(model),
        prompts=str(prompts),
        reward=["reinforce_lm.toy:letter_reward"],
        output_dir=str(root / "variance"),
        estimator="rloo",
        prompts_per_step=4,
        samples_per_prompt=4,
        max_new_tokens=8,
        progress=False,
        device="cuda",
    )
    r = gradient_variance(build_train_stage(cfg, setup_dist(cfg.device)), n_estimates=4)
    assert r["variance"] > 0 and r["relative_variance"] == r["relative_variance"]
