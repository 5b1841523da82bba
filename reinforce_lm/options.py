"""Config values from YAML files and flags: typed coercion (`--steps 3` is an int, `~/x` expanded, an
empty YAML value is the default) and unknown keys refused with the nearest valid name. defaults < YAML
< --flags; the checks of the values themselves are the config classes' (`config.py`).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import typing
from pathlib import Path
from typing import Any

from reinforce_lm.errors import ConfigError


@functools.cache
def _hints(cls) -> dict:
    return typing.get_type_hints(cls)  # evaluates every annotation of cls: once per class, not per field


def field_type(cls, f: dataclasses.Field) -> type:
    t = _hints(cls)[f.name]
    return list if typing.get_origin(t) is list or t is list else t


def _coerce(cls, f: dataclasses.Field, value: Any, where: str) -> Any:
    t = field_type(cls, f)
    try:
        if t is bool:
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if t is list:
            if value is None:  # `reward:` left empty in a YAML file
                return []
            items = value if isinstance(value, list | tuple) else [value]
            if f.name == "reward_weights":
                return [float(v) for v in items]
            return [_home(str(v)) for v in items]
        if t is str:
            if value is None:  # `model:` left empty in a YAML file: the default (model: required)
                if isinstance(f.default, str):
                    return f.default
                raise ValueError(value)
            if f.name == "lora_target_modules" and isinstance(value, list | tuple):  # [q_proj, v_proj]
                value = ",".join(map(str, value))
            if isinstance(value, list | tuple | dict):
                raise ValueError(value)
            return _home(str(value))
        if t is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        return t(value)
    except (TypeError, ValueError):
        want = "numbers" if f.name == "reward_weights" else t.__name__
        raise ConfigError(f"{where}: {f.name} expects {want}, got {value!r}") from None


def _home(value: str) -> str:
    """`~/x` (and `~/x.py:func`) as the shell would expand it: YAML values and `--flag=~/x` reach us
    unexpanded."""
    return str(Path(value).expanduser()) if value.startswith("~/") or value == "~" else value


def build_config(cls, values: dict[str, Any], where: str = "config"):
    """Make `cls` from a flat dict of values (YAML and/or flags), with typed coercion and checks."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        name = key.replace("-", "_")
        if name not in fields:
            near = difflib.get_close_matches(name, fields, n=1, cutoff=0.5)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise ConfigError(f"{where}: unknown key {key!r}{hint}")
        kwargs[name] = _coerce(cls, fields[name], value, where)
    return cls(**kwargs)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a flat YAML mapping of config keys, naming the file on any error."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values, got {type(data).__name__}")
    return data
