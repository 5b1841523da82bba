"""Rewards: one protocol, `fn(prompts, completions, **columns) -> list[float]`.

A reward is a function loaded from `path/to/file.py:func` or `package.module:func`, or a learned reward
model (`RewardModel`, in `learned_reward.py`: an `AutoModelForSequenceClassification` with one label
and its own tokenizer).
`RewardSet` calls several of them the way TRL does (`fn(prompts=..., completions=...,
completion_ids=..., **columns)`, so TRL users' reward functions work unchanged), checks every score,
and sums them with weights. Every error names the reward function and, where one is at fault, the sample.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import inspect
import numbers
import reprlib
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from .data import finite_float32
from .errors import RewardError
from .learned_reward import RewardModel


def load_reward_function(spec: str) -> Callable:
    """Load `path/to/file.py:func` (any file, loaded under a unique module name) or `package.module:func`."""
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr:
        raise RewardError(f"reward {spec!r}: expected FILE.py:FUNCTION or package.module:FUNCTION")
    is_file = target.endswith(".py") or "/" in target or "\\" in target
    if is_file:
        path = Path(target).expanduser()
        if not path.is_file():
            raise RewardError(f"reward {spec!r}: file {target} not found")
        digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:10]
        name = f"_reinforce_lm_reward_{path.stem}_{digest}"
        module_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module  # so dataclasses, pickling and relative lookups inside it work
        try:
            _exec_beside(module_spec, module, str(path.resolve().parent))
        except Exception as err:
            del sys.modules[name]
            raise RewardError(
                f"reward {spec!r}: loading {target} failed: {type(err).__name__}: {err}"
            ) from err
    else:
        try:
            module = _import_here_too(target)
        except Exception as err:
            raise RewardError(
                f"reward {spec!r}: importing {target} failed: {type(err).__name__}: {err}"
            ) from err
    fn = getattr(module, attr, None)
    if fn is None:
        own = [
            k
            for k, v in vars(module).items()
            if not k.startswith("_") and callable(v) and getattr(v, "__module__", None) == module.__name__
        ]
        own = own or [k for k, v in vars(module).items() if not k.startswith("_") and callable(v)]
        near = difflib.get_close_matches(attr, own, n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise RewardError(f"reward {spec!r}: {target} has no {attr!r}; its functions: {own}{hint}")
    if not callable(fn):
        raise RewardError(f"reward {spec!r}: {attr!r} is a {type(fn).__name__}, not a function")
    return fn


def _import_here_too(target: str):
    """Import `package.module`, also from the working directory: `python -m reinforce_lm` finds a
    `my_rewards.py` there, and the `reinforce-lm` script must too (its sys.path lacks the working
    directory). Appended, so that it never shadows an installed package."""
    try:
        return importlib.import_module(target)
    except ModuleNotFoundError as err:
        top, here = target.split(".")[0], str(Path.cwd())
        beside = Path(f"{top}.py").is_file() or Path(top, "__init__.py").is_file()
        if err.name != top or not beside or here in sys.path:
            raise
        sys.path.append(here)
        return importlib.import_module(target)


def _exec_beside(module_spec, module, folder: str) -> None:
    """Run a reward file as `python file.py` would, with its folder first on sys.path, so that it can
    `import helpers` from a file beside it. The folder then stays on sys.path, but last (where absent
    before): helpers imported lazily, inside the reward function, resolve at call time too, and a folder
    beside the reward file never shadows an installed package that is imported later (`datasets`, say)."""
    was_there = folder in sys.path
    sys.path.insert(0, folder)
    try:
        module_spec.loader.exec_module(module)
    finally:
        sys.path.remove(folder)  # the first occurrence: the one inserted above
        if not was_there:
            sys.path.append(folder)


def _fresh(value):
    """A copy of the lists and dicts in `value`, sharing what cannot change (str, numbers, ...).

    Every reward function gets its own: one that edits what it is given (appends the completion to a
    `messages` conversation to build a judge's prompt, strips completions in place) must not change
    what the next function, the other samples of a prompt, or the later steps' copies of that prompt see
    (the K samples of a prompt share its row of the prompts file)."""
    if isinstance(value, list):
        if all(isinstance(x, (str, int, float, bool)) or x is None for x in value):
            return list(value)
        return [_fresh(x) for x in value]
    if isinstance(value, dict):
        return {k: _fresh(v) for k, v in value.items()}
    return value


def _shorten(text, n: int = 60) -> str:
    text = repr(text)
    return text if len(text) <= n else text[: n - 3] + "..."


def _sample(i: int, sources) -> str:
    """Sample i as an error names it, with where its prompt came from when known: sample 3 (p.jsonl:17)."""
    return f"sample {i}" if sources is None else f"sample {i} ({sources[i]})"


def _where_raised(err: BaseException) -> str:
    frames = traceback.extract_tb(err.__traceback__)
    return f" (at {Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""


# What a reward function may raise to say that it failed: a sys.exit() in it (a script's habit) is its
# error, to be reported with the sample like any other, not the end of the run without a word or a save.
# KeyboardInterrupt still stops the run, as a Ctrl-C.
_FAILED = (Exception, SystemExit)


class RewardSet:
    """Rewards `(name, fn, weight)`; called, it returns the weighted sum [B] and each raw score [B]."""

    def __init__(self, functions: list[tuple[str, Callable, float]]):
        self.functions = list(functions)
        # Per function: None when it takes **kwargs (gets everything), else (names it accepts, requires).
        self._params = [self._signature(name, fn) for name, fn, _ in self.functions]

    @staticmethod
    def _signature(name: str, fn: Callable):
        try:
            signature = inspect.signature(fn)
        except (TypeError, ValueError):  # some builtins and C callables have no signature
            return None
        params = signature.parameters.values()
        if positional := [p.name for p in params if p.kind is p.POSITIONAL_ONLY and p.default is p.empty]:
            # Every argument is passed by keyword: such a call fails before the function runs.
            raise RewardError(
                f"reward {name!r}: its signature {signature} does not accept (prompts, completions, "
                f"**kwargs) as keywords, which is how reward functions are called; remove the '/' that "
                f"makes {positional} positional-only"
            )
        required = {
            p.name for p in params if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        }
        if any(p.kind is p.VAR_KEYWORD for p in params):
            return None, required  # takes every column; still needs its own named ones
        named = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        return named, required

    @property
    def names(self) -> list[str]:
        return [name for name, _, _ in self.functions]

    def check(self, column_names) -> None:
        """Raise now if a reward function requires an argument that no column will provide."""
        have = {"prompts", "completions", "completion_ids", *column_names}
        for (name, _, _), params in zip(self.functions, self._params, strict=True):
            if params is not None and (missing := sorted(params[1] - have)):
                raise RewardError(
                    f"reward {name!r} requires {missing}, which are not columns of the prompts file "
                    f"(it gets prompts, completions, completion_ids and the columns {sorted(column_names)})"
                )

    @staticmethod
    def _kwargs(params, everything: dict) -> dict:
        """Everything for a function with **kwargs, else only the keywords it names."""
        if params is None or params[0] is None:
            return everything
        return {k: v for k, v in everything.items() if k in params[0]}

    def __call__(self, prompts, completions, completion_ids=None, columns=None, sources=None):
        """Score B completions: (weighted sum [B] float32, {name: raw scores [B] float32}).

        `sources[i]`, where sample i's prompt came from ("prompts.jsonl:17"), is named in errors."""
        columns = dict(columns or {})
        n = len(completions)
        for key, values in columns.items():
            if len(values) != n:
                raise RewardError(f"column {key!r} has {len(values)} values for {n} completions")
        if sources is not None and len(sources) != n:
            raise RewardError(f"got {len(sources)} sources for {n} completions")
        self.check(columns)
        everything = {**columns, "prompts": list(prompts), "completions": list(completions)}
        everything["completion_ids"] = completion_ids  # a column cannot shadow these three
        total, raw = torch.zeros(n, dtype=torch.float32), {}
        for (name, fn, weight), params in zip(self.functions, self._params, strict=True):
            try:
                out = fn(**self._kwargs(params, _fresh(everything)))
            except _FAILED as err:
                raise self._blame(name, fn, params, everything, err, sources) from err
            raw[name] = self._validate(name, out, n, sources)  # [B]
            total += weight * raw[name]
        return total, raw

    def _blame(self, name: str, fn: Callable, params, everything: dict, err: BaseException, sources):
        """Bisect the batch for a sample that makes `fn` raise on its own, for an error that names it.
        Only a half that raises is searched further: at most 2*log2(B) more calls, not one per sample,
        as a reward may be a paid or rate-limited judge."""

        def error_on(lo: int, hi: int) -> BaseException | None:
            part = _fresh({k: (None if v is None else v[lo:hi]) for k, v in everything.items()})
            try:
                fn(**self._kwargs(params, part))
            except _FAILED as part_err:
                return part_err
            return None

        n = len(everything["completions"])
        lo, hi, also = 0, n, None
        while hi - lo > 1:
            mid = (lo + hi) // 2
            left = error_on(lo, mid)
            if left is not None and hi - lo == n:  # the other half too? then it may be no one sample's
                also = error_on(mid, hi)
            if left is not None:
                hi, err = mid, left
            elif (right := error_on(mid, hi)) is not None:
                lo, err = mid, right
            else:
                break  # samples lo..hi-1 raise together, neither half alone
        more = (
            ""
            if also is None
            else f" (the other half of the batch raised too: {type(also).__name__}: {_shorten(str(also))}; "
            "a reward that fails on every call, such as a judge that is down, looks like this)"
        )
        if hi - lo == 1:
            source = "" if sources is None else f"{sources[lo]}, "
            return RewardError(
                f"reward {name!r} raised on sample {lo} ({source}"
                f"prompt {_shorten(everything['prompts'][lo])}, "
                f"completion {_shorten(everything['completions'][lo])}): "
                f"{type(err).__name__}: {err}{_where_raised(err)}{more}"
            )
        return RewardError(
            f"reward {name!r} raised on the batch of {n}, but no single sample could be blamed "
            f"(samples {lo}..{hi - 1} raise together, but no half of them alone): "
            f"{type(err).__name__}: {err}{_where_raised(err)}{more}"
        )

    @staticmethod
    def _validate(name: str, out, n: int, sources=None) -> torch.Tensor:
        """Check a reward function's output: n finite numbers (int, float, bool, numpy/torch scalars)."""
        if isinstance(out, torch.Tensor) or hasattr(out, "__array__"):
            out = out.tolist() if getattr(out, "ndim", 1) == 1 else out
        if isinstance(out, (str, bytes)) or not isinstance(out, Sequence):
            raise RewardError(
                f"reward {name!r} must return a list of {n} floats, got {type(out).__name__}: {_shorten(out)}"
            )
        if len(out) != n:
            raise RewardError(
                f"reward {name!r} returned {len(out)} scores for {n} completions (expected {n})"
            )
        scores = []
        for i, value in enumerate(out):
            if isinstance(value, torch.Tensor) and value.numel() == 1 or getattr(value, "ndim", None) == 0:
                value = value.item()
            if not isinstance(value, numbers.Real):
                raise RewardError(
                    f"reward {name!r} returned a non-number for {_sample(i, sources)}: {_shorten(value)}"
                )
            score = finite_float32(value)
            if score is None:
                shown = reprlib.repr(value) if isinstance(value, int) else value  # 10**400: 401 digits
                raise RewardError(
                    f"reward {name!r} returned {shown} for {_sample(i, sources)}; scores must be finite "
                    "float32 numbers"
                )
            scores.append(score)
        return torch.tensor(scores, dtype=torch.float32)


def as_list(value) -> list:
    """One reward (a string, a path or a callable) where a list is expected is a list of one: a string
    must not become one reward per character."""
    if value is None:
        return []
    if isinstance(value, (str, Path)) or callable(value):
        return [value]
    return list(value)


def _function(spec) -> tuple[str, Callable]:
    """(name, function) from a `file.py:func` / `module:func` string or a callable (named by __name__)."""
    if isinstance(spec, str):
        return spec.rpartition(":")[2], load_reward_function(spec)
    if callable(spec):
        return getattr(spec, "__name__", None) or type(spec).__name__, spec
    raise RewardError(
        f"reward {spec!r}: expected FILE.py:FUNCTION, module:FUNCTION or a callable, "
        f"got {type(spec).__name__}"
    )


def build_rewards(
    reward_specs,
    reward_model_paths,
    weights: list[float] | None = None,
    device="cpu",
    messages_column: str = "messages",
) -> RewardSet:
    """Reward functions (`file.py:func` / `module:func` strings or callables), then reward models (paths),
    with one weight each (1.0 by default). A single string or callable stands for a list of one."""
    reward_specs, reward_model_paths = as_list(reward_specs), as_list(reward_model_paths)
    n = len(reward_specs) + len(reward_model_paths)
    if n == 0:
        raise RewardError("no reward given: pass --reward FILE.py:FUNCTION and/or --reward-model DIR")
    weights = [1.0] * n if weights is None else [float(w) for w in weights]
    if len(weights) != n:
        raise RewardError(
            f"got {len(weights)} reward weights for {n} rewards ({len(reward_specs)} functions "
            f"{reward_specs} then {len(reward_model_paths)} reward models {reward_model_paths})"
        )
    fns = [_function(spec) for spec in reward_specs]
    models = (RewardModel(p, device=device, messages_key=messages_column) for p in reward_model_paths)
    fns += [(m.name, m) for m in models]
    entries, seen = [], {}
    for (name, fn), weight in zip(fns, weights, strict=True):
        seen[name] = seen.get(name, 0) + 1
        entries.append((name if seen[name] == 1 else f"{name}_{seen[name]}", fn, weight))
    return RewardSet(entries)
