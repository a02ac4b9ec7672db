"""Config files (TOML or YAML) read into dataclasses, with clear errors.

Unknown keys and values of the wrong type name the file, the section and the key, so a
typo fails at once instead of hours into a run.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from pathlib import Path
from typing import Any

__all__ = ["from_dict", "read_file", "to_toml"]


def read_file(path: str | Path) -> dict:
    """A config file as a dict: ``.toml``, or ``.yaml``/``.yml``."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: config file not found")
    if path.is_dir():
        raise IsADirectoryError(f"{path}: is a folder, not a config file")
    if path.suffix in (".yaml", ".yml"):
        import yaml

        with open(path) as f:
            try:
                values = yaml.safe_load(f) or {}
            except yaml.YAMLError as err:
                raise ValueError(f"{path}: not valid YAML: {err}".replace("\n", " ")) from None
    elif path.suffix == ".toml":
        with open(path, "rb") as f:
            try:
                values = tomllib.load(f)
            except tomllib.TOMLDecodeError as err:
                raise ValueError(f"{path}: not valid TOML: {err}") from None
    else:
        raise ValueError(f"{path}: config must be .toml, .yaml or .yml")
    if not isinstance(values, dict):
        raise TypeError(f"{path}: config must be a mapping of sections, got {type(values)}")
    return values


def _type_ok(value: Any, annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if origin is not None:  # list[int], dict[str, Any]...
        annotation = origin
    if annotation is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if dataclasses.is_dataclass(annotation):
        return isinstance(value, annotation | dict)
    return isinstance(value, annotation)


def from_dict(cls: type, values: Any, where: str):
    """Build dataclass ``cls`` from a dict, checking keys and types; nested dataclass
    fields are built from nested dicts."""
    if isinstance(values, cls):
        return values
    if not isinstance(values, dict):
        raise TypeError(f"{where}: expected a section (mapping), got {values!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(values) - set(fields)
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}; known: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    out = {}
    for key, value in values.items():
        hint = hints[key]
        if not _type_ok(value, hint):
            name = getattr(hint, "__name__", str(hint))
            raise TypeError(f"{where}: {key} = {value!r} should be of type {name}")
        classes = [h for h in (hint, *typing.get_args(hint)) if dataclasses.is_dataclass(h)]
        if classes and isinstance(value, dict):
            value = from_dict(classes[0], value, f"{where}.{key}")
        out[key] = value
    missing = [f.name for f in fields.values() if f.name not in out
               and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ValueError(f"{where}: missing required keys {missing}")
    return cls(**out)


def to_toml(config: dict) -> str:
    """A config of sections (dicts of plain values) as TOML text; None values are left
    out (TOML has no null)."""
    import json

    lines = []
    for section, values in config.items():
        if values is None:
            continue
        lines.append(f"[{section}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in values.items() if v is not None]
        lines.append("")
    return "\n".join(lines)
