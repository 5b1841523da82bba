"""Metrics: one JSON object per step in `OUT/metrics.jsonl`, and a progress bar. Rank 0 only."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from reinforce_lm.checkpoint import write_text_atomic


class MetricsLogger:
    def __init__(
        self, output_dir: str | Path, total_steps: int, start_step: int = 0, enabled=True, progress=True
    ):
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self.bar = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():  # on resume, drop lines past the checkpoint we continue from, and any
            # line cut short (a process killed mid-write), which would break every reader of the file
            lines = self.path.read_text(errors="replace").splitlines()
            keep = [line for line in lines if (n := _step_of(line)) is not None and n <= start_step]
            write_text_atomic(self.path, "".join(line + "\n" for line in keep))
        self.file = self.path.open("a")
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True)
        self.t0 = time.perf_counter()

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            shown = {}
            for key in ("reward_mean", "loss", "kl", "eval_loss", "accuracy"):
                if key in row and row[key] is not None:
                    shown[key.replace("_mean", "")] = f"{row[key]:.3g}"
            if "tokens_per_second" in row:
                shown["tok/s"] = f"{row['tokens_per_second']:.0f}"
            self.bar.set_postfix(shown, refresh=False)

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.bar is not None:
                self.bar.close()


def _clean(v):
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _step_of(line: str) -> int | None:
    """The step of a metrics line; None for a line that is not a JSON object."""
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, AttributeError, TypeError):
        return None


def read_metrics(path: str | Path) -> list[dict]:
    """All rows of a metrics.jsonl file."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
