"""The two trainers of `bench/vs_trl.py`, each run in its own process on one job: reinforce-lm's
`run_train` and TRL's GRPOTrainer/RLOOTrainer on the same model, prompts and settings. `worker` prints
one JSON line (RESULT ...) with the step ends, tokens, CPU times and peak memory that `vs_trl.py`
turns into its tables."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import common

HERE = Path(__file__).resolve().parent


def _meters(job: dict):
    """(peak MiB so far, MiB now): the process's RSS on CPU, the CUDA caching allocator's tensors on GPU."""
    if job["device"] == "cpu":
        return common.peak_rss_mib, common.current_rss_mib
    import torch

    return (lambda: torch.cuda.max_memory_allocated() / 2**20), (
        lambda: torch.cuda.memory_allocated() / 2**20
    )


def _sync(job: dict) -> None:
    if job["device"] != "cpu":
        import torch

        torch.cuda.synchronize()


def work_reinforce_lm(job: dict, out_dir: str) -> dict:
    import torch

    from reinforce_lm import trainer as trainer_mod
    from reinforce_lm.config import TrainConfig, build_config
    from reinforce_lm.runner import run_train
    from reinforce_lm.stages import reinforce as stage_mod

    ends, cpu, peak, logs, rss0 = [], [], [], [], []
    peak_mib, now_mib = _meters(job)

    class TimedLogger(trainer_mod.MetricsLogger):
        def log(self, step, metrics):
            _sync(job)
            ends.append(time.perf_counter())
            cpu.append(time.process_time())
            if cuda:
                peaks["update"] = max(peaks["update"], peak_mib())
                peak.append(max(peaks.values()))
            else:
                peak.append(peak_mib())
            logs.append(dict(metrics))
            super().log(step, metrics)

    collect = stage_mod.ReinforceStage.collect
    cuda = job["device"] != "cpu"
    peaks = {"load": 0.0, "collect": 0.0, "update": 0.0}  # GPU: the peak of each phase, MiB

    def timed_collect(self, step):
        if not rss0:
            rss0.append(now_mib())
            peaks["load"] = peak_mib()
        if not cuda:
            return collect(self, step)
        torch.cuda.reset_peak_memory_stats()  # then collect's peak (sampling, rewards, reference) alone
        out = collect(self, step)
        peaks["collect"] = max(peaks["collect"], peak_mib())
        torch.cuda.reset_peak_memory_stats()
        return out

    trainer_mod.MetricsLogger = TimedLogger
    stage_mod.ReinforceStage.collect = timed_collect
    if job.get("chunk_elements"):
        from reinforce_lm import logprobs

        logprobs.CHUNK_ELEMENTS = job["chunk_elements"]
    cfg = build_config(
        TrainConfig,
        dict(
            model=job["model_dir"],
            prompts=str(Path(job["model_dir"]) / "prompts.jsonl"),
            reward=[f"{HERE / 'common.py'}:reward"],
            output_dir=out_dir,
            steps=job["steps"],
            lr=job["lr"],
            estimator=job["estimator"],
            samples_per_prompt=job["k"],
            prompts_per_step=job["p"],
            max_new_tokens=job["t"],
            micro_batch_size=job["micro"],
            beta=job["beta"],
            kl_in="reward" if job["estimator"] == "rloo" else "loss",
            kl_estimator="k1" if job["estimator"] == "rloo" else "k3",
            max_grad_norm=1.0,
            dtype="float32",
            mixed_precision=job["precision"] if job["precision"] == "bf16" else "no",
            device=job["device"],
            progress=False,
            seed=0,
            gradient_checkpointing=job["checkpointing"] == "both",
        ),
    )
    run_train(cfg)
    phases = ("generate_seconds", "score_seconds", "reference_seconds", "backward_seconds", "step_seconds")
    return {
        "ends": ends,
        "cpu": cpu,
        "peak_train": peak[-1],  # peak RSS up to the end of the last step (before any final save)
        "phases": {k: [m.get(k) for m in logs] for k in phases},
        "tokens": [m["completion_tokens"] for m in logs],
        "rss_start": rss0[0],
        "threads": torch.get_num_threads(),
        "phase_peaks": peaks if cuda else None,
    }


def work_trl(job: dict, out_dir: str) -> dict:
    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback

    ends, cpu, peak, logs, rss0 = [], [], [], [], []
    peak_mib, now_mib = _meters(job)

    class Timer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            rss0.append(now_mib())

        def on_step_end(self, args, state, control, **kw):
            _sync(job)
            ends.append(time.perf_counter())
            cpu.append(time.process_time())
            peak.append(peak_mib())

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "completions/mean_length" in logs:
                logs_.append(dict(logs))

    logs_ = logs
    B = job["p"] * job["k"]
    Config, Trainer = {
        "grpo": (trl.GRPOConfig, trl.GRPOTrainer),
        "rloo": (trl.RLOOConfig, trl.RLOOTrainer),
    }[job["estimator"]]
    args = Config(
        output_dir=out_dir,
        per_device_train_batch_size=job["micro"],
        gradient_accumulation_steps=B // job["micro"],  # one generation of B per optimiser step
        num_generations=job["k"],
        max_completion_length=job["t"],
        learning_rate=job["lr"],
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        beta=job["beta"],
        temperature=1.0,
        max_steps=job["steps"],
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=job["device"] == "cpu",
        bf16=job["precision"] == "bf16",
        fp16=False,
        disable_dropout=True,
        # TRL's default is to recompute activations in backward; `--checkpointing neither` turns it off
        gradient_checkpointing=job["checkpointing"] != "neither",
        dataloader_num_workers=0,
        seed=0,
    )
    tok = AutoTokenizer.from_pretrained(job["model_dir"], padding_side="left")
    prompts = common.load_prompts(Path(job["model_dir"]))
    trainer = Trainer(
        model=job["model_dir"],
        reward_funcs=common.reward,
        args=args,
        train_dataset=Dataset.from_dict({"prompt": prompts}),
        processing_class=tok,
        callbacks=[Timer()],
    )
    trainer.train()
    return {
        "ends": ends,
        "cpu": cpu,
        "peak_train": peak[-1],  # peak RSS up to the end of the last step (before any final save)
        "tokens": [lg["completions/mean_length"] * B for lg in logs],
        "rss_start": rss0[0],
        "threads": torch.get_num_threads(),
    }


def worker(job: dict) -> None:
    import torch

    torch.set_num_threads(job["threads"])
    with tempfile.TemporaryDirectory() as out:
        fn = work_reinforce_lm if job["impl"] == "reinforce-lm" else work_trl
        res = fn(job, out)
    w = job["warmup"]
    timed = res["ends"][w:]
    tokens = sum(res["tokens"][w + 1 :]) if len(timed) > 1 else float("nan")
    cpu = res["cpu"][w:]
    res.update(
        cpu_tokens_per_s=tokens / (cpu[-1] - cpu[0]) if len(cpu) > 1 else float("nan"),
        tokens_per_s=tokens / (timed[-1] - timed[0]) if len(timed) > 1 else float("nan"),
        step_s=(timed[-1] - timed[0]) / (len(timed) - 1) if len(timed) > 1 else float("nan"),
        mean_tokens_per_step=sum(res["tokens"]) / max(1, len(res["tokens"])),
        peak_rss=res["peak_train"],
        peak_rss_process=common.peak_rss_mib(),
    )
    print("RESULT " + json.dumps(res), flush=True)
