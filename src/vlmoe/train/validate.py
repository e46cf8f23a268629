"""Typed dataclasses from YAML mappings: every key known, every value of its field's type.

Errors name the file and the dotted key (`recipe.yaml: stages[0].batch_size: expected an
integer, got 'eight'`), so a bad recipe fails before any work starts.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from vlmoe.moe.config import JSON_TYPE_NAMES


class RecipeError(ValueError):
    """A recipe file that does not validate; the message names the file, the key and the fix."""


def valid(test: Callable[[Any], bool], allowed: str) -> dict[str, Any]:
    """Field metadata: `check_values` refuses a value for which `test` is false, saying `allowed`
    (for a mapping field, each of its values).

    >>> import dataclasses
    >>> @dataclasses.dataclass
    ... class Stage:
    ...     max_steps: int = dataclasses.field(default=-1, metadata=valid(lambda n: n != 0, "not 0"))
    >>> check_values(Stage(max_steps=0), "stages[0] (sft)", "recipe.yaml")
    Traceback (most recent call last):
    ...
    vlmoe.train.validate.RecipeError: recipe.yaml: stages[0] (sft).max_steps is 0; it must be not 0
    """
    return {"valid": (test, allowed)}


AT_LEAST_1 = valid(lambda n: n >= 1, "at least 1")
NOT_NEGATIVE = valid(lambda n: n >= 0, "0 or more")
MORE_THAN_0 = valid(lambda n: n > 0, "more than 0")
FINITE_MORE_THAN_0 = valid(lambda n: 0 < n < math.inf, "more than 0 and finite")


def check_values(obj: Any, where: str, path: Path | str) -> None:
    """Refuse any value outside its field's `valid` metadata, in `obj` and the dataclasses in it.

    Run after the types are checked (`from_mapping`) and the scale merged; None (unset) passes."""
    for f in dataclasses.fields(obj):
        value, key = getattr(obj, f.name), _join(where, f.name)
        if dataclasses.is_dataclass(value):
            check_values(value, key, path)
        elif isinstance(value, list) and value and dataclasses.is_dataclass(value[0]):
            for i, item in enumerate(value):
                check_values(item, _join(key, i), path)
        elif "valid" in f.metadata and value is not None:
            test, allowed = f.metadata["valid"]
            for item_key, item in value.items() if isinstance(value, dict) else [(None, value)]:
                if not test(item):
                    shown = key if item_key is None else _join(key, str(item_key))
                    raise RecipeError(f"{path}: {shown} is {item!r}; it must be {allowed}")


def from_mapping(cls: Any, raw: Any, where: str, path: Path) -> Any:
    """`cls` (a dataclass) from a YAML mapping, checking every key and type."""
    label = where or "recipe"
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: {label}: expected a mapping, got {type(raw).__name__} {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = _check_keys(cls, raw, where, path)
    values = {}
    for f in fields:
        key = _join(where, f.name)
        if f.name in raw:
            values[f.name] = _value(hints[f.name], raw[f.name], key, path)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise RecipeError(f"{path}: missing key {key!r}")
    return cls(**values)


def check_override_keys(cls: Any, overrides: Any, where: str, path: Path) -> None:
    """Every key of a partial mapping that will be merged over `cls` is one of its fields, down
    through the mappings that merge into nested dataclasses. Used where the overrides are written
    (a recipe's scales), so a typo is named there; the values are checked after the merge."""
    if not isinstance(overrides, dict):
        raise RecipeError(f"{path}: {where}: expected a mapping, got {overrides!r}")
    _check_keys(cls, overrides, where, path)
    hints = typing.get_type_hints(cls)
    for key, value in overrides.items():
        nested = [a for a in (typing.get_args(hints[key]) or (hints[key],)) if dataclasses.is_dataclass(a)]
        if isinstance(value, dict) and nested:
            check_override_keys(nested[0], value, _join(where, key), path)


def _check_keys(cls: Any, raw: dict, where: str, path: Path) -> list[dataclasses.Field]:
    """The fields of `cls` a file may set, after refusing any key of `raw` that is none of them."""
    # A field with metadata {"key": False} is set by code (e.g. Recipe.source), never by the file.
    fields = [f for f in dataclasses.fields(cls) if f.metadata.get("key", True)]
    names = [f.name for f in fields]
    unknown = [key for key in raw if key not in names]
    if unknown:
        raise RecipeError(
            f"{path}: unknown key {_join(where, unknown[0])!r}; {where or 'recipe'} takes {', '.join(names)}"
        )
    return fields


def _join(where: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{where}[{key}]"
    return f"{where}.{key}" if where else key


def _value(hint: Any, value: Any, key: str, path: Path) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _value(option, value, key, path)
            except RecipeError as error:
                errors.append(error)
        raise (
            errors[0]
            if len(errors) == 1
            else RecipeError(f"{path}: {key}: expected {_describe(hint)}, got {value!r}")
        )
    if origin is Literal:
        if value not in args:
            raise RecipeError(f"{path}: {key}: must be one of {list(args)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise RecipeError(f"{path}: {key}: expected a list, got {value!r}")
        return [_value(args[0], item, _join(key, i), path) for i, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{path}: {key}: expected a mapping, got {value!r}")
        return {k: _value(args[1], v, _join(key, str(k)), path) for k, v in value.items()}
    if dataclasses.is_dataclass(hint):
        return from_mapping(hint, value, key, path)
    if hint is Any:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # YAML reads 1e-3 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if hint in (int, float, str, bool) and (type(value) is not hint):
        raise RecipeError(f"{path}: {key}: expected {_describe(hint)}, got {value!r}")
    return value


def _describe(hint: Any) -> str:
    if hint in (int, float, str, bool):
        return JSON_TYPE_NAMES[hint]
    return str(hint).replace("typing.", "")
