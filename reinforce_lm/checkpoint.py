"""Atomic checkpoints and exact resume.

A checkpoint is `OUT/checkpoint-{step}/`: the model and tokenizer as a Hugging Face directory (so the
last complete one always loads with `from_pretrained`), extra trained models in sub-directories (the
PPO critic), and `trainer_state.pt` (optimisers, schedulers, RNG states, data position, baseline).
It is written to a temporary directory and renamed into place; `OUT/latest` names the newest one and
is itself replaced atomically. A crash or Ctrl-C mid-write leaves the previous checkpoint intact.

A `checkpoint-N` without `trainer_state.pt` (written last) is incomplete: only outside damage makes one
(a partial copy or rsync). It is never resumed from, loaded by `--model OUT`, counted or deleted by the
rotation: it may be a copy still in progress, so removing it is left to its owner.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import sys
import tempfile
import time
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


def _umask() -> int:
    try:  # Linux says it without changing it (os.umask would, for every thread, for a moment)
        with open("/proc/self/status") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def _open_up(tmp: Path) -> None:
    """Give a temporary checkpoint the modes a plain `mkdir`/`open` would: `mkdtemp` makes it 0700 and
    transformers writes `model.safetensors` 0600, so teammates and inference servers on a shared file
    system could not read it. The rename keeps modes, so this happens before it."""
    mask = _umask()
    try:
        tmp.chmod(0o777 & ~mask)
        for root, dirs, files in os.walk(tmp):
            for name in dirs:
                os.chmod(os.path.join(root, name), 0o777 & ~mask)
            for name in files:
                os.chmod(os.path.join(root, name), 0o666 & ~mask)
    except OSError:  # a file system without modes (some network or FUSE mounts): the checkpoint matters more
        pass


def _fsync(path) -> None:
    """Flush a file or directory to disk; a file system that cannot (some network mounts) is let be."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _sync_tree(root: Path) -> None:
    for parent, _, files in os.walk(root):
        for name in files:
            _fsync(os.path.join(parent, name))
        _fsync(parent)


def write_text_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 would survive the rename
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync(path.parent)


AS_LOADED = "_reinforce_lm_as_loaded"  # tokenizer attribute: the settings `load_tokenizer` changed


def as_loaded(tokenizer):
    """`tokenizer` with the pad token and padding side it was loaded with (a copy, if they changed).

    Training pads on the left and borrows EOS as the pad token where there is none. Saved into the
    checkpoint, pad == EOS would make a later fine-tune that masks padding out of its labels mask every
    EOS too (its model would never learn to stop), so the saved tokenizer is the user's own.
    """
    loaded = getattr(tokenizer, AS_LOADED, None)
    if not loaded or all(getattr(tokenizer, k) == v for k, v in loaded.items()):
        return tokenizer
    import copy

    tok = copy.deepcopy(tokenizer)
    for key, value in loaded.items():
        setattr(tok, key, value)
    return tok


@contextlib.contextmanager
def quiet_hf_progress():
    """No transformers progress bars inside (then as before). transformers 5 draws a 'Writing model
    shards' bar in every `save_pretrained` (noise in a run's log at every checkpoint, printed after the
    run's own last line) and a 'Loading weights' one in every `from_pretrained`."""
    try:
        from transformers.utils import logging as hf_logging

        was = hf_logging.is_progress_bar_enabled()
    except (ImportError, AttributeError):
        yield
        return
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


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
        with quiet_hf_progress():
            for name, model in models.items():
                target = tmp if name == "policy" else tmp / name
                model.save_pretrained(target, safe_serialization=True)
        if tokenizer is not None:
            for where in [tmp] + [tmp / "adapter"] * ("adapter" in models):  # a LoRA adapter loads alone
                as_loaded(tokenizer).save_pretrained(where)
        torch.save({**state, "step": step}, tmp / STATE_FILE)
        _open_up(tmp)
        _sync_tree(tmp)  # on disk before the rename: after a power loss, `latest` never names a hole
        if final.exists():  # the same step saved twice (e.g. Ctrl-C right after a save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        write_text_atomic(out / "latest", final.name)
    except OSError as err:  # the checkpoint is complete: `latest_checkpoint` finds it without the pointer
        print(f"warning: could not update {out / 'latest'} ({err}); {final} is complete", file=sys.stderr)
    # Only complete checkpoints count, and the one just written always stays (even when an older run
    # left a higher step number behind), so an incomplete leftover can never cost a complete one.
    others = [p for p in list_checkpoints(out) if p != final]
    for old in others[: max(len(others) - (keep - 1), 0)]:
        shutil.rmtree(old, ignore_errors=True)
    # A save killed outright (SIGKILL, a lost node) leaves its temporary directory, a model and optimiser
    # state in size. One process saves at a time; an hour without a write tells a leftover from the save
    # of a process that is still finishing (a preempted pod while its replacement resumes).
    for stale in out.glob(".tmp-checkpoint-*"):
        if stale.is_dir() and time.time() - _last_write(stale) > STALE_SECONDS:
            shutil.rmtree(stale, ignore_errors=True)
    return final


STALE_SECONDS = 3600


def _last_write(path: Path) -> float:
    try:
        return max(p.stat().st_mtime for p in [path, *path.rglob("*")])
    except OSError:  # removed meanwhile
        return time.time()


def step_of(path: str | Path) -> int:
    """The step a `checkpoint-N` directory holds."""
    return int(_NAME.match(Path(path).name).group(1))


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints (those with `trainer_state.pt`) in `output_dir`, oldest first."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out.iterdir() if (m := _NAME.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found) if (p / STATE_FILE).is_file()]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The complete checkpoint `OUT/latest` names, else the newest complete one, else None. Resume and
    `--model OUT` both read this, so they always agree on which checkpoint a run stands for."""
    out = Path(output_dir)
    pointer = out / "latest"
    if pointer.is_file():
        path = out / pointer.read_text().strip()
        if (path / STATE_FILE).is_file():
            return path
    done = list_checkpoints(out)
    return done[-1] if done else None


def load_state(path: str | Path) -> dict:
    """The trainer state saved beside a checkpoint's weights."""
    file = Path(path) / STATE_FILE
    if not file.is_file():
        raise CheckpointError(f"{path} is not a complete checkpoint: {STATE_FILE} is missing")
    try:
        return torch.load(file, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - re-raised with the file named
        raise CheckpointError(f"{file}: cannot read trainer state: {e}{earlier_checkpoint(path)}") from None


def earlier_checkpoint(path: str | Path) -> str:
    """For a checkpoint that cannot be read, how to go on from the complete one before it in its run
    (empty if there is none, or `path` is not a run's checkpoint)."""
    path = Path(path)
    if not _NAME.match(path.name):
        return ""
    before = [p for p in list_checkpoints(path.parent) if p.name != path.name]
    if not before:
        return ""
    return (f". The run has an earlier checkpoint, {before[-1].name}: move {path.name} out of "
            f"{path.parent} to resume from that one")  # fmt: skip
