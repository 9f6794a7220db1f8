"""Plain dicts (as YAML reads them) to frozen dataclass trees and back: each value checked
against its field's type hint, with errors that name the field and the file."""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from typing import Any

from artefact.errors import UserError


def to_dict(tree: Any) -> dict[str, Any]:
    """A plain, YAML-ready dict (tuples become lists)."""

    def plain(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    return plain(dataclasses.asdict(tree))


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}, for comparing configs field by field."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        elif isinstance(value, dict) and merged.get(key) is not None:
            continue  # a section that is not a mapping (``train: 3``): kept, so from_dict names it
        else:
            merged[key] = value
    return merged


def build(cls: type, raw: Any, where: str, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise UserError(f"{where}: {prefix.rstrip('.') or 'the top level'} must be a mapping, got {raw!r}.")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else f" Known keys: {', '.join(names)}."
            raise UserError(f"{where}: unknown config key {prefix}{key}.{hint}")
        kwargs[key] = _coerce(hints[key], value, where, f"{prefix}{key}")
    return cls(**kwargs)


def _coerce(kind: Any, value: Any, where: str, name: str) -> Any:
    if dataclasses.is_dataclass(kind):
        return build(kind, value, where, f"{name}.")
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(kind):
            try:
                return _coerce(option, value, where, name)
            except UserError:
                continue
        raise UserError(f"{where}: {name} = {value!r} has the wrong type; expected {_describe(kind)}.")
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"{where}: {name} = {value!r} must be a mapping.")
        key_kind, value_kind = typing.get_args(kind)
        return {
            _coerce(key_kind, k, where, name): _coerce(value_kind, v, where, f"{name}.{k}") for k, v in value.items()
        }
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{where}: {name} = {value!r} must be a list.")
        (item,) = typing.get_args(kind)[:1]
        return tuple(_coerce(item, v, where, name) for v in value)
    if kind is type(None):
        if value is not None:
            raise UserError(f"{where}: {name} = {value!r} must be null.")
        return None
    if kind is bool:
        if not isinstance(value, bool):
            raise UserError(f"{where}: {name} = {value!r} must be true or false.")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{where}: {name} = {value!r} must be an integer.")
        return value
    if kind is float:
        if isinstance(value, str):  # PyYAML reads 3e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise UserError(f"{where}: {name} = {value!r} must be a finite number.")
        return float(value)
    if kind is str:
        if not isinstance(value, str):
            raise UserError(f"{where}: {name} = {value!r} must be a string.")
        return value
    raise TypeError(f"unsupported config type {kind!r} for {name}")


def _describe(kind: Any) -> str:
    args = typing.get_args(kind)
    return " or ".join("null" if a is type(None) else getattr(a, "__name__", str(a)) for a in args)
