"""Many processes compute what one process computes: torchrun (Gloo, CPU) against a single process.

Sampling is seeded per prompt, so a whole run is reproducible across world sizes: the same rollouts,
the same global statistics (GRPO groups, REINFORCE++ whitening, token-mean counts), the same update.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from reinforce_lm import cli, distributed, logprobs, toy
from reinforce_lm.files import write_jsonl
from reinforce_lm.metrics import read_metrics
from reinforce_lm.models import load_tokenizer
from reinforce_lm.rollout import Sampler, row_seeds

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed missing")
# float32 sums in another order, after Adam: m / sqrt(v) turns float-level gradient differences of
# elements with near-zero gradients into larger ones. Measured 4e-7 to 4e-5 (depending on the samples)
# on parameters that each step moves by up to lr = 1e-2; the rewards and token counts match exactly.
TOL = 1e-4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny Llama and prompts of different lengths (left padding and position ids matter)."""
    root = tmp_path_factory.mktemp("dist")
    model = toy.save_tiny_model(root / "tiny", arch="llama")
    rng = random.Random(0)
    rows = toy.letter_prompts(16, seed=1)
    for r in rows:
        r["prompt"] = "1+" * rng.randint(0, 4) + r["prompt"]
    prompts = root / "prompts.jsonl"
    write_jsonl(prompts, rows)
    return root, model, prompts


def args(model, prompts, out, estimator, steps, *extra) -> list[str]:
    return [
        "train",
        f"--model={model}",
        f"--prompts={prompts}",
        "--reward=reinforce_lm.toy:letter_reward",
        f"--output-dir={out}",
        f"--estimator={estimator}",
        f"--steps={steps}",
        "--prompts-per-step=4",
        "--samples-per-prompt=4",
        "--max-new-tokens=8",
        "--micro-batch-size=4",  # two micro-batches per rank: gradient accumulation and no_sync
        "--lr=1e-2",
        "--save-every=2",
        "--no-progress",
        *extra,
    ]


