"""`reinforce-lm sft | reward | train | eval | demo`. Flags are generated from the config dataclasses."""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import importlib
import os
import sys
import warnings

from reinforce_lm.config import EvalConfig, TrainConfig
from reinforce_lm.errors import ReinforceLMError
from reinforce_lm.options import build_config, field_type, load_yaml

# name -> (config class, help, "module:function" that takes the config and returns an exit code)
COMMANDS: dict[str, tuple[type, str, str]] = {
    "train": (
        TrainConfig,
        "RL fine-tuning: REINFORCE estimators (--estimator) or PPO (--algorithm ppo).",
        "reinforce_lm.runner:run_train",
    ),
    "eval": (
        EvalConfig,
        "Mean reward of a model's completions on a prompts file, with samples.",
        "reinforce_lm.runner:run_eval",
    ),
}


def register(name: str, cls: type, help: str, run: str) -> None:
    """Stages add their sub-command here (SFT, reward model): `run` is "module:function"."""
    COMMANDS[name] = (cls, help, run)


def add_config_flags(parser: argparse.ArgumentParser, cls) -> None:
    parser.add_argument("--config", help="YAML file of keys; flags given here override it.")
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        t = field_type(cls, f)
        help_text = f.metadata.get("help", "")
        if f.metadata.get("required"):
            help_text += " (required)"
        elif f.default is not dataclasses.MISSING and f.default != "":
            help_text += f" [default: {f.default}]"
        if f.name in getattr(cls, "hidden_flags", ()):
            help_text = argparse.SUPPRESS
        kw = dict(dest=f.name, help=help_text, default=argparse.SUPPRESS)
        if t is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif t is list:
            parser.add_argument(flag, action="extend", nargs="+", **kw)
        else:
            parser.add_argument(flag, metavar=t.__name__.upper(), **kw)


def parse_config(cls, args: argparse.Namespace):
    values, at = {}, {}
    where = "command line"
    if getattr(args, "config", None):
        data = load_yaml(args.config)
        values.update(data)
        at = {k: f"{args.config}:{n}" for k, n in data.lines.items()}
        where = f"{args.config} / command line"
    flags = {k: v for k, v in vars(args).items() if k not in ("config", "command")}
    values.update(flags)
    at = {k: v for k, v in at.items() if k not in flags}  # a flag's value is the command line's
    return build_config(cls, values, where, at)


def build_parser() -> argparse.ArgumentParser:
    from reinforce_lm import __version__

    parser = argparse.ArgumentParser(
        prog="reinforce-lm",
        description="REINFORCE-family RL fine-tuning of Hugging Face causal LMs (SFT, reward models, "
        "RLOO/GRPO/ReMax/REINFORCE++, PPO). Runs unchanged under torchrun.",
    )
    parser.add_argument("--version", action="version", version=f"reinforce-lm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    parser.commands = {}  # name -> its sub-parser, to name an unknown flag's nearest one (`_parse`)
    for name, (cls, help, _) in COMMANDS.items():
        parser.commands[name] = sub.add_parser(name, help=help, description=help)
        add_config_flags(parser.commands[name], cls)
    about = "Train a tiny local model on a built-in task and show reward rising."
    demo = sub.add_parser(
        "demo", help=about, description=about + " SFT, reward model, then RLOO; no download."
    )
    demo.add_argument("--output-dir", default=None, help="Keep the demo's files here (default: a temp dir).")
    demo.add_argument("--steps", type=int, default=None, help="RL steps (default: the demo's own).")
    demo.add_argument(
        "--seed", type=int, default=0, help="Seed of the data, the model and the runs (default 0)."
    )
    parser.commands["demo"] = demo
    return parser


def _parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """`parser.parse_args`, but an unknown flag is reported by its command with the nearest known flag
    (`--estimater` -> `--estimator`), as an unknown YAML key is."""
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        command = getattr(parser, "commands", {}).get(args.command, parser)
        flags = [f for a in command._actions for f in a.option_strings if f.startswith("--")]
        others = {
            name: {f for a in sub._actions for f in a.option_strings}
            for name, sub in getattr(parser, "commands", {}).items()
            if name != args.command
        }
        hints = []
        for u in unknown:
            flag = u.split("=", 1)[0]
            if owners := [name for name, fl in others.items() if flag in fl]:  # e.g. eval --no-progress
                hints.append(f"{flag} is an option of {', '.join(owners)}, not of {args.command}")
            elif flag.startswith("--") and (near := difflib.get_close_matches(flag, flags, n=1)):
                hints.append(f"did you mean {near[0]} for {flag}?")
        command.error(
            f"unrecognized arguments: {' '.join(unknown)}" + (f" ({'; '.join(hints)})" if hints else "")
        )
    return args


_shown: set[str] = set()


def _format_warning(message, category, filename, lineno, line=None) -> str:
    """A warning as one line for a person at a terminal, not the library's file, line and source; once
    (a config checked where it is read and again where a stage settles its defaults warns twice)."""
    text = f"warning: {message}\n"
    if text in _shown:
        return ""
    _shown.add(text)
    return text


def main(argv: list[str] | None = None) -> None:
    _shown.clear()
    formatwarning, warnings.formatwarning = warnings.formatwarning, _format_warning
    try:
        _main(argv)
    finally:
        warnings.formatwarning = formatwarning


def _main(argv: list[str] | None) -> None:
    try:
        _load_stage_commands()  # imports torch and transformers: the first seconds of every command
    except KeyboardInterrupt:
        print("reinforce-lm: interrupted", file=sys.stderr)
        sys.exit(130)
    args = _parse(build_parser(), argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        _quiet_transformers()  # imports transformers: a Ctrl-C may land here too
        if args.command == "demo":
            from reinforce_lm.demo import run_demo

            run_demo(output_dir=args.output_dir, steps=args.steps, seed=args.seed)
            return
        cls, _, run = COMMANDS[args.command]
        cfg = parse_config(cls, args)
        module, func = run.split(":")
        code = getattr(importlib.import_module(module), func)(cfg)
    except ReinforceLMError as e:
        if e.rank is not None:  # found in training by this process, maybe by this one alone
            print(f"reinforce-lm {args.command}: error on rank {e.rank}: {e}", file=sys.stderr)
        elif os.environ.get("RANK", "0") == "0":  # found before training, by every rank: say it once
            print(f"reinforce-lm {args.command}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # Ctrl-C before training started (imports, loading): nothing to save
        print(f"reinforce-lm {args.command}: interrupted", file=sys.stderr)
        sys.exit(130)
    if code:
        sys.exit(code)


def _load_stage_commands() -> None:
    """Import stages that register extra sub-commands (kept optional so a broken stage is loud)."""
    for module in ("reinforce_lm.stages.sft", "reinforce_lm.stages.reward_model"):
        try:
            __import__(module)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise


def _quiet_transformers() -> None:
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:  # noqa: BLE001 - cosmetics only
        pass
