"""Atomic checkpoints and exact resume.

A checkpoint is `OUT/checkpoint-{step}/`: the model and tokenizer as a Hugging Face directory (so the
last complete one always loads with `from_pretrained`), extra trained models in sub-directories (the
PPO critic), and `trainer_state.pt` (optimisers, schedulers, RNG states, data position, baseline).
It is written to a temporary directory and renamed into place; `OUT/latest` names the newest one and
is itself replaced atomically. A crash or Ctrl-C mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import tempfile
from pathlib import Path

import torch

from reinforce_lm.errors import CheckpointError

STATE_FILE = "trainer_state.pt"
_NAME = re.compile(r"^checkpoint-(\d+)$")


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _write_text_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(
    output_dir: str | Path,
    step: int,
    models: dict[str, torch.nn.Module],
    tokenizer,
    state: dict,
    keep: int = 2,
) -> Path:
    """Write `models` ('policy' at the top level, others in sub-directories), tokenizer and state.

    Returns the final path. Only the calling process should write (rank 0).
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    final = out / f"checkpoint-{step}"
    tmp = Path(tempfile.mkdtemp(dir=out, prefix=f".tmp-checkpoint-{step}-"))
    try:
        for name, model in models.items():
            target = tmp if name == "policy" else tmp / name
            model.save_pretrained(target, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        torch.save({**state, "step": step}, tmp / STATE_FILE)
        if final.exists():  # the same step saved twice (e.g. Ctrl-C right after a save)
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _write_text_atomic(out / "latest", final.name)
    for old in list_checkpoints(out)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints in `output_dir`, oldest first."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out.iterdir() if (m := _NAME.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    out = Path(output_dir)
    pointer = out / "latest"
    if pointer.is_file():
        path = out / pointer.read_text().strip()
        if (path / STATE_FILE).is_file():
            return path
    done = [p for p in list_checkpoints(out) if (p / STATE_FILE).is_file()]
    return done[-1] if done else None


def load_state(path: str | Path) -> dict:
    """The trainer state saved beside a checkpoint's weights."""
    file = Path(path) / STATE_FILE
    if not file.is_file():
        raise CheckpointError(f"{path} is not a complete checkpoint: {STATE_FILE} is missing")
    try:
        return torch.load(file, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - re-raised with the file named
        raise CheckpointError(f"{file}: cannot read trainer state: {e}") from None