def one_process(argv: list[str]) -> None:
    env = {k: os.environ.pop(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK") if k in os.environ}
    try:
        cli.main(argv)
    finally:
        os.environ.update(env)


def two_processes(argv: list[str], entry: tuple[str, ...] = ("-m", "reinforce_lm")) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    p = subprocess.run([*cmd, *entry, *argv], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p.stdout


def max_diff(a: Path, b: Path) -> float:
    x, y = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert x.keys() == y.keys()
    return max((x[k] - y[k]).abs().max().item() for k in x)


@pytest.mark.parametrize(
    "estimator,extra",
    [("grpo", ["--fsdp"]), ("reinforce_pp", ["--gradient-checkpointing"])],
    ids=["grpo-fsdp", "reinforce_pp-ddp"],
)
def test_two_processes_equal_one_and_resume_on_one(setup, estimator, extra):
    """FSDP with held-out prompts too: the step-0 evaluation ran before the optimiser was built and left
    the root's parameters gathered, so AdamW held the gathered tensors (another update from step 1),
    and the last one left them gathered for the final save (a KeyError: no checkpoint at all)."""
    root, model, prompts = setup
    one, two = root / f"one-{estimator}", root / f"two-{estimator}"
    if "--fsdp" in extra:
        evals = [f"--eval-prompts={prompts}", "--eval-every=2"]
        extra = [*extra, *evals]
        one_process(args(model, prompts, one, estimator, 3, *evals))
    else:
        one_process(args(model, prompts, one, estimator, 3))
    printed = two_processes(args(model, prompts, two, estimator, 2, *extra))
    n = sum(t.numel() for t in load_file(model / "model.safetensors").values())
    assert f"policy {n / 1e6:.3g}M parameters" in printed  # counted once, sharded or not

    # the whole run (sampling included) equals the 1-process run
    d2 = max_diff(one / "checkpoint-2", two / "checkpoint-2")
    assert d2 < TOL
    assert max_diff(one / "checkpoint-2", model) > 1e-3  # and it did train
    # rank 0 wrote the checkpoint and the metrics once, reduced over both ranks
    m1, m2 = read_metrics(one / "metrics.jsonl"), read_metrics(two / "metrics.jsonl")
    m1, m2, e1, e2 = *(train_rows(m) for m in (m1, m2)), *(eval_rows(m) for m in (m1, m2))
    assert [r["step"] for r in m2] == [1, 2]
    for a, b in zip(m1[:2], m2, strict=True):
        assert a["reward_mean"] == pytest.approx(b["reward_mean"], abs=1e-6)
        assert a["completion_tokens"] == b["completion_tokens"]
    for a, b in zip(e1[:2], e2, strict=True):  # steps 0 and 2 (the one-process run goes on to 3)
        assert a["eval_reward_mean"] == pytest.approx(b["eval_reward_mean"], abs=1e-6)

    # resumed with ONE process (optimiser state saved by name, unsharded), it ends where 1 process does
    one_process(args(model, prompts, two, estimator, 3, "--resume"))
    d3 = max_diff(one / "checkpoint-3", two / "checkpoint-3")
    print(f"{estimator} {extra}: max |2-proc - 1-proc| after 2 steps {d2:.2e}, resumed to 3 {d3:.2e}")
    assert d3 < TOL
    assert [r["step"] for r in train_rows(read_metrics(two / "metrics.jsonl"))] == [1, 2, 3]


def test_eval_under_torchrun_prints_what_one_process_prints(setup, capsys):
    """The mean was reduced, but the sample rows shown were rank 0's share (every other prompt)."""
    root, model, prompts = setup
    argv = ["eval", f"--model={model}", f"--prompts={prompts}", "--reward=reinforce_lm.toy:letter_reward"]
    argv += ["--max-new-tokens=4", "--show=5"]
    one_process(argv)
    alone = capsys.readouterr().out
    assert alone.count("\n  [") == 5
    assert two_processes(argv) == alone


def train_rows(rows: list[dict]) -> list[dict]:
    return [r for r in rows if "reward_mean" in r]


def eval_rows(rows: list[dict]) -> list[dict]:
    return [r for r in rows if "eval_reward_mean" in r]


def test_chunked_head_under_ddp_equals_one_process(setup, tmp_path, monkeypatch):
    """The LM head run in chunks inside the forward (logprobs.head_logprobs, `_HeadLogp`), with the KL in
    the loss: DDP reduces the head's gradient once, and two processes take the step that one does.

    One step: the chunked head sums in another order than the one-piece head, and from the second step
    on Adam and the sampler turn such float-level differences into ~1e-3 (measured with and without DDP).
    """
    root, model, prompts = setup
    chunk = 100  # logits per chunk: 2 tokens of the toy vocabulary, many chunks per micro-batch
    launcher = tmp_path / "chunked.py"
    launcher.write_text(
        "import sys\nfrom reinforce_lm import cli, logprobs\n"
        f"logprobs.CHUNK_ELEMENTS = {chunk}\nsys.exit(cli.main(sys.argv[1:]))\n"
    )
    calls = []
    real = logprobs._HeadLogp._logits
    monkeypatch.setattr(logprobs, "CHUNK_ELEMENTS", chunk)
    monkeypatch.setattr(logprobs._HeadLogp, "_logits", lambda *a: calls.append(1) or real(*a))
    one, two = tmp_path / "one", tmp_path / "two"
    one_process(args(model, prompts, one, "grpo", 1, "--beta=0.05"))
    assert len(calls) > 10  # the policy's head ran in chunks, recomputed in backward (4 micro-batches)
    two_processes(args(model, prompts, two, "grpo", 1, "--beta=0.05"), entry=(str(launcher),))
    assert max_diff(one / "checkpoint-1", two / "checkpoint-1") < TOL
    assert max_diff(one / "checkpoint-1", model) > 1e-3
    (a,), (b,) = read_metrics(one / "metrics.jsonl"), read_metrics(two / "metrics.jsonl")
    assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)


def test_mixed_precision_and_gradient_checkpointing_train(setup):
    root, model, prompts = setup
    out = root / "bf16"
    one_process(args(model, prompts, out, "rloo", 2, "--mixed-precision=bf16", "--gradient-checkpointing"))
    rows = read_metrics(out / "metrics.jsonl")
    assert all(r["loss"] is not None and r["grad_norm"] > 0 for r in rows)
    weights = load_file(out / "checkpoint-2" / "model.safetensors")
    assert all(w.dtype == torch.float32 for w in weights.values())  # fp32 master weights
    assert max_diff(out / "checkpoint-2", model) > 1e-3


def test_sync_stop_keeps_decoding_until_every_rank_is_done(setup):
    """Under FSDP a rank whose sequences all ended keeps stepping (its tokens masked) while others go on."""
    _, model_dir, _ = setup
    from reinforce_lm.models import load_causal_lm

    tok, model = load_tokenizer(str(model_dir)), load_causal_lm(str(model_dir))
    sampler = Sampler(tok, max_new_tokens=6)
    sampler.eos_ids = lambda m: list(range(len(tok)))  # every token ends the sequence: done at t=0
    prompts, ids = ["a?", "1+b?"], torch.tensor([0, 1])
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    alone = sampler.sample(model, prompts, ids, 2, row_seeds(0, 0, ids, 2))
    assert len(calls) == 1  # the prefill only
    sampler.sync_stop = lambda local_done: False  # another rank is still decoding
    synced = sampler.sample(model, prompts, ids, 2, row_seeds(0, 0, ids, 2))
    assert len(calls) == 1 + 6  # prefill + max_new_tokens steps, in lockstep with the other rank
    assert torch.equal(alone.response_ids, synced.response_ids)  # padding columns are trimmed
    assert torch.equal(alone.response_mask, synced.response_mask)
    assert distributed.Dist().all_true(True) and not distributed.Dist().all_true(False)


def test_optimizer_state_is_saved_by_name_and_loads_into_a_fresh_optimizer():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    model[0].requires_grad_(False)  # frozen parameters are skipped (LoRA bases)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(torch.randn(5, 3)).square().sum().backward()
    opt.step()
    state = distributed.optimizer_state(model, opt)
    assert set(state["state"]) == {"1.weight", "1.bias"}
    fresh = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.5)
    distributed.load_optimizer_state(model, fresh, state)
    for a, b in zip(opt.state_dict()["state"].values(), fresh.state_dict()["state"].values(), strict=True):
        assert torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
    assert fresh.param_groups[0]["lr"] == 0.1


def test_rank_chunks_give_every_rank_the_same_number_of_calls():
    from reinforce_lm.distributed import Dist, rank_chunks

    items = list(range(7))
    per_rank = [rank_chunks(items, Dist(rank=r, world_size=3), 2) for r in range(3)]
    assert [len(c) for c in per_rank] == [2, 2, 2]  # ceil(ceil(7 / 3) / 2)
    counted = sorted(i for chunks in per_rank for chunk, w in chunks if w for i in chunk)
    assert counted == items  # every item once, stand-ins (weight 0) not counted
    assert rank_chunks([5], Dist(rank=1, world_size=2), 4) == [([5], 0.0)]  # a rank with nothing


RANK_ONE_REWARDS = """
import os, signal
from reinforce_lm.toy import letter_reward

calls = []

def fails_on_rank_1(prompts, completions, **kw):
    if os.environ["RANK"] == "1":
        raise ValueError("rank 1's reward service is down")
    return letter_reward(prompts, completions, **kw)

def overflows_in_step_2(prompts, completions, **kw):  # on every rank: a non-finite gradient norm
    calls.append(1)
    if len(calls) == 2:
        return [3e38 if i % 2 else -3e38 for i in range(len(completions))]
    return letter_reward(prompts, completions, **kw)

def ctrl_c_on_rank_1(prompts, completions, **kw):
    calls.append(1)
    if os.environ["RANK"] == "1" and len(calls) == 2:  # during step 2, this process only
        os.kill(os.getpid(), signal.SIGINT)
    return letter_reward(prompts, completions, **kw)
"""


def test_what_one_rank_alone_meets_stops_every_rank(setup, tmp_path):
    """An error that only rank 1 meets is printed (by rank 1), and a Ctrl-C that reaches rank 1 only
    stops both ranks after the same step, with a checkpoint, instead of leaving rank 0 waiting."""
    root, model, prompts = setup
    rewards = tmp_path / "rank_rewards.py"
    rewards.write_text(RANK_ONE_REWARDS)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}

    def run(reward: str, out: Path, estimator: str = "grpo") -> subprocess.CompletedProcess:
        argv = args(model, prompts, out, estimator, 4, f"--reward={rewards}:{reward}")
        argv = [a for a in argv if not a.startswith("--reward=reinforce_lm")]
        return subprocess.run(
            [*cmd, "reinforce_lm", *argv], env=env, capture_output=True, text=True, timeout=300
        )

    p = run("fails_on_rank_1", tmp_path / "err")
    assert p.returncode != 0
    assert "error on rank 1" in p.stderr and "rank 1's reward service is down" in p.stderr, p.stderr[-3000:]

    # every rank meets a non-finite gradient norm in step 2: together they save the state after step 1
    p = run("overflows_in_step_2", tmp_path / "nan", estimator="none")
    assert p.returncode != 0 and "the state after step 1 is saved" in p.stderr, p.stderr[-3000:]
    assert p.stderr.count("this update was not applied") == 1  # every rank meets it: rank 0 says it
    assert (tmp_path / "nan" / "checkpoint-1" / "model.safetensors").exists()

    p = run("ctrl_c_on_rank_1", tmp_path / "int")
    assert [r["step"] for r in read_metrics(tmp_path / "int" / "metrics.jsonl")] == [1, 2], p.stderr[-3000:]
    assert (tmp_path / "int" / "checkpoint-2" / "model.safetensors").exists()
