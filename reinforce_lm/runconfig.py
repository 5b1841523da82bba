"""The options a run was started with: written to `run_config.json` when it starts, compared when it is
resumed, so that `--resume` refuses a run whose checkpoints would not fit (another command, algorithm,
LoRA rank, model or reference) instead of loading them wrongly or silently ignoring an option.
"""

from __future__ import annotations

import json
from pathlib import Path

from reinforce_lm import checkpoint
from reinforce_lm.errors import ConfigError

# What a run's checkpoints depend on: resuming with another value cannot load them (command, algorithm,
# LoRA rank), would train against another reference (model, ref_model), or would be silently ignored
# because the schedule resumes from the checkpoint (lr, critic_lr) or the adapter from its saved config
# (LoRA's alpha, dropout and target modules, compared only for a LoRA run).
_LORA = ("lora_alpha", "lora_dropout", "lora_target_modules")
_KIND = ("command", "algorithm", "lora_r", "model", "ref_model", "lr", "critic_lr", *_LORA)


_PATHS = ("model", "ref_model")
# Options a resumed run changes without a note: how long it runs, where and how often it saves, what it
# prints. Any other change is noted (`changed_options`): the run goes on with it, but is not the run that
# an uninterrupted one would have been (a new --dtype, --beta or sampling setting).
_FREE = ("output_dir", "resume", "steps", "save_every", "keep_checkpoints", "progress", "resolved")


def _resolved(options: dict) -> dict:
    """Model options that name a local directory, as absolute paths: `../m`, `m/` and `/abs/m` are one
    model, wherever the run is started or resumed from. Hub ids stay as given."""
    out = {}
    for k in _PATHS:
        v = options.get(k)
        if v and Path(str(v)).expanduser().exists():
            v = str(Path(str(v)).expanduser().resolve())
        out[k] = v
    return out


def _kind(options: dict) -> dict:
    kind = {k: options.get(k) or None for k in _KIND}
    if kind["command"]:
        kind["command"] = str(kind["command"]).removesuffix("Config").lower()  # TrainConfig: train
    return kind


def _same(key: str, was: dict, now: dict, saved: dict, cfg) -> bool:
    """Equal options; a model directory also when written differently (`../m`, `/abs/m`, `m/`, or the
    same words after the project moved)."""
    if was[key] == now[key]:
        return True
    if key not in _PATHS:
        return False
    then = saved.get("resolved") if isinstance(saved.get("resolved"), dict) else _resolved(saved)
    return bool(then.get(key)) and then.get(key) == _resolved(vars(cfg))[key]


def _shown(value):
    """An option as a user gives it: an empty one (no --ref-model) is none."""
    return "none" if value in (None, "") else value


def check_same_kind(cfg, out: Path) -> None:
    """A resumed run must be the same kind of run (command, algorithm, LoRA or not) as the one saved."""
    saved_file = out / "run_config.json"
    if not saved_file.is_file():
        return
    try:
        saved = json.loads(saved_file.read_text())
        if not isinstance(saved, dict):
            raise ValueError(f"a JSON {type(saved).__name__}, not an object")
    except (ValueError, OSError) as err:  # UnicodeDecodeError is a ValueError
        raise ConfigError(
            f"--resume: {saved_file} is unreadable ({err}); it records the options the run was started "
            "with, for this check: restore it, or delete it to resume without the check"
        ) from None
    now = _kind({**vars(cfg), "command": type(cfg).__name__})
    was = _kind(saved)
    diff = [
        f"{k}: {_shown(was[k] if k == 'command' else saved[k])} there, "
        f"{_shown(now[k] if k == 'command' else getattr(cfg, k, None))} now"
        for k in _KIND
        if k in saved and not _same(k, was, now, saved, cfg) and (k not in _LORA or was["lora_r"])
    ]
    if diff:
        raise ConfigError(
            f"--resume: {out} was started with other options ({'; '.join(diff)}); resume it with the "
            "options it was started with, or choose another --output-dir"
        )


def changed_options(cfg, out: Path) -> list[str]:
    """'key: value there, value now' for each option, other than the run's kind (`check_same_kind`) and
    `_FREE`, that differs from the one `run_config.json` in `out` records (empty if there is none)."""
    try:
        saved = json.loads((out / "run_config.json").read_text())
    except (OSError, ValueError):
        return []
    if not isinstance(saved, dict):
        return []
    now = json.loads(json.dumps(vars(cfg), default=str))  # as it was written: tuples as lists, paths as str

    def norm(v):
        if isinstance(v, str) and v and Path(v).expanduser().exists():  # `data/p.jsonl` or `/abs/data/...`
            return str(Path(v).expanduser().resolve())
        return v

    return [
        f"{k}: {saved[k]} there, {v} now"
        for k, v in now.items()
        if k in saved and k not in _FREE and k not in _KIND and norm(saved[k]) != norm(v)
    ]


def write_run_config(cfg, d, resumed: bool = False) -> None:
    """The options a run was started with, as `run_config.json` (not `config.json`: the output directory
    must not look like a model directory, so that `--model OUT` resolves to its latest checkpoint). A
    resumed run keeps that record, and notes the options it changes."""
    if not d.is_main:
        return
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if resumed and (out / "run_config.json").is_file():
        if changed := changed_options(cfg, out):
            print(f"note: --resume with options the run was not started with ({'; '.join(changed)}): it goes "
                  "on with the new values")  # fmt: skip
        return
    options = {**vars(cfg), "command": type(cfg).__name__, "resolved": _resolved(vars(cfg))}
    checkpoint.write_text_atomic(out / "run_config.json", json.dumps(options, indent=2, default=str))
