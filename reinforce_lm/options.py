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
        if t is bool:  # a bool, or YAML's words for one quoted as text; `progress: 5` is no answer
            if value is None:  # `progress:` left empty in a YAML file
                return f.default
            if isinstance(value, str) and value.lower() in _BOOL_WORDS:
                return _BOOL_WORDS[value.lower()]
            if not isinstance(value, bool):
                raise ValueError(value)
            return value
        if t is list:
            if value is None:  # `reward:` left empty in a YAML file
                return []
            if isinstance(value, dict):  # `reward: {f: x.py:g}`: not one reward, nor a list of them
                raise ValueError(value)
            items = value if isinstance(value, list | tuple) else [value]
            if any(isinstance(v, bool | list | tuple | dict) for v in items):
                raise ValueError(value)
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
        if t in (int, float) and isinstance(value, bool):  # `steps: true` is not 1
            raise ValueError(value)
        return t(value)
    except (TypeError, ValueError):
        want = "numbers" if f.name == "reward_weights" else t.__name__
        raise ConfigError(f"{where}: {f.name} expects {want}, got {value!r}") from None


_BOOL_WORDS = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}


def _home(value: str) -> str:
    """`~/x` (and `~/x.py:func`) as the shell would expand it: YAML values and `--flag=~/x` reach us
    unexpanded."""
    return str(Path(value).expanduser()) if value.startswith("~/") or value == "~" else value


def build_config(cls, values: dict[str, Any], where: str = "config", at: dict[str, str] | None = None):
    """Make `cls` from a flat dict of values (YAML and/or flags), with typed coercion and checks. An
    error about a key names `at[key]` ("run.yaml:3") where given, else `where`."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        name = key.replace("-", "_")
        here = (at or {}).get(key, where)
        if name not in fields:
            near = difflib.get_close_matches(name, fields, n=1, cutoff=0.5)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise ConfigError(f"{here}: unknown key {key!r}{hint}")
        kwargs[name] = _coerce(cls, fields[name], value, here)
    return cls(**kwargs)


class YamlValues(dict):
    """A YAML file's mapping, with the line each top-level key is on (`lines`), for errors."""

    lines: dict[str, int]


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a flat YAML mapping of config keys, naming the file on any error."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise ConfigError(
            f"{path}:{line}: not UTF-8 (byte 0x{raw[err.start]:02x}); re-save the file as UTF-8"
        ) from None
    try:
        data = yaml.load(text, Loader=_unique_key_loader()) or {}
    except _DuplicateKey as e:
        raise ConfigError(f"{path}:{e.line}: key {e.key!r} is given twice") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values, got {type(data).__name__}")
    for key in data:
        if not isinstance(key, str):
            raise ConfigError(f"{path}: key {key!r} is not an option name such as steps")
    out = YamlValues(data)
    root = yaml.compose(text, Loader=yaml.SafeLoader)
    out.lines = {k.value: k.start_mark.line + 1 for k, _ in getattr(root, "value", []) if hasattr(k, "value")}
    return out


class _DuplicateKey(Exception):
    def __init__(self, key, line: int):
        super().__init__(key, line)
        self.key, self.line = key, line


@functools.cache
def _unique_key_loader():
    """yaml's SafeLoader, but a key given twice in one mapping is an error (`_DuplicateKey`), where
    SafeLoader keeps the last value. Keys merged in with `<<:` may still be overridden."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=deep)
                try:
                    again = key in seen
                except TypeError:  # unhashable: SafeLoader's own construct_mapping says so
                    continue
                if again:
                    raise _DuplicateKey(key, key_node.start_mark.line + 1)
                seen.add(key)
            return super().construct_mapping(node, deep=deep)

    return UniqueKeyLoader
