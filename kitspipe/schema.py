"""Loading nested frozen dataclasses from JSON with errors that name the field.

Plans are edited by hand, so a misspelt key (``target_spacng``), a string where a number
belongs or a missing field must stop the run with the dotted path of the field, never fall
back to a silent default. ``None`` is allowed only where a field's type says so.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Literal, Union

from kitspipe.errors import PlanError


def from_dict(cls: type, data: Any, where: str) -> Any:
    """Build dataclass ``cls`` from ``data``; ``where`` prefixes every error (file and field)."""
    if not isinstance(data, dict):
        raise PlanError(f"{where}: expected an object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise PlanError(f"{where}.{unknown[0]}: unknown key (known: {', '.join(sorted(fields))})")
    values = {}
    for name, field in fields.items():
        if name not in data:
            if field.default is not dataclasses.MISSING:
                values[name] = field.default
                continue
            if field.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                values[name] = field.default_factory()  # type: ignore[misc]
                continue
            raise PlanError(f"{where}.{name}: missing required key")
        values[name] = _convert(hints[name], data[name], f"{where}.{name}")
    try:
        return cls(**values)
    except (ValueError, TypeError) as error:
        message = str(error)
        raise PlanError(message if message.startswith(where) else f"{where}: {message}") from None


def _convert(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return _convert(option, value, where)
            except PlanError as error:
                errors.append(str(error))
        raise PlanError(errors[0] if len(errors) == 1 else f"{where}: {value!r} matches none of the allowed types")
    if origin is Literal:
        if value not in args:
            raise PlanError(f"{where}: {value!r} is not one of {', '.join(repr(a) for a in args)}")
        return value
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise PlanError(f"{where}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise PlanError(f"{where}: expected {len(args)} values, got {len(value)}")
        return tuple(_convert(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin is dict:
        if not isinstance(value, dict):
            raise PlanError(f"{where}: expected an object, got {value!r}")
        return {str(k): _convert(args[1], v, f"{where}.{k}") for k, v in value.items()}
    if hint is bool:
        if not isinstance(value, bool):
            raise PlanError(f"{where}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise PlanError(f"{where}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise PlanError(f"{where}: expected a finite number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise PlanError(f"{where}: expected a string, got {value!r}")
        return value
    raise PlanError(f"{where}: unsupported field type {hint!r}")


def to_dict(obj: Any) -> Any:
    """Plain JSON-ready structure (tuples become lists)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def merge(base: dict, override: dict) -> dict:
    """Recursive dict merge used for presets that extend another preset."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out
